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
  * Time split: one global cut. The test window is [test_start, last_timestamp);
    training targets are listens before test_start - gap_seconds. Listens inside
    the gap are never targets but still serve as seed and history, as they would
    at serving time. Defaults reproduce the Yambda authors' split when
    --last_timestamp=26000000 (test day from 25,913,600, 30-minute gap).
  * Positives: a listen with played_ratio_pct >= --min_played_ratio (Listen+ at
    the default 50) that the user did not dislike afterwards. Only positives are
    targets and history; any listen can be a seed (it is what was just played).
  * Explicit feedback: each like / dislike / unlike / undislike attaches to the
    user's latest listen of that track at or before it; the last one wins (an
    unlike cancels a like). Events with no such listen are dropped and counted.

Output folder (written under a temporary name and renamed when complete):
  catalogue/                 see tfrs_yambda.catalogue
  records/train-SSSSS-of-NNNNN.tfrecord, records/test-...  see tfrs_yambda.schema
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
               min_played_ratio=50):
    self.history_length = history_length
    self.chunk_length = chunk_length
    self.num_shards = num_shards
    self.test_window_seconds = test_window_seconds
    self.gap_seconds = gap_seconds
    self.last_timestamp = last_timestamp
    self.min_played_ratio = min_played_ratio

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


def attach_feedback(events: pd.DataFrame) -> Tuple[pd.DataFrame, int]:
  """Returns the listens with a `feedback` column, and the orphan explicit count.

  Sorting by (uid, item, time, listen-first) puts each explicit event right
  after the listens of the same track it can belong to, so the attachment is a
  running maximum rather than a join.
  """
  uid = events["uid"].to_numpy()
  item = events["item_id"].to_numpy()
  ts = events["timestamp"].to_numpy()
  code = events["event_type"].to_numpy()
  order = np.lexsort((code, ts, item, uid))
  is_listen = code[order] == _LISTEN
  pos = np.arange(len(order))
  last_listen = np.maximum.accumulate(np.where(is_listen, pos, -1))
  same_track = np.zeros(len(order), bool)
  ok = last_listen >= 0
  lo = order[last_listen[ok]]
  same_track[ok] = (uid[lo] == uid[order[ok]]) & (item[lo] == item[order[ok]])
  explicit = ~is_listen
  attached = explicit & same_track
  orphans = int(np.sum(explicit & ~same_track))

  feedback = np.zeros(len(events), np.int8)
  rows = np.flatnonzero(attached)
  if len(rows):
    # Explicit events of one listen are contiguous: keep the last of each run.
    target = last_listen[rows]
    last_of_run = np.append(target[1:] != target[:-1], True)
    mapping = np.array([_EXPLICIT_FEEDBACK[t] for t in yambda.EVENT_TYPES[1:]],
                       np.int8)
    feedback[order[target[last_of_run]]] = mapping[
        code[order[rows[last_of_run]]] - 1]
  listens = events.loc[code == _LISTEN].copy()
  listens["feedback"] = feedback[code == _LISTEN]
  return listens, orphans


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


def _to_vocab(raw: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Raw ids (-1 = none) -> (indices with 0 = none, vocabulary with [0] = -1)."""
  vocab = np.unique(raw[raw >= 0])
  index = np.where(raw >= 0, np.searchsorted(vocab, raw) + 1, 0)
  return index.astype(np.int64), np.concatenate([[-1], vocab]).astype(np.int64)


def _read_audio(path: str, items: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  table = yambda.read_table(path, "embeddings", ["item_id", "normalized_embed"])
  ids = table.column("item_id").to_numpy().astype(np.int64)
  keep = np.isin(ids, items)
  table = table.filter(pa.array(keep))
  ids = ids[keep]
  embed = table.column("normalized_embed").combine_chunks()
  widths = pc.list_value_length(embed).to_numpy(zero_copy_only=False)
  if len(widths) and (widths != widths[0]).any():
    raise yambda.YambdaFormatError(
        f"{path}: column 'normalized_embed' has lists of different lengths "
        f"({sorted(set(widths.tolist()))[:5]}...).")
  width = int(widths[0]) if len(widths) else 0
  values = embed.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
  audio = np.zeros((len(items) + 1, width), np.float32)
  has_audio = np.zeros(len(items) + 1, bool)
  index = np.searchsorted(items, ids)  # items is sorted
  audio[index + 1] = values.reshape(len(ids), width)
  has_audio[index + 1] = True
  return audio, has_audio


def build_catalogue(root: str, listens: pd.DataFrame, is_train_target,
                    metadata: Dict) -> Tuple[catalogue_lib.Catalogue, Dict]:
  """Vocabularies ordered by training frequency, and per-item metadata."""
  raw_items = listens["item_id"].to_numpy()
  sorted_items, inverse = np.unique(raw_items, return_inverse=True)
  counts = np.bincount(inverse, weights=is_train_target,
                       minlength=len(sorted_items)).astype(np.int64)
  # Index order: most training positives first, ties by raw id.
  order = np.lexsort((sorted_items, -counts))

  artist_raw, multi_artist = _first_mapping(
      yambda.artist_mapping_path(root), "artist_mapping", "artist_id",
      sorted_items)
  album_raw, multi_album = _first_mapping(
      yambda.album_mapping_path(root), "album_mapping", "album_id",
      sorted_items)
  artist, artist_vocab = _to_vocab(artist_raw)
  album, album_vocab = _to_vocab(album_raw)
  audio, has_audio = _read_audio(yambda.embeddings_path(root), sorted_items)
  lengths = listens.groupby(inverse)["track_length_seconds"].median()
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
      "users": len(uids),
      "users_with_train_positives": len(user_order),
      "artists": len(artist_vocab) - 1,
      "albums": len(album_vocab) - 1,
      "items_without_artist": int(np.sum(artist == 0)),
      "items_without_album": int(np.sum(album == 0)),
      "items_with_several_artists_first_kept": multi_artist,
      "items_with_several_albums_first_kept": multi_album,
      "items_without_audio_embedding": int(np.sum(~has_audio[1:])),
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
  del events
  report["explicit_events_dropped_no_earlier_listen"] = orphans
  listens = listens.sort_values(["uid", "timestamp"], kind="stable")

  ts = listens["timestamp"].to_numpy()
  last = config.last_timestamp or int(ts.max()) + 1
  test_start = last - config.test_window_seconds
  train_end = test_start - config.gap_seconds
  if train_end <= int(ts.min()):
    raise ValueError(f"The test window and gap ({config.test_window_seconds}s "
                     f"+ {config.gap_seconds}s) leave no training time before "
                     f"{last}.")
  uid = listens["uid"].to_numpy()
  feedback = listens["feedback"].to_numpy()
  # Rounded as the records store it, so the pipeline sees the same positives.
  ratio = np.round(listens["played_ratio_pct"].to_numpy())
  positive = (ratio >= config.min_played_ratio) & (
      feedback != schema.FEEDBACK_DISLIKED)
  has_seed = np.r_[False, uid[1:] == uid[:-1]]
  is_train = positive & has_seed & (ts < train_end)
  is_test = positive & has_seed & (ts >= test_start) & (ts < last)

  metadata = {
      "source": os.path.abspath(events_path),
      "prep_config": config.as_dict(),
      "last_timestamp": last, "test_start": test_start, "train_end": train_end,
      "min_played_ratio": config.min_played_ratio,
      "num_train_examples": int(is_train.sum()),
      "num_test_examples": int(is_test.sum()),
  }
  cat, catalogue_report = build_catalogue(yambda_dir, listens,
                                          is_train.astype(np.float64), metadata)
  report.update(catalogue_report)
  item_index = cat.item_index(listens["item_id"].to_numpy())
  cold = cat.item_train_count[item_index] == 0
  report.update({
      "listens": len(listens),
      "listens_skipped_below_min_played_ratio": int(
          np.sum(ratio < config.min_played_ratio)),
      "listens_disliked": int(np.sum(feedback == schema.FEEDBACK_DISLIKED)),
      "listens_liked": int(np.sum(feedback == schema.FEEDBACK_LIKED)),
      "positives_without_seed_first_listen_of_user": int(
          np.sum(positive & ~has_seed)),
      "positives_in_gap_not_targets": int(np.sum(
          positive & (ts >= train_end) & (ts < test_start))),
      "train_examples": metadata["num_train_examples"],
      "test_examples": metadata["num_test_examples"],
      "test_examples_cold_target": int(np.sum(is_test & cold)),
      "test_examples_unknown_user": int(np.sum(
          is_test & (cat.user_index(uid) == 0))),
  })
  catalogue_lib.write(cat, os.path.join(tmp_dir, "catalogue"))

  columns = {
      schema.UID: uid,
      schema.ITEMS: item_index,
      schema.TIMESTAMPS: ts,
      schema.PLAYED_RATIOS: ratio.astype(np.int64),
      schema.FEEDBACK: feedback.astype(np.int64),
      schema.IS_ORGANIC: listens["is_organic"].to_numpy(),
  }
  for split, window, targets in (("train", (0, train_end), is_train),
                                 ("test", (test_start, last), is_test)):
    plan = plan_records(uid, ts, positive, window[0], window[1],
                        config.history_length, config.chunk_length)
    pattern = os.path.join(tmp_dir, "records",
                           split + "-{shard:05d}-of-{num_shards:05d}.tfrecord")
    written = write_records(pattern, columns, plan, targets, config.num_shards)
    if written["examples"] != targets.sum():
      raise AssertionError(f"{split}: wrote {written['examples']} examples, "
                           f"expected {targets.sum()}")
    report[f"{split}_records"] = written["records"]
    logging.info("Wrote %d %s records (%d examples)", written["records"], split,
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
  logging.info("Prepared %s in %.1fs: %d train / %d test examples", output_dir,
               report["seconds"], report["train_examples"],
               report["test_examples"])
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
