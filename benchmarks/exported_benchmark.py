r"""The job's exported SavedModels as they are: recall, latency, queries/s.

  python -m benchmarks.exported_benchmark --workdir=/tmp/tfrs_yambda/demo

Loads the latest `<model_name>_bruteforce` and `<model_name>_scann` versions
under <workdir>/export, one at a time (at 9.4M candidates each holds the
4.9 GB content table), and measures them on raw-id requests of
--num_queries validation examples as `ann_benchmark` measures its SavedModel
rows: ScaNN's recall@k against BruteForce's lists for the same requests
(BruteForce is exact), single-query p50/p99 and batch queries/s. Nothing is
padded or rebuilt; `ann_benchmark` is for other catalogue sizes and
settings. Its flags apply here; nothing is built ("build s" is 0).
"""

import os
import time
from typing import Dict, List

from absl import app
import numpy as np

from benchmarks import ann_benchmark
from export import export  # Sets TF_USE_LEGACY_KERAS before TF is imported.
import tensorflow as tf  # pylint: disable=g-bad-import-order
from tfrs_yambda import catalogue as catalogue_lib

FLAGS = ann_benchmark.FLAGS
define_flags = ann_benchmark.define_flags


def exported_rows(export_dir: str, model_name: str,
                  requests: Dict[str, np.ndarray]) -> List[Dict]:
  """Rows of the latest exported BruteForce and ScaNN SavedModels."""
  saved = []
  for kind in ("bruteforce", "scann"):
    model_dir = os.path.join(export_dir, f"{model_name}_{kind}")
    path = os.path.join(model_dir, str(export.next_version(model_dir) - 1))
    print(f"{kind}: {path}", flush=True)
    saved.append((f"exported SavedModel {kind}", path, 0.0))
  # BruteForce first: it is exact, so its lists are the truth.
  return ann_benchmark.savedmodel_rows(saved, requests)


def main(argv):
  del argv
  started = time.perf_counter()
  tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
  tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
  prepared = os.path.join(FLAGS.workdir, "prepared")
  catalogue = catalogue_lib.load(os.path.join(prepared, "catalogue"))
  requests = ann_benchmark.load_requests(
      prepared, catalogue, catalogue.item_ids, FLAGS.num_queries,
      np.random.default_rng(FLAGS.seed))
  rows = exported_rows(os.path.join(FLAGS.workdir, "export"),
                       FLAGS.model_name, requests)
  print(f"\n{ann_benchmark.format_table(rows, rows[0]['method'])}\n\n"
        f"Total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
