r"""Training examples/s: this project's two-tower vs a textbook TFRS two-tower.

  python -m benchmarks.train_throughput [--num_items=1000000] [--repeats=5]

Both models train on the same in-memory batches (Zipf-distributed item ids,
history of 50, batch 4096, Adagrad), so the figure is the model step alone;
`--prepared_dir` adds the tf.data pipeline's own examples/s on real records.
The textbook model is what the TFRS tutorials build: StringLookup + Embedding
towers, the history's item embeddings mean-pooled, no item features.

Each model trains in one `fit` call; a callback times consecutive windows of
`--steps` steps after the warm-up, so neither tracing nor `fit`'s start-up
(which, for string-keyed data, takes seconds) is counted. Besides the full
model, `--variants` times it with design elements switched off, which shows
what each element costs per step, with the attention history encoder
(`--history_encoder=attention`) in place of the mean, and with the content
table in float16 (`--content_dtype=float16`).
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
import tensorflow_recommenders as tfrs

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import input_pipeline
from tfrs_yambda import model as model_lib
from tfrs_yambda import schema
from tfrs_yambda import towers

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this program's flags in `flag_values` (called by its main)."""
  fv = flag_values
  flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size.",
                       flag_values=fv)
  flags.DEFINE_integer("num_users", 100_000, "Users.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 4096, "Batch size.", flag_values=fv)
  flags.DEFINE_integer("history_length", 50, "History items per example.",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Steps per timed window.", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed windows (the median is reported).",
                       flag_values=fv)
  flags.DEFINE_enum("optimizer", "adagrad", ["adagrad", "adam"],
                    "Optimizer of every model (the textbook setting is "
                    "Adagrad; Keras's Adam updates its slots densely).",
                    flag_values=fv)
  flags.DEFINE_integer("warmup_steps", 5,
                       "Untimed steps before the first window.",
                       flag_values=fv)
  flags.DEFINE_list("variants", None,
                    "Variants of our model to time (default: all of VARIANTS).",
                    flag_values=fv)
  flags.DEFINE_string("prepared_dir", None,
                      "Optional prepared data: also time the input pipeline.",
                      flag_values=fv)


# Variant of our model -> TowerConfig changes from the full model.
VARIANTS = {
    "all features": {},
    "- history projection": {"history_dim": 0},
    "- history": {"use_history": False},
    "- audio, artist, album": {"use_audio": False, "use_artist_album": False},
    "seed id only": {"use_history": False, "use_user_id": False,
                     "use_audio": False, "use_artist_album": False,
                     "use_example_age": False},
    # The history read by causal self-attention instead of its mean.
    "attention history encoder": {"history_encoder": "attention"},
    # The history's and the seed's candidate embeddings added to the query.
    "candidate-space history": {"candidate_history": True},
    # The content table stored in float16 (the 500m configuration's memory
    # setting): what the cast after each lookup costs.
    "content table in float16": {"content_dtype": "float16"},
}


def synthetic_catalogue(num_items, num_users, rng,
                        history_length=50) -> catalogue_lib.Catalogue:
  """A catalogue of the requested size with Yambda-like metadata."""
  n = num_items + 1
  audio = rng.normal(size=(n, 128)).astype(np.float32)
  audio /= np.linalg.norm(audio, axis=1, keepdims=True)
  counts = np.sort(rng.zipf(1.3, n).clip(max=10**6))[::-1].astype(np.int64)
  return catalogue_lib.Catalogue(
      item_ids=np.arange(n, dtype=np.int64) - 1,
      item_artist=rng.integers(0, num_items // 15, n),
      item_album=rng.integers(0, num_items // 8, n),
      item_length=rng.lognormal(5.3, 0.3, n).astype(np.float32),
      item_train_count=counts, item_first_listen=np.arange(n) - 1,
      has_audio=np.ones(n, bool), audio=audio,
      user_ids=np.arange(num_users + 1, dtype=np.int64) - 1,
      user_train_count=np.ones(num_users + 1, np.int64),
      artist_ids=np.arange(num_items // 15 + 1, dtype=np.int64) - 1,
      album_ids=np.arange(num_items // 8 + 1, dtype=np.int64) - 1,
      metadata={"prep_config": {"history_length": history_length}})


def synthetic_batches(catalogue, batch_size, history_length, rng, count=4):
  """Batches in the project's example schema, ids drawn by popularity."""
  p = catalogue.sampling_probability()[1:].astype(np.float64)
  p /= p.sum()

  def items(shape):
    return rng.choice(len(p), size=shape, p=p).astype(np.int64) + 1

  return [{
      schema.USER_ID: rng.integers(0, len(catalogue.user_ids) - 1,
                                   batch_size).astype(np.int64),
      schema.SEED_ITEM: items(batch_size),
      schema.HISTORY_ITEMS: items((batch_size, history_length)),
      schema.EXAMPLE_AGE: rng.uniform(0, 300, batch_size).astype(np.float32),
      schema.TARGET_ITEM: items(batch_size),
      schema.WEIGHT: np.ones(batch_size, np.float32),
  } for _ in range(count)]


class TextbookModel(tfrs.Model):
  """The TFRS tutorial two-tower: string ids, embeddings, mean-pooled
  history."""

  def __init__(self, item_vocab, user_vocab, dim=64):
    super().__init__()
    item_lookup = tf.keras.layers.StringLookup(vocabulary=item_vocab)
    self.user_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=user_vocab),
        tf.keras.layers.Embedding(len(user_vocab) + 1, dim)])
    self.item_embedding = tf.keras.Sequential([
        item_lookup, tf.keras.layers.Embedding(len(item_vocab) + 1, dim)])
    self.query_dense = tf.keras.layers.Dense(dim)
    self.task = tfrs.tasks.Retrieval()

  def compute_loss(self, features, training=False):
    history = tf.reduce_mean(self.item_embedding(features["history"]), axis=1)
    query = self.query_dense(tf.concat(
        [self.user_model(features["user"]), history], axis=1))
    return self.task(query, self.item_embedding(features["item"]),
                     compute_metrics=False)


def as_strings(batch):
  return {"user": tf.strings.as_string(batch[schema.USER_ID]),
          "history": tf.strings.as_string(batch[schema.HISTORY_ITEMS]),
          "item": tf.strings.as_string(batch[schema.TARGET_ITEM])}


class _WindowTimer(tf.keras.callbacks.Callback):
  """Times windows of `steps` steps after `warmup` untimed steps."""

  def __init__(self, warmup: int, steps: int):
    super().__init__()
    self.warmup, self.steps = warmup, steps
    self.window_seconds = []

  def on_train_batch_end(self, batch, logs=None):
    del logs  # The loss was fetched already: the step is complete.
    if batch >= self.warmup and (batch - self.warmup) % self.steps == 0:
      now = time.perf_counter()
      if batch > self.warmup:
        self.window_seconds.append(now - self._start)
      self._start = now


def examples_per_second(model, batches, steps, repeats, batch_size, warmup):
  """Median examples/s over `repeats` windows of `steps` steps of one `fit`."""
  data = tf.data.Dataset.from_tensor_slices(
      {k: np.stack([b[k] for b in batches]) for k in batches[0]}).repeat()
  timer = _WindowTimer(warmup, steps)
  model.fit(data, steps_per_epoch=warmup + 1 + steps * repeats, epochs=1,
            verbose=0, callbacks=[timer])
  rates = [steps * batch_size / s for s in timer.window_seconds]
  return statistics.median(rates), rates


def pipeline_examples_per_second(prepared_dir, batch_size, history_length,
                                 steps=100):
  dataset = input_pipeline.batches(
      os.path.join(prepared_dir, "records", "train-*.tfrecord"), batch_size,
      history_length, input_pipeline.ExampleRule(), 0, training=True,
      shuffle_buffer=10_000, seed=0)
  iterator = iter(dataset)
  for _ in range(10):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def _optimizer() -> tf.keras.optimizers.Optimizer:
  if FLAGS.optimizer == "adam":
    return tf.keras.optimizers.Adam(1e-3)
  return tf.keras.optimizers.Adagrad(0.1)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  catalogue = synthetic_catalogue(FLAGS.num_items, FLAGS.num_users, rng,
                                  FLAGS.history_length)
  batches = synthetic_batches(catalogue, FLAGS.batch_size,
                              FLAGS.history_length, rng)
  print(f"{FLAGS.num_items} items, {FLAGS.num_users} users, batch "
        f"{FLAGS.batch_size}, history {FLAGS.history_length}, "
        f"{FLAGS.optimizer}, "
        f"{os.cpu_count()} CPUs; {FLAGS.repeats} windows of {FLAGS.steps} "
        "steps per model", flush=True)
  timing = (FLAGS.steps, FLAGS.repeats, FLAGS.batch_size, FLAGS.warmup_steps)
  rows = []
  tf.keras.utils.set_random_seed(0)
  textbook = TextbookModel(
      [str(i) for i in range(FLAGS.num_items)],
      [str(i) for i in range(FLAGS.num_users)])
  textbook.compile(optimizer=_optimizer())
  rows.append(("textbook TFRS two-tower",) + examples_per_second(
      textbook, [as_strings(b) for b in batches], *timing))
  for name in FLAGS.variants or VARIANTS:
    ours = model_lib.TwoTowerModel(catalogue,
                                   towers.TowerConfig(**VARIANTS[name]))
    ours.compile(optimizer=_optimizer())
    rows.append((f"tfrs_yambda, {name}",) +
                examples_per_second(ours, batches, *timing))
    print(f"  {rows[-1][0]}: {rows[-1][1]:,.0f} examples/s", flush=True)
  print("\n| model | examples/s (median) | ms/step | x textbook | windows |")
  print("|---|---|---|---|---|")
  for name, median, rates in rows:
    print(f"| {name} | {median:,.0f} | {1e3 * FLAGS.batch_size / median:.0f} "
          f"| {median / rows[0][1]:.2f} | " +
          " / ".join(f"{r:,.0f}" for r in rates) + " |")
  if FLAGS.prepared_dir:
    rate = pipeline_examples_per_second(FLAGS.prepared_dir, FLAGS.batch_size,
                                        FLAGS.history_length)
    print(f"input pipeline alone on {FLAGS.prepared_dir}: {rate:,.0f} "
          "examples/s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
