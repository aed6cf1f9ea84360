"""The seed-successor prior: its tables, layer, choice and export."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from export import export
from tfrs_yambda import evaluate
from tfrs_yambda import history_bonus
from tfrs_yambda import input_pipeline
from tfrs_yambda import model as model_lib
from tfrs_yambda import priors
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import successor_prior
from tfrs_yambda import towers
from tfrs_yambda import yambda_protocol
from tests.conftest import EXPORT_K
from tests.conftest import SMALL_TOWERS
from tests.conftest import assert_bruteforce_top_k
from tests.conftest import assert_ranks_with_priors
from tests.conftest import model_with_batch_priors

# (seed, target, count): seed 1 -> 3 (4), 2 (2), 4 (2), 1 (1); seed 2 -> 5
# (3); pairs with index 0 (unknown) count for nothing.
TRANSITIONS = (np.array([1, 1, 1, 1, 2, 0, 3]),
               np.array([3, 4, 2, 1, 5, 1, 0]),
               np.array([4, 2, 2, 1, 3, 7, 5]))


def test_fit_keeps_each_seeds_most_frequent_successors():
  tables = successor_prior.fit(6, TRANSITIONS, successors=2)
  # Ties (2 and 4, twice each) by index; shares of all of the seed's nine.
  np.testing.assert_array_equal(tables.successors,
                                [[0, 0], [3, 2], [5, 0], [0, 0], [0, 0],
                                 [0, 0]])
  np.testing.assert_allclose(tables.probabilities,
                             [[0, 0], [4 / 9, 2 / 9], [1, 0], [0, 0], [0, 0],
                              [0, 0]], rtol=1e-6)
  assert tables.successors.dtype == np.int32
  empty = successor_prior.fit(6, tuple(np.zeros(0, np.int64)
                                       for _ in range(3)), 3)
  assert not empty.successors.any() and not empty.probabilities.any()


def test_the_layer_lists_the_seeds_successors_at_its_mass():
  layer = successor_prior.SuccessorPrior(6, 2)
  layer.set_tables(successor_prior.fit(6, TRANSITIONS, 2))
  items, weights = layer(tf.constant([1, 3, 0], tf.int64))
  assert items.dtype == tf.int64 and not weights.numpy().any()  # off
  layer.set_mass(2.0)
  items, weights = layer(tf.constant([1, 3, 0], tf.int64))
  np.testing.assert_array_equal(items.numpy(), [[3, 2], [0, 0], [0, 0]])
  np.testing.assert_allclose(weights.numpy(),
                             [[8 / 9, 4 / 9], [0, 0], [0, 0]], rtol=1e-6)


def _model(prepared, catalogue, seed, **config):
  """A small model with a successor prior counted from one training batch,
  and that batch's examples."""
  return model_with_batch_priors(prepared, catalogue, seed,
                                 successor_prior=True, **config)


def test_protocol_query_weighs_at_the_protocol_mass(prepared, catalogue):
  model, _ = _model(prepared, catalogue, 1)
  layer = model.query_tower.successor_prior
  layer.set_mass(2.0)
  layer.set_protocol_mass(0.5)
  with successor_prior.protocol_query(model):
    assert float(layer.mass.numpy()) == 0.5
  assert float(layer.mass.numpy()) == 2.0
  # Restored on the way out, too.
  with pytest.raises(RuntimeError), successor_prior.protocol_query(model):
    raise RuntimeError
  assert float(layer.mass.numpy()) == 2.0
  plain = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS))
  with successor_prior.protocol_query(plain):  # no prior: nothing to do
    pass


def test_all_three_priors_rank_as_the_reference_in_memory_and_blockwise(
    prepared, catalogue):
  """The successors follow the history's and the artist prior's slots:
  p ~ exp((s - L) / t) + B_history + B_artist + B_successor."""
  model, examples = _model(prepared, catalogue, 8, history_bonus=True,
                           artist_prior=True, artist_prior_artists=2,
                           artist_prior_tracks=3, successor_prior_tracks=5)
  tower = model.query_tower
  tower.history_bonus.set_decay(0.3, 10.0)
  tower.artist_prior.set_mass(0.5)
  tower.successor_prior.set_mass(1.0)
  features = {k: tf.constant(examples[k]) for k in schema.QUERY_FEATURES}
  bonus = history_bonus.query_bonus(model, features)
  assert bonus.slots.shape == (64, catalogue.history_length + 2 * 3 + 5)
  successors = bonus.slots.numpy()[:, -5:]
  targets = examples[schema.TARGET_ITEM]
  # Counted from these examples: every target is among its seed's
  # successors unless the seed has more than five.
  listed = (successors == targets[:, None]).any(axis=1)
  assert listed.mean() > 0.9
  got = assert_ranks_with_priors(model, examples, bonus, catalogue)
  # The listed targets not first already rise.
  tower.successor_prior.set_mass(0.0)
  plain = ranking.model_ranks(model, examples, ranking.candidate_embeddings(
      model, catalogue.num_items + 1))
  lifted = listed & (plain > 1)
  assert lifted.sum() > 10 and np.mean(got[lifted] < plain[lifted]) > 0.8


def test_choose_sets_a_next_track_and_a_protocol_mass(prepared, catalogue):
  """The next-track mass by the next-track metric, the protocol's by the
  protocol metric alone; both restored on a retrained model."""
  model, examples = _model(prepared, catalogue, 3, artist_prior=True,
                           artist_prior_tracks=4)
  layer = model.query_tower.successor_prior
  seen = []

  def protocol():
    # What a protocol query would weigh the successors by.
    with successor_prior.protocol_query(model):
      seen.append(float(layer.mass.numpy()))
    return {"ndcg@10": 1.0 - seen[-1]}

  selection = priors.choose(model, catalogue, examples, [10], "mrr", [], [],
                            [0], "ndcg@10", protocol, successor_masses=[0, 1])
  entry = selection["successor_prior"]
  # Its own training targets: the prior ranks them better.
  assert entry["mass"] == 1 and entry["by_mass"]["1"] > entry["by_mass"]["0"]
  assert entry["protocol_mass"] == 0
  assert entry["protocol_by_mass"] == {"0": 1.0, "1": 0.0}
  # The artist prior's choice ran with the successor prior off everywhere.
  assert seen[0] == 0 and seen[-2:] == [0, 1]
  assert float(layer.mass.numpy()) == 1 and float(
      layer.protocol_mass.numpy()) == 0
  without = priors.choose(model, catalogue, examples, [10], "mrr", [], [],
                          [0], successor_masses=[0, 1])["successor_prior"]
  assert without["protocol_mass"] == 0 and without["protocol_by_mass"] == {}
  retrained, _ = _model(prepared, catalogue, 4, artist_prior=True,
                        artist_prior_tracks=4)
  priors.restore(retrained, {**selection, "successor_prior": {
      **entry, "protocol_mass": 0.3}})
  restored = retrained.query_tower.successor_prior
  assert float(restored.mass.numpy()) == 1
  assert float(restored.protocol_mass.numpy()) == pytest.approx(0.3)


def test_the_protocol_scores_the_model_at_its_protocol_mass(
    prepared, catalogue):
  model, _ = _model(prepared, catalogue, 5)
  rule = input_pipeline.ExampleRule()
  layer = model.query_tower.successor_prior

  def protocol(mass, protocol_mass):
    layer.set_mass(mass)
    layer.set_protocol_mass(protocol_mass)
    return yambda_protocol.evaluate(model, catalogue, prepared, rule,
                                    ks=[10])["retrievers"]["model"]

  off = protocol(0.0, 0.0)
  assert protocol(5.0, 0.0) == off
  assert protocol(0.0, 5.0) != off
  assert float(layer.mass.numpy()) == 0.0


@pytest.mark.e2e  # exports a model
def test_successor_prior_exports_in_the_same_signature(
    prepared, catalogue, requests_and_features, tmp_path):
  """With all three priors, the SavedModel's top k is the in-memory exact
  one, the successors' slots included."""
  tf.keras.utils.set_random_seed(9)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, history_bonus=True, artist_prior=True,
      artist_prior_artists=2, artist_prior_tracks=3, successor_prior=True,
      successor_prior_tracks=6))
  priors.fit(model, catalogue, evaluate.fit_baselines(
      catalogue, prepared, input_pipeline.ExampleRule()))
  model.query_tower.history_bonus.set_decay(0.3, 10.0)
  model.query_tower.artist_prior.set_mass(0.3)
  model.query_tower.successor_prior.set_mass(2.0)
  paths = export.export_all(model, catalogue, str(tmp_path), k=EXPORT_K)
  assert_bruteforce_top_k(paths["bruteforce"], model, catalogue,
                           requests_and_features)
  with open(os.path.join(paths["scann"], "assets.extra",
                         "export_metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["successor_prior"] and metadata["artist_prior"]
