"""Pass 3, catalogue: one global merge of the bucket stats into the catalogue.

The bucket stats give every item's training positives, first listen and
(item, track length) counts, and every user's training positives; merged,
they give the item order, the vocabularies and the metadata, by the shared
rules (`data_prep.rules`). Audio embeddings are streamed into audio.npy in
catalogue order. Memory grows with items and users, never with events.
"""

import json
import os
import shutil
from typing import Dict, Tuple

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import item_metadata
from data_prep import rules
from data_prep import yambda
from data_prep.prep import stats
from data_prep.prep import work as work_lib
from tfrs_yambda import atomic
from tfrs_yambda import catalogue as catalogue_lib

# Rows per batch of audio embeddings (128 floats each).
AUDIO_BATCH_ROWS = 65536
# Bucket (item, length) keys merged into the catalogue in one sort, at least.
MERGE_MIN_KEYS = 4_000_000


def merge_stats(work: work_lib.Work, num_buckets: int):
  """Merges all bucket stats; memory grows with items and users, not events.

  Bucket keys wait in a batch until they outnumber the keys merged so far
  (or MERGE_MIN_KEYS): each sort then at least halves what it reads again,
  so the merge costs O(total keys log) rather than one full sort per bucket,
  which at hundreds of buckets would dominate the pass.

  Args:
    work: the work folder, with every bucket's stats file.
    num_buckets: the number of buckets.

  Returns:
    (keys, key_listens, key_train): per (item, length) key (`stats.length_key`)
    its listens before train_end and its training targets; (first_items,
    first_ts): every listened item, ascending, and its first listen; (uids,
    user_train): every user and its training targets; and the summed counts.
  """
  keys = np.zeros(0, np.uint64)
  key_listens = key_train = np.zeros(0, np.int64)
  first_items = first_ts = np.zeros(0, np.int64)
  pending, pending_first, pending_keys = [], [], 0
  uids, user_train, counts = [], [], {}

  def merged():
    parts = [(keys, key_listens, key_train)] + pending
    return stats.reduce_keys(*(np.concatenate(column)
                               for column in zip(*parts)))

  def merged_first():
    items = np.concatenate([first_items] + [p[0] for p in pending_first])
    times = np.concatenate([first_ts] + [p[1] for p in pending_first])
    order = np.lexsort((times, items))
    items, times = items[order], times[order]
    first = np.r_[True, items[1:] != items[:-1]][:len(items)]
    return items[first], times[first]

  for bucket in range(num_buckets):
    with np.load(work.bucket_stats(bucket)) as z:
      pending.append((z["keys"], z["key_listens"], z["key_train"]))
      pending_first.append((z["first_items"], z["first_ts"]))
      pending_keys += len(z["keys"])
      uids.append(z["uids"])  # a user lives in one bucket
      user_train.append(z["user_train"])
      for k, v in json.loads(str(z["counts"])).items():
        counts[k] = counts.get(k, 0) + v
    if pending_keys >= max(len(keys), MERGE_MIN_KEYS):
      keys, key_listens, key_train = merged()
      first_items, first_ts = merged_first()
      pending, pending_first, pending_keys = [], [], 0
  if pending:
    keys, key_listens, key_train = merged()
    first_items, first_ts = merged_first()
  return (keys, key_listens, key_train, first_items, first_ts,
          np.concatenate(uids), np.concatenate(user_train), counts)


def _median_lengths(keys: np.ndarray, key_listens: np.ndarray,
                    sorted_items: np.ndarray) -> np.ndarray:
  """Per item, the median track length over its listens (0 where none), from
  the (item, length) -> listens histogram; equal to pandas' median."""
  item = (keys >> np.uint64(32)).astype(np.int64)
  length = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
  known = ~np.isnan(length) & (key_listens > 0)
  item, length, weight = item[known], length[known].astype(np.float64), \
      key_listens[known]
  order = np.lexsort((length, item))
  item, length, weight = item[order], length[order], weight[order]
  result = np.zeros(len(sorted_items), np.float64)
  if not len(item):
    return result
  starts = np.flatnonzero(np.r_[True, item[1:] != item[:-1]])
  totals = np.add.reduceat(weight, starts)
  cumulative = np.cumsum(weight)
  before = cumulative[starts] - weight[starts]
  lower = np.searchsorted(cumulative, before + (totals - 1) // 2, side="right")
  upper = np.searchsorted(cumulative, before + totals // 2, side="right")
  medians = (length[lower] + length[upper]) / 2
  result[np.searchsorted(sorted_items, item[starts])] = medians
  return result


def _stream_audio(path: str, sorted_items: np.ndarray, index_of: np.ndarray,
                  out_path: str, batch_rows: int,
                  nonfinite_embeddings: str = "error"
                  ) -> Tuple[np.ndarray, int, int, int]:
  """Writes audio.npy [n_items + 1, width] in catalogue order, batch by batch.

  The matrix is the one catalogue piece as large as items x width (about 5 GB
  at 9.4M items), so it goes to disk through a memory map, never whole in RAM.
  Returns has_audio in catalogue order, the width, the count of items whose
  embedding was non-finite and so treated as missing, and the count of rows
  ignored as a catalogue item's repeated row (its first row is kept,
  `item_metadata.first_embedding_rows`).

  NaN or inf in a kept item's embedding is an error naming the item and its
  row in the file, as the in-memory reference does; with
  nonfinite_embeddings="missing" the item gets a zero row and has_audio False.
  """
  if nonfinite_embeddings not in rules.NONFINITE_EMBEDDINGS:
    raise ValueError(f"nonfinite_embeddings must be one of "
                     f"{rules.NONFINITE_EMBEDDINGS}, not "
                     f"{nonfinite_embeddings!r}")
  yambda.check_schema(path, "embeddings")
  parquet = pq.ParquetFile(path)
  width = None
  audio = None
  has_audio = np.zeros(len(sorted_items) + 1, bool)
  nonfinite = np.zeros(len(sorted_items) + 1, bool)
  seen = np.zeros(len(sorted_items) + 1, bool)  # items given a row so far
  repeated = 0
  next_row = 0  # row of the file where the next batch starts
  del batch_rows  # embeddings are wide: their own, smaller batches
  for batch in parquet.iter_batches(batch_size=AUDIO_BATCH_ROWS,
                                    columns=["item_id", "normalized_embed"]):
    first_row, next_row = next_row, next_row + batch.num_rows
    ids = batch.column("item_id").to_numpy().astype(np.int64)
    pos = np.minimum(np.searchsorted(sorted_items, ids),
                     max(len(sorted_items) - 1, 0))
    keep = (sorted_items[pos] == ids) if len(sorted_items) else np.zeros(
        len(ids), bool)
    embed = batch.column("normalized_embed")
    widths = pc.list_value_length(embed).to_numpy(zero_copy_only=False)
    if len(widths) and ((widths != widths[0]).any() or
                        (width is not None and widths[0] != width)):
      raise yambda.YambdaFormatError(
          f"{path}: column 'normalized_embed' has lists of different lengths "
          f"({sorted(set(widths.tolist()))[:5]}...).")
    if width is None and len(widths):
      width = int(widths[0])
      audio = np.lib.format.open_memmap(
          out_path, mode="w+", dtype=np.float32,
          shape=(len(sorted_items) + 1, width))
    catalogued, earlier = keep, np.zeros(len(ids), bool)
    earlier[catalogued] = seen[index_of[pos[catalogued]]]
    keep = item_metadata.first_embedding_rows(ids, catalogued, earlier)
    repeated += int(np.sum(catalogued & ~keep))
    if not keep.any():
      continue
    values = embed.flatten().to_numpy(zero_copy_only=False).astype(
        np.float32).reshape(len(ids), width)[keep]
    rows = index_of[pos[keep]]
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
      if nonfinite_embeddings == "error":
        bad = np.flatnonzero(keep)[np.flatnonzero(~finite)[0]]
        raise item_metadata.nonfinite_embedding_error(
            path, int(ids[bad]), first_row + int(bad))
      values[~finite] = 0
      nonfinite[rows[~finite]] = True
    by_row = np.argsort(rows)  # in file order, the writes touch fewer pages
    audio[rows[by_row]] = values[by_row]
    has_audio[rows] = finite
    seen[rows] = True
  if audio is None:
    width = 0
    np.save(out_path, np.zeros((len(sorted_items) + 1, 0), np.float32))
  else:
    audio.flush()
    del audio
  return has_audio, width, int(np.sum(nonfinite & ~has_audio)), repeated


def build_catalogue(root: str, work: work_lib.Work, num_buckets: int,
                    metadata: Dict, batch_rows: int,
                    metadata_items: bool = True) -> Dict:
  """Pass 3: merges bucket stats into the catalogue folder.

  The rules are the reference's (`data_prep.rules`): rows in `item_order`,
  and what the model learns from comes from before the training cut.

  Args:
    root: the Yambda folder (metadata files and embeddings).
    work: the work folder; the catalogue is written to `work.catalogue`.
    num_buckets: the number of buckets.
    metadata: the catalogue's metadata (time split, prep config, ...); the
      example counts are added.
    batch_rows: rows per batch when streaming parquet input.
    metadata_items: also catalogue every item of the metadata files.

  Returns:
    The report's counts so far (the buckets' and the catalogue's).
  """
  (keys, key_listens, key_train, first_items, first_ts, uids, user_train,
   counts) = merge_stats(work, num_buckets)
  metadata = dict(metadata, **{f"num_{name}_examples": counts[
      f"{name}_examples"] for name in rules.windows(metadata)})
  key_items = (keys >> np.uint64(32)).astype(np.int64)
  starts = np.flatnonzero(np.r_[True, key_items[1:] != key_items[:-1]]) if len(
      keys) else np.zeros(0, np.int64)
  sorted_items = first_items  # every listened item, ascending
  item_counts = np.zeros(len(sorted_items), np.int64)
  if len(keys):
    item_counts[np.searchsorted(sorted_items, key_items[starts])] = (
        np.add.reduceat(key_train, starts))
  first_listen = first_ts
  if metadata_items:
    listened = sorted_items
    sorted_items = np.union1d(listened, item_metadata.metadata_item_ids(root))
    at = np.searchsorted(sorted_items, listened)
    first_listen = np.full(len(sorted_items), rules.NEVER_LISTENED, np.int64)
    first_listen[at] = first_ts
    counts_all = np.zeros(len(sorted_items), np.int64)
    counts_all[at] = item_counts
    item_counts = counts_all
  order = rules.item_order(sorted_items, item_counts, first_listen)
  index_of = np.empty(len(order), np.int64)
  index_of[order] = np.arange(1, len(order) + 1)
  known = (first_listen != rules.NEVER_LISTENED) & (
      first_listen < metadata["train_end"])

  mapped = item_metadata.artists_and_albums(root, sorted_items, known)
  length = _median_lengths(keys, key_listens, sorted_items)

  def reorder(values, fill):
    return np.concatenate([[fill], values[order]])

  uid_order = np.argsort(uids, kind="stable")
  uids, user_train = uids[uid_order], user_train[uid_order]
  user_order = np.lexsort((uids, -user_train))
  user_order = user_order[user_train[user_order] > 0]

  tmp = work.catalogue + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  audio_path = os.path.join(tmp, "audio.stream.npy")
  # The prep's config (metadata["prep_config"]) says how NaN/inf is handled.
  has_audio, width, nonfinite, repeated = _stream_audio(
      yambda.embeddings_path(root), sorted_items, index_of, audio_path,
      batch_rows,
      metadata.get("prep_config", {}).get("nonfinite_embeddings", "error"))
  cat = catalogue_lib.Catalogue(
      item_ids=reorder(sorted_items, -1).astype(np.int64),
      item_artist=reorder(mapped["artist"], 0).astype(np.int64),
      item_album=reorder(mapped["album"], 0).astype(np.int64),
      item_length=reorder(length, 0.0).astype(np.float32),
      item_train_count=reorder(item_counts, 0).astype(np.int64),
      item_first_listen=reorder(first_listen,
                                rules.NEVER_LISTENED).astype(np.int64),
      has_audio=has_audio,
      # The real matrix is already in audio.stream.npy; see _stream_audio.
      audio=np.zeros((1, width), np.float32),
      user_ids=np.concatenate([[-1], uids[user_order]]).astype(np.int64),
      user_train_count=np.concatenate([[0], user_train[user_order]]),
      artist_ids=mapped["artist_ids"],
      album_ids=mapped["album_ids"],
      metadata=metadata,
  )
  catalogue_lib.write(cat, tmp)
  os.replace(audio_path, os.path.join(tmp, "audio.npy"))
  counts.update(catalogue_counts(cat, len(uids), mapped["multi_artist"],
                                 mapped["multi_album"], nonfinite, repeated))
  atomic.write_json(counts, os.path.join(tmp, "counts.json"))
  os.replace(tmp, work.catalogue)
  return counts


def catalogue_counts(cat: catalogue_lib.Catalogue, num_users: int,
                     multi_artist: int, multi_album: int,
                     nonfinite: int, repeated_embeddings: int = 0
                     ) -> Dict[str, int]:
  """The report's counts of a finished catalogue, as both preps count them.

  Args:
    cat: the catalogue (its `audio` may be a placeholder of the right width).
    num_users: users with any listen (the catalogue keeps only those with
      training positives).
    multi_artist: items mapped to several artists (the smallest id kept).
    multi_album: items mapped to several albums (the smallest id kept).
    nonfinite: items whose embedding held NaN/inf, treated as missing.
    repeated_embeddings: embedding rows ignored as a catalogue item's second
      or later row.

  Returns:
    Name -> count, as prep_report.json has them.
  """
  first = cat.item_first_listen[1:]  # index 0 is "unknown item"
  return {
      "items": cat.num_items,
      "items_with_train_positives": int(np.sum(cat.item_train_count[1:] > 0)),
      "items_listened_before_train_end": int(np.sum(
          (first != rules.NEVER_LISTENED) &
          (first < cat.metadata["train_end"]))),
      "items_only_in_metadata_files": int(np.sum(
          first == rules.NEVER_LISTENED)),
      "users": num_users,
      "users_with_train_positives": len(cat.user_ids) - 1,
      "artists": len(cat.artist_ids) - 1,
      "albums": len(cat.album_ids) - 1,
      "items_without_artist": int(np.sum(cat.item_artist[1:] == 0)),
      "items_without_album": int(np.sum(cat.item_album[1:] == 0)),
      "items_with_several_artists_first_kept": multi_artist,
      "items_with_several_albums_first_kept": multi_album,
      "items_without_audio_embedding": int(np.sum(~cat.has_audio[1:])),
      "items_with_nonfinite_embedding_treated_as_missing": nonfinite,
      "embedding_rows_duplicate_item_first_kept": repeated_embeddings,
      "items_without_track_length": int(np.sum(cat.item_length[1:] == 0)),
      "audio_dim": cat.audio_dim,
  }
