r"""Exact ranking over millions of candidates: evaluation's kernel, timed.

  python -m benchmarks.ranking_benchmark [--num_items=3000000] \
      [--batch_sizes=32,64] [--repeats=15]

Times, on random embeddings of width --dim, the two calls evaluation makes
for a batch of queries: `ranking.top_k` with k=100 (the Yambda protocol's
lists) and `ranking.target_ranks` with k=500 (next-track evaluation's ranks
and top lists), three ways:

  * rows, -inf pass: a [n, d] table, transposed inside the matrix product,
    and a bound of +inf, so that every score goes through `scores`' -inf
    pass; one `tf.math.top_k` (what evaluation did first);
  * columns: [d, n], the -inf pass skipped when every score is sure to be
    finite; one `tf.math.top_k`;
  * columns, two-step top-k: the top-k of `chunked_top_k` (what evaluation
    does now).

Prints the median milliseconds a query of each, the ratio of the last two,
and whether all three gave the same ranks and lists (they must).
"""

import os
import statistics
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# pylint: disable=g-import-not-at-top
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from tfrs_yambda import chunked_top_k
from tfrs_yambda import ranking

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  flags.DEFINE_integer("num_items", 3_000_000, "Candidates.",
                       flag_values=flag_values)
  flags.DEFINE_integer("dim", 64, "Embedding width.", flag_values=flag_values)
  flags.DEFINE_list("batch_sizes", ["32", "64"], "Queries per batch.",
                    flag_values=flag_values)
  flags.DEFINE_integer("repeats", 15, "Timed batches per measurement (one "
                       "more is run first, untimed).", flag_values=flag_values)


def _timed(call, batches):
  """(median seconds of `call` over the batches after the first, outputs)."""
  seconds, outputs = [], []
  for i, batch in enumerate(batches):
    started = time.perf_counter()
    out = tf.nest.map_structure(lambda t: t.numpy(), call(*batch))
    if i:
      seconds.append(time.perf_counter() - started)
    outputs.append(out)
  return statistics.median(seconds), outputs


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  candidates = tf.constant(
      rng.normal(size=(FLAGS.num_items, FLAGS.dim)).astype(np.float32))
  columns = ranking.candidate_table(candidates)
  ways = {  # (table, chunk of the top-k)
      "rows, -inf pass": (ranking.CandidateTable(
          candidates, False, tf.constant(np.inf)), 0),
      "columns": (columns, 0),
      "columns, two-step top-k": (columns, chunked_top_k.CHUNK),
  }
  print(f"{FLAGS.num_items:,} candidates of width {FLAGS.dim}, "
        f"{FLAGS.repeats} timed batches each\n")
  print("| call | queries a batch | "
        + " | ".join(f"{way} (ms a query)" for way in ways)
        + " | ratio | same output |")
  print("|---|---:|" + "---:|" * (len(ways) + 1) + "---|")
  for batch_size in (int(b) for b in FLAGS.batch_sizes):
    batches = [(tf.constant(rng.normal(size=(batch_size, FLAGS.dim)),
                            tf.float32),
                tf.constant(rng.integers(0, FLAGS.num_items, batch_size),
                            tf.int64))
               for _ in range(FLAGS.repeats + 1)]
    calls = {
        "top_k, k=100": lambda table, chunk: (
            lambda q, _: ranking.top_k(q, table, 100, chunk)),
        "target_ranks, k=500": lambda table, chunk: (
            lambda q, t: ranking.target_ranks(q, table, t, 500, chunk)),
    }
    for name, call in calls.items():
      timed = [_timed(call(*way), batches) for way in ways.values()]
      first = timed[0][1]
      same = all(np.array_equal(a, b) for _, outputs in timed[1:]
                 for x, y in zip(first, outputs)
                 for a, b in zip(tf.nest.flatten(x), tf.nest.flatten(y)))
      cells = " | ".join(f"{1000 * seconds / batch_size:.2f}"
                         for seconds, _ in timed)
      print(f"| {name} | {batch_size} | {cells} | "
            f"{timed[1][0] / timed[2][0]:.2f} | {same} |", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
