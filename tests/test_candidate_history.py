"""The history's candidate embeddings in the query (`--candidate_history`)."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import candidate_history
from tfrs_yambda import model as model_lib
from tfrs_yambda import schema
from tfrs_yambda import towers
from tests.conftest import SMALL_TOWERS
from tests.conftest import assert_steps_lower_the_loss
from tests.conftest import train_batch


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("heads", [None, 2])
def test_adds_the_slot_weighted_candidate_embeddings_and_renormalises(heads):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(10, 4)).astype(np.float32)
  tower = tf.keras.layers.Embedding(
      10, 4, embeddings_initializer=tf.constant_initializer(table))
  layer = candidate_history.CandidateHistory(tower, slots=3)
  weights = np.array([0.5, -1.0, 2.0], np.float32)
  layer.slot_weights.assign(weights)
  # Index 0 (padding, unknown) adds nothing; a repeated item adds twice.
  items = np.array([[0, 5, 7], [4, 0, 0], [0, 0, 0], [3, 3, 3]])
  shape = (4, 4) if heads is None else (4, heads, 4)
  query = _unit(rng.normal(size=shape)).astype(np.float32)
  added = np.array([-1.0 * table[5] + 2.0 * table[7], 0.5 * table[4],
                    np.zeros(4), weights.sum() * table[3]])
  if heads is not None:
    added = added[:, None, :]
  np.testing.assert_allclose(
      layer(tf.constant(query), tf.constant(items, tf.int64)).numpy(),
      _unit(query + added), rtol=1e-5, atol=1e-6)


def test_zero_weights_leave_the_query_as_it_was():
  tower = tf.keras.layers.Embedding(10, 4)
  layer = candidate_history.CandidateHistory(tower, slots=2)
  query = _unit(np.random.default_rng(1).normal(size=(3, 4))).astype(
      np.float32)
  np.testing.assert_allclose(
      layer(tf.constant(query), tf.constant([[1, 2], [0, 3], [0, 0]],
                                            tf.int64)).numpy(),
      query, rtol=1e-6)


def test_the_query_adds_the_history_then_the_seed_by_slot(prepared,
                                                          catalogue):
  tf.keras.utils.set_random_seed(4)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, candidate_history=True))
  batch = train_batch(prepared, catalogue, size=64)
  assert_steps_lower_the_loss(model, batch)
  slot_weights = model.query_tower.candidate_history.slot_weights
  assert slot_weights.shape == (catalogue.history_length + 1,)
  learned = slot_weights.numpy()
  assert np.abs(learned).min() > 0  # every slot was trained
  features = {k: batch[k] for k in schema.QUERY_FEATURES}
  query = model.query_tower(features).numpy()
  slot_weights.assign(np.zeros_like(learned))
  plain = model.query_tower(features).numpy()
  items = np.concatenate([features[schema.HISTORY_ITEMS].numpy(),
                          features[schema.SEED_ITEM].numpy()[:, None]], 1)
  candidates = model.candidate_tower(
      tf.constant(np.arange(catalogue.num_items + 1))).numpy()
  added = np.einsum("bs,bsd->bd", learned * (items > 0), candidates[items])
  np.testing.assert_allclose(query, _unit(plain + added), atol=1e-5)


def test_needs_the_candidate_tower(catalogue):
  config = towers.TowerConfig(**SMALL_TOWERS, candidate_history=True)
  with pytest.raises(ValueError, match="candidate tower"):
    towers.QueryTower(catalogue, towers.ItemEncoder(catalogue, config),
                      config)
