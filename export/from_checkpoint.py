r"""Exports a finished run's model from its checkpoint, in a process of its own.

  python -m export.from_checkpoint --flagfile=configs/demo.cfg \
      --workdir=/tmp/tfrs_yambda/demo

Takes the same flags as the main job (`tfrs_yambda.train`), which wrote
<workdir>/eval/results.json: its "model" entry names the checkpoint of the
model scored on the test day and the prepared data it was trained on. The
SavedModels go to <workdir>/export/ as the job's own export writes them, and
the "export" stage's cost joins results.json's "stages".

The main job runs this with --fresh_export_process: TensorFlow's CPU
allocator keeps what a process has freed for its own later tensors, so an
export in the process that trained and evaluated starts from evaluation's
high-water mark (19.2 GiB against 14.9 GiB in a fresh process, exporting
9.4M candidates of the 50m shape).
"""

import os

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from export import export
from tfrs_yambda import atomic
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import model as model_lib
from tfrs_yambda import schema
from tfrs_yambda import stage_meter
from tfrs_yambda import towers
from tfrs_yambda import train_flags

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The main job's flags: the towers, paths and export settings it ran."""
  train_flags.define_flags(flag_values)


def restore(checkpoint: str, catalogue: catalogue_lib.Catalogue,
            tower_config: towers.TowerConfig,
            retrieval: model_lib.RetrievalConfig) -> model_lib.TwoTowerModel:
  """The model of `checkpoint`, built as these configs and the catalogue say.

  Raises:
    AssertionError: a variable of the model has no value in the checkpoint
      (the configs describe another model than the one trained).
  """
  model = model_lib.TwoTowerModel(catalogue, tower_config, retrieval)
  # Both towers' variables exist before the restore, so that a missing one
  # is an error here, not a silently fresh initialisation.
  model.candidate_tower(tf.constant([0], tf.int64))
  model.query_tower({
      schema.USER_ID: tf.constant([0], tf.int64),
      schema.SEED_ITEM: tf.constant([0], tf.int64),
      schema.HISTORY_ITEMS: tf.zeros([1, catalogue.history_length], tf.int64),
  })
  # The optimizer's slots are in the checkpoint, not in an export.
  tf.train.Checkpoint(model=model).read(checkpoint).expect_partial(
      ).assert_existing_objects_matched()
  return model


def export_run(flag_values: flags.FlagValues = FLAGS) -> dict:
  """Exports <workdir>'s model; returns {"bruteforce": path, "scann": path}."""
  workdir = flag_values.workdir
  results_path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(results_path):
    raise FileNotFoundError(
        f"{results_path} does not exist: run the main job "
        "(python -m tfrs_yambda.train) with this --workdir first.")
  results = atomic.read_json(results_path)
  if "model" not in results:
    raise ValueError(f"{results_path} names no checkpoint: it was written "
                     "by an older version; rerun the main job.")
  meter = stage_meter.StageMeter()
  meter.stages.update(results.get("stages", {}))
  meter.stages.pop("export", None)  # replaced by this export's row
  folder = os.path.join(workdir, "export")
  with meter.stage("export", [folder]):
    catalogue = catalogue_lib.load(
        os.path.join(results["model"]["prepared_dir"], "catalogue"))
    model = restore(results["model"]["checkpoint"], catalogue,
                    train_flags.tower_config(flag_values),
                    train_flags.retrieval_config(flag_values))
    logging.info("Restored %s", results["model"]["checkpoint"])
    exported = export.export_all(model, catalogue, folder,
                                 flag_values.model_name,
                                 k=flag_values.export_k)
  results["stages"] = meter.stages
  atomic.write_json(results, results_path)
  for kind, path in exported.items():
    print(f"SavedModel ({kind}): {path}")
  print("\nStages (wall time, peak RSS of the process tree, disk written):\n"
        + meter.table())
  return exported


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  export_run()


if __name__ == "__main__":
  define_flags()
  flags.adopt_module_key_flags(train_flags)
  flags.mark_flag_as_required("workdir")
  app.run(main)
