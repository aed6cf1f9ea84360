"""Training one two-tower model on prepared data, and choosing its epoch.

`train_model` builds a `model.TwoTowerModel` under a distribution strategy
and fits it on the training window's examples:

  * the learning rate warms up linearly, then decays by cosine to zero
    (`WarmupCosine`): large in-batch softmax batches are unstable at full
    rate from random weights;
  * every `checkpoint_every_steps` steps a backup is written that an
    interrupted run resumes from (weights, optimizer, epoch and step), and
    removed when training completes;
  * a non-finite loss stops training at once, with an error
    (`callbacks.FailOnNonFiniteLoss`), before anything saves or scores the
    broken weights;
  * with a validation window, the validation day is scored after every
    epoch (TensorBoard's eval/*), and the epoch best by `select_metric` is
    restored at the end: every choice is made on the validation day, never
    on the test day.

With several workers (TF_CONFIG naming a cluster), every worker trains and
only the chief (`is_chief`) logs, scores and writes.
"""

import dataclasses
import json
import os
import time
from typing import Dict, Optional, Sequence, Tuple

from absl import app
from absl import logging
import numpy as np
import tensorflow as tf

from tfrs_yambda import callbacks
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import model as model_lib
from tfrs_yambda import ranking
from tfrs_yambda import towers

OPTIMIZERS = ("adam", "adagrad")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How one model is trained and its epoch chosen.

  Attributes:
    batch_size: examples per step; also the in-batch negatives of each query.
    epochs: passes over the training examples.
    optimizer: "adam", or "adagrad", whose sparse updates touch only the
      looked-up rows of the embedding tables (Keras's Adam updates its slots
      densely, which is slow for millions of rows).
    learning_rate: the peak learning rate.
    warmup_fraction: share of the steps with a linear warm-up; the rest
      decays by cosine.
    shuffle_buffer: examples in the shuffle buffer; a record holds a few
      hundred consecutive examples of one user, so it must be much larger.
    checkpoint_every_steps: steps between the backups a run resumes from.
    profile_steps: (first, last) training steps to trace with TensorFlow's
      profiler; (): none.
    eval_every_epoch: score the validation day after every epoch and keep
      the best epoch.
    select_metric: the validation metric that chooses the epoch.
    eval_ks: the cut-offs of Recall@k and NDCG@k.
    seed: seed of the training data's shuffling.
    max_steps: 0, or at most this many steps in all: a bounded run on data
      whose full epoch takes hours (the 500m rehearsal). The learning rate
      schedule spans the bounded run, and it counts as one epoch.
    eval_examples: 0, or score the validation day on a fixed, seeded sample
      of this many examples (`evaluate.window_examples`).
  """
  batch_size: int = 1024
  epochs: int = 3
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  warmup_fraction: float = 0.05
  shuffle_buffer: int = 100_000
  checkpoint_every_steps: int = 500
  profile_steps: Tuple[int, ...] = ()
  eval_every_epoch: bool = True
  select_metric: str = "recall@100"
  eval_ks: Tuple[int, ...] = metrics.DEFAULT_KS
  seed: int = 42
  max_steps: int = 0
  eval_examples: int = 0

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got "
                       f"{self.optimizer}")

  @property
  def optimizer_slots(self) -> int:
    """Copies of each trained table the optimizer keeps (Adam 2, Adagrad 1)."""
    return 2 if self.optimizer == "adam" else 1

  def make_optimizer(self, schedule) -> tf.keras.optimizers.Optimizer:
    """The optimizer, its learning rate following `schedule`."""
    if self.optimizer == "adam":
      return tf.keras.optimizers.Adam(schedule)
    return tf.keras.optimizers.Adagrad(schedule)


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


def distribution_strategy() -> tf.distribute.Strategy:
  """MultiWorkerMirroredStrategy when TF_CONFIG names a cluster, else the
  default strategy."""
  cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  if sum(len(tasks) for tasks in cluster.values()) > 1:
    return tf.distribute.MultiWorkerMirroredStrategy()
  return tf.distribute.get_strategy()


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
  """Whether this process is the one that logs, scores and writes.

  The "chief" task if the cluster has one, else worker 0; a single process
  is its own chief. Without a strategy, the task TF_CONFIG names.
  """
  if strategy is None:
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  else:
    resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (
      resolver.task_type == "worker" and resolver.task_id == 0 and
      "chief" not in resolver.cluster_spec().as_dict())


class _EpochSelector:
  """Scores the validation day after each epoch and keeps the best weights.

  Its `__call__` is `callbacks.ScalarLogger`'s evaluate_fn. `selection`
  records every epoch's metrics and which epoch is best so far, whose weights
  are written to `best_path`.
  """

  def __init__(self, model, catalogue: catalogue_lib.Catalogue,
               prepared_dir: str, rule: input_pipeline.ExampleRule,
               ks: Sequence[int], select_metric: str, selection: Dict,
               best_path: str, eval_examples: int = 0):
    self.model = model
    self.validation = evaluate.window_examples(catalogue, prepared_dir,
                                               "validation", rule,
                                               eval_examples)
    self.num_candidates = catalogue.num_candidates(
        evaluate.window_start(catalogue, "validation"))
    self.ks = ks
    self.select_metric = select_metric
    self.selection = selection
    self.best_path = best_path
    self.best = -np.inf

  def __call__(self) -> Dict[str, float]:
    ranks = ranking.model_ranks(
        self.model, self.validation, ranking.candidate_table(
            ranking.candidate_embeddings(self.model, self.num_candidates + 1)))
    result = {k: v for k, v in metrics.rank_metrics(ranks, self.ks).items()
              if k != "examples"}
    if self.select_metric not in result:
      raise app.UsageError(f"--select_metric={self.select_metric} is not "
                           f"one of {sorted(result)}.")
    self.selection["by_epoch"].append(result)
    value = result[self.select_metric]
    if value > self.best:
      self.best = value
      self.selection["epoch"] = len(self.selection["by_epoch"])
      tf.train.Checkpoint(model=self.model).write(self.best_path)
    return result


def train_model(config: TrainConfig, catalogue: catalogue_lib.Catalogue,
                prepared_dir: str, tower_config: towers.TowerConfig,
                retrieval: model_lib.RetrievalConfig,
                rule: input_pipeline.ExampleRule, logs_dir: str,
                backup_dir: str, checkpoints_dir: str,
                strategy: Optional[tf.distribute.Strategy] = None,
                chief: bool = True, epochs: Optional[int] = None,
                stage: str = "", hparams: Optional[Dict] = None):
  """Builds and trains one model on the prepared data's training window.

  See the module docstring for the schedule, the backups and the choice of
  the epoch.

  Args:
    config: the training settings.
    catalogue: the prepared data's catalogue (its history length is the
      examples' N).
    prepared_dir: the folder holding its records.
    tower_config: the towers' sizes and switches.
    retrieval: the retrieval task's negatives and corrections.
    rule: the training examples' positive and weight rule.
    logs_dir: TensorBoard logs (<logs_dir>/<stage> for a named stage).
    backup_dir: backups an interrupted run resumes from (per stage).
    checkpoints_dir: <checkpoints_dir>/<stage or "main">/best holds the best
      epoch's weights while training.
    strategy: the distribution strategy (default: the current one).
    chief: whether this process logs and scores (`is_chief`).
    epochs: overrides `config.epochs` (the retraining stage's chosen count).
    stage: names a second training stage ("retrain") in the folders above.
    hparams: {name: value} for TensorBoard's HParams dashboard.

  Returns:
    (model, selection): selection says which epoch was kept ("epoch", of
    "epochs"), by which "metric", each epoch's validation metrics
    ("by_epoch"), and the run's "train_steps", "train_seconds_this_run" and
    "resumed_from_step".
  """
  strategy = strategy or tf.distribute.get_strategy()
  epochs = config.epochs if epochs is None else epochs
  num_train = catalogue.metadata["num_train_examples"]
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{num_train} training examples are fewer than one batch "
                     f"of {config.batch_size}.")
  full_epoch_steps = steps_per_epoch
  if config.max_steps and config.max_steps < steps_per_epoch * epochs:
    # One bounded pass: its examples/s says what a full epoch would take.
    steps_per_epoch, epochs = config.max_steps, 1
  total_steps = steps_per_epoch * epochs
  logging.info("%s%d training examples, %d validation examples, %d items, "
               "%d users; %d steps of %d on %d replica(s)",
               f"[{stage}] " if stage else "", num_train,
               catalogue.metadata.get("num_validation_examples", 0),
               catalogue.num_items, len(catalogue.user_ids) - 1, total_steps,
               config.batch_size, strategy.num_replicas_in_sync)
  memory = model_lib.memory_estimate(
      catalogue, tower_config, config.optimizer_slots,
      frequency_buckets=retrieval.estimate_buckets(catalogue.num_items))
  logging.info("Model memory estimate: %s", ", ".join(
      f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items()))

  train_data = input_pipeline.batches(
      os.path.join(prepared_dir, "records", "train-*.tfrecord"),
      config.batch_size, catalogue.history_length, rule,
      age_reference=catalogue.metadata["train_end"], training=True,
      shuffle_buffer=config.shuffle_buffer, seed=config.seed)
  with strategy.scope():
    model = model_lib.TwoTowerModel(catalogue, tower_config, retrieval)
    schedule = WarmupCosine(config.learning_rate, total_steps,
                            int(config.warmup_fraction * total_steps))
    model.compile(optimizer=config.make_optimizer(schedule))
    # Create every variable now, so that a backup can be restored into them.
    model(next(iter(train_data)))

  logs = os.path.join(logs_dir, stage) if stage else logs_dir
  progress = callbacks.ProgressLogger(total_steps, config.batch_size)
  fit_callbacks = [
      # First: no later callback may save or score non-finite weights.
      callbacks.FailOnNonFiniteLoss(),
      # Restores the last backup of an interrupted run (weights, optimizer,
      # epoch and step), and removes it when training completes.
      tf.keras.callbacks.BackupAndRestore(
          os.path.join(backup_dir, stage) if stage else backup_dir,
          save_freq=config.checkpoint_every_steps),
      progress,
  ]
  selection = {"epochs": epochs, "epoch": epochs, "metric": None,
               "by_epoch": []}
  select = (chief and config.eval_every_epoch and
            evaluate.has_validation(catalogue))
  best_path = os.path.join(checkpoints_dir, stage or "main", "best")
  selector = None
  if select:
    selection["metric"] = f"validation {config.select_metric}"
    selector = _EpochSelector(model, catalogue, prepared_dir, rule,
                              config.eval_ks, config.select_metric, selection,
                              best_path, config.eval_examples)
  if chief:
    fit_callbacks += [
        tf.keras.callbacks.TensorBoard(
            logs, update_freq=100, profile_batch=config.profile_steps or 0),
        callbacks.ScalarLogger(os.path.join(logs, "metrics"), selector,
                               hparams=hparams),
    ]

  started = time.time()
  model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
            verbose=0, callbacks=fit_callbacks)
  selection["train_seconds_this_run"] = round(time.time() - started, 1)
  selection["train_steps"] = int(model.optimizer.iterations.numpy())
  selection["resumed_from_step"] = progress.first_step
  rate = progress.steady_examples_per_second()
  selection["steady_examples_per_second"] = round(rate, 1)
  selection["projected_epoch_seconds"] = round(
      full_epoch_steps * config.batch_size / rate, 1) if rate else None
  selection["full_epoch_steps"] = full_epoch_steps
  if rate:
    logging.info("Steady state: %.0f examples/s; a full epoch (%d steps) "
                 "would take %s", rate, full_epoch_steps,
                 callbacks.duration(selection["projected_epoch_seconds"]))
  else:  # every step was a warm-up step
    logging.info("Too few steps for a steady examples/s.")
  logging.info("Trained to step %d of %d in %.0fs this run",
               selection["train_steps"], total_steps,
               selection["train_seconds_this_run"])
  if select and selection["by_epoch"] and selection["epoch"] < epochs:
    logging.info("Restoring epoch %d, the best by %s", selection["epoch"],
                 selection["metric"])
    tf.train.Checkpoint(model=model).read(best_path).expect_partial()
  return model, selection
