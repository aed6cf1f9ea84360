"""Pass 5, finalize: the report, then the work folder becomes the output.

prep_report.json counts everything kept and dropped, with reasons: the scan's
counts, the catalogue's and every bucket's records. The work files are
removed and <output_dir>.tmp is renamed to <output_dir>, so an output folder
is always complete.
"""

import os
import shutil
import time
from typing import Any, Dict

from absl import logging

from data_prep.prep import work as work_lib
from tfrs_yambda import atomic


def finalize(work: work_lib.Work, plan: work_lib.Plan, scan: Dict[str, Any],
             started: float) -> Dict[str, Any]:
  """Writes prep_report.json and renames the work folder into place.

  Args:
    work: the work folder, with catalogue and records complete.
    plan: the job.
    scan: the merged scan counts (`scan.merge_scan_reports`).
    started: when the prep started (time.time()), for the timing figures.

  Returns:
    The report.
  """
  report = atomic.read_json(os.path.join(work.catalogue, "counts.json"))
  report.update({k: v for k, v in scan.items()
                 if not k.startswith("listen_timestamp")})
  for bucket in range(plan.num_buckets):
    done = atomic.read_json(work.done("records", bucket))
    for key, value in done.items():
      if key != "events":
        report[key] = report.get(key, 0) + value
  report["dropped_rows_by_reason"] = {
      "explicit_event_without_earlier_listen_of_the_track": report[
          "explicit_events_dropped_no_earlier_listen"],
      "duplicate_event_first_row_kept": report["duplicate_events_dropped"],
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
  atomic.write_json(report, work.path("prep_report.json"))
  if os.path.exists(work.output_dir):
    shutil.rmtree(work.output_dir)
  os.replace(work.root, work.output_dir)
  logging.info("Prepared %s in %.1fs (%.2fM events/s): %s", work.output_dir,
               report["seconds"], report["events_per_second"] / 1e6,
               ", ".join(f"{report[k]} {k[:-len('_examples')]}"
                         for k in ("train_examples", "validation_examples",
                                   "test_examples") if k in report))
  return report
