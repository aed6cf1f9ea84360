"""The next-listen distribution P(next | user, seed track, period, history).

A per-user mixture of the eight components of `components.py`:
  album      the next track of the seed's album,
  artist     a track of the seed's artist (by current popularity),
  neighbour  a track of an artist similar to the seed's artist,
  fav_track  one of the user's favourite tracks,
  fav_artist a track of one of the user's favourite artists,
  repeat     a uniform pick from the user's last `repeat_window` listens,
  trending   one of the `trend_k` most popular tracks of the period,
  explore    any released track, uniformly (autoplay discovery): noise.
The first listen of a session ignores the seed (no album/artist/neighbour).
"By popularity" means base popularity times freshness in the period.

`mixture` and the slot weights here are shared by the sampler
(`sample_next`) and the listen oracle, so both see the same distribution.
"""

from typing import Tuple

import numpy as np

from data_prep.generate import components
from data_prep.generate import sampling
from data_prep.generate import world as world_lib

# Beyond this many rounds of rejection sampling, the rest are drawn exactly.
_MAX_REJECTION_ROUNDS = 64


def neighbour_weights(world: world_lib.World, seeds: np.ndarray,
                      periods: np.ndarray) -> np.ndarray:
  """(m, K) weights of the seed artists' neighbours that have released
  music by the period (0 for the others); rows are not normalised."""
  catalogue = world.catalogue
  neighbours = catalogue.neighbours[catalogue.artist[seeds]]
  return catalogue.neighbour_weights[catalogue.artist[seeds]] * (
      world.timeline.artist_norm[periods[:, None], neighbours] > 0)


def fav_artist_weights(world: world_lib.World, user: np.ndarray,
                       periods: np.ndarray) -> np.ndarray:
  """(m, slots) weights of the users' favourite artists that have released
  music by the period (0 for the others); rows are not normalised."""
  users = world.users
  return users.fav_artist_weights[user] * (
      world.timeline.artist_norm[periods[:, None], users.fav_artists[user]]
      > 0)


def fav_track_weights(world: world_lib.World, user: np.ndarray,
                      periods: np.ndarray) -> np.ndarray:
  """(m, slots) weights of the users' favourite tracks released by the
  period (0 for the others); rows are not normalised."""
  users = world.users
  return users.fav_track_weights[user] * (
      world.catalogue.release_period[users.fav_tracks[user]] <=
      periods[:, None])


def mixture(world: world_lib.World, user: np.ndarray, seeds: np.ndarray,
            periods: np.ndarray, first: np.ndarray,
            history_len: np.ndarray) -> np.ndarray:
  """The component weights of each listen's state.

  Args:
    world: the world.
    user: user indices.
    seeds: the previous listen's item, or -1 before the first.
    periods: the listen's period.
    first: whether the listen starts a session (ignores the seed).
    history_len: how many items the repeat window holds.

  Returns:
    (m, len(COMPONENTS)) the users' mixture weights, zero where a component
    is empty, normalised.
  """
  has_seed = (seeds >= 0) & ~first
  s = np.maximum(seeds, 0)
  available = np.ones((len(user), len(components.COMPONENTS)), bool)
  available[:, components.ALBUM] = has_seed & (
      world.catalogue.next_in_album[s] >= 0)
  available[:, components.ARTIST] = has_seed
  available[:, components.NEIGHBOUR] = has_seed & (
      neighbour_weights(world, s, periods).sum(1) > 0)
  available[:, components.FAV_TRACK] = (
      fav_track_weights(world, user, periods).sum(1) > 0)
  available[:, components.FAV_ARTIST] = (
      fav_artist_weights(world, user, periods).sum(1) > 0)
  available[:, components.REPEAT] = history_len > 0
  available[:, components.EXPLORE] = world.timeline.n_released[periods] > 0
  w = world.users.mixture[user] * available
  return w / w.sum(1, keepdims=True)


def _sample_artist_track(rng: np.random.Generator, world: world_lib.World,
                         artists: np.ndarray,
                         periods: np.ndarray) -> np.ndarray:
  """A track of each artist, proportional to base * freshness in the period.

  Rejection sampling from the static popularity: propose by base, accept with
  freshness / max freshness of the artist. The few that are still rejected
  after many rounds are drawn exactly, which keeps the distribution exact.
  """
  catalogue, period_days = world.catalogue, world.size.period_days
  out = np.full(len(artists), -1, np.int64)
  pending = np.arange(len(artists))
  for _ in range(_MAX_REJECTION_ROUNDS):
    if not len(pending):
      return out
    a, pp = artists[pending], periods[pending]
    cand = catalogue.sample_tracks_by_base(rng, a)
    g = catalogue.freshness(cand, pp, period_days)
    ok = rng.random(len(pending)) * world.timeline.max_freshness[pp, a] < g
    out[pending[ok]] = cand[ok]
    pending = pending[~ok]
  for i in pending:
    items = np.arange(catalogue.artist_start[artists[i]],
                      catalogue.artist_end[artists[i]])
    w = catalogue.base_popularity[items] * catalogue.freshness(
        items, np.full(len(items), periods[i]), period_days)
    out[i] = items[min(np.searchsorted(np.cumsum(w), rng.random() * w.sum(),
                                       "right"), len(items) - 1)]
  return out


def sample_next(rng: np.random.Generator, world: world_lib.World,
                user: np.ndarray, seeds: np.ndarray, periods: np.ndarray,
                mixture_weights: np.ndarray, history: np.ndarray,
                history_len: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Draws each user's next listen.

  Args:
    rng: the random stream.
    world: the world.
    user: user indices.
    seeds: the previous listen's item, or -1 before the first.
    periods: the listen's period.
    mixture_weights: `mixture(...)` of these states.
    history: (m, repeat_window) the users' last listens, a ring buffer.
    history_len: how many of its slots are filled.

  Returns:
    (items, the component each was drawn from).
  """
  catalogue, timeline, users = world.catalogue, world.timeline, world.users
  m = len(user)
  comp = sampling.choose(rng, mixture_weights)
  item = np.full(m, -1, np.int64)
  s = np.maximum(seeds, 0)

  i = np.nonzero(comp == components.ALBUM)[0]
  item[i] = catalogue.next_in_album[s[i]]

  i = np.nonzero(comp == components.ARTIST)[0]
  item[i] = _sample_artist_track(rng, world, catalogue.artist[s[i]],
                                 periods[i])

  i = np.nonzero(comp == components.NEIGHBOUR)[0]
  if len(i):
    slot = sampling.choose(rng, neighbour_weights(world, s[i], periods[i]))
    art = catalogue.neighbours[catalogue.artist[s[i]], slot]
    item[i] = _sample_artist_track(rng, world, art, periods[i])

  i = np.nonzero(comp == components.FAV_TRACK)[0]
  if len(i):
    slot = sampling.choose(rng,
                           fav_track_weights(world, user[i], periods[i]))
    item[i] = users.fav_tracks[user[i], slot]

  i = np.nonzero(comp == components.FAV_ARTIST)[0]
  if len(i):
    slot = sampling.choose(rng,
                           fav_artist_weights(world, user[i], periods[i]))
    art = users.fav_artists[user[i], slot]
    item[i] = _sample_artist_track(rng, world, art, periods[i])

  i = np.nonzero(comp == components.REPEAT)[0]
  if len(i):
    slot = np.minimum(
        (rng.random(len(i)) * history_len[i]).astype(np.int64),
        history_len[i] - 1)
    item[i] = history[i, slot]

  i = np.nonzero(comp == components.TRENDING)[0]
  if len(i):
    k = timeline.trend_items.shape[1]
    pos = np.searchsorted(timeline.trend_flat_cdf,
                          periods[i] + rng.random(len(i)), "right")
    pos = np.clip(pos, periods[i] * k, periods[i] * k + k - 1)
    item[i] = timeline.trend_items.ravel()[pos]

  i = np.nonzero(comp == components.EXPLORE)[0]
  if len(i):
    n = timeline.n_released[periods[i]]
    item[i] = timeline.by_release[np.minimum(
        (rng.random(len(i)) * n).astype(np.int64), n - 1)]
  return item, comp
