"""The two-tower model: the loss goes down, logQ and accidental hits work."""

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import model as model_lib
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import towers
from tests.conftest import SMALL_TOWERS
from tests.conftest import assert_steps_lower_the_loss
from tests.conftest import same_target_batch
from tests.conftest import small_model
from tests.conftest import train_batch


def test_training_steps_lower_the_loss_on_a_batch(prepared, catalogue):
  batch = train_batch(prepared, catalogue)
  assert_steps_lower_the_loss(small_model(catalogue), batch)


def test_logq_correction_uses_the_catalogue_probabilities(prepared, catalogue):
  batch = train_batch(prepared, catalogue)
  with_logq = small_model(catalogue, logq_correction=True)
  without = small_model(catalogue, logq_correction=False)
  # Same initial weights (same seed), so only the correction differs.
  assert float(with_logq.compute_loss(batch)) != float(
      without.compute_loss(batch))
  np.testing.assert_allclose(with_logq.sampling_probability.numpy(),
                             catalogue.sampling_probability())


def test_accidental_hits_are_not_negatives(catalogue):
  # Every query's target is the same track: with accidental-hit removal the
  # only candidate left per row is the positive, so the loss is ~0.
  model = small_model(catalogue)
  batch = same_target_batch(catalogue, n=8, target=3)
  assert float(model.compute_loss(batch)) < 1e-4


def test_example_age_scores_through_item_trends_and_vanishes_at_age_0(
    prepared, catalogue):
  batch = train_batch(prepared, catalogue, size=64)
  model = small_model(catalogue)
  encoder = model.item_encoder
  item_trend, album_trend = encoder.trend_tables
  at_age_0 = {**batch, schema.EXAMPLE_AGE: tf.zeros_like(
      batch[schema.EXAMPLE_AGE])}
  loss_without_trends = float(model.compute_loss(at_age_0))
  rng = np.random.default_rng(0)
  item_trend.assign(rng.normal(size=item_trend.shape))
  album_trend.assign(rng.normal(size=album_trend.shape))
  # At age 0 (serving's "now") the trends add nothing to any score ...
  np.testing.assert_allclose(float(model.compute_loss(at_age_0)),
                             loss_without_trends, rtol=1e-5)
  # ... at the examples' own ages they do.
  assert abs(float(model.compute_loss(batch)) - loss_without_trends) > 1e-3
  # An item's trend is its id row's (row 0 for cold ids) plus its album's.
  cold = np.flatnonzero(np.arange(catalogue.num_items + 1) >=
                        encoder.id_vocabulary_size)[:2]
  items = np.r_[1, 2, cold]
  rows = np.where(items < encoder.id_vocabulary_size, items, 0)
  np.testing.assert_allclose(
      encoder.trend(tf.constant(items, tf.int64)).numpy(),
      item_trend.numpy()[rows] +
      album_trend.numpy()[catalogue.item_album[items]], rtol=1e-6)
  np.testing.assert_allclose(
      towers.age_features(tf.constant([0.0, 3.0]), 30.0).numpy(),
      [[0.0, 0.0], [0.1, np.log1p(3.0)]], rtol=1e-6)


def test_unknown_and_uncommon_ids_share_the_unknown_row(catalogue):
  config = towers.TowerConfig(**{**SMALL_TOWERS, "min_item_count": 5})
  encoder = towers.ItemEncoder(catalogue, config)
  vocab = encoder.id_vocabulary_size
  assert vocab == 1 + int(np.sum(catalogue.item_train_count[1:] >= 5))
  rare = np.flatnonzero(catalogue.item_train_count < 5)
  rare = rare[rare > 0][:3]
  features = encoder(tf.constant(np.r_[0, rare], tf.int64)).numpy()
  width = config.item_id_dim
  # Same id embedding (row 0) ...
  np.testing.assert_allclose(features[1:, :width],
                             np.repeat(features[:1, :width], len(rare), 0))
  # ... but their own content features.
  assert not np.allclose(features[1, width:], features[0, width:])


def test_pooled_history_is_the_mean_of_item_features(catalogue):
  encoder = towers.ItemEncoder(catalogue, towers.TowerConfig(**SMALL_TOWERS))
  history = tf.constant([[0, 0, 4, 9], [0, 0, 0, 0], [2, 2, 2, 7]], tf.int64)
  pooled, recent = (p.numpy() for p in encoder.pooled(history, recent=2))
  features = encoder(tf.constant([4, 9, 2, 7], tf.int64)).numpy()
  np.testing.assert_allclose(pooled[0], features[:2].mean(0), atol=1e-6)
  np.testing.assert_allclose(pooled[1], 0.0)
  np.testing.assert_allclose(pooled[2], (3 * features[2] + features[3]) / 4,
                             atol=1e-6)
  # The last two slots alone: histories are oldest first.
  np.testing.assert_allclose(recent[0], features[:2].mean(0), atol=1e-6)
  np.testing.assert_allclose(recent[1], 0.0)
  np.testing.assert_allclose(recent[2], (features[2] + features[3]) / 2,
                             atol=1e-6)


def test_trained_model_beats_most_popular(trained_model, prepared, catalogue):
  results = evaluate.evaluate(trained_model, catalogue, prepared,
                              input_pipeline.ExampleRule(),
                              ks=metrics.DEFAULT_KS)
  assert set(results) >= {"model", "most_popular", "recent_popular",
                          "seed_cooccurrence", "oracle"}
  assert results["model"]["recall@100"] > results["most_popular"]["recall@100"]
  assert results["oracle"]["recall@100"] >= results["model"]["recall@100"]
  assert results["oracle"]["coverage_of_test_examples"] == 1.0


@pytest.mark.parametrize("switch", ["use_user_id", "use_seed", "use_history",
                                    "use_audio", "use_artist_album",
                                    "use_example_age"])
def test_each_design_element_can_be_switched_off(prepared, catalogue, switch):
  batch = train_batch(prepared, catalogue, size=64)
  full = towers.ItemEncoder(catalogue, towers.TowerConfig(**SMALL_TOWERS))
  config = towers.TowerConfig(**{**SMALL_TOWERS, switch: False})
  model = model_lib.TwoTowerModel(catalogue, config)
  assert np.isfinite(float(model.compute_loss(batch)))
  encoder = model.query_tower.item_encoder
  width = int(encoder(tf.constant([1], tf.int64)).shape[-1])
  full_width = int(full(tf.constant([1], tf.int64)).shape[-1])
  if switch == "use_audio":
    assert width == full_width - catalogue.audio_dim - 1
  elif switch == "use_artist_album":
    assert width == full_width - SMALL_TOWERS["artist_dim"] - SMALL_TOWERS[
        "album_dim"]
  else:
    assert width == full_width


def test_memory_estimate_adds_up(catalogue):
  config = towers.TowerConfig(**SMALL_TOWERS)
  adam = model_lib.memory_estimate(catalogue, config, optimizer_slots=2)
  assert adam["optimizer_slots"] == 2 * adam["embeddings"]
  assert adam["frequency_estimate"] == 0
  streaming = model_lib.memory_estimate(catalogue, config, optimizer_slots=1,
                                        frequency_buckets=1000)
  assert streaming["frequency_estimate"] == 12 * 1000
  assert streaming["total"] == (2 * streaming["embeddings"] +
                                streaming["catalogue_tables"] + 12 * 1000)
  # The embeddings term is the model's own trainable tables, in bytes.
  query_tower = model_lib.TwoTowerModel(catalogue, config).query_tower
  query_tower.user_embedding(tf.constant([0], tf.int64))  # builds the table
  tables = (query_tower.item_encoder.tables +
            query_tower.item_encoder.trend_tables +
            [query_tower.user_embedding.embeddings])
  assert sum(4 * int(np.prod(t.shape)) for t in tables) == adam["embeddings"]


def test_checkpoints_leave_out_the_content_table_and_restore_the_model(
    prepared, catalogue, tmp_path):
  # The content table is rebuilt from the catalogue; at 9.4M items it is
  # 4.9 GB that every backup would rewrite.
  batch = train_batch(prepared, catalogue, size=32)
  trained = small_model(catalogue)
  assert_steps_lower_the_loss(trained, batch)
  path = tf.train.Checkpoint(model=trained).write(str(tmp_path / "ckpt"))
  content = trained.item_encoder.content
  shapes = [tuple(shape) for _, shape in tf.train.list_variables(path)]
  assert tuple(content.shape) not in shapes
  assert any(shape == tuple(trained.item_encoder.tables[0].shape)
             for shape in shapes)
  fresh = small_model(catalogue)
  fresh(batch)
  # Every variable of the fresh model is restored (the trained one's
  # optimizer slots are the only values left over).
  tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
  features = {k: batch[k] for k in schema.QUERY_FEATURES}
  np.testing.assert_allclose(fresh.query_tower(features),
                             trained.query_tower(features), rtol=1e-6)
  np.testing.assert_array_equal(fresh.item_encoder.content.numpy(),
                                content.numpy())


def test_audio_rows_read_a_mapped_table_without_mapping(catalogue, tmp_path):
  path = str(tmp_path / "audio.npy")
  np.save(path, catalogue.audio)
  mapped = dataclasses.replace(catalogue,
                               audio=np.load(path, mmap_mode="r"))
  n = catalogue.num_items + 1
  for lo, hi in [(0, n), (3, 7), (n - 1, n), (5, 5)]:
    np.testing.assert_array_equal(mapped.audio_rows(lo, hi),
                                  catalogue.audio[lo:hi])
    assert catalogue.audio_rows(lo, hi).dtype == np.float32


def test_candidate_embeddings_are_the_towers_rows(catalogue):
  model = small_model(catalogue)
  n = catalogue.num_items + 1
  whole = ranking.candidate_embeddings(model, n).numpy()
  np.testing.assert_array_equal(whole, model.candidate_tower(tf.range(n,
                                dtype=tf.int64)).numpy())
  # Other batch sizes round differently (oneDNN's blocking).
  np.testing.assert_allclose(
      ranking.candidate_embeddings(model, n, batch_size=5, start=3).numpy(),
      whole[3:], rtol=1e-5, atol=1e-6)


def test_candidate_embeddings_do_not_keep_a_dropped_model_alive(catalogue):
  model = small_model(catalogue)
  ranking.candidate_embeddings(model, catalogue.num_items + 1)
  tower = weakref.ref(model.candidate_tower)
  assert tower() in ranking._FILLS  # pylint: disable=protected-access
  del model
  gc.collect()
  # The traced loop went with the tower, and the tower with the model.
  assert tower() is None


def test_a_float16_content_table_holds_the_float32_features_rounded(
    catalogue):
  config = towers.TowerConfig(**SMALL_TOWERS)
  full = model_lib.TwoTowerModel(catalogue, config).item_encoder.content
  half = model_lib.TwoTowerModel(catalogue, dataclasses.replace(
      config, content_dtype="float16")).item_encoder.content
  assert full.dtype == tf.float32 and half.dtype == tf.float16
  np.testing.assert_array_equal(half.numpy(),
                                full.numpy().astype(np.float16))
  # Its features are float32 like every other input of the towers.
  items = tf.constant([0, 1, catalogue.num_items], tf.int64)
  model = model_lib.TwoTowerModel(catalogue, dataclasses.replace(
      config, content_dtype="float16"))
  features = model.item_encoder(items)
  assert features.dtype == tf.float32
  np.testing.assert_allclose(features[:, -half.shape[1]:],
                             full.numpy()[[0, 1, catalogue.num_items]],
                             rtol=1e-3, atol=1e-3)
  estimate = model_lib.memory_estimate(catalogue, dataclasses.replace(
      config, content_dtype="float16"), optimizer_slots=1)
  assert (model_lib.memory_estimate(catalogue, config, optimizer_slots=1)
          ["catalogue_tables"] - estimate["catalogue_tables"] ==
          2 * int(np.prod(full.shape)))
  with pytest.raises(ValueError, match="content_dtype"):
    towers.TowerConfig(content_dtype="int8")
