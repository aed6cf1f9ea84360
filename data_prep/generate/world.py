"""The world: what the simulation and the oracles share about one dataset.

`World` bundles the size parameters, the catalogue, its timeline and the
users; every later stage takes it as one argument.
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
  return World(size=size, catalogue=catalogue, timeline=timeline,
               users=users)
