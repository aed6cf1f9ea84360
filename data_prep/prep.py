r"""Raw Yambda folder -> item catalogue + TFRecord shards, out of core.

  python -m data_prep.prep --yambda_dir=/data/yambda --size=500m \
      --output_dir=/data/prepared/500m [--num_workers=16] [--prep_runner=spark]

What it decides (and records in the catalogue's metadata.json) is written once,
in `data_prep.prep_in_memory` (the in-memory reference, whose rule functions
this module calls): the time split into training, validation and test
windows (`time_split`, `windows`), the positive rule (`positives`), explicit
feedback as each window may know it (`explicit_attachments`, `feedback_at`,
`window_feedback`) and the catalogue's order and contents (`item_order`,
`metadata_item_ids`). Rows of one user with equal timestamps keep their order
in the input file. Only the data flow differs.

Passes. Memory is bounded by --bucket_events and --read_batch_rows, never by the
input: every pass streams, and only one bucket's rows per worker are in memory.
  1. scan: row-group ranges of multi_event.parquet are streamed in batches,
     validated (one clear error naming file, column and row) and partitioned by
     a hash of uid into buckets (temporary parquet files). The input need not
     be sorted; whether it was is reported.
  2. stats: per bucket (all events of its users), sort by (uid, time), attach
     feedback and count: per-item training positives and first listen,
     per-(item, length) training-window counts (for the median track length),
     per-user positives, report counts.
  3. catalogue: one global merge of the bucket stats -> item order, vocabularies,
     metadata; audio embeddings are streamed into audio.npy in catalogue order.
  4. records: per bucket again, the same sort, then item indices and
     tf.train.Example chunks of each window (train, validation, test); a
     shard's file is its buckets' files joined.
  5. finalize: prep_report.json, work files removed, folder renamed.

Buckets are the unit of work (a process pool, or Spark with
--prep_runner=spark); users are hashed to shards with the multiplicative hash
of the in-memory prep and bucket b belongs to shard b % num_shards, so `--stage=... --shard_index=i`
runs one shard's part of a pass on its own (e.g. one machine per shard over a
shared folder).

Output folder (built under <output_dir>.tmp and renamed when complete):
  catalogue/                 see tfrs_yambda.catalogue
  records/train-SSSSS-of-NNNNN.tfrecord, records/validation-...,
  records/test-...           see tfrs_yambda.schema
  prep_report.json           counts of everything kept and dropped, with reasons
Every file is written under a temporary name and renamed when complete, and each
finished unit of work leaves a marker, so rerunning after an interruption
resumes where it stopped. The work folder is restarted when the input file or
the configuration changed.
"""

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import prep_in_memory
from data_prep import yambda
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema

FLAGS = flags.FLAGS

# The rules shared with the in-memory reference.
attach_feedback = prep_in_memory.attach_feedback
plan_records = prep_in_memory.plan_records
positives = prep_in_memory.positives
windows = prep_in_memory.windows
NEVER_LISTENED = prep_in_memory.NEVER_LISTENED
read_events = prep_in_memory.read_events  # the whole-table reader, for small files
_shard_of = prep_in_memory._shard_of  # pylint: disable=protected-access

_LISTEN = yambda.EVENT_TYPES.index("listen")
_STAGES = ("all", "scan", "stats", "catalogue", "records", "finalize")
# Below this many events a process pool costs more than it saves.
_POOL_MIN_EVENTS = 2_000_000
# Fields of PrepConfig that change how the work runs, not what it produces.
_EXECUTION_FIELDS = ("num_workers", "runner", "read_batch_rows")
# Raw ids below this use direct lookup tables (int32: at most 1 GiB).
_DENSE_ID_LIMIT = 1 << 28
# Rows per batch of audio embeddings (128 floats each).
_AUDIO_BATCH_ROWS = 65536
# Bucket (item, length) keys merged into the catalogue in one sort, at least.
_MERGE_MIN_KEYS = 4_000_000


class PrepConfig:
  """Everything the prep depends on besides the input (all flags)."""

  def __init__(self, history_length=50, chunk_length=256, num_shards=4,
               test_window_seconds=86_400, gap_seconds=1_800, last_timestamp=0,
               min_played_ratio=50, validation_window_seconds=86_400,
               metadata_items=True, bucket_events=8_000_000, num_workers=0,
               read_batch_rows=1_000_000, runner="local",
               nonfinite_embeddings="error"):
    self.history_length = history_length
    self.chunk_length = chunk_length
    self.num_shards = num_shards
    self.test_window_seconds = test_window_seconds
    self.gap_seconds = gap_seconds
    self.last_timestamp = last_timestamp
    self.min_played_ratio = min_played_ratio
    # 0: no validation window (see prep_in_memory.time_split).
    self.validation_window_seconds = validation_window_seconds
    self.metadata_items = metadata_items  # the service's catalogue
    # At most about this many events per bucket: the memory bound of a worker.
    self.bucket_events = bucket_events
    self.num_workers = num_workers  # 0: all cores (1 for small inputs)
    self.read_batch_rows = read_batch_rows
    self.runner = runner  # "local" (process pool) or "spark"
    # NaN/inf in a kept item's normalized_embed: "error" or "missing".
    self.nonfinite_embeddings = nonfinite_embeddings

  def as_dict(self):
    return dict(vars(self))

  def output_dict(self):
    """The fields that decide what the prep writes (not how it runs)."""
    return {k: v for k, v in self.as_dict().items()
            if k not in _EXECUTION_FIELDS}


# --- Work folder ---------------------------------------------------------------


class _Work:
  """Paths of the work folder <output_dir>.tmp, which becomes the output."""

  def __init__(self, output_dir: str):
    self.output_dir = output_dir.rstrip("/")
    self.root = self.output_dir + ".tmp"

  def path(self, *parts) -> str:
    return os.path.join(self.root, *parts)

  @property
  def job(self) -> str:
    return self.path("job.json")

  def scan_report(self, unit: int) -> str:
    return self.path("scan", f"part-{unit:05d}.json")

  def bucket_dir(self, bucket: int) -> str:
    return self.path("buckets", f"{bucket:05d}")

  def bucket_stats(self, bucket: int) -> str:
    return self.path("stats", f"bucket-{bucket:05d}.npz")

  def bucket_records(self, split: str, bucket: int) -> str:
    return self.path("parts", f"{split}-{bucket:05d}.tfrecord")

  def shard_records(self, split: str, shard: int, num_shards: int) -> str:
    return self.path("records",
                     f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord")

  def done(self, kind: str, index: int) -> str:
    return self.path("done", f"{kind}-{index:05d}.json")

  @property
  def catalogue(self) -> str:
    return self.path("catalogue")


def _write_json_atomic(value: Any, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class _Plan:
  """The fixed facts of a job: input, row-group ranges, buckets, config."""

  def __init__(self, events_path: str, config: PrepConfig, num_workers: int):
    meta = pq.ParquetFile(events_path).metadata
    self.events_path = os.path.abspath(events_path)
    self.num_rows = meta.num_rows
    self.num_row_groups = meta.num_row_groups
    n = config.num_shards
    per_shard = math.ceil(self.num_rows / n / max(config.bucket_events, 1))
    # At least one bucket per worker, so that every core has work.
    self.num_buckets = n * max(per_shard, math.ceil(num_workers / n), 1)
    self.num_scan_units = max(1, min(self.num_row_groups, 4 * num_workers))
    stat = os.stat(events_path)
    self.fingerprint = {
        "source": self.events_path, "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns, "config": config.output_dict(),
        "num_buckets": self.num_buckets, "num_scan_units": self.num_scan_units,
    }

  def row_groups(self, unit: int) -> List[int]:
    lo = unit * self.num_row_groups // self.num_scan_units
    hi = (unit + 1) * self.num_row_groups // self.num_scan_units
    return list(range(lo, hi))

  def shard_buckets(self, shard: int, num_shards: int) -> List[int]:
    return list(range(shard, self.num_buckets, num_shards))


def _open_work(work: _Work, plan: _Plan) -> None:
  """Resumes a matching work folder, or starts a fresh one."""
  if os.path.exists(work.job):
    if _read_json(work.job) == plan.fingerprint:
      logging.info("Resuming the work folder %s", work.root)
      return
    logging.info("Input or configuration changed: restarting %s", work.root)
  shutil.rmtree(work.root, ignore_errors=True)
  os.makedirs(work.root)
  _write_json_atomic(plan.fingerprint, work.job)


# --- Progress --------------------------------------------------------------------


class _Progress:
  """Logs events done, events/s and ETA of one pass."""

  def __init__(self, name: str, total_events: int):
    self.name = name
    self.total = max(total_events, 1)
    self.done = 0
    self.started = time.time()
    self.last_log = 0.0

  def add(self, events: int, force: bool = False) -> None:
    self.done += events
    now = time.time()
    if not force and now - self.last_log < 5 and self.done < self.total:
      return
    self.last_log = now
    rate = self.done / max(now - self.started, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    logging.info("%s: %d / %d events (%.0f%%), %.2fM events/s, ETA %.0fs",
                 self.name, self.done, self.total, 100 * self.done / self.total,
                 rate / 1e6, eta)


# --- Pass 1: scan, validate, partition --------------------------------------------

# Compact bucket columns: 22 bytes per event.
_BUCKET_SCHEMA = pa.schema([
    ("uid", pa.uint32()), ("timestamp", pa.uint32()), ("item_id", pa.uint32()),
    ("is_organic", pa.uint8()), ("played_ratio_pct", pa.float32()),
    ("track_length_seconds", pa.float32()), ("event_type", pa.int8()),
])


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
  values, a listen without played ratio) are errors; oddities the prep can live
  with are counted for the report.
  """
  codes = _event_codes(path, batch, first_row)
  is_listen = codes == _LISTEN
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
  table = pa.Table.from_arrays([pa.array(columns[f.name], f.type)
                                for f in _BUCKET_SCHEMA], schema=_BUCKET_SCHEMA)
  return table, counts


def _bucket_of(uid: np.ndarray, num_buckets: int) -> np.ndarray:
  # The shard hash, so that bucket % num_shards is the user's shard.
  return _shard_of(uid, num_buckets)


class _OrderCheck:
  """Whether rows arrive sorted by (uid, timestamp), across batches."""

  def __init__(self):
    self.sorted = True
    self.first = None
    self.last = None

  def update(self, uid: np.ndarray, ts: np.ndarray) -> None:
    if not len(uid) or not self.sorted:
      return
    key = (uid.astype(np.uint64) << np.uint64(32)) | ts.astype(np.uint64)
    if self.first is None:
      self.first = int(key[0])
    if self.last is not None and key[0] < self.last:
      self.sorted = False
    self.sorted &= bool(np.all(key[1:] >= key[:-1]))
    self.last = int(key[-1])


def scan_unit(work_root: str, plan: _Plan, config: PrepConfig, unit: int
              ) -> Dict[str, int]:
  """Pass 1 for one row-group range: validate, count, partition into buckets."""
  work = _Work(work_root[:-len(".tmp")])
  if os.path.exists(work.scan_report(unit)):
    return _read_json(work.scan_report(unit))
  path = plan.events_path
  parquet = pq.ParquetFile(path)
  row_groups = plan.row_groups(unit)
  first_row = sum(parquet.metadata.row_group(i).num_rows
                  for i in range(row_groups[0])) if row_groups else 0
  counts: Dict[str, int] = {}
  order = _OrderCheck()
  listen_min, listen_max = None, None
  writers: Dict[int, pq.ParquetWriter] = {}
  bucket_rows = np.zeros(plan.num_buckets, np.int64)
  try:
    batches = parquet.iter_batches(
        batch_size=config.read_batch_rows, row_groups=row_groups,
        columns=yambda.required_columns("multi_event"),
        use_threads=False) if row_groups else []
    for batch in batches:
      table, batch_counts = validate_batch(path, batch, first_row)
      first_row += batch.num_rows
      for k, v in batch_counts.items():
        counts[k] = counts.get(k, 0) + v
      uid = table.column("uid").to_numpy()
      ts = table.column("timestamp").to_numpy()
      order.update(uid, ts)
      listen_ts = ts[table.column("event_type").to_numpy() == _LISTEN]
      if len(listen_ts):
        lo, hi = int(listen_ts.min()), int(listen_ts.max())
        listen_min = lo if listen_min is None else min(listen_min, lo)
        listen_max = hi if listen_max is None else max(listen_max, hi)
      bucket = _bucket_of(uid, plan.num_buckets).astype(np.uint32)
      # A stable sort keeps file order within each bucket.
      by_bucket = np.argsort(bucket, kind="stable")
      table = table.take(pa.array(by_bucket))
      bounds = np.searchsorted(bucket[by_bucket],
                               np.arange(plan.num_buckets + 1))
      for b in np.flatnonzero(np.diff(bounds)):
        if b not in writers:
          os.makedirs(work.bucket_dir(b), exist_ok=True)
          writers[b] = pq.ParquetWriter(
              os.path.join(work.bucket_dir(b), f"part-{unit:05d}.parquet.tmp"),
              _BUCKET_SCHEMA, compression="lz4")
        writers[b].write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))
        bucket_rows[b] += bounds[b + 1] - bounds[b]
  finally:
    for writer in writers.values():
      writer.close()
  for b in writers:
    name = os.path.join(work.bucket_dir(b), f"part-{unit:05d}.parquet")
    os.replace(name + ".tmp", name)
  counts["listen_timestamp_min"] = listen_min
  counts["listen_timestamp_max"] = listen_max
  counts["sorted_by_uid_timestamp"] = order.sorted
  counts["first_key"] = order.first
  counts["last_key"] = order.last
  _write_json_atomic(counts, work.scan_report(unit))
  return counts


def _merge_scan_reports(reports: Sequence[Dict]) -> Dict:
  """Sums the per-range counts; the input is sorted when every range is and
  the ranges follow each other."""
  total: Dict[str, Any] = {}
  mins = [r["listen_timestamp_min"] for r in reports
          if r["listen_timestamp_min"] is not None]
  maxs = [r["listen_timestamp_max"] for r in reports
          if r["listen_timestamp_max"] is not None]
  for report in reports:
    for k, v in report.items():
      if isinstance(v, int) and not isinstance(v, bool) and k.startswith(
          ("events", "listens_", "explicit_")):
        total[k] = total.get(k, 0) + v
  # Sorted inside every range, and each range starts where the last ended.
  keys = [(r["first_key"], r["last_key"]) for r in reports
          if r["first_key"] is not None]
  total["input_sorted_by_uid_timestamp"] = all(
      r["sorted_by_uid_timestamp"] for r in reports) and all(
          a[1] <= b[0] for a, b in zip(keys, keys[1:]))
  total["listen_timestamp_min"] = min(mins) if mins else None
  total["listen_timestamp_max"] = max(maxs) if maxs else None
  return total


# --- Per bucket: sorted listens with feedback -------------------------------------


def _read_bucket(work: _Work, bucket: int) -> pa.Table:
  folder = work.bucket_dir(bucket)
  if not os.path.isdir(folder):
    return _BUCKET_SCHEMA.empty_table()
  # Parts in scan-unit order, i.e. in file order.
  parts = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
  return pa.concat_tables(
      [pq.read_table(os.path.join(folder, f)) for f in parts] or
      [_BUCKET_SCHEMA.empty_table()])


def _feedback_attachments(uid, item, ts, code
                          ) -> Tuple[np.ndarray, np.ndarray, int]:
  """`prep_in_memory.explicit_attachments` of a bucket's rows.

  Explicit events are a small share of all events, so the reference rule (a
  4-key sort) runs only on the rows of (user, track) pairs that have explicit
  events; every other listen has no feedback.
  """
  explicit = code != _LISTEN
  if not explicit.any():
    return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
  # Only rows whose track has explicit events in the bucket can be involved.
  if item.max() < _DENSE_ID_LIMIT:
    flagged = np.zeros(int(item.max()) + 1, bool)
    flagged[item[explicit]] = True
    candidates = np.flatnonzero(flagged[item])
  else:
    candidates = np.arange(len(item))
  pair = ((uid[candidates].astype(np.uint64) << np.uint64(32)) |
          item[candidates].astype(np.uint64))
  explicit_pairs = np.unique(pair[explicit[candidates]])
  pos = np.minimum(np.searchsorted(explicit_pairs, pair),
                   len(explicit_pairs) - 1)
  rows = candidates[explicit_pairs[pos] == pair]
  event_rows, listen_rows, orphans = prep_in_memory.explicit_attachments(
      uid[rows], item[rows], ts[rows], code[rows])
  return rows[event_rows], rows[listen_rows], orphans


class _Listens:
  """One bucket's listens sorted by (uid, timestamp), with derived flags.

  `window(name)` gives each window's feedback, positives and targets as the
  window may know them (`prep_in_memory.window_feedback`); the attributes
  `feedback` and `positive` use all feedback, for the report's counts.
  """

  def __init__(self, table: pa.Table, split: Dict[str, int],
               min_played_ratio: int):
    uid = table.column("uid").to_numpy()
    ts = table.column("timestamp").to_numpy()
    item = table.column("item_id").to_numpy()
    code = table.column("event_type").to_numpy()
    self._attachments = _feedback_attachments(uid, item, ts, code)
    self.orphans = self._attachments[2]
    self._code, self._event_ts = code, ts
    feedback = self._feedback_at(None)
    listen_rows = np.flatnonzero(code == _LISTEN)
    key = ((uid[listen_rows].astype(np.uint64) << np.uint64(32)) |
           ts[listen_rows].astype(np.uint64))
    # Stable: listens with equal (uid, time) keep file order, as in memory.
    rows = listen_rows[np.argsort(key, kind="stable")]
    self._rows = rows
    self.uid = uid[rows].astype(np.int64)
    self.ts = ts[rows].astype(np.int64)
    self.item = item[rows].astype(np.int64)
    self.organic = table.column("is_organic").to_numpy()[rows].astype(np.int64)
    self.length = table.column("track_length_seconds").to_numpy()[rows]
    # Rounded as the records store it, so the pipeline sees the same positives.
    self.ratio = np.round(table.column("played_ratio_pct").to_numpy()[rows])
    self.feedback = feedback[rows]
    self.positive = positives(self.ratio, self.feedback, min_played_ratio)
    self.has_seed = np.r_[False, self.uid[1:] == self.uid[:-1]]
    self.windows = windows(split)
    self._by_window = {}
    for name, (lo, hi) in self.windows.items():
      window_fb = prep_in_memory.window_feedback(self._feedback_before,
                                                 self.ts, lo, hi)
      window_positive = positives(self.ratio, window_fb, min_played_ratio)
      self._by_window[name] = (window_fb, window_positive, window_positive &
                               self.has_seed & (self.ts >= lo) &
                               (self.ts < hi))
    self.is_train = self._by_window["train"][2]

  def _feedback_at(self, before: Optional[int]) -> np.ndarray:
    """Feedback per bucket row as of `before` (all when None), from the
    attachments found once."""
    event_rows, listen_rows, _ = self._attachments
    return prep_in_memory.feedback_at(len(self._code), event_rows,
                                      listen_rows, self._code, self._event_ts,
                                      before)

  def _feedback_before(self, cut: int) -> np.ndarray:
    return self._feedback_at(cut)[self._rows]

  def window(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feedback, positive, is_target) per listen, as window `name` knows
    them."""
    return self._by_window[name]

  def __len__(self):
    return len(self.uid)


# --- Pass 2: statistics per bucket ---------------------------------------------------


def _length_key(item: np.ndarray, length: np.ndarray) -> np.ndarray:
  """(item, track length) as one uint64: the float32 bits identify a length."""
  bits = np.ascontiguousarray(length, np.float32).view(np.uint32)
  bits = np.where(np.isnan(length), np.uint32(0x7FC00000), bits)  # one NaN
  return (item.astype(np.uint64) << np.uint64(32)) | bits.astype(np.uint64)


def _reduce_keys(keys: np.ndarray, *weights: np.ndarray):
  """Unique keys and the sum of each weight array per key."""
  unique, inverse = np.unique(keys, return_inverse=True)
  return (unique,) + tuple(
      np.bincount(inverse, weights=w, minlength=len(unique)).astype(np.int64)
      for w in weights)


def bucket_stats(listens: _Listens, split: Dict[str, int],
                 min_played_ratio: int) -> Tuple[Dict[str, np.ndarray],
                                                 Dict[str, int]]:
  """What the catalogue and the report need from one bucket.

  Track lengths count training-window listens only, and each item's first
  listen is kept, so that the catalogue knows nothing after the cut.
  """
  ts = listens.ts
  keys, key_listens, key_train = _reduce_keys(
      _length_key(listens.item, listens.length),
      ts < split["train_end"], listens.is_train)
  first_items, first_inverse = np.unique(listens.item, return_inverse=True)
  first_ts = np.full(len(first_items), np.iinfo(np.int64).max)
  np.minimum.at(first_ts, first_inverse, ts)
  user_start = np.flatnonzero(np.r_[True, listens.uid[1:] != listens.uid[:-1]]
                              ) if len(listens) else np.zeros(0, np.int64)
  user_train = (np.add.reduceat(listens.is_train.astype(np.int64), user_start)
                if len(listens) else np.zeros(0, np.int64))
  user_of_row = np.cumsum(np.r_[True, listens.uid[1:] != listens.uid[:-1]]
                          ) - 1 if len(listens) else np.zeros(0, np.int64)
  arrays = {"keys": keys, "key_listens": key_listens, "key_train": key_train,
            "first_items": first_items, "first_ts": first_ts,
            "uids": listens.uid[user_start], "user_train": user_train}
  in_gap = ((ts >= split["train_end"]) & (ts < split["validation_start"])) | (
      (ts >= split["validation_end"]) & (ts < split["test_start"]))
  counts = {
      "listens": len(listens),
      "explicit_events_dropped_no_earlier_listen": listens.orphans,
      "listens_skipped_below_min_played_ratio": int(
          np.sum(listens.ratio < min_played_ratio)),
      "listens_disliked": int(np.sum(
          listens.feedback == schema.FEEDBACK_DISLIKED)),
      "listens_liked": int(np.sum(listens.feedback == schema.FEEDBACK_LIKED)),
      "positives_without_seed_first_listen_of_user": int(
          np.sum(listens.positive & ~listens.has_seed)),
      "positives_in_gap_not_targets": int(np.sum(listens.positive & in_gap)),
      "listens_at_or_after_last_timestamp_not_targets": int(
          np.sum(ts >= split["last_timestamp"])),
  }
  for name in listens.windows:
    targets = listens.window(name)[2]
    counts[f"{name}_examples"] = int(targets.sum())
    if name != "train":
      counts[f"{name}_examples_unknown_user"] = int(np.sum(
          targets & (user_train[user_of_row] == 0)))
  return arrays, counts


def stats_unit(work_root: str, split: Dict[str, int], config: PrepConfig,
               bucket: int) -> int:
  """Pass 2 for one bucket; returns its event count (for progress)."""
  work = _Work(work_root[:-len(".tmp")])
  path = work.bucket_stats(bucket)
  if os.path.exists(path):
    return int(np.load(path)["events"])
  table = _read_bucket(work, bucket)
  listens = _Listens(table, split, config.min_played_ratio)
  arrays, counts = bucket_stats(listens, split, config.min_played_ratio)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, events=table.num_rows, counts=json.dumps(counts), **arrays)
  os.replace(path + ".tmp", path)
  return table.num_rows


# --- Pass 3: catalogue ----------------------------------------------------------------


def _merge_stats(work: _Work, num_buckets: int):
  """Merges all bucket stats; memory grows with items and users, not events.

  Bucket keys wait in a batch until they outnumber the keys merged so far
  (or _MERGE_MIN_KEYS): each sort then at least halves what it reads again,
  so the merge costs O(total keys log) rather than one full sort per bucket,
  which at hundreds of buckets would dominate the pass.
  """
  keys = np.zeros(0, np.uint64)
  key_listens = key_train = np.zeros(0, np.int64)
  first_items = first_ts = np.zeros(0, np.int64)
  pending, pending_first, pending_keys = [], [], 0
  uids, user_train, counts = [], [], {}

  def merged():
    parts = [(keys, key_listens, key_train)] + pending
    return _reduce_keys(*(np.concatenate(column) for column in zip(*parts)))

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
    if pending_keys >= max(len(keys), _MERGE_MIN_KEYS):
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
                  ) -> Tuple[np.ndarray, int, int]:
  """Writes audio.npy [n_items + 1, width] in catalogue order, batch by batch.

  The matrix is the one catalogue piece as large as items x width (about 5 GB
  at 9.4M items), so it goes to disk through a memory map, never whole in RAM.
  Returns has_audio in catalogue order, the width, and the count of items
  whose embedding was non-finite and so treated as missing.

  NaN or inf in a kept item's embedding is an error naming the item and its
  row in the file, as in prep_in_memory._read_audio; with
  nonfinite_embeddings="missing" the item gets a zero row and has_audio False.
  """
  if nonfinite_embeddings not in prep_in_memory.NONFINITE_EMBEDDINGS:
    raise ValueError(f"nonfinite_embeddings must be one of "
                     f"{prep_in_memory.NONFINITE_EMBEDDINGS}, not "
                     f"{nonfinite_embeddings!r}")
  yambda.check_schema(path, "embeddings")
  parquet = pq.ParquetFile(path)
  width = None
  audio = None
  has_audio = np.zeros(len(sorted_items) + 1, bool)
  nonfinite = np.zeros(len(sorted_items) + 1, bool)
  next_row = 0  # row of the file where the next batch starts
  del batch_rows  # embeddings are wide: their own, smaller batches
  for batch in parquet.iter_batches(batch_size=_AUDIO_BATCH_ROWS,
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
    if not keep.any():
      continue
    values = embed.flatten().to_numpy(zero_copy_only=False).astype(
        np.float32).reshape(len(ids), width)[keep]
    rows = index_of[pos[keep]]
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
      if nonfinite_embeddings == "error":
        bad = np.flatnonzero(keep)[np.flatnonzero(~finite)[0]]
        raise prep_in_memory._nonfinite_embedding_error(  # pylint: disable=protected-access
            path, int(ids[bad]), first_row + int(bad))
      values[~finite] = 0
      nonfinite[rows[~finite]] = True
    by_row = np.argsort(rows)  # in file order, the writes touch fewer pages
    audio[rows[by_row]] = values[by_row]
    has_audio[rows] = finite
  if audio is None:
    width = 0
    np.save(out_path, np.zeros((len(sorted_items) + 1, 0), np.float32))
  else:
    audio.flush()
    del audio
  return has_audio, width, int(np.sum(nonfinite & ~has_audio))


def build_catalogue(root: str, work: _Work, num_buckets: int, metadata: Dict,
                    batch_rows: int, metadata_items: bool = True) -> Dict:
  """Pass 3: merges bucket stats into the catalogue folder; returns counts.

  The rules are `prep_in_memory.build_catalogue`'s: rows in `item_order`,
  and what the model learns from comes from before the training cut.
  """
  (keys, key_listens, key_train, first_items, first_ts, uids, user_train,
   counts) = _merge_stats(work, num_buckets)
  metadata = dict(metadata, **{f"num_{name}_examples": counts[
      f"{name}_examples"] for name in windows(metadata)})
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
    sorted_items = np.union1d(listened, prep_in_memory.metadata_item_ids(root))
    at = np.searchsorted(sorted_items, listened)
    first_listen = np.full(len(sorted_items), NEVER_LISTENED, np.int64)
    first_listen[at] = first_ts
    counts_all = np.zeros(len(sorted_items), np.int64)
    counts_all[at] = item_counts
    item_counts = counts_all
  order = prep_in_memory.item_order(sorted_items, item_counts, first_listen)
  index_of = np.empty(len(order), np.int64)
  index_of[order] = np.arange(1, len(order) + 1)
  known = (first_listen != NEVER_LISTENED) & (
      first_listen < metadata["train_end"])

  artist_raw, multi_artist = prep_in_memory._first_mapping(  # pylint: disable=protected-access
      yambda.artist_mapping_path(root), "artist_mapping", "artist_id",
      sorted_items)
  album_raw, multi_album = prep_in_memory._first_mapping(  # pylint: disable=protected-access
      yambda.album_mapping_path(root), "album_mapping", "album_id",
      sorted_items)
  artist, artist_vocab = prep_in_memory._to_vocab(artist_raw, known)  # pylint: disable=protected-access
  album, album_vocab = prep_in_memory._to_vocab(album_raw, known)  # pylint: disable=protected-access
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
  has_audio, width, nonfinite = _stream_audio(
      yambda.embeddings_path(root), sorted_items, index_of, audio_path,
      batch_rows,
      metadata.get("prep_config", {}).get("nonfinite_embeddings", "error"))
  cat = catalogue_lib.Catalogue(
      item_ids=reorder(sorted_items, -1).astype(np.int64),
      item_artist=reorder(artist, 0).astype(np.int64),
      item_album=reorder(album, 0).astype(np.int64),
      item_length=reorder(length, 0.0).astype(np.float32),
      item_train_count=reorder(item_counts, 0).astype(np.int64),
      item_first_listen=reorder(first_listen, NEVER_LISTENED).astype(np.int64),
      has_audio=has_audio,
      # The real matrix is already in audio.stream.npy; see _stream_audio.
      audio=np.zeros((1, width), np.float32),
      user_ids=np.concatenate([[-1], uids[user_order]]).astype(np.int64),
      user_train_count=np.concatenate([[0], user_train[user_order]]),
      artist_ids=artist_vocab,
      album_ids=album_vocab,
      metadata=metadata,
  )
  catalogue_lib.write(cat, tmp)
  os.replace(audio_path, os.path.join(tmp, "audio.npy"))
  counts.update({
      "items": cat.num_items,
      "items_with_train_positives": int(np.sum(item_counts > 0)),
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
      "audio_dim": width,
  })
  _write_json_atomic(counts, os.path.join(tmp, "counts.json"))
  os.replace(tmp, work.catalogue)
  return counts


# --- Pass 4: records ---------------------------------------------------------------


def _uvarint(value: int) -> bytes:
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def varint_encode(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
  """Protobuf varints of non-negative ints, concatenated, and their offsets.

  Any run of values [i, j) is then the packed payload buf[off[i]:off[j]], so a
  record's repeated int64 fields are slices of one encoding per bucket.
  """
  v = np.asarray(values).astype(np.uint64)
  sizes = np.ones(len(v), np.int64)
  for k in range(1, 10):
    sizes += v >= np.uint64(1 << (7 * k))
  offsets = np.zeros(len(v) + 1, np.int64)
  np.cumsum(sizes, out=offsets[1:])
  width = int(sizes.max()) if len(v) else 0
  # Byte k of every value in column k; the row-major selection of the bytes
  # each value needs is the concatenation of all the varints.
  grid = np.empty((len(v), width), np.uint8)
  for k in range(width):
    grid[:, k] = ((v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
    grid[:, k] |= np.where(sizes > k + 1, 0x80, 0).astype(np.uint8)
  used = np.arange(width)[np.newaxis, :] < sizes[:, np.newaxis]
  return grid[used].tobytes(), offsets


# Varints of small lengths, looked up rather than computed (records are many).
_SMALL_VARINTS = [_uvarint(i) for i in range(1 << 14)]


def _varint(value: int) -> bytes:
  return _SMALL_VARINTS[value] if value < 16384 else _uvarint(value)


def _entry_parts(key: bytes, packed: bytes) -> List[bytes]:
  """One Features.feature map entry, key -> Feature{int64_list{packed}}, as
  pieces to join: field headers are (tag, varint length) pairs, innermost
  first."""
  n = len(packed)
  list_header = b"\x0a" + _varint(n)  # Int64List.value, packed
  n += len(list_header)
  feature_header = b"\x1a" + _varint(n)  # Feature.int64_list
  n += len(feature_header)
  key_field = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(n)
  n += len(key_field)
  return [b"\x0a" + _varint(n), key_field, feature_header, list_header, packed]


def encode_example(uid: int, num_context: int,
                   sequences: Dict[str, bytes]) -> bytes:
  """A serialized tf.train.Example of one record, without building protos."""
  parts = _entry_parts(b"uid", _varint(uid))
  parts += _entry_parts(b"num_context", _varint(num_context))
  for name, packed in sequences.items():
    parts += _entry_parts(name.encode(), packed)
  features = b"".join(parts)
  return b"\x0a" + _varint(len(features)) + features


class _ItemIndex:
  """Raw item id -> catalogue index, with the sort done once per process."""
  _cache: Dict[str, "_ItemIndex"] = {}

  def __init__(self, catalogue_dir: str):
    items = pd.read_parquet(os.path.join(catalogue_dir, "items.parquet"),
                            columns=["item_id", "train_count"])
    ids = items["item_id"].to_numpy(np.int64)[1:]
    self.order = np.argsort(ids, kind="stable")
    self.sorted_ids = ids[self.order]
    self.train_count = items["train_count"].to_numpy(np.int64)
    # Raw ids are dense enough (9.4M in Yambda) for a direct table, which is
    # much faster than a binary search per event.
    self.table = None
    if len(ids) and ids.max() < _DENSE_ID_LIMIT:
      self.table = np.zeros(int(ids.max()) + 1, np.int32)
      self.table[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)

  @classmethod
  def get(cls, catalogue_dir: str) -> "_ItemIndex":
    if catalogue_dir not in cls._cache:
      cls._cache.clear()
      cls._cache[catalogue_dir] = cls(catalogue_dir)
    return cls._cache[catalogue_dir]

  def lookup(self, raw: np.ndarray) -> np.ndarray:
    if self.table is not None:
      inside = raw < len(self.table)
      return np.where(inside, self.table[np.where(inside, raw, 0)],
                      0).astype(np.int64)
    if not len(self.sorted_ids):
      return np.zeros(len(raw), np.int64)
    pos = np.minimum(np.searchsorted(self.sorted_ids, raw),
                     len(self.sorted_ids) - 1)
    return np.where(self.sorted_ids[pos] == raw, self.order[pos] + 1, 0)


def _write_split(path: str, listens: _Listens, encoded: Dict[str, Tuple],
                 plan, targets: np.ndarray) -> Dict[str, int]:
  """Writes one split's planned chunks of one bucket; returns counts."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  context, start, stop = plan
  target_count = np.add.reduceat(targets.astype(np.int64), start) if len(
      start) else np.zeros(0, np.int64)
  # reduceat sums to the next start, not to stop: recount where they differ.
  cut = np.r_[start[1:], len(targets)] != stop
  for i in np.flatnonzero(cut):
    target_count[i] = int(targets[start[i]:stop[i]].sum())
  records = examples = 0
  with tf.io.TFRecordWriter(path + ".tmp") as writer:
    for c, s, e, n in zip(context.tolist(), start.tolist(), stop.tolist(),
                          target_count.tolist()):
      if n == 0:
        continue
      sequences = {name: buf[off[c]:off[e]]
                   for name, (buf, off) in encoded.items()}
      writer.write(encode_example(int(listens.uid[s]), s - c, sequences))
      records += 1
      examples += n
  os.replace(path + ".tmp", path)
  return {"records": records, "examples": examples}


def records_unit(work_root: str, split: Dict[str, int], config: PrepConfig,
                 bucket: int) -> int:
  """Pass 4 for one bucket: each window's records; returns its events."""
  work = _Work(work_root[:-len(".tmp")])
  if os.path.exists(work.done("records", bucket)):
    return _read_json(work.done("records", bucket))["events"]
  table = _read_bucket(work, bucket)
  listens = _Listens(table, split, config.min_played_ratio)
  index = _ItemIndex.get(work.catalogue)
  item_index = index.lookup(listens.item)
  columns = {
      schema.ITEMS: item_index,
      schema.TIMESTAMPS: listens.ts,
      schema.PLAYED_RATIOS: listens.ratio.astype(np.int64),
      schema.IS_ORGANIC: listens.organic,
  }
  encoded = {name: varint_encode(column) for name, column in columns.items()}
  counts = {"events": table.num_rows}
  os.makedirs(work.path("parts"), exist_ok=True)
  for name, (lo, hi) in listens.windows.items():
    feedback, positive, targets = listens.window(name)
    # Feedback differs by window (what each may know): encoded per window.
    window_encoded = dict(encoded)
    window_encoded[schema.FEEDBACK] = varint_encode(feedback.astype(np.int64))
    window_encoded = {k: window_encoded[k]
                      for k in schema.RECORD_SEQUENCE_FEATURES}
    plan = plan_records(listens.uid, listens.ts, positive, lo, hi,
                        config.history_length, config.chunk_length)
    written = _write_split(work.bucket_records(name, bucket), listens,
                          window_encoded, plan, targets)
    if written["examples"] != targets.sum():
      raise AssertionError(f"{name} bucket {bucket}: wrote "
                           f"{written['examples']} examples, expected "
                           f"{targets.sum()}")
    counts[f"{name}_records"] = written["records"]
    if name != "train":
      counts[f"{name}_examples_cold_target"] = int(
          np.sum(targets & (index.train_count[item_index] == 0)))
  _write_json_atomic(counts, work.done("records", bucket))
  return table.num_rows


def join_shard(work_root: str, plan: _Plan, num_shards: int, shard: int,
               splits: Sequence[str]) -> None:
  """Concatenates the shard's bucket files (TFRecords are self-framed)."""
  work = _Work(work_root[:-len(".tmp")])
  os.makedirs(work.path("records"), exist_ok=True)
  for split in splits:
    path = work.shard_records(split, shard, num_shards)
    if os.path.exists(path):
      continue
    with open(path + ".tmp", "wb") as out:
      for bucket in plan.shard_buckets(shard, num_shards):
        with open(work.bucket_records(split, bucket), "rb") as part:
          shutil.copyfileobj(part, out, 16 << 20)
    os.replace(path + ".tmp", path)


# --- Running units of work -----------------------------------------------------------


def _resolve_workers(config: PrepConfig, num_rows: int) -> int:
  if config.num_workers > 0:
    return config.num_workers
  return (os.cpu_count() or 1) if num_rows >= _POOL_MIN_EVENTS else 1


class _Runner:
  """Runs a list of independent calls: inline, on a process pool, or on Spark."""

  def __init__(self, kind: str, num_workers: int):
    self.kind = kind
    self.num_workers = num_workers
    self._pool = None
    self._spark = None

  def map(self, fn, args: List[Tuple], progress: Optional[_Progress] = None,
          weight=lambda result: result) -> List:
    """fn(*a) for each a; results in order. `weight` feeds the progress log."""
    if not args:
      return []
    if self.kind == "spark":
      results = self._spark_context().parallelize(
          list(enumerate(args)), len(args)).map(
              lambda ia: (ia[0], fn(*ia[1]))).collect()
      results = [r for _, r in sorted(results, key=lambda r: r[0])]
      if progress:
        for r in results:
          progress.add(weight(r))
      return results
    if self.num_workers <= 1 or len(args) == 1:
      results = []
      for a in args:
        results.append(fn(*a))
        if progress:
          progress.add(weight(results[-1]))
      return results
    pool = self._get_pool()
    results = [None] * len(args)
    pending = [pool.apply_async(fn, a) for a in args]
    for i, result in enumerate(pending):
      results[i] = result.get()
      if progress:
        progress.add(weight(results[i]))
    return results

  def _get_pool(self):
    if self._pool is None:
      # forkserver: workers fork from a clean server process that imported this
      # module once, rather than from a parent whose threads (Arrow, TF) a fork
      # could leave in a bad state.
      context = multiprocessing.get_context("forkserver")
      context.set_forkserver_preload(["data_prep.prep"])
      self._pool = context.Pool(self.num_workers)
    return self._pool

  def _spark_context(self):
    if self._spark is None:
      from pyspark import SparkConf, SparkContext  # pylint: disable=g-import-not-at-top
      # Spark's Python workers must import this package as the driver does.
      root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      os.environ["PYTHONPATH"] = os.pathsep.join(
          p for p in (root, os.environ.get("PYTHONPATH")) if p)
      os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
      conf = SparkConf().setMaster(f"local[{self.num_workers}]").setAppName(
          "yambda-prep").set("spark.ui.enabled", "false").set(
              "spark.python.worker.reuse", "true")
      self._spark = SparkContext.getOrCreate(conf)
    return self._spark

  def close(self):
    if self._pool is not None:
      self._pool.close()
      self._pool.join()
      self._pool = None


def _stage_units(items: Iterable[int], shard_index: int, num_shards: int,
                 of_shard) -> List[int]:
  if shard_index < 0:
    return list(items)
  return [i for i in items if of_shard(i) == shard_index % num_shards]


def _time_split(config: PrepConfig, scan: Dict) -> Dict[str, int]:
  if scan["listen_timestamp_max"] is None:
    raise ValueError("The input has no listen events.")
  return prep_in_memory.time_split(config, scan["listen_timestamp_min"],
                                   scan["listen_timestamp_max"])


def prepare(yambda_dir: str, size: str, output_dir: str,
            config: PrepConfig = None, stage: str = "all",
            shard_index: int = -1) -> Optional[Dict]:
  """Runs the prep (or one stage, or one shard of a stage); returns the report.

  With stage="all" every pass runs here, resuming a previous interrupted run.
  Other stages exist so that shards can run on separate machines over a shared
  folder, in order: scan, stats, catalogue, records, finalize (scan, stats and
  records take --shard_index; the others are global and quick).
  """
  config = config or PrepConfig()
  if stage not in _STAGES:
    raise ValueError(f"stage must be one of {_STAGES}, not {stage!r}")
  started = time.time()
  events_path = yambda.multi_event_path(yambda_dir, size)
  # Check every input's schema before any work, so a bad file fails fast.
  yambda.check_schema(events_path, "multi_event")
  yambda.check_schema(yambda.embeddings_path(yambda_dir), "embeddings")
  yambda.check_schema(yambda.artist_mapping_path(yambda_dir), "artist_mapping")
  yambda.check_schema(yambda.album_mapping_path(yambda_dir), "album_mapping")

  num_rows = pq.ParquetFile(events_path).metadata.num_rows
  workers = _resolve_workers(config, num_rows)
  plan = _Plan(events_path, config, workers)
  work = _Work(output_dir)
  if stage in ("all", "scan"):
    _open_work(work, plan)
  elif _read_json(work.job) != plan.fingerprint:
    raise ValueError(f"{work.root} was started for another input or "
                     "configuration; run --stage=scan first.")
  runner = _Runner(config.runner, workers)
  logging.info("Prep of %s (%d events): %d buckets, %d shards, %d workers "
               "(%s)", events_path, num_rows, plan.num_buckets,
               config.num_shards, workers, config.runner)
  n = config.num_shards
  try:
    if stage in ("all", "scan"):
      units = _stage_units(range(plan.num_scan_units), shard_index, n,
                           lambda u: u % n)
      try:
        runner.map(scan_unit, [(work.root, plan, config, u) for u in units],
                   _Progress("scan", num_rows),
                   weight=lambda r: r.get("events", 0))
      except yambda.YambdaFormatError:
        shutil.rmtree(work.root, ignore_errors=True)  # nothing half-written
        raise
      if stage == "scan":
        return None
    scan = _merge_scan_reports([_read_json(work.scan_report(u))
                                for u in range(plan.num_scan_units)])
    split = _time_split(config, scan)
    buckets = range(plan.num_buckets)
    if stage in ("all", "stats"):
      units = _stage_units(buckets, shard_index, n, lambda b: b % n)
      runner.map(stats_unit, [(work.root, split, config, b) for b in units],
                 _Progress("stats", num_rows))
      if stage == "stats":
        return None
    metadata = {
        "source": plan.events_path,
        "prep_config": config.as_dict(),
        **split,
        "min_played_ratio": config.min_played_ratio,
    }
    if stage in ("all", "catalogue") and not os.path.exists(work.catalogue):
      try:
        build_catalogue(yambda_dir, work, plan.num_buckets, metadata,
                        config.read_batch_rows, config.metadata_items)
      except yambda.YambdaFormatError:  # e.g. a NaN embedding
        shutil.rmtree(work.root, ignore_errors=True)  # nothing half-written
        raise
      logging.info("Catalogue written (%.1fs so far)", time.time() - started)
    if stage == "catalogue":
      return None
    if stage in ("all", "records"):
      units = _stage_units(buckets, shard_index, n, lambda b: b % n)
      runner.map(records_unit, [(work.root, split, config, b) for b in units],
                 _Progress("records", num_rows))
      shards = _stage_units(range(n), shard_index, n, lambda s: s)
      runner.map(join_shard, [(work.root, plan, n, s, list(windows(split)))
                              for s in shards])
      if stage == "records":
        return None
    return _finalize(work, plan, config, scan, started)
  finally:
    runner.close()


def _finalize(work: _Work, plan: _Plan, config: PrepConfig, scan: Dict,
              started: float) -> Dict:
  """Pass 5: the report, then the work folder becomes the output folder."""
  report = _read_json(os.path.join(work.catalogue, "counts.json"))
  report.update({k: v for k, v in scan.items()
                 if not k.startswith("listen_timestamp")})
  for bucket in range(plan.num_buckets):
    done = _read_json(work.done("records", bucket))
    for key, value in done.items():
      if key != "events":
        report[key] = report.get(key, 0) + value
  report["dropped_rows_by_reason"] = {
      "explicit_event_without_earlier_listen_of_the_track": report[
          "explicit_events_dropped_no_earlier_listen"],
  }
  report["num_buckets"] = plan.num_buckets
  for name in ("scan", "buckets", "stats", "parts", "done", "job.json"):
    target = work.path(name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
  os.remove(os.path.join(work.catalogue, "counts.json"))
  records = work.path("records")
  record_bytes = sum(os.path.getsize(os.path.join(records, f))
                     for f in os.listdir(records))
  report["record_bytes"] = record_bytes
  report["record_bytes_per_listen"] = round(
      record_bytes / max(report["listens"], 1), 2)
  report["record_bytes_per_event"] = round(record_bytes / report["events"], 2)
  report["seconds"] = round(time.time() - started, 1)
  report["events_per_second"] = round(report["events"] /
                                      max(time.time() - started, 1e-9))
  with open(work.path("prep_report.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  if os.path.exists(work.output_dir):
    shutil.rmtree(work.output_dir)
  os.replace(work.root, work.output_dir)
  logging.info("Prepared %s in %.1fs (%.2fM events/s): %s", work.output_dir,
               report["seconds"], report["events_per_second"] / 1e6,
               ", ".join(f"{report[k]} {k[:-len('_examples')]}"
                         for k in ("train_examples", "validation_examples",
                                   "test_examples") if k in report))
  return report


def define_config_flags():
  """Flags of `PrepConfig`; the training entry point defines them too."""
  defaults = PrepConfig()
  flags.DEFINE_integer("history_length", defaults.history_length,
                       "Positives of history each record's context provides.")
  flags.DEFINE_integer("chunk_length", defaults.chunk_length,
                       "Listens per record (before its context).")
  flags.DEFINE_integer("num_shards", defaults.num_shards,
                       "TFRecord shards per split; users are hashed to shards.")
  flags.DEFINE_integer("test_window_seconds", defaults.test_window_seconds,
                       "Length of the test window.")
  flags.DEFINE_integer("gap_seconds", defaults.gap_seconds,
                       "Gap before the test window and before the "
                       "validation window.")
  flags.DEFINE_integer("validation_window_seconds",
                       defaults.validation_window_seconds,
                       "Length of the validation window before the test gap "
                       "(0: none; training then runs up to the test gap).")
  flags.DEFINE_bool("metadata_items", defaults.metadata_items,
                    "Also catalogue every item of the metadata files (the "
                    "service catalogue's never-played candidates).")
  flags.DEFINE_integer("last_timestamp", defaults.last_timestamp,
                       "End of the test window (0: last event + 1s).")
  flags.DEFINE_integer("min_played_ratio", defaults.min_played_ratio,
                       "Listens played at least this percent are positives.")
  flags.DEFINE_integer("bucket_events", defaults.bucket_events,
                       "About this many events per bucket, the unit of work "
                       "held in memory (about 150 bytes per event per worker).")
  flags.DEFINE_integer("num_workers", defaults.num_workers,
                       "Worker processes (0: all cores, 1 for small inputs).")
  flags.DEFINE_integer("read_batch_rows", defaults.read_batch_rows,
                       "Rows per batch when streaming parquet input.")
  flags.DEFINE_enum("prep_runner", defaults.runner, ["local", "spark"],
                    "Where units of work run: a local process pool, or Spark "
                    "(pyspark; the master comes from the Spark config).")
  flags.DEFINE_enum("nonfinite_embeddings", defaults.nonfinite_embeddings,
                    list(prep_in_memory.NONFINITE_EMBEDDINGS),
                    "NaN or inf in the normalized_embed of a catalogue item: "
                    "an error naming the item and row, or 'missing': the item "
                    "has no audio embedding (counted in prep_report.json).")


def config_from_flags() -> PrepConfig:
  return PrepConfig(
      history_length=FLAGS.history_length, chunk_length=FLAGS.chunk_length,
      num_shards=FLAGS.num_shards,
      test_window_seconds=FLAGS.test_window_seconds,
      gap_seconds=FLAGS.gap_seconds, last_timestamp=FLAGS.last_timestamp,
      min_played_ratio=FLAGS.min_played_ratio,
      validation_window_seconds=FLAGS.validation_window_seconds,
      metadata_items=FLAGS.metadata_items,
      bucket_events=FLAGS.bucket_events, num_workers=FLAGS.num_workers,
      read_batch_rows=FLAGS.read_batch_rows, runner=FLAGS.prep_runner,
      nonfinite_embeddings=FLAGS.nonfinite_embeddings)


def main(argv):
  del argv
  prepare(FLAGS.yambda_dir, FLAGS.size, FLAGS.output_dir, config_from_flags(),
          stage=FLAGS.stage, shard_index=FLAGS.shard_index)


if __name__ == "__main__":
  flags.DEFINE_string("yambda_dir", None, "Folder with the Yambda layout.")
  flags.DEFINE_string("size", "50m", "Which flat/<size>/ to read.")
  flags.DEFINE_string("output_dir", None, "Where the prepared data goes.")
  flags.DEFINE_enum("stage", "all", list(_STAGES),
                    "Run every pass (all), or one pass for a multi-machine run.")
  flags.DEFINE_integer("shard_index", -1,
                       "With --stage=scan/stats/records: only this shard's "
                       "units (-1: all).")
  define_config_flags()
  flags.mark_flags_as_required(["yambda_dir", "output_dir"])
  app.run(main)
