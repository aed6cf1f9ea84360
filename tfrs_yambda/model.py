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
    # Mean over the batch (TFRS defaults to the sum), so the loss and the
    # learning rate do not scale with the batch size.
    self.task = tfrs.tasks.Retrieval(
        loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
        temperature=temperature, remove_accidental_hits=True)

  def compute_loss(self, features, training=False) -> tf.Tensor:
    targets = features[schema.TARGET_ITEM]
    probability = (tf.gather(self.sampling_probability, targets)
                   if self.logq_correction else None)
    return self.task(
        self.query_tower(features, training=training),
        self.candidate_tower(targets, training=training),
        sample_weight=features[schema.WEIGHT],
        candidate_sampling_probability=probability,
        candidate_ids=targets,
        compute_metrics=False)
