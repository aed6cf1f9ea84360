"""Trained item embeddings for TensorBoard's embedding projector.

Writes the run folder <logs>/projector/ that `tensorboard --logdir <logs>`
shows in its Projector tab:
  embedding.ckpt-1.*        a checkpoint of one tf.Variable [m, d]: the
                            candidate-tower embeddings of m catalogue items
  metadata.tsv              one row per embedding row, with a header: index,
                            item_id, artist_id, album_id (raw ids, -1 =
                            none), train_count, popularity_percentile,
                            popularity_decile, cold ("yes" = no training
                            positive: embedded from content features only)
  projector_config.pbtxt    ties the tensor to its metadata
  events.out.tfevents.*     a text summary of what was selected (TensorBoard
                            lists a folder as a run only when it holds events)

Which items: a real catalogue has millions, more than the projector can
show. `select_items` keeps the most popular `max_items` items, except that up
to a tenth of the slots go to cold items (the first ones in catalogue order),
so that where content-only embeddings land among the learned ones is
visible. The folder is built under a temporary name and renamed into place.
"""

import os
import shutil

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector as tb_projector

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import metrics

TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
COLD_SHARE = 0.1
_COLUMNS = ("index", "item_id", "artist_id", "album_id", "train_count",
            "popularity_percentile", "popularity_decile", "cold")


def select_items(train_count: np.ndarray, max_items: int,
                 cold_share: float = COLD_SHARE) -> np.ndarray:
  """Catalogue indices to show: the most popular, plus some cold ones.

  Args:
    train_count: int [num_items + 1], training positives per index (indices
      are in decreasing count order, so the popular ones come first).
    max_items: at most this many indices are returned.
    cold_share: the share of `max_items` reserved for items with no
      training positive (when there are that many; unused slots go to
      popular items, and the other way round).

  Returns:
    Sorted int64 indices (never 0, the unknown item).
  """
  indices = np.arange(1, len(train_count), dtype=np.int64)
  cold = indices[train_count[1:] == 0]
  warm = indices[train_count[1:] > 0]
  num_cold = min(len(cold), int(max_items * cold_share))
  num_warm = min(len(warm), max_items - num_cold)
  num_cold = min(len(cold), max_items - num_warm)
  return np.sort(np.concatenate([warm[:num_warm], cold[:num_cold]]))


def metadata_rows(catalogue: catalogue_lib.Catalogue,
                  indices: np.ndarray) -> list:
  """The metadata.tsv lines (header first) of the given catalogue indices."""
  popularity = metrics.popularity_percentile(catalogue.item_train_count)
  lines = ["\t".join(_COLUMNS)]
  for i in indices.tolist():
    count = int(catalogue.item_train_count[i])
    lines.append("\t".join(str(v) for v in (
        i, catalogue.item_ids[i],
        catalogue.artist_ids[catalogue.item_artist[i]],
        catalogue.album_ids[catalogue.item_album[i]], count,
        f"{popularity[i]:.4f}", min(int(popularity[i] * 10), 9),
        "yes" if count == 0 else "no")))
  return lines


def write(model, catalogue: catalogue_lib.Catalogue, logs_dir: str,
          max_items: int = 20_000, batch_size: int = 8192) -> str:
  """Writes <logs_dir>/projector/ for the model's candidate tower.

  Returns:
    The projector folder.
  """
  indices = select_items(catalogue.item_train_count, max_items)
  embeddings = tf.concat(
      [model.candidate_tower(tf.constant(indices[s:s + batch_size]))
       for s in range(0, len(indices), batch_size)], axis=0)
  final = os.path.join(logs_dir, "projector")
  tmp = final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  # The attribute name `embedding` gives TENSOR_NAME in the checkpoint.
  tf.train.Checkpoint(embedding=tf.Variable(embeddings)).save(
      os.path.join(tmp, "embedding.ckpt"))
  with open(os.path.join(tmp, "metadata.tsv"), "w") as f:
    f.write("\n".join(metadata_rows(catalogue, indices)) + "\n")
  config = tb_projector.ProjectorConfig()
  embedding = config.embeddings.add()
  embedding.tensor_name = TENSOR_NAME
  embedding.metadata_path = "metadata.tsv"  # relative to the config file
  tb_projector.visualize_embeddings(tmp, config)
  num_cold = int(np.sum(catalogue.item_train_count[indices] == 0))
  writer = tf.summary.create_file_writer(tmp)
  with writer.as_default(step=0):
    tf.summary.text("projector/selection", (
        f"{len(indices)} of {catalogue.num_items} catalogue items: the most "
        f"popular, plus up to {COLD_SHARE:.0%} of the slots for items never "
        f"seen in training ({num_cold} shown). Colour by popularity_decile "
        "or cold."))
  writer.close()
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)
  return final
