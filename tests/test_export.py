"""SavedModels: layout, reload equivalence, robust inputs, saved_model_cli."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import export
from export import from_checkpoint
from tfrs_yambda import model as model_lib
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import towers
from tests.conftest import EXPORT_K
from tests.conftest import HISTORY_LENGTH
from tests.conftest import assert_bruteforce_top_k
from tests.conftest import load_serving
from tests.conftest import SMALL_TOWERS
from tests.conftest import briefly_trained

K = EXPORT_K


def test_layout_is_tf_serving_layout(exported):
  export_dir, paths = exported
  for kind in ("bruteforce", "scann"):
    path = os.path.join(export_dir, f"yambda_{kind}", "1")
    assert paths[kind] == path
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.isdir(os.path.join(path, "variables"))
    with open(os.path.join(path, "assets.extra",
                           "export_metadata.json")) as f:
      assert json.load(f)["index"] == kind
  assert not [d for d in os.listdir(os.path.join(export_dir, "yambda_scann"))
              if d.startswith(".tmp")]


@pytest.mark.e2e  # two exports
def test_a_new_export_gets_a_new_version(trained_model, catalogue, tmp_path):
  first = export.export_all(trained_model, catalogue, str(tmp_path), k=5)
  second = export.export_all(trained_model, catalogue, str(tmp_path), k=5)
  assert first["bruteforce"].endswith("/1")
  assert second["bruteforce"].endswith("/2")
  assert os.path.exists(os.path.join(first["bruteforce"], "saved_model.pb"))


@pytest.fixture(scope="module")
def attention_exported(prepared, catalogue, tmp_path_factory):
  """(model, {kind: SavedModel path}) of a briefly trained small model with
  the attention history encoder, top EXPORT_K."""
  model = briefly_trained(prepared, catalogue, steps=30,
                          history_encoder="attention", history_dim=16)
  return model, export.export_all(
      model, catalogue, str(tmp_path_factory.mktemp("attention")), k=K)


def test_bruteforce_savedmodel_gives_the_in_memory_top_k(
    exported, trained_model, catalogue, requests_and_features):
  assert_bruteforce_top_k(exported[1]["bruteforce"], trained_model,
                           catalogue, requests_and_features)


@pytest.mark.e2e  # trains and exports a second model
def test_attention_encoder_exports_in_the_same_savedmodels(
    attention_exported, catalogue, requests_and_features):
  model, paths = attention_exported
  assert_bruteforce_top_k(paths["bruteforce"], model, catalogue,
                           requests_and_features)
  _assert_cli_runs(paths["bruteforce"])
  scann = load_serving(paths["scann"])(**requests_and_features[0])
  assert scann["item_ids"].shape == (16, K)


@pytest.mark.e2e  # exports a second model
def test_query_heads_export_the_max_sim_top_k_in_the_same_signature(
    exported, catalogue, requests_and_features, tmp_path):
  """K query heads: K lookups merged into the exact max-sim top k, served
  in the one-head SavedModels' signature."""
  tf.keras.utils.set_random_seed(2)
  model = model_lib.TwoTowerModel(
      catalogue, towers.TowerConfig(**SMALL_TOWERS, query_heads=3))
  # Every leaf searched and every candidate rescored: ScaNN is exact here.
  exhaustive = {"num_leaves": 10, "num_leaves_to_search": 10,
                "num_reordering_candidates": catalogue.num_items}
  paths = export.export_all(model, catalogue, str(tmp_path), k=K,
                            scann_options=exhaustive)
  assert_bruteforce_top_k(paths["bruteforce"], model, catalogue,
                           requests_and_features)
  request = requests_and_features[0]
  exact = load_serving(paths["bruteforce"])(**request)
  scann = load_serving(paths["scann"])(**request)
  np.testing.assert_array_equal(scann["item_ids"], exact["item_ids"])
  np.testing.assert_allclose(scann["scores"], exact["scores"], atol=1e-5)
  for kind, path in paths.items():
    heads, one_head = load_serving(path), load_serving(exported[1][kind])
    assert (heads.structured_input_signature ==
            one_head.structured_input_signature)
    outputs = heads.structured_outputs
    assert {k: v.dtype for k, v in outputs.items()} == {
        k: v.dtype for k, v in one_head.structured_outputs.items()}
    # [batch, k]; TFRS's ScaNN layer leaves its own outputs' shape unknown.
    assert all(v.shape.as_list() == [None, K] for v in outputs.values())
    if kind == "bruteforce":
      assert outputs == one_head.structured_outputs
    with open(os.path.join(path, "assets.extra",
                           "export_metadata.json")) as f:
      assert json.load(f)["query_heads"] == 3


def test_a_float16_content_table_exports_in_the_same_signature(
    exported, catalogue, requests_and_features, tmp_path):
  tf.keras.utils.set_random_seed(3)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, content_dtype="float16"))
  path = export.export_all(model, catalogue, str(tmp_path),
                           k=K)["bruteforce"]
  assert_bruteforce_top_k(path, model, catalogue, requests_and_features)
  assert (load_serving(path).structured_input_signature ==
          load_serving(exported[1]["bruteforce"]).structured_input_signature)
  # The SavedModel holds the table as float16 too.
  reader = tf.train.load_checkpoint(os.path.join(path, "variables",
                                                 "variables"))
  half = [name for name, dtype in reader.get_variable_to_dtype_map().items()
          if dtype == tf.float16]
  assert [reader.get_variable_to_shape_map()[name] for name in half] == [
      model.item_encoder.content.shape.as_list()]


def test_candidate_history_exports_in_the_same_signature(
    exported, catalogue, requests_and_features, tmp_path):
  """The query's added candidate embeddings are in the SavedModel."""
  tf.keras.utils.set_random_seed(5)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, candidate_history=True))
  slot_weights = model.query_tower.candidate_history.slot_weights
  slot_weights.assign(np.linspace(-1.0, 2.0, slot_weights.shape[0]))
  path = export.export_all(model, catalogue, str(tmp_path),
                           k=K)["bruteforce"]
  assert_bruteforce_top_k(path, model, catalogue, requests_and_features)
  assert (load_serving(path).structured_input_signature ==
          load_serving(exported[1]["bruteforce"]).structured_input_signature)


@pytest.mark.parametrize("heads", [1, 2])
def test_history_bonus_exports_in_the_same_signature(
    exported, catalogue, requests_and_features, tmp_path, heads):
  """The history prior is mixed into the scores inside the SavedModel, with
  one query vector and with the max over two."""
  tf.keras.utils.set_random_seed(7)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, history_bonus=True, query_heads=heads))
  weights = model.query_tower.history_bonus.slot_weight
  # From none (0) to enough to lift history items into the top k.
  weights.assign(np.linspace(0.0, 1.5, weights.shape[0]))
  paths = export.export_all(model, catalogue, str(tmp_path), k=K)
  assert_bruteforce_top_k(paths["bruteforce"], model, catalogue,
                           requests_and_features)
  for path in paths.values():
    assert (load_serving(path).structured_input_signature ==
            load_serving(exported[1]["bruteforce"]).structured_input_signature)
  request, features = requests_and_features
  served = load_serving(paths["bruteforce"])(**request)["item_ids"].numpy()
  history = catalogue.item_ids[features[schema.HISTORY_ITEMS]]
  assert np.mean([np.isin(h[h > 0], top).mean()
                  for h, top in zip(history, served)]) > 0.5
  scann = load_serving(paths["scann"])(**request)["item_ids"].numpy()
  assert np.mean([len(np.intersect1d(a, b)) / K
                  for a, b in zip(served, scann)]) > 0.8


def test_scann_savedmodel_gives_the_in_memory_index_top_k(
    exported, trained_model, catalogue, requests_and_features, tmp_path):
  request, _ = requests_and_features
  with open(os.path.join(exported[1]["scann"], "assets.extra",
                         "export_metadata.json")) as f:
    options = json.load(f)["scann_options"]
  candidates = ranking.candidate_embeddings(
      trained_model, catalogue.num_items + 1).numpy()[1:]
  query_model = export.ServingQueryModel(trained_model.query_tower, catalogue)
  # ScaNN's tree training samples at random: compare a saved index with itself.
  index = export.build_index("scann", query_model, candidates,
                             catalogue.item_ids[1:], K, options)
  path = export.save(export.Servable(index, K), str(tmp_path), "scann", {})
  scores, ids = index(request, k=K)
  outputs = load_serving(path)(**request)
  np.testing.assert_array_equal(outputs["item_ids"].numpy(), ids.numpy())
  np.testing.assert_allclose(outputs["scores"].numpy(), scores.numpy(),
                             atol=1e-5)
  # And it is a good approximation of exact search.
  exact = load_serving(exported[1]["bruteforce"])(**request)["item_ids"].numpy()
  overlap = np.mean([len(np.intersect1d(a, b)) / K
                     for a, b in zip(exact, ids.numpy())])
  assert overlap > 0.8


def test_serving_inputs_are_robust(exported, catalogue):
  serve = load_serving(exported[1]["bruteforce"])
  known = catalogue.item_ids[1:1 + 3 * HISTORY_LENGTH]
  unknown_id = int(catalogue.item_ids.max()) + 12345
  # Unknown user and seed, empty history: still a full top-k.
  out = serve(user_id=tf.constant([-5, 10**12], tf.int64),
              seed_item_id=tf.constant([unknown_id, known[0]], tf.int64),
              history_item_ids=tf.zeros([2, 0], tf.int64))
  assert out["item_ids"].shape == (2, K)
  assert np.all(np.isin(out["item_ids"].numpy(), catalogue.item_ids[1:]))

  # A long history is cut to its most recent N; padding anywhere is ignored.
  user = tf.constant([int(catalogue.user_ids[1])], tf.int64)
  seed = tf.constant([int(known[1])], tf.int64)
  long_history = np.r_[known, -1, -1][None, :]
  recent = np.r_[-1, known[-HISTORY_LENGTH:]][None, :]
  a = serve(user_id=user, seed_item_id=seed,
            history_item_ids=tf.constant(long_history, tf.int64))
  b = serve(user_id=user, seed_item_id=seed,
            history_item_ids=tf.constant(recent, tf.int64))
  np.testing.assert_array_equal(a["item_ids"].numpy(), b["item_ids"].numpy())


def test_saved_model_cli_shows_and_runs_the_signature(exported):
  cli = _cli()
  for kind in ("bruteforce", "scann"):
    shown = subprocess.run([cli, "show", "--dir", exported[1][kind], "--all"],
                           capture_output=True, text=True, check=True).stdout
    assert "signature_def['serving_default']" in shown
    for name in ("user_id", "seed_item_id", "history_item_ids", "item_ids",
                 "scores"):
      assert name in shown
  _assert_cli_runs(exported[1]["bruteforce"])


def _cli():
  return shutil.which("saved_model_cli") or os.path.join(
      os.path.dirname(sys.executable), "saved_model_cli")


def _assert_cli_runs(path):
  """saved_model_cli runs the serving signature on a one-row request."""
  ran = subprocess.run(
      [_cli(), "run", "--dir", path, "--tag_set", "serve",
       "--signature_def", "serving_default", "--input_exprs",
       "user_id=[1];seed_item_id=[2];"
       "history_item_ids=[[3,-1]]"],
      capture_output=True, text=True, check=True).stdout
  assert "item_ids" in ran and "scores" in ran


def test_serving_history_is_laid_out_as_in_training(catalogue):
  """Oldest first, the latest N kept, index 0 padding in front."""
  seen = {}

  class Capture(tf.keras.Model):

    def call(self, features):
      seen.update(features)
      return tf.zeros([tf.shape(features[schema.USER_ID])[0], 2])

  # A model of N = 4: the catalogue of data prepared with --history_length=4.
  four = dataclasses.replace(catalogue, metadata={
      **catalogue.metadata,
      "prep_config": {**catalogue.metadata["prep_config"],
                      "history_length": 4}})
  query_model = export.ServingQueryModel(Capture(), four)
  ids = catalogue.item_ids
  unknown = int(ids.max()) + 1
  query_model({
      schema.SERVING_USER_ID: tf.constant([1, 1, 1], tf.int64),
      schema.SERVING_SEED_ITEM_ID: tf.constant([ids[1]] * 3, tf.int64),
      schema.SERVING_HISTORY_ITEM_IDS: tf.constant(
          [[-1, -1, -1, -1, ids[3], ids[5]],
           [ids[1], ids[2], ids[3], ids[4], ids[5], ids[6]],
           [-1, -1, -1, ids[2], unknown, ids[7]]], tf.int64),
  })
  # The unknown id is dropped before the cut, as padding is: no slot for it.
  np.testing.assert_array_equal(seen[schema.HISTORY_ITEMS].numpy(),
                                [[0, 0, 3, 5], [3, 4, 5, 6], [0, 0, 2, 7]])


def test_unknown_history_ids_take_no_slot(exported, catalogue):
  """N known ids with M unknown ones among them serve as the N alone."""
  serve = load_serving(exported[1]["bruteforce"])
  known = catalogue.item_ids[1:1 + 2 * HISTORY_LENGTH]
  unknown = int(catalogue.item_ids.max()) + 1 + np.arange(HISTORY_LENGTH)
  recent = known[-HISTORY_LENGTH:]
  # Unknown ids interleaved with the most recent N known, and after them.
  mixed = np.r_[known[:-HISTORY_LENGTH],
                np.ravel(np.c_[recent, unknown]), unknown[:3]]
  user = tf.constant([int(catalogue.user_ids[1])] * 2, tf.int64)
  seed = tf.constant([int(known[0])] * 2, tf.int64)
  out = serve(user_id=user, seed_item_id=seed, history_item_ids=tf.constant(
      np.stack([mixed, np.r_[[-1] * (len(mixed) - HISTORY_LENGTH), recent]]),
      tf.int64))
  np.testing.assert_array_equal(out["item_ids"][0], out["item_ids"][1])
  np.testing.assert_allclose(out["scores"][0], out["scores"][1], atol=1e-6)


def test_export_writes_what_clients_need(exported, catalogue):
  """The ids the model knows and the positive rule, for raw-event clients."""
  path = exported[1]["scann"]
  np.testing.assert_array_equal(
      np.load(os.path.join(path, "assets.extra", "known_item_ids.npy")),
      np.sort(catalogue.item_ids[1:]))
  with open(os.path.join(path, "assets.extra",
                         "export_metadata.json")) as f:
    assert json.load(f)["min_played_ratio"] == catalogue.metadata[
        "min_played_ratio"]


def test_a_restored_checkpoint_exports_the_trained_model(
    trained_model, catalogue, tmp_path):
  # What export.from_checkpoint exports in a process of its own.
  path = tf.train.Checkpoint(model=trained_model).write(
      str(tmp_path / "ckpt"))
  config = towers.TowerConfig(**SMALL_TOWERS)
  restored = from_checkpoint.restore(path, catalogue, config,
                                     model_lib.RetrievalConfig())
  np.testing.assert_array_equal(
      ranking.candidate_embeddings(restored, catalogue.num_items + 1),
      ranking.candidate_embeddings(trained_model, catalogue.num_items + 1))
  # Towers the checkpoint does not hold are an error, not a fresh model.
  with pytest.raises((AssertionError, ValueError)):
    from_checkpoint.restore(path, catalogue, dataclasses.replace(
        config, query_heads=2), model_lib.RetrievalConfig())
