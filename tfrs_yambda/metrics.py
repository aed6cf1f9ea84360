"""Ranking metrics from the rank of each test example's one true next track.

Every retriever (the model, the baselines, the oracle) is reduced to one
number per test example: the 1-based rank of the true item in its ordering of
the whole catalogue, ties broken by catalogue index (that is, by popularity).
All metrics follow from the ranks, so they are computed identically for all.
"""

from typing import Dict, Sequence

import numpy as np

DEFAULT_KS = (10, 100, 500)


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
  """
  scores = np.asarray(scores, np.float64).copy()
  scores[:, 0] = -np.inf
  rows = np.arange(len(targets))
  target_scores = scores[rows, targets][:, None]
  index = np.arange(scores.shape[1])[None, :]
  ahead = (scores > target_scores) | ((scores == target_scores) &
                                      (index < targets[:, None]))
  return 1 + ahead.sum(axis=1)
