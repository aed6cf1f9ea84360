"""Ranking metrics from the rank of each test example's one true next track.

Every retriever (the model, the baselines, the oracle) is reduced to one
number per test example: the 1-based rank of the true item in its ordering of
the whole catalogue, ties broken by catalogue index (that is, by popularity).
All metrics follow from the ranks, so they are computed identically for all.
"""

from typing import Dict, Sequence

import numpy as np

DEFAULT_KS = (10, 100, 500)
# The rank of a target that is not among the candidates: never within any k,
# and 1 / rank is 0 to double precision.
NOT_RETRIEVED = np.iinfo(np.int64).max


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                 weights: np.ndarray = None) -> Dict[str, float]:
  """Recall@k, NDCG@k for each k, and MRR over the full ranking.

  With a single relevant item, Recall@k is whether it is in the top k, and
  NDCG@k = 1 / log2(1 + rank) when it is (the ideal DCG is 1).

  Args:
    ranks: int [num_examples], 1-based ranks of the true items.
    ks: cut-offs.
    weights: optional per-example weights (default: every example counts 1).

  Returns:
    {"recall@k": ..., "ndcg@k": ..., "mrr": ..., "examples": n}.
  """
  ranks = np.asarray(ranks, dtype=np.float64)
  if ranks.size and ranks.min() < 1:
    raise ValueError(f"Ranks are 1-based; got {ranks.min()}.")
  weights = np.ones_like(ranks) if weights is None else np.asarray(
      weights, np.float64)
  total = weights.sum()

  def mean(values):
    return float(np.sum(values * weights) / total) if total else float("nan")

  result = {}
  for k in ks:
    hit = ranks <= k
    result[f"recall@{k}"] = mean(hit)
    result[f"ndcg@{k}"] = mean(np.where(hit, 1.0 / np.log2(1.0 + ranks), 0.0))
  result["mrr"] = mean(1.0 / ranks) if ranks.size else float("nan")
  result["examples"] = int(ranks.size)
  return result


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Ranks of `targets` under per-row `scores` [n, num_items + 1] (numpy).

  Column 0 (the unknown item) is never a candidate. Ties are broken by index.
  A non-finite score is never a hit: such a target is NOT_RETRIEVED, and
  such a candidate ranks after every finite one.
  """
  scores = np.asarray(scores, np.float64).copy()
  scores[~np.isfinite(scores)] = -np.inf
  scores[:, 0] = -np.inf
  rows = np.arange(len(targets))
  target_scores = scores[rows, targets][:, None]
  index = np.arange(scores.shape[1])[None, :]
  ahead = (scores > target_scores) | ((scores == target_scores) &
                                      (index < targets[:, None]))
  return np.where(np.isinf(target_scores[:, 0]), NOT_RETRIEVED,
                  1 + ahead.sum(axis=1))


def recall_curve_ks(max_k: int, points: int = 60,
                    every_to: int = 500) -> np.ndarray:
  """Integer cut-offs from 1 to `max_k`: every k up to `every_to` (so a
  claim "at every k" is read, not interpolated), then about `points` even
  in log k."""
  max_k = max(int(max_k), 1)
  ks = np.round(np.logspace(0.0, np.log10(max_k), points)).astype(np.int64)
  every = np.arange(1, min(int(every_to), max_k) + 1)
  return np.unique(np.clip(np.concatenate([every, ks]), 1, max_k))


def recall_curve(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """Recall@k for every k in `ks` (the share of ranks <= k), float [len(ks)]."""
  ranks = np.sort(np.asarray(ranks, np.int64))
  if not ranks.size:
    return np.full(len(ks), np.nan)
  return np.searchsorted(ranks, np.asarray(ks), side="right") / ranks.size


def popularity_percentile(train_counts: np.ndarray) -> np.ndarray:
  """Each item's popularity as a percentile rank of its training count.

  The percentile of item i is the share of catalogue items (indices 1..n)
  with fewer training positives than i, ties counting half: 1 for a
  runaway hit, 0.5 for the median item, and, when c% of the catalogue never
  occurs in training, c/200 for each of those items. Percentiles are
  comparable across catalogues and not dominated by a few hits the way mean
  counts are.

  Args:
    train_counts: int [num_items + 1], training positives per catalogue index.

  Returns:
    float [num_items + 1]; entry 0 (the unknown item) is NaN.
  """
  counts = np.asarray(train_counts)[1:]
  ordered = np.sort(counts)
  below = np.searchsorted(ordered, counts, side="left")
  equal = np.searchsorted(ordered, counts, side="right") - below
  percentile = (below + 0.5 * equal) / max(len(counts), 1)
  return np.concatenate([[np.nan], percentile])


class RetrievedItemStats:
  """Coverage@k and mean popularity of the items retrieved, over many queries.

  Fed one batch of top-k lists at a time, so memory is one flag per catalogue
  item and cut-off, however many queries there are.

  coverage@k: distinct items in any query's top k / catalogue items.
  popularity@k: mean `popularity_percentile` of the top-k items of every
    query (an item counts once per query that retrieves it).
  """

  def __init__(self, ks: Sequence[int], popularity: np.ndarray):
    self.ks = sorted(int(k) for k in ks)
    self._popularity = np.asarray(popularity, np.float64)
    self._seen = {k: np.zeros(len(popularity), bool) for k in self.ks}
    self._popularity_sum = {k: 0.0 for k in self.ks}
    self._queries = 0

  def add(self, top_items: np.ndarray) -> None:
    """Adds the top lists of a batch of queries, int [batch, >= max(ks)]."""
    top_items = np.asarray(top_items)
    if top_items.shape[1] < self.ks[-1]:
      raise ValueError(f"Top lists of {top_items.shape[1]} items are shorter "
                       f"than the largest cut-off {self.ks[-1]}.")
    self._queries += top_items.shape[0]
    for k in self.ks:
      top = top_items[:, :k]
      self._seen[k][top.ravel()] = True
      self._popularity_sum[k] += float(self._popularity[top].sum())

  def result(self) -> Dict[str, float]:
    num_items = len(self._popularity) - 1
    out = {}
    for k in self.ks:
      # Index 0 (unknown) is never a candidate; it must not count as covered.
      out[f"coverage@{k}"] = float(self._seen[k][1:].sum()) / max(num_items, 1)
      out[f"popularity@{k}"] = (self._popularity_sum[k] / (self._queries * k)
                                if self._queries else float("nan"))
    return out


def set_metrics(top_items: np.ndarray, relevant: Sequence[np.ndarray],
                ks: Sequence[int], num_items: int) -> Dict[str, float]:
  """Recall@k, NDCG@k and Coverage@k of top lists against relevant sets.

  For a user with relevant set R and ranked list L (binary relevance):
    Recall@k = |R ∩ L[:k]| / min(k, |R|), so 1 is reachable whatever |R|;
    NDCG@k   = DCG@k / IDCG@k, DCG@k = sum over hits at 1-based position p
               <= k of 1 / log2(p + 1), IDCG@k = DCG of min(k, |R|) hits at
               the top;
  both averaged over users with a non-empty R.
    Coverage@k = distinct items in all users' L[:k] / num_items.

  Args:
    top_items: int [num_users, >= max(ks)], each user's ranked items.
    relevant: per user, the array of relevant (distinct) items.
    ks: cut-offs.
    num_items: catalogue size (the coverage denominator).

  Returns:
    {"recall@k", "ndcg@k", "coverage@k" for each k, "users": n}.
  """
  top_items = np.asarray(top_items, np.int64)
  sizes = np.array([len(r) for r in relevant], np.int64)
  if top_items.shape[0] != len(sizes):
    raise ValueError(f"{top_items.shape[0]} top lists for {len(sizes)} users.")
  if np.any(sizes == 0):
    raise ValueError("Every user needs at least one relevant item.")
  width = top_items.shape[1]
  if width < max(ks):
    raise ValueError(f"Top lists of {width} items are shorter than the "
                     f"largest cut-off {max(ks)}.")
  # Membership of (user, item) pairs by sorted keys: no per-user loop.
  stride = np.int64(max(int(top_items.max(initial=0)),
                        max((int(r.max()) for r in relevant), default=0)) + 1)
  users = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
  keys = np.sort(users * stride + np.concatenate(relevant).astype(np.int64)
                 ) if len(sizes) else np.zeros(0, np.int64)
  query = np.arange(len(sizes), dtype=np.int64)[:, None] * stride + top_items
  pos = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
  hit = (keys[pos] == query) if len(keys) else np.zeros(query.shape, bool)
  discount = 1.0 / np.log2(np.arange(2, width + 2))
  ideal = np.concatenate([[0.0], np.cumsum(discount)])
  result = {}
  for k in ks:
    ideal_hits = np.minimum(sizes, k)
    hits = hit[:, :k]
    result[f"recall@{k}"] = float(np.mean(hits.sum(1) / ideal_hits)) if len(
        sizes) else float("nan")
    dcg = (hits * discount[:k]).sum(1)
    result[f"ndcg@{k}"] = float(np.mean(dcg / ideal[ideal_hits])) if len(
        sizes) else float("nan")
    covered = np.unique(top_items[:, :k])
    result[f"coverage@{k}"] = float(np.sum(covered > 0)) / max(num_items, 1)
  result["users"] = int(len(sizes))
  return result
