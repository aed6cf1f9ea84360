"""ItemKNN: item-item cosine similarity over training positives.

The strongest non-learned baseline of the Yambda paper. Two tracks are
similar when the same listeners play them close together:

  sim(i, j) = co(i, j) / sqrt(n_i * n_j),

where n_i counts item i's training positives and co(i, j) counts the pairs of
positives of i and j in one user's sequence. Counting every pair a user ever
played is quadratic in their distinct tracks (about 3,000 each at 500m), so
co counts pairs at most `window` positives apart: each training target with
the last `window` items of its history (`schema.HISTORY_ITEMS`), which the
examples already carry. A track replayed within the window pairs with
itself, so sim(i, i) is i's replay rate: replays, common in music, are
retrievable.

Only the `max_neighbours` most similar items of each item are kept (a
neighbourhood of K, chosen on the validation day among `neighbours`). A query
(seed and history) scores item j by the sum, over its history items h and
its seed, of sim(h, j) when j is among h's K neighbours; an item played
several times counts as often. Items without a score follow in index order
(popularity, as for the other baselines); index 0 is never a candidate.

Memory stays bounded at any scale: pairs are counted as sorted int64 keys
with counts, merged in bounded batches, and at most `max_pairs` distinct
pairs are kept (lossy counting: past that, the rarest pairs are dropped, see
`PairCounts`); the neighbour lists hold at most K entries per item, and a
query batch never spans more than `ItemKNN.max_chunk_entries` gathered
neighbours.
"""

import copy
import dataclasses
from typing import Dict, Sequence, Tuple

import numpy as np
import pandas as pd

from tfrs_yambda import metrics
from tfrs_yambda import ranking
from tfrs_yambda import schema


@dataclasses.dataclass(frozen=True)
class ItemKNNConfig:
  """How ItemKNN is fitted and which neighbourhood sizes are tried.

  Attributes:
    neighbours: the sizes K tried on the validation day; lists of the
      largest are kept, a smaller K uses their prefix.
    window: a target pairs with the last `window` positives before it.
    seed_weight: a query's seed counts like this many history items.
    max_pairs: distinct (i, j) pairs kept while counting (16 bytes each).
  """
  neighbours: Tuple[int, ...] = (20, 100, 500)
  window: int = 10
  seed_weight: float = 8.0
  max_pairs: int = 1 << 26


class PairCounts:
  """Co-occurrence counts of training positives, added batch by batch.

  Each pair is one int64 key min(i, j) * num_indices + max(i, j) (so co is
  symmetric), and the sorted distinct keys hold their counts. New keys wait
  in a list and are merged in once they outnumber half the merged ones
  (sorted once, then inserted in one linear pass), so the sorting work per
  key stays logarithmic. When more than `max_pairs` distinct pairs are held,
  the least counted are dropped until at most half remain: a dropped pair
  seen again starts again from 0, so a kept count is short by at most the
  sum of `prune_thresholds` (the lossy counting of Manku and Motwani, 2002);
  none is dropped while the pairs fit.
  """

  # Raw keys pending before a merge, at least.
  min_pending_pairs = 1 << 22

  def __init__(self, num_indices: int, window: int,
               max_pairs: int = ItemKNNConfig.max_pairs):
    self.num_indices = np.int64(num_indices)
    self.window = window
    self.max_pairs = max_pairs
    self.prune_thresholds = []
    self._keys = np.zeros(0, np.int64)
    self._counts = np.zeros(0, np.int64)
    self._pending, self._pending_size = [], 0

  def add(self, history: np.ndarray, targets: np.ndarray) -> None:
    """Counts each target with the last `window` items of its history.

    Args:
      history: int [batch, N], oldest first, 0-padded in front.
      targets: int [batch], the positives that follow them.
    """
    recent = np.asarray(history, np.int64)[:, history.shape[1] - min(
        self.window, history.shape[1]):]
    targets = np.broadcast_to(np.asarray(targets, np.int64)[:, np.newaxis],
                              recent.shape)
    real = recent > 0  # 0 pads the history
    low = np.minimum(recent, targets)[real]
    high = np.maximum(recent, targets)[real]
    self._pending.append(low * self.num_indices + high)
    self._pending_size += len(low)
    if self._pending_size >= max(min(len(self._keys), self.max_pairs // 2),
                                 self.min_pending_pairs):
      self._merge()

  def _merge(self) -> None:
    if not self._pending:
      return
    raw = np.concatenate(self._pending)
    self._pending, self._pending_size = [], 0
    raw.sort()
    starts = np.flatnonzero(np.concatenate([[True], raw[1:] != raw[:-1]]))
    keys, counts = raw[starts], np.diff(np.append(starts, len(raw)))
    del raw
    at = np.searchsorted(self._keys, keys)
    found = at < len(self._keys)
    found[found] = self._keys[at[found]] == keys[found]
    self._counts[at[found]] += counts[found]
    # np.insert keeps the order: equal positions take new keys ascending.
    self._keys = np.insert(self._keys, at[~found], keys[~found])
    self._counts = np.insert(self._counts, at[~found], counts[~found])
    if len(self._keys) > self.max_pairs:
      self._prune()

  def _prune(self) -> None:
    """Keeps the pairs counted more than the (max_pairs // 2 + 1)-th most."""
    keep = self.max_pairs // 2
    threshold = int(np.partition(self._counts, len(self._counts) - keep - 1)[
        len(self._counts) - keep - 1])
    kept = self._counts > threshold
    self._keys, self._counts = self._keys[kept], self._counts[kept]
    self.prune_thresholds.append(threshold)

  def result(self) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted distinct pair keys, their counts), all pending merged."""
    self._merge()
    return self._keys, self._counts


def neighbour_lists(num_indices: int, keys: np.ndarray, counts: np.ndarray,
                    item_counts: np.ndarray, max_neighbours: int,
                    block_entries: int = 1 << 22):
  """Each item's `max_neighbours` most similar items, as compressed rows.

  Every pair (i, j) is a neighbour of i and of j, at sim = co / sqrt(n_i n_j)
  (float32). The rows are built a block of items at a time, so the memory
  beside the pairs is that of about `block_entries` (item, neighbour) rows.

  Args:
    num_indices: catalogue indices 0..num_indices - 1.
    keys: `PairCounts.result` keys (low index * num_indices + high).
    counts: their co-occurrence counts.
    item_counts: n_i, training positives per index (0 counts as 1: a history
      item need not be the target of an example).
    max_neighbours: neighbours kept per item.
    block_entries: (item, neighbour) rows sorted at a time.

  Returns:
    (offsets int64 [num_indices + 1], neighbours int32, sims float32): item
    i's neighbours are neighbours[offsets[i]:offsets[i + 1]], most similar
    first, ties by index.
  """
  n = np.int64(num_indices)
  low, high = (part.astype(np.int32) for part in np.divmod(keys, n))
  norm = np.sqrt(np.maximum(item_counts, 1).astype(np.float64))
  sims = (counts / (norm[low] * norm[high])).astype(np.float32)
  other = low != high  # a pair (i, i) is i's neighbour once
  per_item = (np.bincount(low, minlength=n) +
              np.bincount(high[other], minlength=n))
  ends = np.cumsum(per_item)
  rows, cols, values = [], [], []
  first = 0
  while first < n:
    done = ends[first - 1] if first else 0
    last = max(int(np.searchsorted(ends, done + block_entries, "right")),
               first + 1)
    # Pairs whose low item is in the block are contiguous; high ones not.
    span = slice(*np.searchsorted(keys, [first * n, last * n]))
    flipped = other & (high >= first) & (high < last)
    row = np.concatenate([low[span], high[flipped]])
    col = np.concatenate([high[span], low[flipped]])
    sim = np.concatenate([sims[span], sims[flipped]])
    order = np.lexsort((col, -sim, row))
    row, col, sim = row[order], col[order], sim[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row)
    kept = rank < max_neighbours
    rows.append(row[kept])
    cols.append(col[kept])
    values.append(sim[kept])
    first = last
  offsets = np.zeros(n + 1, np.int64)
  np.cumsum(np.bincount(np.concatenate(rows), minlength=n), out=offsets[1:])
  return offsets, np.concatenate(cols), np.concatenate(values)


class ItemKNN:
  """Scores every item by its similarity to the query's history and seed.

  `ranks` and `top_k` read the same sparse scores: per query, the items in
  the neighbour lists of its history and seed, accumulated in a batch of
  queries at a time (never a dense [queries, items] matrix).
  """

  name = "item_knn"
  # Gathered (query, neighbour) entries per batch of queries, at most: about
  # 40 bytes each while they are summed.
  max_chunk_entries = 1 << 22

  def __init__(self, num_indices: int, offsets: np.ndarray,
               neighbours: np.ndarray, sims: np.ndarray, max_neighbours: int,
               seed_weight: float = ItemKNNConfig.seed_weight):
    self._n = np.int64(num_indices)
    self._offsets, self._neighbours, self._sims = offsets, neighbours, sims
    self.max_neighbours = max_neighbours
    self.k = max_neighbours  # the neighbourhood in use
    self.seed_weight = seed_weight

  @classmethod
  def fit(cls, num_indices: int, history: np.ndarray, targets: np.ndarray,
          max_neighbours: int, window: int,
          seed_weight: float = ItemKNNConfig.seed_weight,
          item_counts: np.ndarray = None) -> "ItemKNN":
    """ItemKNN from training examples held in memory (see `PairCounts`)."""
    counts = PairCounts(num_indices, window)
    counts.add(history, targets)
    if item_counts is None:
      item_counts = np.bincount(targets, minlength=num_indices)
    return cls(num_indices, *neighbour_lists(
        num_indices, *counts.result(), item_counts, max_neighbours),
               max_neighbours, seed_weight)

  def with_neighbours(self, k: int) -> "ItemKNN":
    """The same lists cut at K neighbours per item (K <= max_neighbours)."""
    if not 0 < k <= self.max_neighbours:
      raise ValueError(f"K={k}: the lists hold {self.max_neighbours}.")
    knn = copy.copy(self)  # shares the lists
    knn.k = k
    return knn

  def _scores(self, queries: Dict[str, np.ndarray],
              ks: Sequence[int]) -> Tuple[np.ndarray, Dict[int, np.ndarray]]:
    """Sparse scores of a batch of queries, for each neighbourhood in `ks`.

    Returns:
      (keys, {K: scores}): keys = query row * num_indices + item, distinct,
      grouped by row in row order, every item some neighbour list reaches;
      scores float64 aligned with them, 0 where only lists longer than K
      reach the item.
    """
    history = np.asarray(queries[schema.HISTORY_ITEMS], np.int64)
    seeds = np.asarray(queries[schema.SEED_ITEM], np.int64)
    items = np.concatenate([history, seeds[:, np.newaxis]], axis=1)
    weights = np.ones(items.shape)
    weights[:, -1] = self.seed_weight
    rows = np.arange(len(items))[:, np.newaxis]
    # A track played several times is gathered once, at its total weight.
    # (pd.factorize: np.unique's inverse by a hash table, without its slow
    # argsort; nothing here needs the keys sorted.)
    real = (items > 0) & (weights > 0)
    where, query_keys = pd.factorize((rows * self._n + items)[real])
    query_weights = np.bincount(where, weights=weights[real])
    query_rows, query_items = np.divmod(query_keys, self._n)
    start = self._offsets[query_items]
    length = np.minimum(self._offsets[query_items + 1] - start, max(ks))
    owner = np.repeat(np.arange(len(start)), length)
    position = np.arange(len(owner)) - np.repeat(np.cumsum(length) - length,
                                                 length)
    entry = start[owner] + position
    where, keys = pd.factorize(query_rows[owner] * self._n +
                               self._neighbours[entry])
    values = query_weights[owner] * self._sims[entry]
    return keys, {k: np.bincount(where, weights=np.where(position < k, values,
                                                         0.0),
                                 minlength=len(keys)) for k in ks}

  def _chunks(self, queries: Dict[str, np.ndarray], ks: Sequence[int]):
    """Yields (row slice, keys, {K: scores}) over batches of queries."""
    seeds, history = queries[schema.SEED_ITEM], queries[schema.HISTORY_ITEMS]
    # (An empty window's history may be 1-D: no rows to score.)
    width = (np.shape(history)[-1] + 1) * max(ks)
    step = max(1, self.max_chunk_entries // width)
    for start in range(0, len(seeds), step):
      part = slice(start, start + step)
      yield (part, *self._scores({schema.SEED_ITEM: seeds[part],
                                  schema.HISTORY_ITEMS: history[part]}, ks))

  def _sparse_ranks(self, keys, scores, targets):
    """1-based ranks of `targets` (one per row) under sparse scores."""
    rows, items = np.divmod(keys, self._n)
    scored = scores > 0
    hit = scored & (items == targets[rows])  # at most one per row
    found = np.zeros(len(targets), bool)
    found[rows[hit]] = True
    target_score = np.zeros(len(targets))
    target_score[rows[hit]] = scores[hit]
    # Ahead of the target: higher scores, equal ones at lower indices; when
    # the target has no score, every scored item.
    ahead = scored & ((scores > target_score[rows]) | (
        (scores == target_score[rows]) & (items < targets[rows])))
    below = scored & (items < targets[rows])
    n_ahead = np.bincount(rows[ahead], minlength=len(targets))
    n_below = np.bincount(rows[below], minlength=len(targets))
    return 1 + n_ahead + np.where(found, 0, targets - 1 - n_below)

  def ranks_by_neighbours(self, queries: Dict[str, np.ndarray],
                          targets: np.ndarray,
                          ks: Sequence[int]) -> Dict[int, np.ndarray]:
    """{K: each target's rank with K neighbours}, from one accumulation."""
    targets = np.asarray(targets, np.int64)
    out = {k: np.empty(len(targets), np.int64) for k in ks}
    for part, keys, scores in self._chunks(queries, ks):
      for k in ks:
        out[k][part] = self._sparse_ranks(keys, scores[k], targets[part])
    return out

  def ranks(self, queries: Dict[str, np.ndarray],
            targets: np.ndarray) -> np.ndarray:
    """Each target's 1-based rank over the catalogue for its query."""
    return self.ranks_by_neighbours(queries, targets, [self.k])[self.k]

  def top_k(self, queries: Dict[str, np.ndarray], k: int) -> np.ndarray:
    """The k best items of each query, int [queries, k], as `ranks` orders.

    Scored items by score (ties by index), then the rest by index: among
    1..k at most as many are scored as the list already holds, so those
    fill it.
    """
    if k > self._n - 1:
      raise ValueError(f"k={k}: only {self._n - 1} items.")
    lists = np.zeros((len(queries[schema.SEED_ITEM]), k), np.int64)
    fill = np.arange(1, k + 1)
    for part, keys, scores in self._chunks(queries, [self.k]):
      scores = scores[self.k]
      keys, scores = keys[scores > 0], scores[scores > 0]
      rows, items = np.divmod(keys, self._n)
      out = lists[part]
      num_listed = np.zeros(len(out), np.int64)
      bounds = np.searchsorted(rows, np.arange(len(out) + 1))  # rows in order
      for row in np.flatnonzero(np.diff(bounds)):
        row_scores = scores[bounds[row]:bounds[row + 1]]
        row_items = items[bounds[row]:bounds[row + 1]]
        if len(row_scores) > k:
          # Sorting a row's few best (ties with the k-th included) is much
          # cheaper than sorting the whole batch.
          best = row_scores >= -np.partition(-row_scores, k - 1)[k - 1]
          row_scores, row_items = row_scores[best], row_items[best]
        listed = row_items[np.lexsort((row_items, -row_scores))[:k]]
        out[row, :len(listed)] = listed
        num_listed[row] = len(listed)
      wanted = np.arange(len(out))[:, np.newaxis] * self._n + fill
      unscored = pd.Index(keys).get_indexer(wanted.reshape(-1)).reshape(
          wanted.shape) < 0
      slot = np.cumsum(unscored, axis=1) - 1 + num_listed[:, np.newaxis]
      free = unscored & (slot < k)
      out[np.nonzero(free)[0], slot[free]] = np.broadcast_to(
          fill, wanted.shape)[free]
    return lists


def choose_neighbours(knn: ItemKNN, queries: Dict[str, np.ndarray],
                      targets: np.ndarray, num_candidates: int,
                      neighbours: Sequence[int], metric: str,
                      ks: Sequence[int]) -> Tuple[ItemKNN, Dict[int, float]]:
  """The neighbourhood size with the best validation metric.

  Args:
    knn: the fitted ItemKNN (lists of at least max(neighbours)).
    queries: the validation examples' seeds and histories.
    targets: their targets.
    num_candidates: the window's candidates are indices 1..num_candidates.
    neighbours: the sizes K to try.
    metric: a `metrics.rank_metrics` name over `ks`, e.g. "recall@100".
    ks: the cut-offs the metric is computed at.

  Returns:
    (ItemKNN with the best K; {K: metric value}).
  """
  ranks = knn.ranks_by_neighbours(queries, targets, neighbours)
  values = {}
  for k in neighbours:
    result = metrics.rank_metrics(
        ranking.miss_non_candidates(ranks[k], targets, num_candidates), ks)
    if metric not in result:
      raise ValueError(f"{metric} is not a metric of ks={list(ks)}.")
    values[k] = result[metric]
  # Ties, and a window without examples (NaN), go to the smaller K.
  best = max(sorted(neighbours),
             key=lambda k: (np.nan_to_num(values[k], nan=-np.inf), -k))
  return knn.with_neighbours(best), values
