"""Keras callbacks for training: console progress, TensorBoard scalars, eval."""

import math
import time
from typing import Callable, Dict

from absl import logging
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api


def duration(seconds: float) -> str:
  """Seconds as "1h02m" or "3m05s", for progress lines."""
  seconds = int(max(seconds, 0))
  return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
          else f"{seconds // 60}m{seconds % 60:02d}s")


class ProgressLogger(tf.keras.callbacks.Callback):
  """Logs step, loss, examples/s and ETA every `every_seconds`.

  `steady_examples_per_second` is the rate after the first `warmup_steps`
  steps of this run (tracing, the shuffle buffer's filling and the first
  lookups of each table are one-off costs a full epoch would not repeat).
  """

  def __init__(self, total_steps: int, batch_size: int,
               every_seconds: float = 15.0, warmup_steps: int = 20):
    super().__init__()
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.every_seconds = every_seconds
    self.warmup_steps = warmup_steps
    self.first_step = 0  # the step training (re)started from
    # Seconds and steps after warm-up, within epochs: the end-of-epoch
    # evaluation between two epochs is not training.
    self._steady_seconds = 0.0
    self._steady_steps = 0
    self._previous = None  # (time, step) of the last batch end

  def _global_step(self) -> int:
    return int(self.model.optimizer.iterations.numpy())

  def on_train_begin(self, logs=None):
    # A resumed run starts from its restored step, not from 0.
    self._start = self._last = time.time()
    self.first_step = self._last_step = self._global_step()

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    self._previous = (time.time(), self._global_step())

  def steady_examples_per_second(self) -> float:
    """Examples/s after warm-up (0.0 when the run was too short to say)."""
    if self._steady_seconds <= 0:
      return 0.0
    return self._steady_steps * self.batch_size / self._steady_seconds

  def on_train_batch_end(self, batch, logs=None):
    now = time.time()
    step = self._global_step()
    if self._previous and step - self.first_step > self.warmup_steps:
      self._steady_seconds += now - self._previous[0]
      self._steady_steps += step - self._previous[1]
    self._previous = (now, step)
    if now - self._last < self.every_seconds and step < self.total_steps:
      return
    rate = (step - self._last_step) * self.batch_size / max(now - self._last,
                                                             1e-9)
    overall = (step - self.first_step) / max(now - self._start, 1e-9)
    eta = (self.total_steps - step) / max(overall, 1e-9)
    logging.info("epoch %d step %d/%d (%.0f%%) loss %.4f | %.0f examples/s | "
                 "ETA %s", self._epoch + 1, step, self.total_steps,
                 100.0 * step / self.total_steps,
                 (logs or {}).get("loss", float("nan")), rate, duration(eta))
    self._last, self._last_step = now, step


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


class FailOnNonFiniteLoss(tf.keras.callbacks.Callback):
  """Stops training at the first non-finite loss, with an error.

  Unlike keras's TerminateOnNaN, which ends `fit` quietly (so a job would go
  on to evaluate and export a broken model), this raises NonFiniteLossError
  naming the global step (optimizer iterations after the batch), the epoch
  (1-based) and the batch. Put it first among the callbacks, so that it runs
  before any callback that saves the (by then non-finite) weights.
  """

  def __init__(self):
    super().__init__()
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    for name, value in (logs or {}).items():
      if not name.endswith("loss"):
        continue
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue  # not a scalar
      if not math.isfinite(value):
        step = int(self.model.optimizer.iterations.numpy())
        raise NonFiniteLossError(
            f"Non-finite training loss: {name} = {value} at global step "
            f"{step} (optimizer iterations), epoch {self._epoch + 1}, batch "
            f"{batch} of the epoch. Training stopped; no results written.")


class ScalarLogger(tf.keras.callbacks.Callback):
  """Writes the learning rate and end-of-epoch evaluation to TensorBoard.

  `evaluate_fn` returns {metric name: value}; it runs at the end of each epoch
  and its values are logged at the current optimizer step. Every write is
  recorded whatever `tf.summary.record_if` condition is in force around it
  (keras's TensorBoard callback pushes one for the whole of `fit`).
  """

  def __init__(self, log_dir: str,
               evaluate_fn: Callable[[], Dict[str, float]] = None,
               every_steps: int = 100, hparams: Dict = None):
    super().__init__()
    self.writer = tf.summary.create_file_writer(log_dir)
    self.evaluate_fn = evaluate_fn
    self.every_steps = every_steps
    self.hparams = hparams

  def on_train_begin(self, logs=None):
    if self.hparams:
      with self.writer.as_default(), tf.summary.record_if(True):
        hparams_api.hparams(self.hparams)

  def _step(self) -> int:
    return int(self.model.optimizer.iterations.numpy())

  def _learning_rate(self, step: int) -> float:
    lr = self.model.optimizer.learning_rate
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
      return float(lr(step))
    return float(tf.keras.backend.get_value(lr))

  def on_train_batch_end(self, batch, logs=None):
    step = self._step()
    if step % self.every_steps == 0:
      with self.writer.as_default(step=step), tf.summary.record_if(True):
        tf.summary.scalar("learning_rate", self._learning_rate(step))

  def on_epoch_end(self, epoch, logs=None):
    if self.evaluate_fn is None:
      return
    values = self.evaluate_fn()
    # record_if(True): during fit, keras's TensorBoard callback keeps a
    # record_if(train step % update_freq == 0) condition pushed, which would
    # silently drop these scalars at any epoch end off that grid.
    with self.writer.as_default(step=self._step()), tf.summary.record_if(True):
      for name, value in values.items():
        tf.summary.scalar(f"eval/{name}", value)
    self.writer.flush()
    logging.info("epoch %d evaluation: %s", epoch + 1,
                 ", ".join(f"{k} {v:.4f}" for k, v in values.items()))


def log_final_metrics(log_dir: str, step: int, metrics: Dict) -> None:
  """The final evaluation's numbers as `final/<metric>` scalars (HParams)."""
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default(step=step), tf.summary.record_if(True):
    for name, value in metrics.items():
      # Scalars only: a sampled run's intervals ("..._ci95") are pairs.
      if (name == "mrr" or name.startswith(("recall@", "ndcg@"))) and (
          not name.endswith("_ci95")):
        tf.summary.scalar(f"final/{name}", value)
  writer.flush()
