"""The users: taste, favourites, mixture weights and activity.

A user's favourite artists come from one to three genres; the favourite
tracks are tracks of those artists; the taste vector is the weighted mean of
the favourite artists' latents plus noise. Each user has their own weights
of the next-listen mixture (`components.py`) and their own activity.
"""

import dataclasses

import numpy as np

from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import components
from data_prep.generate import sampling
from data_prep.generate import sizes

_FAV_ARTIST_SLOTS = 8
_FAV_TRACK_SLOTS = 16
_UID_RANGE = 1_000_000


@dataclasses.dataclass
class Users:
  """Per-user arrays, indexed by the user's position in sorted raw ids."""
  uids: np.ndarray                # sorted raw ids
  fav_artists: np.ndarray         # (n, _FAV_ARTIST_SLOTS) artist indices
  fav_artist_weights: np.ndarray  # (n, _FAV_ARTIST_SLOTS), 0 on unused slots
  fav_tracks: np.ndarray          # (n, _FAV_TRACK_SLOTS) item indices
  fav_track_weights: np.ndarray   # (n, _FAV_TRACK_SLOTS), 0 on unused slots
  taste: np.ndarray               # (n, latent_dim) unit taste vectors
  mixture: np.ndarray             # (n, len(COMPONENTS)) mixture weights
  start: np.ndarray               # first event time, seconds
  session_gap: np.ndarray         # mean gap between sessions, seconds
  max_events: np.ndarray


def _slot_weights(rng: np.random.Generator, n: int, slots: int,
                  min_used: int, shape: float) -> np.ndarray:
  """(n, slots) gamma weights on a random number of leading slots (at least
  `min_used`), 0 on the others; rows sum to 1."""
  used = rng.integers(min_used, slots + 1, n)
  w = rng.gamma(shape, 1.0, (n, slots)) * (
      np.arange(slots) < used[:, None])
  # A floor on the used slots' weights; unused slots stay 0.
  w = np.maximum(w, 1e-3 * (w > 0))
  w /= w.sum(1, keepdims=True)
  return w


def make_users(rng: np.random.Generator, catalogue: catalogue_lib.Catalogue,
               size: sizes.SizeParams) -> Users:
  """Draws the users' taste (favourite artists and tracks), mixture weights,
  activity and start time.

  Args:
    rng: the users' random stream.
    catalogue: the catalogue the favourites come from.
    size: the dataset size.

  Returns:
    The users.
  """
  n = size.n_users
  uids = np.sort(catalogue_lib.sparse_ids(rng, n, _UID_RANGE)).astype(np.uint32)

  # Favourite artists come from one to three genres, by artist popularity.
  n_catalogue_genres = len(catalogue.genre_popularity)
  by_genre = np.argsort(catalogue.artist_genre, kind="stable")
  g_cum = np.cumsum(catalogue.artist_popularity[by_genre] ** 0.8)
  g_start = np.searchsorted(catalogue.artist_genre[by_genre],
                            np.arange(n_catalogue_genres), "left")
  g_end = np.searchsorted(catalogue.artist_genre[by_genre],
                          np.arange(n_catalogue_genres), "right")
  user_genres = rng.choice(n_catalogue_genres, (n, 3),
                           p=catalogue.genre_popularity)
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
  fav_artist_weights = _slot_weights(rng, n, _FAV_ARTIST_SLOTS, 3, 0.8)

  slot = sampling.choose(
      rng, np.repeat(fav_artist_weights, _FAV_TRACK_SLOTS, axis=0))
  fav_tracks = catalogue.sample_tracks_by_base(
      rng, fav_artists[np.repeat(np.arange(n), _FAV_TRACK_SLOTS),
                       slot]).reshape(n, _FAV_TRACK_SLOTS)
  fav_track_weights = _slot_weights(rng, n, _FAV_TRACK_SLOTS, 4, 1.0)

  taste = (np.einsum("na,nad->nd", fav_artist_weights,
                     catalogue.artist_latent[fav_artists]) +
           rng.normal(0, 0.3, (n, size.latent_dim)))
  taste /= np.linalg.norm(taste, axis=1, keepdims=True)
  mixture = rng.dirichlet(
      components.MIXTURE_CONCENTRATION * components.BASE_MIXTURE, n)

  end = size.days * sizes.DAY
  target = np.clip(size.events_per_user * rng.lognormal(-0.32, 0.8, n), 10,
                   size.max_events_factor * size.events_per_user)
  start = np.where(rng.random(n) < 0.6, 0.0,
                   rng.uniform(0, 0.4 * end, n)).astype(np.int64)
  n_sessions = np.maximum(target / size.session_mean, 1.0)
  session_gap = (end - start) / n_sessions
  max_events = np.ceil(2 * target).astype(np.int64)
  return Users(uids=uids, fav_artists=fav_artists,
               fav_artist_weights=fav_artist_weights, fav_tracks=fav_tracks,
               fav_track_weights=fav_track_weights, taste=taste,
               mixture=mixture, start=start, session_gap=session_gap,
               max_events=max_events)
