"""The next-artist prior: its tables, its layer, its choice, its ranks."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from export import export
from tfrs_yambda import artist_prior
from tfrs_yambda import evaluate
from tfrs_yambda import history_bonus
from tfrs_yambda import input_pipeline
from tfrs_yambda import model as model_lib
from tfrs_yambda import priors
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import towers
from tests.conftest import EXPORT_K
from tests.conftest import HISTORY_LENGTH
from tests.conftest import SMALL_TOWERS
from tests.conftest import assert_bruteforce_top_k
from tests.conftest import assert_ranks_with_priors
from tests.conftest import load_serving
from tests.conftest import model_with_batch_priors

# Items 1-2 by artist 1, 3-4 by artist 2, 5 by artist 3, 6 by none.
ITEM_ARTIST = np.array([0, 1, 1, 2, 2, 3, 0])
# (seed, target, count): artist 1 -> 2 three times, 1 -> 1 once, 2 -> 3
# four times; pairs with an item without an artist count for nothing.
TRANSITIONS = (np.array([1, 2, 1, 3, 1, 6]), np.array([3, 4, 1, 5, 6, 1]),
               np.array([2, 1, 1, 4, 5, 3]))
RECENT = np.array([9.0, 4.0, 1.0, 0.0, 2.0, 3.0, 7.0])


def test_fit_keeps_each_artists_next_artists_and_popular_tracks():
  tables = artist_prior.fit(ITEM_ARTIST, 4, TRANSITIONS, RECENT,
                            next_artists=2, tracks=2)
  np.testing.assert_array_equal(tables.next_artists,
                                [[0, 0], [2, 1], [3, 0], [0, 0]])
  np.testing.assert_allclose(tables.next_weights,
                             [[0, 0], [0.75, 0.25], [1, 0], [0, 0]])
  # A track without recent plays (3) or an artist (6) is never listed.
  np.testing.assert_array_equal(tables.tracks,
                                [[0, 0], [1, 2], [4, 0], [5, 0]])
  np.testing.assert_allclose(tables.shares,
                             [[0, 0], [0.8, 0.2], [1, 0], [1, 0]])
  # Fewer kept: the largest, the shares still of the artist's whole
  # popularity (what the cut leaves out is mass the prior does not give).
  one = artist_prior.fit(ITEM_ARTIST, 4, TRANSITIONS, RECENT, 1, 1)
  np.testing.assert_array_equal(one.next_artists[:, 0], [0, 2, 3, 0])
  np.testing.assert_allclose(one.shares[:, 0], [0, 0.8, 1, 1])


def test_fit_splits_ties_by_index_and_handles_no_transitions():
  tables = artist_prior.fit(ITEM_ARTIST, 4, (np.array([1, 1]),
                                             np.array([5, 3]),
                                             np.array([2, 2])),
                            np.ones(7), 1, 1)
  assert tables.next_artists[1, 0] == 2 and tables.tracks[1, 0] == 1
  empty = artist_prior.fit(ITEM_ARTIST, 4, tuple(
      np.zeros(0, np.int64) for _ in range(3)), RECENT, 2, 2)
  assert not empty.next_artists.any() and not empty.next_weights.any()


def test_the_layer_lists_the_seed_artists_next_artists_tracks():
  layer = artist_prior.ArtistPrior(4, 2, 2)
  layer.set_tables(artist_prior.fit(ITEM_ARTIST, 4, TRANSITIONS, RECENT, 2,
                                    2))
  items, weights = layer(tf.constant([1, 3, 0], tf.int64))
  assert not weights.numpy().any()  # mass 0: off
  layer.set_mass(2.0)
  items, weights = layer(tf.constant([1, 3, 0], tf.int64))
  # Artist 1: artist 2's track 4 (0.75 * 1), then artist 1's 1 and 2.
  np.testing.assert_array_equal(items.numpy(),
                                [[4, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(
      weights.numpy(), 2 * np.array([[0.75, 0, 0.25 * 0.8, 0.25 * 0.2],
                                     [0, 0, 0, 0], [0, 0, 0, 0]]), rtol=1e-6)


def test_choose_mass_keeps_the_best_and_prefers_the_smaller_on_ties():
  layer = artist_prior.ArtistPrior(4, 2, 2)
  by_mass = {0.0: 0.1, 0.5: 0.4, 1.0: 0.4, 2.0: float("nan")}
  mass, scores = priors.choose_mass(
      layer.set_mass, lambda: by_mass[float(layer.mass.numpy())],
      [2, 1, 0.5, 0])
  assert mass == 0.5 and float(layer.mass.numpy()) == 0.5
  assert list(scores) == ["0", "0.5", "1", "2"]
  with pytest.raises(ValueError, match="No prior mass"):
    priors.choose_mass(layer.set_mass, lambda: 0.0, [])


def _model_fitted_on_a_batch(prepared, catalogue, seed, **config):
  """A small model with an artist prior counted from one training batch,
  and that batch's examples."""
  return model_with_batch_priors(prepared, catalogue, seed,
                                 artist_prior=True, **config)


def test_both_priors_rank_as_the_reference_in_memory_and_blockwise(
    prepared, catalogue):
  """The priors' items join the history's slots: ranks, blockwise ranks and
  the choice all see p ~ exp((s - L) / t) + B_history + B_artist."""
  model, examples = _model_fitted_on_a_batch(
      prepared, catalogue, 8, history_bonus=True, artist_prior_artists=3,
      artist_prior_tracks=4)
  model.query_tower.history_bonus.set_decay(0.3, 10.0)
  model.query_tower.artist_prior.set_mass(1.0)
  features = {k: tf.constant(examples[k]) for k in schema.QUERY_FEATURES}
  bonus = history_bonus.query_bonus(model, features)
  width = catalogue.history_length + 3 * 4
  assert bonus.slots.shape == (64, width) == bonus.weights.shape
  # Every seed with an artist that has next artists lists their tracks.
  assert np.any(bonus.weights.numpy()[:, catalogue.history_length:] > 0)
  got = assert_ranks_with_priors(model, examples, bonus, catalogue)
  targets = examples[schema.TARGET_ITEM]
  # The artist prior lifts the targets it lists (these are training
  # targets): most rise, though the items lifted with them may pass some.
  listed = (bonus.slots.numpy()[:, catalogue.history_length:] ==
            targets[:, None]).any(axis=1)
  model.query_tower.artist_prior.set_mass(0.0)
  plain = ranking.model_ranks(model, examples, ranking.candidate_embeddings(
      model, catalogue.num_items + 1))
  assert listed.sum() > 10 and np.mean(got[listed] < plain[listed]) > 0.8


@pytest.mark.e2e  # exports a model
def test_artist_prior_exports_in_the_same_signature(
    prepared, catalogue, requests_and_features, tmp_path):
  """Both priors, fitted on the training counts, are mixed in inside the
  SavedModel: its top k is the in-memory exact one."""
  tf.keras.utils.set_random_seed(9)
  model = model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **SMALL_TOWERS, history_bonus=True, artist_prior=True,
      artist_prior_artists=4, artist_prior_tracks=5))
  fitted = evaluate.fit_baselines(catalogue, prepared,
                                  input_pipeline.ExampleRule())
  priors.fit(model, catalogue, fitted)
  model.query_tower.history_bonus.set_decay(0.3, 10.0)
  model.query_tower.artist_prior.set_mass(2.0)
  paths = export.export_all(model, catalogue, str(tmp_path), k=EXPORT_K)
  assert_bruteforce_top_k(paths["bruteforce"], model, catalogue,
                           requests_and_features)
  with open(os.path.join(paths["scann"], "assets.extra",
                         "export_metadata.json")) as f:
    assert json.load(f)["artist_prior"]
  request, features = requests_and_features
  served = load_serving(paths["bruteforce"])(**request)["item_ids"].numpy()
  # The seed artist's next artists' tracks reach the list.
  bonus = history_bonus.query_bonus(
      model, {k: tf.constant(features[k]) for k in schema.QUERY_FEATURES})
  listed = catalogue.item_ids[bonus.slots.numpy()[:, HISTORY_LENGTH:]]
  assert np.mean([np.isin(top, row).any()
                  for row, top in zip(listed, served)]) > 0.5
  scann = load_serving(paths["scann"])(**request)["item_ids"].numpy()
  assert np.mean([len(np.intersect1d(a, b)) / EXPORT_K
                  for a, b in zip(served, scann)]) > 0.8


def test_the_mass_can_be_chosen_for_the_protocol_too(prepared, catalogue):
  """With a protocol metric, a mass scores the mean of both metrics: one
  that the protocol rejects loses though it ranks next tracks better."""
  model, examples = _model_fitted_on_a_batch(prepared, catalogue, 3,
                                             artist_prior_tracks=4)
  layer = model.query_tower.artist_prior

  def choose(protocol_metric):
    return priors.choose(
        model, catalogue, examples, [10], "mrr", [], [], [0, 1],
        protocol_metric,
        lambda: {"ndcg@10": 1.0 - float(layer.mass.numpy())})["artist_prior"]

  # Its own training targets: the prior ranks them better.
  alone = choose("")
  assert alone["mass"] == 1 and alone["by_mass"]["1"] > alone["by_mass"]["0"]
  both = choose("ndcg@10")
  assert both["mass"] == 0 and float(layer.mass.numpy()) == 0
  assert both["by_mass"]["0"] == pytest.approx((alone["by_mass"]["0"] + 1) / 2)
  with pytest.raises(ValueError, match="protocol"):
    choose("ndcg@7")
