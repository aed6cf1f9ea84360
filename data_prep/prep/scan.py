"""Pass 1, scan: validate the input and partition it into buckets.

Row-group ranges of multi_event.parquet (scan units) are streamed in batches
of --read_batch_rows, validated (`validation.validate_batch`) and split by a
hash of uid into buckets, temporary parquet files of the work folder. The
input need not be sorted; whether it was is reported. Each unit's counts are
written as a JSON report, which also marks the unit done.
"""

import os
from typing import Any, Dict, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import rules
from data_prep import yambda
from data_prep.prep import buckets
from data_prep.prep import config as config_lib
from data_prep.prep import validation
from data_prep.prep import work as work_lib
from tfrs_yambda import atomic


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


def scan_unit(work_root: str, plan: work_lib.Plan,
              config: config_lib.PrepConfig, unit: int) -> Dict[str, Any]:
  """Pass 1 for one row-group range: validate, count, partition into buckets.

  Args:
    work_root: the work folder's root.
    plan: the job.
    config: the prep's configuration.
    unit: the scan unit (a range of row groups, `plan.row_groups`).

  Returns:
    The unit's counts: events by type and oddity, listen time range, and
    whether its rows were sorted.
  """
  work = work_lib.Work.at(work_root)
  if os.path.exists(work.scan_report(unit)):
    return atomic.read_json(work.scan_report(unit))
  path = plan.events_path
  parquet = pq.ParquetFile(path)
  row_groups = plan.row_groups(unit)
  first_row = sum(parquet.metadata.row_group(i).num_rows
                  for i in range(row_groups[0])) if row_groups else 0
  counts: Dict[str, Any] = {}
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
      table, batch_counts = validation.validate_batch(path, batch, first_row)
      first_row += batch.num_rows
      for k, v in batch_counts.items():
        counts[k] = counts.get(k, 0) + v
      uid = table.column("uid").to_numpy()
      ts = table.column("timestamp").to_numpy()
      order.update(uid, ts)
      listen_ts = ts[table.column("event_type").to_numpy() == rules.LISTEN]
      if len(listen_ts):
        lo, hi = int(listen_ts.min()), int(listen_ts.max())
        listen_min = lo if listen_min is None else min(listen_min, lo)
        listen_max = hi if listen_max is None else max(listen_max, hi)
      bucket = buckets.bucket_of(uid, plan.num_buckets).astype(np.uint32)
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
              buckets.BUCKET_SCHEMA, compression="lz4")
        writers[b].write_table(
            table.slice(bounds[b], bounds[b + 1] - bounds[b]))
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
  atomic.write_json(counts, work.scan_report(unit))
  return counts


def merge_scan_reports(reports: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """The whole input's scan counts from its units' reports.

  Args:
    reports: every scan unit's report, in unit (file) order.

  Returns:
    Summed counts, the listen time range, and whether the input is sorted:
    every range is, and each range starts where the one before ended.
  """
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
