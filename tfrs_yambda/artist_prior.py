"""A next-artist prior mixed into the model's scores, chosen on the validation
day.

After a track, listeners often stay with its artist or move to a similar
one: a track of an artist similar to the seed's is the demo's largest gap
to the oracle (Recall@100 0.34 against 0.79 with the history prior alone,
docs/evaluation.md). One dense query must sit near those artists' tracks,
the listener's own and their favourites' at once. ItemKNN's item-item
counts are too sparse for it (0.21): the signal is artist-to-artist. With
`TowerConfig.artist_prior`, the model's next-track distribution is also
mixed with

  B(j) = mass * T(a(seed), a(j)) * share(j),

T(a, b) the share of artist b among the artists played next after a's
tracks in training, over a's `next_artists` most frequent (b = a
included), and share(j) track j's share of its artist's recent popularity
(training positives decayed with a half-life, as `baselines.RecentPopular`),
over the artist's `tracks` most popular. Both are counted from training
examples only (`fit`), so nothing from a scored window reaches them. The
prior's items and weights join the history prior's slots (`QueryTower.bonus`):
evaluation and serving mix both in as `tfrs_yambda.history_bonus` describes,
p(j) ~ exp((q.c(j) - L) / t) + B_history(j) + B(j). Its `mass` starts at 0
(off) and is chosen after the history prior's setting (`priors.choose`).
"""

from typing import NamedTuple, Tuple

import numpy as np
import tensorflow as tf

from tfrs_yambda import baselines

# Pair keys mapped to artist pairs at a time while fitting (bounded memory).
_FIT_CHUNK = 1 << 24


class Tables(NamedTuple):
  """The prior's tables, one row per artist index (row 0: no artist)."""
  next_artists: np.ndarray   # int64 [artists, A], 0: none
  next_weights: np.ndarray   # float32 [artists, A], T(a, b); 0: none
  tracks: np.ndarray         # int64 [artists, M] item indices, 0: none
  shares: np.ndarray         # float32 [artists, M], share(j); 0: none


def fit(item_artist: np.ndarray, num_artists: int,
        transitions: Tuple[np.ndarray, np.ndarray, np.ndarray],
        recent_popularity: np.ndarray, next_artists: int,
        tracks: int) -> Tables:
  """The prior's tables from training counts.

  Args:
    item_artist: int [items + 1], each catalogue index's artist (0: none).
    num_artists: artist indices are below it.
    transitions: (seeds, targets, counts) of the training examples' (seed,
      target) pairs (`baselines.SeedCooccurrence.pair_counts`).
    recent_popularity: float [items + 1], decayed training positives per
      index (`baselines.RecentPopular.scores`).
    next_artists: A, the next artists kept per artist.
    tracks: M, the tracks kept per artist.

  Returns:
    `Tables`; an artist never a training seed, and index 0's artist (none),
    have no next artists; an item without an artist is never listed.
  """
  item_artist = np.asarray(item_artist, np.int64)
  seeds, targets, counts = transitions
  artist_keys, artist_counts = [], []
  for lo in range(0, len(seeds), _FIT_CHUNK):
    seed_artist = item_artist[seeds[lo:lo + _FIT_CHUNK]]
    target_artist = item_artist[targets[lo:lo + _FIT_CHUNK]]
    known = (seed_artist > 0) & (target_artist > 0)
    keys, inverse = np.unique(
        seed_artist[known] * np.int64(num_artists) + target_artist[known],
        return_inverse=True)
    artist_keys.append(keys)
    artist_counts.append(np.bincount(
        inverse.reshape(-1), weights=counts[lo:lo + _FIT_CHUNK][known],
        minlength=len(keys)))
  keys, inverse = np.unique(np.concatenate(artist_keys or [[]]).astype(
      np.int64), return_inverse=True)
  pair_counts = np.bincount(inverse.reshape(-1),
                            weights=np.concatenate(artist_counts or [[]]),
                            minlength=len(keys))
  next_of, next_count = baselines.top_per_row(
      keys // num_artists, keys % num_artists, pair_counts, num_artists,
      next_artists)
  total = next_count.sum(axis=1, keepdims=True)
  popularity = np.asarray(recent_popularity, np.float64).copy()
  popularity[0] = 0.0
  artist_popularity = np.bincount(item_artist, weights=popularity,
                                  minlength=num_artists)
  artist_popularity[0] = 0.0
  top_tracks, track_popularity = baselines.top_per_row(
      item_artist, np.arange(len(item_artist)), np.where(
          item_artist > 0, popularity, 0.0), num_artists, tracks)
  return Tables(
      next_artists=next_of,
      next_weights=np.divide(next_count, total, out=np.zeros_like(next_count),
                             where=total > 0).astype(np.float32),
      tracks=top_tracks,
      shares=np.divide(track_popularity, artist_popularity[:, np.newaxis],
                       out=np.zeros_like(track_popularity),
                       where=artist_popularity[:, np.newaxis] > 0
                       ).astype(np.float32))


class ArtistPrior(tf.keras.layers.Layer):
  """[batch] seed artists -> ([batch, A * M] items, [batch, A * M] weights).

  The tables start empty and the mass at 0 (off): `set_tables` fills them
  from training counts, `set_mass` sets the mass; both are variables, so a
  checkpoint or SavedModel holds what was fitted and chosen.
  """

  def __init__(self, num_artists: int, next_artists: int, tracks: int,
               **kwargs):
    """Args: the artist indices' bound, A and M (see `fit`)."""
    super().__init__(**kwargs)
    self.width = next_artists * tracks

    def table(name, shape, dtype):
      return self.add_weight(name=name, shape=shape, dtype=dtype,
                             initializer="zeros", trainable=False)

    self.next_artists = table("next_artists", (num_artists, next_artists),
                              tf.int64)
    self.next_weights = table("next_weights", (num_artists, next_artists),
                              tf.float32)
    self.tracks = table("tracks", (num_artists, tracks), tf.int64)
    self.shares = table("shares", (num_artists, tracks), tf.float32)
    self.mass = table("mass", (), tf.float32)

  def set_tables(self, tables: Tables) -> None:
    for variable, values in zip(
        (self.next_artists, self.next_weights, self.tracks, self.shares),
        tables):
      variable.assign(values)

  def set_mass(self, mass: float) -> None:
    self.mass.assign(mass)

  def call(self, artists: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    batch = tf.shape(artists)[0]
    next_artists = tf.gather(self.next_artists, artists)     # [batch, A]
    items = tf.gather(self.tracks, next_artists)              # [batch, A, M]
    weights = (self.mass * tf.gather(self.next_weights, artists)[:, :, None]
               * tf.gather(self.shares, next_artists))
    return (tf.reshape(items, [batch, self.width]),
            tf.reshape(weights, [batch, self.width]))
