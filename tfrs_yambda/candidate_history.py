"""The listener's tracks in the candidates' space: ItemKNN inside the towers.

ItemKNN, the Yambda paper's strongest baseline, scores a track j by the sum
over the listener's recent tracks h of sim(h, j). A two-tower query made
from the *features* of the history (their mean, or an attention encoding)
is one point, and it cannot rank each of ~50 recent tracks and their
neighbours near the top at once: repeats of recent listens are where the
mean-pooled model trails ItemKNN most.

`CandidateHistory` gives the query that form of score. Over the known slots
p of history-then-seed, with c the candidate tower and w_p a learned weight
of each slot:

  query' = normalise(query + sum_p w_p c(h_p)),

so a candidate j scores (before the normalisation, which changes no
query's ranking) q.c(j) + sum_p w_p c(h_p).c(j): the candidate embeddings'
cosine as a learned item-item similarity, summed over the listener's tracks
with a learned recency profile. The weights start at 0, so training starts
from the plain query. The query is still one vector (or K, with query
heads), so the index, the export and the serving signature are unchanged.
"""

import tensorflow as tf


class CandidateHistory(tf.keras.layers.Layer):
  """(query, [batch, slots] item indices) -> the query with their candidate
  embeddings added, weighted by slot, renormalised.

  Index 0 (padding, unknown) adds nothing. A query of [batch, K, d] (query
  heads) gets the same sum in each head.
  """

  def __init__(self, candidate_tower: tf.keras.Model, slots: int, **kwargs):
    """Args: the model's candidate tower (shared, trained by both sides);
    `slots`, the number of item slots of each query."""
    super().__init__(**kwargs)
    self.candidate_tower = candidate_tower
    self.slots = slots
    self.slot_weights = self.add_weight(name="slot_weights", shape=(slots,),
                                        initializer="zeros")

  def call(self, query: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
    valid = tf.where(items > 0)
    # Popular tracks recur across a batch's histories: each distinct item
    # goes through the candidate tower once.
    distinct, position = tf.unique(tf.gather_nd(items, valid))
    weighted = (tf.gather(self.candidate_tower(distinct), position) *
                tf.gather(self.slot_weights, valid[:, 1])[:, tf.newaxis])
    pooled = tf.math.unsorted_segment_sum(weighted, valid[:, 0],
                                          tf.shape(items)[0])
    if query.shape.rank == 3:
      pooled = pooled[:, tf.newaxis, :]
    return tf.math.l2_normalize(query + pooled, axis=-1)
