"""Streaming estimate of how often each item is a training target.

Yi et al. 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", Algorithm 2: instead of counting the training data up front,
keep for each hash bucket h the step A[h] an item was last seen and an
exponential moving average B[h] of the number of steps between sightings.
1 / B[h] then estimates how many times per step the item is a target, which
tracks drifting popularity and needs no pass over the data.
"""

import tensorflow as tf


class StreamingFrequencyEstimator(tf.keras.layers.Layer):
  """Per-bucket last step seen (A) and mean steps between sightings (B).

  Item index i maps to bucket i mod `num_buckets`. Catalogue indices are dense
  (1..n), so with `num_buckets` > n every item has its own bucket and there are
  no collisions; fewer buckets trade memory for items sharing (and summing)
  their estimates, as with the paper's hashing.

  Every training call advances a step counter t (from 1) and, for the batch's
  targets, applies the paper's update to each occurrence in turn:
      B[h] <- (1 - alpha) B[h] + alpha (t - A[h]);  A[h] <- t.
  A bucket's k occurrences within one step are processed in closed form: the
  first sees the gap t - A[h], the other k - 1 a gap of 0, so
      B[h] <- (1 - alpha)^k B[h] + alpha (1 - alpha)^(k - 1) (t - A[h]).
  The zero gaps are what make 1 / B the expected *count* per step (not the
  probability of appearing at least once): over a window, the gaps sum to
  the steps elapsed and the updates number the occurrences. The estimate is
  biased up by about alpha (k - 1) / 2 relative for items k times in every
  batch. The paper leaves B's initial value open; starting from 0 would put a
  rare item's first estimate at 1 / (alpha t), far too high, so a bucket's
  first sighting (A = 0: never seen) sets B to t / k, its k occurrences over
  the t steps so far, and the moving average starts from there.

  The variables are non-trainable weights of the layer, so they are saved and
  restored with the model. Under a `tf.distribute` strategy they are mirrored
  with ONLY_FIRST_REPLICA aggregation, like the optimizer's step counter:
  the replicas of one worker share the first replica's update, while each
  worker of a MultiWorkerMirroredStrategy keeps the estimate of its own share
  of the data (the same distribution), and the chief's is checkpointed. B
  then counts per-replica occurrences, matching the per-replica batches whose
  negatives it corrects.
  """

  def __init__(self, num_buckets: int, alpha: float = 0.01, **kwargs):
    super().__init__(**kwargs)
    if num_buckets < 1 or not 0.0 < alpha <= 1.0:
      raise ValueError(f"Need num_buckets >= 1 and 0 < alpha <= 1, got "
                       f"{num_buckets} and {alpha}.")
    self.num_buckets = num_buckets
    self.alpha = alpha
    # Created here, not in build(): the model's first call does not use the
    # layer, yet a backup must find the variables to restore into.
    self.step = self._state("step", [], tf.int64)
    self.last_seen = self._state("last_seen", [num_buckets], tf.int64)
    self.interval = self._state("interval", [num_buckets], tf.float32)

  def _state(self, name, shape, dtype):
    return self.add_weight(
        name=name, shape=shape, dtype=dtype, initializer="zeros",
        trainable=False,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def _buckets(self, items: tf.Tensor) -> tf.Tensor:
    return tf.math.floormod(tf.cast(items, tf.int64), self.num_buckets)

  def update(self, targets: tf.Tensor) -> None:
    """Advances the step and records one step's [batch] target indices."""
    step = self.step.assign_add(1)
    buckets, _, count = tf.unique_with_counts(self._buckets(targets))
    last = tf.gather(self.last_seen, buckets)
    gap = tf.cast(step - last, tf.float32)
    count = tf.cast(count, tf.float32)
    decay = (1.0 - self.alpha) ** (count - 1.0)
    new_interval = tf.where(
        last > 0,
        decay * ((1.0 - self.alpha) * tf.gather(self.interval, buckets) +
                 self.alpha * gap),
        gap / count)
    self.interval.scatter_update(tf.IndexedSlices(new_interval, buckets))
    self.last_seen.scatter_update(
        tf.IndexedSlices(tf.fill(tf.shape(buckets), step), buckets))

  def expected_count(self, items: tf.Tensor) -> tf.Tensor:
    """Estimated occurrences per step of each item; 0 if never seen."""
    buckets = self._buckets(items)
    seen = tf.gather(self.last_seen, buckets) > 0
    interval = tf.gather(self.interval, buckets)
    return tf.where(seen, 1.0 / tf.where(seen, interval, 1.0), 0.0)

  def call(self, targets: tf.Tensor, candidates=None,
           training=False) -> tf.Tensor:
    """Records `targets` when training; expected counts of `candidates`.

    Args:
      targets: [batch] item indices of one step's targets.
      candidates: item indices to estimate (default: the targets).
      training: whether this is a training step (which advances the step).
    """
    if training:
      self.update(targets)
    return self.expected_count(targets if candidates is None else candidates)
