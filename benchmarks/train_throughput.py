r"""Training examples/s: this project's two-tower vs a textbook TFRS two-tower.

  python benchmarks/train_throughput.py [--num_items=1000000] [--repeats=3]

Both models train on the same in-memory batches (Zipf-distributed item ids,
history of 50, batch 4096, Adagrad), so the figure is the model step alone;
`--prepared_dir` adds the tf.data pipeline's own examples/s on real records.
The textbook model is what the TFRS tutorials build: StringLookup + Embedding
towers, the history's item embeddings mean-pooled, no item features.
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
flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size.")
flags.DEFINE_integer("num_users", 100_000, "Users.")
flags.DEFINE_integer("batch_size", 4096, "Batch size.")
flags.DEFINE_integer("history_length", 50, "History items per example.")
flags.DEFINE_integer("steps", 20, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
flags.DEFINE_list("history_dims", ["64"],
                  "TowerConfig.history_dim of each timed variant of our model "
                  "(0: pool the full item features, no projection).")
flags.DEFINE_string("prepared_dir", None,
                    "Optional prepared data: also time the input pipeline.")


def synthetic_catalogue(num_items, num_users, rng) -> catalogue_lib.Catalogue:
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
      item_train_count=counts, has_audio=np.ones(n, bool), audio=audio,
      user_ids=np.arange(num_users + 1, dtype=np.int64) - 1,
      user_train_count=np.ones(num_users + 1, np.int64),
      artist_ids=np.arange(num_items // 15 + 1, dtype=np.int64) - 1,
      album_ids=np.arange(num_items // 8 + 1, dtype=np.int64) - 1,
      metadata={})


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
  """The TFRS tutorial two-tower: string ids, embeddings, mean-pooled history."""

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


def examples_per_second(model, batches, steps, repeats, batch_size):
  """Median examples/s of `fit` over repeats of `steps` steps each."""
  data = tf.data.Dataset.from_tensor_slices(
      {k: np.stack([b[k] for b in batches]) for k in batches[0]}).repeat()
  model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # trace + warm up
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    rates.append(steps * batch_size / (time.perf_counter() - start))
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


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  catalogue = synthetic_catalogue(FLAGS.num_items, FLAGS.num_users, rng)
  batches = synthetic_batches(catalogue, FLAGS.batch_size,
                              FLAGS.history_length, rng)
  print(f"{FLAGS.num_items} items, {FLAGS.num_users} users, batch "
        f"{FLAGS.batch_size}, history {FLAGS.history_length}, Adagrad, "
        f"{tf.config.threading.get_inter_op_parallelism_threads() or 'all'} "
        f"threads, {os.cpu_count()} CPUs")
  rows = []
  tf.keras.utils.set_random_seed(0)
  textbook = TextbookModel(
      [str(i) for i in range(FLAGS.num_items)],
      [str(i) for i in range(FLAGS.num_users)])
  textbook.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
  rows.append(("textbook TFRS two-tower",) + examples_per_second(
      textbook, [as_strings(b) for b in batches], FLAGS.steps, FLAGS.repeats,
      FLAGS.batch_size))
  for history_dim in FLAGS.history_dims:
    ours = model_lib.TwoTowerModel(
        catalogue, towers.TowerConfig(history_dim=int(history_dim)))
    ours.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    rows.append((f"tfrs_yambda history_dim={history_dim}",) +
                examples_per_second(ours, batches, FLAGS.steps, FLAGS.repeats,
                                    FLAGS.batch_size))
  print(f"\n{'model':<34}{'examples/s (median)':>20}  ratio  runs")
  for name, median, rates in rows:
    print(f"{name:<34}{median:>20,.0f}  {median / rows[0][1]:5.2f}  " +
          ", ".join(f"{r:,.0f}" for r in rates))
  if FLAGS.prepared_dir:
    rate = pipeline_examples_per_second(FLAGS.prepared_dir, FLAGS.batch_size,
                                        FLAGS.history_length)
    print(f"input pipeline alone on {FLAGS.prepared_dir}: {rate:,.0f} "
          "examples/s")


if __name__ == "__main__":
  app.run(main)
