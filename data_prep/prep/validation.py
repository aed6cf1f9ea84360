"""Row validation of multi_event batches, as the scan streams them.

`data_prep.yambda.check_schema` checks a file's columns and types before any
work; this module checks the values, batch by batch. Structural problems are
one `YambdaFormatError` naming the file, the column, how many rows and the
first bad row; oddities the prep can live with are counted for the report.
"""

from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep import rules
from data_prep import yambda
from data_prep.prep import buckets


def _bad_row(path: str, batch: pa.RecordBatch, first_row: int, column: str,
             mask: np.ndarray, problem: str) -> yambda.YambdaFormatError:
  """The one error of a validation failure: file, column, count, example row."""
  row = int(np.flatnonzero(mask)[0])
  example = {k: v[0] for k, v in batch.slice(row, 1).to_pydict().items()}
  return yambda.YambdaFormatError(
      f"{path}: column '{column}' {problem.format(n=int(mask.sum()))}; first "
      f"bad row (row {first_row + row} of the file): {example}")


def _event_codes(path: str, batch: pa.RecordBatch, first_row: int
                 ) -> np.ndarray:
  """Event type -> index in yambda.EVENT_TYPES, or an error naming the row."""
  column = batch.column("event_type")
  known = pa.array(yambda.EVENT_TYPES)
  if pa.types.is_dictionary(column.type):
    # Look the (few) dictionary values up once, then map the indices.
    lookup = pc.index_in(column.dictionary.cast(pa.string()), value_set=known)
    lookup = lookup.fill_null(-1).to_numpy(zero_copy_only=False)
    indices = column.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    codes = np.where(indices >= 0, lookup[np.maximum(indices, 0)], -1)
  else:
    codes = pc.index_in(column.cast(pa.string()), value_set=known)
    codes = codes.fill_null(-1).to_numpy(zero_copy_only=False)
  unknown = codes < 0
  if unknown.any():
    raise _bad_row(path, batch, first_row, "event_type", unknown,
                   f"has {{n}} values outside {list(yambda.EVENT_TYPES)}")
  return codes.astype(np.int8)


def _numbers(path: str, batch: pa.RecordBatch, first_row: int, name: str,
             dtype) -> Tuple[np.ndarray, np.ndarray]:
  """A numeric column as `dtype` (nulls as 0) and its null mask."""
  column = batch.column(name)
  nulls = (column.is_null().to_numpy(zero_copy_only=False)
           if column.null_count else np.zeros(len(column), bool))
  values = column.fill_null(0).to_numpy(zero_copy_only=False)
  if values.dtype.kind in "if" and (values < 0).any():
    raise _bad_row(path, batch, first_row, name, values < 0,
                   "has {n} negative values")
  if np.dtype(dtype).kind == "u" and len(values) and (
      values.max() > np.iinfo(dtype).max):
    raise _bad_row(path, batch, first_row, name,
                   values > np.iinfo(dtype).max,
                   f"has {{n}} values above {np.iinfo(dtype).max} (the prep "
                   f"stores it as {np.dtype(dtype).name})")
  return values.astype(dtype, copy=False), nulls


def validate_batch(path: str, batch: pa.RecordBatch, first_row: int
                   ) -> Tuple[pa.Table, Dict[str, int]]:
  """Checks one batch of multi_event rows; returns compact columns and counts.

  Structural problems (unknown event type, nulls in ids or time, negative
  values, a listen without played ratio) are errors; oddities the prep can
  live with are counted for the report.

  Args:
    path: the file the batch comes from (for the error).
    batch: multi_event rows.
    first_row: the batch's first row in the file (for the error).

  Returns:
    (the rows as `buckets.BUCKET_SCHEMA`, event type codes included; counts
    by event type and oddity).

  Raises:
    yambda.YambdaFormatError: a structural problem.
  """
  codes = _event_codes(path, batch, first_row)
  is_listen = codes == rules.LISTEN
  columns = {}
  for name, dtype in (("uid", np.uint32), ("timestamp", np.uint32),
                      ("item_id", np.uint32), ("is_organic", np.uint8)):
    values, nulls = _numbers(path, batch, first_row, name, dtype)
    if nulls.any():
      raise _bad_row(path, batch, first_row, name, nulls, "has {n} nulls")
    columns[name] = values
  ratio, ratio_null = _numbers(path, batch, first_row, "played_ratio_pct",
                               np.float32)
  if (ratio_null & is_listen).any():
    raise _bad_row(path, batch, first_row, "played_ratio_pct",
                   ratio_null & is_listen, "is null for {n} listen events")
  length, length_null = _numbers(path, batch, first_row,
                                 "track_length_seconds", np.float32)
  columns["played_ratio_pct"] = ratio
  columns["track_length_seconds"] = np.where(length_null, np.float32(np.nan),
                                             length)
  columns["event_type"] = codes
  counts = {f"events_{t}": int(np.sum(codes == i))
            for i, t in enumerate(yambda.EVENT_TYPES)}
  counts["events"] = len(codes)
  counts["listens_without_track_length"] = int(np.sum(length_null & is_listen))
  counts["explicit_events_with_played_ratio_ignored"] = int(
      np.sum(~ratio_null & ~is_listen))
  counts["events_is_organic_not_0_or_1"] = int(
      np.sum(columns["is_organic"] > 1))
  schema = buckets.BUCKET_SCHEMA
  table = pa.Table.from_arrays([pa.array(columns[f.name], f.type)
                                for f in schema], schema=schema)
  return table, counts
