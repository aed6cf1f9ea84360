"""The items' content table: audio embeddings and length features, per index.

Built from the catalogue, never trained: `towers.ItemEncoder` looks items up
in it and keeps it out of checkpoints (it is rebuilt by each model
construction; a SavedModel holds it).
"""

import numpy as np
import tensorflow as tf

from tfrs_yambda import catalogue as catalogue_lib

# How the table is stored; the features are float32 once looked up either
# way.
CONTENT_DTYPES = ("float32", "float16")


def content_table(catalogue: catalogue_lib.Catalogue, with_audio: bool,
                  dtype: str = "float32",
                  rows_per_copy: int = 1 << 20) -> tf.Variable:
  """The [items, (audio_dim +) 3] table of audio and length features, of
  `dtype`.

  Filled a block of rows at a time into the variable itself, by scatter
  (a sliced assign copies the whole variable each time): at 9.4M items the
  table is 4.6 GB, and building it whole first (a float32 copy of the
  audio, their concatenation, the tensor a variable is initialised from)
  held four copies at once, more than a 24 GB machine has.
  """
  dense = dense_item_features(catalogue, with_audio)
  audio_dim = catalogue.audio_dim if with_audio else 0
  rows = len(dense)
  table = tf.Variable(tf.zeros([rows, audio_dim + dense.shape[1]], dtype),
                      trainable=False, name="item_content")
  for lo in range(0, rows, rows_per_copy):
    hi = min(rows, lo + rows_per_copy)
    block = [catalogue.audio_rows(lo, hi)] if with_audio else []
    table.scatter_update(tf.IndexedSlices(
        np.concatenate(block + [dense[lo:hi]], axis=1).astype(dtype),
        tf.range(lo, hi)))
  return table


def dense_item_features(catalogue: catalogue_lib.Catalogue,
                        with_audio: bool = True) -> np.ndarray:
  """[standardised log length, has length(, has audio)] per item."""
  length = catalogue.item_length.astype(np.float64)
  known = length > 0
  log_length = np.log1p(length)
  mean = log_length[known].mean() if known.any() else 0.0
  std = log_length[known].std() + 1e-6 if known.any() else 1.0
  columns = [np.where(known, (log_length - mean) / std, 0.0), known]
  if with_audio:
    columns.append(catalogue.has_audio)
  return np.stack(columns, axis=-1).astype(np.float32)
