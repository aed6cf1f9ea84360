"""The one definition of the project's records and features.

Data prep writes records with `RECORD_FEATURES`; the input pipeline parses them
with the same spec and expands each into the model's examples, whose names,
dtypes and shapes are `example_spec()`. The towers, the export and the tests
read the names from here.

Record layout. A record is one chunk of one user's listening sequence, in time
order: `uid` and, per listen, the item's catalogue index, timestamp, played
ratio, explicit feedback and organic flag. The first `num_context` listens only
provide the seed and history of the chunk's targets; every later listen that is
a positive is one example. History is therefore stored once per event (plus a
bounded context per chunk), never copied into each example.

Index conventions (catalogue indices, see `tfrs_yambda.catalogue`):
  * item index 0 is "unknown item" and also history padding: both are ignored
    by history pooling and by retrieval;
  * artist and album index 0 means "none";
  * users are raw Yambda uids; the model maps them to its own vocabulary.
"""

import tensorflow as tf

# Explicit feedback attached to a listen by data prep (the last like, dislike,
# unlike or undislike the user gave that track after the listen).
FEEDBACK_NONE = 0
FEEDBACK_LIKED = 1
FEEDBACK_DISLIKED = 2

# --- Record (TFRecord) features -------------------------------------------
UID = "uid"
NUM_CONTEXT = "num_context"
ITEMS = "items"
TIMESTAMPS = "timestamps"
PLAYED_RATIOS = "played_ratios"
FEEDBACK = "feedback"
IS_ORGANIC = "is_organic"

RECORD_SEQUENCE_FEATURES = (ITEMS, TIMESTAMPS, PLAYED_RATIOS, FEEDBACK,
                            IS_ORGANIC)

RECORD_FEATURES = {
    UID: tf.io.FixedLenFeature([], tf.int64),
    NUM_CONTEXT: tf.io.FixedLenFeature([], tf.int64),
    **{name: tf.io.RaggedFeature(tf.int64)
       for name in RECORD_SEQUENCE_FEATURES},
}

# --- Model example features -----------------------------------------------
# Query side.
USER_ID = "user_id"                # raw uid, int64 []
SEED_ITEM = "seed_item"            # item index, int64 []
# Item indices, int64 [N], oldest first, 0-padded in front.
HISTORY_ITEMS = "history_items"
# Training only: train end - event time, float32 []; scores through the items'
# popularity trends (towers.age_features), which are 0 at age 0, i.e. serving.
EXAMPLE_AGE = "example_age_days"
# Candidate side / label.
TARGET_ITEM = "target_item"        # item index, int64 []
WEIGHT = "weight"                  # float32 [], the example's loss weight
# Kept for evaluation joins (not model inputs).
TIMESTAMP = "timestamp"            # int64 [], target event time in seconds

QUERY_FEATURES = (USER_ID, SEED_ITEM, HISTORY_ITEMS)


def example_spec(history_length: int):
  """Name -> tf.TensorSpec of one (unbatched) training/evaluation example."""
  return {
      USER_ID: tf.TensorSpec([], tf.int64),
      SEED_ITEM: tf.TensorSpec([], tf.int64),
      HISTORY_ITEMS: tf.TensorSpec([history_length], tf.int64),
      EXAMPLE_AGE: tf.TensorSpec([], tf.float32),
      TARGET_ITEM: tf.TensorSpec([], tf.int64),
      WEIGHT: tf.TensorSpec([], tf.float32),
      TIMESTAMP: tf.TensorSpec([], tf.int64),
  }


# --- Serving signature (raw Yambda ids in, raw ids out) --------------------
SERVING_USER_ID = "user_id"
SERVING_SEED_ITEM_ID = "seed_item_id"
# [batch, any], oldest first, -1 pads.
SERVING_HISTORY_ITEM_IDS = "history_item_ids"
SERVING_PADDING_ID = -1


def serving_input_signature():
  return {
      SERVING_USER_ID: tf.TensorSpec([None], tf.int64, name=SERVING_USER_ID),
      SERVING_SEED_ITEM_ID: tf.TensorSpec([None], tf.int64,
                                          name=SERVING_SEED_ITEM_ID),
      SERVING_HISTORY_ITEM_IDS: tf.TensorSpec([None, None], tf.int64,
                                              name=SERVING_HISTORY_ITEM_IDS),
  }
