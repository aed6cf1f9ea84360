"""The causal self-attention history encoder: causality, padding, training."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import history_encoder
from tfrs_yambda import model as model_lib
from tfrs_yambda import schema
from tfrs_yambda import towers
from tests.conftest import HISTORY_LENGTH
from tests.conftest import SMALL_TOWERS
from tests.conftest import assert_steps_lower_the_loss
from tests.conftest import train_batch

ATTENTION = dict(SMALL_TOWERS, history_encoder="attention", history_dim=16)


@pytest.fixture(scope="module")
def encoder(catalogue):
  """An untrained encoder (random weights: enough to see what it reads)."""
  tf.keras.utils.set_random_seed(0)
  item_encoder = towers.ItemEncoder(catalogue, towers.TowerConfig(**ATTENTION))
  return history_encoder.CausalHistoryEncoder(
      item_encoder, HISTORY_LENGTH + 1, width=16, blocks=2, heads=2)


def _encode(encoder, history, seed, sequence=True):
  return encoder(tf.constant(history, tf.int64), tf.constant(seed, tf.int64),
                 sequence=sequence).numpy()


def test_a_later_slot_never_changes_an_earlier_position(encoder):
  history = np.array([[0, 0, 3, 8, 5, 12, 7, 2]])
  seed = [9]
  before = _encode(encoder, history, seed)
  for slot in range(2, history.shape[1]):
    for item in (40, 0):  # another item, or padding
      changed = history.copy()
      changed[0, slot] = item
      after = _encode(encoder, changed, seed)
      np.testing.assert_allclose(after[:, :slot], before[:, :slot],
                                 atol=1e-6)
      # The slot itself and every later one (the seed's included) do see it.
      assert not np.allclose(after[:, slot:], before[:, slot:], atol=1e-4)
  # A new seed changes its own position only.
  after = _encode(encoder, history, [40])
  np.testing.assert_allclose(after[:, :-1], before[:, :-1], atol=1e-6)
  assert not np.allclose(after[:, -1], before[:, -1], atol=1e-4)


def test_padding_in_front_changes_nothing(encoder):
  """Right-aligned positions: more padding in front is the same history."""
  history = [4, 11, 6]
  seed = [2, 2]
  short = _encode(encoder, [history, [0, 0, 5]], seed)
  for pad in (2, 9, HISTORY_LENGTH - 3):
    longer = _encode(encoder, [[0] * pad + history, [0] * (pad + 2) + [5]],
                     seed)
    np.testing.assert_allclose(longer[:, pad:], short, atol=1e-5)
  # No history at all: the seed alone, however many padding slots.
  alone = _encode(encoder, np.zeros([1, 0], np.int64), [7])
  empty = _encode(encoder, np.zeros([1, HISTORY_LENGTH], np.int64), [7])
  np.testing.assert_allclose(empty[:, -1], alone[:, -1], atol=1e-5)
  assert np.isfinite(empty).all()


def test_the_query_reads_the_last_position(encoder):
  """The fast path (last block on the seed only) is the sequence's end."""
  rng = np.random.default_rng(0)
  history = rng.integers(0, 60, (5, HISTORY_LENGTH))
  history[:, :4] = 0
  seed = rng.integers(1, 60, 5)
  np.testing.assert_allclose(
      _encode(encoder, history, seed, sequence=False),
      _encode(encoder, history, seed)[:, -1], atol=1e-5)


def test_mask_allows_earlier_valid_slots_and_itself():
  valid = tf.constant([[False, True, True]])
  np.testing.assert_array_equal(
      history_encoder.attention_mask(valid, 3).numpy()[0],
      [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
  np.testing.assert_array_equal(
      history_encoder.attention_mask(valid, 1).numpy()[0], [[0, 1, 1]])


def test_attention_model_trains_and_reads_the_seed_only_when_asked(
    prepared, catalogue):
  batch = train_batch(prepared, catalogue)
  tf.keras.utils.set_random_seed(1)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(**ATTENTION))
  assert_steps_lower_the_loss(model, batch)
  # Without seed features the seed is not in the sequence either.
  no_seed = model_lib.TwoTowerModel(
      catalogue, towers.TowerConfig(**ATTENTION, use_seed=False))
  query = {k: batch[k][:4] for k in schema.QUERY_FEATURES}
  other = {**query, schema.SEED_ITEM: query[schema.SEED_ITEM][::-1]}
  np.testing.assert_allclose(no_seed.query_tower(query).numpy(),
                             no_seed.query_tower(other).numpy(), atol=1e-6)


def test_config_refuses_unknown_or_unsized_encoders():
  with pytest.raises(ValueError, match="history_encoder"):
    towers.TowerConfig(history_encoder="lstm")
  with pytest.raises(ValueError, match="history_dim"):
    towers.TowerConfig(history_encoder="attention", history_dim=0)
  with pytest.raises(ValueError, match="heads"):
    history_encoder.CausalHistoryEncoder(None, 4, width=10, heads=3)
