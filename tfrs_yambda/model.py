"""The two-tower `tfrs.Model`: in-batch softmax with logQ correction."""

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema
from tfrs_yambda import towers


class TwoTowerModel(tfrs.Model):
  """Query and candidate towers trained with `tfrs.tasks.Retrieval`.

  The loss is a softmax over the batch's own targets (in-batch negatives).
  Popular tracks appear as negatives more often than they would under uniform
  sampling, so each score is corrected by the log of the candidate's sampling
  probability (Yi et al. 2019) from the catalogue's training frequencies.
  A batch often holds the same track for several queries; with accidental-hit
  removal those copies are not counted as negatives of each other.
  """

  def __init__(self, catalogue: catalogue_lib.Catalogue,
               config: towers.TowerConfig = towers.TowerConfig(),
               temperature: float = 0.05, logq_correction: bool = True):
    super().__init__()
    item_encoder = towers.ItemEncoder(catalogue, config, name="item_encoder")
    self.query_tower = towers.QueryTower(catalogue, item_encoder, config,
                                         name="query_tower")
    self.candidate_tower = towers.CandidateTower(item_encoder, config,
                                                 name="candidate_tower")
    self.logq_correction = logq_correction
    self.sampling_probability = tf.Variable(
        catalogue.sampling_probability(), trainable=False,
        name="sampling_probability")
    # Per-example losses, averaged over the global batch in compute_loss: the
    # loss and learning rate then do not scale with the batch size, and the
    # gradients summed across replicas are those of the global mean.
    self.task = tfrs.tasks.Retrieval(
        loss=tf.keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
        temperature=temperature, remove_accidental_hits=True)

  def call(self, features, training=False):
    """(query embeddings, target candidate embeddings) of a batch.

    Calling the model on a batch creates all its variables, which a backup
    needs before it can restore them.
    """
    return (self.query_tower(features, training=training),
            self.candidate_tower(features[schema.TARGET_ITEM],
                                 training=training))

  def compute_loss(self, features, training=False) -> tf.Tensor:
    targets = features[schema.TARGET_ITEM]
    probability = (tf.gather(self.sampling_probability, targets)
                   if self.logq_correction else None)
    queries, candidates = self(features, training=training)
    return tf.nn.compute_average_loss(self.task(
        queries, candidates,
        sample_weight=features[schema.WEIGHT],
        candidate_sampling_probability=probability,
        candidate_ids=targets,
        compute_metrics=False))


def memory_estimate(catalogue: catalogue_lib.Catalogue,
                    config: towers.TowerConfig,
                    optimizer_slots: int) -> dict:
  """Bytes of the model's tables for this catalogue; see `table_bytes`."""
  return table_bytes(
      num_items=catalogue.num_items,
      item_vocab=catalogue_lib.id_vocabulary_size(catalogue.item_train_count,
                                                  config.min_item_count),
      user_vocab=catalogue_lib.id_vocabulary_size(catalogue.user_train_count,
                                                  config.min_user_count),
      num_artists=len(catalogue.artist_ids), num_albums=len(catalogue.album_ids),
      audio_dim=catalogue.audio_dim, config=config,
      optimizer_slots=optimizer_slots)


def table_bytes(num_items: int, item_vocab: int, user_vocab: int,
                num_artists: int, num_albums: int, audio_dim: int,
                config: towers.TowerConfig, optimizer_slots: int) -> dict:
  """Bytes of embedding tables, their optimizer slots and catalogue tables.

  Trainable embedding tables carry `optimizer_slots` copies of themselves in
  the optimizer (Adam 2, Adagrad 1); the catalogue tables (audio and length
  features, artist and album of each item, sampling probability) are constant.
  """
  embeddings = 4 * (item_vocab * config.item_id_dim +
                    num_artists * config.artist_dim +
                    num_albums * config.album_dim + user_vocab * config.user_dim)
  content = (num_items + 1) * (4 * (audio_dim + 3) + 8 * 2 + 4)
  return {"embeddings": embeddings,
          "optimizer_slots": embeddings * optimizer_slots,
          "catalogue_tables": content,
          "total": embeddings * (1 + optimizer_slots) + content}
