"""A seeded, deterministic generator of a dataset in the raw Yambda layout.

The files it writes look like a Yambda download to the rest of the project
(same paths, same schemas, sparse raw ids), and every listen is drawn from a
known next-listen distribution P(next | user, seed track, time). For the last
`oracle_days` days (the validation and test days of the evaluation, and the
gap before the validation window) it also writes, per listen, the exact rank
of the listened item under that distribution (the "oracle") and under the
next-POSITIVE-listen distribution (the "positive oracle").

Why two oracles. The evaluation's targets are not next listens but next
positive listens: played at least LISTEN_PLUS_RATIO percent (Yambda's
Listen+) and not disliked. Here the played ratio depends on the user's
affinity to the track, so positivity is informative: a model of the
evaluated target should rank a track the user will likely play through above
an equally likely listen they will likely skip. The listen oracle ignores
that, so it is not a ceiling for the evaluated metric; the positive oracle
is. Given the state before a listen, P(it is item i | it is positive) is
proportional to P(next listen = i) * P(positive | user, i), and P(positive |
user, i) = positive_prob(affinity(user, i)) = (1 - p_skip) * (p_full +
(1 - p_full) * 50/69): not skipped, then played through (or replayed), or
played partly with a uniform ratio in 31..99, 50 of whose 69 values reach 50
(dislikes only follow skips, so a listen that reaches it is positive). The
sampler draws ratios from the same `_ratio_probs` and `_affinity`. The
positive oracle's rank is exact (ties broken pessimistically by raw item id,
as for the listen oracle); its probability is to float32 precision. Its rank
is written for every listen (only positive listens are targets). For the
`large` size (1M items) it is computed for a seeded sample of users only,
about `positive_oracle_sample` (20K) listens in all, -1 (probability NaN)
elsewhere: the rank needs P(positive) of every released item for each user
(explore gives every item listen probability, and each has its own
P(positive)), about 70 ms per user at 1M items, so ranking all ~500K oracle
listens (~30K users) would add the better part of an hour.

The generative model, per user and listen:
  * Catalogue: genres -> artists (latent taste vectors) -> albums -> tracks,
    with audio embeddings that are a noisy projection of the track latent.
    Popularity is long-tailed and drifts: each album has a release day (some
    within the timeline) and each track a freshness that decays after release.
  * Next listen = a per-user mixture of eight components:
      album      the next track of the seed's album,
      artist     a track of the seed's artist (by current popularity),
      neighbour  a track of an artist similar to the seed's artist,
      fav_track  one of the user's favourite tracks,
      fav_artist a track of one of the user's favourite artists,
      repeat     a uniform pick from the user's last `repeat_window` listens,
      trending   one of the `trend_k` most popular tracks of the period,
      explore    any released track, uniformly (autoplay discovery): noise.
    The first listen of a session ignores the seed (no album/artist/neighbour).
  * The played ratio depends on the user's affinity to the track: tracks far
    from their taste (most explore listens) are skipped or played partly,
    tracks close to it are played through, replayed and liked. So the ratio
    (the example weight) tells signal from noise, as it should for weights
    to matter; and the strong popularity drift (short freshness, many
    releases) is what example age is for.

Usage:
  python -m data_prep.generate --size=demo --output_dir=/tmp/gen_demo [--seed=0]
"""

import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import yambda

DAY = 86400

# Mixture components, in this order everywhere.
COMPONENTS = ("album", "artist", "neighbour", "fav_track", "fav_artist",
              "repeat", "trending", "explore")
(ALBUM, ARTIST, NEIGHBOUR, FAV_TRACK, FAV_ARTIST, REPEAT, TRENDING,
 EXPLORE) = range(len(COMPONENTS))
# Mean mixture weights; each user's weights are a Dirichlet draw around them.
_BASE_MIX = np.array([0.14, 0.13, 0.16, 0.09, 0.13, 0.10, 0.13, 0.12])
_MIX_CONCENTRATION = 12.0
# Recommendation surfaces (neighbour, trending, explore) are mostly
# non-organic.
_ORGANIC_PROB = np.array([0.92, 0.85, 0.15, 0.9, 0.8, 0.9, 0.1, 0.05])

_FRESH_FLOOR = 0.05      # freshness of an old track, relative to 1 at release
_NEW_ALBUM_SHARE = 0.4   # albums released within the timeline
_LIFETIME_DIVISOR = 10.0  # mean freshness lifetime = days / this
# Affinity at which half of the listens that are not skipped are played
# through, and how sharply the share rises around it.
_RATIO_MIDPOINT = 0.35
_RATIO_SLOPE = 10.0
# Played ratios (percent) the sampler draws: [lo, hi) ranges.
_SKIP_RATIOS = (1, 31)
_PARTIAL_RATIOS = (31, 100)
_FULL_RATIO = 100
_REPLAY_RATIOS = (101, 301)
# Listen+ (prep's default --min_played_ratio): a listen played at least this
# percent is a positive, unless disliked; dislikes only follow skips here.
LISTEN_PLUS_RATIO = 50
# Affinity bonuses of the user's favourite tracks and favourite artists.
_FAV_TRACK_BONUS = 0.3
_FAV_ARTIST_BONUS = 0.15
_FAV_ARTIST_SLOTS = 8
_FAV_TRACK_SLOTS = 16
_UID_RANGE = 1_000_000
_ITEM_RANGE = 9_390_000
_MAX_REJECTION_ROUNDS = 64


@dataclasses.dataclass(frozen=True)
class SizeParams:
  """Parameters of one dataset size."""
  n_users: int
  n_items: int
  days: int
  events_per_user: float        # mean listens per user
  n_genres: int = 24
  tracks_per_album: float = 8.0
  albums_per_artist: float = 2.0
  latent_dim: int = 16
  embed_dim: int = 128
  period_days: int = 1          # popularity is constant within a period
  trend_k: int = 300            # size of the trending component's support
  n_neighbours: int = 10        # similar artists per artist
  repeat_window: int = 20
  session_mean: float = 12.0    # mean listens per session
  max_events_factor: float = 4.0
  # The oracle covers the validation and test days (and the gap before the
  # validation window, which starts 3600 s before end - 2 days).
  oracle_days: int = 3
  chunk_users: int = 4096       # users simulated (and written) together
  # 0: the positive oracle ranks every oracle listen. Otherwise at most this
  # many: every oracle listen of a seeded sample of users, each chunk its
  # share; the others get -1. See the module docstring.
  positive_oracle_sample: int = 0


SIZES: Dict[str, SizeParams] = {
    "tiny": SizeParams(n_users=400, n_items=3000, days=20,
                       events_per_user=110, n_genres=8, trend_k=100,
                       chunk_users=400),
    "demo": SizeParams(n_users=4000, n_items=35000, days=60,
                       events_per_user=420, n_genres=24, trend_k=300,
                       chunk_users=4000),
    "large": SizeParams(n_users=100_000, n_items=1_000_000, days=300,
                        events_per_user=480, n_genres=40, period_days=3,
                        trend_k=1000, chunk_users=8192,
                        positive_oracle_sample=20_000),
}


def oracle_path(root: str, size: str) -> str:
  return os.path.join(root, "generator", size, "oracle.parquet")


def params_path(root: str, size: str) -> str:
  return os.path.join(root, "generator", size, "params.json")


ORACLE_SCHEMA = pa.schema([
    ("uid", pa.uint32()),
    ("timestamp", pa.uint32()),
    ("item_id", pa.uint32()),
    ("oracle_rank", pa.int32()),
    ("oracle_prob", pa.float32()),
    # The mixture component the listen was drawn from (one of COMPONENTS).
    ("component", pa.dictionary(pa.int8(), pa.string())),
    # The same under the next-POSITIVE-listen distribution, the one of the
    # evaluated targets (-1 where not computed: see the module docstring).
    ("positive_oracle_rank", pa.int32()),
    ("positive_oracle_prob", pa.float32()),
])


def oracle_recall(oracle_ranks: np.ndarray,
                  ks: Sequence[int] = (10, 100, 500)) -> Dict[str, float]:
  """Recall@k of the oracle: the share of targets ranked within the top k."""
  ranks = np.asarray(oracle_ranks)
  if ranks.size == 0:
    return {f"recall@{k}": float("nan") for k in ks}
  return {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}


# ----------------------------------------------------------------------------
# Catalogue
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Catalogue:
  """Items in structure order: artists contiguous, then albums, then tracks."""
  item_ids: np.ndarray        # raw id per item, uint32
  artist: np.ndarray          # primary artist index per item
  album: np.ndarray           # album index per item
  next_in_album: np.ndarray   # item index of the next track, or -1
  latent: np.ndarray          # (n_items, d) float32
  length: np.ndarray          # seconds, int64
  base: np.ndarray            # static popularity, float64
  release: np.ndarray         # release day (album's), may be negative
  release_period: np.ndarray  # period of release
  lifetime: np.ndarray        # days of the freshness decay
  cum_base: np.ndarray        # inclusive cumsum of base, structure order
  art_start: np.ndarray
  art_end: np.ndarray
  art_cum0: np.ndarray        # cum_base before the artist's first item
  art_sum: np.ndarray
  artist_ids: np.ndarray      # raw artist ids
  artist_latent: np.ndarray
  artist_genre: np.ndarray
  artist_pop: np.ndarray
  album_ids: np.ndarray       # raw album ids
  neighbours: np.ndarray      # (n_artists, K) similar artists
  neighbour_w: np.ndarray     # (n_artists, K) their weights, rows sum to 1
  genre_pop: np.ndarray

  @property
  def n_items(self) -> int:
    return len(self.item_ids)

  @property
  def n_artists(self) -> int:
    return len(self.artist_ids)


def _album_sizes(rng: np.random.Generator, n_items: int,
                 tracks_per_album: float) -> np.ndarray:
  """Album sizes summing exactly to n_items; about a fifth are singles."""
  est = int(n_items / tracks_per_album * 1.5) + 16
  sizes = 1 + rng.poisson(tracks_per_album, est)
  sizes[rng.random(est) < 0.2] = 1
  cs = np.cumsum(sizes)
  while cs[-1] < n_items:  # Never in practice; keeps the cut below valid.
    sizes = np.concatenate([sizes, sizes])
    cs = np.cumsum(sizes)
  n_albums = int(np.searchsorted(cs, n_items)) + 1
  sizes = sizes[:n_albums].copy()
  sizes[-1] -= cs[n_albums - 1] - n_items
  return sizes


def _sparse_ids(rng: np.random.Generator, n: int, id_range: int) -> np.ndarray:
  """n distinct random raw ids in [0, id_range), in random order."""
  id_range = max(id_range, 4 * n)
  return rng.choice(id_range, n, replace=False).astype(np.uint32)


def _artist_neighbours(latent: np.ndarray, genre: np.ndarray,
                       k: int) -> Tuple[np.ndarray, np.ndarray]:
  """Top-k most similar artists (cosine), searched within the genre."""
  n = len(latent)
  unit = latent / np.linalg.norm(latent, axis=1, keepdims=True)
  nb = np.zeros((n, k), np.int64)
  sims = np.zeros((n, k))
  for g in np.unique(genre):
    rows = np.nonzero(genre == g)[0]
    # Small genres (tiny size) search all artists so k neighbours exist.
    cand = rows if len(rows) > 2 * k else np.arange(n)
    for lo in range(0, len(rows), 1024):  # Blocks bound the memory.
      r = rows[lo:lo + 1024]
      s = unit[r] @ unit[cand].T
      s[cand[None, :] == r[:, None]] = -np.inf
      top = np.argpartition(-s, k - 1, axis=1)[:, :k]
      top_s = np.take_along_axis(s, top, 1)
      order = np.argsort(-top_s, axis=1, kind="stable")
      nb[r] = cand[np.take_along_axis(top, order, 1)]
      sims[r] = np.take_along_axis(top_s, order, 1)
  w = np.exp(4.0 * (sims - sims[:, :1]))
  return nb, w / w.sum(1, keepdims=True)


def _make_catalogue(rng: np.random.Generator, p: SizeParams) -> _Catalogue:
  """Genres, artists, albums and tracks with latents, lengths and popularity."""
  n, d = p.n_items, p.latent_dim
  sizes = _album_sizes(rng, n, p.tracks_per_album)
  n_albums = len(sizes)
  n_artists = max(2 * p.n_neighbours + 2,
                  int(n_albums / p.albums_per_artist))
  n_artists = min(n_artists, n_albums)

  genre_pop = 1.0 / (1.0 + np.arange(p.n_genres)) ** 0.8
  genre_pop /= genre_pop.sum()
  genre_center = rng.normal(0, 1, (p.n_genres, d))
  genre_len_shift = rng.normal(0, 0.2, p.n_genres)
  artist_genre = rng.choice(p.n_genres, n_artists, p=genre_pop)
  artist_latent = genre_center[artist_genre] + rng.normal(0, 0.7,
                                                          (n_artists, d))
  artist_pop = rng.lognormal(0, 1.2, n_artists)

  # Every artist gets one album; popular artists get the extra ones.
  extra = rng.choice(n_artists, n_albums - n_artists,
                     p=artist_pop / artist_pop.sum())
  album_artist = np.sort(np.concatenate([np.arange(n_artists), extra]))
  sizes = sizes[rng.permutation(n_albums)]
  album = np.repeat(np.arange(n_albums), sizes)
  artist = album_artist[album]
  album_start = np.cumsum(sizes) - sizes
  track_no = np.arange(n) - album_start[album]
  next_in_album = np.where(track_no + 1 < sizes[album], np.arange(n) + 1, -1)

  latent = (artist_latent[artist] +
            rng.normal(0, 0.35, (n, d))).astype(np.float32)
  log_len = (np.log(200.0) + genre_len_shift[artist_genre[artist]] +
             rng.normal(0, 0.3, n))
  length = np.clip(np.round(np.exp(log_len)), 30, 900).astype(np.int64)

  # Popularity within an artist: a lognormal per track and album, and album
  # openers are played more than closers.
  rel = (rng.lognormal(0, 1.0, n) * rng.lognormal(0, 0.6, n_albums)[album] /
         (1.0 + 0.15 * track_no))
  base = artist_pop[artist] * rel

  # Release days per album: most before the timeline, the rest during it.
  new = rng.random(n_albums) < _NEW_ALBUM_SHARE
  album_release = np.where(new, rng.uniform(0, p.days, n_albums),
                           -rng.uniform(0, 2 * p.days, n_albums))
  album_life = rng.lognormal(np.log(p.days / _LIFETIME_DIVISOR), 0.5,
                             n_albums)
  release = album_release[album]
  lifetime = album_life[album] * rng.lognormal(0, 0.3, n)
  release_period = np.floor(release / p.period_days).astype(np.int64)

  cum_base = np.cumsum(base)
  art_start = np.searchsorted(artist, np.arange(n_artists), "left")
  art_end = np.searchsorted(artist, np.arange(n_artists), "right")
  art_cum0 = np.where(art_start > 0, cum_base[art_start - 1], 0.0)
  art_sum = cum_base[art_end - 1] - art_cum0
  nb, nb_w = _artist_neighbours(artist_latent, artist_genre, p.n_neighbours)

  return _Catalogue(
      item_ids=_sparse_ids(rng, n, _ITEM_RANGE), artist=artist, album=album,
      next_in_album=next_in_album, latent=latent, length=length, base=base,
      release=release, release_period=release_period, lifetime=lifetime,
      cum_base=cum_base, art_start=art_start, art_end=art_end,
      art_cum0=art_cum0, art_sum=art_sum,
      artist_ids=_sparse_ids(rng, n_artists, 2_000_000),
      artist_latent=artist_latent, artist_genre=artist_genre,
      artist_pop=artist_pop,
      album_ids=_sparse_ids(rng, n_albums, 5_000_000),
      neighbours=nb, neighbour_w=nb_w, genre_pop=genre_pop)


def _freshness(cat: _Catalogue, items: np.ndarray, periods: np.ndarray,
               period_days: int) -> np.ndarray:
  """Popularity multiplier of items in periods: 0 before release, 1 -> floor.

  Sampling and the oracle both call this, so their numbers are identical.
  """
  mid = (periods + 0.5) * period_days
  age = np.maximum(mid - cat.release[items], 0.0)
  g = _FRESH_FLOOR + (1.0 - _FRESH_FLOOR) * np.exp(-age / cat.lifetime[items])
  return np.where(cat.release_period[items] <= periods, g, 0.0)


@dataclasses.dataclass
class _Timeline:
  """Per-period popularity tables."""
  z: np.ndarray            # (P, n_artists) sum of base * freshness
  gmax: np.ndarray         # (P, n_artists) max freshness (rejection bound)
  trend_items: np.ndarray  # (P, K) item indices
  trend_prob: np.ndarray   # (P, K) their probabilities, rows sum to 1
  trend_flat_cdf: np.ndarray  # row p's cdf plus p, flattened (increasing)
  by_release: np.ndarray   # item indices ordered by release period
  n_released: np.ndarray   # (P,) items released by each period: a prefix


def _make_timeline(cat: _Catalogue, p: SizeParams) -> _Timeline:
  """Per-period artist normalisers and the trending top-k."""
  n_periods = -(-p.days // p.period_days)
  k = min(p.trend_k, cat.n_items)
  items = np.arange(cat.n_items)
  z = np.zeros((n_periods, cat.n_artists))
  gmax = np.zeros((n_periods, cat.n_artists))
  t_items = np.zeros((n_periods, k), np.int64)
  t_prob = np.zeros((n_periods, k))
  for per in range(n_periods):
    g = _freshness(cat, items, np.full(cat.n_items, per), p.period_days)
    w = cat.base * g
    z[per] = np.add.reduceat(w, cat.art_start)
    gmax[per] = np.maximum.reduceat(g, cat.art_start)
    top = np.argpartition(-w, k - 1)[:k]
    top = top[np.argsort(-w[top], kind="stable")]
    t_items[per] = top
    t_prob[per] = w[top] / w[top].sum()
  cdf = np.cumsum(t_prob, axis=1)
  cdf[:, -1] = 1.0
  flat = (cdf + np.arange(n_periods)[:, None]).ravel()
  by_release = np.argsort(cat.release_period, kind="stable")
  n_released = np.searchsorted(cat.release_period[by_release],
                               np.arange(n_periods), "right")
  return _Timeline(z=z, gmax=gmax, trend_items=t_items, trend_prob=t_prob,
                   trend_flat_cdf=flat, by_release=by_release,
                   n_released=n_released)


# ----------------------------------------------------------------------------
# Users
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Users:
  uids: np.ndarray         # sorted raw ids
  fav_artists: np.ndarray  # (n, FA) artist indices
  fa_w: np.ndarray         # (n, FA) slot weights (0 for unused slots)
  fav_tracks: np.ndarray   # (n, FT) item indices
  ft_w: np.ndarray         # (n, FT)
  vec: np.ndarray          # (n, d) taste vector, unit length
  mix: np.ndarray          # (n, len(COMPONENTS)) mixture weights
  start: np.ndarray        # first event time, seconds
  session_gap: np.ndarray  # mean gap between sessions, seconds
  max_events: np.ndarray


def _sample_artist_static(rng: np.random.Generator, cat: _Catalogue,
                          artists: np.ndarray) -> np.ndarray:
  """A track of each artist, proportional to its static popularity."""
  target = cat.art_cum0[artists] + rng.random(len(artists)) * cat.art_sum[
      artists]
  pos = np.searchsorted(cat.cum_base, target, "right")
  return np.clip(pos, cat.art_start[artists], cat.art_end[artists] - 1)


def _choose(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
  """One column per row, proportional to the row's non-negative weights."""
  c = np.cumsum(weights, axis=1)
  u = rng.random(len(weights)) * c[:, -1]
  idx = (c <= u[:, None]).sum(1)
  # Float rounding must never land on a zero-weight slot.
  last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
  return np.minimum(idx, last)


def _make_users(rng: np.random.Generator, cat: _Catalogue,
                p: SizeParams) -> _Users:
  """Taste (favourite artists and tracks), mixture, activity and start."""
  n = p.n_users
  uids = np.sort(_sparse_ids(rng, n, _UID_RANGE)).astype(np.uint32)

  # Favourite artists come from one to three genres, by artist popularity.
  by_genre = np.argsort(cat.artist_genre, kind="stable")
  g_cum = np.cumsum(cat.artist_pop[by_genre] ** 0.8)
  g_start = np.searchsorted(cat.artist_genre[by_genre],
                            np.arange(len(cat.genre_pop)), "left")
  g_end = np.searchsorted(cat.artist_genre[by_genre],
                          np.arange(len(cat.genre_pop)), "right")
  user_genres = rng.choice(len(cat.genre_pop), (n, 3), p=cat.genre_pop)
  n_genres = 1 + rng.binomial(2, 0.3, n)
  slot_genre = user_genres[np.arange(n)[:, None],
                           rng.integers(0, n_genres[:, None],
                                        (n, _FAV_ARTIST_SLOTS))]
  lo = np.where(g_start > 0, g_cum[np.maximum(g_start - 1, 0)], 0.0)
  hi = g_cum[np.maximum(g_end - 1, 0)]
  t = lo[slot_genre] + rng.random(slot_genre.shape) * (hi - lo)[slot_genre]
  pos = np.clip(np.searchsorted(g_cum, t, "right"), g_start[slot_genre],
                g_end[slot_genre] - 1)
  fav_artists = by_genre[pos]
  n_fa = rng.integers(3, _FAV_ARTIST_SLOTS + 1, n)
  fa_w = rng.gamma(0.8, 1.0, (n, _FAV_ARTIST_SLOTS)) * (
      np.arange(_FAV_ARTIST_SLOTS) < n_fa[:, None])
  fa_w = np.maximum(fa_w, 1e-3 * (fa_w > 0))
  fa_w /= fa_w.sum(1, keepdims=True)

  slot = _choose(rng, np.repeat(fa_w, _FAV_TRACK_SLOTS, axis=0))
  fav_tracks = _sample_artist_static(
      rng, cat, fav_artists[np.repeat(np.arange(n), _FAV_TRACK_SLOTS),
                            slot]).reshape(n, _FAV_TRACK_SLOTS)
  n_ft = rng.integers(4, _FAV_TRACK_SLOTS + 1, n)
  ft_w = rng.gamma(1.0, 1.0, (n, _FAV_TRACK_SLOTS)) * (
      np.arange(_FAV_TRACK_SLOTS) < n_ft[:, None])
  ft_w = np.maximum(ft_w, 1e-3 * (ft_w > 0))
  ft_w /= ft_w.sum(1, keepdims=True)

  vec = (np.einsum("na,nad->nd", fa_w, cat.artist_latent[fav_artists]) +
         rng.normal(0, 0.3, (n, p.latent_dim)))
  vec /= np.linalg.norm(vec, axis=1, keepdims=True)
  mix = rng.dirichlet(_MIX_CONCENTRATION * _BASE_MIX, n)

  end = p.days * DAY
  target = np.clip(p.events_per_user * rng.lognormal(-0.32, 0.8, n), 10,
                   p.max_events_factor * p.events_per_user)
  start = np.where(rng.random(n) < 0.6, 0.0,
                   rng.uniform(0, 0.4 * end, n)).astype(np.int64)
  n_sessions = np.maximum(target / p.session_mean, 1.0)
  session_gap = (end - start) / n_sessions
  max_events = np.ceil(2 * target).astype(np.int64)
  return _Users(uids=uids, fav_artists=fav_artists, fa_w=fa_w,
                fav_tracks=fav_tracks, ft_w=ft_w, vec=vec, mix=mix,
                start=start, session_gap=session_gap, max_events=max_events)


# ----------------------------------------------------------------------------
# The next-listen distribution: slot weights shared by sampling and oracle
# ----------------------------------------------------------------------------


def _neighbour_weights(cat: _Catalogue, tl: _Timeline, seeds: np.ndarray,
                       per: np.ndarray) -> np.ndarray:
  """(m, K) weights of the seed artist's neighbours that have released music."""
  nb = cat.neighbours[cat.artist[seeds]]
  return cat.neighbour_w[cat.artist[seeds]] * (tl.z[per[:, None], nb] > 0)


def _fav_artist_weights(users: _Users, tl: _Timeline, u: np.ndarray,
                        per: np.ndarray) -> np.ndarray:
  return users.fa_w[u] * (tl.z[per[:, None], users.fav_artists[u]] > 0)


def _fav_track_weights(cat: _Catalogue, users: _Users, u: np.ndarray,
                       per: np.ndarray) -> np.ndarray:
  return users.ft_w[u] * (
      cat.release_period[users.fav_tracks[u]] <= per[:, None])


def _mixture(cat: _Catalogue, tl: _Timeline, users: _Users, u: np.ndarray,
             seeds: np.ndarray, per: np.ndarray, first: np.ndarray,
             hist_len: np.ndarray) -> np.ndarray:
  """(m, len(COMPONENTS)) normalised component weights, zero where a
  component is empty."""
  has_seed = (seeds >= 0) & ~first
  s = np.maximum(seeds, 0)
  avail = np.ones((len(u), len(COMPONENTS)), bool)
  avail[:, ALBUM] = has_seed & (cat.next_in_album[s] >= 0)
  avail[:, ARTIST] = has_seed
  avail[:, NEIGHBOUR] = has_seed & (
      _neighbour_weights(cat, tl, s, per).sum(1) > 0)
  avail[:, FAV_TRACK] = _fav_track_weights(cat, users, u, per).sum(1) > 0
  avail[:, FAV_ARTIST] = _fav_artist_weights(users, tl, u, per).sum(1) > 0
  avail[:, REPEAT] = hist_len > 0
  avail[:, EXPLORE] = tl.n_released[per] > 0
  w = users.mix[u] * avail
  return w / w.sum(1, keepdims=True)


def _sample_artist_track(rng: np.random.Generator, cat: _Catalogue,
                         tl: _Timeline, artists: np.ndarray, per: np.ndarray,
                         period_days: int) -> np.ndarray:
  """A track of each artist, proportional to base * freshness in the period.

  Rejection sampling from the static popularity: propose by base, accept with
  freshness / max freshness of the artist. The few that are still rejected
  after many rounds are drawn exactly, which keeps the distribution exact.
  """
  out = np.full(len(artists), -1, np.int64)
  pending = np.arange(len(artists))
  for _ in range(_MAX_REJECTION_ROUNDS):
    if not len(pending):
      return out
    a, pp = artists[pending], per[pending]
    cand = _sample_artist_static(rng, cat, a)
    g = _freshness(cat, cand, pp, period_days)
    ok = rng.random(len(pending)) * tl.gmax[pp, a] < g
    out[pending[ok]] = cand[ok]
    pending = pending[~ok]
  for i in pending:
    items = np.arange(cat.art_start[artists[i]], cat.art_end[artists[i]])
    w = cat.base[items] * _freshness(cat, items, np.full(len(items), per[i]),
                                     period_days)
    out[i] = items[min(np.searchsorted(np.cumsum(w), rng.random() * w.sum(),
                                       "right"), len(items) - 1)]
  return out


def _sample_next(rng: np.random.Generator, cat: _Catalogue, tl: _Timeline,
                 users: _Users, p: SizeParams, u: np.ndarray,
                 seeds: np.ndarray, per: np.ndarray, mix: np.ndarray,
                 hist: np.ndarray, hist_len: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Draws each user's next item; returns (items, component)."""
  m = len(u)
  comp = _choose(rng, mix)
  item = np.full(m, -1, np.int64)
  s = np.maximum(seeds, 0)

  i = np.nonzero(comp == ALBUM)[0]
  item[i] = cat.next_in_album[s[i]]

  i = np.nonzero(comp == ARTIST)[0]
  item[i] = _sample_artist_track(rng, cat, tl, cat.artist[s[i]], per[i],
                                 p.period_days)

  i = np.nonzero(comp == NEIGHBOUR)[0]
  if len(i):
    slot = _choose(rng, _neighbour_weights(cat, tl, s[i], per[i]))
    art = cat.neighbours[cat.artist[s[i]], slot]
    item[i] = _sample_artist_track(rng, cat, tl, art, per[i], p.period_days)

  i = np.nonzero(comp == FAV_TRACK)[0]
  if len(i):
    slot = _choose(rng, _fav_track_weights(cat, users, u[i], per[i]))
    item[i] = users.fav_tracks[u[i], slot]

  i = np.nonzero(comp == FAV_ARTIST)[0]
  if len(i):
    slot = _choose(rng, _fav_artist_weights(users, tl, u[i], per[i]))
    art = users.fav_artists[u[i], slot]
    item[i] = _sample_artist_track(rng, cat, tl, art, per[i], p.period_days)

  i = np.nonzero(comp == REPEAT)[0]
  if len(i):
    slot = np.minimum((rng.random(len(i)) * hist_len[i]).astype(np.int64),
                      hist_len[i] - 1)
    item[i] = hist[i, slot]

  i = np.nonzero(comp == TRENDING)[0]
  if len(i):
    k = tl.trend_items.shape[1]
    pos = np.searchsorted(tl.trend_flat_cdf, per[i] + rng.random(len(i)),
                          "right")
    pos = np.clip(pos, per[i] * k, per[i] * k + k - 1)
    item[i] = tl.trend_items.ravel()[pos]

  i = np.nonzero(comp == EXPLORE)[0]
  if len(i):
    n = tl.n_released[per[i]]
    item[i] = tl.by_release[np.minimum(
        (rng.random(len(i)) * n).astype(np.int64), n - 1)]
  return item, comp


# ----------------------------------------------------------------------------
# Oracle: the exact rank of the listened item under the true distribution
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Snapshots:
  """What the oracle needs about each listen in the oracle window."""
  user: np.ndarray
  ts: np.ndarray
  target: np.ndarray
  seed: np.ndarray
  per: np.ndarray
  mix: np.ndarray
  hist: np.ndarray
  hist_len: np.ndarray
  comp: np.ndarray     # the component the target was drawn from
  ratio: np.ndarray    # the target listen's played ratio (its positivity)


def _artist_items(cat: _Catalogue, art: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """(index into art, item) for every track of each artist."""
  start = cat.art_start[art]
  ln = cat.art_end[art] - start
  rep = np.repeat(np.arange(len(art)), ln)
  offs = np.arange(ln.sum()) - np.repeat(np.cumsum(ln) - ln, ln)
  return rep, start[rep] + offs


def _expand_artists(cat: _Catalogue, tl: _Timeline, ev: np.ndarray,
                    art: np.ndarray, w: np.ndarray, per: np.ndarray,
                    period_days: int):
  """(event, item, prob) for every track of each (event, artist, weight)."""
  rep, items = _artist_items(cat, art)
  pr = per[rep]
  prob = (w[rep] * cat.base[items] * _freshness(cat, items, pr, period_days) /
          tl.z[pr, art[rep]])
  return ev[rep], items, prob


def _slot_entries(ev: np.ndarray, slots: np.ndarray, w: np.ndarray):
  """Flattens (m, S) slot values and weights; drops zero weights."""
  e = np.repeat(ev, slots.shape[1])
  keep = w.ravel() > 0
  return e[keep], slots.ravel()[keep], w.ravel()[keep]


def _oracle_batch(cat: _Catalogue, tl: _Timeline, users: _Users,
                  p: SizeParams, sn: _Snapshots, lo: int, hi: int,
                  released_ids: Dict[int, np.ndarray],
                  positive: np.ndarray = None, dense=None
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Ranks and probabilities of the targets of snapshots [lo, hi) (sorted by
  user), then those of the positive oracle where `positive` is set (rank -1
  and probability NaN elsewhere; `dense`: `_dense_context`).

  `released_ids`: per period of the snapshots, the sorted raw ids of the
  items released by then (see `_released_ids`).
  """
  m = hi - lo
  ev = np.arange(m)
  u, s, per = sn.user[lo:hi], np.maximum(sn.seed[lo:hi], 0), sn.per[lo:hi]
  mix = sn.mix[lo:hi]
  parts = []

  parts.append((ev, cat.next_in_album[s], mix[:, ALBUM]))
  parts.append(_expand_artists(cat, tl, ev, cat.artist[s], mix[:, ARTIST],
                               per, p.period_days))
  nw = _neighbour_weights(cat, tl, s, per)
  nw = nw / np.maximum(nw.sum(1, keepdims=True), 1e-300) * mix[:, [NEIGHBOUR]]
  e, art, w = _slot_entries(ev, cat.neighbours[cat.artist[s]], nw)
  parts.append(_expand_artists(cat, tl, e, art, w, per[e], p.period_days))
  fw = _fav_track_weights(cat, users, u, per)
  fw = fw / np.maximum(fw.sum(1, keepdims=True), 1e-300) * mix[:, [FAV_TRACK]]
  parts.append(_slot_entries(ev, users.fav_tracks[u], fw))
  aw = _fav_artist_weights(users, tl, u, per)
  aw = aw / np.maximum(aw.sum(1, keepdims=True), 1e-300) * mix[:, [FAV_ARTIST]]
  e, art, w = _slot_entries(ev, users.fav_artists[u], aw)
  parts.append(_expand_artists(cat, tl, e, art, w, per[e], p.period_days))
  hl = sn.hist_len[lo:hi]
  rw = (np.arange(p.repeat_window)[None, :] < hl[:, None]) * (
      mix[:, [REPEAT]] / np.maximum(hl, 1)[:, None])
  parts.append(_slot_entries(ev, sn.hist[lo:hi], rw))
  parts.append(_slot_entries(ev, tl.trend_items[per],
                             tl.trend_prob[per] * mix[:, [TRENDING]]))

  e = np.concatenate([x[0] for x in parts])
  it = np.concatenate([x[1] for x in parts])
  w = np.concatenate([x[2] for x in parts])
  keep = w > 0
  key = e[keep].astype(np.int64) * cat.n_items + it[keep]
  uniq, inv = np.unique(key, return_inverse=True)
  ue, ui = uniq // cat.n_items, uniq % cat.n_items
  # Explore gives every released item the same probability: added to the
  # listed items here, and counted for all the others below.
  n_rel = tl.n_released[per]
  explore = mix[:, EXPLORE] / np.maximum(n_rel, 1)
  released = cat.release_period[ui] <= per[ue]
  prob = np.bincount(inv, weights=w[keep]) + np.where(released,
                                                      explore[ue], 0.0)
  tgt = sn.target[lo:hi]
  tgt_key = ev * cat.n_items + tgt
  pos = np.minimum(np.searchsorted(uniq, tgt_key), len(uniq) - 1)
  listed = uniq[pos] == tgt_key
  pt = np.where(listed, prob[pos], explore)
  if np.any(pt <= 0):
    raise AssertionError("oracle: a listened item has probability 0")
  # Ties are broken pessimistically by raw item id (a fixed item order).
  tgt_id = cat.item_ids[tgt]
  smaller = cat.item_ids[ui] < tgt_id[ue]
  better = (prob > pt[ue]) | ((prob == pt[ue]) & smaller)
  rank = 1 + np.bincount(ue, weights=better, minlength=m).astype(np.int64)
  # A target with explore probability only ties with every unlisted released
  # item (listed ones have more); those with a smaller raw id rank ahead.
  tie = np.nonzero(~listed)[0]
  if len(tie):
    listed_smaller = np.bincount(ue, weights=released & smaller, minlength=m)
    smaller_released = np.zeros(len(tie), np.int64)
    for q, ids in released_ids.items():
      rows = per[tie] == q
      smaller_released[rows] = np.searchsorted(ids, tgt_id[tie][rows], "left")
    rank[tie] += smaller_released - listed_smaller[tie].astype(np.int64)
  pos_rank = np.full(m, -1, np.int64)
  pos_prob = np.full(m, np.nan)
  if positive is not None and positive.any():
    rows = np.nonzero(positive)[0]
    pos_rank[rows], pos_prob[rows] = _positive_batch(
        cat, tl, users, sn, lo, rows, ue, ui, prob, explore, pt, dense)
  return rank, pt, pos_rank, pos_prob


# The positive oracle. P(next positive listen = i | state) is proportional to
# P(next listen = i | state) * positive_prob(affinity(u, i)), the item's
# score. Every released item that no component lists has listen probability
# explore, so its score explore * positive_prob(affinity) differs per item:
# the rank needs, per snapshot, the count of released items whose score
# beats the target's. Per block of users, one float32 product of their taste
# vectors with every released latent (plus the favourite bonuses) gives
# positive_prob of every released item to within _FILTER (relative): enough
# to count the items that surely beat the target or surely do not, and for
# the normaliser (explore * the row's sum, plus the listed items' extra).
# The few within _FILTER of the target's score are decided by the exact
# float64 score, from `_affinity` and `positive_prob` as the sampler computes
# them; the listed items are counted by their own score, not the unlisted
# one.
_DENSE_ELEMENTS = 1 << 18  # (users x released items) per dense block
# Relative. A bulk (float32) positive_prob is off by less than 2e-5: its
# taste by <= 1.3e-6 (16 products of unit vectors' components), times a slope
# <= 1.8, plus float32 rounding, over positive_prob >= 0.18. (Seen: 4e-7.)
_FILTER = 1e-4


def _beats(score: np.ndarray, target_score: np.ndarray,
           smaller: np.ndarray) -> np.ndarray:
  """Whether items of these scores rank ahead of targets of these scores
  (ties: the smaller raw id first)."""
  return (score > target_score) | ((score == target_score) & smaller)


def _exact_positive_prob(cat: _Catalogue, users: _Users, u: np.ndarray,
                         items: np.ndarray) -> np.ndarray:
  """P(positive) of each (user, item) listen, as the sampler computes it."""
  return positive_prob(_affinity(cat, users, u, items))


def _dense_context(cat: _Catalogue, tl: _Timeline, periods: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """(float32 unit latents of the items released by the last of `periods`,
  in release order, transposed (d, n); each item's column in that order)."""
  n_max = int(tl.n_released[periods].max()) if len(periods) else 0
  lat = cat.latent[tl.by_release[:n_max]]
  unit_t = np.ascontiguousarray(
      (lat.astype(np.float64) /
       np.linalg.norm(lat, axis=1).astype(np.float64)[:, None]).T
      ).astype(np.float32)
  col_of = np.empty(cat.n_items, np.int64)
  col_of[tl.by_release] = np.arange(cat.n_items)
  return unit_t, col_of


def _bonus_items(cat: _Catalogue, users: _Users, ub: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """(index into ub, item) for every item with a favourite bonus: the
  favourite tracks and the favourite artists' tracks, of every slot."""
  idx = np.arange(len(ub))
  n_ft, n_fa = users.fav_tracks.shape[1], users.fav_artists.shape[1]
  r, items = _artist_items(cat, users.fav_artists[ub].ravel())
  return (np.concatenate([np.repeat(idx, n_ft), np.repeat(idx, n_fa)[r]]),
          np.concatenate([users.fav_tracks[ub].ravel(), items]))


def _count_beats(cat: _Catalogue, users: _Users, u: np.ndarray,
                 se: np.ndarray, si: np.ndarray, factor: np.ndarray,
                 approx: np.ndarray, st: np.ndarray, tgt: np.ndarray,
                 k: int) -> np.ndarray:
  """Per row, how many of the entries (row se, item si, score factor *
  positive_prob, approximately `approx`) rank ahead of the row's target
  (exact score st; ties: the smaller raw id first). The target's own entry
  never does. Entries within _FILTER of st get the exact score."""
  # Candidates first: usually few entries score near or above the target.
  cand = np.nonzero(approx >= (st * (1 - _FILTER))[se])[0]
  cand = cand[si[cand] != tgt[se[cand]]]
  ce, ci, cf = se[cand], si[cand], factor[cand]
  beats = approx[cand] > st[ce] * (1 + _FILTER)
  near = np.nonzero(~beats)[0]
  exact = cf[near] * _exact_positive_prob(cat, users, u[ce[near]], ci[near])
  beats[near] = _beats(exact, st[ce[near]],
                       cat.item_ids[ci[near]] < cat.item_ids[tgt[ce[near]]])
  return np.bincount(ce[beats], minlength=k)


def _positive_batch(cat: _Catalogue, tl: _Timeline, users: _Users,
                    sn: _Snapshots, lo: int, rows: np.ndarray,
                    ue: np.ndarray, ui: np.ndarray, prob: np.ndarray,
                    explore: np.ndarray, pt: np.ndarray,
                    dense: Tuple[np.ndarray, np.ndarray]
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Positive-oracle ranks and probabilities of the snapshots lo + rows
  (sorted by user), from their batch's listed (row, item) pairs (ue, ui),
  sorted, with listen probabilities `prob` (explore included), the batch's
  `explore` probabilities, its targets' listen probabilities `pt` and
  `_dense_context`."""
  unit_t, col_of = dense
  k = len(rows)
  g = lo + rows
  u, per, tgt = sn.user[g], sn.per[g], sn.target[g]
  ex = explore[rows]
  n_rel = tl.n_released[per]

  # The entries: the listed items of the rows, sorted by (row, item). (An
  # unlisted target has the unlisted score, and never counts anyway.)
  if k == len(explore):
    se, si, lp = ue, ui, prob
  else:
    local = np.full(len(explore), -1, np.int64)
    local[rows] = np.arange(k)
    le = local[ue]
    keep = le >= 0
    se, si, lp = le[keep], ui[keep], prob[keep]
  col = col_of[si]  # listed items are released (listen probability > 0)
  row_start = np.searchsorted(se, np.arange(k + 1))
  # The targets' listen probabilities are those the listen oracle ranked.
  st = pt[rows] * _exact_positive_prob(cat, users, u, tgt)
  if np.any(st <= 0):
    raise AssertionError("positive oracle: a listened item has score 0")
  thr = st / ex  # unlisted items beat the target where their pp is above

  pj = np.zeros(len(si), np.float32)  # approximate pp of each entry's item
  plain_sum = np.zeros(k)        # approximate sum of pp over released items
  count = np.zeros(k, np.int64)  # unlisted-score items that beat the target
  tp = np.zeros(k, np.float32)   # approximate pp of the target
  near_rows, near_items = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  dense_row = np.zeros(k, bool)  # rows where some can
  user_list, row_user = np.unique(u, return_inverse=True)
  entry_user = row_user[se]
  vec = users.vec[user_list].astype(np.float32)
  ucuts = np.unique(n_rel)
  starts = np.r_[0, ucuts[:-1]]
  block = max(1, _DENSE_ELEMENTS // int(ucuts[-1]))
  unit_t = unit_t[:, :ucuts[-1]]
  for b in range(0, len(user_list), block):
    ub = user_list[b:b + block]
    ra, rb = np.searchsorted(row_user, [b, b + block])
    rr = np.arange(ra, rb)
    ru = row_user[rr] - b
    # Not a BLAS product: threaded BLAS on short rows crawls on a busy
    # machine.
    aff = np.einsum("bd,dn->bn", vec[b:b + block], unit_t)
    bi, items = _bonus_items(cat, users, ub)
    c = col_of[items]
    ok = c < aff.shape[1]
    bi, items, c = bi[ok], items[ok], c[ok]
    aff[bi, c] = _affinity(cat, users, ub[bi], items,
                           aff[bi, c].astype(np.float64))
    pp = positive_prob(aff)  # float32
    cut = np.searchsorted(ucuts, n_rel[rr])
    plain_sum[rr] = np.cumsum(
        np.add.reduceat(pp, starts, axis=1, dtype=np.float64), axis=1)[ru, cut]
    top = np.maximum.accumulate(np.maximum.reduceat(pp, starts, axis=1),
                                axis=1)[ru, cut]
    ea, eb = row_start[ra], row_start[rb]
    pj[ea:eb] = np.take(pp, (entry_user[ea:eb] - b) * pp.shape[1] +
                        col[ea:eb])
    tp[rr] = pp[ru, col_of[tgt[rr]]]
    dense_row[rr] = thr[rr] <= top * (1 + _FILTER)
    # Row by row: a 1-d count is much faster than a 2-d one along rows.
    for r in rr[dense_row[rr]]:
      a = pp[row_user[r] - b, :n_rel[r]]
      hi_t = np.float32(thr[r] * (1 + _FILTER))
      lo_t = np.float32(thr[r] * (1 - _FILTER))
      count[r] = np.count_nonzero(a > hi_t)
      near = np.count_nonzero(a >= lo_t) - count[r]
      if tp[r] > hi_t:
        raise AssertionError("positive oracle: the target beats itself")
      if near > (tp[r] >= lo_t):  # Items near the target's score: below.
        items = tl.by_release[np.nonzero((a >= lo_t) & (a <= hi_t))[0]]
        near_items.append(items)
        near_rows.append(np.full(len(items), r))

  # Unlisted scores near the target's: the exact comparison.
  rf, items = np.concatenate(near_rows), np.concatenate(near_items)
  other = items != tgt[rf]
  rf, items = rf[other], items[other]
  exact = ex[rf] * _exact_positive_prob(cat, users, u[rf], items)
  count += np.bincount(rf[_beats(exact, st[rf], cat.item_ids[items] <
                                 cat.item_ids[tgt[rf]])], minlength=k)
  # The listed items count by their score, not by the unlisted one that the
  # dense count used (in dense rows only: elsewhere that beats nothing).
  score = lp * pj
  rank = 1 + count + _count_beats(cat, users, u, se, si, lp, score, st, tgt,
                                  k)
  d = np.nonzero(dense_row[se])[0]
  rank -= _count_beats(cat, users, u, se[d], si[d], ex[se[d]],
                       ex[se[d]] * pj[d], st, tgt, k)
  # Each row's sums over its entries (rows without any have none).
  score_sum, pj_sum = np.zeros(k), np.zeros(k)
  has = np.nonzero(row_start[:-1] < row_start[1:])[0]
  score_sum[has] = np.add.reduceat(score, row_start[has])
  pj_sum[has] = np.add.reduceat(pj, row_start[has], dtype=np.float64)
  norm = ex * (plain_sum - pj_sum) + score_sum
  return rank, st / norm


def _released_ids(cat: _Catalogue, tl: _Timeline,
                  periods: np.ndarray) -> Dict[int, np.ndarray]:
  """Per period, the sorted raw ids of the items released by then: explore
  ties are broken by raw id. Built once per chunk, for its few periods."""
  return {int(q): np.sort(cat.item_ids[tl.by_release[:tl.n_released[q]]])
          for q in np.unique(periods)}


def _positive_sample(rng: np.random.Generator, sn: _Snapshots,
                     quota: int) -> np.ndarray:
  """A seeded sample of snapshots for the positive oracle: every snapshot of
  randomly chosen users, at most `quota` in all (users, not single
  snapshots, because the dense pass costs per user)."""
  user_list, counts = np.unique(sn.user, return_counts=True)
  order = rng.permutation(len(user_list))
  chosen = user_list[order[np.cumsum(counts[order]) <= quota]]
  return np.isin(sn.user, chosen)


def _oracle(cat: _Catalogue, tl: _Timeline, users: _Users, p: SizeParams,
            sn: _Snapshots, positive: np.ndarray = None
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Oracle ranks and probabilities for all snapshots, then those of the
  positive oracle for the snapshots where `positive` is set (all when it is
  None; rank -1 and probability NaN elsewhere). In batches of snapshots
  sorted by user, so that a user's dense pass is shared."""
  n = len(sn.user)
  if positive is None:
    positive = np.ones(n, bool)
  order = np.argsort(sn.user, kind="stable")
  sn = _Snapshots(**{f.name: getattr(sn, f.name)[order]
                     for f in dataclasses.fields(_Snapshots)})
  positive = positive[order]
  dense = _dense_context(cat, tl, sn.per[positive])
  parts = [[np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0, np.int64)],
           [np.zeros(0)]]
  batch = 4096
  released_ids = _released_ids(cat, tl, sn.per)
  for lo in range(0, n, batch):
    res = _oracle_batch(cat, tl, users, p, sn, lo, min(n, lo + batch),
                        released_ids, positive[lo:lo + batch], dense)
    for part, x in zip(parts, res):
      part.append(x)
  out = []
  for part in parts:
    x = np.concatenate(part)
    x[order] = x.copy()
    out.append(x)
  return tuple(out)


# ----------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _ChunkEvents:
  """Events of a chunk of users, sorted by (uid, timestamp)."""
  user: np.ndarray     # chunk-local user index
  ts: np.ndarray
  item: np.ndarray
  organic: np.ndarray
  ratio: np.ndarray    # -1 for non-listens
  etype: np.ndarray    # index into yambda.EVENT_TYPES


def _taste(cat: _Catalogue, users: _Users, u: np.ndarray,
           item: np.ndarray) -> np.ndarray:
  """Cosine of the user's (unit) taste vector and the items' latents."""
  lat = cat.latent[item]
  return np.einsum("md,md->m", users.vec[u], lat) / np.linalg.norm(lat,
                                                                    axis=1)


def _affinity(cat: _Catalogue, users: _Users, u: np.ndarray,
              item: np.ndarray, taste: np.ndarray = None) -> np.ndarray:
  """The user's affinity to each item: the taste cosine (`_taste`, computed
  unless given) plus the bonuses of a favourite track and of a track of a
  favourite artist (every slot counts, weighted or not). The played ratio
  (and so positivity) depends on it."""
  affinity = (_taste(cat, users, u, item) if taste is None
              else taste.copy())
  affinity += _FAV_TRACK_BONUS * (users.fav_tracks[u] == item[:, None]).any(1)
  affinity += _FAV_ARTIST_BONUS * (users.fav_artists[u] ==
                                   cat.artist[item][:, None]).any(1)
  return affinity


def _ratio_probs(affinity: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(P(skip), P(played through, unless skipped)) at each affinity:
    p_skip = 0.04 + 0.7 / (1 + exp(6 (affinity - 0.25))),
    p_full = 1 / (1 + exp(-_RATIO_SLOPE (affinity - _RATIO_MIDPOINT))),
  computed in place (the positive oracle evaluates it on every item)."""
  a = np.asarray(affinity)
  if a.dtype != np.float32:  # float32 only for the positive oracle's bulk
    a = a.astype(np.float64, copy=False)
  p_skip = np.subtract(a, 0.25, out=np.empty(a.shape, a.dtype))
  p_skip *= 6.0
  np.exp(p_skip, out=p_skip)
  p_skip += 1.0
  np.divide(0.7, p_skip, out=p_skip)
  p_skip += 0.04
  p_full = np.subtract(a, _RATIO_MIDPOINT, out=np.empty(a.shape, a.dtype))
  p_full *= -_RATIO_SLOPE
  np.exp(p_full, out=p_full)
  p_full += 1.0
  np.divide(1.0, p_full, out=p_full)
  return p_skip, p_full


def positive_prob(affinity: np.ndarray) -> np.ndarray:
  """P(played ratio >= LISTEN_PLUS_RATIO | affinity) under `_played_ratio`:
  not skipped, and then played through (or replayed) or played partly with a
  uniform ratio that reaches the threshold. Increasing in the affinity (less
  skipping, more playing through). A listen that reaches it is never
  disliked (dislikes follow skips only), so this is P(positive)."""
  p_skip, p_full = _ratio_probs(affinity)
  lo, hi = _PARTIAL_RATIOS
  partial_positive = (hi - LISTEN_PLUS_RATIO) / (hi - lo)  # 50 of 69 values
  # (1 - p_skip) * (p_full + (1 - p_full) * partial_positive), in place.
  played = np.subtract(1.0, p_full, out=np.empty_like(p_full))
  played *= partial_positive
  played += p_full
  positive = np.subtract(1.0, p_skip, out=p_skip)
  positive *= played
  return positive


# positive_prob relies on skips never and full plays always reaching Listen+,
# and on partial plays straddling it.
assert _SKIP_RATIOS[1] <= _PARTIAL_RATIOS[0] <= LISTEN_PLUS_RATIO
assert LISTEN_PLUS_RATIO < _PARTIAL_RATIOS[1] <= _FULL_RATIO
assert _FULL_RATIO < _REPLAY_RATIOS[0]


def _played_ratio(rng: np.random.Generator, affinity: np.ndarray
                  ) -> np.ndarray:
  """Percent played, by affinity: the further from the user's taste, the more
  often skipped (< 31) or played partly (31-99); the closer, the more often
  played through (100) or replayed (101-300)."""
  m = len(affinity)
  p_skip, p_full = _ratio_probs(affinity)
  skip = rng.random(m) < p_skip
  full = rng.random(m) < p_full
  replay = full & (rng.random(m) < 0.3 * p_full)
  ratio = np.where(replay, rng.integers(*_REPLAY_RATIOS, m),
                   np.where(full, _FULL_RATIO,
                            rng.integers(*_PARTIAL_RATIOS, m)))
  return np.where(skip, rng.integers(*_SKIP_RATIOS, m), ratio)


def _listen_outcome(rng: np.random.Generator, cat: _Catalogue,
                    users: _Users, p: SizeParams, u: np.ndarray,
                    item: np.ndarray, comp: np.ndarray):
  """Organic flag, played ratio, like/dislike flags and the gap to the next
  listen, and whether the session ends after it.

  None of these feed back into the next-listen distribution, so the listen
  oracle does not need them; the positive oracle needs P(positive), which
  `positive_prob` derives from the same `_affinity` and `_ratio_probs`.
  """
  m = len(u)
  organic = rng.random(m) < _ORGANIC_PROB[comp]
  affinity = _affinity(cat, users, u, item)
  ratio = _played_ratio(rng, affinity)
  skip = ratio <= 30
  like = ~skip & (rng.random(m) < 0.25 * np.clip(affinity - 0.3, 0, 1))
  dislike = skip & (rng.random(m) < 0.1 * np.clip(0.6 - affinity, 0, 1))

  # Within a session the next listen starts when this one stops playing.
  played = np.maximum(1, (cat.length[item] * ratio) // 100)
  ends_session = rng.random(m) < 1.0 / p.session_mean
  pause = np.maximum(600, rng.exponential(users.session_gap[u])).astype(
      np.int64)
  gap = played + np.where(ends_session, pause, rng.integers(2, 12, m))
  return organic, ratio, like, dislike, gap, ends_session


def _simulate_chunk(rng: np.random.Generator, cat: _Catalogue, tl: _Timeline,
                    users: _Users, p: SizeParams, lo: int, hi: int
                    ) -> Tuple[_ChunkEvents, _Snapshots]:
  """Simulates users [lo, hi): one listen per active user per step."""
  n = hi - lo
  uidx = np.arange(lo, hi)
  end = p.days * DAY
  oracle_start = end - p.oracle_days * DAY
  period_sec = p.period_days * DAY
  H = p.repeat_window

  t = users.start[lo:hi] + rng.integers(0, 3600, n)
  seed = np.full(n, -1, np.int64)
  first = np.ones(n, bool)
  hist = np.zeros((n, H), np.int64)
  hist_pos = np.zeros(n, np.int64)
  hist_len = np.zeros(n, np.int64)
  done = np.zeros(n, np.int64)
  max_ev = users.max_events[lo:hi]

  out = {k: [] for k in ("user", "ts", "item", "organic", "ratio", "like",
                         "dislike", "gap")}
  snaps = {k: [] for k in ("user", "ts", "target", "seed", "per", "mix",
                           "hist", "hist_len", "comp", "ratio")}
  active = np.nonzero(t < end)[0]
  while len(active):
    a = active
    u = uidx[a]
    per = t[a] // period_sec
    mix = _mixture(cat, tl, users, u, seed[a], per, first[a], hist_len[a])
    item, comp = _sample_next(rng, cat, tl, users, p, u, seed[a], per, mix,
                              hist[a], hist_len[a])

    w = np.nonzero(t[a] >= oracle_start)[0]
    if len(w):
      for k, v in (("user", u[w]), ("ts", t[a][w]), ("target", item[w]),
                   ("seed", seed[a][w]), ("per", per[w]), ("mix", mix[w]),
                   ("hist", hist[a][w]), ("hist_len", hist_len[a][w]),
                   ("comp", comp[w])):
        snaps[k].append(v)

    organic, ratio, like, dislike, gap, ends_session = _listen_outcome(
        rng, cat, users, p, u, item, comp)
    if len(w):
      snaps["ratio"].append(ratio[w])
    for k, v in (("user", a), ("ts", t[a]), ("item", item),
                 ("organic", organic), ("ratio", ratio), ("like", like),
                 ("dislike", dislike), ("gap", gap)):
      out[k].append(v)

    hist[a, hist_pos[a]] = item
    hist_pos[a] = (hist_pos[a] + 1) % H
    hist_len[a] = np.minimum(hist_len[a] + 1, H)
    seed[a] = item
    first[a] = ends_session
    t[a] += gap
    done[a] += 1
    active = a[(t[a] < end) & (done[a] < max_ev[a])]

  cols = {k: np.concatenate(v) if v else np.zeros(0, np.int64)
          for k, v in out.items()}
  events = _assemble_events(rng, cols, end)
  if snaps["user"]:
    sn = _Snapshots(**{k: np.concatenate(v) for k, v in snaps.items()})
  else:
    shapes = {"mix": (0, len(COMPONENTS)), "hist": (0, H)}
    sn = _Snapshots(**{k: np.zeros(shapes.get(k, 0), np.int64)
                       for k in snaps})
  return events, sn


def _assemble_events(rng: np.random.Generator, out: Dict[str, np.ndarray],
                     end: int) -> _ChunkEvents:
  """Listens plus like/dislike/unlike/undislike rows, sorted by (user, ts)."""
  listen, like_t, dislike_t, unlike_t, undislike_t = range(5)
  assert yambda.EVENT_TYPES == ("listen", "like", "dislike", "unlike",
                                "undislike")
  user, ts, item = out["user"], out["ts"], out["item"]
  parts = [(user, ts, item, out["organic"], out["ratio"],
            np.full(len(user), listen))]
  for flag, code, undo_code, undo_p in (("like", like_t, unlike_t, 0.08),
                                        ("dislike", dislike_t, undislike_t,
                                         0.12)):
    i = np.nonzero(out[flag])[0]
    # Strictly between this listen and the next one of the user.
    r_ts = ts[i] + 1 + (rng.random(len(i)) * (out["gap"][i] - 1)).astype(
        np.int64)
    parts.append((user[i], r_ts, item[i], out["organic"][i],
                  np.full(len(i), -1), np.full(len(i), code)))
    j = rng.random(len(i)) < undo_p
    u_ts = r_ts[j] + 1 + rng.exponential(2 * DAY, j.sum()).astype(np.int64)
    parts.append((user[i][j], u_ts, item[i][j], out["organic"][i][j],
                  np.full(j.sum(), -1), np.full(j.sum(), undo_code)))
  cols = [np.concatenate([pt[c] for pt in parts]) for c in range(6)]
  keep = cols[1] < end
  cols = [c[keep] for c in cols]
  order = np.lexsort((cols[5], cols[1], cols[0]))
  cols = [c[order] for c in cols]
  return _ChunkEvents(user=cols[0], ts=cols[1], item=cols[2],
                      organic=cols[3], ratio=cols[4], etype=cols[5])


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _event_table(cat: _Catalogue, users: _Users, ev: _ChunkEvents,
                 lo: int) -> pa.Table:
  """A chunk of multi_event rows with the exact Yambda schema."""
  is_listen = ev.etype == 0
  codes = pa.array(ev.etype.astype(np.int8), pa.int8())
  etype = pa.DictionaryArray.from_arrays(codes, pa.array(yambda.EVENT_TYPES))
  return pa.Table.from_arrays([
      pa.array(users.uids[lo + ev.user], pa.uint32()),
      pa.array(ev.ts.astype(np.uint32), pa.uint32()),
      pa.array(cat.item_ids[ev.item], pa.uint32()),
      pa.array(ev.organic.astype(np.uint8), pa.uint8()),
      pa.array(np.where(is_listen, ev.ratio, 0).astype(np.uint16),
               pa.uint16(), mask=~is_listen),
      pa.array(np.where(is_listen, cat.length[ev.item], 0).astype(np.uint32),
               pa.uint32(), mask=~is_listen),
      etype,
  ], schema=yambda.MULTI_EVENT_SCHEMA)


class _AtomicWriter:
  """A ParquetWriter on a temporary name, renamed into place on close."""

  def __init__(self, path: str, schema: pa.Schema):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self.path, self.tmp = path, path + ".tmp"
    self.writer = pq.ParquetWriter(self.tmp, schema)

  def write(self, table: pa.Table) -> None:
    self.writer.write_table(table, row_group_size=1 << 20)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self.writer.close()
    if exc_type is None:
      os.replace(self.tmp, self.path)
    else:
      os.remove(self.tmp)
    return False


def _write_embeddings(rng: np.random.Generator, cat: _Catalogue,
                      p: SizeParams, root: str) -> None:
  """Audio embeddings for ~85% of items: a noisy projection of the latent."""
  proj = rng.normal(0, 1.0 / np.sqrt(p.latent_dim),
                    (p.latent_dim, p.embed_dim)).astype(np.float32)
  has = rng.random(cat.n_items) < 0.85
  order = np.argsort(cat.item_ids, kind="stable")
  order = order[has[order]]
  chunk = 65536
  with _AtomicWriter(yambda.embeddings_path(root),
                     yambda.EMBEDDINGS_SCHEMA) as w:
    for lo in range(0, len(order), chunk):
      idx = order[lo:lo + chunk]
      emb = cat.latent[idx] @ proj + rng.normal(
          0, 0.25, (len(idx), p.embed_dim)).astype(np.float32)
      norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
      offsets = pa.array(np.arange(len(idx) + 1, dtype=np.int32) *
                         p.embed_dim)

      def lists(x):
        return pa.ListArray.from_arrays(offsets, pa.array(
            x.astype(np.float32).ravel(), pa.float32()))

      w.write(pa.Table.from_arrays(
          [pa.array(cat.item_ids[idx], pa.uint32()), lists(emb), lists(norm)],
          schema=yambda.EMBEDDINGS_SCHEMA))


def _write_mappings(rng: np.random.Generator, cat: _Catalogue,
                    root: str) -> None:
  """Artist and album mappings: ~3% unmapped, ~5% with a second artist."""
  n = cat.n_items
  mapped = np.nonzero(rng.random(n) >= 0.03)[0]
  second = mapped[rng.random(len(mapped)) < 0.05]
  # A featured artist: another artist of the same genre when there is one.
  genre = cat.artist_genre[cat.artist[second]]
  other = rng.integers(0, cat.n_artists, len(second))
  for _ in range(8):
    bad = (cat.artist_genre[other] != genre) | (other == cat.artist[second])
    other[bad] = rng.integers(0, cat.n_artists, bad.sum())
  other = np.where(other == cat.artist[second],
                   (other + 1) % cat.n_artists, other)

  items = np.concatenate([mapped, second])
  artists = np.concatenate([cat.artist[mapped], other])
  order = np.lexsort((cat.artist_ids[artists], cat.item_ids[items]))
  yambda.write_atomic(pa.Table.from_arrays(
      [pa.array(cat.item_ids[items[order]], pa.uint32()),
       pa.array(cat.artist_ids[artists[order]], pa.uint32())],
      schema=yambda.ARTIST_MAPPING_SCHEMA), yambda.artist_mapping_path(root))
  order = mapped[np.argsort(cat.item_ids[mapped], kind="stable")]
  yambda.write_atomic(pa.Table.from_arrays(
      [pa.array(cat.item_ids[order], pa.uint32()),
       pa.array(cat.album_ids[cat.album[order]], pa.uint32())],
      schema=yambda.ALBUM_MAPPING_SCHEMA), yambda.album_mapping_path(root))


def _log(msg: str) -> None:
  print(f"[generate] {msg}", file=sys.stderr, flush=True)


def generate(output_dir: str, size: str = "demo", seed: int = 0) -> str:
  """Writes the dataset of the given size into output_dir and returns it."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {list(SIZES)}")
  p = SIZES[size]
  t0 = time.time()
  # Children by index: adding the last one left the others' streams as they
  # were.
  cat_rng, user_rng, sim_rng, emb_rng, map_rng, oracle_rng = (
      np.random.default_rng(seed).spawn(6))
  cat = _make_catalogue(cat_rng, p)
  tl = _make_timeline(cat, p)
  users = _make_users(user_rng, cat, p)
  _log(f"{size}: catalogue of {cat.n_items} items, {cat.n_artists} artists, "
       f"{p.n_users} users ({time.time() - t0:.1f}s)")
  _write_embeddings(emb_rng, cat, p, output_dir)
  _write_mappings(map_rng, cat, output_dir)

  end = p.days * DAY
  test_start = end - DAY
  pop_all = np.zeros(cat.n_items, np.int64)
  pop_week = np.zeros(cat.n_items, np.int64)
  oracle_tables = []
  n_rows = n_listens = 0
  with _AtomicWriter(yambda.multi_event_path(output_dir, size),
                     yambda.MULTI_EVENT_SCHEMA) as writer:
    for lo in range(0, p.n_users, p.chunk_users):
      hi = min(p.n_users, lo + p.chunk_users)
      ev, sn = _simulate_chunk(sim_rng, cat, tl, users, p, lo, hi)
      writer.write(_event_table(cat, users, ev, lo))
      listens = ev.etype == 0
      n_rows += len(ev.ts)
      n_listens += int(listens.sum())
      train = listens & (ev.ts < test_start)
      pop_all += np.bincount(ev.item[train], minlength=cat.n_items)
      recent = train & (ev.ts >= test_start - 7 * DAY)
      pop_week += np.bincount(ev.item[recent], minlength=cat.n_items)
      quota = (p.positive_oracle_sample * (hi - lo) // p.n_users
               if p.positive_oracle_sample else None)
      oracle_tables.append(_oracle_table(cat, tl, users, p, sn, oracle_rng,
                                         quota))
      _log(f"users {hi}/{p.n_users}: {n_rows} rows "
           f"({n_rows / (time.time() - t0):.0f} rows/s)")

  oracle = pa.concat_tables(oracle_tables)
  oracle = oracle.sort_by([("uid", "ascending"), ("timestamp", "ascending")])
  positive = np.asarray(oracle["positive"])
  oracle = oracle.drop(["positive"])
  yambda.write_atomic(oracle, oracle_path(output_dir, size))
  summary = _summary(cat, oracle, positive, pop_all, pop_week, test_start)
  summary.update(n_rows=n_rows, n_listens=n_listens, n_users=p.n_users,
                 n_items=cat.n_items, n_artists=cat.n_artists,
                 n_albums=len(cat.album_ids), timeline_seconds=end)
  _write_params(output_dir, size, seed, p, summary)
  _log(f"done in {time.time() - t0:.1f}s")
  print(json.dumps(summary), flush=True)
  return output_dir


def _oracle_table(cat: _Catalogue, tl: _Timeline, users: _Users,
                  p: SizeParams, sn: _Snapshots, rng: np.random.Generator,
                  quota: int = None) -> pa.Table:
  """The oracle rows of one chunk, plus a "positive" column (whether the
  listen is a positive) that is not written. The positive oracle covers
  every row, or a sample of at most `quota` of them."""
  sample = None if quota is None else _positive_sample(rng, sn, quota)
  rank, prob, pos_rank, pos_prob = _oracle(cat, tl, users, p, sn, sample)
  schema = ORACLE_SCHEMA.append(pa.field("positive", pa.bool_()))
  return pa.Table.from_arrays([
      pa.array(users.uids[sn.user], pa.uint32()),
      pa.array(sn.ts.astype(np.uint32), pa.uint32()),
      pa.array(cat.item_ids[sn.target], pa.uint32()),
      pa.array(rank.astype(np.int32), pa.int32()),
      pa.array(prob.astype(np.float32), pa.float32()),
      pa.DictionaryArray.from_arrays(
          pa.array(sn.comp.astype(np.int8), pa.int8()),
          pa.array(COMPONENTS)),
      pa.array(pos_rank.astype(np.int32), pa.int32()),
      pa.array(pos_prob.astype(np.float32), pa.float32()),
      pa.array(sn.ratio >= LISTEN_PLUS_RATIO, pa.bool_()),
  ], schema=schema)


def _summary(cat: _Catalogue, oracle: pa.Table, positive: np.ndarray,
             pop_all: np.ndarray, pop_week: np.ndarray,
             test_start: int) -> Dict[str, float]:
  """Oracle and most-popular recall over the listens of the last day, and
  the positive oracle's over its positive listens (where it has ranks)."""
  last = np.asarray(oracle["timestamp"]) >= test_start
  ranks = np.asarray(oracle["oracle_rank"])[last]
  out = {f"oracle_{k}": round(v, 4) for k, v in oracle_recall(ranks).items()}
  pos_ranks = np.asarray(oracle["positive_oracle_rank"])[last & positive]
  out.update({f"positive_oracle_{k}": round(v, 4) for k, v in
              oracle_recall(pos_ranks[pos_ranks > 0]).items()})
  out["n_test_positive_listens"] = int(np.sum(last & positive))
  by_id = np.argsort(cat.item_ids)
  test_items = by_id[np.searchsorted(cat.item_ids[by_id],
                                     np.asarray(oracle["item_id"])[last])]
  for name, counts in (("mostpop_all", pop_all), ("mostpop_7d", pop_week)):
    top = np.argsort(-counts, kind="stable")[:100]
    out[f"{name}_recall@100"] = round(float(np.isin(test_items, top).mean())
                                      if len(test_items) else float("nan"), 4)
  out["n_test_listens"] = int(last.sum())
  out["test_items_unseen_in_train"] = round(
      float((pop_all[test_items] == 0).mean()) if len(test_items) else 0.0, 4)
  return out


def _write_params(root: str, size: str, seed: int, p: SizeParams,
                  summary: Dict[str, float]) -> None:
  path = params_path(root, size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"size": size, "seed": seed, "params": dataclasses.asdict(p),
               "components": list(COMPONENTS), "summary": summary}, f,
              indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def main(argv: List[str]) -> None:
  del argv
  generate(FLAGS.output_dir, FLAGS.size, FLAGS.seed)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum("size", "demo", list(SIZES), "Dataset size.")
  flags.DEFINE_string("output_dir", None, "Where to write the dataset.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.mark_flag_as_required("output_dir")
  FLAGS = flags.FLAGS
  app.run(main)
