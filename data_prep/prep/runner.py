"""Running the passes: `prepare`, and where units of work run.

Buckets (and scan units) are the unit of work: independent calls of
`scan.scan_unit`, `stats.stats_unit` and `records.records_unit`, run inline,
on a process pool or on Spark (--prep_runner=spark). Those functions are
top-level functions of their modules, so a pool or Spark ships them by name.
Bucket b belongs to shard b % num_shards, so `prepare(..., stage=...,
shard_index=i)` runs one shard's part of a pass on its own (e.g. one machine
per shard over a shared folder).
"""

import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from absl import logging
import pyarrow.parquet as pq

from data_prep import rules
from data_prep import yambda
from data_prep.prep import catalogue
from data_prep.prep import config as config_lib
from data_prep.prep import finalize
from data_prep.prep import records
from data_prep.prep import scan
from data_prep.prep import stats
from data_prep.prep import work as work_lib
from tfrs_yambda import atomic

STAGES = ("all", "scan", "stats", "catalogue", "records", "finalize")
# Below this many events a process pool costs more than it saves.
_POOL_MIN_EVENTS = 2_000_000
# The folder that holds the data_prep package, which Spark's workers import.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _resolve_workers(config: config_lib.PrepConfig, num_rows: int) -> int:
  if config.num_workers > 0:
    return config.num_workers
  return (os.cpu_count() or 1) if num_rows >= _POOL_MIN_EVENTS else 1


class Runner:
  """Runs a list of independent calls: inline, on a process pool, or on Spark.

  The functions it runs must be top-level functions of importable modules
  (and their arguments picklable): workers import them by name.
  """

  def __init__(self, kind: str, num_workers: int):
    self.kind = kind
    self.num_workers = num_workers
    self._pool = None
    self._spark = None

  def map(self, fn: Callable, args: List[Tuple],
          progress: Optional[work_lib.Progress] = None,
          weight: Callable[[Any], int] = lambda result: result) -> List:
    """fn(*a) for each a in `args`; results in order.

    Args:
      fn: the function, top-level in its module.
      args: one argument tuple per call.
      progress: logs progress, if given.
      weight: result -> events done, for the progress log.

    Returns:
      The results, in the order of `args`.
    """
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
      # forkserver: workers fork from a clean server process that imported the
      # prep once, rather than from a parent whose threads (Arrow, TF) a fork
      # could leave in a bad state.
      context = multiprocessing.get_context("forkserver")
      context.set_forkserver_preload(["data_prep.prep"])
      self._pool = context.Pool(self.num_workers)
    return self._pool

  def _spark_context(self):
    if self._spark is None:
      import pyspark  # pylint: disable=g-import-not-at-top
      # Spark's Python workers must import this package as the driver does.
      os.environ["PYTHONPATH"] = os.pathsep.join(
          p for p in (_PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
      os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
      conf = (pyspark.SparkConf()
              .setMaster(f"local[{self.num_workers}]")
              .setAppName("yambda-prep")
              .set("spark.ui.enabled", "false")
              .set("spark.python.worker.reuse", "true"))
      self._spark = pyspark.SparkContext.getOrCreate(conf)
    return self._spark

  def close(self):
    if self._pool is not None:
      self._pool.close()
      self._pool.join()
      self._pool = None


def _stage_units(items: Iterable[int], shard_index: int, num_shards: int,
                 of_shard: Callable[[int], int]) -> List[int]:
  if shard_index < 0:
    return list(items)
  return [i for i in items if of_shard(i) == shard_index % num_shards]


def _time_split(config: config_lib.PrepConfig,
                scan_counts: Dict[str, Any]) -> Dict[str, int]:
  return rules.time_split(config, scan_counts["listen_timestamp_min"],
                          scan_counts["listen_timestamp_max"])


def prepare(yambda_dir: str, size: str, output_dir: str,
            config: config_lib.PrepConfig = None, stage: str = "all",
            shard_index: int = -1) -> Optional[Dict[str, Any]]:
  """Runs the prep (or one stage, or one shard of a stage).

  With stage="all" every pass runs here, resuming a previous interrupted run.
  Other stages exist so that shards can run on separate machines over a shared
  folder, in order: scan, stats, catalogue, records, finalize (scan, stats and
  records take a shard_index; the others are global and quick).

  Args:
    yambda_dir: a folder with the Yambda layout.
    size: which flat/<size>/multi_event.parquet to read.
    output_dir: where the prepared data goes (built in <output_dir>.tmp).
    config: the prep's configuration (default: PrepConfig()).
    stage: one of STAGES.
    shard_index: with stage scan, stats or records: only this shard's units
      (-1: all).

  Returns:
    The report (also written as prep_report.json) after the finalize pass;
    None after a single earlier stage.
  """
  config = config or config_lib.PrepConfig()
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
  started = time.time()
  events_path = yambda.multi_event_path(yambda_dir, size)
  # Check every input's schema before any work, so a bad file fails fast.
  yambda.check_schema(events_path, "multi_event")
  yambda.check_schema(yambda.embeddings_path(yambda_dir), "embeddings")
  yambda.check_schema(yambda.artist_mapping_path(yambda_dir), "artist_mapping")
  yambda.check_schema(yambda.album_mapping_path(yambda_dir), "album_mapping")

  num_rows = pq.ParquetFile(events_path).metadata.num_rows
  workers = _resolve_workers(config, num_rows)
  plan = work_lib.Plan(events_path, config, workers)
  work = work_lib.Work(output_dir)
  if stage in ("all", "scan"):
    work_lib.open_work(work, plan)
  elif atomic.read_json(work.job) != plan.fingerprint:
    raise ValueError(f"{work.root} was started for another input or "
                     "configuration; run --stage=scan first.")
  runner = Runner(config.runner, workers)
  logging.info("Prep of %s (%d events): %d buckets, %d shards, %d workers "
               "(%s)", events_path, num_rows, plan.num_buckets,
               config.num_shards, workers, config.runner)
  n = config.num_shards
  try:
    if stage in ("all", "scan"):
      units = _stage_units(range(plan.num_scan_units), shard_index, n,
                           lambda u: u % n)
      try:
        runner.map(scan.scan_unit,
                   [(work.root, plan, config, u) for u in units],
                   work_lib.Progress("scan", num_rows),
                   weight=lambda r: r.get("events", 0))
      except yambda.YambdaFormatError:
        shutil.rmtree(work.root, ignore_errors=True)  # nothing half-written
        raise
      if stage == "scan":
        return None
    scan_counts = scan.merge_scan_reports(
        [atomic.read_json(work.scan_report(u))
         for u in range(plan.num_scan_units)])
    split = _time_split(config, scan_counts)
    buckets = range(plan.num_buckets)
    if stage in ("all", "stats"):
      units = _stage_units(buckets, shard_index, n, lambda b: b % n)
      runner.map(stats.stats_unit,
                 [(work.root, split, config, b) for b in units],
                 work_lib.Progress("stats", num_rows))
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
        catalogue.build_catalogue(yambda_dir, work, plan.num_buckets, metadata,
                                  config.read_batch_rows,
                                  config.metadata_items)
      except yambda.YambdaFormatError:  # e.g. a NaN embedding
        shutil.rmtree(work.root, ignore_errors=True)  # nothing half-written
        raise
      logging.info("Catalogue written (%.1fs so far)", time.time() - started)
    if stage == "catalogue":
      return None
    if stage in ("all", "records"):
      units = _stage_units(buckets, shard_index, n, lambda b: b % n)
      runner.map(records.records_unit,
                 [(work.root, split, config, b) for b in units],
                 work_lib.Progress("records", num_rows))
      shards = _stage_units(range(n), shard_index, n, lambda s: s)
      runner.map(records.join_shard,
                 [(work.root, plan, n, s, list(rules.windows(split)))
                  for s in shards])
      if stage == "records":
        return None
    return finalize.finalize(work, plan, scan_counts, started)
  finally:
    runner.close()
