"""tf.data pipeline: sequence-chunk TFRecords -> batches of model examples.

Each record is one chunk of a user's listens (see `tfrs_yambda.schema`). The
pipeline reads shards in parallel, parses records in vectorised batches, and
expands every record into one example per target listen: the seed is the
listen just before it, the history the `history_length` positives before it.
The expansion is a handful of vector ops per record (searchsorted + gather),
so histories are materialised only in memory, one batch at a time.
"""

import dataclasses
from typing import Dict, Optional

import tensorflow as tf

from data_prep import rules
from tfrs_yambda import schema

_SECONDS_PER_DAY = 86_400.0


@dataclasses.dataclass(frozen=True)
class ExampleRule:
  """Which listens are positives and how much each one weighs.

  A positive is a listen played at least `min_played_ratio` percent that the
  user did not dislike (a dislike is never a positive): the prep's rule,
  `data_prep.rules.is_positive`, so examples here are the ones the prep
  counted and wrote context for. Its weight is
  min(played_ratio, max_played_ratio) / 100, so a replay counts more than one
  play, up to a cap, times `like_weight` when the user liked the track. With
  `use_weights=False` every positive weighs 1.
  """
  min_played_ratio: int = 50
  max_played_ratio: int = 200
  like_weight: float = 2.0
  use_weights: bool = True

  def positive(self, played_ratio: tf.Tensor, feedback: tf.Tensor) -> tf.Tensor:
    """Whether each listen is a positive (tensors or numpy arrays)."""
    return rules.is_positive(played_ratio, feedback, self.min_played_ratio)

  def weight(self, played_ratio: tf.Tensor, feedback: tf.Tensor) -> tf.Tensor:
    if not self.use_weights:
      return tf.ones(tf.shape(played_ratio), tf.float32)
    ratio = tf.cast(tf.minimum(played_ratio, self.max_played_ratio), tf.float32)
    like = tf.where(feedback == schema.FEEDBACK_LIKED, self.like_weight, 1.0)
    return ratio / 100.0 * like


def expand_record(record: Dict[str, tf.Tensor], history_length: int,
                  rule: ExampleRule,
                  age_reference: Optional[int]) -> Dict[str, tf.Tensor]:
  """One parsed record -> a batch of examples, one per target listen.

  Args:
    record: parsed `schema.RECORD_FEATURES` of one record (dense 1-D sequences).
    history_length: N, the number of history positives per example.
    rule: the positive / weight rule.
    age_reference: the training window's end in seconds; example age is
      reference - event time. None gives age 0, as at serving time.

  Returns:
    A dict of `schema.example_spec(history_length)` tensors with a leading
    dimension of the number of targets in the record.
  """
  items = record[schema.ITEMS]
  timestamps = record[schema.TIMESTAMPS]
  ratios = record[schema.PLAYED_RATIOS]
  feedback = record[schema.FEEDBACK]
  positions = tf.range(tf.size(items, out_type=tf.int64), dtype=tf.int64)

  positive = rule.positive(ratios, feedback)
  # Targets need a seed, the listen before them.
  first_target = tf.maximum(record[schema.NUM_CONTEXT], 1)
  targets = tf.boolean_mask(positions, positive & (positions >= first_target))
  positive_positions = tf.boolean_mask(positions, positive)

  # Positives strictly before each target; the history is the last N of them.
  before = tf.searchsorted(positive_positions, targets, side="left",
                           out_type=tf.int64)
  offsets = tf.range(-history_length, 0, dtype=tf.int64)
  history_slots = before[:, tf.newaxis] + offsets[tf.newaxis, :]
  history_positions = tf.gather(positive_positions,
                                tf.maximum(history_slots, 0))
  history = tf.where(history_slots >= 0, tf.gather(items, history_positions),
                     tf.zeros_like(history_positions))

  target_time = tf.gather(timestamps, targets)
  if age_reference is None:
    age = tf.zeros(tf.shape(targets), tf.float32)
  else:
    age = tf.maximum(
        tf.cast(age_reference - target_time, tf.float32) / _SECONDS_PER_DAY,
        0.0)
  target_ratio = tf.gather(ratios, targets)
  target_feedback = tf.gather(feedback, targets)
  return {
      schema.USER_ID: tf.fill(tf.shape(targets), record[schema.UID]),
      schema.SEED_ITEM: tf.gather(items, targets - 1),
      schema.HISTORY_ITEMS: history,
      schema.EXAMPLE_AGE: age,
      schema.TARGET_ITEM: tf.gather(items, targets),
      schema.WEIGHT: rule.weight(target_ratio, target_feedback),
      schema.TIMESTAMP: target_time,
  }


def examples(file_pattern: str, history_length: int, rule: ExampleRule,
             age_reference: Optional[int] = None, training: bool = False,
             seed: Optional[int] = None) -> tf.data.Dataset:
  """Unbatched examples from TFRecord shards matching `file_pattern`.

  With training=True, shards are read in a shuffled, non-deterministic
  interleave (throughput over order); otherwise in a fixed order, so that
  evaluation sees the same examples in the same order every time.
  """
  files = tf.data.Dataset.list_files(file_pattern, shuffle=training, seed=seed)
  records = files.interleave(
      tf.data.TFRecordDataset,
      cycle_length=tf.data.AUTOTUNE,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=not training)
  parsed = records.batch(64).map(
      lambda batch: tf.io.parse_example(batch, schema.RECORD_FEATURES),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=not training).unbatch()
  expanded = parsed.map(
      lambda record: expand_record(record, history_length, rule,
                                   age_reference),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=not training)
  return expanded.unbatch()


def batches(file_pattern: str, batch_size: int, history_length: int,
            rule: ExampleRule, age_reference: Optional[int] = None,
            training: bool = False, shuffle_buffer: int = 100_000,
            seed: Optional[int] = None) -> tf.data.Dataset:
  """Batched, prefetched examples; shuffled and repeated when training.

  A record holds up to a few hundred consecutive examples of one user, so the
  shuffle buffer must be much larger than a record for batches to mix users.
  """
  dataset = examples(file_pattern, history_length, rule, age_reference,
                     training, seed)
  if training:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed,
                              reshuffle_each_iteration=True).repeat()
  dataset = dataset.batch(batch_size, drop_remainder=training,
                          num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=not training)
  return dataset.prefetch(tf.data.AUTOTUNE)
