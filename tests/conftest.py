"""Shared fixtures: one tiny generated dataset, prepared once per session."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from data_prep import generate  # pylint: disable=g-import-not-at-top
from data_prep import prep  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from tfrs_yambda import baselines  # pylint: disable=g-import-not-at-top
from tfrs_yambda import blockwise_ranks  # pylint: disable=g-import-not-at-top
from tfrs_yambda import catalogue as catalogue_lib  # pylint: disable=g-import-not-at-top
from tfrs_yambda import evaluate  # pylint: disable=g-import-not-at-top
from tfrs_yambda import history_bonus  # pylint: disable=g-import-not-at-top
from tfrs_yambda import input_pipeline  # pylint: disable=g-import-not-at-top
from tfrs_yambda import model as model_lib  # pylint: disable=g-import-not-at-top
from tfrs_yambda import priors  # pylint: disable=g-import-not-at-top
from tfrs_yambda import ranking  # pylint: disable=g-import-not-at-top
from tfrs_yambda import schema  # pylint: disable=g-import-not-at-top
from tfrs_yambda import towers  # pylint: disable=g-import-not-at-top

HISTORY_LENGTH = 20
EXPORT_K = 20
# Tests that use these fixtures load SavedModels or start servers: the
# end-to-end tier (setup.cfg's markers), whatever their file.
_E2E_FIXTURES = {"exported", "servers"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
  for item in items:
    if _E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_yambda(tmp_path_factory):
  """A generated Yambda folder of size 'tiny'."""
  root = str(tmp_path_factory.mktemp("yambda"))
  generate.generate(root, "tiny", seed=0)
  return root


@pytest.fixture(scope="session")
def prep_config():
  return prep.PrepConfig(history_length=HISTORY_LENGTH, chunk_length=64,
                         num_shards=2)


@pytest.fixture(scope="session")
def prepared(tiny_yambda, prep_config, tmp_path_factory):
  """The tiny dataset prepared into catalogue + records; returns the folder."""
  out = os.path.join(str(tmp_path_factory.mktemp("prepared")), "tiny")
  prep.prepare(tiny_yambda, "tiny", out, prep_config)
  return out


@pytest.fixture(scope="session")
def catalogue(prepared):
  return catalogue_lib.load(os.path.join(prepared, "catalogue"))


SMALL_TOWERS = dict(item_id_dim=16, artist_dim=8, album_dim=8, user_dim=8,
                    hidden_dim=32, output_dim=16)


def briefly_trained(prepared, catalogue, steps=60, **tower_options):
  """A seeded small model (SMALL_TOWERS + tower_options) after `steps` steps
  of batch 256 on the tiny dataset's training records."""
  tf.keras.utils.set_random_seed(0)
  model = model_lib.TwoTowerModel(
      catalogue, towers.TowerConfig(**{**SMALL_TOWERS, **tower_options}))
  model.compile(optimizer=tf.keras.optimizers.Adam(3e-3))
  data = input_pipeline.batches(
      os.path.join(prepared, "records", "train-*.tfrecord"), 256,
      HISTORY_LENGTH, input_pipeline.ExampleRule(),
      catalogue.metadata["train_end"], training=True, shuffle_buffer=20_000,
      seed=0)
  model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
  return model


@pytest.fixture(scope="session")
def trained_model(prepared, catalogue):
  """A small two-tower model trained briefly on the tiny dataset."""
  return briefly_trained(prepared, catalogue)


@pytest.fixture(scope="session")
def exported(trained_model, catalogue, tmp_path_factory):
  """(export dir, {kind: SavedModel path}) of the trained model, top
  EXPORT_K."""
  from export import export  # pylint: disable=g-import-not-at-top
  export_dir = str(tmp_path_factory.mktemp("export"))
  paths = export.export_all(trained_model, catalogue, export_dir, k=EXPORT_K)
  return export_dir, paths


@pytest.fixture(scope="module")
def servers(exported):
  """The local TF Serving stand-in over models.config: (REST, gRPC)."""
  from export import local_server  # pylint: disable=g-import-not-at-top
  from export import tf_serving  # pylint: disable=g-import-not-at-top
  base_paths = tf_serving.read_model_config(
      os.path.join(exported[0], tf_serving.MODEL_CONFIG_FILE))
  rest, grpc_address, stop = local_server.start(base_paths, 0, 0)
  yield rest, grpc_address
  stop()


def train_batch(prepared, catalogue, size=256):
  """One shuffled batch of training examples from the prepared data."""
  dataset = input_pipeline.batches(
      os.path.join(prepared, "records", "train-*.tfrecord"), size,
      HISTORY_LENGTH, input_pipeline.ExampleRule(),
      catalogue.metadata["train_end"], training=True, shuffle_buffer=5000,
      seed=0)
  return next(iter(dataset))


def same_target_batch(catalogue, n=8, target=3):
  """n queries of distinct users and seeds, all with the same target track."""
  return {
      schema.USER_ID: tf.constant(catalogue.user_ids[1:n + 1]),
      schema.SEED_ITEM: tf.range(1, n + 1, dtype=tf.int64),
      schema.HISTORY_ITEMS: tf.zeros([n, HISTORY_LENGTH], tf.int64),
      schema.EXAMPLE_AGE: tf.zeros([n]),
      schema.TARGET_ITEM: tf.fill([n], tf.constant(target, tf.int64)),
      schema.WEIGHT: tf.ones([n]),
  }


def assert_steps_lower_the_loss(model, batch, steps=10):
  """`steps` training steps on one batch bring its loss below 0.8x."""
  model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
  before = float(model.compute_loss(batch))
  for _ in range(steps):
    model.train_step(batch)
  after = float(model.compute_loss(batch))
  assert np.isfinite(before) and after < 0.8 * before


def model_with_batch_priors(prepared, catalogue, seed, **config):
  """A small model with the priors `config` switches on (`TowerConfig`
  fields), their tables counted from one training batch; returns it with
  that batch's examples (its own training targets)."""
  tf.keras.utils.set_random_seed(seed)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, **config))
  batch = train_batch(prepared, catalogue, size=64)
  examples = {k: batch[k].numpy() for k in schema.example_spec(1)}
  counts = baselines.TrainingCounts(catalogue.num_items + 1)
  counts.add(examples[schema.SEED_ITEM], examples[schema.TARGET_ITEM],
             examples[schema.EXAMPLE_AGE])
  priors.fit(model, catalogue, counts.baselines())
  return model, examples


def assert_ranks_with_priors(model, examples, bonus, catalogue):
  """The model's ranks of `examples` (in memory and blockwise) are those of
  the numpy reference with its priors (`bonus`) mixed in; returns them."""
  n = catalogue.num_items + 1
  candidates = ranking.candidate_embeddings(model, n)
  features = {k: tf.constant(examples[k]) for k in schema.QUERY_FEATURES}
  scores = with_history_prior(
      model.query_tower(features).numpy() @ candidates.numpy().T,
      bonus.slots.numpy(), bonus.weights.numpy(), model.temperature)
  targets = examples[schema.TARGET_ITEM]
  target_scores = scores[np.arange(len(targets)), targets]
  ahead = (scores[:, 1:] > target_scores[:, None]) | (
      (scores[:, 1:] == target_scores[:, None]) &
      (np.arange(1, n) < targets[:, None]))
  got = ranking.model_ranks(model, examples, candidates)
  assert np.mean(got == 1 + ahead.sum(axis=1)) > 0.95
  np.testing.assert_array_equal(
      blockwise_ranks.target_ranks(model, examples, n, block_items=64,
                                   batch_size=32), got)
  return got


def small_model(catalogue, **kwargs):
  """A seeded TwoTowerModel with SMALL_TOWERS (kwargs: `RetrievalConfig`)."""
  tf.keras.utils.set_random_seed(1)
  return model_lib.TwoTowerModel(catalogue,
                                 towers.TowerConfig(**SMALL_TOWERS),
                                 model_lib.RetrievalConfig(**kwargs))


def with_history_prior(scores, slots, weights, temperature, first=0,
                       level=None):
  """A reference in numpy (float64) for `history_bonus`: [rows, n] scores
  (column c is item first + c) with each row's history prior mixed in,
  under `level` [rows] or the normaliser of the row's own top scores."""
  scores = np.array(scores, np.float64)
  items = first + np.arange(scores.shape[1])
  for row, dense in enumerate(scores):
    if level is None:
      top = np.sort(dense[(items > 0) & np.isfinite(dense)])[::-1][
          :history_bonus.NORMALISER_TOP]
      top_level = (temperature * np.logaddexp.reduce(top / temperature)
                   if len(top) else 0.0)
    row_level = top_level if level is None else level[row]
    weight = {}
    for item, value in zip(slots[row], weights[row]):
      if item > 0:
        weight[item] = weight.get(item, 0.0) + value
    for item, value in weight.items():
      column = item - first
      if 0 <= column < len(dense) and value != 0 and np.isfinite(
          dense[column]):
        with np.errstate(invalid="ignore"):
          scores[row, column] = row_level + temperature * np.logaddexp(
              (dense[column] - row_level) / temperature, np.log(value))
  return scores


@pytest.fixture(scope="session")
def requests_and_features(prepared, catalogue):
  """Serving requests (raw ids) for test examples, and the model features."""
  test = evaluate.load_examples(prepared, "test", HISTORY_LENGTH,
                                input_pipeline.ExampleRule())
  pick = np.linspace(0, len(test[schema.TARGET_ITEM]) - 1, 16).astype(int)
  features = {k: v[pick] for k, v in test.items()}
  ids = catalogue.item_ids  # index 0 -> -1, the serving padding id
  request = {
      schema.SERVING_USER_ID: features[schema.USER_ID],
      schema.SERVING_SEED_ITEM_ID: ids[features[schema.SEED_ITEM]],
      schema.SERVING_HISTORY_ITEM_IDS: ids[features[schema.HISTORY_ITEMS]],
  }
  return {k: tf.constant(v, tf.int64) for k, v in request.items()}, features


def load_serving(path):
  """A SavedModel's serving signature."""
  return tf.saved_model.load(path).signatures["serving_default"]


def assert_bruteforce_top_k(path, model, catalogue, requests_and_features):
  """The SavedModel's top-k is the in-memory model's exact top-k (by the max
  over query heads, if the model has several, with its priors mixed in, if
  it has any)."""
  request, features = requests_and_features
  outputs = load_serving(path)(**request)
  assert outputs["item_ids"].shape == (16, EXPORT_K)

  queries = model.query_tower(
      {k: tf.constant(features[k]) for k in schema.QUERY_FEATURES}).numpy()
  candidates = ranking.candidate_embeddings(
      model, catalogue.num_items + 1).numpy()[1:]
  scores = (queries @ candidates.T if queries.ndim == 2 else
            np.einsum("bhd,nd->bhn", queries, candidates).max(axis=1))
  bonus = history_bonus.query_bonus(
      model, {k: tf.constant(features[k]) for k in schema.QUERY_FEATURES})
  if bonus is not None:  # candidate column j is index j + 1
    scores = with_history_prior(scores, bonus.slots.numpy(),
                                bonus.weights.numpy(), bonus.temperature,
                                first=1)
  top = np.argsort(-scores, axis=1, kind="stable")[:, :EXPORT_K]
  np.testing.assert_array_equal(outputs["item_ids"].numpy(),
                                catalogue.item_ids[1:][top])
  np.testing.assert_allclose(outputs["scores"].numpy(),
                             np.take_along_axis(scores, top, 1), atol=1e-5)
