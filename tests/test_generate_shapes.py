"""Tests of the real-shaped sizes (50m, 500m) at a tiny scale, and of the
samplers and searches they switch on."""

import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep import generate
from data_prep import yambda
from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import distribution
from data_prep.generate import metadata
from data_prep.generate import played_ratio
from data_prep.generate import run
from data_prep.generate import sampling
from data_prep.generate import sizes
from data_prep.generate import world as world_lib

SIZE = "shape_test"
# The 500m size's switches and shape, with few users and items.
PARAMS = dataclasses.replace(
    sizes.SIZES["500m"], n_users=240, n_items=3000, events_per_user=150,
    metadata_only_items=6000, chunk_users=64, oracle_sample=160,
    positive_oracle_sample=60, n_genres=8, trend_k=100)


@pytest.fixture(scope="module")
def size():
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sizes.SIZES, SIZE, PARAMS)
    # Several blocks of users per chunk, of raw ids per metadata file.
    patch.setattr(run, "_BLOCK_USERS", 16)
    patch.setattr(metadata, "_ID_BLOCK", 2048)
    yield SIZE


@pytest.fixture(scope="module")
def roots(size, tmp_path_factory):
  """The dataset generated with one worker and with two."""
  return [generate.generate(str(tmp_path_factory.mktemp(f"w{w}")), size,
                            seed=0, workers=w) for w in (1, 2)]


@pytest.fixture(scope="module")
def root(roots):
  return roots[0]


@pytest.fixture(scope="module")
def tables(root):
  return {kind: pq.read_table(path) for kind, path in _files(root).items()}


def _files(root):
  return {
      "multi_event": yambda.multi_event_path(root, SIZE),
      "embeddings": yambda.embeddings_path(root),
      "artist_mapping": yambda.artist_mapping_path(root),
      "album_mapping": yambda.album_mapping_path(root),
  }


def test_the_real_shapes():
  for name, users in (("50m", 10_000), ("500m", 100_000)):
    params = sizes.SIZES[name]
    assert params.n_users == users
    # The protocol's last timestamp, with a test and a validation day.
    assert 26_000_000 < params.days * generate.DAY < 26_000_000 + 86_400
    assert params.n_items + params.metadata_only_items == 9_390_000
    assert params.period_days == 3 and params.independent_chunk_streams


def test_published_sizes_keep_the_old_behaviour():
  defaults = generate.SizeParams(n_users=1, n_items=1, days=1,
                                 events_per_user=1)
  for name in ("tiny", "demo", "large"):
    params = sizes.SIZES[name]
    for field in ("oracle_sample", "proposals_per_round", "album_tables",
                  "fast_neighbours", "independent_chunk_streams",
                  "metadata_only_items", "second_album_share"):
      assert getattr(params, field) == getattr(defaults, field), (name, field)


def test_schemas_and_layout(root, size):
  for kind, path in _files(root).items():
    assert pq.read_schema(path).equals(yambda.schemas()[kind]), kind
    yambda.check_schema(path, kind)
  assert pq.read_schema(generate.oracle_path(root, size)).equals(
      generate.ORACLE_SCHEMA)
  # Where a download has it, so the configs of the real sizes read it.
  assert os.path.exists(os.path.join(root, "flat", size,
                                     "multi_event.parquet"))


def test_same_bytes_with_one_and_two_workers(roots, size):
  paths = list(_files(roots[0]).values()) + [
      generate.oracle_path(roots[0], size)]
  for path in paths:
    other = os.path.join(roots[1], os.path.relpath(path, roots[0]))
    with open(path, "rb") as a, open(other, "rb") as b:
      assert a.read() == b.read(), path


def test_events_sorted_and_on_the_timeline(tables):
  events = tables["multi_event"]
  uid = events["uid"].to_numpy().astype(np.int64)
  ts = events["timestamp"].to_numpy().astype(np.int64)
  assert np.all(np.diff(uid * (1 << 32) + ts) >= 0)
  assert ts.max() < PARAMS.days * generate.DAY
  assert ts.max() >= 25_913_600  # the protocol's test day has events


def test_metadata_only_items(tables):
  played = np.unique(tables["multi_event"]["item_id"].to_numpy())
  art = tables["artist_mapping"]
  alb = tables["album_mapping"]
  emb = tables["embeddings"]
  n_all = PARAMS.n_items + PARAMS.metadata_only_items
  ids = {k: np.unique(t["item_id"].to_numpy())
         for k, t in (("artist", art), ("album", alb), ("emb", emb))}
  for k, v in ids.items():
    assert v.max() < n_all, k  # dense raw ids, like the real ones
    # Most of them are metadata-only: never in the events.
    unplayed = ~np.isin(v, played)
    assert unplayed.sum() > 0.9 * PARAMS.metadata_only_items * (
        len(v) / n_all), k
  assert len(played) <= PARAMS.n_items
  assert 0.97 * n_all < len(ids["artist"]) < n_all
  assert 0.88 * n_all < len(ids["album"]) < 0.96 * n_all
  assert 0.78 * n_all < len(ids["emb"]) < 0.86 * n_all
  # Items on several albums: the compilations.
  extra = alb.num_rows - len(ids["album"])
  assert 0.08 * len(ids["album"]) < extra < 0.15 * len(ids["album"])
  for table in (art, alb):
    key = table.column(0).to_numpy().astype(np.int64) * (1 << 32) + (
        table.column(1).to_numpy())
    assert np.all(np.diff(key) > 0)  # sorted by item, no duplicate rows


def test_embeddings(tables):
  emb = tables["embeddings"]
  for column in ("embed", "normalized_embed"):
    flat = emb[column].combine_chunks().flatten().to_numpy()
    assert len(flat) == 128 * emb.num_rows
  vectors = emb["normalized_embed"].combine_chunks().flatten().to_numpy()
  norms = np.linalg.norm(vectors.reshape(-1, 128), axis=1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  raw = emb["embed"].combine_chunks().flatten().to_numpy()
  assert np.std(np.linalg.norm(raw.reshape(-1, 128), axis=1)) > 0.01


def test_oracle_of_sampled_users(root, tables):
  oracle = pq.read_table(generate.oracle_path(root, SIZE))
  rank = oracle["oracle_rank"].to_numpy()
  prob = oracle["oracle_prob"].to_numpy()
  pos_rank = oracle["positive_oracle_rank"].to_numpy()
  uid = oracle["uid"].to_numpy()
  ranked = rank > 0
  assert 0 < ranked.sum() <= PARAMS.oracle_sample and (~ranked).any()
  assert np.all(rank[~ranked] == -1) and np.all(np.isnan(prob[~ranked]))
  assert np.all((prob[ranked] > 0) & (prob[ranked] <= 1))
  # Whole users: a user has ranks for every oracle listen or for none.
  assert not set(uid[ranked]) & set(uid[~ranked])
  # The positive oracle ranks some of the same listens, no others.
  assert 0 < (pos_rank > 0).sum() <= PARAMS.positive_oracle_sample
  assert np.all(ranked[pos_rank > 0])
  assert not set(uid[pos_rank > 0]) & set(uid[ranked & (pos_rank < 0)])
  # Every listen of the oracle window has a row.
  events = tables["multi_event"]
  listen = events.filter(events["played_ratio_pct"].is_valid())
  start = (PARAMS.days - PARAMS.oracle_days) * generate.DAY
  assert (listen["timestamp"].to_numpy() >= start).sum() == oracle.num_rows


def _exact_artist_probs(world, artist, period):
  """P(track | artist, period): base popularity * freshness, normalised."""
  cat = world.catalogue
  items = np.arange(cat.artist_start[artist], cat.artist_end[artist])
  w = cat.base_popularity[items] * cat.freshness(
      items, np.full(len(items), period), world.size.period_days)
  return items, w / w.sum()


@pytest.mark.parametrize("album_tables,proposals", [(True, 8), (False, 8)])
def test_artist_track_samplers_are_exact(album_tables, proposals):
  params = dataclasses.replace(PARAMS, album_tables=album_tables,
                               proposals_per_round=proposals)
  cat_rng, users_rng = np.random.default_rng(0).spawn(2)
  world = world_lib.make_world(params, cat_rng, users_rng)
  cat = world.catalogue
  rng = np.random.default_rng(1)
  n = 200_000
  n_periods = len(world.timeline.n_released)
  # The artists with the most tracks (many albums), each in the period where
  # freshness moves its distribution furthest from the static popularity.
  for artist in np.argsort(cat.artist_start - cat.artist_end)[:3]:
    items = np.arange(cat.artist_start[artist], cat.artist_end[artist])
    static = cat.base_popularity[items] / cat.base_popularity[items].sum()
    moved = [0.5 * np.abs(_exact_artist_probs(world, artist, p)[1] -
                          static).sum()
             if cat.artist_first_period[artist] <= p else 0.0
             for p in range(n_periods)]
    period = int(np.argmax(moved))
    assert moved[period] > 0.2
    items, probs = _exact_artist_probs(world, artist, period)
    drawn = distribution._sample_artist_track(  # pylint: disable=protected-access
        rng, world, np.full(n, artist), np.full(n, period))
    assert np.all((drawn >= items[0]) & (drawn <= items[-1]))
    empirical = np.bincount(drawn - items[0], minlength=len(items)) / n
    assert np.all(probs[empirical > 0] > 0)
    # Sampling noise alone is below 0.5 * sqrt(len(items) / n).
    assert 0.5 * np.abs(empirical - probs).sum() < 0.025, artist


def test_fast_neighbours_equal_the_exact_search():
  rng = np.random.default_rng(2)
  for n_artists, n_genres in ((30, 8), (3000, 24)):
    genre = rng.integers(0, n_genres, n_artists)
    latent = rng.normal(0, 1, (n_genres, 16))[genre] + rng.normal(
        0, 0.7, (n_artists, 16))
    exact = catalogue_lib._artist_neighbours(  # pylint: disable=protected-access
        latent, genre, 10)
    fast = catalogue_lib._fast_artist_neighbours(  # pylint: disable=protected-access
        latent, genre, 10)
    np.testing.assert_array_equal(fast[0], exact[0])
    np.testing.assert_allclose(fast[1], exact[1], rtol=1e-12)


def test_window_search_equals_searchsorted():
  rng = np.random.default_rng(3)
  table = np.sort(rng.random(5000))
  lo = rng.integers(0, 4900, 3000)
  hi = lo + rng.integers(1, 100, 3000)  # short and long ranges
  values = rng.random(3000)
  expected = np.clip(np.searchsorted(table, values, "right"), lo, hi)
  np.testing.assert_array_equal(
      distribution._search_in(table, values, lo, hi),  # pylint: disable=protected-access
      expected)


def _choose_reference(rng, weights):
  """`sampling.choose` as first written: cumsum along rows, clipped to the
  last column of weight > 0."""
  c = np.cumsum(weights, axis=1)
  u = rng.random(len(weights)) * c[:, -1]
  idx = (c <= u[:, None]).sum(1)
  last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
  return np.minimum(idx, last)


class _Ones:
  """A stream of uniforms of 1: u is the total, the edge that rounding could
  reach, past the last column of weight > 0."""

  def random(self, n):
    return np.ones(n)


def test_choose_equals_the_row_cumsum_draw():
  rng = np.random.default_rng(5)
  for trial in range(50):
    m, k = int(rng.integers(0, 200)), int(rng.integers(1, 18))
    w = rng.random((m, k)) ** 3 * (rng.random((m, k)) < 0.5)
    w[np.arange(m), rng.integers(0, k, m)] += 1e-3
    for seed in (trial, None):
      streams = [np.random.default_rng(seed) if seed is not None
                 else _Ones() for _ in range(2)]
      np.testing.assert_array_equal(sampling.choose(streams[0], w),
                                    _choose_reference(streams[1], w))


def test_rows_any_equals_any():
  rng = np.random.default_rng(6)
  for k in (1, 8, 10, 16):
    mask = rng.random((300, k)) < 0.05
    np.testing.assert_array_equal(
        played_ratio._rows_any(mask), mask.any(1))  # pylint: disable=protected-access
