"""The two-tower `tfrs.Model`: sampled softmax with logQ correction."""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import frequency
from tfrs_yambda import schema
from tfrs_yambda import towers

# Where the logQ correction's target frequencies come from.
SAMPLING_PROBABILITIES = ("counts", "streaming")
# Which items uniform negatives are drawn from: all catalogue items, or those
# with an id row of their own (the rest share the "unknown" row).
UNIFORM_POOLS = ("all", "trained")


def mixed_sampling_probability(in_batch_count: tf.Tensor, batch_size,
                               num_uniform: int, num_items: int,
                               in_pool=None) -> tf.Tensor:
  """Probability that a candidate column is each item, under mixed sampling.

  A step's candidates are its B targets (in-batch negatives), each drawn from
  the target distribution p, plus M items drawn uniformly from n items of the
  catalogue (Yang et al. 2020). Item j is then expected in B p_j + M / n
  of the B + M columns, so a column taken at random is j with probability
      q_j = (B p_j + M / n) / (B + M),
  which is p_j for M = 0 and 1 / n for B = 0. Duplicate columns are kept as
  negatives, as sampled softmax with expected-count correction assumes.

  Args:
    in_batch_count: B p_j for each column, the item's expected count among
      the batch's targets.
    batch_size: B, the batch's targets.
    num_uniform: M, the uniformly drawn negatives.
    num_items: n, the items the uniform draws come from.
    in_pool: optional bool per column, whether its item is among those n
      (others are never drawn uniformly: their M / n term is 0).
  """
  batch_size = tf.cast(batch_size, tf.float32)
  uniform = tf.fill(tf.shape(in_batch_count), num_uniform / num_items)
  if in_pool is not None:
    uniform = tf.where(in_pool, uniform, 0.0)
  return (in_batch_count + uniform) / (batch_size + num_uniform)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """The retrieval task's settings: its negatives and its score corrections.

  The towers (`towers.TowerConfig`) decide what a query and a candidate
  embed; these decide what the softmax compares a query's target with and
  how its scores are corrected for the way negatives are sampled. See
  `TwoTowerModel` for the ideas behind each.

  Attributes:
    temperature: softmax temperature of the unit-length embeddings' scores.
    logq_correction: correct scores by log sampling probability.
    uniform_negatives: M, negatives per step drawn uniformly from the
      `uniform_pool` (never index 0, unknown / padding), shared by the
      batch's queries; 0: in-batch negatives only.
    uniform_pool: "all" items, or only "trained" ones, those with an id row
      of their own: the others share the "unknown" row, which uniform draws
      of them would teach to mean "negative".
    sampling_probability: where the logQ correction's target frequencies
      come from: the catalogue's training "counts", or "streaming", estimated
      while training.
    frequency_alpha: the streaming estimate's moving-average rate.
    frequency_buckets: the streaming estimate's hash buckets; 0: one per
      catalogue index (no collisions).
  """
  temperature: float = 0.05
  logq_correction: bool = True
  uniform_negatives: int = 0
  uniform_pool: str = "trained"
  sampling_probability: str = "counts"
  frequency_alpha: float = 0.01
  frequency_buckets: int = 0

  def __post_init__(self):
    if self.sampling_probability not in SAMPLING_PROBABILITIES:
      raise ValueError(f"sampling_probability must be one of "
                       f"{SAMPLING_PROBABILITIES}, got "
                       f"{self.sampling_probability}")
    if self.uniform_pool not in UNIFORM_POOLS:
      raise ValueError(f"uniform_pool must be one of {UNIFORM_POOLS}, got "
                       f"{self.uniform_pool}")
    if self.uniform_negatives < 0:
      raise ValueError(f"uniform_negatives must be >= 0, got "
                       f"{self.uniform_negatives}")

  def estimate_buckets(self, num_items: int) -> int:
    """Buckets of the streaming frequency estimate (0: none is kept).

    Args:
      num_items: the catalogue's items (indices 1..num_items).
    """
    if self.sampling_probability != "streaming":
      return 0
    return self.frequency_buckets or num_items + 1


class TwoTowerModel(tfrs.Model):
  """Query and candidate towers trained with `tfrs.tasks.Retrieval`.

  The loss is a softmax over the batch's own targets (in-batch negatives) and,
  with `uniform_negatives` = M > 0, M more items drawn uniformly from the
  catalogue at each step and shared by all queries (mixed negative sampling,
  Yang et al. 2020): in-batch negatives are mostly popular tracks, so the
  uniform ones show the model the long tail it must also rank below the
  target. Sampled negatives are not drawn uniformly, so each score is
  corrected by the log of its candidate's sampling probability (Yi et al.
  2019), see `mixed_sampling_probability`. The target frequencies behind it
  are the catalogue's training counts (`sampling_probability="counts"`) or
  estimated while training (`"streaming"`, `frequency.
  StreamingFrequencyEstimator`). A candidate with the same id as a query's
  target (a popular track twice in a batch, a uniform draw of the target) is
  not counted as a negative of that query (accidental-hit removal). Example
  age enters the training scores only, through each candidate's popularity
  trend (`towers.age_features`, `towers.ItemEncoder.trend`), and is 0 at
  serving. With K > 1 query heads (`towers.TowerConfig.query_heads`) a
  query's score of a candidate is the max over its heads (`query_heads`);
  everything above then applies to those scores. The options named here are
  `RetrievalConfig`'s.
  """

  def __init__(self, catalogue: catalogue_lib.Catalogue,
               config: Optional[towers.TowerConfig] = None,
               retrieval: Optional[RetrievalConfig] = None):
    """See the class docstring.

    Args:
      catalogue: items and users.
      config: tower sizes and switches (default: `towers.TowerConfig()`).
      retrieval: negatives and score corrections (default:
        `RetrievalConfig()`).
    """
    super().__init__()
    config = config or towers.TowerConfig()
    retrieval = retrieval or RetrievalConfig()
    item_encoder = towers.ItemEncoder(catalogue, config, name="item_encoder")
    self.item_encoder = item_encoder
    self.age_scale_days = (config.example_age_scale_days
                           if config.use_example_age else None)
    self.temperature = retrieval.temperature
    self.candidate_tower = towers.CandidateTower(item_encoder, config,
                                                 name="candidate_tower")
    self.query_tower = towers.QueryTower(
        catalogue, item_encoder, config, self.candidate_tower,
        name="query_tower")
    self.logq_correction = retrieval.logq_correction
    self.num_items = catalogue.num_items
    self.uniform_negatives = retrieval.uniform_negatives
    # Indices 1..pool_size are drawn: items are indexed by training count,
    # so those with an id row of their own come first.
    self.pool_size = (item_encoder.id_vocabulary_size - 1
                      if retrieval.uniform_pool == "trained"
                      else catalogue.num_items)
    if self.uniform_negatives and self.pool_size < 1:
      raise ValueError("No items to draw uniform negatives from.")
    self.sampling_probability = tf.Variable(
        catalogue.sampling_probability(), trainable=False,
        name="sampling_probability")
    self.frequency_estimator = None
    buckets = retrieval.estimate_buckets(catalogue.num_items)
    if buckets:
      self.frequency_estimator = frequency.StreamingFrequencyEstimator(
          buckets, retrieval.frequency_alpha, name="frequency_estimator")
    # Per-example losses, averaged over the global batch in compute_loss: the
    # loss and learning rate then do not scale with the batch size, and the
    # gradients summed across replicas are those of the global mean.
    self.task = tfrs.tasks.Retrieval(
        loss=tf.keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
        temperature=retrieval.temperature, remove_accidental_hits=True)

  def call(self, features, training=False):
    """(query embeddings, target candidate embeddings) of a batch.

    Query embeddings are [batch, d], or [batch, K, d] with K query heads.

    Calling the model on a batch creates all its variables, which a backup
    needs before it can restore them.
    """
    return (self.query_tower(features, training=training),
            self.candidate_tower(features[schema.TARGET_ITEM],
                                 training=training))

  def sample_uniform_negatives(self) -> tf.Tensor:
    """[uniform_negatives] item indices, uniform over 1..pool_size."""
    return tf.random.uniform([self.uniform_negatives], minval=1,
                             maxval=self.pool_size + 1, dtype=tf.int64)

  def candidate_probability(self, targets: tf.Tensor,
                            candidate_ids: tf.Tensor,
                            training=False) -> tf.Tensor:
    """Each candidate column's sampling probability, up to a common factor.

    With the streaming estimate, a training call first records `targets`.
    """
    batch_size = tf.shape(targets)[0]
    if self.frequency_estimator is not None:
      count = self.frequency_estimator(targets, candidate_ids,
                                       training=training)
    else:
      count = tf.cast(batch_size, tf.float32) * tf.gather(
          self.sampling_probability, candidate_ids)
    q = mixed_sampling_probability(count, batch_size, self.uniform_negatives,
                                   self.pool_size,
                                   candidate_ids <= self.pool_size)
    # A factor common to all columns cancels in the softmax. Dividing by the
    # largest keeps the ratios intact where TFRS clips to [1e-6, 1]: on a
    # catalogue of millions, rare items' raw probabilities fall below 1e-6.
    return q / tf.reduce_max(q)

  def compute_loss(self, features, training=False) -> tf.Tensor:
    targets = features[schema.TARGET_ITEM]
    candidate_ids = targets
    if self.uniform_negatives:
      candidate_ids = tf.concat([targets, self.sample_uniform_negatives()],
                                axis=0)
    # The first len(targets) columns are the queries' positives (TFRS labels
    # are eye(queries, candidates)); the rest are negatives for every query.
    # [batch, K, d] queries (query_heads = K > 1) are scored by the task as
    # the max over their heads, before every correction below.
    queries = self.query_tower(features, training=training)
    candidates = self.candidate_tower(candidate_ids, training=training)
    if self.age_scale_days:
      # Concatenation adds age_features · trend to every score; times the
      # temperature, as the task divides all scores by it, so that the trend
      # is in logits and its learning rate is not multiplied by 1 / T.
      age = self.temperature * towers.age_features(
          features[schema.EXAMPLE_AGE], self.age_scale_days)
      if queries.shape.rank == 3:
        # The same term in every head adds it to their max as well.
        age = tf.tile(age[:, tf.newaxis], [1, queries.shape[1], 1])
      queries = tf.concat([queries, age], axis=-1)
      candidates = tf.concat(
          [candidates, self.item_encoder.trend(candidate_ids)], axis=-1)
    probability = (self.candidate_probability(targets, candidate_ids,
                                              training=training)
                   if self.logq_correction else None)
    return tf.nn.compute_average_loss(self.task(
        queries, candidates,
        sample_weight=features[schema.WEIGHT],
        candidate_sampling_probability=probability,
        candidate_ids=candidate_ids,
        compute_metrics=False))


def memory_estimate(catalogue: catalogue_lib.Catalogue,
                    config: towers.TowerConfig, optimizer_slots: int,
                    frequency_buckets: int = 0) -> dict:
  """Bytes of the model's tables for this catalogue; see `table_bytes`."""
  return table_bytes(
      num_items=catalogue.num_items,
      item_vocab=catalogue_lib.id_vocabulary_size(catalogue.item_train_count,
                                                  config.min_item_count),
      user_vocab=catalogue_lib.id_vocabulary_size(catalogue.user_train_count,
                                                  config.min_user_count),
      num_artists=len(catalogue.artist_ids),
      num_albums=len(catalogue.album_ids),
      audio_dim=catalogue.audio_dim, config=config,
      optimizer_slots=optimizer_slots, frequency_buckets=frequency_buckets)


def table_bytes(num_items: int, item_vocab: int, user_vocab: int,
                num_artists: int, num_albums: int, audio_dim: int,
                config: towers.TowerConfig, optimizer_slots: int,
                frequency_buckets: int = 0) -> dict:
  """Bytes of embedding tables, their optimizer slots and catalogue tables.

  Trainable embedding tables carry `optimizer_slots` copies of themselves in
  the optimizer (Adam 2, Adagrad 1); the catalogue tables (audio and length
  features, artist and album of each item, sampling probability) are constant.
  The streaming frequency estimate, if used, keeps a last step (int64) and an
  interval (float32) per bucket.
  """
  embeddings = 4 * (item_vocab * config.item_id_dim +
                    num_artists * config.artist_dim +
                    num_albums * config.album_dim +
                    user_vocab * config.user_dim)
  if config.use_example_age:
    embeddings += 4 * 2 * (item_vocab + num_albums)  # trend coefficients
  content = (num_items + 1) * (
      np.dtype(config.content_dtype).itemsize * (audio_dim + 3) + 8 * 2 + 4)
  frequency_estimate = 12 * frequency_buckets
  return {"embeddings": embeddings,
          "optimizer_slots": embeddings * optimizer_slots,
          "catalogue_tables": content,
          "frequency_estimate": frequency_estimate,
          "total": embeddings * (1 + optimizer_slots) + content +
                   frequency_estimate}
