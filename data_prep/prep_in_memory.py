r"""The in-memory prep: the reference implementation and benchmark baseline.

This is the original `data_prep.prep`, kept unchanged in behaviour: it loads the
whole multi_event table into pandas, so its memory grows with the input. The
out-of-core `data_prep.prep` produces the same catalogue and records (the tests
check both against a row-by-row reference) and reuses this module's pure array
functions (`attach_feedback`, `plan_records`, `_shard_of`, ...), so the rules
live in one place. `benchmarks/prep_benchmark.py` measures both.

  python -m data_prep.prep_in_memory --yambda_dir=/data/yambda --size=50m \
      --output_dir=/data/prepared/50m

What it decides (and records in the catalogue's metadata.json):
  * Time split (`time_split`): global cuts. The test window is
    [test_start, last_timestamp), the validation window the day before it,
    each after a gap of gap_seconds; training targets are listens before
    train_end. Gap listens are never targets but still serve as seed and
    history, as they would at serving time. Defaults reproduce the Yambda
    authors' split when --last_timestamp=26000000 (train < 25,823,600;
    validation [25,825,400, 25,911,800); test from 25,913,600).
  * Positives: a listen with played_ratio_pct >= --min_played_ratio (Listen+ at
    the default 50) that the user did not dislike afterwards. Only positives are
    targets and history; any listen can be a seed (it is what was just played).
  * Explicit feedback: each like / dislike / unlike / undislike attaches to the
    user's latest listen of that track at or before it; the last one wins (an
    unlike cancels a like). Events with no such listen are dropped and counted.
    A window's records carry only the feedback given before its cut
    (`window_feedback`), so nothing later changes a weight or a positive.
  * Catalogue: every listened item (and with --metadata_items every item of
    the metadata files), indexed by `item_order`; training counts, track
    lengths and the artist and album vocabularies come from before train_end.

Output folder (written under a temporary name and renamed when complete):
  catalogue/                 see tfrs_yambda.catalogue
  records/train-SSSSS-of-NNNNN.tfrecord, records/validation-...,
  records/test-...           see tfrs_yambda.schema
  prep_report.json           counts of everything kept and dropped, with reasons
"""

import json
import os
import shutil
import time
from typing import Dict, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_prep import yambda
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema

FLAGS = flags.FLAGS

_EXPLICIT_FEEDBACK = {"like": schema.FEEDBACK_LIKED,
                      "dislike": schema.FEEDBACK_DISLIKED,
                      "unlike": schema.FEEDBACK_NONE,
                      "undislike": schema.FEEDBACK_NONE}
_LISTEN = yambda.EVENT_TYPES.index("listen")


class PrepConfig:
  """Everything the prep depends on besides the input (all flags)."""

  def __init__(self, history_length=50, chunk_length=256, num_shards=4,
               test_window_seconds=86_400, gap_seconds=1_800, last_timestamp=0,
               min_played_ratio=50, validation_window_seconds=86_400,
               metadata_items=True, nonfinite_embeddings="error"):
    self.history_length = history_length
    self.chunk_length = chunk_length
    self.num_shards = num_shards
    self.test_window_seconds = test_window_seconds
    self.gap_seconds = gap_seconds
    self.last_timestamp = last_timestamp
    self.min_played_ratio = min_played_ratio
    # 0: no validation window; training then runs up to the test gap (the
    # authors' second stage, retraining with the chosen settings).
    self.validation_window_seconds = validation_window_seconds
    # Also catalogue every item of the metadata files (the service's
    # catalogue: how never-played tracks become candidates).
    self.metadata_items = metadata_items
    # NaN/inf in a kept item's normalized_embed: "error", or "missing" (the
    # item then has no audio embedding, and the report counts it).
    self.nonfinite_embeddings = nonfinite_embeddings

  def as_dict(self):
    return dict(vars(self))


# --- Reading and validation ------------------------------------------------


def _first_bad_row(table: pa.Table, mask: np.ndarray) -> Dict:
  row = int(np.flatnonzero(mask)[0])
  return {k: v[0] for k, v in table.slice(row, 1).to_pydict().items()}


def read_events(path: str) -> Tuple[pd.DataFrame, Dict[str, int]]:
  """Reads and validates multi_event.parquet into compact numpy-backed columns."""
  table = yambda.read_table(path, "multi_event")
  n = table.num_rows
  event_type = table.column("event_type")
  if pa.types.is_dictionary(event_type.type):
    event_type = event_type.cast(event_type.type.value_type)
  codes = pc.index_in(event_type, value_set=pa.array(yambda.EVENT_TYPES))
  codes = codes.to_numpy(zero_copy_only=False)
  unknown = np.isnan(codes) if codes.dtype.kind == "f" else np.zeros(n, bool)
  if unknown.any():
    raise yambda.YambdaFormatError(
        f"{path}: column 'event_type' has {int(unknown.sum())} values outside "
        f"{list(yambda.EVENT_TYPES)}; first bad row: "
        f"{_first_bad_row(table, unknown)}")
  codes = np.nan_to_num(codes).astype(np.int8)

  def column(name, dtype):
    col = table.column(name)
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    values = col.fill_null(0).to_numpy().astype(dtype, copy=False)
    return values, nulls

  frame = {}
  for name in ("uid", "timestamp", "item_id", "is_organic"):
    values, nulls = column(name, np.int64)
    if nulls.any():
      raise yambda.YambdaFormatError(
          f"{path}: column '{name}' has {int(nulls.sum())} nulls; first: "
          f"{_first_bad_row(table, nulls)}")
    if (values < 0).any():
      raise yambda.YambdaFormatError(
          f"{path}: column '{name}' has negative values; first: "
          f"{_first_bad_row(table, values < 0)}")
    frame[name] = values
  is_listen = codes == _LISTEN
  ratio, ratio_null = column("played_ratio_pct", np.float32)
  if (ratio_null & is_listen).any():
    raise yambda.YambdaFormatError(
        f"{path}: column 'played_ratio_pct' is null for "
        f"{int((ratio_null & is_listen).sum())} listen events; first: "
        f"{_first_bad_row(table, ratio_null & is_listen)}")
  if (ratio < 0).any():
    raise yambda.YambdaFormatError(
        f"{path}: column 'played_ratio_pct' has negative values; first: "
        f"{_first_bad_row(table, ratio < 0)}")
  length, length_null = column("track_length_seconds", np.float32)
  frame["played_ratio_pct"] = ratio
  frame["track_length_seconds"] = np.where(length_null, np.nan, length)
  frame["event_type"] = codes
  counts = {f"events_{t}": int(np.sum(codes == i))
            for i, t in enumerate(yambda.EVENT_TYPES)}
  counts["events"] = n
  return pd.DataFrame(frame), counts


def explicit_attachments(uid, item, ts, code
                         ) -> Tuple[np.ndarray, np.ndarray, int]:
  """The listen each explicit event attaches to, and the orphan count.

  Each like / dislike / unlike / undislike attaches to the user's latest
  listen of that track at or before it. Sorting by (uid, item, time,
  listen-first) puts each explicit event right after the listens of the same
  track it can belong to, so the attachment is a running maximum rather than
  a join. Returns (explicit event rows, their listen rows), grouped by listen
  and in (time, event type) order within a group, and the number of explicit
  events without an earlier listen.
  """
  order = np.lexsort((code, ts, item, uid))
  is_listen = code[order] == _LISTEN
  pos = np.arange(len(order))
  last_listen = np.maximum.accumulate(np.where(is_listen, pos, -1))
  same_track = np.zeros(len(order), bool)
  ok = last_listen >= 0
  lo = order[last_listen[ok]]
  same_track[ok] = (uid[lo] == uid[order[ok]]) & (item[lo] == item[order[ok]])
  explicit = ~is_listen
  rows = np.flatnonzero(explicit & same_track)
  orphans = int(np.sum(explicit & ~same_track))
  return order[rows], order[last_listen[rows]], orphans


def feedback_at(num_rows: int, event_rows: np.ndarray, listen_rows: np.ndarray,
                code: np.ndarray, ts: np.ndarray, before: int = None
                ) -> np.ndarray:
  """Feedback per row from `explicit_attachments`: the last explicit event
  of each listen wins (an unlike cancels a like); with `before`, only the
  events before that time count (what a window may know)."""
  if before is not None:
    keep = ts[event_rows] < before
    event_rows, listen_rows = event_rows[keep], listen_rows[keep]
  feedback = np.zeros(num_rows, np.int8)
  if len(listen_rows):
    # Explicit events of one listen are contiguous: keep the last of each run.
    last_of_run = np.append(listen_rows[1:] != listen_rows[:-1], True)
    mapping = np.array([_EXPLICIT_FEEDBACK[t] for t in yambda.EVENT_TYPES[1:]],
                       np.int8)
    feedback[listen_rows[last_of_run]] = mapping[
        code[event_rows[last_of_run]] - 1]
  return feedback


def attach_feedback(events: pd.DataFrame, before: int = None
                    ) -> Tuple[pd.DataFrame, int]:
  """Returns the listens with a `feedback` column, and the orphan explicit
  count; with `before`, only the explicit events before that time count."""
  uid = events["uid"].to_numpy()
  code = events["event_type"].to_numpy()
  ts = events["timestamp"].to_numpy()
  event_rows, listen_rows, orphans = explicit_attachments(
      uid, events["item_id"].to_numpy(), ts, code)
  feedback = feedback_at(len(events), event_rows, listen_rows, code, ts,
                         before)
  listens = events.loc[code == _LISTEN].copy()
  listens["feedback"] = feedback[code == _LISTEN]
  return listens, orphans


# --- Time split and what each window may know ----------------------------------

WINDOWS = ("train", "validation", "test")
# First-listen time of an item never listened to (metadata files only).
NEVER_LISTENED = -1


def time_split(config: PrepConfig, listen_min: int,
               listen_max: int) -> Dict[str, int]:
  """The global time cuts, the Yambda authors' way.

  test = [test_start, last_timestamp), validation = [validation_start,
  validation_end), each after a gap of `gap_seconds`; training targets end
  at train_end. Without a validation window, training runs up to the test
  gap (validation_start == validation_end == train_end + gap).
  """
  last = config.last_timestamp or listen_max + 1
  test_start = last - config.test_window_seconds
  validation_end = test_start - config.gap_seconds
  if config.validation_window_seconds > 0:
    validation_start = validation_end - config.validation_window_seconds
    train_end = validation_start - config.gap_seconds
  else:
    validation_start = validation_end
    train_end = validation_end
  if train_end <= listen_min:
    raise ValueError(
        f"The test window, validation window and gaps "
        f"({config.test_window_seconds}s + "
        f"{config.validation_window_seconds}s + gaps of "
        f"{config.gap_seconds}s) leave no training time before {last}.")
  return {"last_timestamp": last, "test_start": test_start,
          "validation_start": validation_start,
          "validation_end": validation_end, "train_end": train_end}


def windows(split: Dict[str, int]) -> Dict[str, Tuple[int, int]]:
  """Window name -> [start, stop) of its targets (no empty validation)."""
  out = {"train": (0, split["train_end"])}
  if split["validation_end"] > split["validation_start"]:
    out["validation"] = (split["validation_start"], split["validation_end"])
  out["test"] = (split["test_start"], split["last_timestamp"])
  return out


def window_feedback(feedback_before, ts: np.ndarray, start: int,
                    stop: int) -> np.ndarray:
  """Each listen's feedback as a window [start, stop) may know it.

  `feedback_before(cut)` attaches only the explicit events before `cut`.
  Listens before the window (its queries' seeds and histories) see the
  feedback given before `start`; the window's own listens (its targets, and
  the histories of its later targets) the feedback given before `stop`. So
  a like or dislike after a window never changes its examples or weights.
  """
  at_stop = feedback_before(stop)
  if start <= 0 or not np.any(ts < start):
    return at_stop
  return np.where(ts < start, feedback_before(start), at_stop)


def positives(ratio: np.ndarray, feedback: np.ndarray,
              min_played_ratio: int) -> np.ndarray:
  """The positive rule: played at least `min_played_ratio` percent (ratios
  rounded as the records store them) and not disliked."""
  return (ratio >= min_played_ratio) & (feedback != schema.FEEDBACK_DISLIKED)


def item_order(item_ids: np.ndarray, train_counts: np.ndarray,
               first_listen: np.ndarray) -> np.ndarray:
  """Catalogue index order: most training positives first, then by first
  listen (never-listened items last), ties by raw id.

  Items first listened before any cut after training are then a prefix of
  the index range, which later items never shift: a window's catalogue is
  the prefix of items first listened before its start, and nothing listened
  after a cut changes an index that is used before it.
  """
  first = np.where(first_listen == NEVER_LISTENED, np.iinfo(np.int64).max,
                   first_listen)
  return np.lexsort((item_ids, first, -train_counts))


def metadata_item_ids(root: str) -> np.ndarray:
  """Sorted ids of every item in the metadata files (embeddings, mappings)."""
  ids = [yambda.read_table(path, kind, ["item_id"]).column(
      "item_id").to_numpy().astype(np.int64) for path, kind in (
          (yambda.embeddings_path(root), "embeddings"),
          (yambda.artist_mapping_path(root), "artist_mapping"),
          (yambda.album_mapping_path(root), "album_mapping"))]
  return np.unique(np.concatenate(ids))


# --- Catalogue ---------------------------------------------------------------


def _first_mapping(path: str, kind: str, key: str, items: np.ndarray):
  """Per catalogue item, the smallest mapped id (-1 where none) and the count
  of items mapped to more than one."""
  table = yambda.read_table(path, kind).to_pandas()
  table = table[table["item_id"].isin(items)]
  multi = int((table.groupby("item_id").size() > 1).sum())
  first = table.groupby("item_id")[key].min()
  mapped = first.reindex(items).fillna(-1).to_numpy(np.int64)
  return mapped, multi


def _to_vocab(raw: np.ndarray, known: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray]:
  """Raw ids (-1 = none) -> (indices with 0 = none, vocabulary with [0] = -1).

  The vocabulary holds the ids of the `known` items only (those listened to
  before the training cut), so nothing after the cut adds or shifts a row;
  an id only later items have maps to 0, as a model trained before the cut
  knows nothing of it.
  """
  vocab = np.unique(raw[(raw >= 0) & known])
  pos = np.minimum(np.searchsorted(vocab, raw), max(len(vocab) - 1, 0))
  found = (raw >= 0) & (vocab[pos] == raw) if len(vocab) else np.zeros(
      len(raw), bool)
  index = np.where(found, pos + 1, 0)
  return index.astype(np.int64), np.concatenate([[-1], vocab]).astype(np.int64)


NONFINITE_EMBEDDINGS = ("error", "missing")


def _nonfinite_embedding_error(path: str, item_id: int, row: int
                               ) -> yambda.YambdaFormatError:
  """The error of a NaN/inf embedding of a catalogue item (both preps)."""
  return yambda.YambdaFormatError(
      f"{path}: column 'normalized_embed' has NaN or inf values for item_id "
      f"{item_id} (row {row} of the file), an item the catalogue keeps. Fix "
      f"the file, or pass --nonfinite_embeddings=missing to treat such items "
      f"as having no audio embedding.")


def _read_audio(path: str, items: np.ndarray,
                nonfinite_embeddings: str = "error"
                ) -> Tuple[np.ndarray, np.ndarray, int]:
  """(audio [n + 1, width], has_audio [n + 1], count of items whose
  embedding was non-finite and so treated as missing) for sorted `items`.

  A NaN or inf value in a kept item's embedding is an error naming the item
  and its row in the file, or with nonfinite_embeddings="missing" the item
  gets a zero row and has_audio False.
  """
  if nonfinite_embeddings not in NONFINITE_EMBEDDINGS:
    raise ValueError(f"nonfinite_embeddings must be one of "
                     f"{NONFINITE_EMBEDDINGS}, not {nonfinite_embeddings!r}")
  table = yambda.read_table(path, "embeddings", ["item_id", "normalized_embed"])
  ids = table.column("item_id").to_numpy().astype(np.int64)
  keep = np.isin(ids, items)
  file_rows = np.flatnonzero(keep)
  table = table.filter(pa.array(keep))
  ids = ids[keep]
  embed = table.column("normalized_embed").combine_chunks()
  widths = pc.list_value_length(embed).to_numpy(zero_copy_only=False)
  if len(widths) and (widths != widths[0]).any():
    raise yambda.YambdaFormatError(
        f"{path}: column 'normalized_embed' has lists of different lengths "
        f"({sorted(set(widths.tolist()))[:5]}...).")
  width = int(widths[0]) if len(widths) else 0
  values = embed.flatten().to_numpy(zero_copy_only=False).astype(
      np.float32).reshape(len(ids), width)
  finite = np.isfinite(values).all(axis=1)
  if not finite.all() and nonfinite_embeddings == "error":
    first = int(np.flatnonzero(~finite)[0])
    raise _nonfinite_embedding_error(path, int(ids[first]),
                                     int(file_rows[first]))
  audio = np.zeros((len(items) + 1, width), np.float32)
  has_audio = np.zeros(len(items) + 1, bool)
  index = np.searchsorted(items, ids)  # items is sorted
  audio[index + 1] = np.where(finite[:, np.newaxis], values, np.float32(0))
  has_audio[index + 1] = finite
  nonfinite = np.zeros(len(items) + 1, bool)
  nonfinite[index[~finite] + 1] = True
  return audio, has_audio, int(np.sum(nonfinite & ~has_audio))


def build_catalogue(root: str, listens: pd.DataFrame, is_train_target,
                    metadata: Dict, metadata_items: bool = True
                    ) -> Tuple[catalogue_lib.Catalogue, Dict]:
  """Vocabularies and per-item metadata, from what is known at train_end.

  Every listened item (and, with `metadata_items`, every item of the
  metadata files) gets a row, in `item_order`; what the model learns from
  (training counts, track lengths, artist and album vocabularies) comes from
  listens before `metadata["train_end"]` only.
  """
  train_end = metadata["train_end"]
  raw_items = listens["item_id"].to_numpy()
  ts = listens["timestamp"].to_numpy()
  listened, inverse = np.unique(raw_items, return_inverse=True)
  first_listen = np.full(len(listened), np.iinfo(np.int64).max)
  np.minimum.at(first_listen, inverse, ts)
  sorted_items = listened
  if metadata_items:
    sorted_items = np.union1d(listened, metadata_item_ids(root))
    first = np.full(len(sorted_items), NEVER_LISTENED, np.int64)
    first[np.searchsorted(sorted_items, listened)] = first_listen
    first_listen = first
    inverse = np.searchsorted(sorted_items, listened)[inverse]
  counts = np.bincount(inverse, weights=is_train_target,
                       minlength=len(sorted_items)).astype(np.int64)
  order = item_order(sorted_items, counts, first_listen)
  known = (first_listen != NEVER_LISTENED) & (first_listen < train_end)

  artist_raw, multi_artist = _first_mapping(
      yambda.artist_mapping_path(root), "artist_mapping", "artist_id",
      sorted_items)
  album_raw, multi_album = _first_mapping(
      yambda.album_mapping_path(root), "album_mapping", "album_id",
      sorted_items)
  artist, artist_vocab = _to_vocab(artist_raw, known)
  album, album_vocab = _to_vocab(album_raw, known)
  # The prep's config (metadata["prep_config"]) says how NaN/inf is handled.
  audio, has_audio, nonfinite = _read_audio(
      yambda.embeddings_path(root), sorted_items,
      metadata.get("prep_config", {}).get("nonfinite_embeddings", "error"))
  # Track length: the median over training-window listens (0 = unknown).
  before = ts < train_end
  lengths = listens.loc[before].groupby(inverse[before])[
      "track_length_seconds"].median()
  length = lengths.reindex(np.arange(len(sorted_items))).fillna(0).to_numpy()

  def reorder(values, fill):
    return np.concatenate([[fill], values[order]])

  uids, user_inverse = np.unique(listens["uid"].to_numpy(), return_inverse=True)
  user_counts = np.bincount(user_inverse, weights=is_train_target,
                            minlength=len(uids)).astype(np.int64)
  user_order = np.lexsort((uids, -user_counts))
  user_order = user_order[user_counts[user_order] > 0]

  cat = catalogue_lib.Catalogue(
      item_ids=reorder(sorted_items, -1).astype(np.int64),
      item_artist=reorder(artist, 0).astype(np.int64),
      item_album=reorder(album, 0).astype(np.int64),
      item_length=reorder(length, 0.0).astype(np.float32),
      item_train_count=reorder(counts, 0).astype(np.int64),
      item_first_listen=reorder(first_listen, NEVER_LISTENED).astype(np.int64),
      has_audio=np.concatenate([[False], has_audio[1:][order]]),
      audio=np.concatenate([audio[:1], audio[1:][order]]),
      user_ids=np.concatenate([[-1], uids[user_order]]).astype(np.int64),
      user_train_count=np.concatenate([[0], user_counts[user_order]]),
      artist_ids=artist_vocab,
      album_ids=album_vocab,
      metadata=metadata,
  )
  report = {
      "items": cat.num_items,
      "items_with_train_positives": int(np.sum(counts > 0)),
      "items_listened_before_train_end": int(np.sum(known)),
      "items_only_in_metadata_files": int(np.sum(
          first_listen == NEVER_LISTENED)),
      "users": len(uids),
      "users_with_train_positives": len(user_order),
      "artists": len(artist_vocab) - 1,
      "albums": len(album_vocab) - 1,
      "items_without_artist": int(np.sum(artist == 0)),
      "items_without_album": int(np.sum(album == 0)),
      "items_with_several_artists_first_kept": multi_artist,
      "items_with_several_albums_first_kept": multi_album,
      "items_without_audio_embedding": int(np.sum(~has_audio[1:])),
      "items_with_nonfinite_embedding_treated_as_missing": nonfinite,
      "items_without_track_length": int(np.sum(length == 0)),
      "audio_dim": cat.audio_dim,
  }
  return cat, report


# --- Records -------------------------------------------------------------------


def _segments(starts: np.ndarray, stops: np.ndarray, length: int):
  """Splits each [start, stop) range into consecutive pieces of <= length."""
  pieces = np.maximum(0, -(-(stops - starts) // length))
  owner = np.repeat(np.arange(len(starts)), pieces)
  within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces,
                                               pieces)
  seg_start = starts[owner] + within * length
  return owner, seg_start, np.minimum(seg_start + length, stops[owner])


def plan_records(uid, ts, positive, window_start, window_stop,
                 history_length, chunk_length):
  """Chunks each user's listens with target time in [window_start, window_stop).

  Arrays are sorted by (uid, timestamp). Returns (context_start, target_start,
  stop) per record: events [context_start, target_start) give the first
  targets their seed and `history_length` positives of history.
  """
  n = len(uid)
  user_start = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
  user_stop = np.r_[user_start[1:], n]
  # Within a user timestamps are sorted, so the window is a contiguous range.
  key = (uid.astype(np.int64) << 32) + ts
  user_key = uid[user_start].astype(np.int64) << 32
  first = np.searchsorted(key, user_key + window_start)
  last = np.searchsorted(key, user_key + window_stop)
  owner, seg_start, seg_stop = _segments(first, last, chunk_length)
  positions = np.flatnonzero(positive)
  before = np.searchsorted(positions, seg_start)  # positives before seg_start
  nth = positions[np.maximum(before - history_length, 0)] if len(
      positions) else np.zeros_like(seg_start)
  context = np.where(before >= history_length, nth, 0)
  context = np.minimum(context, seg_start - 1)
  context = np.maximum(context, user_start[owner])
  return context, seg_start, seg_stop


def _shard_of(uid: np.ndarray, num_shards: int) -> np.ndarray:
  # A multiplicative hash spreads consecutive uids over shards.
  return ((uid.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
          % np.uint64(num_shards)).astype(np.int64)


def write_records(path_pattern: str, columns: Dict[str, np.ndarray],
                  plan, positive, num_shards: int) -> Dict[str, int]:
  """Writes one tf.train.Example per planned chunk into sharded TFRecords."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  context, start, stop = plan
  uid = columns[schema.UID]
  shards = _shard_of(uid[start], num_shards)
  examples = 0
  records = 0
  for shard in range(num_shards):
    path = path_pattern.format(shard=shard, num_shards=num_shards)
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
      for c, s, e in zip(context[shards == shard], start[shards == shard],
                         stop[shards == shard]):
        targets = int(positive[s:e].sum())
        if targets == 0:
          continue
        feature = {
            schema.UID: _int64([uid[s]]),
            schema.NUM_CONTEXT: _int64([s - c]),
        }
        for name in schema.RECORD_SEQUENCE_FEATURES:
          feature[name] = _int64(columns[name][c:e].tolist())
        writer.write(tf.train.Example(features=tf.train.Features(
            feature=feature)).SerializeToString())
        examples += targets
        records += 1
    os.replace(path + ".tmp", path)
  return {"records": records, "examples": examples}


def _int64(values):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


# --- The job -----------------------------------------------------------------


def prepare(yambda_dir: str, size: str, output_dir: str,
            config: PrepConfig = None) -> Dict:
  """Runs the whole prep; returns the report that it also writes as JSON."""
  config = config or PrepConfig()
  started = time.time()
  tmp_dir = output_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(os.path.join(tmp_dir, "records"))

  events_path = yambda.multi_event_path(yambda_dir, size)
  # Check every input's schema before any work, so a bad file fails fast.
  yambda.check_schema(events_path, "multi_event")
  yambda.check_schema(yambda.embeddings_path(yambda_dir), "embeddings")
  yambda.check_schema(yambda.artist_mapping_path(yambda_dir), "artist_mapping")
  yambda.check_schema(yambda.album_mapping_path(yambda_dir), "album_mapping")

  events, report = read_events(events_path)
  logging.info("Read %d events in %.1fs", len(events), time.time() - started)
  listens, orphans = attach_feedback(events)
  report["explicit_events_dropped_no_earlier_listen"] = orphans
  listens = listens.sort_values(["uid", "timestamp"], kind="stable")

  def feedback_before(cut):
    """Feedback of the sorted listens from explicit events before `cut`."""
    attached, _ = attach_feedback(events, before=cut)
    return attached["feedback"].loc[listens.index].to_numpy()

  ts = listens["timestamp"].to_numpy()
  split = time_split(config, int(ts.min()), int(ts.max()))
  uid = listens["uid"].to_numpy()
  feedback = listens["feedback"].to_numpy()  # all of it: the report's counts
  # Rounded as the records store it, so the pipeline sees the same positives.
  ratio = np.round(listens["played_ratio_pct"].to_numpy())
  has_seed = np.r_[False, uid[1:] == uid[:-1]]
  by_window = {}
  for name, (lo, hi) in windows(split).items():
    window_fb = window_feedback(feedback_before, ts, lo, hi)
    window_positive = positives(ratio, window_fb, config.min_played_ratio)
    by_window[name] = (window_fb, window_positive, window_positive &
                       has_seed & (ts >= lo) & (ts < hi))
  del events
  is_train = by_window["train"][2]

  metadata = {
      "source": os.path.abspath(events_path),
      "prep_config": config.as_dict(),
      **split,
      "min_played_ratio": config.min_played_ratio,
      **{f"num_{name}_examples": int(targets.sum())
         for name, (_, _, targets) in by_window.items()},
  }
  cat, catalogue_report = build_catalogue(yambda_dir, listens,
                                          is_train.astype(np.float64), metadata,
                                          config.metadata_items)
  report.update(catalogue_report)
  item_index = cat.item_index(listens["item_id"].to_numpy())
  cold = cat.item_train_count[item_index] == 0
  known_user = cat.user_index(uid) > 0
  positive = positives(ratio, feedback, config.min_played_ratio)
  in_gap = (ts >= split["train_end"]) & (ts < split["validation_start"]) | (
      ts >= split["validation_end"]) & (ts < split["test_start"])
  report.update({
      "listens": len(listens),
      "listens_skipped_below_min_played_ratio": int(
          np.sum(ratio < config.min_played_ratio)),
      "listens_disliked": int(np.sum(feedback == schema.FEEDBACK_DISLIKED)),
      "listens_liked": int(np.sum(feedback == schema.FEEDBACK_LIKED)),
      "positives_without_seed_first_listen_of_user": int(
          np.sum(positive & ~has_seed)),
      "positives_in_gap_not_targets": int(np.sum(positive & in_gap)),
  })
  for name, (_, _, targets) in by_window.items():
    report[f"{name}_examples"] = int(targets.sum())
    if name != "train":
      report[f"{name}_examples_cold_target"] = int(np.sum(targets & cold))
      report[f"{name}_examples_unknown_user"] = int(np.sum(
          targets & ~known_user))
  catalogue_lib.write(cat, os.path.join(tmp_dir, "catalogue"))

  columns = {
      schema.UID: uid,
      schema.ITEMS: item_index,
      schema.TIMESTAMPS: ts,
      schema.PLAYED_RATIOS: ratio.astype(np.int64),
      schema.IS_ORGANIC: listens["is_organic"].to_numpy(),
  }
  for name, (window_fb, window_positive, targets) in by_window.items():
    lo, hi = windows(split)[name]
    plan = plan_records(uid, ts, window_positive, lo, hi,
                        config.history_length, config.chunk_length)
    pattern = os.path.join(tmp_dir, "records",
                           name + "-{shard:05d}-of-{num_shards:05d}.tfrecord")
    written = write_records(
        pattern, {**columns, schema.FEEDBACK: window_fb.astype(np.int64)},
        plan, targets, config.num_shards)
    if written["examples"] != targets.sum():
      raise AssertionError(f"{name}: wrote {written['examples']} examples, "
                           f"expected {targets.sum()}")
    report[f"{name}_records"] = written["records"]
    logging.info("Wrote %d %s records (%d examples)", written["records"], name,
                 written["examples"])

  record_bytes = sum(
      os.path.getsize(os.path.join(tmp_dir, "records", f))
      for f in os.listdir(os.path.join(tmp_dir, "records")))
  report["record_bytes"] = record_bytes
  report["record_bytes_per_listen"] = round(record_bytes / max(len(listens), 1),
                                            2)
  report["record_bytes_per_event"] = round(record_bytes / report["events"], 2)
  report["seconds"] = round(time.time() - started, 1)
  with open(os.path.join(tmp_dir, "prep_report.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  if os.path.exists(output_dir):
    shutil.rmtree(output_dir)
  os.replace(tmp_dir, output_dir)
  logging.info("Prepared %s in %.1fs: %s", output_dir, report["seconds"],
               ", ".join(f"{report[f'{name}_examples']} {name}"
                         for name in by_window))
  return report


def config_from_flags() -> PrepConfig:
  """PrepConfig from the flags the streaming prep defines (same names)."""
  return PrepConfig(**{name: FLAGS[name].value for name in vars(PrepConfig())})


def main(argv):
  del argv
  prepare(FLAGS.yambda_dir, FLAGS.size, FLAGS.output_dir, config_from_flags())


if __name__ == "__main__":
  flags.DEFINE_string("yambda_dir", None, "Folder with the Yambda layout.")
  flags.DEFINE_string("size", "50m", "Which flat/<size>/ to read.")
  flags.DEFINE_string("output_dir", None, "Where the prepared data goes.")
  # One definition of the config flags: the streaming prep's. It imports this
  # module, so the import waits until this one runs as a program.
  from data_prep import prep as streaming_prep  # pylint: disable=g-import-not-at-top
  streaming_prep.define_config_flags()
  flags.mark_flags_as_required(["yambda_dir", "output_dir"])
  app.run(main)
