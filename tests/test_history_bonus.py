"""The history's own items' score bonus (`--history_bonus`)."""

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import blockwise_ranks
from tfrs_yambda import history_bonus
from tfrs_yambda import metrics
from tfrs_yambda import model as model_lib
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import towers
from tfrs_yambda import train_flags
from tests.conftest import SMALL_TOWERS
from tests.conftest import train_batch

# Slots with padding (0), an item twice in one row, an item in two rows.
ITEMS = np.array([[0, 5, 7, 5], [4, 0, 0, 9], [0, 0, 0, 0], [3, 8, 2, 6]])
BONUS = np.array([[0.0, 0.5, -1.0, 2.0], [0.25, 0.0, 0.0, 1.5],
                  [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32)


def _numpy_bonus(items, bonus, columns, first=0):
  """[rows, len(columns)]: each row's summed bonus of item first + column."""
  out = np.zeros((len(items), len(columns)), np.float32)
  for row, (slots, values) in enumerate(zip(items, bonus)):
    for item, value in zip(slots, values):
      if item > 0:
        out[row] += value * (np.asarray(columns) + first == item)
  return out


def test_the_layer_gives_each_known_slot_its_bonus():
  layer = history_bonus.HistoryBonus(slots=4)
  layer.slot_bonus.assign([0.5, -1.0, 2.0, 3.0])
  np.testing.assert_allclose(
      layer(tf.constant(ITEMS)).numpy(),
      np.where(ITEMS > 0, [[0.5, -1.0, 2.0, 3.0]], 0.0))


def test_set_decay_halves_the_bonus_every_half_life_back_from_the_latest():
  layer = history_bonus.HistoryBonus(slots=5)
  layer.set_decay(0.2, 2.0)
  np.testing.assert_allclose(layer.slot_bonus.numpy(),
                             0.2 * 0.5 ** (np.array([4, 3, 2, 1, 0]) / 2))
  layer.set_decay(0.1, np.inf)
  np.testing.assert_allclose(layer.slot_bonus.numpy(), np.full(5, 0.1))
  assert not layer.trainable_weights  # set, not trained


def test_choose_decay_keeps_the_best_setting_and_prefers_no_bonus_on_ties():
  layer = history_bonus.HistoryBonus(slots=3)
  # A score peaked at scale 0.2, half-life 5.
  def score():
    bonus = layer.slot_bonus.numpy()
    return -abs(bonus[-1] - 0.2) - abs(bonus[0] - 0.2 * 0.5 ** (2 / 5))
  chosen, by_setting = history_bonus.choose_decay(
      layer, score, [0, 0.1, 0.2, 0.3], [5, np.inf])
  assert chosen == (0.2, 5)
  assert list(by_setting) == ["0/inf", "0.1/5", "0.1/inf", "0.2/5",
                              "0.2/inf", "0.3/5", "0.3/inf"]
  np.testing.assert_allclose(layer.slot_bonus.numpy(),
                             0.2 * 0.5 ** (np.array([2, 1, 0]) / 5))
  chosen, _ = history_bonus.choose_decay(layer, lambda: 1.0, [0.1, 0],
                                         [5])
  assert chosen == (0.0, np.inf)
  np.testing.assert_array_equal(layer.slot_bonus.numpy(), np.zeros(3))


def test_add_to_scores_adds_within_the_block_only():
  scores = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  for first in (0, 3, 6):
    np.testing.assert_allclose(
        history_bonus.add_to_scores(tf.constant(scores), tf.constant(ITEMS),
                                    tf.constant(BONUS), first).numpy(),
        scores + _numpy_bonus(ITEMS, BONUS, np.arange(6), first), rtol=1e-6)


def test_item_bonus_sums_over_the_slots_that_hold_each_item():
  identifiers = np.array([[5, 7, 1], [9, 4, 0], [5, 1, 2], [6, 6, 10]])
  want = np.stack([_numpy_bonus(ITEMS[i:i + 1], BONUS[i:i + 1],
                                identifiers[i])[0] for i in range(4)])
  np.testing.assert_allclose(
      history_bonus.item_bonus(tf.constant(ITEMS), tf.constant(BONUS),
                               tf.constant(identifiers)).numpy(), want)


def test_evaluation_ranks_by_the_scores_plus_bonus(prepared, catalogue):
  tf.keras.utils.set_random_seed(6)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, history_bonus=True))
  model.query_tower.history_bonus.set_decay(0.5, 10.0)
  slot_bonus = model.query_tower.history_bonus.slot_bonus.numpy()
  assert slot_bonus.shape == (catalogue.history_length,)  # not the seed
  batch = train_batch(prepared, catalogue, size=64)
  examples = {k: batch[k].numpy() for k in schema.example_spec(1)}
  n = catalogue.num_items + 1
  candidates = ranking.candidate_embeddings(model, n)
  features = {k: tf.constant(examples[k]) for k in schema.QUERY_FEATURES}
  slots = examples[schema.HISTORY_ITEMS]
  scores = (model.query_tower(features).numpy() @ candidates.numpy().T +
            _numpy_bonus(slots, np.where(slots > 0, slot_bonus, 0),
                         np.arange(n)))
  targets = examples[schema.TARGET_ITEM]
  target_scores = scores[np.arange(len(targets)), targets]
  ahead = (scores[:, 1:] > target_scores[:, None]) | (
      (scores[:, 1:] == target_scores[:, None]) &
      (np.arange(1, n) < targets[:, None]))
  want = 1 + ahead.sum(axis=1)
  got = ranking.model_ranks(model, examples, candidates)
  # Float rounding may swap near-ties: nearly every rank is exact.
  assert np.mean(got == want) > 0.95
  assert np.abs(got - want).max() <= 2
  # The bonus moves ranks: the targets in their own history rise.
  model.query_tower.history_bonus.set_decay(0.0, np.inf)
  plain = ranking.model_ranks(model, examples, candidates)
  in_history = (slots == targets[:, None]).any(axis=1)
  assert in_history.any() and np.all(got[in_history] <= plain[in_history])
  assert np.any(got[in_history] < plain[in_history])
  # The blockwise ranks (cold targets') add the bonus the same way.
  model.query_tower.history_bonus.set_decay(0.5, 10.0)
  np.testing.assert_array_equal(
      blockwise_ranks.target_ranks(model, examples, n, block_items=64,
                                   batch_size=32), got)


def test_a_non_finite_bonus_is_a_miss_not_a_hit():
  candidates = np.random.default_rng(2).normal(size=(12, 4)).astype(
      np.float32)
  queries = tf.constant(np.ones((3, 4), np.float32))
  table = ranking.candidate_table(tf.constant(candidates))
  slots = tf.constant([[5, 6], [7, 0], [8, 9]], tf.int64)
  values = tf.constant([[np.nan, 0.0], [np.inf, 0.0], [1.0, 2.0]])
  targets = tf.constant([5, 7, 9], tf.int64)
  ranks, top = ranking.target_ranks(queries, table, targets, k=3,
                                    bonus=(slots, values))
  ranks = ranks.numpy()
  assert ranks[0] == ranks[1] == metrics.NOT_RETRIEVED
  # The finite row is ranked as its scores say, its bonus included.
  scores = candidates @ np.ones(4)
  scores[[8, 9]] += [1.0, 2.0]
  scores[0] = -np.inf  # index 0 is never a hit
  assert ranks[2] == 1 + np.sum(scores > scores[9])
  assert top.numpy()[2].tolist() == np.argsort(-scores)[:3].tolist()
  # A NaN or inf score is never in a list ahead of a finite one.
  assert 5 not in top.numpy()[0] and 7 not in top.numpy()[1]


@pytest.mark.parametrize("flag, value, ok", [
    ("history_bonus_scales", "0,0.1,0.25", True),
    ("history_bonus_scales", "-0.1", False),
    ("history_bonus_scales", "big", False),
    ("history_bonus_half_lives", "5,inf", True),
    ("history_bonus_half_lives", "0", False),
    ("history_bonus_half_lives", "nan", False)])
def test_the_settings_to_choose_from_are_checked_when_parsed(flag, value, ok):
  flag_values = flags.FlagValues()
  train_flags.define_flags(flag_values)
  if ok:
    flag_values(["train", f"--{flag}={value}"])
  else:
    with pytest.raises(flags.IllegalFlagValueError):
      flag_values(["train", f"--{flag}={value}"])
