r"""The in-memory prep: the reference implementation and benchmark baseline.

  python -m benchmarks.reference_prep --yambda_dir=/data/yambda --size=50m \
      --output_dir=/data/prepared/50m

It loads the whole multi_event table into pandas, so its memory grows with
the input; the streaming `data_prep.prep` writes the same output folder out
of core. Both call the same rules (`data_prep.rules`, `data_prep.records_plan`);
only the data flow differs, and this one is the simpler to read and check.
It takes the streaming prep's flags and ignores those of buckets and workers.
`benchmarks/prep_benchmark.py` measures both.
"""

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

from data_prep import item_metadata
from data_prep import records_plan
from data_prep import rules
from data_prep import yambda
from data_prep.prep import buckets as prep_buckets
from data_prep.prep import catalogue as prep_catalogue
from data_prep.prep import config as config_lib
from data_prep.prep import validation
from tfrs_yambda import atomic
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema

FLAGS = flags.FLAGS

# Only the streaming prep has buckets and workers: not in this prep's metadata.
_STREAMING_ONLY_FIELDS = ("bucket_events", "num_workers", "read_batch_rows",
                          "runner")


def _read_events(path: str) -> Tuple[pd.DataFrame, Dict[str, int]]:
  """Reads multi_event.parquet into int64 / float32 columns, in file order.

  The rows are checked by the streaming prep's validation, so both refuse the
  same rows with the same error and count the same oddities.
  """
  table = yambda.read_table(path, "multi_event")
  parts, counts, first_row = [], {}, 0
  for batch in table.to_batches():
    part, batch_counts = validation.validate_batch(path, batch, first_row)
    first_row += batch.num_rows
    parts.append(part)
    for k, v in batch_counts.items():
      counts[k] = counts.get(k, 0) + v
  events = pa.concat_tables(
      parts or [prep_buckets.BUCKET_SCHEMA.empty_table()]).to_pandas()
  for name in ("uid", "timestamp", "item_id", "is_organic"):
    events[name] = events[name].astype(np.int64)
  counts["events"] = len(events)
  return events, counts


def _read_audio(path: str, items: np.ndarray,
                nonfinite_embeddings: str = "error"
                ) -> Tuple[np.ndarray, np.ndarray, int, int]:
  """(audio [n + 1, width], has_audio [n + 1], count of items whose
  embedding was non-finite and so treated as missing, count of rows ignored
  as an item's repeated row) for sorted `items`. An item's first row in the
  file is its embedding (`item_metadata.first_embedding_rows`).

  A NaN or inf value in a kept item's embedding is an error naming the item
  and its row in the file, or with nonfinite_embeddings="missing" the item
  gets a zero row and has_audio False.
  """
  if nonfinite_embeddings not in rules.NONFINITE_EMBEDDINGS:
    raise ValueError(f"nonfinite_embeddings must be one of "
                     f"{rules.NONFINITE_EMBEDDINGS}, not "
                     f"{nonfinite_embeddings!r}")
  table = yambda.read_table(path, "embeddings", ["item_id", "normalized_embed"])
  ids = table.column("item_id").to_numpy().astype(np.int64)
  # Every row's width is checked, kept or not, as the streaming prep does.
  widths = pc.list_value_length(table.column("normalized_embed")).to_numpy(
      zero_copy_only=False)
  if len(widths) and (widths != widths[0]).any():
    raise yambda.YambdaFormatError(
        f"{path}: column 'normalized_embed' has lists of different lengths "
        f"({sorted(set(widths.tolist()))[:5]}...).")
  catalogued = np.isin(ids, items)
  keep = item_metadata.first_embedding_rows(ids, catalogued)
  repeated = int(np.sum(catalogued & ~keep))
  file_rows = np.flatnonzero(keep)
  table = table.filter(pa.array(keep))
  ids = ids[keep]
  embed = table.column("normalized_embed").combine_chunks()
  width = int(widths[0]) if len(widths) else 0
  values = embed.flatten().to_numpy(zero_copy_only=False).astype(
      np.float32).reshape(len(ids), width)
  finite = np.isfinite(values).all(axis=1)
  if not finite.all() and nonfinite_embeddings == "error":
    first = int(np.flatnonzero(~finite)[0])
    raise item_metadata.nonfinite_embedding_error(path, int(ids[first]),
                                                  int(file_rows[first]))
  audio = np.zeros((len(items) + 1, width), np.float32)
  has_audio = np.zeros(len(items) + 1, bool)
  index = np.searchsorted(items, ids)  # items is sorted
  audio[index + 1] = np.where(finite[:, np.newaxis], values, np.float32(0))
  has_audio[index + 1] = finite
  nonfinite = np.zeros(len(items) + 1, bool)
  nonfinite[index[~finite] + 1] = True
  return audio, has_audio, int(np.sum(nonfinite & ~has_audio)), repeated


def _build_catalogue(root: str, listens: pd.DataFrame, is_train_target,
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
    sorted_items = np.union1d(listened, item_metadata.metadata_item_ids(root))
    first = np.full(len(sorted_items), rules.NEVER_LISTENED, np.int64)
    first[np.searchsorted(sorted_items, listened)] = first_listen
    first_listen = first
    inverse = np.searchsorted(sorted_items, listened)[inverse]
  counts = np.bincount(inverse, weights=is_train_target,
                       minlength=len(sorted_items)).astype(np.int64)
  order = rules.item_order(sorted_items, counts, first_listen)
  known = (first_listen != rules.NEVER_LISTENED) & (first_listen < train_end)

  mapped = item_metadata.artists_and_albums(root, sorted_items, known)
  # The prep's config (metadata["prep_config"]) says how NaN/inf is handled.
  audio, has_audio, nonfinite, repeated = _read_audio(
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
      item_artist=reorder(mapped["artist"], 0).astype(np.int64),
      item_album=reorder(mapped["album"], 0).astype(np.int64),
      item_length=reorder(length, 0.0).astype(np.float32),
      item_train_count=reorder(counts, 0).astype(np.int64),
      item_first_listen=reorder(first_listen,
                                rules.NEVER_LISTENED).astype(np.int64),
      has_audio=np.concatenate([[False], has_audio[1:][order]]),
      audio=np.concatenate([audio[:1], audio[1:][order]]),
      user_ids=np.concatenate([[-1], uids[user_order]]).astype(np.int64),
      user_train_count=np.concatenate([[0], user_counts[user_order]]),
      artist_ids=mapped["artist_ids"],
      album_ids=mapped["album_ids"],
      metadata=metadata,
  )
  return cat, prep_catalogue.catalogue_counts(
      cat, len(uids), mapped["multi_artist"], mapped["multi_album"],
      nonfinite, repeated)


def _write_records(path_pattern: str, columns: Dict[str, np.ndarray],
                   plan, positive, num_shards: int) -> Dict[str, int]:
  """Writes one tf.train.Example per planned chunk into sharded TFRecords."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def int64(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

  context, start, stop = plan
  uid = columns[schema.UID]
  shards = records_plan.shard_of(uid[start], num_shards)
  examples = records = 0
  for shard in range(num_shards):
    path = path_pattern.format(shard=shard, num_shards=num_shards)
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
      for c, s, e in zip(context[shards == shard], start[shards == shard],
                         stop[shards == shard]):
        targets = int(positive[s:e].sum())
        if targets == 0:
          continue
        feature = {schema.UID: int64([uid[s]]),
                   schema.NUM_CONTEXT: int64([s - c])}
        for name in schema.RECORD_SEQUENCE_FEATURES:
          feature[name] = int64(columns[name][c:e].tolist())
        writer.write(tf.train.Example(features=tf.train.Features(
            feature=feature)).SerializeToString())
        examples += targets
        records += 1
    os.replace(path + ".tmp", path)
  return {"records": records, "examples": examples}


def prepare(yambda_dir: str, size: str, output_dir: str,
            config: config_lib.PrepConfig = None) -> Dict:
  """Runs the whole prep in memory.

  Args:
    yambda_dir: a folder with the Yambda layout.
    size: which flat/<size>/multi_event.parquet to read.
    output_dir: where the prepared data goes.
    config: the prep's configuration (its bucket and worker fields unused).

  Returns:
    The report, also written as prep_report.json.
  """
  config = config or config_lib.PrepConfig()
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

  events, report = _read_events(events_path)
  logging.info("Read %d events in %.1fs", len(events), time.time() - started)
  dropped, duplicates = rules.duplicate_events(*(
      events[name].to_numpy()
      for name in ("uid", "timestamp", "item_id", "event_type")))
  report.update(duplicates)
  events = events[~dropped]
  listens, orphans = rules.attach_feedback(events)
  report["explicit_events_dropped_no_earlier_listen"] = orphans
  listens = listens.sort_values(["uid", "timestamp"], kind="stable")

  def feedback_before(cut):
    """Feedback of the sorted listens from explicit events before `cut`."""
    attached, _ = rules.attach_feedback(events, before=cut)
    return attached["feedback"].loc[listens.index].to_numpy()

  ts = listens["timestamp"].to_numpy()
  split = rules.time_split(config, *((int(ts.min()), int(ts.max())) if len(
      ts) else (None, None)))
  uid = listens["uid"].to_numpy()
  feedback = listens["feedback"].to_numpy()  # all of it: the report's counts
  # Rounded as the records store it, so the pipeline sees the same positives.
  ratio = np.round(listens["played_ratio_pct"].to_numpy())
  has_seed = np.r_[False, uid[1:] == uid[:-1]]
  by_window = {}
  for name, (lo, hi) in rules.windows(split).items():
    window_fb = rules.window_feedback(feedback_before, ts, lo, hi)
    window_positive = rules.is_positive(ratio, window_fb,
                                        config.min_played_ratio)
    by_window[name] = (window_fb, window_positive, window_positive &
                       has_seed & (ts >= lo) & (ts < hi))
  events = None  # frees the raw events: only the listens are used from here
  is_train = by_window["train"][2]

  metadata = {
      "source": os.path.abspath(events_path),
      "prep_config": {k: v for k, v in config.as_dict().items()
                      if k not in _STREAMING_ONLY_FIELDS},
      **split,
      "min_played_ratio": config.min_played_ratio,
      **{f"num_{name}_examples": int(targets.sum())
         for name, (_, _, targets) in by_window.items()},
  }
  cat, catalogue_report = _build_catalogue(
      yambda_dir, listens, is_train.astype(np.float64), metadata,
      config.metadata_items)
  report.update(catalogue_report)
  item_index = cat.item_index(listens["item_id"].to_numpy())
  cold = cat.item_train_count[item_index] == 0
  known_user = cat.user_index(uid) > 0
  positive = rules.is_positive(ratio, feedback, config.min_played_ratio)
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
    lo, hi = rules.windows(split)[name]
    plan = records_plan.plan_records(
        uid, ts, window_positive, lo, hi, config.history_length,
        config.chunk_length)
    pattern = os.path.join(tmp_dir, "records",
                           name + "-{shard:05d}-of-{num_shards:05d}.tfrecord")
    written = _write_records(
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
  atomic.write_json(report, os.path.join(tmp_dir, "prep_report.json"))
  if os.path.exists(output_dir):
    shutil.rmtree(output_dir)
  os.replace(tmp_dir, output_dir)
  logging.info("Prepared %s in %.1fs: %s", output_dir, report["seconds"],
               ", ".join(f"{report[f'{name}_examples']} {name}"
                         for name in by_window))
  return report


def main(argv):
  del argv
  prepare(FLAGS.yambda_dir, FLAGS.size, FLAGS.output_dir,
          config_lib.from_flags())


if __name__ == "__main__":
  flags.DEFINE_string("yambda_dir", None, "Folder with the Yambda layout.")
  flags.DEFINE_string("size", "50m", "Which flat/<size>/ to read.")
  flags.DEFINE_string("output_dir", None, "Where the prepared data goes.")
  config_lib.define_flags()
  flags.adopt_module_key_flags(config_lib)
  flags.mark_flags_as_required(["yambda_dir", "output_dir"])
  app.run(main)
