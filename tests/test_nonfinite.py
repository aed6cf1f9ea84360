"""NaN and inf at every gate: prep, training, ranking, export; and the
per-epoch eval scalars that must reach TensorBoard next to keras's callback."""

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from benchmarks import reference_prep
from data_prep import prep
from data_prep import yambda
from data_prep.prep import catalogue as prep_catalogue
from export import export
from tests.conftest import HISTORY_LENGTH
from tests.conftest import small_model
from tfrs_yambda import callbacks
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import metrics
from tfrs_yambda import ranking

_REPORT_KEY = "items_with_nonfinite_embedding_treated_as_missing"


# --- Prep --------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tiny_yambda, tmp_path_factory):
  """(Yambda folder, {kind: (item id, row in embeddings.parquet)}): the tiny
  folder with one listened item's normalized_embed all NaN and, later in the
  file, another's holding one -inf."""
  root = str(tmp_path_factory.mktemp("poisoned"))
  for name in ("artist_item_mapping.parquet", "album_item_mapping.parquet"):
    os.symlink(os.path.join(tiny_yambda, name), os.path.join(root, name))
  events = yambda.multi_event_path(root, "tiny")
  os.makedirs(os.path.dirname(events))
  os.symlink(yambda.multi_event_path(tiny_yambda, "tiny"), events)
  table = pq.read_table(yambda.embeddings_path(tiny_yambda))
  listened = np.unique(pq.read_table(events, columns=["item_id"]).column(
      "item_id").to_numpy())
  ids = table.column("item_id").to_numpy().astype(np.int64)
  rows = np.flatnonzero(np.isin(ids, listened))
  nan_row, inf_row = int(rows[len(rows) // 2]), int(rows[-3])
  embed = table.column("normalized_embed").to_pylist()
  embed[nan_row] = [float("nan")] * len(embed[nan_row])
  embed[inf_row][5] = float("-inf")
  column = table.schema.get_field_index("normalized_embed")
  table = table.set_column(column, "normalized_embed",
                           pa.array(embed, table.schema.field(column).type))
  pq.write_table(table, yambda.embeddings_path(root))
  return root, {"nan": (int(ids[nan_row]), nan_row),
                "inf": (int(ids[inf_row]), inf_row)}


def _config(**kwargs):
  return prep.PrepConfig(history_length=HISTORY_LENGTH, chunk_length=64,
                         num_shards=2, **kwargs)


def _assert_names_file_column_item_and_row(error, root, item_id, row):
  message = str(error)
  assert message.startswith(f"{yambda.embeddings_path(root)}: column "
                            "'normalized_embed' has NaN or inf")
  assert f"item_id {item_id} (row {row} of the file)" in message


def test_prep_rejects_a_nonfinite_embedding_and_leaves_no_output(
    poisoned, tmp_path, monkeypatch):
  root, bad = poisoned
  # Small batches: the bad row is in a later batch, so its row number must
  # count the rows of the batches before.
  monkeypatch.setattr(prep_catalogue, "AUDIO_BATCH_ROWS", 500)
  assert bad["nan"][1] >= 500
  out = str(tmp_path / "out")
  with pytest.raises(yambda.YambdaFormatError) as error:
    prep.prepare(root, "tiny", out, _config())
  # The first bad row in file order is named.
  _assert_names_file_column_item_and_row(error.value, root, *bad["nan"])
  assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


@pytest.fixture(scope="module")
def missing_prepared(poisoned, tmp_path_factory):
  root, _ = poisoned
  out = os.path.join(str(tmp_path_factory.mktemp("missing")), "out")
  report = prep.prepare(root, "tiny", out,
                        _config(nonfinite_embeddings="missing"))
  return out, report


def test_prep_can_treat_nonfinite_embeddings_as_missing(
    poisoned, missing_prepared, prepared):
  _, bad = poisoned
  out, report = missing_prepared
  with open(os.path.join(out, "prep_report.json")) as f:
    assert json.load(f)[_REPORT_KEY] == report[_REPORT_KEY] == 2
  with open(os.path.join(prepared, "prep_report.json")) as f:
    clean = json.load(f)
  assert clean[_REPORT_KEY] == 0
  assert report["items_without_audio_embedding"] == (
      clean["items_without_audio_embedding"] + 2)
  cat = catalogue_lib.load(os.path.join(out, "catalogue"))
  index = cat.item_index(np.array([bad["nan"][0], bad["inf"][0]]))
  assert np.all(index > 0)
  assert not cat.has_audio[index].any()
  assert np.all(cat.audio[index] == 0)
  assert np.isfinite(cat.audio).all()
  assert cat.metadata["prep_config"]["nonfinite_embeddings"] == "missing"


def test_in_memory_prep_does_the_same(poisoned, missing_prepared, tmp_path):
  root, bad = poisoned
  out = str(tmp_path / "error")
  with pytest.raises(yambda.YambdaFormatError) as error:
    reference_prep.prepare(root, "tiny", out, _config())
  _assert_names_file_column_item_and_row(error.value, root, *bad["nan"])
  assert not os.path.exists(out)

  out = str(tmp_path / "missing")
  report = reference_prep.prepare(
      root, "tiny", out, _config(nonfinite_embeddings="missing"))
  streaming_out, streaming_report = missing_prepared
  assert report[_REPORT_KEY] == streaming_report[_REPORT_KEY] == 2
  assert (report["items_without_audio_embedding"] ==
          streaming_report["items_without_audio_embedding"])
  ours = catalogue_lib.load(os.path.join(out, "catalogue"))
  theirs = catalogue_lib.load(os.path.join(streaming_out, "catalogue"))
  # The same audio per raw id (whatever the index order).
  assert sorted(ours.item_ids[1:]) == sorted(theirs.item_ids[1:])
  mine = ours.item_index(theirs.item_ids[1:])
  np.testing.assert_array_equal(ours.has_audio[mine], theirs.has_audio[1:])
  np.testing.assert_array_equal(ours.audio[mine], theirs.audio[1:])


# --- Training -----------------------------------------------------------------


def test_training_fails_at_the_first_nonfinite_loss_naming_step_and_epoch():
  x = np.ones((12, 2), np.float32)
  x[7] = np.nan  # batch 0 of epoch 2 with 3 steps of 2 per epoch: step 4
  data = tf.data.Dataset.from_tensor_slices((x, np.ones((12, 1), np.float32)))
  model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
  model.compile(optimizer=tf.keras.optimizers.SGD(0.01), loss="mse")
  seen = []
  after = tf.keras.callbacks.LambdaCallback(
      on_train_batch_end=lambda batch, logs: seen.append(logs["loss"]))
  with pytest.raises(callbacks.NonFiniteLossError,
                     match=r"global step 4 \(optimizer iterations\), epoch 2"
                     ) as error:
    model.fit(data.batch(2).repeat(), epochs=5, steps_per_epoch=3, verbose=0,
              callbacks=[callbacks.FailOnNonFiniteLoss(), after])
  assert isinstance(error.value, FloatingPointError)
  assert int(model.optimizer.iterations.numpy()) == 4
  assert len(seen) == 3 and np.isfinite(seen).all()  # stopped at once


# --- Ranking ------------------------------------------------------------------


def test_nonfinite_scores_are_misses_and_never_in_top_k_ahead_of_finite():
  queries = tf.constant([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  candidates = tf.constant([
      [5.0, 5.0],            # 0: unknown / padding, never a hit
      [1.0, 1.0],
      [np.nan, 0.0],         # scores NaN for every query
      [np.inf, 0.0],         # +inf, -inf and NaN (inf * 0)
      [0.5, 0.2],
      [2.0, -1.0],
  ])

  def ranks(targets, k=0):
    return ranking.target_ranks(queries, ranking.candidate_table(candidates),
                                tf.constant(targets, tf.int64), k)

  # NaN, +inf, -inf, NaN and index-0 targets: all misses, beyond every k.
  for targets in ([2, 2, 2], [3, 3, 3], [0, 0, 0]):
    np.testing.assert_array_equal(ranks(targets).numpy(),
                                  [metrics.NOT_RETRIEVED] * 3)
  # Finite targets rank among the finite candidates only.
  np.testing.assert_array_equal(ranks([1, 5, 4]).numpy(), [2, 3, 2])
  found, top = ranks([1, 5, 4], k=3)
  np.testing.assert_array_equal(found.numpy(), [2, 3, 2])
  expected_top = [[5, 1, 4], [4, 1, 5], [1, 4, 5]]
  np.testing.assert_array_equal(top.numpy(), expected_top)
  top = ranking.top_k(queries, ranking.candidate_table(candidates),
                      5).numpy()
  np.testing.assert_array_equal(top[:, :3], expected_top)
  assert set(top[:, 3:].ravel()) <= {0, 2, 3}  # after every finite one
  result = metrics.rank_metrics(ranks([2, 3, 0]).numpy(), ks=(1, 1000))
  assert result["recall@1000"] == 0.0 and result["mrr"] == pytest.approx(0)


# --- Export -------------------------------------------------------------------


def test_export_refuses_nonfinite_candidate_embeddings(catalogue, tmp_path,
                                                       monkeypatch):
  embeddings = np.random.default_rng(0).normal(
      size=(catalogue.num_items + 1, 16)).astype(np.float32)
  embeddings[[4, 9], 3] = [np.nan, np.inf]
  monkeypatch.setattr(
      ranking, "candidate_embeddings",
      lambda model, n, start=0: tf.constant(embeddings[start:n]))
  export_dir = str(tmp_path / "export")
  ids = catalogue.item_ids[[4, 9]].tolist()
  with pytest.raises(ValueError, match=(
      rf"2 of {catalogue.num_items} candidate embeddings are not finite .*"
      rf"item ids \[{ids[0]}, {ids[1]}\]")):
    export.export_all(small_model(catalogue), catalogue, export_dir, k=5)
  assert not os.path.exists(export_dir) or not os.listdir(export_dir)


# --- TensorBoard --------------------------------------------------------------


def _scalars(folder):
  """{tag: {step: value}} of every scalar summary in the folder's events."""
  found = {}
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          found.setdefault(value.tag, {})[event.step] = float(
              tf.make_ndarray(value.tensor))
  return found


def test_eval_scalars_of_every_epoch_reach_tensorboard(tmp_path):
  """Wired as trainer.py does, keras's TensorBoard callback first: during fit
  it keeps record_if(step % update_freq == 0) pushed, which dropped the eval
  scalars of every epoch ending off that grid."""
  logs = str(tmp_path / "logs")
  x = np.random.default_rng(0).normal(size=(28, 2)).astype(np.float32)
  data = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(4).repeat()
  model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
  model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mse")
  epochs_done = []

  def evaluate_fn():
    epochs_done.append(int(model.optimizer.iterations.numpy()))
    return {"recall@100": 0.25 * len(epochs_done), "mrr": 0.125}

  fit_callbacks = [
      tf.keras.callbacks.BackupAndRestore(str(tmp_path / "backup"),
                                          save_freq=5),
      callbacks.ProgressLogger(21, 4),
      tf.keras.callbacks.TensorBoard(logs, update_freq=100, profile_batch=0),
      callbacks.ScalarLogger(os.path.join(logs, "metrics"), evaluate_fn,
                             every_steps=5, hparams={"batch_size": 4}),
  ]
  model.fit(data, epochs=3, steps_per_epoch=7, verbose=0,
            callbacks=fit_callbacks)
  assert epochs_done == [7, 14, 21]
  scalars = _scalars(os.path.join(logs, "metrics"))
  assert scalars["eval/recall@100"] == {7: 0.25, 14: 0.5, 21: 0.75}
  assert scalars["eval/mrr"] == {7: 0.125, 14: 0.125, 21: 0.125}
  assert sorted(scalars["learning_rate"]) == [5, 10, 15, 20]
