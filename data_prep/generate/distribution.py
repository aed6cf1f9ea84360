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


def _search_in(table: np.ndarray, values: np.ndarray, lo: np.ndarray,
               hi: np.ndarray) -> np.ndarray:
  """`np.searchsorted(table, values, "right")` clipped to [lo, hi] per row
  (`table` is increasing).

  A binary search of every row at once within its own range, by descending
  powers of two: as many passes as the longest range has bits, each one
  gather per row, instead of a search through the whole table (many cache
  misses) or a comparison with every entry of the ranges. Entries past a
  range's end read as its last one, which keeps the ranges increasing;
  counting them is undone by the final clip.
  """
  last = hi - 1
  pos = lo.copy()
  width = int((hi - lo).max()) if len(lo) else 0
  for bit in range(width.bit_length() - 1, -1, -1):
    step = 1 << bit
    probe = np.minimum(pos + (step - 1), last)
    pos += step * (table[probe] <= values)
  return np.minimum(pos, hi)


def neighbour_weights(world: world_lib.World, seeds: np.ndarray,
                      periods: np.ndarray) -> np.ndarray:
  """(m, K) weights of the seed artists' neighbours that have released
  music by the period (0 for the others); rows are not normalised."""
  artists = world.catalogue.artist[seeds]
  return world.catalogue.neighbour_weights[artists] * (
      world.neighbour_first_period[artists] <= periods[:, None])


def fav_artist_weights(world: world_lib.World, user: np.ndarray,
                       periods: np.ndarray) -> np.ndarray:
  """(m, slots) weights of the users' favourite artists that have released
  music by the period (0 for the others); rows are not normalised."""
  return world.users.fav_artist_weights[user] * (
      world.fav_artist_first_period[user] <= periods[:, None])


def fav_track_weights(world: world_lib.World, user: np.ndarray,
                      periods: np.ndarray) -> np.ndarray:
  """(m, slots) weights of the users' favourite tracks released by the
  period (0 for the others); rows are not normalised."""
  return world.users.fav_track_weights[user] * (
      world.fav_track_period[user] <= periods[:, None])


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
  # A weighted slot is released by then (no weight is 0 but unused slots').
  available[:, components.NEIGHBOUR] = has_seed & (
      world.neighbours_open[world.catalogue.artist[s]] <= periods)
  available[:, components.FAV_TRACK] = world.fav_tracks_open[user] <= periods
  available[:, components.FAV_ARTIST] = (
      world.fav_artists_open[user] <= periods)
  available[:, components.REPEAT] = history_len > 0
  available[:, components.EXPLORE] = world.timeline.n_released[periods] > 0
  w = world.users.mixture[user] * available
  return w / w.sum(1, keepdims=True)


def _by_rejection(rng: np.random.Generator, world: world_lib.World,
                  periods: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  before: np.ndarray, total: np.ndarray,
                  bound: np.ndarray) -> np.ndarray:
  """A track in [lo, hi) of each row, proportional to base * freshness in
  the row's period.

  Rejection sampling from the static popularity: propose by base (the
  cumulative base between `before` and `before + total`), accept with
  freshness / `bound` (no track in the range is fresher than `bound`).
  Rounds after the first propose `proposals_per_round` tracks per row still
  pending and keep the first accepted one: the first acceptance of a
  sequence of independent proposals, so still exact. The few that are still
  rejected after many rounds are drawn exactly.
  """
  catalogue, period_days = world.catalogue, world.size.period_days
  out = np.full(len(lo), -1, np.int64)
  pending = np.arange(len(lo))
  reps = 1
  for _ in range(_MAX_REJECTION_ROUNDS):
    if not len(pending):
      return out
    rows = np.repeat(pending, reps)
    cand = np.minimum(_search_in(
        catalogue.cumulative_base,
        before[rows] + rng.random(len(rows)) * total[rows], lo[rows],
        hi[rows]), hi[rows] - 1)
    ok = (rng.random(len(rows)) * bound[rows] <
          catalogue.freshness(cand, periods[rows], period_days))
    ok = ok.reshape(-1, reps)
    first = np.argmax(ok, axis=1)
    done = ok[np.arange(len(pending)), first]
    out[pending[done]] = cand.reshape(-1, reps)[done, first[done]]
    pending = pending[~done]
    reps = world.size.proposals_per_round
  for i in pending:
    items = np.arange(lo[i], hi[i])
    w = catalogue.base_popularity[items] * catalogue.freshness(
        items, np.full(len(items), periods[i]), period_days)
    out[i] = items[min(np.searchsorted(np.cumsum(w), rng.random() * w.sum(),
                                       "right"), len(items) - 1)]
  return out


def _sample_artist_track(rng: np.random.Generator, world: world_lib.World,
                         artists: np.ndarray,
                         periods: np.ndarray) -> np.ndarray:
  """A track of each artist, proportional to base * freshness in the period.

  Either by rejection from the artist's static popularity (bounded by the
  artist's freshest track), or, with `album_tables`, the album from the
  period's album tables and the track by rejection within it. The artists
  have released music by the periods.
  """
  catalogue, timeline = world.catalogue, world.timeline
  if not world.size.album_tables:
    return _by_rejection(rng, world, periods, catalogue.artist_start[artists],
                         catalogue.artist_end[artists],
                         catalogue.artist_base_before[artists],
                         catalogue.artist_base_sum[artists],
                         timeline.max_freshness[periods, artists])
  bits = timeline.album_key_bits
  key = (((periods * catalogue.n_artists + artists) << bits) +
         (rng.random(len(artists)) * float(1 << bits)).astype(np.int64))
  offset = periods * len(catalogue.album_ids)
  albums = _search_in(timeline.album_keys, key,
                      offset + catalogue.artist_album_start[artists],
                      offset + catalogue.artist_album_end[artists]) - offset
  return _by_rejection(
      rng, world, periods, catalogue.album_start[albums],
      catalogue.album_end[albums], catalogue.album_base_before[albums],
      catalogue.album_base_sum[albums],
      catalogue.album_max_freshness(albums, periods, world.size.period_days))


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
  # The rows of each component, in order (what np.nonzero(comp == c) gives).
  # int8: a stable sort of small integers is a radix sort, several times
  # faster than int64's merge sort (the same order: stable is unique).
  by_comp = np.argsort(comp.astype(np.int8), kind="stable")
  bounds = np.searchsorted(comp[by_comp], np.arange(len(components.COMPONENTS)
                                                    + 1))
  rows = [by_comp[bounds[c]:bounds[c + 1]]
          for c in range(len(components.COMPONENTS))]
  # With album tables, the three components that pick an artist draw its
  # track in one call (per-call overhead dominates small steps); without,
  # each draws in turn, as the published sizes did.
  merged = world.size.album_tables
  artist_rows, artists = [], []

  def artist_track(i: np.ndarray, art: np.ndarray) -> None:
    if merged:
      artist_rows.append(i)
      artists.append(art)
    else:
      item[i] = _sample_artist_track(rng, world, art, periods[i])

  i = rows[components.ALBUM]
  item[i] = catalogue.next_in_album[s[i]]

  i = rows[components.ARTIST]
  artist_track(i, catalogue.artist[s[i]])

  i = rows[components.NEIGHBOUR]
  if len(i):
    slot = sampling.choose(rng, neighbour_weights(world, s[i], periods[i]))
    artist_track(i, catalogue.neighbours[catalogue.artist[s[i]], slot])

  i = rows[components.FAV_TRACK]
  if len(i):
    slot = sampling.choose(rng,
                           fav_track_weights(world, user[i], periods[i]))
    item[i] = users.fav_tracks[user[i], slot]

  i = rows[components.FAV_ARTIST]
  if len(i):
    slot = sampling.choose(rng,
                           fav_artist_weights(world, user[i], periods[i]))
    artist_track(i, users.fav_artists[user[i], slot])

  if merged:
    i = np.concatenate(artist_rows)
    item[i] = _sample_artist_track(rng, world, np.concatenate(artists),
                                   periods[i])

  i = rows[components.REPEAT]
  if len(i):
    slot = np.minimum(
        (rng.random(len(i)) * history_len[i]).astype(np.int64),
        history_len[i] - 1)
    item[i] = history[i, slot]

  i = rows[components.TRENDING]
  if len(i):
    k = timeline.trend_items.shape[1]
    pos = np.searchsorted(timeline.trend_flat_cdf,
                          periods[i] + rng.random(len(i)), "right")
    pos = np.clip(pos, periods[i] * k, periods[i] * k + k - 1)
    item[i] = timeline.trend_items.ravel()[pos]

  i = rows[components.EXPLORE]
  if len(i):
    n = timeline.n_released[periods[i]]
    item[i] = timeline.by_release[np.minimum(
        (rng.random(len(i)) * n).astype(np.int64), n - 1)]
  return item, comp
