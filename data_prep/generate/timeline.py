"""The timeline: per-period popularity tables derived from the catalogue.

Popularity is constant within a period (`SizeParams.period_days`): an item's
weight is its static popularity times its freshness in the period. The
tables here normalise it per artist, bound it for rejection sampling, list
the period's trending items and which items are released by then.
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
  # (P, n_artists) max freshness of the artist's tracks (rejection bound).
  max_freshness: np.ndarray
  trend_items: np.ndarray     # (P, trend_k) item indices, most popular first
  trend_prob: np.ndarray      # (P, trend_k) their probabilities, rows sum to 1
  # Row p's cdf plus p, flattened: increasing, so one searchsorted draws
  # trending items for rows of different periods.
  trend_flat_cdf: np.ndarray
  by_release: np.ndarray      # item indices ordered by release period
  # (P,) items released by each period: a prefix of by_release.
  n_released: np.ndarray


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
  max_freshness = np.zeros((n_periods, catalogue.n_artists))
  trend_items = np.zeros((n_periods, k), np.int64)
  trend_prob = np.zeros((n_periods, k))
  for period in range(n_periods):
    g = catalogue.freshness(items, np.full(catalogue.n_items, period),
                            size.period_days)
    w = catalogue.base_popularity * g
    norm[period] = np.add.reduceat(w, catalogue.artist_start)
    max_freshness[period] = np.maximum.reduceat(g, catalogue.artist_start)
    top = np.argpartition(-w, k - 1)[:k]
    top = top[np.argsort(-w[top], kind="stable")]
    trend_items[period] = top
    trend_prob[period] = w[top] / w[top].sum()
  cdf = np.cumsum(trend_prob, axis=1)
  cdf[:, -1] = 1.0
  flat = (cdf + np.arange(n_periods)[:, None]).ravel()
  by_release = np.argsort(catalogue.release_period, kind="stable")
  n_released = np.searchsorted(catalogue.release_period[by_release],
                               np.arange(n_periods), "right")
  return Timeline(artist_norm=norm, max_freshness=max_freshness,
                  trend_items=trend_items, trend_prob=trend_prob,
                  trend_flat_cdf=flat, by_release=by_release,
                  n_released=n_released)
