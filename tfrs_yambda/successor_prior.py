"""A seed-successor prior mixed into the model's scores, chosen on the
validation day.

Listeners follow well-worn paths: after a track, its most frequent next
track in training is the next one for a tenth of the demo's validation
examples, which is why seed co-occurrence stayed ahead of the model at
k = 1 (0.107 against 0.099, docs/evaluation.md). A dense query holds the
seed's neighbourhood, not its exact successors. With
`TowerConfig.successor_prior`, the model's next-track distribution is
also mixed with

  B(j) = mass * P(j | seed),

P(j | seed) the share of j among the tracks played right after the seed
in training, over the seed's `successors` most frequent (the shares stay
those of all of the seed's successors). It is counted from the training
examples only (`fit`, from the baselines' (seed, target) counts), so
nothing from a scored window reaches it. Its items and weights follow the
history's and the artist prior's slots (`QueryTower.bonus`), and
evaluation and serving mix them in as `tfrs_yambda.history_bonus`
describes.

It is a next-track prior: it says what plays right after the seed. The
Yambda protocol's query asks, at the end of training, for a whole day
that starts 30 minutes later (`tfrs_yambda.yambda_protocol`); by then the
seed's successor has been played in the gap, and a mass that lifts it
crowds out the day (the demo's protocol NDCG@10 fell as the mass rose,
docs/model.md). So the prior has two masses, both chosen on the validation
day (`priors.choose`): `mass`, by the next-track metric, which serving and
next-track evaluation use, and `protocol_mass`, by the protocol's metric,
which the protocol's queries use (`protocol_query`).
"""

import contextlib
from typing import NamedTuple, Tuple

import numpy as np
import tensorflow as tf

from tfrs_yambda import baselines


class Tables(NamedTuple):
  """The prior's tables, one row per item index (row 0: none)."""
  successors: np.ndarray     # int32 [items + 1, N] item indices, 0: none
  probabilities: np.ndarray  # float32 [items + 1, N] P(j | seed); 0: none


def fit(num_indices: int, transitions: Tuple[np.ndarray, np.ndarray,
                                             np.ndarray],
        successors: int) -> Tables:
  """The prior's tables from training counts.

  Args:
    num_indices: item indices are below it (catalogue items + 1).
    transitions: (seeds, targets, counts) of the training examples' (seed,
      target) pairs (`baselines.SeedCooccurrence.pair_counts`).
    successors: N, the successors kept per seed.

  Returns:
    `Tables`: each seed's N most frequent successors (ties by index) and
    their shares of all its successors; a track never a seed, and index 0,
    have none.
  """
  seeds, targets, counts = (np.asarray(x) for x in transitions)
  known = (seeds > 0) & (targets > 0)
  seeds, targets = seeds[known].astype(np.int64), targets[known]
  counts = counts[known].astype(np.float64)
  top, top_counts = baselines.top_per_row(seeds, targets, counts,
                                          num_indices, successors)
  totals = np.bincount(seeds, weights=counts, minlength=num_indices)[
      :, np.newaxis]
  return Tables(
      successors=top.astype(np.int32),
      probabilities=np.divide(top_counts, totals,
                              out=np.zeros_like(top_counts),
                              where=totals > 0).astype(np.float32))


class SuccessorPrior(tf.keras.layers.Layer):
  """[batch] seeds -> ([batch, N] items, [batch, N] weights).

  The tables start empty and both masses at 0 (off): `set_tables` fills
  them from training counts, `set_mass` and `set_protocol_mass` set the
  masses; all are variables, so a checkpoint or SavedModel holds what was
  fitted and chosen.
  """

  def __init__(self, num_indices: int, successors: int, **kwargs):
    """Args: the item indices' bound and N (see `fit`)."""
    super().__init__(**kwargs)
    self.width = successors

    def table(name, shape, dtype):
      return self.add_weight(name=name, shape=shape, dtype=dtype,
                             initializer="zeros", trainable=False)

    # int32: the table is catalogue-sized (N per item).
    self.successors = table("successors", (num_indices, successors),
                            tf.int32)
    self.probabilities = table("probabilities", (num_indices, successors),
                               tf.float32)
    self.mass = table("mass", (), tf.float32)
    self.protocol_mass = table("protocol_mass", (), tf.float32)

  def set_tables(self, tables: Tables) -> None:
    self.successors.assign(tables.successors)
    self.probabilities.assign(tables.probabilities)

  def set_mass(self, mass: float) -> None:
    self.mass.assign(mass)

  def set_protocol_mass(self, mass: float) -> None:
    self.protocol_mass.assign(mass)

  def call(self, seeds: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    return (tf.cast(tf.gather(self.successors, seeds), tf.int64),
            self.mass * tf.gather(self.probabilities, seeds))


@contextlib.contextmanager
def protocol_query(model):
  """Within it, the model's successor prior (if any) weighs at its protocol
  mass: the Yambda protocol's queries are scored so."""
  layer = getattr(model.query_tower, "successor_prior", None)
  if layer is None:
    yield
    return
  mass = float(layer.mass.numpy())
  layer.set_mass(float(layer.protocol_mass.numpy()))
  try:
    yield
  finally:
    layer.set_mass(mass)
