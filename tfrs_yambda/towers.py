"""The query and candidate towers, and the item encoder they share.

Both towers take catalogue item indices only: everything known about an item
(artist, album, track length, audio embedding) is looked up inside the model
from tables built from the catalogue, so serving needs nothing but ids.

Example age is not a tower input. In training it adds a context-free term to
each score, a per-item curve of popularity against age (`age_features` ·
`ItemEncoder.trend`), which is 0 at age 0: serving's "now" is the towers'
dot product itself. Feeding age into the query MLP instead (the YouTube
way) is the alternative; which is better is not established under the
validation protocol (docs/evaluation.md, "Earlier claims that did not
survive").
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tfrs_yambda import artist_prior as artist_prior_lib
from tfrs_yambda import candidate_history as candidate_history_lib
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import history_bonus as history_bonus_lib
from tfrs_yambda import history_encoder as history_encoder_lib
from tfrs_yambda import item_content
from tfrs_yambda import schema
from tfrs_yambda import successor_prior as successor_prior_lib

# How the query tower reads the history: the mean of its item features, or a
# causal self-attention encoder of the sequence (`history_encoder`).
HISTORY_ENCODERS = ("mean", "attention")


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """Sizes of the towers and the vocabulary policy."""
  item_id_dim: int = 64
  artist_dim: int = 32
  album_dim: int = 32
  user_dim: int = 32
  history_dim: int = 64       # history item width before pooling; 0: all
  # The latest this many history items are also pooled on their own (the
  # listener's current mood next to the long-term mean); 0: not.
  recent_history: int = 0
  # "mean" pools the history; "attention" reads it, then the seed, as a
  # sequence (history_encoder.CausalHistoryEncoder, history_dim wide).
  history_encoder: str = "mean"
  attention_blocks: int = 2
  attention_heads: int = 2
  attention_dropout: float = 0.0
  # The query adds a learned, position-weighted sum of the seed's and the
  # history's *candidate* embeddings (`QueryTower`): ItemKNN's score inside
  # the two towers.
  candidate_history: bool = False
  # A repeat prior over the history's own items, mixed into the softmax,
  # decaying with recency, sized after training (`tfrs_yambda.history_bonus`).
  history_bonus: bool = False
  # Next-artist prior, mixed in alike: A next artists x M tracks per seed
  # (`tfrs_yambda.artist_prior`).
  artist_prior: bool = False
  artist_prior_artists: int = 20
  artist_prior_tracks: int = 20
  # Seed-successor prior, mixed in alike: the seed's N most frequent next
  # tracks in training (`tfrs_yambda.successor_prior`).
  successor_prior: bool = False
  successor_prior_tracks: int = 20
  hidden_dim: int = 256
  output_dim: int = 64
  # K query vectors per example, scored by the best of them (max-sim, see
  # query_heads); 1: one query vector.
  query_heads: int = 1
  # Ids with fewer training positives share the "unknown" row; their content
  # features still tell them apart.
  min_item_count: int = 1
  min_user_count: int = 1
  example_age_scale_days: float = 30.0
  # float16 halves the largest table (4.9 GB at 9.4M items with 128-wide
  # audio): its values are unit-norm audio and standardised lengths.
  content_dtype: str = "float32"
  # Design elements that an ablation can switch off (tfrs_yambda.ablation).
  use_user_id: bool = True
  use_seed: bool = True
  use_history: bool = True
  use_audio: bool = True
  use_artist_album: bool = True
  use_example_age: bool = True

  def __post_init__(self):
    if self.query_heads < 1:
      raise ValueError(f"query_heads must be >= 1, got {self.query_heads}")
    if self.content_dtype not in item_content.CONTENT_DTYPES:
      raise ValueError(f"content_dtype must be one of "
                       f"{item_content.CONTENT_DTYPES}, "
                       f"got {self.content_dtype!r}")
    if self.history_encoder not in HISTORY_ENCODERS:
      raise ValueError(f"history_encoder must be one of {HISTORY_ENCODERS}, "
                       f"got {self.history_encoder!r}")
    if self.history_encoder == "attention" and (
        self.history_dim < 1 or self.recent_history):
      raise ValueError("The attention history encoder needs history_dim > 0 "
                       "(its width) and no recent_history (a mean's option).")


def age_features(age_days: tf.Tensor, scale_days: float) -> tf.Tensor:
  """[batch] example ages -> [batch, 2]: [age / scale, log(1 + age)], 0 at 0.

  Against an item's two trend coefficients, log-popularity can rise or fade
  linearly in age and fast in the first days after a release.
  """
  age = tf.cast(age_days, tf.float32)
  return tf.stack([age / scale_days, tf.math.log1p(age)], axis=-1)


def _table(values: np.ndarray, name: str) -> tf.Variable:
  # Non-trainable variables rather than constants: they are saved in the
  # SavedModel's variables, so large tables do not hit the 2 GB graph limit.
  return tf.Variable(values, trainable=False, name=name)


class ItemEncoder(tf.keras.layers.Layer):
  """Item indices -> item feature vectors, one per item or pooled per row.

  An item's features are its id, artist and album embeddings, its audio
  embedding and length features. Index 0 (unknown / padding) has no artist,
  album or audio.
  """

  def __init__(self, catalogue: catalogue_lib.Catalogue, config: TowerConfig,
               **kwargs):
    super().__init__(**kwargs)
    self.id_vocabulary_size = catalogue_lib.id_vocabulary_size(
        catalogue.item_train_count, config.min_item_count)
    self.use_artist_album = config.use_artist_album
    shapes = [("item_id_embedding", (self.id_vocabulary_size,
                                     config.item_id_dim))]
    if config.use_artist_album:
      shapes += [("artist_embedding", (len(catalogue.artist_ids),
                                       config.artist_dim)),
                 ("album_embedding", (len(catalogue.album_ids),
                                      config.album_dim))]
    # Created here, not in build(): `pooled` may be the first call.
    self.tables = [
        self.add_weight(name=name, shape=shape, initializer="uniform")
        for name, shape in shapes]
    self.artist = _table(catalogue.item_artist, "item_artist")
    self.album = _table(catalogue.item_album, "item_album")
    # Trend coefficients (see `trend`): an album's tracks are released
    # together, so rare tracks borrow their album's curve.
    self.trend_tables = [
        self.add_weight(name=name, shape=(rows, 2), initializer="zeros")
        for name, rows in (("item_trend", self.id_vocabulary_size),
                           ("album_trend", len(catalogue.album_ids)))
    ] if config.use_example_age else []
    # Audio and length features in one table: one gather serves both. It is
    # built from the catalogue and never trained, so it is not tracked: kept
    # out of checkpoints and backups (4.9 GB at 9.4M items, rewritten at every
    # backup), rebuilt by each model construction; a SavedModel tracks it
    # through `export.ServingQueryModel`.
    object.__setattr__(self, "content", item_content.content_table(
        catalogue, config.use_audio, config.content_dtype))

  def _id_rows(self, items: tf.Tensor) -> tf.Tensor:
    return tf.where(items < self.id_vocabulary_size, items,
                    tf.zeros_like(items))

  def _indices(self, items: tf.Tensor):
    """Per embedding table, the row of each item."""
    ids = self._id_rows(items)
    if not self.use_artist_album:
      return [ids]
    return [ids, tf.gather(self.artist, items), tf.gather(self.album, items)]

  def trend(self, items: tf.Tensor) -> tf.Tensor:
    """[batch] item indices -> [batch, 2] coefficients of the items'
    log-popularity against `age_features` (the id's plus the album's)."""
    item_trend, album_trend = self.trend_tables
    return (tf.gather(item_trend, self._id_rows(items)) +
            tf.gather(album_trend, tf.gather(self.album, items)))

  def call(self, items: tf.Tensor) -> tf.Tensor:
    """[batch] item indices -> [batch, width] features."""
    return tf.concat(
        [tf.gather(table, rows) for table, rows in zip(
            self.tables, self._indices(items))] +
        [tf.cast(tf.gather(self.content, items), tf.float32)], axis=-1)

  def pooled(self, items: tf.Tensor, projection=None,
             recent: int = 0) -> Sequence[tf.Tensor]:
    """[batch, n] item indices -> [[batch, width]], the mean over indices > 0.

    Popular tracks recur across a batch's histories, so each distinct item is
    looked up (and projected, if `projection` is given) once; a sparse segment
    mean then pools the rows without building the [batch, n, width] tensor,
    and the tables' gradients have one row per distinct item. Rows with no
    items pool to zeros. With `recent` > 0, a second mean over the last
    `recent` slots (histories are oldest first, padded at the front) follows.
    """
    valid = tf.where(items > 0)
    distinct, position = tf.unique(tf.gather_nd(items, valid))
    features = self(distinct)
    if projection is not None:
      features = projection(features)
    rows = tf.shape(items, out_type=tf.int64)[0]
    pooled = [tf.sparse.segment_mean(features, position, valid[:, 0],
                                     num_segments=rows)]
    if recent:
      latest = valid[:, 1] >= tf.shape(items, out_type=tf.int64)[1] - recent
      pooled.append(tf.sparse.segment_mean(
          features, tf.boolean_mask(position, latest),
          tf.boolean_mask(valid[:, 0], latest), num_segments=rows))
    return pooled

  def sequence(self, items: tf.Tensor, projection=None) -> tf.Tensor:
    """[batch, n] item indices -> [batch, n, width] features, slot by slot.

    As in `pooled`, each distinct item of the batch (padding included) is
    looked up and projected once, then gathered back into its slots.
    """
    distinct, position = tf.unique(tf.reshape(items, [-1]))
    features = self(distinct)
    if projection is not None:
      features = projection(features)
    return tf.reshape(tf.gather(features, position),
                      tf.concat([tf.shape(items), [-1]], axis=0))


def _mlp(config: TowerConfig, name: str,
         heads: int = 1) -> tf.keras.Sequential:
  """ReLU layer, then linear to unit vectors: [batch, d], or with heads > 1
  [batch, heads, d], each head normalised on its own."""
  if heads == 1:
    return tf.keras.Sequential([
        tf.keras.layers.Dense(config.hidden_dim, activation="relu"),
        tf.keras.layers.Dense(config.output_dim),
        tf.keras.layers.UnitNormalization(),
    ], name=name)
  return tf.keras.Sequential([
      tf.keras.layers.Dense(config.hidden_dim, activation="relu"),
      tf.keras.layers.Dense(heads * config.output_dim),
      tf.keras.layers.Reshape((heads, config.output_dim)),
      tf.keras.layers.UnitNormalization(axis=-1),
  ], name=name)


class QueryTower(tf.keras.Model):
  """(user, seed track, history) -> query embedding.

  The MLP reads the user's embedding, the seed's item features, the history
  (its mean item features, or with `history_encoder="attention"` the
  causal self-attention encoding of history-then-seed) and log(1 + history
  length). It returns [batch, d], or with `query_heads` = K > 1 K vectors
  per example, [batch, K, d], which score a candidate by the best of them
  (`query_heads`).

  With `candidate_history`, the seed's and the history's own candidate
  embeddings are added to it, weighted by slot
  (`tfrs_yambda.candidate_history`). With `history_bonus`,
  `artist_prior` or `successor_prior`, the tower also holds priors over
  items (the modules of those names), which scoring mixes into the
  query's scores; its output is the dense query either way.
  """

  def __init__(self, catalogue: catalogue_lib.Catalogue,
               item_encoder: ItemEncoder, config: TowerConfig,
               candidate_tower: Optional[tf.keras.Model] = None, **kwargs):
    """See the class docstring.

    Args:
      catalogue: items and users.
      item_encoder: the item features, shared with the candidate tower.
      config: sizes and switches.
      candidate_tower: the model's candidate tower; needed (only) with
        `config.candidate_history`.
      **kwargs: passed to `tf.keras.Model`.
    """
    super().__init__(**kwargs)
    self.item_encoder = item_encoder
    # History slots (oldest first), then the seed.
    self.num_slots = catalogue.history_length + 1
    self.candidate_history = None
    if config.candidate_history:
      if candidate_tower is None:
        raise ValueError("candidate_history needs the candidate tower.")
      self.candidate_history = candidate_history_lib.CandidateHistory(
          candidate_tower, self.num_slots, name="candidate_history")
    self.history_bonus = (
        history_bonus_lib.HistoryBonus(catalogue.history_length,
                                       name="history_bonus")
        if config.history_bonus else None)
    self.artist_prior = artist_prior_lib.ArtistPrior(
        len(catalogue.artist_ids), config.artist_prior_artists,
        config.artist_prior_tracks,
        name="artist_prior") if config.artist_prior else None
    self.successor_prior = successor_prior_lib.SuccessorPrior(
        catalogue.num_items + 1, config.successor_prior_tracks,
        name="successor_prior") if config.successor_prior else None
    users = catalogue.user_ids[1:catalogue_lib.id_vocabulary_size(
        catalogue.user_train_count, config.min_user_count)]
    self.user_lookup = tf.keras.layers.IntegerLookup(
        vocabulary=users.astype(np.int64), num_oov_indices=1,
        name="user_lookup")
    self.user_embedding = tf.keras.layers.Embedding(
        len(users) + 1, config.user_dim, name="user_embedding")
    self.history_projection = None
    self.history_encoder = None
    if config.use_history and config.history_encoder == "attention":
      self.history_encoder = history_encoder_lib.CausalHistoryEncoder(
          item_encoder, catalogue.history_length + 1, config.history_dim,
          config.attention_blocks, config.attention_heads,
          config.attention_dropout, name="history_encoder")
    elif config.history_dim:
      # Linear, so projecting each distinct item before the mean equals
      # projecting the mean; it makes the pooling (n items per row) narrower.
      self.history_projection = tf.keras.layers.Dense(
          config.history_dim, use_bias=False, name="history_projection")
    self.config = config
    self.mlp = _mlp(config, "query_mlp", config.query_heads)

  def call(self, features, training=None) -> tf.Tensor:
    config = self.config
    parts = []
    if config.use_user_id:
      parts.append(
          self.user_embedding(self.user_lookup(features[schema.USER_ID])))
    if config.use_seed:
      parts.append(self.item_encoder(features[schema.SEED_ITEM]))
    if config.use_history:
      history = features[schema.HISTORY_ITEMS]
      # Padding and unknown items (index 0) neither count nor dilute the mean.
      count = tf.reduce_sum(tf.cast(history > 0, tf.float32), axis=1,
                            keepdims=True)
      if self.history_encoder is not None:
        # The seed ends the sequence: its vector has read the history in
        # order. Without seed features the latest history item ends it.
        parts.append(self.history_encoder(
            history, features[schema.SEED_ITEM] if config.use_seed else None,
            training=training))
      else:
        parts += self.item_encoder.pooled(history, self.history_projection,
                                          config.recent_history)
      parts.append(tf.math.log1p(count))
    query = self.mlp(tf.concat(parts, axis=-1))
    if self.candidate_history is None:
      return query
    return self.candidate_history(query, self.slots(features))

  def slots(self, features) -> tf.Tensor:
    """int64 [batch, num_slots]: the history's items, then the seed; a
    switched-off input's slots hold index 0 (they add nothing)."""
    batch = tf.shape(features[schema.SEED_ITEM])[0]
    history = (features[schema.HISTORY_ITEMS] if self.config.use_history
               else tf.zeros([batch, self.num_slots - 1], tf.int64))
    seed = (features[schema.SEED_ITEM] if self.config.use_seed else
            tf.zeros([batch], tf.int64))
    return tf.concat([history, seed[:, tf.newaxis]], axis=1)

  def bonus(self, features) -> Optional[Tuple[tf.Tensor, tf.Tensor]]:
    """(items, their prior weights), [batch, slots] each: the history's
    slots, then the artist prior's items, then the successor prior's; None
    without a prior."""
    slots = self.slots(features)
    parts = []
    if self.history_bonus is not None:
      parts.append((slots[:, :-1], self.history_bonus(slots[:, :-1])))
    if self.artist_prior is not None:
      parts.append(self.artist_prior(
          tf.gather(self.item_encoder.artist, slots[:, -1])))
    if self.successor_prior is not None:
      parts.append(self.successor_prior(slots[:, -1]))
    return tuple(tf.concat(part, axis=1)
                 for part in zip(*parts)) if parts else None


class CandidateTower(tf.keras.Model):
  """Item index -> candidate embedding."""

  def __init__(self, item_encoder: ItemEncoder, config: TowerConfig, **kwargs):
    super().__init__(**kwargs)
    self.item_encoder = item_encoder
    self.mlp = _mlp(config, "candidate_mlp")

  def call(self, items: tf.Tensor) -> tf.Tensor:
    return self.mlp(self.item_encoder(items))
