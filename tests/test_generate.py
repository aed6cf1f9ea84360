"""Tests of the Yambda-layout generator on the tiny size."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep import generate
from data_prep import yambda
from data_prep.generate import components
from data_prep.generate import distribution
from data_prep.generate import oracle as oracle_lib
from data_prep.generate import played_ratio
from data_prep.generate import positive_oracle
from data_prep.generate import simulation
from data_prep.generate import world as world_lib

SIZE = "tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """One tiny dataset, generated once for the module."""
  return generate.generate(str(tmp_path_factory.mktemp("gen")), SIZE, seed=0)


@pytest.fixture(scope="module")
def events(root):
  return pq.read_table(yambda.multi_event_path(root, SIZE))


@pytest.fixture(scope="module")
def oracle(root):
  return pq.read_table(generate.oracle_path(root, SIZE))


def _all_files(root):
  return {
      "multi_event": yambda.multi_event_path(root, SIZE),
      "embeddings": yambda.embeddings_path(root),
      "artist_mapping": yambda.artist_mapping_path(root),
      "album_mapping": yambda.album_mapping_path(root),
  }


def test_files_have_the_yambda_schemas(root):
  for kind, path in _all_files(root).items():
    assert os.path.exists(path), path
    assert pq.read_schema(path).equals(yambda.schemas()[kind]), kind
    yambda.check_schema(path, kind)
  assert pq.read_schema(generate.oracle_path(root, SIZE)).equals(
      generate.ORACLE_SCHEMA)
  assert not [f for f in os.listdir(root) if f.endswith(".tmp")]


def test_params_json(root):
  with open(generate.params_path(root, SIZE)) as f:
    params = json.load(f)
  assert params["seed"] == 0 and params["size"] == SIZE
  assert params["params"]["n_users"] == generate.SIZES[SIZE].n_users


def test_event_values(events):
  etype = np.asarray(events["event_type"].combine_chunks().dictionary_decode()
                     .to_pylist())
  assert set(etype) <= set(yambda.EVENT_TYPES)
  assert {"listen", "like", "dislike"} <= set(etype)
  listen = etype == "listen"
  ratio = events["played_ratio_pct"]
  length = events["track_length_seconds"]
  # Null exactly on the rows that are not listens.
  np.testing.assert_array_equal(ratio.is_null().to_numpy(), ~listen)
  np.testing.assert_array_equal(length.is_null().to_numpy(), ~listen)
  r = ratio.to_numpy(zero_copy_only=False)[listen]
  assert (r > 100).any() and (r < 30).any()
  assert set(np.unique(events["is_organic"].to_numpy())) == {0, 1}
  ts = events["timestamp"].to_numpy()
  assert ts.max() < generate.SIZES[SIZE].days * generate.DAY


def test_rows_sorted_and_listens_unique(events):
  uid = events["uid"].to_numpy().astype(np.int64)
  ts = events["timestamp"].to_numpy().astype(np.int64)
  key = uid * (1 << 32) + ts
  assert np.all(np.diff(key) >= 0)
  listen = events["played_ratio_pct"].is_valid().to_numpy()
  assert len(np.unique(key[listen])) == listen.sum()


def test_ids_are_sparse(events):
  uid = np.unique(events["uid"].to_numpy())
  items = np.unique(events["item_id"].to_numpy())
  assert uid.max() >= 2 * len(uid) and items.max() >= 2 * len(items)


def test_some_items_lack_metadata(root):
  n_items = generate.SIZES[SIZE].n_items
  emb = pq.read_table(yambda.embeddings_path(root))
  assert 0.7 * n_items < emb.num_rows < n_items
  widths = {len(x) for x in emb["normalized_embed"].to_pylist()[:50]}
  assert widths == {generate.SIZES[SIZE].embed_dim}
  art = pq.read_table(yambda.artist_mapping_path(root))
  alb = pq.read_table(yambda.album_mapping_path(root))
  assert len(np.unique(art["item_id"].to_numpy())) < n_items
  assert len(np.unique(alb["item_id"].to_numpy())) < n_items
  # Some tracks have two artists.
  assert art.num_rows > len(np.unique(art["item_id"].to_numpy()))


def test_oracle_ranks(oracle, events):
  n_items = generate.SIZES[SIZE].n_items
  ranks = oracle["oracle_rank"].to_numpy()
  prob = oracle["oracle_prob"].to_numpy()
  assert len(ranks) > 0
  assert ranks.min() >= 1 and ranks.max() <= n_items
  assert np.all((prob > 0) & (prob <= 1))
  rec = generate.oracle_recall(ranks)
  assert rec["recall@10"] <= rec["recall@100"] <= rec["recall@500"]
  assert rec["recall@100"] > 0.3
  drawn_from = oracle["component"].combine_chunks().dictionary_decode()
  assert set(drawn_from.to_pylist()) == set(generate.COMPONENTS)
  # Every oracle row is a listen event (joinable on uid, timestamp, item_id).
  listen = events.filter(events["played_ratio_pct"].is_valid())
  keys = set(zip(listen["uid"].to_pylist(), listen["timestamp"].to_pylist(),
                 listen["item_id"].to_pylist()))
  okeys = list(zip(oracle["uid"].to_pylist(), oracle["timestamp"].to_pylist(),
                   oracle["item_id"].to_pylist()))
  assert all(k in keys for k in okeys)
  days = generate.SIZES[SIZE].days
  start = (days - generate.SIZES[SIZE].oracle_days) * generate.DAY
  in_window = listen["timestamp"].to_numpy() >= start
  assert in_window.sum() == oracle.num_rows
  # The validation window [end - 2 days - 3600 s, ...) is covered.
  assert start <= (days - 2) * generate.DAY - 3600
  # The positive oracle ranks every listen of this size.
  pos_ranks = oracle["positive_oracle_rank"].to_numpy()
  pos_prob = oracle["positive_oracle_prob"].to_numpy()
  assert pos_ranks.min() >= 1 and pos_ranks.max() <= n_items
  assert np.all((pos_prob > 0) & (pos_prob <= 1))


def test_oracle_recall_values():
  rec = generate.oracle_recall(np.array([1, 5, 50, 200, 1000]), ks=(10, 100))
  assert rec == {"recall@10": 0.4, "recall@100": 0.6}


def test_same_seed_same_files(root, tmp_path):
  again = generate.generate(str(tmp_path), SIZE, seed=0)
  files = list(_all_files(root).values()) + [generate.oracle_path(root, SIZE)]
  for path in files:
    other = os.path.join(again, os.path.relpath(path, root))
    with open(path, "rb") as a, open(other, "rb") as b:
      assert a.read() == b.read(), path


def _streams():
  """The catalogue, users and simulation streams, as generate() spawns them."""
  return np.random.default_rng(0).spawn(3)


@pytest.fixture(scope="module")
def world():
  """The tiny size's world: catalogue, timeline and users."""
  catalogue_rng, users_rng, _ = _streams()
  return world_lib.make_world(generate.SIZES[SIZE], catalogue_rng, users_rng)


@pytest.fixture(scope="module")
def snapshots(world):
  """The snapshots of the tiny size's listens in the oracle window."""
  _, _, simulation_rng = _streams()
  _, snapshots = simulation.simulate_chunk(simulation_rng, world, 0,
                                           world.size.n_users)
  return snapshots


def _expected_rank(probs, target, item_ids):
  """The rank of `target` under `probs`, ties (to 1e-9) broken pessimistically
  by raw id, and the number of items tied with it."""
  pt = probs[target]
  close = np.abs(probs - pt) <= 1e-9 * pt
  smaller = item_ids < item_ids[target]
  return (1 + np.sum(probs > pt * (1 + 1e-9)) + np.sum(close & smaller),
          int(close.sum()))


def _dense_next_probs(world, sn, i):
  """P(next item) of snapshot i over the whole catalogue, written out
  component by component: the reference for the oracle and the sampler."""
  cat, tl, users = world.catalogue, world.timeline, world.users
  u, seed, per, mix = sn.user[i], sn.seed[i], sn.period[i], sn.mixture[i]
  items = np.arange(cat.n_items)
  fresh = cat.freshness(items, np.full(cat.n_items, per),
                        world.size.period_days)
  probs = np.zeros(cat.n_items)

  def add_artist(artist, weight):
    w = np.where(cat.artist == artist, cat.base_popularity * fresh, 0.0)
    probs[:] += weight * w / w.sum()

  def normalised(w):
    return w / w.sum() if w.sum() > 0 else w

  if mix[components.ALBUM] > 0:
    probs[cat.next_in_album[seed]] += mix[components.ALBUM]
  if mix[components.ARTIST] > 0:
    add_artist(cat.artist[seed], mix[components.ARTIST])
  if mix[components.NEIGHBOUR] > 0:
    neighbours = cat.neighbours[cat.artist[seed]]
    w = normalised(cat.neighbour_weights[cat.artist[seed]] *
                   (tl.artist_norm[per, neighbours] > 0))
    for artist, weight in zip(neighbours, w):
      if weight > 0:
        add_artist(artist, mix[components.NEIGHBOUR] * weight)
  w = normalised(users.fav_track_weights[u] *
                 (cat.release_period[users.fav_tracks[u]] <= per))
  np.add.at(probs, users.fav_tracks[u], mix[components.FAV_TRACK] * w)
  w = normalised(users.fav_artist_weights[u] *
                 (tl.artist_norm[per, users.fav_artists[u]] > 0))
  for artist, weight in zip(users.fav_artists[u], w):
    if weight > 0:
      add_artist(artist, mix[components.FAV_ARTIST] * weight)
  n = sn.history_len[i]
  if n:
    np.add.at(probs, sn.history[i, :n], mix[components.REPEAT] / n)
  np.add.at(probs, tl.trend_items[per],
            mix[components.TRENDING] * tl.trend_prob[per])
  released = cat.release_period <= per
  probs[released] += mix[components.EXPLORE] / released.sum()
  return probs


@pytest.fixture(scope="module")
def oracle_arrays(world, snapshots):
  """(rank, prob, positive rank, positive prob) of every snapshot."""
  return oracle_lib.oracle(world, snapshots)


def test_oracle_equals_the_dense_distribution(world, snapshots,
                                              oracle_arrays):
  sn = snapshots
  ranks, target_probs = oracle_arrays.rank, oracle_arrays.prob
  rows = np.random.default_rng(1).choice(len(sn.user), 60, replace=False)
  # Targets drawn by explore alone tie with every other such item.
  explore_only = 0
  for i in rows:
    probs = _dense_next_probs(world, sn, i)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-9)
    target = sn.target[i]
    pt = probs[target]
    np.testing.assert_allclose(target_probs[i], pt, rtol=1e-9)
    expected, ties = _expected_rank(probs, target, world.catalogue.item_ids)
    assert ranks[i] == expected, i
    explore_only += ties > 10
  assert explore_only > 0


def _sample_next_of(rng, world, sn, i, n):
  """n next listens drawn from the state of snapshot i."""
  rep = np.full(n, i)
  return distribution.sample_next(
      rng, world, sn.user[rep], sn.seed[rep], sn.period[rep],
      sn.mixture[rep], sn.history[rep], sn.history_len[rep])


def test_sampler_follows_the_dense_distribution(world, snapshots):
  sn = snapshots
  i = int(np.argmax(sn.history_len))  # a context with every component
  n = 400_000
  items, _ = _sample_next_of(np.random.default_rng(2), world, sn, i, n)
  probs = _dense_next_probs(world, sn, i)
  assert np.all(probs[items] > 0)
  empirical = np.bincount(items, minlength=world.catalogue.n_items) / n
  assert 0.5 * np.abs(empirical - probs).sum() < 0.03


def _dense_positive_weights(world, sn, i):
  """P(next listen is positive and is item j) of snapshot i over the whole
  catalogue: P(next listen) times P(positive | affinity), the affinity
  written out (the cosine of taste and latent plus the favourite bonuses)."""
  cat, users = world.catalogue, world.users
  u = sn.user[i]
  affinity = (cat.latent.astype(np.float64) @ users.taste[u] /
              np.linalg.norm(cat.latent, axis=1))
  affinity += played_ratio._FAV_TRACK_BONUS * np.isin(
      np.arange(cat.n_items), users.fav_tracks[u])
  affinity += played_ratio._FAV_ARTIST_BONUS * np.isin(cat.artist,
                                                       users.fav_artists[u])
  return _dense_next_probs(world, sn, i) * generate.positive_prob(affinity)


def _dense_positive_probs(world, sn, i):
  """P(next positive listen) of snapshot i over the whole catalogue."""
  weights = _dense_positive_weights(world, sn, i)
  return weights / weights.sum()


def _positive_prob_reference(affinity):
  """P(played ratio >= 50 | affinity), written out from draw_played_ratio's
  probabilities: not skipped, then played through or partly (31..99)."""
  p_skip, p_full = played_ratio._ratio_probs(affinity)
  return (1 - p_skip) * (p_full + (1 - p_full) * 50 / 69)


def test_positive_prob_matches_the_played_ratio():
  grid = np.linspace(-1.5, 1.5, 3001)
  probs = generate.positive_prob(grid)
  np.testing.assert_allclose(probs, _positive_prob_reference(grid),
                             rtol=1e-12)
  assert np.all(np.diff(probs) > 0)  # increasing in the affinity
  rng = np.random.default_rng(3)
  n = 200_000
  for a in (-0.8, 0.0, 0.3, 0.6, 1.2):
    ratio = played_ratio.draw_played_ratio(rng, np.full(n, a))
    empirical = np.mean(ratio >= generate.LISTEN_PLUS_RATIO)
    expected = generate.positive_prob(np.array([a]))[0]
    assert abs(empirical - expected) < 4 * np.sqrt(0.25 / n), a


def test_positive_oracle_equals_the_dense_distribution(world, snapshots,
                                                       oracle_arrays):
  sn = snapshots
  ranks = oracle_arrays.positive_rank
  target_probs = oracle_arrays.positive_prob
  rows = np.random.default_rng(1).choice(len(sn.user), 60, replace=False)
  # Rows with a target drawn by explore (the hard case: every unlisted item
  # has its own score) and rows with a target that has a favourite bonus.
  rows = np.r_[rows, np.nonzero(sn.component == components.EXPLORE)[0][:15],
               np.nonzero(sn.component == components.FAV_ARTIST)[0][:5]]
  for i in rows:
    probs = _dense_positive_probs(world, sn, i)
    target = sn.target[i]
    pt = probs[target]
    # The normaliser is summed from float32 terms: float32 precision.
    np.testing.assert_allclose(target_probs[i], pt, rtol=1e-6)
    assert ranks[i] == _expected_rank(probs, target,
                                      world.catalogue.item_ids)[0], i


def test_positive_oracle_sample(world, snapshots, oracle_arrays):
  sn = snapshots
  sample = positive_oracle.positive_sample(np.random.default_rng(4), sn, 500)
  assert 0 < sample.sum() <= 500
  # Whole users: a user is in the sample with all of its snapshots or none.
  assert not set(sn.user[sample]) & set(sn.user[~sample])
  result = oracle_lib.oracle(world, sn, sample)
  ranks, probs = result.positive_rank, result.positive_prob
  np.testing.assert_array_equal(ranks[sample],
                                oracle_arrays.positive_rank[sample])
  np.testing.assert_allclose(probs[sample],
                             oracle_arrays.positive_prob[sample], rtol=1e-6)
  assert np.all(ranks[~sample] == -1) and np.all(np.isnan(probs[~sample]))


def test_sampler_follows_the_positive_distribution(world, snapshots):
  """Next listens and their outcomes drawn for fixed states, kept where
  positive, follow the positive oracle's distribution."""
  sn = snapshots
  rng = np.random.default_rng(5)
  explore_rows = np.nonzero(sn.component == components.EXPLORE)[0]
  for i in (int(np.argmax(sn.history_len)), int(explore_rows[0])):
    n = 400_000
    items, comp = _sample_next_of(rng, world, sn, i, n)
    outcome = simulation.listen_outcome(rng, world, sn.user[np.full(n, i)],
                                        items, comp)
    positive = ((outcome.ratio >= generate.LISTEN_PLUS_RATIO) &
                ~outcome.dislike)
    np.testing.assert_array_equal(
        generate.is_positive(outcome.ratio, outcome.dislike), positive)
    np.testing.assert_array_equal(
        positive, outcome.ratio >= generate.LISTEN_PLUS_RATIO)
    # The share of positives is the normaliser.
    weights = _dense_positive_weights(world, sn, i)
    assert abs(positive.mean() - weights.sum()) < 4 * np.sqrt(0.25 / n)
    probs = weights / weights.sum()
    empirical = np.bincount(items[positive],
                            minlength=world.catalogue.n_items)
    empirical = empirical / positive.sum()
    assert np.all(probs[items[positive]] > 0)
    # Sampling noise alone is about 0.02; the next-listen distribution is
    # 0.16 or more away from this one.
    assert 0.5 * np.abs(empirical - probs).sum() < 0.035
    assert 0.5 * np.abs(_dense_next_probs(world, sn, i) - probs).sum() > 0.1
