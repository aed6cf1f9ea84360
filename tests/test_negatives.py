"""Mixed negative sampling and the streaming frequency estimate."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import frequency
from tfrs_yambda import model as model_lib
from tfrs_yambda import schema
from tests.conftest import same_target_batch
from tests.conftest import small_model
from tests.conftest import train_batch


def _sequential_algorithm_2(stream, num_buckets, alpha):
  """The paper's update, one occurrence at a time (the reference)."""
  last = np.zeros(num_buckets, np.int64)
  interval = np.zeros(num_buckets, np.float64)
  for step, targets in enumerate(stream, start=1):
    buckets = np.asarray(targets) % num_buckets
    first = {h: np.sum(buckets == h) for h in buckets if last[h] == 0}
    for h in buckets:
      if h in first:  # k occurrences in the first t steps: t / k
        interval[h] = step / first[h]
      else:
        interval[h] = (1 - alpha) * interval[h] + alpha * (step - last[h])
      last[h] = step
  return last, interval


@pytest.mark.parametrize("num_buckets", [50, 7])
def test_estimator_update_is_algorithm_2_one_occurrence_at_a_time(
    num_buckets):
  rng = np.random.default_rng(0)
  # Few items, so batches hold duplicates and (with 7 buckets) collisions.
  stream = [rng.integers(1, 40, size=rng.integers(1, 12)) for _ in range(60)]
  estimator = frequency.StreamingFrequencyEstimator(num_buckets, alpha=0.1)
  for targets in stream:
    estimator(tf.constant(targets, tf.int64), training=True)
  last, interval = _sequential_algorithm_2(stream, num_buckets, 0.1)
  assert int(estimator.step.numpy()) == len(stream)
  np.testing.assert_array_equal(estimator.last_seen.numpy(), last)
  np.testing.assert_allclose(estimator.interval.numpy(), interval, rtol=1e-5)
  # Not training: nothing moves.
  estimator(tf.constant([1, 2, 3], tf.int64), training=False)
  assert int(estimator.step.numpy()) == len(stream)
  np.testing.assert_array_equal(estimator.last_seen.numpy(), last)


def test_estimator_converges_to_the_expected_count_per_step():
  # Items 1..20 with known probabilities, 16 draws per step: item j should be
  # estimated at 16 p_j occurrences per step (from ~5 down to ~0.2).
  rng = np.random.default_rng(1)
  p = 1.0 / np.arange(1, 21)
  p /= p.sum()
  batch, steps, alpha = 16, 4000, 0.01
  estimator = frequency.StreamingFrequencyEstimator(32, alpha=alpha)
  items = tf.range(1, 21, dtype=tf.int64)

  @tf.function
  def step(targets):
    return estimator(targets, items, training=True)

  draws = rng.choice(np.arange(1, 21), size=(steps, batch), p=p)
  late = [step(tf.constant(d, tf.int64)).numpy() for d in draws][steps // 2:]
  estimate = np.mean(late, axis=0)
  # Beyond sampling noise, the update's bias is about alpha (k - 1) / 2.
  np.testing.assert_allclose(estimate, batch * p, rtol=0.1)


def test_estimator_reports_zero_for_items_never_seen():
  estimator = frequency.StreamingFrequencyEstimator(10)
  counts = estimator(tf.constant([3, 3], tf.int64),
                     tf.constant([3, 4], tf.int64), training=True).numpy()
  assert counts[0] > 0 and counts[1] == 0


def test_uniform_draws_cover_the_catalogue_and_never_the_unknown_index(
    catalogue):
  model = small_model(catalogue, uniform_negatives=20_000, uniform_pool="all")
  draws = model.sample_uniform_negatives().numpy()
  assert draws.shape == (20_000,)
  assert draws.min() >= 1 and draws.max() <= catalogue.num_items
  # Roughly uniform: every tenth of the index range gets about a tenth.
  share = np.bincount((draws - 1) * 10 // catalogue.num_items,
                      minlength=10) / len(draws)
  np.testing.assert_allclose(share, 0.1, atol=0.02)


def test_mixed_sampling_probability_is_the_expected_count_share():
  p = np.array([0.5, 0.01, 0.0])
  q = model_lib.mixed_sampling_probability(
      tf.constant(8 * p, tf.float32), 8, num_uniform=4, num_items=100).numpy()
  np.testing.assert_allclose(q, (8 * p + 4 / 100) / 12, rtol=1e-6)
  np.testing.assert_allclose(
      model_lib.mixed_sampling_probability(
          tf.constant(8 * p, tf.float32), 8, 0, 100).numpy(), p, rtol=1e-6)


def _reference_loss(model, batch, sampled, probability):
  """The mixed-negatives loss, by hand, in numpy."""
  queries = model.query_tower(batch).numpy()
  targets = batch[schema.TARGET_ITEM].numpy()
  ids = np.r_[targets, sampled]
  candidates = model.candidate_tower(tf.constant(ids)).numpy()
  scores = queries @ candidates.T / 0.05 - np.log(probability)
  losses = []
  for i, target in enumerate(targets):
    row = scores[i].copy()
    hits = ids == target
    hits[i] = False
    row[hits] = -np.inf  # accidental hits are no negatives
    log_softmax = row[i] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    losses.append(-batch[schema.WEIGHT].numpy()[i] * log_softmax)
  return np.mean(losses)


@pytest.mark.parametrize("sampling_probability", ["counts", "streaming"])
def test_mixed_negatives_loss_is_over_batch_and_uniform_columns(
    prepared, catalogue, sampling_probability):
  batch = train_batch(prepared, catalogue, size=32)
  targets = batch[schema.TARGET_ITEM].numpy()
  # A uniform draw equal to query 0's target (an accidental hit), one drawn
  # twice, and two more.
  sampled = np.array([targets[0], 5, 5, catalogue.num_items], np.int64)
  model = small_model(catalogue, uniform_negatives=len(sampled),
                 uniform_pool="all",
                 sampling_probability=sampling_probability)
  model.sample_uniform_negatives = lambda: tf.constant(sampled)
  loss = float(model.compute_loss(batch, training=True))

  ids = np.r_[targets, sampled]
  if sampling_probability == "counts":
    count = len(targets) * catalogue.sampling_probability()[ids]
  else:  # after one step: each target's count in it (t / k); unseen 0
    count = np.array([np.sum(targets == i) for i in ids], np.float64)
  q = (count + len(sampled) / catalogue.num_items) / (len(targets) +
                                                      len(sampled))
  probability = model.candidate_probability(
      tf.constant(targets), tf.constant(ids)).numpy()
  np.testing.assert_allclose(probability, q / q.max(), rtol=1e-5)
  assert loss == pytest.approx(
      _reference_loss(model, batch, sampled, q / q.max()), rel=1e-4)


def test_uniform_draws_of_the_target_are_no_negatives(catalogue):
  # Every query's target is track 3; so are all but one uniform draw. Only
  # the draw of track 7 is left as a negative, so each query's loss is the
  # two-way softmax of its positive against track 7.
  batch = same_target_batch(catalogue, n=8, target=3)
  model = small_model(catalogue, uniform_negatives=3, logq_correction=False)
  model.sample_uniform_negatives = lambda: tf.constant([3, 7, 3], tf.int64)
  queries = model.query_tower(batch).numpy()
  items = model.candidate_tower(tf.constant([3, 7], tf.int64)).numpy()
  scores = queries @ items.T / 0.05
  expected = np.mean(np.log1p(np.exp(scores[:, 1] - scores[:, 0])))
  assert float(model.compute_loss(batch)) == pytest.approx(expected,
                                                           rel=1e-4)


@pytest.mark.parametrize("options", [
    dict(uniform_negatives=128),
    dict(sampling_probability="streaming"),
    dict(uniform_negatives=128, sampling_probability="streaming"),
])
def test_training_with_each_option_lowers_the_loss(prepared, catalogue,
                                                   options):
  batch = train_batch(prepared, catalogue, size=256)
  model = small_model(catalogue, **options)
  model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
  model.train_step(batch)  # the streaming estimate's first sighting
  tf.random.set_seed(2)
  before = float(model.compute_loss(batch))
  for _ in range(10):
    model.train_step(batch)
  tf.random.set_seed(2)  # the same uniform draws
  after = float(model.compute_loss(batch))
  assert np.isfinite(before) and after < 0.8 * before


def test_estimator_state_is_checkpointed_with_the_model(prepared, catalogue,
                                                        tmp_path):
  batch = train_batch(prepared, catalogue, size=64)
  model = small_model(catalogue, sampling_probability="streaming")
  model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
  for _ in range(3):
    model.train_step(batch)
  path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
  restored = small_model(catalogue, sampling_probability="streaming")
  tf.train.Checkpoint(model=restored).restore(
      path).assert_existing_objects_matched()
  saved, loaded = model.frequency_estimator, restored.frequency_estimator
  assert int(loaded.step.numpy()) == 3
  assert np.count_nonzero(loaded.last_seen.numpy()) > 0
  np.testing.assert_array_equal(loaded.last_seen.numpy(),
                                saved.last_seen.numpy())
  np.testing.assert_array_equal(loaded.interval.numpy(),
                                saved.interval.numpy())



def test_trained_pool_draws_only_items_with_their_own_id_row(catalogue):
  # Enough draws that missing the last id row is a e^-17 event.
  model = small_model(catalogue, uniform_negatives=50_000)  # default pool
  vocabulary = model.query_tower.item_encoder.id_vocabulary_size
  assert vocabulary - 1 < catalogue.num_items  # the tiny data has cold items
  draws = model.sample_uniform_negatives().numpy()
  assert draws.min() >= 1 and draws.max() == vocabulary - 1
  # A cold item is never drawn uniformly: its column has no M / n term.
  q = model_lib.mixed_sampling_probability(
      tf.constant([0.0, 0.0]), 4, 2, vocabulary - 1,
      tf.constant([True, False])).numpy()
  np.testing.assert_allclose(q, [2 / (vocabulary - 1) / 6, 0.0], rtol=1e-6)
