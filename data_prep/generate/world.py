"""The world: what the simulation and the oracles share about one dataset.

`World` bundles the size parameters, the catalogue, its timeline and the
users; every later stage takes it as one argument. It also holds, per
artist's neighbour and per user's favourite, the period it is released by:
which components are available is decided on every listen, and these small
tables spare it gathers from the large per-period ones.
"""

import dataclasses

import numpy as np

from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import sizes
from data_prep.generate import timeline as timeline_lib
from data_prep.generate import users as users_lib


@dataclasses.dataclass
class World:
  """The fixed state of one generated dataset."""
  size: sizes.SizeParams
  catalogue: catalogue_lib.Catalogue
  timeline: timeline_lib.Timeline
  users: users_lib.Users
  # (n_artists, K) the first period with music of each neighbour.
  neighbour_first_period: np.ndarray
  # (n_users, slots) the same of each favourite artist.
  fav_artist_first_period: np.ndarray
  # (n_users, slots) the release period of each favourite track.
  fav_track_period: np.ndarray
  # The first period with any of them (of an artist's neighbours, of a
  # user's weighted favourite artists, tracks): when the component opens.
  neighbours_open: np.ndarray
  fav_artists_open: np.ndarray
  fav_tracks_open: np.ndarray
  # (n_items,) the norm of each item's latent, float32: every listen's
  # taste cosine divides by it (the same floats as norms of gathered rows).
  latent_norm: np.ndarray


def _first_used(periods: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Per row, the smallest period among slots of weight > 0."""
  return np.where(weights > 0, periods, np.iinfo(np.int16).max).min(1)


def make_world(size: sizes.SizeParams, catalogue_rng: np.random.Generator,
               users_rng: np.random.Generator) -> World:
  """Builds the catalogue, its timeline and the users.

  Args:
    size: the dataset size.
    catalogue_rng: the catalogue's random stream.
    users_rng: the users' random stream.

  Returns:
    The world.
  """
  catalogue = catalogue_lib.make_catalogue(catalogue_rng, size)
  timeline = timeline_lib.make_timeline(catalogue, size)
  users = users_lib.make_users(users_rng, catalogue, size)
  # Periods are small (releases start at most 2 timelines before it): int16
  # keeps the tables in cache.
  first = catalogue.artist_first_period.astype(np.int16)
  neighbour_first = first[catalogue.neighbours]
  fav_artist_first = first[users.fav_artists]
  fav_track_period = catalogue.release_period[users.fav_tracks].astype(
      np.int16)
  return World(size=size, catalogue=catalogue, timeline=timeline,
               users=users, neighbour_first_period=neighbour_first,
               fav_artist_first_period=fav_artist_first,
               fav_track_period=fav_track_period,
               neighbours_open=_first_used(neighbour_first,
                                           catalogue.neighbour_weights),
               fav_artists_open=_first_used(fav_artist_first,
                                            users.fav_artist_weights),
               fav_tracks_open=_first_used(fav_track_period,
                                           users.fav_track_weights),
               latent_norm=np.linalg.norm(catalogue.latent, axis=1))
