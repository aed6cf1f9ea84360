r"""The main job: (generate) -> prep -> train -> evaluate -> export.

  python -m tfrs_yambda.train --flagfile=configs/demo.cfg

Windows, the Yambda authors' way: the model trains on the training window,
is evaluated on the validation day after every epoch (TensorBoard's eval/*),
and the epoch with the best validation --select_metric is kept; so are the
ItemKNN baseline's best neighbourhood size (--itemknn_neighbours) and, with
--history_bonus, --artist_prior and --successor_prior, the priors' sizes
(`tfrs_yambda.priors`). The test day
is scored once, at the end, by that model; with --retrain, by a model
retrained with the chosen settings (and epoch count) on everything before
the test gap (the authors' second stage), prepared without a validation
window into <prepared>_retrain. Nothing chooses anything on the test day.

Everything is written under --workdir (or the explicit paths):
  <workdir>/yambda/      the generated dataset (only with --generate)
  <workdir>/prepared/    catalogue + TFRecords (reused when up to date)
  <workdir>/logs/        TensorBoard: loss, learning rate, eval Recall@k,
                         logs/projector/: item embeddings for the Projector
  <workdir>/checkpoints/ the trained weights (checkpoints/retrain/: the
                         retrained model's); results.json's "model" names
                         the one scored on the test day
  <workdir>/eval/results.json  per window ("validation", "test"): next-track
                         Recall@k / NDCG@k / MRR, coverage and popularity of
                         model and baselines, and the Yambda protocol's
                         metrics ("yambda_protocol"); "selection": the epoch,
                         ItemKNN's neighbourhood size and the priors' sizes
                         chosen on the validation day; "stages": each
                         stage's wall time, peak memory and disk
  <workdir>/eval/recall_at_k.png  Recall@k against k for every retriever
  <workdir>/export/      SavedModels (BruteForce and ScaNN) for TF Serving

This module runs the stages in order. Its flags, and the stages' configs
they become (`data_prep.prep.config.PrepConfig`, `trainer.TrainConfig`,
`towers.TowerConfig`, `model.RetrievalConfig`, `input_pipeline.ExampleRule`),
are `tfrs_yambda.train_flags`; they are defined when this module runs as a
program, so importing it defines none.
"""

import dataclasses
import os
import subprocess
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from data_prep import generate
from data_prep import prep
from data_prep import yambda
from data_prep.prep import config as prep_config
from export import export
from tfrs_yambda import atomic
from tfrs_yambda import callbacks
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import evaluate
from tfrs_yambda import itemknn
from tfrs_yambda import plots
from tfrs_yambda import priors
from tfrs_yambda import projector
from tfrs_yambda import report
from tfrs_yambda import schema
from tfrs_yambda import stage_meter
from tfrs_yambda import train_flags
from tfrs_yambda import trainer
from tfrs_yambda import yambda_protocol

FLAGS = flags.FLAGS


def paths(flag_values: flags.FlagValues = FLAGS) -> dict:
  """The run's folders: --yambda_dir, --prepared_dir, under --workdir."""
  workdir = flag_values.workdir
  return {
      "yambda": flag_values.yambda_dir or os.path.join(workdir, "yambda"),
      "prepared": (flag_values.prepared_dir or
                   os.path.join(workdir, "prepared")),
      "logs": os.path.join(workdir, "logs"),
      "checkpoints": os.path.join(workdir, "checkpoints"),
      "backup": os.path.join(workdir, "backup"),
      "eval": os.path.join(workdir, "eval"),
      "export": os.path.join(workdir, "export"),
  }


def prepare_data(yambda_dir: str, size: str, prepared_dir: str,
                 config: prep_config.PrepConfig, generate_missing: bool,
                 generator_seed: int = 0,
                 meter: Optional[stage_meter.StageMeter] = None
                 ) -> catalogue_lib.Catalogue:
  """Generates and prepares the data unless up-to-date outputs exist.

  Args:
    yambda_dir: the Yambda folder.
    size: which flat/<size>/ to use.
    prepared_dir: where the prep writes (or has written) its output.
    config: the prep's settings.
    generate_missing: generate a dataset of `size` if the folder has none.
    generator_seed: the generated dataset's seed.
    meter: measures the "generate" and "prep" stages, when they run.

  Returns:
    The prepared data's catalogue: prepared data whose settings and source
    equal these is reused.
  """
  meter = meter or stage_meter.StageMeter()
  events = yambda.multi_event_path(yambda_dir, size)
  if not os.path.exists(events):
    if not generate_missing:
      raise FileNotFoundError(
          f"{events} does not exist: point --yambda_dir at a Yambda download "
          "or pass --generate to create a generated dataset.")
    logging.info("Generating the %s dataset into %s", size, yambda_dir)
    with meter.stage("generate", [yambda_dir]):
      generate.generate(yambda_dir, size, generator_seed)
  meta_path = os.path.join(prepared_dir, "catalogue", "metadata.json")
  if os.path.exists(meta_path):
    meta = atomic.read_json(meta_path)
    try:
      same_output = (prep_config.PrepConfig(**meta["prep_config"])
                     .output_dict() == config.output_dict())
    except (KeyError, TypeError):  # written by an older version
      same_output = False
    if same_output and meta.get("source") == os.path.abspath(events):
      logging.info("Reusing prepared data in %s", prepared_dir)
      return catalogue_lib.load(os.path.join(prepared_dir, "catalogue"))
  with meter.stage("prep", [prepared_dir]):
    prep.prepare(yambda_dir, size, prepared_dir, config)
  return catalogue_lib.load(os.path.join(prepared_dir, "catalogue"))


def score_window(model, catalogue, prepared_dir: str, window: str,
                 fitted_baselines, rule, ks, examples=None) -> dict:
  """Every retriever's metrics on one window, the Yambda protocol's too."""
  if examples is None:
    examples = evaluate.window_examples(catalogue, prepared_dir, window, rule,
                                        FLAGS.eval_examples)
  results = evaluate.evaluate(model, catalogue, prepared_dir, rule, ks,
                              window=window,
                              fitted_baselines=fitted_baselines,
                              test=examples)
  if FLAGS.yambda_protocol and (window == "test" or
                                FLAGS.validation_protocol):
    results["yambda_protocol"] = yambda_protocol.evaluate(
        model, catalogue, prepared_dir, rule, fitted_baselines,
        [int(k) for k in FLAGS.protocol_ks], test=examples, window=window)
    results["timings"]["yambda_protocol"] = (
        results["yambda_protocol"]["timings"]["total"])
  return results


def choose_itemknn(fitted_baselines, catalogue, examples, ks,
                   selection: dict) -> list:
  """The baselines with ItemKNN's neighbourhood chosen on the validation day.

  Like the model's epoch: each --itemknn_neighbours K is scored on the
  validation examples, and the best by --select_metric is kept. Records
  {"chosen": K, "by_k": {K: validation metric}} as
  selection["itemknn_neighbours"].
  """
  knn = next(b for b in fitted_baselines if b.name == itemknn.ItemKNN.name)
  chosen, by_k = itemknn.choose_neighbours(
      knn, evaluate.baseline_queries(examples), examples[schema.TARGET_ITEM],
      catalogue.num_candidates(evaluate.window_start(catalogue, "validation")),
      train_flags.itemknn_config().neighbours, FLAGS.select_metric, ks)
  selection["itemknn_neighbours"] = {
      "chosen": chosen.k, "by_k": {str(k): v for k, v in by_k.items()}}
  print(f"ItemKNN: {chosen.k} neighbours per item, chosen on the validation "
        f"day ({FLAGS.select_metric} by K: " + ", ".join(
            f"{k}: {v:.4f}" for k, v in by_k.items()) + ")")
  return [chosen if b is knn else b for b in fitted_baselines]


def save_model(model, folder: str, step: int, prepared_dir: str) -> dict:
  """Checkpoints the model; returns results.json's "model" entry: the
  checkpoint and the prepared data it was trained on (for
  `export.from_checkpoint`)."""
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       folder, max_to_keep=3)
  return {"checkpoint": manager.save(checkpoint_number=step),
          "prepared_dir": os.path.abspath(prepared_dir)}


def train_and_evaluate():
  """Runs the whole job; returns (results, export paths) on the chief."""
  tf.keras.utils.set_random_seed(FLAGS.seed)
  strategy = trainer.distribution_strategy()
  chief = trainer.is_chief(strategy)
  folders = paths()
  config = train_flags.train_config()
  meter = stage_meter.StageMeter()
  if strategy.num_replicas_in_sync > 1 and not os.path.exists(
      os.path.join(folders["prepared"], "catalogue", "metadata.json")):
    raise FileNotFoundError(
        f"Multi-worker training reads prepared data; run data_prep.prep into "
        f"{folders['prepared']} first so that workers do not race to write "
        "it.")

  def prepare(prepared_dir, data_config):
    return prepare_data(folders["yambda"], FLAGS.size, prepared_dir,
                        data_config, FLAGS.generate, FLAGS.generator_seed,
                        meter)

  def train(catalogue, prepared_dir, epochs=None, stage=""):
    with meter.stage("train", [folders["logs"], folders["checkpoints"]]):
      return trainer.train_model(
          config, catalogue, prepared_dir, train_flags.tower_config(),
          train_flags.retrieval_config(), train_flags.example_rule(catalogue),
          logs_dir=folders["logs"],
          backup_dir=folders["backup"],
          checkpoints_dir=folders["checkpoints"],
          strategy=strategy, chief=chief, epochs=epochs, stage=stage,
          hparams=train_flags.hparams(catalogue))

  catalogue = prepare(folders["prepared"], prep_config.from_flags())
  rule = train_flags.example_rule(catalogue)
  ks = list(config.eval_ks)
  if FLAGS.retrain and not evaluate.has_validation(catalogue):
    raise app.UsageError("--retrain needs a validation window to choose on "
                         "(--validation_window_seconds > 0).")
  if FLAGS.retrain and strategy.num_replicas_in_sync > 1:
    # Only the chief goes on after the first stage; a second fit needs every
    # worker. Run the second stage as its own multi-worker job instead.
    raise app.UsageError(
        "--retrain runs on one machine; with several workers, prepare with "
        "--validation_window_seconds=0 and train with --epochs=<the epoch "
        "chosen on the validation day> as a second job.")
  model, selection = train(catalogue, folders["prepared"])
  if not chief:
    return None, None
  examples = None
  with meter.stage("evaluate", [folders["eval"]]):
    if evaluate.has_validation(catalogue):
      examples = evaluate.window_examples(catalogue, folders["prepared"],
                                          "validation", rule,
                                          FLAGS.eval_examples)
    fitted_baselines = evaluate.fit_baselines(
        catalogue, folders["prepared"], rule, FLAGS.recent_half_life_days,
        train_flags.itemknn_config(), FLAGS.baseline_shards)
    priors.fit(model, catalogue, fitted_baselines)
    if examples is not None:
      selection.update(priors.choose(
          model, catalogue, examples, ks, FLAGS.history_bonus_metric,
          [float(x) for x in FLAGS.history_bonus_scales],
          [float(x) for x in FLAGS.history_bonus_half_lives],
          [float(x) for x in FLAGS.artist_prior_masses],
          # --noyambda_protocol: the protocol is not run, nor chosen by.
          FLAGS.artist_prior_protocol_metric if FLAGS.yambda_protocol else "",
          lambda: yambda_protocol.evaluate(
              model, catalogue, folders["prepared"], rule,
              ks=[int(k) for k in FLAGS.protocol_ks],
              window="validation")["retrievers"]["model"],
          [float(x) for x in FLAGS.successor_prior_masses]))
    elif export.has_priors(model.query_tower):
      logging.warning("No validation window to size the priors on: they "
                      "stay 0 (off).")

  results = {"selection": selection, "stages": meter.stages,
             "model": save_model(model, folders["checkpoints"],
                                 selection["train_steps"],
                                 folders["prepared"])}
  results_path = os.path.join(folders["eval"], "results.json")
  with meter.stage("evaluate", [folders["eval"]]):
    # Without a validation window, ItemKNN keeps its largest neighbourhood.
    selection["itemknn_neighbours"] = {
        "chosen": max(train_flags.itemknn_config().neighbours), "by_k": {}}
    if examples is not None:
      fitted_baselines = choose_itemknn(fitted_baselines, catalogue,
                                        examples, ks, selection)
      results["validation"] = score_window(
          model, catalogue, folders["prepared"], "validation",
          fitted_baselines, rule, ks, examples)
      callbacks.log_final_metrics(os.path.join(folders["logs"], "metrics"),
                                  selection["train_steps"],
                                  results["validation"]["model"])
      print(report.window_report(results["validation"], ks, "validation"))

  if FLAGS.retrain:
    # The authors' second stage: the chosen settings and epoch count, trained
    # on everything before the test gap.
    prepared = folders["prepared"].rstrip("/") + "_retrain"
    catalogue = prepare(prepared, dataclasses.replace(
        prep_config.from_flags(), validation_window_seconds=0))
    rule = train_flags.example_rule(catalogue)
    tf.keras.utils.set_random_seed(FLAGS.seed)
    model, results["retrain"] = train(catalogue, prepared,
                                      epochs=selection["epoch"],
                                      stage="retrain")
    with meter.stage("evaluate", [folders["eval"]]):
      fitted_baselines = evaluate.fit_baselines(
          catalogue, prepared, rule, FLAGS.recent_half_life_days,
          train_flags.itemknn_config(
              neighbours=[selection["itemknn_neighbours"]["chosen"]]),
          FLAGS.baseline_shards)
      priors.fit(model, catalogue, fitted_baselines)
      priors.restore(model, selection)
    results["model"] = save_model(
        model, os.path.join(folders["checkpoints"], "retrain"),
        results["retrain"]["train_steps"], prepared)
  else:
    prepared = folders["prepared"]
  with meter.stage("evaluate", [folders["eval"]]):
    # The one scoring of the test day.
    results["test"] = score_window(model, catalogue, prepared, "test",
                                   fitted_baselines, rule, ks)
    atomic.write_json(results, results_path)
    plot_path = os.path.join(folders["eval"], "recall_at_k.png")
    plots.write_recall_plot(
        results["test"]["recall_curve"], plot_path,
        title=f"Next-track Recall@k on the test day over "
              f"{results['test']['candidates']['authors']} items")
  print(report.window_report(results["test"], ks, "test"))
  print(f"\nRecall@k plot: {plot_path}")
  # Dropped before the export, whose peak is the model's and the indices':
  # nothing after this reads the baselines or the windows' examples.
  fitted_baselines = examples = None
  if FLAGS.projector_items > 0:
    with meter.stage("projector"):
      folder = projector.write(model, catalogue, folders["logs"],
                               FLAGS.projector_items)
    print(f"Item embeddings for TensorBoard's Projector tab: {folder}")

  exported = {}
  if FLAGS.export:
    with meter.stage("export", [folders["export"]]):
      exported = export.export_all(model, catalogue, folders["export"],
                                   FLAGS.model_name, k=FLAGS.export_k)
    for kind, path in exported.items():
      print(f"SavedModel ({kind}): {path}")
  # Again, now with every stage's cost.
  atomic.write_json(results, results_path)
  print("\nStages (wall time, peak RSS of the process tree, disk written):\n"
        + meter.table())
  print(f"TensorBoard: tensorboard --logdir {folders['logs']}")
  return results, exported


def run_in_two_processes(args) -> int:
  """--fresh_export_process: the job without its export in one process,
  then `export.from_checkpoint` in another; returns the exit status.

  TensorFlow's CPU allocator keeps what a process frees for that process's
  later tensors, so each process's peak is its own stages', not the sum.
  Both get this command line (`args`); later flags override earlier ones.
  With several workers (TF_CONFIG), each runs the job and the chief exports.
  """
  stages = [("tfrs_yambda.train", ["--nofresh_export_process", "--noexport"])]
  if trainer.is_chief():
    stages.append(("export.from_checkpoint", []))
  for module, extra in stages:
    status = subprocess.run([sys.executable, "-m", module, *args, *extra],
                            check=False).returncode
    if status:
      logging.error("%s exited with status %d", module, status)
      return status
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  np.set_printoptions(precision=4)
  if FLAGS.export and FLAGS.fresh_export_process:
    sys.exit(run_in_two_processes(sys.argv[1:]))
  train_and_evaluate()


if __name__ == "__main__":
  train_flags.define_flags()
  # Listed by --helpshort, as flags of this program.
  flags.adopt_module_key_flags(train_flags)
  flags.mark_flag_as_required("workdir")
  app.run(main)
