"""The history prior mixed into the scores (`--history_bonus`)."""

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
from tests.conftest import with_history_prior

# Slots with padding (0), an item twice in one row, an item in two rows.
ITEMS = np.array([[0, 5, 7, 5], [4, 0, 0, 9], [0, 0, 0, 0], [3, 8, 2, 6]])
WEIGHTS = np.array([[0.0, 0.5, 1.0, 2.0], [0.25, 0.0, 0.0, 1.5],
                    [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32)


def _summed(items, weights, columns, first=0):
  """[rows, len(columns)]: each row's summed weight of item first + column."""
  out = np.zeros((len(items), len(columns)), np.float32)
  for row, (slots, values) in enumerate(zip(items, weights)):
    for item, value in zip(slots, values):
      if item > 0:
        out[row] += value * (np.asarray(columns) + first == item)
  return out


def test_the_layer_gives_each_known_slot_its_weight():
  layer = history_bonus.HistoryBonus(slots=4)
  layer.slot_weight.assign([0.5, 0.0, 2.0, 3.0])
  np.testing.assert_allclose(
      layer(tf.constant(ITEMS)).numpy(),
      np.where(ITEMS > 0, [[0.5, 0.0, 2.0, 3.0]], 0.0))


def _decay(scale, half_life, slots):
  decay = 0.5 ** (np.arange(slots - 1, -1, -1) / half_life)
  return scale * decay / decay.sum()


def test_set_decay_spreads_the_mass_halving_every_half_life_back():
  layer = history_bonus.HistoryBonus(slots=5)
  layer.set_decay(0.2, 2.0)
  weights = layer.slot_weight.numpy()
  np.testing.assert_allclose(weights.sum(), 0.2, rtol=1e-6)
  np.testing.assert_allclose(weights[:-1] / weights[1:], 0.5 ** 0.5,
                             rtol=1e-6)
  layer.set_decay(0.1, np.inf)
  np.testing.assert_allclose(layer.slot_weight.numpy(), np.full(5, 0.02))
  assert not layer.trainable_weights  # set, not trained


def test_choose_decay_keeps_the_best_setting_and_prefers_no_bonus_on_ties():
  layer = history_bonus.HistoryBonus(slots=3)
  # A score peaked at scale 0.2, half-life 5.
  def score():
    return -np.abs(layer.slot_weight.numpy() - _decay(0.2, 5, 3)).sum()
  chosen, by_setting = history_bonus.choose_decay(
      layer, score, [0, 0.1, 0.2, 0.3], [5, np.inf])
  assert chosen == (0.2, 5)
  assert list(by_setting) == ["0/inf", "0.1/5", "0.1/inf", "0.2/5",
                              "0.2/inf", "0.3/5", "0.3/inf"]
  np.testing.assert_allclose(layer.slot_weight.numpy(), _decay(0.2, 5, 3),
                             rtol=1e-6)
  chosen, _ = history_bonus.choose_decay(layer, lambda: 1.0, [0.1, 0],
                                         [5])
  assert chosen == (0.0, np.inf)
  np.testing.assert_array_equal(layer.slot_weight.numpy(), np.zeros(3))


def test_mixing_moves_the_history_items_within_the_block_only_and_up():
  scores = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  weights = WEIGHTS
  level = np.array([0.5, 2.0, -1.0, 0.0], np.float32)
  bonus = history_bonus.Bonus(tf.constant(ITEMS), tf.constant(weights), 0.3)
  for first in (0, 3, 6):
    got = history_bonus.mix_into_scores(tf.constant(scores), bonus,
                                        tf.constant(level), first).numpy()
    np.testing.assert_allclose(
        got, with_history_prior(scores, ITEMS, weights, 0.3, first, level),
        rtol=1e-5)
    assert np.all(got >= scores)
  # Under its own top's normaliser, as `ranking` mixes it.
  level = history_bonus.normaliser(history_bonus.dense_top(scores), 0.3)
  np.testing.assert_allclose(
      history_bonus.mix_into_scores(tf.constant(scores), bonus,
                                    level).numpy(),
      with_history_prior(scores, ITEMS, weights, 0.3), rtol=1e-5)


def test_the_normaliser_is_the_log_sum_exp_of_the_finite_top():
  top = np.array([[1.0, 0.5, -np.inf], [np.nan, 2.0, 1.0],
                  [-np.inf, -np.inf, -np.inf]], np.float32)
  np.testing.assert_allclose(
      history_bonus.normaliser(tf.constant(top), 0.5).numpy(),
      [0.5 * np.logaddexp(2.0, 1.0), 0.5 * np.logaddexp(4.0, 2.0), 0.0],
      rtol=1e-6)
  # dense_top leaves index 0 out and keeps at most NORMALISER_TOP.
  dense = np.arange(300, dtype=np.float32)[::-1][np.newaxis, :]
  top = history_bonus.dense_top(tf.constant(dense)).numpy()
  assert top.shape == (1, history_bonus.NORMALISER_TOP)
  assert top[0, 0] == 298 and top[0, -1] == 298 - 99


def test_item_bonus_sums_over_the_slots_that_hold_each_item():
  identifiers = np.array([[5, 7, 1], [9, 4, 0], [5, 1, 2], [6, 6, 10]])
  want = np.stack([_summed(ITEMS[i:i + 1], WEIGHTS[i:i + 1],
                                identifiers[i])[0] for i in range(4)])
  np.testing.assert_allclose(
      history_bonus.item_bonus(tf.constant(ITEMS), tf.constant(WEIGHTS),
                               tf.constant(identifiers)).numpy(), want)


def test_item_bonus_matches_every_pair_on_many_repeated_slots():
  """The sorted search equals the pairwise sum: repeats, raw ids of -1
  (index 0 served), identifiers absent from the slots, no slots at all."""
  rng = np.random.default_rng(4)
  items = rng.integers(-1, 40, (6, 450))
  weights = rng.random((6, 450)).astype(np.float32)
  identifiers = rng.integers(-1, 60, (6, 550))
  pairwise = np.where(items[:, np.newaxis, :] == identifiers[:, :, np.newaxis],
                      weights[:, np.newaxis, :], 0).sum(axis=2)
  np.testing.assert_allclose(
      history_bonus.item_bonus(tf.constant(items), tf.constant(weights),
                               tf.constant(identifiers)).numpy(),
      pairwise, rtol=1e-5)
  assert not history_bonus.item_bonus(
      tf.zeros([6, 0], tf.int64), tf.zeros([6, 0]),
      tf.constant(identifiers)).numpy().any()


def test_evaluation_ranks_by_the_scores_with_the_prior(prepared, catalogue):
  tf.keras.utils.set_random_seed(6)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, history_bonus=True))
  model.query_tower.history_bonus.set_decay(0.5, 10.0)
  weights = model.query_tower.history_bonus.slot_weight.numpy()
  assert weights.shape == (catalogue.history_length,)  # not the seed
  batch = train_batch(prepared, catalogue, size=64)
  examples = {k: batch[k].numpy() for k in schema.example_spec(1)}
  n = catalogue.num_items + 1
  candidates = ranking.candidate_embeddings(model, n)
  features = {k: tf.constant(examples[k]) for k in schema.QUERY_FEATURES}
  slots = examples[schema.HISTORY_ITEMS]
  scores = with_history_prior(
      model.query_tower(features).numpy() @ candidates.numpy().T, slots,
      np.where(slots > 0, weights, 0), model.temperature)
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
  # The prior moves ranks: the targets in their own history rise.
  model.query_tower.history_bonus.set_decay(0.0, np.inf)
  plain = ranking.model_ranks(model, examples, candidates)
  in_history = (slots == targets[:, None]).any(axis=1)
  assert in_history.any() and np.all(got[in_history] <= plain[in_history])
  assert np.any(got[in_history] < plain[in_history])
  # The blockwise ranks (cold targets') mix it in the same way, the
  # normaliser gathered across blocks.
  model.query_tower.history_bonus.set_decay(0.5, 10.0)
  np.testing.assert_array_equal(
      blockwise_ranks.target_ranks(model, examples, n, block_items=64,
                                   batch_size=32), got)


def test_a_non_finite_prior_is_a_miss_not_a_hit():
  candidates = np.random.default_rng(2).normal(size=(12, 4)).astype(
      np.float32)
  queries = tf.constant(np.ones((3, 4), np.float32))
  table = ranking.candidate_table(tf.constant(candidates))
  slots = tf.constant([[5, 6], [7, 0], [8, 9]], tf.int64)
  values = tf.constant([[np.nan, 0.0], [np.inf, 0.0], [1.0, 2.0]])
  targets = tf.constant([5, 7, 9], tf.int64)
  ranks, top = ranking.target_ranks(
      queries, table, targets, k=3,
      bonus=history_bonus.Bonus(slots, values, 0.5))
  ranks = ranks.numpy()
  assert ranks[0] == ranks[1] == metrics.NOT_RETRIEVED
  # The finite row is ranked as its scores say, its prior included.
  scores = with_history_prior((candidates @ np.ones(4))[np.newaxis],
                              [[8, 9]], [[1.0, 2.0]], 0.5)[0]
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
    ("history_bonus_half_lives", "nan", False),
    ("artist_prior_masses", "0,0.3,1", True),
    ("artist_prior_masses", "-1", False)])
def test_the_settings_to_choose_from_are_checked_when_parsed(flag, value, ok):
  flag_values = flags.FlagValues()
  train_flags.define_flags(flag_values)
  if ok:
    flag_values(["train", f"--{flag}={value}"])
  else:
    with pytest.raises(flags.IllegalFlagValueError):
      flag_values(["train", f"--{flag}={value}"])
