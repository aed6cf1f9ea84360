"""The work folder of a streaming prep: its paths, the job's plan, progress.

Everything is built under <output_dir>.tmp, which becomes the output folder
when complete. Every file is written under a temporary name and renamed, and
each finished unit of work leaves a marker, so rerunning after an
interruption resumes where it stopped; `open_work` restarts the folder when
the input file or the configuration changed.
"""

import math
import os
import shutil
import time
from typing import List

from absl import logging
import pyarrow.parquet as pq

from data_prep.prep import config as config_lib
from tfrs_yambda import atomic


class Work:
  """Paths of the work folder <output_dir>.tmp, which becomes the output."""

  def __init__(self, output_dir: str):
    self.output_dir = output_dir.rstrip("/")
    self.root = self.output_dir + ".tmp"

  @classmethod
  def at(cls, root: str) -> "Work":
    """The Work whose root is `root` (what units of work are given)."""
    return cls(root[:-len(".tmp")])

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


class Plan:
  """The fixed facts of a job: input, row-group ranges, buckets, config.

  Users are hashed to buckets with `records_plan.shard_of`, and bucket b
  belongs to shard b % num_shards, so a shard is a fixed set of buckets.
  """

  def __init__(self, events_path: str, config: config_lib.PrepConfig,
               num_workers: int):
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
    """The row groups of the input that scan unit `unit` reads."""
    lo = unit * self.num_row_groups // self.num_scan_units
    hi = (unit + 1) * self.num_row_groups // self.num_scan_units
    return list(range(lo, hi))

  def shard_buckets(self, shard: int, num_shards: int) -> List[int]:
    """The buckets whose records make up shard `shard`, in order."""
    return list(range(shard, self.num_buckets, num_shards))


def open_work(work: Work, plan: Plan) -> None:
  """Resumes a matching work folder, or starts a fresh one.

  Args:
    work: the work folder.
    plan: the job; a folder started for another fingerprint is restarted.
  """
  if os.path.exists(work.job):
    if atomic.read_json(work.job) == plan.fingerprint:
      logging.info("Resuming the work folder %s", work.root)
      return
    logging.info("Input or configuration changed: restarting %s", work.root)
  shutil.rmtree(work.root, ignore_errors=True)
  os.makedirs(work.root)
  atomic.write_json(plan.fingerprint, work.job)


class Progress:
  """Logs events done, events/s and ETA of one pass."""

  def __init__(self, name: str, total_events: int):
    self.name = name
    self.total = max(total_events, 1)
    self.done = 0
    self.started = time.time()
    self.last_log = 0.0

  def add(self, events: int, force: bool = False) -> None:
    """Counts `events` more done; logs at most every 5 s (and at the end)."""
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
