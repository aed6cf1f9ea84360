"""Ranking metrics and baselines on hand-built cases with known answers."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import baselines
from tfrs_yambda import blockwise_ranks
from tfrs_yambda import metrics
from tfrs_yambda import ranking
from tfrs_yambda import report
from tfrs_yambda import schema


def test_rank_metrics_on_known_ranks():
  result = metrics.rank_metrics(np.array([1, 3, 10, 11, 600]), ks=(1, 10, 500))
  assert result["recall@1"] == pytest.approx(1 / 5)
  assert result["recall@10"] == pytest.approx(3 / 5)
  assert result["recall@500"] == pytest.approx(4 / 5)
  assert result["ndcg@1"] == pytest.approx(1 / 5)
  assert result["ndcg@10"] == pytest.approx(
      (1 + 1 / np.log2(4) + 1 / np.log2(11)) / 5)
  assert result["mrr"] == pytest.approx(
      (1 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 600) / 5)
  assert result["examples"] == 5


def test_rank_metrics_rejects_zero_based_ranks():
  with pytest.raises(ValueError, match="1-based"):
    metrics.rank_metrics(np.array([0, 1]))


def test_ranks_from_scores_breaks_ties_by_index_and_skips_index_zero():
  scores = np.array([[9.0, 0.5, 0.9, 0.5, 0.1],
                     [9.0, 0.2, 0.2, 0.2, 0.2]])
  np.testing.assert_array_equal(
      metrics.ranks_from_scores(scores, np.array([3, 4])), [3, 4])


def test_model_ranks_match_numpy_ranks():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(7, 4)).astype(np.float32)
  candidates = rng.normal(size=(20, 4)).astype(np.float32)
  candidates[5] = candidates[6]  # a tie
  targets = np.array([1, 5, 6, 19, 2, 3, 4])
  expected = metrics.ranks_from_scores(queries @ candidates.T, targets)
  actual = ranking.target_ranks(
      tf.constant(queries), ranking.candidate_table(tf.constant(candidates)),
      tf.constant(targets, tf.int64)).numpy()
  np.testing.assert_array_equal(actual, expected)


def test_model_top_k_comes_from_the_same_scores_as_the_ranks():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(6, 4)).astype(np.float32)
  candidates = rng.normal(size=(30, 4)).astype(np.float32)
  candidates[7] = candidates[3]  # a tie: the lower index comes first
  targets = np.array([1, 3, 7, 29, 2, 5])
  ranks, top = ranking.target_ranks(
      tf.constant(queries), ranking.candidate_table(tf.constant(candidates)),
      tf.constant(targets, tf.int64), 5)
  np.testing.assert_array_equal(
      ranks.numpy(), metrics.ranks_from_scores(queries @ candidates.T, targets))
  scores = queries @ candidates.T
  scores[:, 0] = -np.inf
  expected = np.stack([np.lexsort((np.arange(30), -row))[:5] for row in scores])
  np.testing.assert_array_equal(top.numpy(), expected)


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("k", [1, 5, 9, 10])
def test_finite_scores_rank_as_the_minus_inf_pass_would(k, columns):
  # Finite scores skip `scores`' -inf pass; the ranks and lists are those of
  # the pass, ties and index 0 included (with k = all 10 indices, index 0
  # must be listed, last), in either layout of the table.
  rng = np.random.default_rng(2)
  queries = tf.constant(rng.normal(size=(5, 3)).astype(np.float32))
  candidates = rng.normal(size=(10, 3)).astype(np.float32)
  candidates[4] = candidates[2] = candidates[0]  # ties with index 0
  table = ranking.candidate_table(tf.constant(candidates), columns)
  targets = tf.constant([0, 2, 4, 9, 1], tf.int64)
  scored = ranking.scores(queries, table)
  ranks, top = ranking.target_ranks(queries, table, targets, k)
  np.testing.assert_array_equal(
      top, tf.math.top_k(scored, k, sorted=True).indices)
  np.testing.assert_array_equal(ranking.top_k(queries, table, k), top)
  expected = metrics.ranks_from_scores(scored.numpy(), targets.numpy())
  expected[0] = metrics.NOT_RETRIEVED  # index 0 is never a hit
  np.testing.assert_array_equal(ranks, expected)
  # A bound that allows overflow takes the -inf pass: the same answers.
  unbounded = table._replace(bound=tf.constant(np.inf))
  np.testing.assert_array_equal(
      ranking.target_ranks(queries, unbounded, targets, k)[1], top)
  np.testing.assert_array_equal(ranking.top_k(queries, unbounded, k), top)


def _queries(seeds, history=None):
  """Baseline queries: these seeds, and these histories or empty ones."""
  seeds = np.asarray(seeds, np.int64)
  if history is None:
    history = np.zeros((len(seeds), 3), np.int64)
  return {schema.SEED_ITEM: seeds,
          schema.HISTORY_ITEMS: np.asarray(history, np.int64)}


def _assert_top_k_agrees_with_ranks(baseline, queries, k):
  """Item j of a query's top list must be the item that baseline ranks j + 1."""
  top = np.asarray(baseline.top_k(queries, k))
  assert top.shape == (len(queries[schema.SEED_ITEM]), k)
  for row, items in enumerate(top):
    repeated = {name: np.repeat(values[row:row + 1], k, axis=0)
                for name, values in queries.items()}
    np.testing.assert_array_equal(baseline.ranks(repeated, items),
                                  np.arange(1, k + 1))


def test_baseline_top_k_lists_follow_their_ranks():
  targets = np.array([1, 1, 1, 1, 3, 3, 3, 2, 5, 5])
  ages = np.array([60, 60, 60, 60, 1, 1, 1, 2, 3, 3], np.float64)
  seeds = np.array([2, 2, 2, 3, 1, 1, 5, 5, 1, 6])
  for baseline in (baselines.MostPopular(8, targets),
                   baselines.RecentPopular(8, targets, ages),
                   baselines.SeedCooccurrence(8, seeds, targets)):
    _assert_top_k_agrees_with_ranks(baseline, _queries([1, 2, 5, 7]), 7)
  co = baselines.SeedCooccurrence(8, seeds, targets)
  # After seed 1: 3 (twice), 5 (once), then by index 1, 2, 4.
  np.testing.assert_array_equal(co.top_k(_queries([1]), 5), [[3, 5, 1, 2, 4]])


def test_most_popular_and_recent_popular():
  # 5 indices (0 is unknown). Item 1 popular long ago, item 3 popular now.
  targets = np.array([1, 1, 1, 1, 3, 3, 3, 2])
  ages = np.array([60, 60, 60, 60, 1, 1, 1, 2], np.float64)
  popular = baselines.MostPopular(5, targets)
  np.testing.assert_array_equal(popular.ranks(None, np.array([1, 3, 2, 4])),
                                [1, 2, 3, 4])
  recent = baselines.RecentPopular(5, targets, ages, half_life_days=7)
  np.testing.assert_array_equal(recent.ranks(None, np.array([3, 2, 1, 4])),
                                [1, 2, 3, 4])


def test_seed_cooccurrence_ranks_transitions_then_popularity():
  seeds = np.array([1, 1, 1, 2, 2, 2])
  targets = np.array([4, 4, 3, 3, 5, 5])
  co = baselines.SeedCooccurrence(7, seeds, targets)
  # After seed 1: 4 (twice), 3 (once), then by index: 1, 2, 5, 6.
  np.testing.assert_array_equal(
      co.ranks(_queries([1, 1, 1, 1, 1]), np.array([4, 3, 1, 5, 6])),
      [1, 2, 3, 5, 6])
  # Seed 2: 5 (twice), 3 (once). Unseen seed 6: popularity (index) order.
  np.testing.assert_array_equal(
      co.ranks(_queries([2, 2, 6]), np.array([5, 1, 2])), [1, 3, 2])


def test_format_table_lists_every_retriever():
  row = metrics.rank_metrics(np.array([1, 50]), ks=(10, 100))
  row.update({f"cold_target_{k}": v for k, v in metrics.rank_metrics(
      np.array([200]), ks=(10, 100)).items()})
  table = report.format_table({"model": row, "oracle": row}, (10, 100))
  assert table.splitlines()[1].split()[:3] == ["model", "0.5000", "1.0000"]
  cold = report.format_table({"model": row}, (10, 100), prefix="cold_target_")
  assert cold.splitlines()[1].split()[:3] == ["model", "0.0000", "0.0000"]


def test_format_table_marks_missing_values_and_skips_sections():
  results = {"model": {"coverage@10": 0.25}, "oracle": {"recall@10": 0.5},
             "recall_curve": {"k": [1]}, "test_targets": {"coverage": 0.1}}
  table = report.format_table(results, (10,), columns=["coverage@10"])
  assert [line.split() for line in table.splitlines()] == [
      ["retriever", "coverage@10"], ["model", "0.2500"], ["oracle", "-"]]


def test_training_counts_added_in_batches_equal_the_array_baselines(
    monkeypatch):
  rng = np.random.default_rng(3)
  n = 40
  seeds, targets = rng.integers(1, n, 500), rng.integers(1, n, 500)
  ages = rng.uniform(0, 30, 500)
  # Tiny merges, so that pending and merged pairs combine several times.
  monkeypatch.setattr(baselines.TrainingCounts, "min_pending_pairs", 16)
  counts = baselines.TrainingCounts(n, half_life_days=7)
  for start in range(0, 500, 37):
    part = slice(start, start + 37)
    counts.add(seeds[part], targets[part], ages[part])
  streamed = counts.baselines()
  reference = [baselines.MostPopular(n, targets),
               baselines.RecentPopular(n, targets, ages, half_life_days=7),
               baselines.SeedCooccurrence(n, seeds, targets)]
  query_seeds, query_targets = rng.integers(1, n, 200), rng.integers(1, n, 200)
  queries = _queries(query_seeds)
  for got, want in zip(streamed, reference):
    assert got.name == want.name
    np.testing.assert_array_equal(got.ranks(queries, query_targets),
                                  want.ranks(queries, query_targets))
    np.testing.assert_array_equal(got.top_k(_queries(query_seeds[:20]), 10),
                                  want.top_k(_queries(query_seeds[:20]), 10))


class _TableModel:
  """Towers that look their outputs up: query i for the example of user id
  i, candidate row j for index j."""

  def __init__(self, queries: np.ndarray, candidates: np.ndarray):
    # Attributes, as a model's towers are: one object each, which
    # `ranking.candidate_embeddings` traces its loop for once.
    self.query_tower = lambda features: tf.gather(
        tf.constant(queries), features[schema.USER_ID])
    self.candidate_tower = lambda items: tf.gather(tf.constant(candidates),
                                                   items)


def test_blockwise_ranks_equal_the_ranks_over_one_table():
  # Small integers: every product is exact in float32 whichever way it is
  # computed, so the ranks must be identical, ties by index included.
  rng = np.random.default_rng(3)
  candidates = rng.integers(-3, 4, size=(37, 4)).astype(np.float32)
  candidates[[9, 20, 30]] = candidates[5]  # ties across blocks
  candidates[0] = 100  # index 0 would beat everything; it is never a hit
  candidates[12, 1] = np.nan  # scores NaN for every query: never ahead
  candidates[33, 2] = np.inf
  queries = rng.integers(-3, 4, size=(9, 4)).astype(np.float32)
  queries[[1, 2]] = queries[0]  # one query, three tied targets
  queries[7, 0] = np.nan  # a NaN query: a miss
  targets = np.array([5, 9, 30, 36, 0, 12, 1, 2, 20])
  examples = {schema.USER_ID: np.arange(9), schema.TARGET_ITEM: targets,
              schema.SEED_ITEM: np.zeros(9, np.int64),
              schema.HISTORY_ITEMS: np.zeros((9, 2), np.int64)}
  model = _TableModel(queries, candidates)
  expected = ranking.model_ranks(model, examples,
                                 ranking.candidate_embeddings(model, 37))
  for block_items, batch_size in ((8, 4), (12, 8), (1 << 20, 8192)):
    np.testing.assert_array_equal(
        blockwise_ranks.target_ranks(model, examples, 37, block_items,
                                     batch_size), expected)
  assert expected[4] == expected[5] == expected[7] == metrics.NOT_RETRIEVED
  assert expected[0] < expected[1] < expected[2]  # the tie, by index
  # Over indices 0..9 only: targets beyond them are misses.
  np.testing.assert_array_equal(
      blockwise_ranks.target_ranks(model, examples, 10, 8, 4),
      ranking.model_ranks(model, examples,
                          ranking.candidate_embeddings(model, 10)))
