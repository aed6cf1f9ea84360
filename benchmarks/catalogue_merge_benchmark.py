r"""The prep's catalogue merge: batched (now) vs one sort per bucket (before).

  python -m benchmarks.catalogue_merge_benchmark [--buckets=60]

Writes --buckets synthetic bucket-stats files of --keys_per_bucket distinct
(item, length) keys drawn from --key_universe, then merges them with
`data_prep.prep.catalogue.merge_stats` and with the previous loop, which
sorted the whole merged set again after every bucket. Both results are
checked equal.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from data_prep.prep import catalogue as prep_catalogue
from data_prep.prep import stats as prep_stats
from data_prep.prep import work as work_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this program's flags in `flag_values` (called by its main)."""
  fv = flag_values
  flags.DEFINE_integer("buckets", 60, "Bucket stats files.", flag_values=fv)
  flags.DEFINE_integer("keys_per_bucket", 500_000, "Keys drawn per bucket.",
                       flag_values=fv)
  flags.DEFINE_integer("key_universe", 8_000_000, "Distinct keys possible.",
                       flag_values=fv)


def per_bucket_sort(work, num_buckets):
  """The merge before: one full sort of everything merged so far per bucket."""
  keys = np.zeros(0, np.uint64)
  listens = train = np.zeros(0, np.int64)
  for bucket in range(num_buckets):
    with np.load(work.bucket_stats(bucket)) as z:
      keys, listens, train = prep_stats.reduce_keys(
          np.concatenate([keys, z["keys"]]),
          np.concatenate([listens, z["key_listens"]]),
          np.concatenate([train, z["key_train"]]))
  return keys, listens, train


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    work = work_lib.Work(os.path.join(tmp, "out"))
    for bucket in range(FLAGS.buckets):
      keys = np.unique(rng.integers(0, FLAGS.key_universe,
                                    FLAGS.keys_per_bucket).astype(np.uint64))
      path = work.bucket_stats(bucket)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      np.savez(path, keys=keys, key_listens=np.ones(len(keys), np.int64),
               key_train=np.ones(len(keys), np.int64),
               uids=np.array([bucket]), user_train=np.ones(1, np.int64),
               counts="{}")
    results = {}
    for name, merge in (
        ("one sort per bucket (before)", per_bucket_sort),
        ("batched (merge_stats)",
         lambda w, n: prep_catalogue.merge_stats(w, n)[:3])):
      start = time.perf_counter()
      results[name] = merge(work, FLAGS.buckets)
      print(f"{name:<30} {time.perf_counter() - start:6.1f} s  "
            f"{len(results[name][0]):,} keys", flush=True)
    before, now = results.values()
    for a, b in zip(before, now):
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  define_flags()
  app.run(main)
