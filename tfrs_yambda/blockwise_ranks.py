"""Ranks over a catalogue too large to hold, a block of items at a time.

Evaluation ranks the examples whose target has no training positive ("cold")
against every catalogued item: 9.4M at the real sizes. Embedding them all and
scoring them in one table held 6.3 GiB at the 500m shape (the 2.4 GB table,
then more than that again while ranking against it), which the process kept
after. Here the items are embedded and scored one block at a time, twice:
first each target's own score, from the block that holds it, then how many
items score ahead of it, block by block. A target is never counted ahead of
itself, and the ranks follow `tfrs_yambda.ranking`'s rules: ties by index,
index 0 never a hit, a non-finite score never ahead of a target, and a
target whose own score is not finite a miss. With a history prior
(`tfrs_yambda.history_bonus`), the first pass also keeps each query's dense
top, whose normaliser the second pass mixes the prior in with.
"""

from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfrs_yambda import history_bonus
from tfrs_yambda import metrics
from tfrs_yambda import query_heads
from tfrs_yambda import ranking
from tfrs_yambda import schema

# Items embedded and scored at a time: 256 MB of float32 embeddings of width
# 64, and as much again transposed.
BLOCK_ITEMS = 1 << 20


def target_ranks(model, examples: Dict[str, np.ndarray], num_indices: int,
                 block_items: int = BLOCK_ITEMS,
                 batch_size: int = 8192) -> np.ndarray:
  """Rank of each example's target among indices 1..num_indices - 1.

  Args:
    model: a model with a `query_tower` and a `candidate_tower`.
    examples: query features and targets (numpy arrays by feature name).
    num_indices: the candidates are indices below it; a target outside
      1..num_indices - 1 is a miss.
    block_items: indices embedded and scored at a time (rounded to a
      multiple of `batch_size`).
    batch_size: indices per call of the candidate tower, as in
      `ranking.candidate_embeddings`: blocks start on its multiples, so each
      item is embedded exactly as in one table of every index.

  Returns:
    int64 [examples], 1-based ranks, or `metrics.NOT_RETRIEVED`.
  """
  targets = np.asarray(examples[schema.TARGET_ITEM], np.int64)
  if not len(targets):
    return np.zeros([0], np.int64)
  batches = tf.data.Dataset.from_tensor_slices(
      {k: examples[k] for k in schema.QUERY_FEATURES}).batch(4096)
  queries = tf.concat([model.query_tower(batch) for batch in batches], axis=0)
  bonus = history_bonus.query_bonus(
      model, {k: examples[k] for k in schema.QUERY_FEATURES})
  block_items = max(batch_size, block_items // batch_size * batch_size)
  target_scores = np.full(len(targets), np.nan, np.float32)
  # With a prior, each query's dense top so far (-inf: none yet).
  tops = np.full([len(targets), history_bonus.NORMALISER_TOP], -np.inf,
                 np.float32)
  for lo, rows, products in _scored_blocks(model, queries, None, None,
                                           num_indices, block_items,
                                           batch_size):
    inside = (targets[rows] >= lo) & (targets[rows] < lo + products.shape[1])
    target_scores[rows[inside]] = products[inside,
                                           targets[rows[inside]] - lo]
    if bonus is not None:
      merged = np.concatenate(
          [tops[rows], history_bonus.dense_top(products, lo).numpy()], axis=1)
      tops[rows] = -np.sort(-merged, axis=1)[:, :tops.shape[1]]
  level = None
  if bonus is not None:
    level = history_bonus.normaliser(tf.constant(tops), bonus.temperature)
    target_scores = history_bonus.mixed(
        tf.constant(target_scores),
        history_bonus.item_bonus(bonus.slots, bonus.weights,
                                 tf.constant(targets)[:, tf.newaxis])[:, 0],
        level, bonus.temperature).numpy()
  ahead = np.zeros(len(targets), np.int64)
  for lo, rows, products in _scored_blocks(model, queries, bonus, level,
                                           num_indices, block_items,
                                           batch_size):
    index = np.arange(lo, lo + products.shape[1])
    score = target_scores[rows, np.newaxis]
    counted = np.isfinite(products) & (index > 0) & (
        index != targets[rows, np.newaxis]) & (
        (products > score) |
        ((products == score) & (index < targets[rows, np.newaxis])))
    ahead[rows] += np.count_nonzero(counted, axis=1)
  miss = ((targets < 1) | (targets >= num_indices) |
          ~np.isfinite(target_scores))
  return np.where(miss, metrics.NOT_RETRIEVED, 1 + ahead)


def _scored_blocks(model, queries: tf.Tensor,
                   bonus: Optional[history_bonus.Bonus],
                   level: Optional[tf.Tensor], num_indices: int,
                   block_items: int, batch_size: int
                   ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
  """(first index, query rows, float32 [rows, block] scores) for every block
  of indices and batch of queries; one block's embeddings at a time. The
  scores are `ranking`'s: max over heads, with the history prior (under
  the normalisers `level`) mixed in if `bonus` is given."""
  for lo in range(0, num_indices, block_items):
    table = ranking.candidate_table(ranking.candidate_embeddings(
        model, min(num_indices, lo + block_items), batch_size, start=lo))
    step = ranking.query_batch_size(table.num_indices)
    for first in range(0, len(queries), step):
      rows = np.arange(first, min(len(queries), first + step))
      products = query_heads.max_sim(queries[first:first + step],
                                     table.embeddings, True)
      if bonus is not None:
        products = history_bonus.mix_into_scores(
            products, history_bonus.Bonus(
                bonus.slots[first:first + step],
                bonus.weights[first:first + step], bonus.temperature),
            level[first:first + step], first=lo)
      yield lo, rows, products.numpy()
