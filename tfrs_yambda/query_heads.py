"""Several query vectors per example, scored by their best match (max-sim).

One query vector has to sit near everything a listener might want next; a
listener with several tastes (say, techno at work and jazz at night) pulls
it to somewhere between them, near neither. With `TowerConfig.query_heads`
= K > 1 the query tower emits K unit vectors, [batch, K, d], and a
candidate's score is the largest of its K dot products: each head can stand
for one interest, and a candidate needs to match only one of them.

  * Training: `tfrs.tasks.Retrieval` scores [batch, K, d] queries by the max
    over heads itself (TFRS's multi-vector, "maxsim" scoring), before its
    temperature, logQ correction and accidental-hit removal, so the loss is
    the single-vector loss of those max scores.
  * Evaluation: `max_sim` turns K heads into one [batch, candidates] score
    matrix, the shape one head's matrix product has (for `ranking.scores`).
  * Serving: the index keeps one vector per candidate. `MaxSimTopK` looks up
    the top k of each head and merges the K lists into one top k
    (`merge_top_k`), inside the SavedModel, so the serving signature is the
    single head's. That top k is exact under an exact index: a candidate's
    max score is its score under some head, so each of the true top k is in
    that head's own top k.

K = 1 is the single-vector model: `max_sim` of [batch, d] queries is the
plain matrix product, and the export builds TFRS's index unwrapped.
"""

from typing import Dict, Optional, Text, Tuple, Union

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs


def max_sim(queries: tf.Tensor, candidates: tf.Tensor,
            columns: bool = False) -> tf.Tensor:
  """Scores of candidates: the dot product, or the max over query heads.

  A NaN in any head's score makes the max NaN (`tf.maximum` propagates it),
  as a NaN query would be with one head. Heads are folded in one at a time,
  so memory holds two [batch, n] score matrices, not K of them.

  Args:
    queries: float [batch, d], or [batch, heads, d]; the rank may be unknown
      to the graph (a `tf.function` that relaxes shapes after seeing both).
    candidates: float [n, d], or [d, n] with `columns`.
    columns: the candidates are the columns of a [d, n] matrix (the faster
      layout to score many candidates, see `ranking.CandidateTable`).

  Returns:
    float [batch, n].
  """
  def product(head):
    return tf.matmul(head, candidates, transpose_b=not columns)

  if queries.shape.rank == 2:
    return product(queries)
  if queries.shape.rank is None:
    # [batch, d] becomes one head; its fold below is the same matmul.
    width = tf.shape(candidates)[0 if columns else -1]
    queries = tf.reshape(queries,
                         tf.stack([tf.shape(queries)[0], -1, width]))
  heads = tf.transpose(queries, [1, 0, 2])
  return tf.foldl(lambda best, head: tf.maximum(best, product(head)),
                  heads[1:], initializer=product(heads[0]))


def merge_top_k(scores: tf.Tensor, identifiers: tf.Tensor,
                k: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """Merges per-head top-k lists into one top k of distinct identifiers.

  An item in several heads' lists is kept once, with its best score (its
  max-sim score when the lists come from an exact index). Stock TensorFlow
  ops only, so stock TF Serving can run it.

  Args:
    scores: float [batch, m], each row the concatenated lists of its heads.
    identifiers: [batch, m], the items of those scores.
    k: the list length; each row must hold at least k distinct items (K
      lists of k distinct items each do).

  Returns:
    (scores [batch, k], identifiers [batch, k]), best first.
  """
  m = tf.shape(scores)[1]
  # Best first, so that the first occurrence of an item is its best score.
  scores, order = tf.math.top_k(scores, k=m, sorted=True)
  identifiers = tf.gather(identifiers, order, batch_dims=1)
  # Equal items side by side (a stable sort keeps each group best first);
  # each group's first is the one to keep.
  by_item = tf.argsort(identifiers, axis=1, stable=True)
  grouped = tf.gather(identifiers, by_item, batch_dims=1)
  first = tf.concat([tf.ones_like(grouped[:, :1], tf.bool),
                     grouped[:, 1:] != grouped[:, :-1]], axis=1)
  keep = tf.gather(first, tf.argsort(by_item, axis=1, stable=True),
                   batch_dims=1)
  # Kept positions, still best first, ahead of the duplicates. Selecting by
  # position, not by masking scores with -inf, holds whatever the scores.
  pick = tf.argsort(tf.cast(~keep, tf.int32), axis=1, stable=True)[:, :k]
  return (tf.gather(scores, pick, batch_dims=1),
          tf.gather(identifiers, pick, batch_dims=1))


class MaxSimTopK(tfrs.layers.factorized_top_k.TopK):
  """Top k by max-sim from an index of single vectors (BruteForce, ScaNN).

  Queries of [batch, K, d] are looked up as [batch * K, d] in one call of
  the wrapped index, k per head; the [batch, K * k] results are merged into
  the top k of distinct items (`merge_top_k`). [batch, d] queries go to the
  wrapped index as they are. The wrapped index takes embeddings (it has no
  query model of its own); this layer's `query_model`, if any, makes them.
  Exact when the wrapped index is.
  """

  def __init__(self, head_index: tfrs.layers.factorized_top_k.TopK,
               query_model: Optional[tf.keras.Model] = None, k: int = 10,
               name: Optional[Text] = None):
    """See the class docstring.

    Args:
      head_index: a top-k index of candidate embeddings, without a query
        model; `index` builds it.
      query_model: features -> [batch, K, d] (or [batch, d]) embeddings; None:
        the layer is called with embeddings.
      k: the default list length.
      name: the layer's name.
    """
    super().__init__(k=k, name=name)
    self.head_index = head_index
    self.query_model = query_model

  def index(self, candidates: tf.Tensor,
            identifiers: Optional[tf.Tensor] = None) -> "MaxSimTopK":
    self.head_index.index(candidates, identifiers)
    self._reset_tf_function_cache()
    return self

  def call(self, queries: Union[tf.Tensor, Dict[Text, tf.Tensor]],
           k: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
    k = k if k is not None else self._k
    if self.query_model is not None:
      queries = self.query_model(queries)
    if queries.shape.rank == 2:
      return self.head_index(queries, k=k)
    if queries.shape.rank != 3:
      raise ValueError(f"Queries must be [batch, d] or [batch, heads, d], "
                       f"got shape {queries.shape}.")
    batch = tf.shape(queries)[0]
    scores, identifiers = self.head_index(
        tf.reshape(queries, [-1, queries.shape[-1]]), k=k)
    # Row b * K + h holds head h of query b: each query's K lists end to end.
    scores, identifiers = merge_top_k(tf.reshape(scores, [batch, -1]),
                                      tf.reshape(identifiers, [batch, -1]), k)
    if isinstance(k, (int, np.integer)):
      scores.set_shape([None, k])
      identifiers.set_shape([None, k])
    return scores, identifiers

  def is_exact(self) -> bool:
    return self.head_index.is_exact()
