r"""The main job: (generate) -> prep -> train -> evaluate -> export.

  python -m tfrs_yambda.train --flagfile=configs/demo.cfg

Windows, the Yambda authors' way: the model trains on the training window,
is evaluated on the validation day after every epoch (TensorBoard's eval/*),
and the epoch with the best validation --select_metric is kept. The test day
is scored once, at the end, by that model; with --retrain, by a model
retrained with the chosen settings (and epoch count) on everything before
the test gap (the authors' second stage), prepared without a validation
window into <prepared>_retrain. Nothing chooses anything on the test day.

Everything is written under --workdir (or the explicit paths):
  <workdir>/yambda/      the generated dataset (only with --generate)
  <workdir>/prepared/    catalogue + TFRecords (reused when up to date)
  <workdir>/logs/        TensorBoard: loss, learning rate, eval Recall@k,
                         logs/projector/: item embeddings for the Projector
  <workdir>/checkpoints/ the trained weights
  <workdir>/eval/results.json  per window ("validation", "test"): next-track
                         Recall@k / NDCG@k / MRR, coverage and popularity of
                         model and baselines, and the Yambda protocol's
                         metrics ("yambda_protocol"); "selection": the epoch
                         chosen on the validation day
  <workdir>/eval/recall_at_k.png  Recall@k against k for every retriever
  <workdir>/export/      SavedModels (BruteForce and ScaNN) for TF Serving
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from data_prep import generate
from data_prep import prep
from data_prep import yambda
from export import export
from tfrs_yambda import callbacks
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import model as model_lib
from tfrs_yambda import plots
from tfrs_yambda import projector
from tfrs_yambda import towers
from tfrs_yambda import yambda_protocol

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Where everything this run produces goes.")
flags.DEFINE_string("yambda_dir", None,
                    "Yambda folder (default: <workdir>/yambda).")
flags.DEFINE_string("size", "demo", "Which flat/<size>/ to use.")
flags.DEFINE_bool("generate", False,
                  "Generate a Yambda-layout dataset of --size into --yambda_dir "
                  "if it is not there (sizes: tiny, demo, large).")
flags.DEFINE_integer("generator_seed", 0, "Seed of the generated dataset.")
flags.DEFINE_string("prepared_dir", None,
                    "Prepared data (default: <workdir>/prepared).")
prep.define_config_flags()

flags.DEFINE_integer("batch_size", 1024, "Training batch (= in-batch negatives).")
flags.DEFINE_integer("epochs", 3, "Passes over the training examples.")
flags.DEFINE_enum("optimizer", "adam", ["adam", "adagrad"], "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_float("warmup_fraction", 0.05,
                   "Share of steps with a linear learning-rate warm-up; the "
                   "rest decays by cosine.")
flags.DEFINE_float("temperature", 0.05, "Softmax temperature (unit vectors).")
flags.DEFINE_bool("logq_correction", True,
                  "Correct in-batch scores by log sampling probability.")
flags.DEFINE_integer("uniform_negatives", 0,
                     "Negatives per step drawn uniformly from the catalogue "
                     "besides the in-batch ones (mixed negative sampling); "
                     "0: in-batch only.")
flags.DEFINE_enum("uniform_pool", "trained", list(model_lib.UNIFORM_POOLS),
                  "Draw uniform negatives from all items, or only those with "
                  "an id row of their own ('trained').")
flags.DEFINE_enum("sampling_probability", "counts",
                  list(model_lib.SAMPLING_PROBABILITIES),
                  "Target frequencies of the logQ correction: the prepared "
                  "training counts, or estimated while training (Yi et al. "
                  "2019).")
flags.DEFINE_float("frequency_alpha", 0.01,
                   "Moving-average rate of the streaming frequency estimate.")
flags.DEFINE_integer("frequency_buckets", 0,
                     "Hash buckets of the streaming frequency estimate "
                     "(item index mod buckets); 0: one per item.")
flags.DEFINE_integer("shuffle_buffer", 100_000, "Examples in the shuffle buffer.")
flags.DEFINE_integer("item_id_dim", 64, "Item id embedding width.")
flags.DEFINE_integer("artist_dim", 32, "Artist embedding width.")
flags.DEFINE_integer("album_dim", 32, "Album embedding width.")
flags.DEFINE_integer("user_dim", 32, "User embedding width.")
flags.DEFINE_integer("hidden_dim", 256, "Hidden layer width of each tower.")
flags.DEFINE_integer("output_dim", 64, "Query / candidate embedding width.")
flags.DEFINE_integer("recent_history", 0,
                     "Also pool the latest this many history items on their "
                     "own (0: only the whole history's mean).")
flags.DEFINE_integer("min_item_count", 1,
                     "Items with fewer training positives share one id row.")
flags.DEFINE_integer("min_user_count", 1,
                     "Users with fewer training positives share one id row.")
flags.DEFINE_bool("use_user_id", True, "Ablation switch: user id embedding.")
flags.DEFINE_bool("use_seed", True, "Ablation switch: seed-track features.")
flags.DEFINE_bool("use_history", True, "Ablation switch: history features.")
flags.DEFINE_bool("use_audio", True, "Ablation switch: audio embeddings.")
flags.DEFINE_bool("use_artist_album", True,
                  "Ablation switch: artist and album embeddings.")
flags.DEFINE_bool("use_example_age", True, "Ablation switch: example age.")
flags.DEFINE_integer("max_played_ratio", 200,
                     "Played-ratio cap (percent) in the example weight.")
flags.DEFINE_float("like_weight", 2.0, "Weight multiplier of liked listens.")
flags.DEFINE_bool("use_example_weights", True,
                  "Weight examples by played ratio and likes (else all 1).")
flags.DEFINE_list("eval_ks", ["10", "100", "500"], "Recall@k cut-offs.")
flags.DEFINE_float("recent_half_life_days", 7.0,
                   "Half-life of the recent-popularity baseline.")
flags.DEFINE_bool("yambda_protocol", True,
                  "Also score the Yambda authors' protocol: one query per "
                  "user from their state at the end of training, all their "
                  "test-window Listen+ items relevant.")
flags.DEFINE_list("protocol_ks", [str(k) for k in yambda_protocol.DEFAULT_KS],
                  "Cut-offs of the Yambda protocol (its top list is max k).")
flags.DEFINE_integer("projector_items", 20_000,
                     "Items written for TensorBoard's embedding projector "
                     "(most popular first, up to a tenth cold); 0: none.")
flags.DEFINE_bool("eval_every_epoch", True,
                  "Evaluate the model on the validation day after every "
                  "epoch (TensorBoard), and keep the best epoch.")
flags.DEFINE_string("select_metric", "recall@100",
                    "Validation metric that chooses the epoch to keep.")
flags.DEFINE_bool("retrain", False,
                  "The authors' second stage: after choosing on the "
                  "validation day, retrain with the chosen settings and "
                  "epoch count on everything before the test gap, and score "
                  "the test day with that model.")
flags.DEFINE_integer("checkpoint_every_steps", 500,
                     "Steps between backups an interrupted run resumes from.")
flags.DEFINE_list("profile_steps", [],
                  "Two step numbers FIRST,LAST: trace those training steps "
                  "with TensorFlow's profiler into <workdir>/logs/plugins "
                  "(TensorBoard's Profile tab, which needs "
                  "`pip install tensorboard-plugin-profile`).")
flags.DEFINE_bool("export", True, "Write the SavedModels after training.")
flags.DEFINE_integer("export_k", 100, "Items returned by the SavedModels.")
flags.DEFINE_string("model_name", "yambda", "Served model name prefix.")
flags.DEFINE_integer("seed", 42, "Seed of initialisation and shuffling.")


def _paths():
  workdir = FLAGS.workdir
  return {
      "yambda": FLAGS.yambda_dir or os.path.join(workdir, "yambda"),
      "prepared": FLAGS.prepared_dir or os.path.join(workdir, "prepared"),
      "logs": os.path.join(workdir, "logs"),
      "checkpoints": os.path.join(workdir, "checkpoints"),
      "backup": os.path.join(workdir, "backup"),
      "eval": os.path.join(workdir, "eval"),
      "export": os.path.join(workdir, "export"),
  }


def prepare_data(paths, prepared_dir: str = None,
                 config: prep.PrepConfig = None) -> catalogue_lib.Catalogue:
  """Generates and prepares the data unless up-to-date outputs exist."""
  prepared_dir = prepared_dir or paths["prepared"]
  events = yambda.multi_event_path(paths["yambda"], FLAGS.size)
  if not os.path.exists(events):
    if not FLAGS.generate:
      raise FileNotFoundError(
          f"{events} does not exist: point --yambda_dir at a Yambda download "
          "or pass --generate to create a generated dataset.")
    logging.info("Generating the %s dataset into %s", FLAGS.size,
                 paths["yambda"])
    generate.generate(paths["yambda"], FLAGS.size, FLAGS.generator_seed)
  config = config or prep.config_from_flags()
  meta_path = os.path.join(prepared_dir, "catalogue", "metadata.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    try:
      same_output = (prep.PrepConfig(**meta["prep_config"]).output_dict() ==
                     config.output_dict())
    except (KeyError, TypeError):  # written by an older version
      same_output = False
    if same_output and meta.get("source") == os.path.abspath(events):
      logging.info("Reusing prepared data in %s", prepared_dir)
      return catalogue_lib.load(os.path.join(prepared_dir, "catalogue"))
  prep.prepare(paths["yambda"], FLAGS.size, prepared_dir, config)
  return catalogue_lib.load(os.path.join(prepared_dir, "catalogue"))


def example_rule(catalogue) -> input_pipeline.ExampleRule:
  return input_pipeline.ExampleRule(
      min_played_ratio=catalogue.metadata["min_played_ratio"],
      max_played_ratio=FLAGS.max_played_ratio,
      like_weight=FLAGS.like_weight,
      use_weights=FLAGS.use_example_weights)


def tower_config() -> towers.TowerConfig:
  return towers.TowerConfig(
      item_id_dim=FLAGS.item_id_dim, artist_dim=FLAGS.artist_dim,
      album_dim=FLAGS.album_dim, user_dim=FLAGS.user_dim,
      hidden_dim=FLAGS.hidden_dim, output_dim=FLAGS.output_dim,
      recent_history=FLAGS.recent_history,
      min_item_count=FLAGS.min_item_count,
      min_user_count=FLAGS.min_user_count,
      use_user_id=FLAGS.use_user_id, use_seed=FLAGS.use_seed,
      use_history=FLAGS.use_history, use_audio=FLAGS.use_audio,
      use_artist_album=FLAGS.use_artist_album,
      use_example_age=FLAGS.use_example_age)


# Flags recorded in TensorBoard's HParams dashboard, to compare runs.
_HPARAM_FLAGS = ("batch_size", "epochs", "optimizer", "learning_rate",
                 "temperature", "logq_correction", "uniform_negatives",
                 "uniform_pool",
                 "sampling_probability", "frequency_alpha",
                 "frequency_buckets", "use_example_weights",
                 "use_user_id", "use_seed", "use_history", "use_audio",
                 "use_artist_album", "use_example_age", "min_item_count",
                 "min_user_count", "history_length", "output_dim",
                 "recent_history")


def hparams():
  return {name: FLAGS[name].value for name in _HPARAM_FLAGS}


class WarmupCosine(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to `peak`, then cosine decay to zero at `total_steps`."""

  def __init__(self, peak: float, total_steps: int, warmup_steps: int):
    self.peak = peak
    self.total_steps = max(total_steps, 1)
    self.warmup_steps = max(warmup_steps, 1)
    self._cosine = tf.keras.optimizers.schedules.CosineDecay(
        peak, max(self.total_steps - self.warmup_steps, 1))

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = self.peak * (step + 1.0) / self.warmup_steps
    return tf.where(step < self.warmup_steps, warm,
                    self._cosine(step - self.warmup_steps))

  def get_config(self):
    return {"peak": self.peak, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps}


def _profile_batches():
  """--profile_steps as TensorBoard's `profile_batch` (0: no profiling)."""
  if not FLAGS.profile_steps:
    return 0
  steps = [int(step) for step in FLAGS.profile_steps]
  if len(steps) != 2 or not 0 < steps[0] <= steps[1]:
    raise app.UsageError(f"--profile_steps takes FIRST,LAST with 0 < FIRST "
                         f"<= LAST, not {FLAGS.profile_steps}.")
  return tuple(steps)


def distribution_strategy() -> tf.distribute.Strategy:
  """MultiWorkerMirroredStrategy when TF_CONFIG names a cluster, else default."""
  cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  if sum(len(tasks) for tasks in cluster.values()) > 1:
    return tf.distribute.MultiWorkerMirroredStrategy()
  return tf.distribute.get_strategy()


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (
      resolver.task_type == "worker" and resolver.task_id == 0 and
      "chief" not in resolver.cluster_spec().as_dict())


def has_validation(catalogue: catalogue_lib.Catalogue) -> bool:
  meta = catalogue.metadata
  return meta["validation_end"] > meta["validation_start"]


def _window_examples(prepared_dir: str, window: str,
                     rule: input_pipeline.ExampleRule):
  return evaluate.load_examples(prepared_dir, window, FLAGS.history_length,
                                evaluate.test_rule(rule))


def train_model(strategy, chief: bool, paths, catalogue, prepared_dir: str,
                epochs: int, stage: str = ""):
  """Builds and trains one model on the prepared data's training window.

  With per-epoch evaluation (and a validation window), the validation day is
  scored after every epoch and the best epoch by --select_metric is restored
  at the end. Returns (model, selection), where selection says which epoch
  was kept and each epoch's validation metrics.
  """
  history_length = FLAGS.history_length
  rule = example_rule(catalogue)
  ks = [int(k) for k in FLAGS.eval_ks]
  num_train = catalogue.metadata["num_train_examples"]
  steps_per_epoch = num_train // FLAGS.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{num_train} training examples are fewer than one batch "
                     f"of {FLAGS.batch_size}.")
  total_steps = steps_per_epoch * epochs
  logging.info("%s%d training examples, %d validation examples, %d items, "
               "%d users; %d steps of %d on %d replica(s)",
               f"[{stage}] " if stage else "", num_train,
               catalogue.metadata.get("num_validation_examples", 0),
               catalogue.num_items, len(catalogue.user_ids) - 1, total_steps,
               FLAGS.batch_size, strategy.num_replicas_in_sync)
  memory = model_lib.memory_estimate(
      catalogue, tower_config(), 2 if FLAGS.optimizer == "adam" else 1,
      frequency_buckets=(FLAGS.frequency_buckets or catalogue.num_items + 1
                         if FLAGS.sampling_probability == "streaming" else 0))
  logging.info("Model memory estimate: %s", ", ".join(
      f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items()))

  train_data = input_pipeline.batches(
      os.path.join(prepared_dir, "records", "train-*.tfrecord"),
      FLAGS.batch_size, history_length, rule,
      age_reference=catalogue.metadata["train_end"], training=True,
      shuffle_buffer=FLAGS.shuffle_buffer, seed=FLAGS.seed)
  with strategy.scope():
    model = model_lib.TwoTowerModel(
        catalogue, tower_config(), temperature=FLAGS.temperature,
        logq_correction=FLAGS.logq_correction,
        uniform_negatives=FLAGS.uniform_negatives,
        uniform_pool=FLAGS.uniform_pool,
        sampling_probability=FLAGS.sampling_probability,
        frequency_alpha=FLAGS.frequency_alpha,
        frequency_buckets=FLAGS.frequency_buckets)
    schedule = WarmupCosine(FLAGS.learning_rate, total_steps,
                            int(FLAGS.warmup_fraction * total_steps))
    optimizer = (tf.keras.optimizers.Adam(schedule)
                 if FLAGS.optimizer == "adam" else
                 tf.keras.optimizers.Adagrad(schedule))
    model.compile(optimizer=optimizer)
    # Create every variable now, so that a backup can be restored into them.
    model(next(iter(train_data)))

  logs = os.path.join(paths["logs"], stage) if stage else paths["logs"]
  progress = callbacks.ProgressLogger(total_steps, FLAGS.batch_size)
  fit_callbacks = [
      # First: no later callback may save or score non-finite weights.
      callbacks.FailOnNonFiniteLoss(),
      # Restores the last backup of an interrupted run (weights, optimizer,
      # epoch and step), and removes it when training completes.
      tf.keras.callbacks.BackupAndRestore(
          os.path.join(paths["backup"], stage) if stage else paths["backup"],
          save_freq=FLAGS.checkpoint_every_steps),
      progress,
  ]
  selection = {"epochs": epochs, "epoch": epochs, "metric": None,
               "by_epoch": []}
  select = chief and FLAGS.eval_every_epoch and has_validation(catalogue)
  best_path = os.path.join(paths["checkpoints"], stage or "main", "best")
  if select:
    validation = _window_examples(prepared_dir, "validation", rule)
    num_candidates = catalogue.num_candidates(
        evaluate.window_start(catalogue, "validation"))
    selection["metric"] = f"validation {FLAGS.select_metric}"
    best = {"value": -np.inf}

    def evaluate_model():
      ranks = evaluate.model_ranks(
          model, validation,
          evaluate.candidate_embeddings(model, num_candidates + 1))
      result = {k: v for k, v in metrics.rank_metrics(ranks, ks).items()
                if k != "examples"}
      if FLAGS.select_metric not in result:
        raise app.UsageError(f"--select_metric={FLAGS.select_metric} is not "
                             f"one of {sorted(result)}.")
      selection["by_epoch"].append(result)
      value = result[FLAGS.select_metric]
      if value > best["value"]:
        best["value"] = value
        selection["epoch"] = len(selection["by_epoch"])
        tf.train.Checkpoint(model=model).write(best_path)
      return result

  if chief:
    fit_callbacks += [
        tf.keras.callbacks.TensorBoard(logs, update_freq=100,
                                       profile_batch=_profile_batches()),
        callbacks.ScalarLogger(
            os.path.join(logs, "metrics"),
            evaluate_model if select else None, hparams=hparams()),
    ]

  started = time.time()
  model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
            verbose=0, callbacks=fit_callbacks)
  selection["train_seconds_this_run"] = round(time.time() - started, 1)
  selection["train_steps"] = int(model.optimizer.iterations.numpy())
  selection["resumed_from_step"] = progress.first_step
  logging.info("Trained to step %d of %d in %.0fs this run",
               selection["train_steps"], total_steps,
               selection["train_seconds_this_run"])
  if select and selection["by_epoch"] and selection["epoch"] < epochs:
    logging.info("Restoring epoch %d, the best by %s", selection["epoch"],
                 selection["metric"])
    tf.train.Checkpoint(model=model).read(best_path).expect_partial()
  return model, selection


def score_window(model, catalogue, prepared_dir: str, window: str,
                 fitted_baselines, rule) -> dict:
  """Every retriever's metrics on one window, the Yambda protocol's too."""
  ks = [int(k) for k in FLAGS.eval_ks]
  examples = _window_examples(prepared_dir, window, rule)
  results = evaluate.evaluate(model, catalogue, prepared_dir,
                              FLAGS.history_length, rule, ks, window=window,
                              fitted_baselines=fitted_baselines,
                              test=examples)
  if FLAGS.yambda_protocol:
    results["yambda_protocol"] = yambda_protocol.evaluate(
        model, catalogue, prepared_dir, FLAGS.history_length, rule,
        fitted_baselines, [int(k) for k in FLAGS.protocol_ks], test=examples,
        window=window)
  return results


def train_and_evaluate():
  """Runs the whole job; returns (results, export paths) on the chief."""
  tf.keras.utils.set_random_seed(FLAGS.seed)
  strategy = distribution_strategy()
  chief = _is_chief(strategy)
  paths = _paths()
  if strategy.num_replicas_in_sync > 1 and not os.path.exists(
      os.path.join(paths["prepared"], "catalogue", "metadata.json")):
    raise FileNotFoundError(
        f"Multi-worker training reads prepared data; run data_prep.prep into "
        f"{paths['prepared']} first so that workers do not race to write it.")
  catalogue = prepare_data(paths)
  rule = example_rule(catalogue)
  ks = [int(k) for k in FLAGS.eval_ks]
  if FLAGS.retrain and not has_validation(catalogue):
    raise app.UsageError("--retrain needs a validation window to choose on "
                         "(--validation_window_seconds > 0).")
  if FLAGS.retrain and strategy.num_replicas_in_sync > 1:
    # Only the chief goes on after the first stage; a second fit needs every
    # worker. Run the second stage as its own multi-worker job instead.
    raise app.UsageError(
        "--retrain runs on one machine; with several workers, prepare with "
        "--validation_window_seconds=0 and train with --epochs=<the epoch "
        "chosen on the validation day> as a second job.")
  model, selection = train_model(strategy, chief, paths, catalogue,
                                 paths["prepared"], FLAGS.epochs)
  if not chief:
    return None, None

  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       paths["checkpoints"], max_to_keep=3)
  manager.save(checkpoint_number=selection["train_steps"])
  fitted_baselines = evaluate.fit_baselines(
      catalogue, paths["prepared"], FLAGS.history_length, rule,
      FLAGS.recent_half_life_days)
  results = {"selection": selection}
  if has_validation(catalogue):
    results["validation"] = score_window(model, catalogue, paths["prepared"],
                                         "validation", fitted_baselines, rule)
    callbacks.log_final_metrics(os.path.join(paths["logs"], "metrics"),
                                selection["train_steps"],
                                results["validation"]["model"])
    print_results(results["validation"], ks, "validation")

  if FLAGS.retrain:
    # The authors' second stage: the chosen settings and epoch count, trained
    # on everything before the test gap.
    config = prep.config_from_flags()
    config.validation_window_seconds = 0
    prepared = paths["prepared"].rstrip("/") + "_retrain"
    catalogue = prepare_data(paths, prepared, config)
    rule = example_rule(catalogue)
    tf.keras.utils.set_random_seed(FLAGS.seed)
    model, retrain = train_model(strategy, chief, paths, catalogue, prepared,
                                 selection["epoch"], stage="retrain")
    results["retrain"] = retrain
    fitted_baselines = evaluate.fit_baselines(
        catalogue, prepared, FLAGS.history_length, rule,
        FLAGS.recent_half_life_days)
  else:
    prepared = paths["prepared"]
  # The one scoring of the test day.
  results["test"] = score_window(model, catalogue, prepared, "test",
                                 fitted_baselines, rule)
  evaluate.write_json(results, os.path.join(paths["eval"], "results.json"))
  plot_path = os.path.join(paths["eval"], "recall_at_k.png")
  plots.write_recall_plot(
      results["test"]["recall_curve"], plot_path,
      title=f"Next-track Recall@k on the test day over "
            f"{results['test']['candidates']['authors']} items")
  print_results(results["test"], ks, "test")
  print(f"\nRecall@k plot: {plot_path}")
  if FLAGS.projector_items > 0:
    folder = projector.write(model, catalogue, paths["logs"],
                             FLAGS.projector_items)
    print(f"Item embeddings for TensorBoard's Projector tab: {folder}")

  if not FLAGS.export:
    return results, {}
  exported = export.export_all(model, catalogue, FLAGS.history_length,
                               paths["export"], FLAGS.model_name,
                               k=FLAGS.export_k)
  for kind, path in exported.items():
    print(f"SavedModel ({kind}): {path}")
  print(f"TensorBoard: tensorboard --logdir {paths['logs']}")
  return results, exported


def print_results(results, ks, window: str) -> None:
  """Prints one window's evaluation tables."""
  candidates = results["candidates"]
  print(f"\n=== {window.upper()} DAY ===\nNext-track retrieval over the "
        f"authors' catalogue ({candidates['authors']} items listened to "
        f"before the {window} day; {results['model']['examples']} examples, "
        f"{100 * results['test_targets']['not_candidates']:.1f}% of them "
        "first played inside it: misses for every retriever):")
  print(evaluate.format_table(results, ks))
  print(f"\nTargets never seen in training "
        f"({results['model']['cold_target_examples']} examples), over the "
        f"service's catalogue ({candidates['service']} items):")
  print(evaluate.format_table(results, ks, prefix="cold_target_"))
  print("\nEach example counted at its weight (played ratio, likes): "
        "how well a retriever finds what users play through:")
  print(evaluate.format_table(results, ks, prefix="weighted_"))
  k = 100 if 100 in ks else ks[len(ks) // 2]
  print(f"\nRecall@{k} by kind of target (what a retriever remembers and "
        "what it generalises):")
  print(evaluate.target_kind_table(results["by_target_kind"], k))
  if "by_component" in results:
    print(f"\nRecall@{k} by the generator's mixture component that drew the "
          "target (generated data only):")
    print(evaluate.target_kind_table(results["by_component"], k))
  print("\nWhat each retriever retrieves: coverage@k (distinct items in all "
        "top-k lists / candidates)\nand popularity@k (mean training-count "
        "percentile of the top-k items; 1 = most played):")
  print(evaluate.retrieved_table(results, ks))
  protocol = results.get("yambda_protocol")
  if protocol:
    print(f"\nYambda protocol: {protocol['users']} users seen in training, "
          f"one query each from their state at the start of the gap before "
          f"the {window} day, {protocol['mean_relevant_items']:.1f} relevant "
          f"items on average ({protocol['users_unseen_in_training']} users "
          "unseen in training left out):")
    print(yambda_protocol.format_table(protocol))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  np.set_printoptions(precision=4)
  train_and_evaluate()


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
