"""How a listen plays out: affinity -> played ratio -> positive or not.

The played ratio depends on the user's affinity to the track: tracks far from
their taste (most explore listens) are skipped or played partly, tracks close
to it are played through and replayed. So the ratio (the example weight)
tells signal from noise, as it should for weights to matter. The sampler
(`draw_played_ratio`) and the positive oracle (`positive_prob`) both derive from
`affinity` and `_ratio_probs`, so the oracle's P(positive) is exact.
"""

from typing import Optional, Tuple

import numpy as np

from data_prep import rules
from data_prep.generate import world as world_lib
from tfrs_yambda import schema

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
LISTEN_PLUS_RATIO = rules.LISTEN_PLUS_RATIO
# Affinity bonuses of the user's favourite tracks and favourite artists.
_FAV_TRACK_BONUS = 0.3
_FAV_ARTIST_BONUS = 0.15

# positive_prob relies on skips never and full plays always reaching Listen+,
# and on partial plays straddling it.
assert _SKIP_RATIOS[1] <= _PARTIAL_RATIOS[0] <= LISTEN_PLUS_RATIO
assert LISTEN_PLUS_RATIO < _PARTIAL_RATIOS[1] <= _FULL_RATIO
assert _REPLAY_RATIOS[0] > _FULL_RATIO


def _taste(world: world_lib.World, user: np.ndarray,
          item: np.ndarray) -> np.ndarray:
  """Cosine of each user's (unit) taste vector and the item's latent."""
  return np.einsum("md,md->m", world.users.taste[user],
                   world.catalogue.latent[item]) / world.latent_norm[item]


def affinity(world: world_lib.World, user: np.ndarray, item: np.ndarray,
             taste_cosine: Optional[np.ndarray] = None) -> np.ndarray:
  """The users' affinity to the items; the played ratio depends on it.

  Args:
    world: the world.
    user: user indices.
    item: an item index per user.
    taste_cosine: `_taste(world, user, item)` when already computed.

  Returns:
    The taste cosine plus the bonuses of a favourite track and of a track of
    a favourite artist (every slot counts, weighted or not).
  """
  users = world.users
  result = (_taste(world, user, item) if taste_cosine is None
            else taste_cosine.copy())
  result += _FAV_TRACK_BONUS * _rows_any(users.fav_tracks[user] ==
                                        item[:, None])
  result += _FAV_ARTIST_BONUS * _rows_any(
      users.fav_artists[user] == world.catalogue.artist[item][:, None])
  return result


def _rows_any(mask: np.ndarray) -> np.ndarray:
  """`mask.any(1)`, reading each row's bools 8 at a time when it can: a
  reduction along rows of a few columns loops per row, several times
  slower."""
  if mask.shape[1] % 8 or not mask.flags.c_contiguous:
    return mask.any(1)
  words = mask.view(np.uint64)
  found = words[:, 0] != 0
  for j in range(1, words.shape[1]):
    found |= words[:, j] != 0
  return found


def _ratio_probs(affinity_values: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray]:
  """P(skip) and P(played through, unless skipped) at each affinity.

    p_skip = 0.04 + 0.7 / (1 + exp(6 (affinity - 0.25))),
    p_full = 1 / (1 + exp(-_RATIO_SLOPE (affinity - _RATIO_MIDPOINT))),

  computed in place, because the positive oracle evaluates it on every item.

  Args:
    affinity_values: affinities; float32 stays float32 (the positive
      oracle's bulk pass), anything else is computed in float64.

  Returns:
    (p_skip, p_full), each of the affinities' shape.
  """
  a = np.asarray(affinity_values)
  if a.dtype != np.float32:
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


def positive_prob(affinity_values: np.ndarray) -> np.ndarray:
  """P(played ratio >= LISTEN_PLUS_RATIO | affinity) under `draw_played_ratio`.

  Not skipped, and then played through (or replayed), or played partly with
  a uniform ratio that reaches the threshold:
  (1 - p_skip) * (p_full + (1 - p_full) * 50/69). Increasing in the affinity
  (less skipping, more playing through). A listen that reaches the threshold
  is never disliked (dislikes follow skips only), so this is P(positive).

  Args:
    affinity_values: affinities (see `_ratio_probs` for the dtype).

  Returns:
    P(positive) at each affinity.
  """
  p_skip, p_full = _ratio_probs(affinity_values)
  lo, hi = _PARTIAL_RATIOS
  partial_positive = (hi - LISTEN_PLUS_RATIO) / (hi - lo)  # 50 of 69 values
  # (1 - p_skip) * (p_full + (1 - p_full) * partial_positive), in place.
  played = np.subtract(1.0, p_full, out=np.empty_like(p_full))
  played *= partial_positive
  played += p_full
  positive = np.subtract(1.0, p_skip, out=p_skip)
  positive *= played
  return positive


def is_positive(ratio: np.ndarray, disliked: np.ndarray) -> np.ndarray:
  """The shared positive rule (`data_prep.rules.is_positive`) on the
  generator's dislike flags: the evaluation's targets are these listens.

  Args:
    ratio: played ratios, percent.
    disliked: whether each listen was disliked.

  Returns:
    Whether each listen is a positive.
  """
  feedback = np.where(disliked, schema.FEEDBACK_DISLIKED, schema.FEEDBACK_NONE)
  return rules.is_positive(ratio, feedback)


def draw_played_ratio(rng: np.random.Generator,
                      affinity_values: np.ndarray) -> np.ndarray:
  """Draws the percent played of each listen, by affinity.

  The further from the user's taste, the more often skipped (< 31) or played
  partly (31-99); the closer, the more often played through (100) or
  replayed (101-300).

  Args:
    rng: the random stream.
    affinity_values: the listens' affinities.

  Returns:
    An int64 ratio per listen.
  """
  m = len(affinity_values)
  p_skip, p_full = _ratio_probs(affinity_values)
  skip = rng.random(m) < p_skip
  full = rng.random(m) < p_full
  replay = full & (rng.random(m) < 0.3 * p_full)
  ratio = np.where(replay, rng.integers(*_REPLAY_RATIOS, m),
                   np.where(full, _FULL_RATIO,
                            rng.integers(*_PARTIAL_RATIOS, m)))
  return np.where(skip, rng.integers(*_SKIP_RATIOS, m), ratio)
