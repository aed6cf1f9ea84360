"""The item metadata files, read by the shared rules (both preps call these).

embeddings.parquet, artist_item_mapping.parquet and album_item_mapping.parquet
decide which never-played items the catalogue holds (`metadata_item_ids`),
each item's artist and album (`artists_and_albums`) and its audio embedding
(`first_embedding_rows`, `nonfinite_embedding_error`). The rules themselves
are pure array functions in `data_prep.rules`; this module reads the files.
"""

from typing import Tuple

import numpy as np

from data_prep import rules
from data_prep import yambda


def metadata_item_ids(root: str) -> np.ndarray:
  """Sorted ids of every item in the metadata files (embeddings, mappings).

  Args:
    root: a folder with the Yambda layout.

  Returns:
    int64 raw item ids, ascending, unique.
  """
  ids = [yambda.read_table(path, kind, ["item_id"]).column(
      "item_id").to_numpy().astype(np.int64) for path, kind in (
          (yambda.embeddings_path(root), "embeddings"),
          (yambda.artist_mapping_path(root), "artist_mapping"),
          (yambda.album_mapping_path(root), "album_mapping"))]
  return np.unique(np.concatenate(ids))


def first_mapping(path: str, kind: str, key: str, items: np.ndarray
                  ) -> Tuple[np.ndarray, int]:
  """Each item's artist (or album): the smallest id it maps to.

  Args:
    path: the mapping file.
    kind: "artist_mapping" or "album_mapping".
    key: the mapped column ("artist_id" or "album_id").
    items: sorted raw item ids of the catalogue.

  Returns:
    (mapped id per item, -1 where none; the count of items mapped to more
    than one distinct id: a repeated identical row is not a second one).
  """
  table = yambda.read_table(path, kind).to_pandas()
  table = table[table["item_id"].isin(items)]
  multi = int((table.groupby("item_id")[key].nunique() > 1).sum())
  first = table.groupby("item_id")[key].min()
  mapped = first.reindex(items).fillna(-1).to_numpy(np.int64)
  return mapped, multi


def artists_and_albums(root: str, items: np.ndarray, known: np.ndarray):
  """Each item's artist and album index, and both vocabularies (both preps).

  Args:
    root: the Yambda folder (its mapping files).
    items: sorted raw item ids of the catalogue.
    known: whether each item was listened to before the training cut.

  Returns:
    {"artist", "album": index per item (0 = none), "artist_ids",
    "album_ids": the vocabularies ([0] = -1), "multi_artist", "multi_album":
    items mapped to several (the smallest id kept)}.
  """
  found = {}
  for kind, path in (("artist", yambda.artist_mapping_path(root)),
                     ("album", yambda.album_mapping_path(root))):
    raw, found[f"multi_{kind}"] = first_mapping(
        path, f"{kind}_mapping", f"{kind}_id", items)
    found[kind], found[f"{kind}_ids"] = rules.to_vocab(raw, known)
  return found


def first_embedding_rows(ids: np.ndarray, catalogued: np.ndarray,
                         seen: np.ndarray = None) -> np.ndarray:
  """The rows of embeddings.parquet that give catalogue items their audio.

  An item's first row in the file is its embedding, whatever later rows of
  the same item_id hold (even when they differ, or the first is NaN): those
  are ignored, and counted as embedding_rows_duplicate_item_first_kept.

  Args:
    ids: item_id per row of (a batch of) the file, in file order.
    catalogued: whether each row's item is in the catalogue.
    seen: for a file read in batches, whether each row's item already had a
      row in an earlier batch (None: this is the whole file).

  Returns:
    A boolean mask: True for each catalogued row that is its item's first.
  """
  first = catalogued & ~rules.repeated_rows(ids)
  return first if seen is None else first & ~seen


def nonfinite_embedding_error(path: str, item_id: int, row: int
                              ) -> yambda.YambdaFormatError:
  """The error of a NaN/inf embedding of a catalogue item (both preps).

  Args:
    path: the embeddings file.
    item_id: the item's raw id.
    row: its row in the file.

  Returns:
    The error to raise, naming the file, column, item and row.
  """
  return yambda.YambdaFormatError(
      f"{path}: column 'normalized_embed' has NaN or inf values for item_id "
      f"{item_id} (row {row} of the file), an item the catalogue keeps. Fix "
      f"the file, or pass --nonfinite_embeddings=missing to treat such items "
      f"as having no audio embedding.")
