"""Non-learned retrievers that the model must beat, ranked like the model.

Each baseline is fitted on the training examples (seed, target, example age)
and returns, for test (seed, target) pairs, the rank of the target over the
whole catalogue. Ties are broken by catalogue index, i.e. by popularity.
"""

import numpy as np


def _rank_of_each_item(scores: np.ndarray) -> np.ndarray:
  """1-based rank of every index under one fixed score vector (index 0 last)."""
  scores = np.asarray(scores, np.float64).copy()
  scores[0] = -np.inf
  order = np.lexsort((np.arange(len(scores)), -scores))
  rank = np.empty(len(scores), np.int64)
  rank[order] = np.arange(1, len(scores) + 1)
  return rank


class MostPopular:
  """Global most-popular: training positives per item."""

  name = "most_popular"

  def __init__(self, num_indices: int, train_targets: np.ndarray):
    counts = np.bincount(train_targets, minlength=num_indices)
    self._rank = _rank_of_each_item(counts)

  def ranks(self, seeds: np.ndarray, targets: np.ndarray) -> np.ndarray:
    del seeds
    return self._rank[targets]


class RecentPopular(MostPopular):
  """Time-decayed popularity: each positive counts 0.5 ** (age / half-life)."""

  name = "recent_popular"

  def __init__(self, num_indices: int, train_targets: np.ndarray,
               train_age_days: np.ndarray, half_life_days: float = 7.0):
    # pylint: disable=super-init-not-called
    decay = np.power(0.5, train_age_days / half_life_days)
    self._rank = _rank_of_each_item(
        np.bincount(train_targets, weights=decay, minlength=num_indices))


class SeedCooccurrence:
  """"After this track, users played...": counts of seed -> next transitions.

  Items never played after the seed follow those that were, in popularity
  order, so a seed never seen in training falls back to most-popular.
  """

  name = "seed_cooccurrence"

  def __init__(self, num_indices: int, train_seeds: np.ndarray,
               train_targets: np.ndarray):
    self._n = np.int64(num_indices)
    keys = train_seeds.astype(np.int64) * self._n + train_targets
    self._keys, self._counts = np.unique(keys, return_counts=True)

  def ranks(self, seeds: np.ndarray, targets: np.ndarray) -> np.ndarray:
    seeds = seeds.astype(np.int64)
    row_start = np.searchsorted(self._keys, seeds * self._n)
    row_stop = np.searchsorted(self._keys, (seeds + 1) * self._n)
    ranks = np.empty(len(seeds), np.int64)
    for i, (start, stop, target) in enumerate(zip(row_start, row_stop,
                                                  targets)):
      items = self._keys[start:stop] - seeds[i] * self._n
      counts = self._counts[start:stop]
      hit = np.searchsorted(items, target)
      if hit < len(items) and items[hit] == target:
        c = counts[hit]
        ranks[i] = 1 + np.sum(counts > c) + np.sum((counts == c) &
                                                   (items < target))
      else:
        # After all co-occurring items, then by index among the rest (index 0
        # is never a candidate).
        ranks[i] = 1 + len(items) + (target - 1) - np.sum(items < target)
    return ranks
