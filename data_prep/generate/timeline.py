"""The timeline: per-period popularity tables derived from the catalogue.

Popularity is constant within a period (`SizeParams.period_days`): an item's
weight is its static popularity times its freshness in the period. The
tables here normalise it per artist, bound it for rejection sampling, list
the period's trending items and which items are released by then.

With `SizeParams.album_tables`, also each artist's albums' cumulative
popularity per period, as sorted integer keys: one `np.searchsorted` draws
an album of each (artist, period) exactly, up to the keys' resolution of
2^-album_key_bits (about 1e-11) of the artist's popularity. The track is
then drawn within the album by rejection, whose acceptance is high (an
album's tracks share their release day).
"""

import dataclasses

import numpy as np

from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import sizes


@dataclasses.dataclass
class Timeline:
  """Per-period popularity tables; P periods cover the timeline."""
  # (P, n_artists) sum of base popularity * freshness over the artist's
  # tracks: 0 before the artist's first release.
  artist_norm: np.ndarray
  # (P, n_artists) max freshness of the artist's tracks (rejection bound);
  # empty with album tables, whose bound is the album's.
  max_freshness: np.ndarray
  trend_items: np.ndarray     # (P, trend_k) item indices, most popular first
  trend_prob: np.ndarray      # (P, trend_k) their probabilities, rows sum to 1
  # Row p's cdf plus p, flattened: increasing, so one searchsorted draws
  # trending items for rows of different periods.
  trend_flat_cdf: np.ndarray
  by_release: np.ndarray      # item indices ordered by release period
  # (P,) items released by each period: a prefix of by_release.
  n_released: np.ndarray
  # Album tables (empty without them): for period p and album j of artist
  # a, ((p * n_artists + a) << album_key_bits) + the artist's cumulative
  # popularity share up to and including j, times 2^album_key_bits; flat,
  # p-major, so increasing.
  album_keys: np.ndarray
  album_key_bits: int


def _album_keys(catalogue: catalogue_lib.Catalogue, period: int,
                weights: np.ndarray, artist_norm: np.ndarray,
                bits: int) -> np.ndarray:
  """One period's album keys (see `Timeline.album_keys`).

  Args:
    catalogue: the catalogue.
    period: the period.
    weights: base popularity * freshness of every item in the period.
    artist_norm: their sum per artist.
    bits: the keys' fraction bits.

  Returns:
    An int64 key per album.
  """
  artist = catalogue.album_artist
  released = artist_norm[artist] > 0
  share = np.add.reduceat(weights, catalogue.album_start) / np.where(
      released, artist_norm[artist], 1.0)
  # Each artist's shares add up to 1: the cumulative sum's rounding stays
  # near 2^-52 * n_artists.
  cum = np.cumsum(share)
  first = catalogue.artist_album_start
  before = np.where(first > 0, cum[first - 1], 0.0)
  local = np.clip(cum - before[artist], 0.0, 1.0)
  last = catalogue.artist_album_end - 1
  local[last] = np.where(released[last], 1.0, 0.0)
  return (((period * catalogue.n_artists + artist) << bits) +
          np.floor(local * float(1 << bits)).astype(np.int64))


def make_timeline(catalogue: catalogue_lib.Catalogue,
                  size: sizes.SizeParams) -> Timeline:
  """Computes the per-period artist normalisers and the trending top-k.

  Args:
    catalogue: the catalogue.
    size: the dataset size (days, period_days, trend_k).

  Returns:
    The timeline's tables.
  """
  n_periods = -(-size.days // size.period_days)
  k = min(size.trend_k, catalogue.n_items)
  items = np.arange(catalogue.n_items)
  norm = np.zeros((n_periods, catalogue.n_artists))
  max_freshness = np.zeros((0 if size.album_tables else n_periods,
                            catalogue.n_artists))
  trend_items = np.zeros((n_periods, k), np.int64)
  trend_prob = np.zeros((n_periods, k))
  n_albums = len(catalogue.album_ids)
  bits = 0
  album_keys = np.zeros(0, np.int64)
  if size.album_tables:
    # The key's integer part (period, artist) and fraction share 63 bits.
    bits = min(52, 62 - (n_periods * catalogue.n_artists).bit_length())
    album_keys = np.zeros(n_periods * n_albums, np.int64)
  for period in range(n_periods):
    g = catalogue.freshness(items, np.full(catalogue.n_items, period),
                            size.period_days)
    w = catalogue.base_popularity * g
    norm[period] = np.add.reduceat(w, catalogue.artist_start)
    if not size.album_tables:
      max_freshness[period] = np.maximum.reduceat(g, catalogue.artist_start)
    top = np.argpartition(-w, k - 1)[:k]
    top = top[np.argsort(-w[top], kind="stable")]
    trend_items[period] = top
    trend_prob[period] = w[top] / w[top].sum()
    if size.album_tables:
      album_keys[period * n_albums:(period + 1) * n_albums] = _album_keys(
          catalogue, period, w, norm[period], bits)
  cdf = np.cumsum(trend_prob, axis=1)
  cdf[:, -1] = 1.0
  flat = (cdf + np.arange(n_periods)[:, None]).ravel()
  by_release = np.argsort(catalogue.release_period, kind="stable")
  n_released = np.searchsorted(catalogue.release_period[by_release],
                               np.arange(n_periods), "right")
  return Timeline(artist_norm=norm, max_freshness=max_freshness,
                  trend_items=trend_items, trend_prob=trend_prob,
                  trend_flat_cdf=flat, by_release=by_release,
                  n_released=n_released, album_keys=album_keys,
                  album_key_bits=bits)
