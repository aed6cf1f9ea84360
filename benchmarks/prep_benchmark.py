r"""Throughput and peak memory of the out-of-core prep against the in-memory.

  python -m data_prep.generate --size=large --output_dir=/tmp/yambda_large
  python -m benchmarks.prep_benchmark --yambda_dir=/tmp/yambda_large \
      --size=large --work_dir=/tmp/prep_bench

Subsets are the users with the smallest uids (whole users, so every subset is
a valid dataset), sharing the large folder's embeddings and mappings. Each prep
runs as a fresh process, timed end to end (interpreter start and TensorFlow
import included), while a sampler sums the resident memory of its whole
process tree (the pool workers included) every 0.1 s; the largest single
process comes from getrusage. Prints a markdown table.
"""

import json
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Dict, List

from absl import app
from absl import flags
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data_prep import yambda
from tfrs_yambda import stage_meter

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this program's flags in `flag_values` (called by its main)."""
  fv = flag_values
  flags.DEFINE_string("yambda_dir", "/tmp/yambda_large",
                      "Generated large folder.", flag_values=fv)
  flags.DEFINE_string("size", "large", "flat/<size>/ of the input.",
                      flag_values=fv)
  flags.DEFINE_string("work_dir", "/tmp/prep_bench", "Subsets and outputs.",
                      flag_values=fv)
  flags.DEFINE_list("events", ["10000000", "50000000"],
                    "Subset sizes for the out-of-core prep (events; capped at "
                    "the input's size).", flag_values=fv)
  flags.DEFINE_list("baseline_events", ["10000000"],
                    "Subset sizes for the in-memory baseline.", flag_values=fv)
  flags.DEFINE_integer("num_workers", 0, "Workers of the out-of-core prep.",
                       flag_values=fv)
  flags.DEFINE_integer("bucket_events", 8_000_000, "Events per bucket.",
                       flag_values=fv)
  flags.DEFINE_integer("num_shards", 4, "Record shards.", flag_values=fv)
  flags.DEFINE_string("results", None, "Optional JSON file for the figures.",
                      flag_values=fv)


_METADATA = ("embeddings.parquet", "artist_item_mapping.parquet",
             "album_item_mapping.parquet")


def make_subset(root: str, size: str, events: int, out_root: str) -> int:
  """A Yambda folder with the smallest-uid users totalling about `events`."""
  path = yambda.multi_event_path(root, size)
  uid = pq.read_table(path, columns=["uid"]).column("uid").to_numpy()
  users, counts = np.unique(uid, return_counts=True)
  del uid
  if events >= counts.sum():
    return -1  # the whole input
  last_uid = int(users[np.searchsorted(np.cumsum(counts), events)])
  out = yambda.multi_event_path(out_root, size)
  if os.path.exists(out):
    return pq.ParquetFile(out).metadata.num_rows
  os.makedirs(os.path.dirname(out), exist_ok=True)
  for name in _METADATA:
    link = os.path.join(out_root, name)
    if not os.path.exists(link):
      os.symlink(os.path.abspath(os.path.join(root, name)), link)
  dataset = ds.dataset(path)
  with pq.ParquetWriter(out + ".tmp", dataset.schema) as writer:
    for batch in dataset.to_batches(filter=pc.field("uid") <= last_uid,
                                    batch_size=1_000_000):
      if batch.num_rows:
        writer.write_batch(batch)
  os.replace(out + ".tmp", out)
  return pq.ParquetFile(out).metadata.num_rows


def run_measured(command: List[str]) -> Dict[str, float]:
  """Runs a command; returns wall seconds and peak tree / process RSS."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  before = usage.ru_maxrss
  cpu_before = usage.ru_utime + usage.ru_stime
  started = time.time()
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  peak = [0]

  def sample():
    while proc.poll() is None:
      peak[0] = max(peak[0], stage_meter.tree_rss_bytes(proc.pid))
      time.sleep(0.1)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  _, stderr = proc.communicate()
  sampler.join()
  wall = time.time() - started
  if proc.returncode:
    raise RuntimeError(f"{command} failed:\n{stderr[-3000:]}")
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  after = usage.ru_maxrss
  # CPU seconds of the whole tree: on a shared machine, less noisy than wall.
  cpu = usage.ru_utime + usage.ru_stime - cpu_before
  return {"seconds": wall, "cpu_seconds": cpu,
          "peak_tree_rss_gib": peak[0] / 2**30,
          # ru_maxrss is the largest child so far; only a new maximum shows.
          "max_process_rss_gib": max(after, before) * 1024 / 2**30
                                 if after > before else float("nan")}


def _prep_command(module: str, root: str, out: str) -> List[str]:
  command = [sys.executable, "-m", module, f"--yambda_dir={root}",
             f"--size={FLAGS.size}", f"--output_dir={out}",
             f"--num_shards={FLAGS.num_shards}"]
  if module == "data_prep.prep":
    command += [f"--num_workers={FLAGS.num_workers}",
                f"--bucket_events={FLAGS.bucket_events}"]
  return command


def main(argv):
  del argv
  os.makedirs(FLAGS.work_dir, exist_ok=True)
  runs = [("in-memory (baseline)", "benchmarks.reference_prep", int(e))
          for e in FLAGS.baseline_events]
  runs += [("out-of-core", "data_prep.prep", int(e)) for e in FLAGS.events]
  rows = []
  for name, module, target in runs:
    root = os.path.join(FLAGS.work_dir, f"subset_{target}")
    events = make_subset(FLAGS.yambda_dir, FLAGS.size, target, root)
    if events < 0:
      root = FLAGS.yambda_dir
      events = pq.ParquetFile(yambda.multi_event_path(
          root, FLAGS.size)).metadata.num_rows
    out = os.path.join(FLAGS.work_dir, f"out_{module.split('.')[-1]}_{target}")
    figures = run_measured(_prep_command(module, root, out))
    figures.update(name=name, events=events,
                   events_per_second=events / figures["seconds"])
    with open(os.path.join(out, "prep_report.json")) as f:
      report = json.load(f)
    figures["train_examples"] = report["train_examples"]
    rows.append(figures)
    print(f"{name}: {events} events in {figures['seconds']:.1f}s "
          f"({figures['events_per_second'] / 1e6:.2f}M/s), peak tree RSS "
          f"{figures['peak_tree_rss_gib']:.2f} GiB", flush=True)
  print("\n| prep | events | wall s | events/s | CPU s | events per CPU s "
        "| peak RSS, all processes (GiB) | largest process (GiB) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['name']} | {r['events'] / 1e6:.1f}M | {r['seconds']:.1f} | "
          f"{r['events_per_second'] / 1e6:.2f}M | {r['cpu_seconds']:.0f} | "
          f"{r['events'] / max(r['cpu_seconds'], 1e-9) / 1e6:.2f}M | "
          f"{r['peak_tree_rss_gib']:.2f} | {r['max_process_rss_gib']:.2f} |")
  if FLAGS.results:
    with open(FLAGS.results, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
