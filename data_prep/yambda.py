"""The raw Yambda layout: file paths, column schemas, and validated reading.

Both the generator (which writes this layout) and the prep (which reads it) use
this module, so a generated folder and a real download look the same to the
rest of the project. The real files are read with their own schema and checked
here; a missing column or an unusable type is a `YambdaFormatError` that names
the file, the column and what was expected.
"""

import os
from typing import Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

EVENT_TYPES = ("listen", "like", "dislike", "unlike", "undislike")

# Types the real download uses; the generator writes exactly these.
MULTI_EVENT_SCHEMA = pa.schema([
    ("uid", pa.uint32()),
    ("timestamp", pa.uint32()),
    ("item_id", pa.uint32()),
    ("is_organic", pa.uint8()),
    ("played_ratio_pct", pa.uint16()),
    ("track_length_seconds", pa.uint32()),
    ("event_type", pa.dictionary(pa.int8(), pa.string())),
])
ARTIST_MAPPING_SCHEMA = pa.schema([("item_id", pa.uint32()),
                                   ("artist_id", pa.uint32())])
ALBUM_MAPPING_SCHEMA = pa.schema([("item_id", pa.uint32()),
                                  ("album_id", pa.uint32())])
EMBEDDINGS_SCHEMA = pa.schema([
    ("item_id", pa.uint32()),
    ("embed", pa.list_(pa.float32())),
    ("normalized_embed", pa.list_(pa.float32())),
])


class YambdaFormatError(ValueError):
  """A raw file does not have the layout or schema the project needs."""


def multi_event_path(root: str, size: str) -> str:
  return os.path.join(root, "flat", size, "multi_event.parquet")


def embeddings_path(root: str) -> str:
  return os.path.join(root, "embeddings.parquet")


def artist_mapping_path(root: str) -> str:
  return os.path.join(root, "artist_item_mapping.parquet")


def album_mapping_path(root: str) -> str:
  return os.path.join(root, "album_item_mapping.parquet")


def _is_int(t: pa.DataType) -> bool:
  return pa.types.is_integer(t)


def _is_number(t: pa.DataType) -> bool:
  return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_event_type(t: pa.DataType) -> bool:
  if pa.types.is_dictionary(t):
    t = t.value_type
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_float_list(t: pa.DataType) -> bool:
  return ((pa.types.is_list(t) or pa.types.is_large_list(t) or
           pa.types.is_fixed_size_list(t)) and _is_number(t.value_type))


# Column -> (check, what the check accepts), per file kind.
_REQUIRED = {
    "multi_event": {
        "uid": (_is_int, "an integer"),
        "timestamp": (_is_int, "an integer (seconds)"),
        "item_id": (_is_int, "an integer"),
        "is_organic": (_is_int, "an integer 0/1"),
        "played_ratio_pct": (_is_number, "a number (percent)"),
        "track_length_seconds": (_is_number, "a number (seconds)"),
        "event_type": (_is_event_type, "a string or dictionary<string>"),
    },
    "artist_mapping": {"item_id": (_is_int, "an integer"),
                       "artist_id": (_is_int, "an integer")},
    "album_mapping": {"item_id": (_is_int, "an integer"),
                      "album_id": (_is_int, "an integer")},
    "embeddings": {"item_id": (_is_int, "an integer"),
                   "normalized_embed": (_is_float_list, "a list of floats")},
}


def check_schema(path: str, kind: str) -> pa.Schema:
  """The file's schema, or a YambdaFormatError naming the problem."""
  if not os.path.exists(path):
    raise YambdaFormatError(f"{path}: file not found (expected the Yambda "
                            f"'{kind}' file here).")
  try:
    schema = pq.read_schema(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise YambdaFormatError(
        f"{path}: not a readable parquet file ({e}).") from e
  for column, (accepts, expected) in _REQUIRED[kind].items():
    if column not in schema.names:
      raise YambdaFormatError(
          f"{path}: required column '{column}' is missing; the file has "
          f"{schema.names}.")
    actual = schema.field(column).type
    if not accepts(actual):
      raise YambdaFormatError(
          f"{path}: column '{column}' has type {actual}; expected {expected}.")
  return schema


def read_table(path: str, kind: str, columns: Sequence[str] = None) -> pa.Table:
  """Reads the required (or given) columns of a checked Yambda file."""
  check_schema(path, kind)
  columns = list(columns or _REQUIRED[kind])
  try:
    return pq.read_table(path, columns=columns)
  except (pa.ArrowInvalid, OSError) as e:
    raise YambdaFormatError(f"{path}: cannot be read ({e}).") from e


def required_columns(kind: str) -> List[str]:
  return list(_REQUIRED[kind])


def write_atomic(table: pa.Table, path: str, **kwargs) -> None:
  """Writes a parquet file under a temporary name, renamed when complete."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  pq.write_table(table, tmp, **kwargs)
  os.replace(tmp, path)


def schemas() -> Dict[str, pa.Schema]:
  return {"multi_event": MULTI_EVENT_SCHEMA, "embeddings": EMBEDDINGS_SCHEMA,
          "artist_mapping": ARTIST_MAPPING_SCHEMA,
          "album_mapping": ALBUM_MAPPING_SCHEMA}
