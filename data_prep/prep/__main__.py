r"""Raw Yambda folder -> item catalogue + TFRecord shards, out of core.

  python -m data_prep.prep --yambda_dir=/data/yambda --size=500m \
      --output_dir=/data/prepared/500m [--num_workers=16] [--prep_runner=spark]

One machine per shard over a shared folder: run --stage=scan, then stats,
then records with --shard_index=i on every machine, --stage=catalogue once
after stats, and --stage=finalize once at the end. What the prep decides and
how it runs: see `data_prep.prep`.
"""

from absl import app
from absl import flags

from data_prep.prep import config as config_lib
from data_prep.prep import runner

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The program's flags: input, output, stage, and the config's fields."""
  flags.DEFINE_string("yambda_dir", None, "Folder with the Yambda layout.")
  flags.DEFINE_string("size", "50m", "Which flat/<size>/ to read.")
  flags.DEFINE_string("output_dir", None, "Where the prepared data goes.")
  flags.DEFINE_enum("stage", "all", list(runner.STAGES),
                    "Run every pass (all), or one pass for a multi-machine "
                    "run.")
  flags.DEFINE_integer("shard_index", -1,
                       "With --stage=scan/stats/records: only this shard's "
                       "units (-1: all).")
  config_lib.define_flags()
  # `--help` lists the config's flags with this program's own.
  flags.adopt_module_key_flags(config_lib)
  flags.mark_flags_as_required(["yambda_dir", "output_dir"])


def main(argv):
  del argv
  runner.prepare(FLAGS.yambda_dir, FLAGS.size, FLAGS.output_dir,
                 config_lib.from_flags(), stage=FLAGS.stage,
                 shard_index=FLAGS.shard_index)


if __name__ == "__main__":
  define_flags()
  app.run(main)
