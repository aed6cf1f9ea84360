"""The tf.data pipeline: a hand-built record's expansion, shapes, dtypes."""

import os

import numpy as np
import tensorflow as tf

from tfrs_yambda import input_pipeline
from tfrs_yambda import schema
from tests.conftest import HISTORY_LENGTH

LIKED, DISLIKED, NONE = (schema.FEEDBACK_LIKED, schema.FEEDBACK_DISLIKED,
                         schema.FEEDBACK_NONE)


def _record(num_context, items, ratios, feedback, timestamps=None):
  n = len(items)
  return {
      schema.UID: tf.constant(77, tf.int64),
      schema.NUM_CONTEXT: tf.constant(num_context, tf.int64),
      schema.ITEMS: tf.constant(items, tf.int64),
      schema.TIMESTAMPS: tf.constant(
          timestamps if timestamps is not None else np.arange(n) * 86_400,
          tf.int64),
      schema.PLAYED_RATIOS: tf.constant(ratios, tf.int64),
      schema.FEEDBACK: tf.constant(feedback, tf.int64),
      schema.IS_ORGANIC: tf.ones([n], tf.int64),
  }


def test_expand_record_builds_seed_history_weight_and_age():
  # Listens: 0 is context; 2 is a skip; 4 is disliked; 5 is liked, replayed.
  record = _record(num_context=1,
                   items=[5, 6, 7, 8, 9, 10],
                   ratios=[100, 100, 10, 100, 100, 150],
                   feedback=[NONE, NONE, NONE, NONE, DISLIKED, LIKED])
  rule = input_pipeline.ExampleRule(min_played_ratio=50)
  out = input_pipeline.expand_record(record, history_length=3, rule=rule,
                                     age_reference=6 * 86_400)
  out = {k: v.numpy() for k, v in out.items()}
  # Targets: positives after the context: listens 1, 3, 5.
  np.testing.assert_array_equal(out[schema.TARGET_ITEM], [6, 8, 10])
  # The seed is the previous listen, even a skip or a dislike.
  np.testing.assert_array_equal(out[schema.SEED_ITEM], [5, 7, 9])
  # History: earlier positives only, oldest first, 0-padded in front.
  np.testing.assert_array_equal(out[schema.HISTORY_ITEMS],
                                [[0, 0, 5], [0, 5, 6], [5, 6, 8]])
  np.testing.assert_allclose(out[schema.WEIGHT], [1.0, 1.0, 1.5 * 2.0])
  np.testing.assert_allclose(out[schema.EXAMPLE_AGE], [5.0, 3.0, 1.0])
  np.testing.assert_array_equal(out[schema.USER_ID], [77, 77, 77])
  np.testing.assert_array_equal(out[schema.TIMESTAMP],
                                [86_400, 3 * 86_400, 5 * 86_400])


def test_first_listen_of_a_user_is_never_a_target_and_age_is_zero_at_serving():
  record = _record(0, [3, 4], [100, 100], [NONE, NONE])
  out = input_pipeline.expand_record(
      record, 2, input_pipeline.ExampleRule(use_weights=False), None)
  np.testing.assert_array_equal(out[schema.TARGET_ITEM].numpy(), [4])
  np.testing.assert_array_equal(out[schema.EXAMPLE_AGE].numpy(), [0.0])
  np.testing.assert_array_equal(out[schema.WEIGHT].numpy(), [1.0])


def test_record_without_targets_expands_to_nothing():
  record = _record(2, [3, 4], [100, 100], [NONE, NONE])
  out = input_pipeline.expand_record(record, 4, input_pipeline.ExampleRule(),
                                     0)
  assert out[schema.TARGET_ITEM].shape[0] == 0
  assert out[schema.HISTORY_ITEMS].shape.as_list() == [0, 4]


def test_batches_have_the_schema_shapes_and_dtypes(prepared, catalogue):
  rule = input_pipeline.ExampleRule(
      min_played_ratio=catalogue.metadata["min_played_ratio"])
  dataset = input_pipeline.batches(
      os.path.join(prepared, "records", "train-*.tfrecord"), 32,
      HISTORY_LENGTH, rule, catalogue.metadata["train_end"], training=True,
      shuffle_buffer=1000, seed=1)
  spec = schema.example_spec(HISTORY_LENGTH)
  assert set(dataset.element_spec) == set(spec)
  batch = next(iter(dataset))
  for name, tensor_spec in spec.items():
    assert batch[name].dtype == tensor_spec.dtype, name
    assert batch[name].shape.as_list() == [32] + tensor_spec.shape.as_list()
  assert np.all(batch[schema.TARGET_ITEM].numpy() > 0)
  assert np.all(batch[schema.WEIGHT].numpy() > 0)
  assert np.all(batch[schema.EXAMPLE_AGE].numpy() >= 0)


def test_training_batches_mix_users(prepared, catalogue):
  rule = input_pipeline.ExampleRule()
  dataset = input_pipeline.batches(
      os.path.join(prepared, "records", "train-*.tfrecord"), 256,
      HISTORY_LENGTH, rule, catalogue.metadata["train_end"], training=True,
      shuffle_buffer=20_000, seed=3)
  users = next(iter(dataset))[schema.USER_ID].numpy()
  assert len(np.unique(users)) > 50
