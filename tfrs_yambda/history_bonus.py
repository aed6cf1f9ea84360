"""A score bonus for the listener's own tracks, chosen on the validation day.

Listeners replay: a third of the demo's next tracks are in the query's own
history. Dense queries rank each of ~50 recent tracks near the top only as
far as one point (or K) can sit near all of them and their neighbours at
once; ItemKNN, which sums a similarity over the listener's tracks, keeps
more of them in its top 100 (`tfrs_yambda.candidate_history` narrowed that
gap, it did not close it). With `TowerConfig.history_bonus`, the score of
candidate j for a query with history slots h_1..h_P (oldest first) is

  s(j) = q.c(j) + sum_p b_p [h_p = j],

with b_p = scale * 2^(-age_p / half_life), age_p = P - p the slot's distance
from the latest (0): a repeat prior decaying with recency, as DecayPop's
popularity. An item in several slots gets each one's. The seed has no slot
of its own: it is the query's own feature, and as the latest positive it is
usually the last history slot already (a seed slot too put it first for
most queries). The bonus is not learned by the towers' training: there,
in-batch negatives hardly ever include a query's own history items, so a
learned bonus stayed near 0 (|b_p| < 0.02 after 3 epochs on the demo),
while over the whole catalogue a bonus of 0.1-0.4 ranks far better. The
trained model's (scale, half-life) is chosen on the validation day, like
ItemKNN's neighbourhood and the epoch (`tfrs_yambda.train`), and kept in the
model's variables. It is still a dot product, of [q, sum_p b_p e(h_p)] and
[c(j), e(j)] with e a one-hot over the catalogue, the sparse half of a
hybrid query:

  * Evaluation: `add_to_scores` adds each query's P bonuses to its row of
    dense scores (`tfrs_yambda.ranking`, `tfrs_yambda.blockwise_ranks`).
  * Serving: `HistoryBonusTopK` takes the dense index's top k + P, adds the
    bonus to those of them in the history, scores the P slots' own items
    exactly and merges both lists into one top k, inside the SavedModel, so
    the serving signature is unchanged. Exact under an exact index: an item
    outside both lists has at least k + P dense scores above it, of which at
    most P belong to (re-scored) slots, so k unchanged ones remain above it.
"""

from typing import Callable, Dict, Optional, Sequence, Text, Tuple, Union

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_yambda import query_heads


# A query batch's bonus, (int64 [batch, slots] slots, float [batch, slots]
# their bonuses), or None for a model without one.
Bonus = Optional[Tuple[tf.Tensor, tf.Tensor]]


def query_bonus(model, features: Dict[Text, tf.Tensor]) -> Bonus:
  """The model's history bonus of these query features, if it has one."""
  bonus = getattr(model.query_tower, "bonus", None)
  return bonus(features) if bonus is not None else None


class HistoryBonus(tf.keras.layers.Layer):
  """[batch, slots] item indices -> [batch, slots] bonuses, b_p per slot.

  Index 0 (padding, an unknown item, a switched-off input) gets 0. The
  bonuses start at 0 (off) and are set by `set_decay`, not by training.
  """

  def __init__(self, slots: int, **kwargs):
    """Args: `slots`, the history slots of each query (oldest first)."""
    super().__init__(**kwargs)
    self.slots = slots
    self.slot_bonus = self.add_weight(name="slot_bonus", shape=(slots,),
                                      initializer="zeros", trainable=False)

  def set_decay(self, scale: float, half_life: float) -> None:
    """b_p = scale * 2^(-age_p / half_life), age_p = slots - 1 - p (the
    latest slot, last, 0); half_life inf: the same bonus for every slot."""
    age = np.arange(self.slots - 1, -1, -1, dtype=np.float64)
    self.slot_bonus.assign(scale * np.exp2(-age / half_life))

  def call(self, items: tf.Tensor) -> tf.Tensor:
    return tf.where(items > 0, self.slot_bonus[tf.newaxis, :], 0.0)


def choose_decay(layer: HistoryBonus, score: Callable[[], float],
                 scales: Sequence[float], half_lives: Sequence[float]
                 ) -> Tuple[Tuple[float, float], Dict[str, float]]:
  """Sets `layer` to the (scale, half-life) with the best `score()`.

  Args:
    layer: the model's bonus layer.
    score: the model's validation metric with the layer as it is set.
    scales: the scales tried (0, tried once, is no bonus).
    half_lives: the half-lives tried with every scale > 0.

  Returns:
    ((scale, half-life) chosen, {"scale/half-life": its score}). Ties, and
    NaN scores, go to the earlier setting: no bonus before any, smaller
    scales before larger.
  """
  settings = [(0.0, np.inf)] * (0 in scales) + [
      (scale, half_life) for scale in sorted(scales) if scale > 0
      for half_life in half_lives]
  if not settings:
    raise ValueError("No history bonus setting to choose from.")
  by_setting = {}
  for scale, half_life in settings:
    layer.set_decay(scale, half_life)
    by_setting[f"{scale:g}/{half_life:g}"] = score()
  values = [np.nan_to_num(v, nan=-np.inf) for v in by_setting.values()]
  best = settings[int(np.argmax(values))]
  layer.set_decay(*best)
  return best, by_setting


def add_to_scores(scores: tf.Tensor, items: tf.Tensor, bonus: tf.Tensor,
                  first=0) -> tf.Tensor:
  """Adds each row's bonuses to its scores of their items.

  Args:
    scores: float [batch, n], row b's scores of items first..first + n - 1.
    items: int [batch, slots]; a slot outside that range, or of index 0,
      adds nothing.
    bonus: float [batch, slots].
    first: the item of column 0.

  Returns:
    float [batch, n].
  """
  column = tf.cast(items, tf.int64) - tf.cast(first, tf.int64)
  inside = (items > 0) & (column >= 0) & (
      column < tf.cast(tf.shape(scores)[1], tf.int64))
  where = tf.where(inside)
  return tf.tensor_scatter_nd_add(
      scores, tf.stack([where[:, 0], tf.gather_nd(column, where)], axis=1),
      tf.gather_nd(bonus, where))


def item_bonus(items: tf.Tensor, bonus: tf.Tensor,
               identifiers: tf.Tensor) -> tf.Tensor:
  """float [batch, m]: each row's summed bonus of each of its identifiers
  (`items` [batch, slots] and `identifiers` [batch, m] name items alike)."""
  same = tf.cast(items[:, tf.newaxis, :] == identifiers[:, :, tf.newaxis],
                 bonus.dtype)
  return tf.reduce_sum(same * bonus[:, tf.newaxis, :], axis=2)


class HistoryBonusTopK(tfrs.layers.factorized_top_k.TopK):
  """Top k under dense scores plus the history bonus, from a dense index.

  See the module docstring for why it is exact under an exact index.
  """

  def __init__(self, dense_index: tfrs.layers.factorized_top_k.TopK,
               query_model: tf.keras.Model,
               candidate_tower: tf.keras.Model, num_candidates: int,
               k: int = 10, name: Optional[Text] = None):
    """See the class docstring.

    Args:
      dense_index: a top-k index of the candidate embeddings (taking query
        embeddings, [batch, d] or [batch, K, d]).
      query_model: its `with_bonus(serving inputs)` gives (query
        embeddings, int64 [batch, slots] catalogue indices of the slots,
        [batch, slots] their identifiers in the index, float [batch, slots]
        their bonuses).
      candidate_tower: embeds the slots' catalogue indices.
      num_candidates: the index's candidates (a lookup asks for at most as
        many).
      k: the default list length.
      name: the layer's name.
    """
    super().__init__(k=k, name=name)
    self.dense_index = dense_index
    self.query_model = query_model
    self.candidate_tower = candidate_tower
    self.num_candidates = num_candidates

  def index(self, candidates: tf.Tensor,
            identifiers: Optional[tf.Tensor] = None) -> "HistoryBonusTopK":
    self.dense_index.index(candidates, identifiers)
    self._reset_tf_function_cache()
    return self

  def call(self, queries: Union[tf.Tensor, Dict[Text, tf.Tensor]],
           k: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
    k = k if k is not None else self._k
    embeddings, slots, slot_ids, bonus = self.query_model.with_bonus(queries)
    width = slots.shape[1]
    scores, identifiers = self.dense_index(
        embeddings, k=min(k + width, self.num_candidates))
    scores += item_bonus(slot_ids, bonus, identifiers)
    slot_embeddings = tf.reshape(
        self.candidate_tower(tf.reshape(slots, [-1])),
        [-1, width, embeddings.shape[-1]])
    # A slot's dense score: the best over query heads, as the index scores.
    heads = (embeddings if embeddings.shape.rank == 3 else
             embeddings[:, tf.newaxis, :])
    dense = tf.reduce_max(tf.einsum("bhd,bpd->bhp", heads, slot_embeddings),
                          axis=1)
    slot_scores = tf.where(slots > 0,
                           dense + item_bonus(slot_ids, bonus, slot_ids),
                           tf.constant(-np.inf, scores.dtype))
    scores, identifiers = query_heads.merge_top_k(
        tf.concat([scores, slot_scores], axis=1),
        tf.concat([identifiers, tf.cast(slot_ids, identifiers.dtype)],
                  axis=1), k)
    if isinstance(k, (int, np.integer)):
      scores.set_shape([None, k])
      identifiers.set_shape([None, k])
    return scores, identifiers

  def is_exact(self) -> bool:
    return self.dense_index.is_exact()
