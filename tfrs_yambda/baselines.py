"""Non-learned retrievers that the model must beat, ranked like the model.

Each baseline is fitted on the training examples (seed, target, example age)
and answers queries: dicts of numpy arrays with at least `schema.SEED_ITEM`
and `schema.HISTORY_ITEMS`, one row per query, as the examples and the Yambda
protocol's queries hold them. `ranks(queries, targets)` is each target's
rank over the whole catalogue and `top_k(queries, k)` the first k items of
that same ordering. Ties are broken by catalogue index, i.e. by popularity.
ItemKNN, which reads the histories, is `tfrs_yambda.itemknn`.
"""

from typing import Dict, Tuple

import numpy as np

from tfrs_yambda import schema


def _rank_of_each_item(scores: np.ndarray) -> np.ndarray:
  """1-based rank of every index under one fixed score vector (index 0 last)."""
  scores = np.asarray(scores, np.float64).copy()
  scores[0] = -np.inf
  order = np.lexsort((np.arange(len(scores)), -scores))
  rank = np.empty(len(scores), np.int64)
  rank[order] = np.arange(1, len(scores) + 1)
  return rank


def pair_keys(num_indices: int, seeds: np.ndarray,
              targets: np.ndarray) -> np.ndarray:
  """One int64 per (seed, target) pair, ordered by seed, then target."""
  return seeds.astype(np.int64) * np.int64(num_indices) + targets


def top_per_row(rows: np.ndarray, columns: np.ndarray, values: np.ndarray,
                 num_rows: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
  """([num_rows, width] columns, their values): each row's `width` largest
  positive values of a sparse (rows, columns, values) table, largest first,
  ties by column; 0 where a row has fewer (the priors' tables)."""
  keep = values > 0
  rows, columns, values = rows[keep], columns[keep], values[keep]
  order = np.lexsort((columns, -values, rows))
  rows, columns, values = rows[order], columns[order], values[order]
  position = np.arange(len(rows)) - np.searchsorted(rows, rows, "left")
  kept = position < width
  top_columns = np.zeros((num_rows, width), np.int64)
  top_values = np.zeros((num_rows, width), np.float64)
  top_columns[rows[kept], position[kept]] = columns[kept]
  top_values[rows[kept], position[kept]] = values[kept]
  return top_columns, top_values


class MostPopular:
  """Global most-popular: training positives per item."""

  name = "most_popular"

  def __init__(self, num_indices: int, train_targets: np.ndarray):
    self._set_scores(np.bincount(train_targets, minlength=num_indices))

  @classmethod
  def from_scores(cls, scores: np.ndarray) -> "MostPopular":
    """The baseline for per-index scores accumulated elsewhere."""
    baseline = cls.__new__(cls)
    baseline._set_scores(scores)  # pylint: disable=protected-access
    return baseline

  def _set_scores(self, scores: np.ndarray) -> None:
    self.scores = np.asarray(scores)  # per index, as fitted
    self._rank = _rank_of_each_item(scores)
    self._by_rank = np.argsort(self._rank)  # index 0 last

  def ranks(self, queries: Dict[str, np.ndarray],
            targets: np.ndarray) -> np.ndarray:
    del queries  # the same ranking for every query
    return self._rank[targets]

  def top_k(self, queries: Dict[str, np.ndarray], k: int) -> np.ndarray:
    """The same k best items for every query, int [queries, k] (a view)."""
    return np.broadcast_to(self._by_rank[:k],
                           (len(queries[schema.SEED_ITEM]), k))


class RecentPopular(MostPopular):
  """Time-decayed popularity: each positive counts 0.5 ** (age / half-life)."""

  name = "recent_popular"

  def __init__(self, num_indices: int, train_targets: np.ndarray,
               train_age_days: np.ndarray, half_life_days: float = 7.0):
    # pylint: disable=super-init-not-called
    decay = np.power(0.5, train_age_days / half_life_days)
    self._set_scores(
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
    self._keys, self._counts = np.unique(
        pair_keys(num_indices, train_seeds, train_targets), return_counts=True)

  @classmethod
  def from_pair_counts(cls, num_indices: int, keys: np.ndarray,
                       counts: np.ndarray) -> "SeedCooccurrence":
    """The baseline for sorted distinct `pair_keys` and their counts."""
    baseline = cls.__new__(cls)
    baseline._n = np.int64(num_indices)  # pylint: disable=protected-access
    baseline._keys, baseline._counts = keys, counts  # pylint: disable=protected-access
    return baseline

  def pair_counts(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seeds, targets, counts) of every (seed, target) pair seen."""
    return self._keys // self._n, self._keys % self._n, self._counts

  def _row(self, seed: int):
    """The items played after `seed` and their counts (items ascending)."""
    start, stop = np.searchsorted(self._keys, [seed * self._n,
                                               (seed + 1) * self._n])
    return self._keys[start:stop] - seed * self._n, self._counts[start:stop]

  def top_k(self, queries: Dict[str, np.ndarray], k: int) -> np.ndarray:
    """The k best items after each query's seed, int [queries, k].

    Co-occurring items by count (ties by index), then the others by index,
    as `ranks` orders them; each distinct seed's list is built once.
    """
    unique, inverse = np.unique(
        np.asarray(queries[schema.SEED_ITEM], np.int64), return_inverse=True)
    lists = np.empty((len(unique), k), np.int64)
    for row, seed in enumerate(unique):
      items, counts = self._row(int(seed))
      listed = items[np.lexsort((items, -counts))][:k]
      # Fill from indices 1.. in order, skipping those already listed.
      fill = np.arange(1, k + len(items) + 1)
      fill = fill[~np.isin(fill, items)][:k - len(listed)]
      lists[row] = np.concatenate([listed, fill])
    return lists[inverse.reshape(-1)]

  def ranks(self, queries: Dict[str, np.ndarray],
            targets: np.ndarray) -> np.ndarray:
    seeds = np.asarray(queries[schema.SEED_ITEM], np.int64)
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


class TrainingCounts:
  """What the baselines learn from training examples, added batch by batch.

  Memory grows with the catalogue and the distinct (seed, target) pairs, not
  with the examples: at hundreds of millions of examples, collecting their
  seeds, targets and ages first would take gigabytes.
  """

  # Pair keys pending before a merge, at least (see `_merge_pairs`).
  min_pending_pairs = 1 << 22

  def __init__(self, num_indices: int, half_life_days: float = 7.0):
    self.num_indices = num_indices
    self.half_life_days = half_life_days
    self.popularity = np.zeros(num_indices, np.int64)
    self.decayed = np.zeros(num_indices, np.float64)
    self._keys = np.zeros(0, np.int64)
    self._counts = np.zeros(0, np.int64)
    self._pending = []
    self._pending_size = 0

  def add(self, seeds: np.ndarray, targets: np.ndarray,
          age_days: np.ndarray) -> None:
    # Added where the batch's targets are: a bincount over the whole
    # catalogue per batch took 26 ms at 9.4M items, half the fitting time.
    # The per-index sums, in batch order, are the same.
    touched, inverse = np.unique(targets, return_inverse=True)
    inverse = inverse.reshape(-1)
    self.popularity[touched] += np.bincount(inverse, minlength=len(touched))
    self.decayed[touched] += np.bincount(
        inverse, weights=np.power(0.5, age_days / self.half_life_days),
        minlength=len(touched))
    self._pending.append(pair_keys(self.num_indices, seeds, targets))
    self._pending_size += len(targets)
    # Merge once the pending keys outnumber the merged ones: each sort then at
    # least halves what it re-reads.
    if self._pending_size >= max(len(self._keys), self.min_pending_pairs):
      self._merge_pairs()

  def _merge_pairs(self) -> None:
    pending = np.concatenate(self._pending) if self._pending else np.zeros(
        0, np.int64)
    keys, inverse = np.unique(np.concatenate([self._keys, pending]),
                              return_inverse=True)
    weights = np.concatenate([self._counts, np.ones(len(pending), np.int64)])
    self._counts = np.bincount(inverse.reshape(-1), weights=weights,
                               minlength=len(keys)).astype(np.int64)
    self._keys = keys
    self._pending, self._pending_size = [], 0

  def baselines(self) -> list:
    """MostPopular, RecentPopular and SeedCooccurrence from the counts."""
    self._merge_pairs()
    return [MostPopular.from_scores(self.popularity),
            RecentPopular.from_scores(self.decayed),
            SeedCooccurrence.from_pair_counts(self.num_indices, self._keys,
                                              self._counts)]
