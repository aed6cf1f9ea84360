"""A history prior mixed into the model's scores, chosen on the validation day.

Listeners replay: a third of the demo's next tracks are in the query's own
history. Dense queries rank each of ~50 recent tracks near the top only as
far as one point (or K) can sit near all of them and their neighbours at
once; ItemKNN, which sums a similarity over the listener's tracks, keeps
more of them in its top 100 (`tfrs_yambda.candidate_history` narrowed that
gap, it did not close it). With `TowerConfig.history_bonus`, the model's
next-track distribution is a mixture of the dense softmax and a repeat
prior over the history slots h_1..h_P (oldest first):

  p(j) ~ exp((q.c(j) - L) / t) + B(j),  B(j) = sum_p w_p [h_p = j],

with w_p = scale * 2^(-age_p / half_life) / sum_p' 2^(-age_p' / half_life),
age_p = P - p the slot's distance from the latest (0): `scale` is the
prior's mass, spread over the slots with a recency decay as DecayPop's
popularity; an item in several slots gets each one's weight. t is the
training temperature, and L = t log sum exp(s / t) over the query's top
`NORMALISER_TOP` dense scores s stands in for the softmax's normaliser
(the whole catalogue's would need every score, which an approximate index
never computes; on the demo both ranked about as well, docs/model.md). In
score units:

  s(j) = L + t log(exp((q.c(j) - L) / t) + B(j))  if B(j) > 0, else q.c(j),

so only the history's items move, each at least to its dense score: a
track the towers already rank high gains little, one they rank low rises
to about L + t log B(j). (An additive bonus, q.c(j) + B(j), lifts every
history item alike, and pushed other tracks out of the top 10 before it
helped the top 100; docs/model.md compares the two.) The seed has no slot
of its own: it is the query's own feature, and as the latest positive it
is usually the last history slot already. The prior is not learned with
the towers: in-batch negatives hardly ever include a query's own history
items, so a learned bonus stayed near 0 on the demo. The trained model's
(scale, half-life) is chosen on the validation day, like ItemKNN's
neighbourhood and the epoch (`tfrs_yambda.train`), and kept in the model's
variables.

  * Evaluation: `mix_into_scores` rewrites each query's history columns of
    its dense scores (`tfrs_yambda.ranking`, `tfrs_yambda.blockwise_ranks`).
  * Serving: `HistoryBonusTopK` takes the dense index's top
    max(k, NORMALISER_TOP) + P (L from the first ones), mixes the prior into
    those of them in the history, scores the P slots' own items exactly and
    merges both lists into one top k, inside the SavedModel, so the serving
    signature is unchanged. Exact under an exact index: only history items
    move, never below their dense score, so an item outside both lists has
    at least k + P unchanged-or-raised scores above it, of which at most P
    belong to (re-scored) slots: k remain above it.

The same code mixes in any prior given as (slots, weights): with
`TowerConfig.artist_prior` and `successor_prior` the query's slots are its
history's, then those priors' items (`tfrs_yambda.artist_prior`,
`tfrs_yambda.successor_prior`), and P counts them all.
"""

from typing import (Callable, Dict, NamedTuple, Optional, Sequence, Text,
                    Tuple, Union)

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_yambda import query_heads

# The dense scores whose log-sum-exp is the mixture's normaliser L.
NORMALISER_TOP = 100


class Bonus(NamedTuple):
  """A query batch's history prior: its slots and their weights w_p."""
  slots: tf.Tensor      # int64 [batch, slots], catalogue indices (0: none)
  weights: tf.Tensor    # float [batch, slots]
  temperature: float    # the model's training temperature t


def query_bonus(model, features: Dict[Text, tf.Tensor]) -> Optional[Bonus]:
  """The model's history prior of these query features, if it has one that
  is on."""
  bonus = getattr(model.query_tower, "bonus", None)
  slots_and_weights = bonus(features) if bonus is not None else None
  # All weights 0 (the prior off, as while training): the scores are the
  # dense ones, so skip the normaliser's top-k. Called eagerly.
  if slots_and_weights is None or not np.any(slots_and_weights[1]):
    return None
  return Bonus(*slots_and_weights, model.temperature)


class HistoryBonus(tf.keras.layers.Layer):
  """[batch, slots] item indices -> [batch, slots] prior weights, w_p.

  Index 0 (padding, an unknown item, a switched-off input) gets 0. The
  weights start at 0 (off) and are set by `set_decay`, not by training.
  """

  def __init__(self, slots: int, **kwargs):
    """Args: `slots`, the history slots of each query (oldest first)."""
    super().__init__(**kwargs)
    self.slots = slots
    self.slot_weight = self.add_weight(name="slot_weight", shape=(slots,),
                                       initializer="zeros", trainable=False)

  def set_decay(self, scale: float, half_life: float) -> None:
    """w_p = scale * 2^(-age_p / half_life) / sum of the same over all slots,
    age_p = slots - 1 - p (the latest slot, last, 0); half_life inf: every
    slot scale / slots."""
    decay = np.exp2(-np.arange(self.slots - 1, -1, -1.0) / half_life)
    self.slot_weight.assign(scale * decay / decay.sum())

  def call(self, items: tf.Tensor) -> tf.Tensor:
    return tf.where(items > 0, self.slot_weight[tf.newaxis, :], 0.0)


def choose_decay(layer: HistoryBonus, score: Callable[[], float],
                 scales: Sequence[float], half_lives: Sequence[float]
                 ) -> Tuple[Tuple[float, float], Dict[str, float]]:
  """Sets `layer` to the (scale, half-life) with the best `score()`.

  Args:
    layer: the model's prior layer.
    score: the model's validation metric with the layer as it is set.
    scales: the scales (prior masses) tried; 0, tried once, is no prior.
    half_lives: the half-lives tried with every scale > 0.

  Returns:
    ((scale, half-life) chosen, {"scale/half-life": its score}). Ties, and
    NaN scores, go to the earlier setting: no prior before any, smaller
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


def normaliser(top_scores: tf.Tensor, temperature: float) -> tf.Tensor:
  """float [batch]: L = t log sum exp(s / t) over each row's finite scores
  (its dense top, `NORMALISER_TOP` or fewer); 0 for a row with none."""
  finite = tf.math.is_finite(top_scores)
  lse = temperature * tf.reduce_logsumexp(
      tf.where(finite, top_scores / temperature,
               tf.constant(-np.inf, top_scores.dtype)), axis=1)
  return tf.where(tf.reduce_any(finite, axis=1), lse, tf.zeros_like(lse))


def dense_top(dense: tf.Tensor, first=0) -> tf.Tensor:
  """float [batch, min(n, NORMALISER_TOP)]: each row's top dense scores
  ([batch, n], columns items first.., index 0 left out), best first; -inf
  for index 0 and a non-finite score."""
  column = tf.range(tf.shape(dense)[1])
  counted = tf.where((column[tf.newaxis, :] + first > 0) &
                     tf.math.is_finite(dense), dense,
                     tf.constant(-np.inf, dense.dtype))
  return tf.math.top_k(counted, tf.minimum(NORMALISER_TOP,
                                           tf.shape(dense)[1])).values


def mixed(dense: tf.Tensor, weight: tf.Tensor, level: tf.Tensor,
          temperature: float) -> tf.Tensor:
  """Scores of items with dense scores `dense` and prior weights `weight`
  under normaliser(s) `level` (broadcast against them): L + t log(exp((dense
  - L) / t) + weight); exactly `dense` where the weight is 0 or `dense` is
  not finite (a non-finite score stays a miss). A weight that is not a
  mass (negative, NaN) gives NaN, a miss, as an infinite one gives inf."""
  level = tf.broadcast_to(level, tf.shape(dense))
  raised = level + temperature * tf.reduce_logsumexp(
      tf.stack([(dense - level) / temperature, tf.math.log(weight)], axis=-1),
      axis=-1)
  return tf.where((weight != 0) & tf.math.is_finite(dense), raised, dense)


def mix_into_scores(scores: tf.Tensor, bonus: Bonus, normaliser_: tf.Tensor,
                    first=0) -> tf.Tensor:
  """Each row's dense scores with the history prior mixed into its slots'
  items (`mixed`).

  Args:
    scores: float [batch, n], row b's dense scores of items first..first +
      n - 1.
    bonus: the rows' prior; a slot outside that range, or of index 0,
      changes nothing.
    normaliser_: float [batch], each row's L.
    first: the item of column 0.

  Returns:
    float [batch, n].
  """
  items = bonus.slots
  column = tf.cast(items, tf.int64) - tf.cast(first, tf.int64)
  inside = (items > 0) & (column >= 0) & (
      column < tf.cast(tf.shape(scores)[1], tf.int64))
  where = tf.where(inside)
  at = tf.stack([where[:, 0], tf.gather_nd(column, where)], axis=1)
  # An item's slots summed per (row, column) key: linear in the slots, which
  # the artist prior makes hundreds (`item_bonus` compares every pair). An
  # item in several slots is then written once per slot, the same value.
  key = at[:, 0] * tf.cast(tf.shape(scores)[1], tf.int64) + at[:, 1]
  distinct, position = tf.unique(key)
  weight = tf.gather(tf.math.unsorted_segment_sum(
      tf.cast(tf.gather_nd(bonus.weights, where), scores.dtype), position,
      tf.size(distinct)), position)
  return tf.tensor_scatter_nd_update(
      scores, at, mixed(tf.gather_nd(scores, at), weight,
                        tf.gather(normaliser_, where[:, 0]),
                        bonus.temperature))


def item_bonus(items: tf.Tensor, weights: tf.Tensor,
               identifiers: tf.Tensor) -> tf.Tensor:
  """float [batch, m]: each row's summed slot weight of each of its
  identifiers (`items` [batch, slots] and `identifiers` [batch, m] name
  items alike).

  By sorting each row's slots and searching them, O((slots + m) log slots)
  a row rather than comparing every pair: with the artist prior a served
  query has hundreds of slots and asks for hundreds of identifiers.
  """
  if items.shape[1] == 0:
    return tf.zeros(tf.shape(identifiers), weights.dtype)
  order = tf.argsort(items, axis=1, stable=True)
  items = tf.gather(items, order, batch_dims=1)
  weights = tf.gather(weights, order, batch_dims=1)
  # Each run of equal items in a row is one segment, numbered across rows.
  starts = tf.concat([tf.ones_like(items[:, :1], tf.bool),
                      items[:, 1:] != items[:, :-1]], axis=1)
  run = tf.reshape(tf.cumsum(tf.reshape(tf.cast(starts, tf.int64), [-1])),
                   tf.shape(items)) - 1
  sums = tf.math.segment_sum(tf.reshape(weights, [-1]), tf.reshape(run, [-1]))
  at = tf.minimum(tf.searchsorted(items, tf.cast(identifiers, items.dtype)),
                  tf.shape(items, out_type=tf.int32)[1] - 1)
  found = tf.gather(items, at, batch_dims=1) == tf.cast(identifiers,
                                                         items.dtype)
  return tf.where(found, tf.gather(sums, tf.gather(run, at, batch_dims=1)),
                  tf.zeros([], weights.dtype))


class HistoryBonusTopK(tfrs.layers.factorized_top_k.TopK):
  """Top k under the dense scores with the history prior mixed in, from a
  dense index. See the module docstring for why it is exact under an exact
  index.
  """

  def __init__(self, dense_index: tfrs.layers.factorized_top_k.TopK,
               query_model: tf.keras.Model, slot_embeddings: np.ndarray,
               num_candidates: int, temperature: float, k: int = 10,
               name: Optional[Text] = None):
    """See the class docstring.

    Args:
      dense_index: a top-k index of the candidate embeddings (taking query
        embeddings, [batch, d] or [batch, K, d]).
      query_model: its `with_bonus(serving inputs)` gives (query
        embeddings, int64 [batch, slots] catalogue indices of the slots,
        [batch, slots] their identifiers in the index, float [batch, slots]
        their prior weights).
      slot_embeddings: float [catalogue indices, d], each index's candidate
        embedding (row 0 unused): the slots' embeddings are gathered, not
        computed per request, since the priors list hundreds of slots.
      num_candidates: the index's candidates (a lookup asks for at most as
        many).
      temperature: the model's training temperature.
      k: the default list length.
      name: the layer's name.
    """
    super().__init__(k=k, name=name)
    self.dense_index = dense_index
    self.query_model = query_model
    self.slot_embeddings = tf.Variable(
        slot_embeddings, trainable=False, name="slot_embeddings")
    self.num_candidates = num_candidates
    self.temperature = temperature

  def index(self, candidates: tf.Tensor,
            identifiers: Optional[tf.Tensor] = None) -> "HistoryBonusTopK":
    self.dense_index.index(candidates, identifiers)
    self._reset_tf_function_cache()
    return self

  def call(self, queries: Union[tf.Tensor, Dict[Text, tf.Tensor]],
           k: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
    k = k if k is not None else self._k
    embeddings, slots, slot_ids, weights = self.query_model.with_bonus(
        queries)
    width = slots.shape[1]
    scores, identifiers = self.dense_index(
        embeddings, k=min(max(k, NORMALISER_TOP) + width,
                          self.num_candidates))
    # The index's list is sorted: its head is the dense top.
    level = normaliser(scores[:, :NORMALISER_TOP],
                       self.temperature)[:, tf.newaxis]
    scores = mixed(scores, item_bonus(slot_ids, weights, identifiers), level,
                   self.temperature)
    slot_embeddings = tf.gather(self.slot_embeddings, slots)
    # A slot's dense score: the best over query heads, as the index scores.
    heads = (embeddings if embeddings.shape.rank == 3 else
             embeddings[:, tf.newaxis, :])
    dense = tf.reduce_max(tf.einsum("bhd,bpd->bhp", heads, slot_embeddings),
                          axis=1)
    slot_scores = tf.where(
        slots > 0,
        mixed(dense, item_bonus(slot_ids, weights, slot_ids), level,
              self.temperature),
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
