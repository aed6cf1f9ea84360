"""Ranking kernels: the model's scores over a whole catalogue, ranks, top-k.

Evaluation, the per-epoch validation score, the Yambda protocol and the
export all rank the same way, so they share these functions:

  * a candidate is a catalogue index; `candidate_embeddings` embeds indices
    0..n-1 with the candidate tower, and index 0 ("unknown") is never a hit;
  * a query's score of a candidate is the dot product of their embeddings,
    as `tfrs.layers.factorized_top_k.BruteForce` serves it; with several
    query heads, the largest of its heads' dot products
    (`query_heads.max_sim`), as the exported index serves it; with the
    history bonus, the history's items' scores with the query's prior mixed
    in (`history_bonus`; `bonus` below, or None);
  * ties rank by index, which is popularity order (see
    `tfrs_yambda.catalogue`), so ranks and top-k lists agree: the top k are
    exactly the candidates of ranks 1..k (the lists are `tf.math.top_k`'s,
    taken in two faster steps by `chunked_top_k`);
  * a non-finite score (NaN, +inf, -inf) is a miss: it sorts after every
    finite score and its target's rank is `metrics.NOT_RETRIEVED`. A NaN would
    otherwise compare false both ways and rank as a hit.

Queries are scored in batches whose score matrix stays under a fixed number
of floats (`query_batch_size`), so memory does not grow with the catalogue
times the number of queries.
"""

from typing import Dict, NamedTuple, Optional, Union
import weakref

import numpy as np
import tensorflow as tf

from tfrs_yambda import chunked_top_k
from tfrs_yambda import history_bonus
from tfrs_yambda import metrics
from tfrs_yambda import query_heads
from tfrs_yambda import schema

# Bound on the scores matrix of one query batch (floats), to cap memory.
MAX_SCORES_PER_BATCH = 1 << 25
# ... except that a batch holds at least MIN_QUERIES_PER_BATCH queries while
# their scores stay under HARD_MAX_SCORES_PER_BATCH floats (1 GiB): each batch
# reads every candidate's embedding, so over millions of candidates a batch
# of a few queries is dominated by that read. Top-100 lists over 3M
# candidates (a `CandidateTable` of columns): 6.8 ms a query in batches of
# 64, 7.7 in batches of 32 (`benchmarks/ranking_benchmark.py`). A batch of
# 64 holds one 768 MB score matrix (two when a score may be non-finite);
# batches of 128 of two matrices each, with the candidates outside
# TensorFlow's allocator (see `candidate_embeddings`), had the 500m
# rehearsal OOM-killed at 24 GB.
MIN_QUERIES_PER_BATCH = 64
HARD_MAX_SCORES_PER_BATCH = 1 << 28


def candidate_embeddings(model, num_indices: int, batch_size: int = 8192,
                         start: int = 0) -> tf.Tensor:
  """Candidate-tower embeddings of catalogue indices start..num_indices-1.

  Written batch by batch into one tensor, in place (`InplaceUpdate` in a
  graph loop): concatenating the batches held them and the result at once,
  twice the table at its peak. Exporting 9.4M candidates of width 64 from a
  checkpoint peaked at 16.79 GiB that way, 14.90 GiB this way.

  Built in TensorFlow's memory, whose allocator keeps what it frees for
  TensorFlow's own later tensors: each window's evaluation and the export
  reuse what the previous one freed. (Built in a NumPy array instead, the
  500m rehearsal's second window added 2.4 GB outside that pool and was
  OOM-killed at 24 GB.)

  Args:
    model: a model with a `candidate_tower` taking int64 item indices.
    num_indices: embeds indices below this; a prefix of the catalogue's
      indices is a window's candidates (`Catalogue.num_candidates`).
    batch_size: indices embedded per call of the tower.
    start: the first index embedded (the export starts at 1: index 0,
      "unknown", is never served).

  Returns:
    float [num_indices - start, d]; row i embeds index start + i.
  """
  tower = model.candidate_tower
  # The width and type of a row, for the tensor the loop fills.
  probe = tower(tf.constant([start], tf.int64))
  count = max(0, num_indices - start)
  if count == 0:
    return tf.zeros([0, probe.shape[1]], probe.dtype)
  if tower not in _FILLS:
    _FILLS[tower] = _fill_function(tower, probe.shape[1], probe.dtype)
  return _FILLS[tower](tf.constant(start), tf.constant(count),
                       tf.constant(batch_size))


# One traced loop per candidate tower, reused by every call, and dropped
# with the tower: the loop refers to it weakly, so that it does not keep a
# finished model (and its multi-GB tables) alive.
_FILLS = weakref.WeakKeyDictionary()


def _fill_function(tower, width: int, dtype: tf.DType):
  """The graph loop of `candidate_embeddings` for one tower."""
  tower_ref = weakref.ref(tower)

  @tf.function
  def fill(start, count, batch_size):
    def body(first, table):
      rows = tf.range(first, tf.minimum(count, first + batch_size))
      return first + batch_size, tf.raw_ops.InplaceUpdate(
          x=table, i=rows, v=tower_ref()(tf.cast(rows + start, tf.int64)))
    # Every row is written before the table is read.
    table = tf.raw_ops.Empty(shape=tf.stack([count, width]), dtype=dtype,
                             init=False)
    return tf.while_loop(lambda first, _: first < count, body,
                         (tf.constant(0), table))[1]

  return fill


class CandidateTable(NamedTuple):
  """Candidate embeddings as the ranking functions read them.

  Attributes:
    embeddings: float [num_indices, d] (`candidate_embeddings`), or their
      transpose [d, num_indices] when `columns`: oneDNN's product with a
      [d, n] operand is much faster than with [n, d] transposed inside it
      (top-100 over 3M candidates, with the -inf pass skipped too: 7.7
      against 10.2 ms a query, `benchmarks/ranking_benchmark.py`).
    columns: whether `embeddings` is [d, num_indices].
    bound: `candidates_bound(embeddings)`, or any larger value: below it,
      every score of a finite query is finite (see `target_ranks`).
  """
  embeddings: tf.Tensor
  columns: bool
  bound: tf.Tensor

  @property
  def num_indices(self) -> int:
    return int(self.embeddings.shape[1 if self.columns else 0])


def candidate_table(candidates: tf.Tensor, columns: bool = True
                    ) -> CandidateTable:
  """`candidates` [num_indices, d] as a table, transposed when `columns`
  (a copy: drop `candidates` after, if nothing else reads them)."""
  return CandidateTable(tf.transpose(candidates) if columns else candidates,
                        columns, candidates_bound(candidates))


def candidates_bound(candidates: tf.Tensor) -> tf.Tensor:
  """The largest |entry| of the candidate embeddings; +inf if any entry is
  not finite."""
  return tf.where(tf.reduce_all(tf.math.is_finite(candidates)),
                  tf.reduce_max(tf.abs(candidates)),
                  tf.constant(np.inf, candidates.dtype))


def _products(queries: tf.Tensor, table: CandidateTable,
              bonus: Optional[history_bonus.Bonus] = None) -> tf.Tensor:
  products = query_heads.max_sim(queries, table.embeddings, table.columns)
  if bonus is None:
    return products
  return history_bonus.mix_into_scores(
      products, bonus,
      history_bonus.normaliser(history_bonus.dense_top(products),
                               bonus.temperature))


def scores(queries: tf.Tensor, table: CandidateTable,
           bonus: Optional[history_bonus.Bonus] = None) -> tf.Tensor:
  """Query-candidate scores, [batch, num_indices]; index 0 is never a hit.

  Args:
    queries: float [batch, d], query-tower embeddings, or [batch, heads, d]
      (scored by the max over heads).
    table: the candidates, `candidate_table`.
    bonus: the queries' history bonus, or None.

  Returns:
    The dot products (max over heads, the prior mixed in), with index 0 and
    every non-finite score (NaN, +inf, -inf) set to -inf: such a candidate
    sorts after every finite one and such a target is a miss (see
    `target_ranks`).
  """
  return _never_hits_to_minus_inf(_products(queries, table, bonus))


# The two passes over a [batch, n] score matrix are compiled by XLA, which
# fuses each into one loop: TensorFlow alone writes a [batch, n] temporary per
# elementwise op, and over 3M candidates those ops took 1.6 to 3 times as
# long as the matrix product. They only compare and select, so every score
# and rank is exactly TensorFlow's; the product itself stays TensorFlow's.
@tf.function(jit_compile=True, reduce_retracing=True)
def _never_hits_to_minus_inf(products: tf.Tensor) -> tf.Tensor:
  """`products` with column 0 and every non-finite entry set to -inf."""
  index = tf.range(tf.shape(products)[1])
  never = (index[tf.newaxis, :] == 0) | ~tf.math.is_finite(products)
  return tf.where(never, tf.constant(-np.inf, products.dtype), products)


@tf.function(jit_compile=True, reduce_retracing=True)
def _ranks_under(scored: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """1-based ranks of `targets` among indices >= 1, ties by index.

  `scored`: the products, or `scores`' output; index 0 is never counted
  ahead of a target, and a target of index 0, or of a non-finite score (-inf
  after `scores`), is a miss.
  """
  index = tf.range(tf.shape(scored)[1], dtype=targets.dtype)
  target_scores = tf.gather(scored, targets, batch_dims=1)[:, tf.newaxis]
  ahead = (scored > target_scores) | ((scored == target_scores) & (
      index[tf.newaxis, :] < targets[:, tf.newaxis]))
  ahead &= index[tf.newaxis, :] > 0
  # Counted in int32: fewer than 2**31 candidates.
  ranks = 1 + tf.cast(tf.reduce_sum(tf.cast(ahead, tf.int32), axis=1),
                      tf.int64)
  miss = (targets == 0) | ~tf.math.is_finite(target_scores[:, 0])
  return tf.where(miss, tf.constant(metrics.NOT_RETRIEVED, tf.int64), ranks)


def _top_k_after_zero(products: tf.Tensor, k: int, chunk: int) -> tf.Tensor:
  """Top-k indices of finite `products` with index 0 left out (to the end
  when fewer than k + 1 candidates: then the list must hold it)."""
  top = chunked_top_k.top_k(
      products, tf.minimum(k + 1, tf.shape(products)[1]), chunk)
  # Index 0 is in the list at most once; a stable sort moves it last.
  order = tf.argsort(tf.cast(top == 0, tf.int32), axis=1, stable=True)
  return tf.gather(top, order, batch_dims=1)[:, :k]


def _scores_are_finite(queries: tf.Tensor, bound: tf.Tensor,
                       bonus: Optional[history_bonus.Bonus] = None
                       ) -> tf.Tensor:
  """True when no score of `queries` and candidates within `bound` can be
  non-finite: |q . c| <= d max|q| max|c|, kept well below the float max,
  and the history prior's weights are finite."""
  width = tf.cast(tf.shape(queries)[-1], queries.dtype)
  limit = queries.dtype.max / 16
  finite = (tf.reduce_all(tf.math.is_finite(queries)) &
            (width * tf.reduce_max(tf.abs(queries)) * bound < limit))
  if bonus is None:
    return finite
  return finite & tf.reduce_all(tf.math.is_finite(bonus.weights))


@tf.function(reduce_retracing=True)
def target_ranks(queries: tf.Tensor, table: CandidateTable,
                 targets: tf.Tensor, k: int = 0,
                 chunk: int = chunked_top_k.CHUNK,
                 bonus: Optional[history_bonus.Bonus] = None):
  """Ranks of `targets`, and with k > 0 also the top-k indices, [batch, k].

  Both come from one score matrix. Ties rank by index in both, so the top k
  are the items of ranks 1..k. When every score is sure to be finite (the
  usual case, see `CandidateTable.bound`), the products are ranked as they
  are, without `scores`' pass that writes -inf; the ranks and lists are the
  same either way.

  Args:
    queries: float [batch, d], or [batch, heads, d].
    table: the candidates, `candidate_table`.
    targets: int64 [batch], each query's target index (< num_indices).
    k: also return the top-k indices when > 0.
    chunk: the top-k's chunk length (`chunked_top_k`); 0: one top-k.
    bonus: the queries' history bonus, or None.

  Returns:
    int64 [batch] 1-based ranks; a target whose score is non-finite (or
    index 0) is a miss, `metrics.NOT_RETRIEVED`, beyond every k. With k > 0,
    (ranks, int32 [batch, k] top-k indices).
  """
  products = _products(queries, table, bonus)

  def ranked(scored, top_k_of):
    ranks = _ranks_under(scored, targets)
    return (ranks, top_k_of(scored)) if k else ranks

  return tf.cond(
      _scores_are_finite(queries, table.bound, bonus),
      lambda: ranked(products, lambda s: _top_k_after_zero(s, k, chunk)),
      lambda: ranked(_never_hits_to_minus_inf(products),
                     lambda s: chunked_top_k.top_k(s, k, chunk)))


@tf.function(reduce_retracing=True)
def top_k(queries: tf.Tensor, table: CandidateTable, k: int,
          chunk: int = chunked_top_k.CHUNK,
          bonus: Optional[history_bonus.Bonus] = None) -> tf.Tensor:
  """Top-k indices of each query, int32 [batch, k], ties by index.

  Non-finite scores (-inf in `scores`) come after all finite ones. `chunk`
  and `bonus`: as in `target_ranks`.
  """
  products = _products(queries, table, bonus)
  return tf.cond(
      _scores_are_finite(queries, table.bound, bonus),
      lambda: _top_k_after_zero(products, k, chunk),
      lambda: chunked_top_k.top_k(_never_hits_to_minus_inf(products), k,
                                  chunk))


def query_batch_size(num_indices: int) -> int:
  """Queries per batch: at most 4096, and at most `MAX_SCORES_PER_BATCH`
  scores over `num_indices` candidates, but `MIN_QUERIES_PER_BATCH` while
  under `HARD_MAX_SCORES_PER_BATCH` scores (and at least one)."""
  return max(1, min(4096, MAX_SCORES_PER_BATCH // num_indices),
             min(MIN_QUERIES_PER_BATCH,
                 HARD_MAX_SCORES_PER_BATCH // num_indices))


def miss_non_candidates(ranks: np.ndarray, targets: np.ndarray,
                        num_candidates: int) -> np.ndarray:
  """Ranks with every target outside indices 1..num_candidates a miss.

  Args:
    ranks: int [n], ranks of the targets.
    targets: int [n], the targets' catalogue indices.
    num_candidates: the window's candidates are indices 1..num_candidates.

  Returns:
    `ranks`, with `metrics.NOT_RETRIEVED` where the target is not a
    candidate.
  """
  outside = (targets < 1) | (targets > num_candidates)
  return np.where(outside, metrics.NOT_RETRIEVED, ranks)


Candidates = Union[tf.Tensor, CandidateTable]


def _as_table(candidates: Candidates) -> CandidateTable:
  return (candidates if isinstance(candidates, CandidateTable)
          else candidate_table(candidates))


def model_ranks(model, test: Dict[str, np.ndarray], candidates: Candidates,
                retrieved: Optional[metrics.RetrievedItemStats] = None
                ) -> np.ndarray:
  """Rank of each test example's target under the model's scores.

  Args:
    model: a model with a `query_tower` over `schema.QUERY_FEATURES`.
    test: examples (numpy arrays by feature name), targets included.
    candidates: the embeddings of indices 0..n (`candidate_embeddings`), or
      their `candidate_table`; a target outside 1..n is a miss
      (`metrics.NOT_RETRIEVED`).
    retrieved: if given, each batch's top-max(k) lists are added to it, from
      the same scores (one matrix product per batch either way).

  Returns:
    int64 [examples], 1-based ranks.
  """
  table = _as_table(candidates)
  num_candidates = table.num_indices - 1
  targets = test[schema.TARGET_ITEM]
  features = {k: test[k] for k in schema.QUERY_FEATURES}
  # Index 0 stands in for targets that are not candidates (a miss anyway).
  features[schema.TARGET_ITEM] = np.where(targets <= num_candidates, targets,
                                          0)
  k = retrieved.ks[-1] if retrieved else 0
  ranks = []
  for batch in tf.data.Dataset.from_tensor_slices(features).batch(
      query_batch_size(table.num_indices)):
    out = target_ranks(model.query_tower(batch), table,
                       batch[schema.TARGET_ITEM], k,
                       bonus=history_bonus.query_bonus(model, batch))
    if retrieved:
      out, top = out
      retrieved.add(top.numpy())
    ranks.append(out.numpy())
  if not ranks:
    return np.zeros([0], np.int64)
  return miss_non_candidates(np.concatenate(ranks), targets, num_candidates)


def model_top_k(model, queries: Dict[str, np.ndarray], candidates: Candidates,
                k: int) -> np.ndarray:
  """The model's top-k catalogue indices for each query.

  Args:
    model: a model with a `query_tower`.
    queries: query features (numpy arrays by feature name).
    candidates: the embeddings of indices 0..n (`candidate_embeddings`), or
      their `candidate_table`.
    k: the list length.

  Returns:
    int64 [queries, k].
  """
  table = _as_table(candidates)
  top = []
  for batch in tf.data.Dataset.from_tensor_slices(queries).batch(
      query_batch_size(table.num_indices)):
    top.append(top_k(model.query_tower(batch), table, k,
                     bonus=history_bonus.query_bonus(model, batch)).numpy())
  return (np.concatenate(top).astype(np.int64) if top
          else np.zeros([0, k], np.int64))
