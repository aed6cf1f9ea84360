"""ItemKNN: co-occurrence counts, neighbour lists and scores by hand."""

import numpy as np
import pytest

from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import itemknn
from tfrs_yambda import schema
from tests.conftest import HISTORY_LENGTH

# Items 1..5. Training positives in time order: user A plays 1, 2, 3; user B
# 1, 2, 1; user C 4, 5. As examples (history N = 3, oldest first, 0-padded):
_HISTORY = np.array([[0, 0, 1], [0, 1, 2],    # A: targets 2, 3
                     [0, 0, 1], [0, 1, 2],    # B: targets 2, 1
                     [0, 0, 4]])              # C: target 5
_TARGETS = np.array([2, 3, 2, 1, 5])
# With a window of 2, the pairs {target, history item}: A {1, 2}, {1, 3},
# {2, 3}; B {1, 2}, {1, 1}, {1, 2}; C {4, 5}.
_CO = {(1, 1): 1, (1, 2): 3, (1, 3): 1, (2, 3): 1, (4, 5): 1}
# n_i: targets per item (item 4 is never one: counts as 1).
_N = np.array([0, 1, 2, 1, 0, 1])


def _queries(seeds, history):
  return {schema.SEED_ITEM: np.asarray(seeds, np.int64),
          schema.HISTORY_ITEMS: np.asarray(history, np.int64)}


def _hand_knn(k, seed_weight=2.0):
  knn = itemknn.ItemKNN.fit(6, _HISTORY, _TARGETS, max_neighbours=3,
                            window=2, seed_weight=seed_weight,
                            item_counts=_N)
  return knn.with_neighbours(k)


def test_pair_counts_and_neighbour_lists_by_hand():
  counts = itemknn.PairCounts(6, window=2)
  counts.add(_HISTORY, _TARGETS)
  keys, co = counts.result()
  assert {divmod(int(key), 6): int(c) for key, c in zip(keys, co)} == _CO
  offsets, neighbours, sims = itemknn.neighbour_lists(6, keys, co, _N, 3)
  # sim = co / sqrt(n_i n_j): {1, 2} 3 / sqrt(2), {2, 3} 1 / sqrt(2), the
  # others 1; most similar first, ties by index.
  expected = {1: [(2, 3 / np.sqrt(2)), (1, 1.0), (3, 1.0)],
              2: [(1, 3 / np.sqrt(2)), (3, 1 / np.sqrt(2))],
              3: [(1, 1.0), (2, 1 / np.sqrt(2))],
              4: [(5, 1.0)], 5: [(4, 1.0)]}
  assert offsets[0] == offsets[1] == 0  # index 0 has no neighbours
  for item, row in expected.items():
    span = slice(offsets[item], offsets[item + 1])
    assert neighbours[span].tolist() == [j for j, _ in row]
    np.testing.assert_allclose(sims[span], [s for _, s in row], rtol=1e-6)
  # Two neighbours each: the prefix of the lists.
  offsets, neighbours, _ = itemknn.neighbour_lists(6, keys, co, _N, 2)
  assert neighbours[offsets[1]:offsets[2]].tolist() == [2, 1]


def test_scores_rank_and_list_by_hand():
  # Query 0: history 3 (played twice), seed 4 (weight 2). With one neighbour:
  # 1 <- 2 x sim(3, 1) = 2, 5 <- 2 x sim(4, 5) = 2 (a tie: index order),
  # then the unscored 2, 3, 4. With two, 2 gets 2 x 1 / sqrt(2): third.
  # Query 1: history 2, seed 5. One neighbour: 1 <- 3 / sqrt(2), 4 <- 2;
  # two: 3 <- 1 / sqrt(2) too, ahead of 2. Query 2: nothing known.
  queries = _queries([4, 5, 0], [[0, 3, 3], [0, 0, 2], [0, 0, 0]])
  expected = {1: [[1, 5, 2, 3, 4], [1, 4, 2, 3, 5], [1, 2, 3, 4, 5]],
              2: [[1, 5, 2, 3, 4], [1, 4, 3, 2, 5], [1, 2, 3, 4, 5]]}
  for k, lists in expected.items():
    knn = _hand_knn(k)
    np.testing.assert_array_equal(knn.top_k(queries, 5), lists)
    np.testing.assert_array_equal(knn.top_k(queries, 2),
                                  np.array(lists)[:, :2])
    for row, items in enumerate(lists):
      one = {name: np.repeat(v[row:row + 1], 5, 0)
             for name, v in queries.items()}
      np.testing.assert_array_equal(knn.ranks(one, np.array(items)),
                                    [1, 2, 3, 4, 5])
  # Every neighbourhood from one accumulation, as each alone.
  by_k = _hand_knn(3).ranks_by_neighbours(queries, np.array([3, 3, 3]),
                                          [1, 2])
  assert by_k[1].tolist() == [4, 4, 3] and by_k[2].tolist() == [4, 3, 3]
  with pytest.raises(ValueError, match="hold 3"):
    _hand_knn(4)
  # A window without examples.
  empty = _queries(np.zeros(0), np.zeros((0, 3)))
  assert _hand_knn(2).top_k(empty, 5).shape == (0, 5)
  assert _hand_knn(2).ranks(empty, np.zeros(0, np.int64)).shape == (0,)


def test_top_k_follows_ranks_in_small_batches(monkeypatch):
  rng = np.random.default_rng(0)
  n, history_length = 40, 6
  history = rng.integers(0, n, (600, history_length))
  targets = rng.integers(1, n, 600)
  knn = itemknn.ItemKNN.fit(n, history, targets, max_neighbours=8, window=3)
  queries = _queries(rng.integers(0, n, 30),
                     rng.integers(0, n, (30, history_length)))
  top = knn.top_k(queries, n - 1)
  # Batches of one or two queries give the same lists.
  monkeypatch.setattr(itemknn.ItemKNN, "max_chunk_entries", 60)
  np.testing.assert_array_equal(knn.top_k(queries, n - 1), top)
  np.testing.assert_array_equal(knn.top_k(queries, 7), top[:, :7])
  for row, items in enumerate(top):
    one = {name: np.repeat(v[row:row + 1], n - 1, 0)
           for name, v in queries.items()}
    # The item at rank r is top_k's (r - 1)-th: one ordering, no duplicates.
    np.testing.assert_array_equal(knn.ranks(one, items), np.arange(1, n))


def test_merged_counts_equal_one_sort_and_pruning_keeps_frequent_pairs(
    monkeypatch):
  rng = np.random.default_rng(1)
  n = 50
  # Skewed items, so that some pairs are frequent.
  history = np.minimum(rng.zipf(1.5, (2000, 5)), n - 1)
  history[rng.random(history.shape) < 0.2] = 0
  targets = np.minimum(rng.zipf(1.5, 2000), n - 1)
  low = np.minimum(history, targets[:, None])[history > 0]
  high = np.maximum(history, targets[:, None])[history > 0]
  want_keys, want_counts = np.unique(low * n + high, return_counts=True)
  monkeypatch.setattr(itemknn.PairCounts, "min_pending_pairs", 64)
  merged = itemknn.PairCounts(n, window=5)
  for start in range(0, 2000, 77):  # many merges of uneven batches
    merged.add(history[start:start + 77], targets[start:start + 77])
  keys, counts = merged.result()
  np.testing.assert_array_equal(keys, want_keys)
  np.testing.assert_array_equal(counts, want_counts)
  assert not merged.prune_thresholds

  pruned = itemknn.PairCounts(n, window=5, max_pairs=100)
  for start in range(0, 2000, 77):
    pruned.add(history[start:start + 77], targets[start:start + 77])
  keys, counts = pruned.result()
  assert pruned.prune_thresholds and len(keys) <= 100
  truth = dict(zip(want_keys.tolist(), want_counts.tolist()))
  got = np.array([truth[key] for key in keys.tolist()])
  # Lossy counting: each kept count is short by at most the thresholds.
  assert np.all(counts <= got)
  assert np.all(got - counts <= sum(pruned.prune_thresholds))
  # The most frequent pairs survive.
  for key in want_keys[np.argsort(-want_counts)[:10]]:
    assert key in keys


def test_choose_neighbours_keeps_the_best_validation_metric():
  knn = _hand_knn(3)
  queries = _queries([5, 5], [[0, 0, 2], [0, 0, 2]])
  # Target 3 ranks 4th with one neighbour, 3rd with two or three.
  chosen, values = itemknn.choose_neighbours(
      knn, queries, np.array([3, 3]), num_candidates=5, neighbours=[1, 2, 3],
      metric="recall@3", ks=(1, 3))
  assert values == {1: 0.0, 2: 1.0, 3: 1.0}
  assert chosen.k == 2  # ties go to the smaller neighbourhood
  # A target outside the window's candidates is a miss for every K.
  _, values = itemknn.choose_neighbours(
      knn, queries, np.array([3, 3]), num_candidates=2, neighbours=[1, 2],
      metric="recall@3", ks=(3,))
  assert values == {1: 0.0, 2: 0.0}
  with pytest.raises(ValueError, match="recall@50"):
    itemknn.choose_neighbours(knn, queries, np.array([3, 3]), 5, [1],
                              "recall@50", (10,))


def test_fit_baselines_streams_the_same_item_knn(prepared, catalogue):
  rule = input_pipeline.ExampleRule()
  config = itemknn.ItemKNNConfig(neighbours=(5, 30), window=4)
  fitted = evaluate.fit_baselines(catalogue, prepared, rule,
                                  knn_config=config)
  assert [b.name for b in fitted] == ["most_popular", "recent_popular",
                                      "seed_cooccurrence", "item_knn"]
  knn = fitted[-1]
  assert knn.k == 30
  train = evaluate.load_examples(prepared, "train", HISTORY_LENGTH, rule)
  in_memory = itemknn.ItemKNN.fit(
      catalogue.num_items + 1, train[schema.HISTORY_ITEMS],
      train[schema.TARGET_ITEM], 30, 4)
  test = evaluate.load_examples(prepared, "test", HISTORY_LENGTH, rule)
  queries = evaluate.baseline_queries(test)
  targets = test[schema.TARGET_ITEM]
  np.testing.assert_array_equal(knn.ranks(queries, targets),
                                in_memory.ranks(queries, targets))
  # It retrieves far more than popularity on the tiny data's test day.
  assert (np.mean(knn.ranks(queries, targets) <= 10) >
          2 * np.mean(fitted[0].ranks(queries, targets) <= 10))
