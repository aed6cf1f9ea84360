"""The two-step top-k gives `tf.math.top_k`'s lists, ties and -inf included."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import chunked_top_k
from tfrs_yambda import ranking


def _one_step(scores, k):
  return tf.math.top_k(scores, k, sorted=True).indices.numpy()


@pytest.mark.parametrize("n", [96, 203])  # a multiple of the chunk, and not
@pytest.mark.parametrize("k", [1, 3, 11])
def test_two_steps_equal_one_top_k_with_ties_and_minus_inf(n, k):
  # Scores from a handful of values tie everywhere, within and across
  # chunks; -inf entries tie too, and whole chunks of -inf are not chosen
  # ahead of the lowest-index real ones.
  rng = np.random.default_rng(n + k)
  scores = rng.integers(0, 4, size=(6, n)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.3] = -np.inf
  scores[1, :] = -np.inf
  scores[2, 3:] = -np.inf
  chunk = 2 if k == 11 else 4
  assert n >= 4 * (k + 1) * chunk  # the two-step path
  np.testing.assert_array_equal(
      chunked_top_k.top_k(tf.constant(scores), k, chunk).numpy(),
      _one_step(scores, k))


def test_k_as_a_tensor_and_short_rows_take_one_step():
  scores = tf.constant(np.random.default_rng(0).normal(size=(3, 50)),
                       tf.float32)
  for k in (tf.constant(5), 5, 50):  # 50: the whole row, too short to chunk
    np.testing.assert_array_equal(chunked_top_k.top_k(scores, k, 2).numpy(),
                                  _one_step(scores, k))
  np.testing.assert_array_equal(chunked_top_k.top_k(scores, 5, 0).numpy(),
                                _one_step(scores, 5))


def test_chunk_maxima_pad_the_last_chunk():
  scores = tf.constant([[1.0, 5.0, 2.0, -1.0, 7.0]])
  np.testing.assert_array_equal(
      chunked_top_k.chunk_maxima(scores, 2).numpy(), [[5.0, 2.0, 7.0]])


@pytest.mark.parametrize("finite", [True, False])
def test_ranking_lists_and_ranks_do_not_depend_on_the_chunk(finite):
  # Through `ranking`: index 0 left out, ties by index, and with a
  # non-finite candidate the -inf pass; chunked or not, the same answers.
  rng = np.random.default_rng(3)
  candidates = np.round(rng.normal(size=(400, 4)), 1).astype(np.float32)
  candidates[7] = candidates[0] = candidates[300]
  if not finite:
    candidates[5, 0] = np.nan
  queries = tf.constant(np.round(rng.normal(size=(9, 4)), 1), tf.float32)
  table = ranking.candidate_table(tf.constant(candidates))
  targets = tf.constant(rng.integers(0, 400, 9), tf.int64)
  for k in (1, 10):
    np.testing.assert_array_equal(ranking.top_k(queries, table, k, chunk=4),
                                  ranking.top_k(queries, table, k, chunk=0))
    chunked = ranking.target_ranks(queries, table, targets, k, chunk=4)
    whole = ranking.target_ranks(queries, table, targets, k, chunk=0)
    for a, b in zip(chunked, whole):
      np.testing.assert_array_equal(a, b)
