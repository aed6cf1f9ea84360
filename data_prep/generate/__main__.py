"""Writes a generated dataset in the raw Yambda layout, with its oracle.

Usage:
  python -m data_prep.generate --size=demo --output_dir=/tmp/gen_demo \
      [--seed=0] [--workers=N]
"""

from typing import List

from absl import app
from absl import flags

from data_prep.generate import run
from data_prep.generate import sizes

_SIZE = flags.DEFINE_enum("size", "demo", list(sizes.SIZES), "Dataset size.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where to write the dataset.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_WORKERS = flags.DEFINE_integer(
    "workers", None, "Processes for the sizes that run in parallel (50m, "
    "500m); default: every core. The files do not depend on it.")
flags.mark_flag_as_required("output_dir")


def main(argv: List[str]) -> None:
  del argv
  run.generate(_OUTPUT_DIR.value, _SIZE.value, _SEED.value, _WORKERS.value)


if __name__ == "__main__":
  app.run(main)
