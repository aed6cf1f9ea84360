"""The catalogue: genres -> artists -> albums -> tracks, and their freshness.

Artists have latent taste vectors around their genre's; tracks a latent around
their artist's (the audio embeddings are a noisy projection of it), a length
and a long-tailed static popularity. Each album has a release day (some
within the timeline) and each track a freshness that decays after release,
so popularity drifts (`Catalogue.freshness`).

Items are ordered by artist, then album, so an artist's tracks and an album's
tracks are contiguous ranges; the album arrays serve the samplers that draw
an album first (`SizeParams.album_tables`).
"""

import dataclasses
from typing import Tuple

import numpy as np

from data_prep.generate import sizes

_FRESH_FLOOR = 0.05       # freshness of an old track, relative to 1 at release
_NEW_ALBUM_SHARE = 0.4    # albums released within the timeline
_LIFETIME_DIVISOR = 10.0  # mean freshness lifetime = days / this
# Ranges the sparse raw ids are drawn from (at least 4x the count).
_ITEM_ID_RANGE = 9_390_000
_ARTIST_ID_RANGE = 2_000_000
_ALBUM_ID_RANGE = 5_000_000
# Rows of artists whose neighbours are searched together (bounds memory).
_NEIGHBOUR_BLOCK = 1024
# Cosines the fast search holds at once (float32).
_NEIGHBOUR_CELLS = 1 << 25
# The fast neighbour search's pre-filter keeps every cosine within this of
# the bound; float32 cosines of unit vectors are within 1e-6 of float64 ones.
_PREFILTER_SLACK = 1e-5


@dataclasses.dataclass
class Catalogue:
  """Items in structure order: artists contiguous, then albums, then tracks.

  An item is its index in this order; raw ids are only for the files.
  """
  item_ids: np.ndarray          # raw id per item, uint32
  artist: np.ndarray            # primary artist index per item
  album: np.ndarray             # album index per item
  next_in_album: np.ndarray     # item index of the next track, or -1
  latent: np.ndarray            # (n_items, latent_dim) float32
  length: np.ndarray            # seconds, int64
  base_popularity: np.ndarray   # static popularity, float64
  release_day: np.ndarray       # the album's release day, may be negative
  release_period: np.ndarray    # period of release
  lifetime_days: np.ndarray     # time constant of the freshness decay
  cumulative_base: np.ndarray   # inclusive cumsum of base_popularity
  artist_start: np.ndarray      # first item of each artist
  artist_end: np.ndarray        # one past its last item
  artist_base_before: np.ndarray  # cumulative_base before the artist's items
  artist_base_sum: np.ndarray   # sum of base_popularity of the artist's items
  artist_ids: np.ndarray        # raw artist ids
  artist_latent: np.ndarray     # (n_artists, latent_dim)
  artist_genre: np.ndarray
  artist_popularity: np.ndarray
  album_ids: np.ndarray         # raw album ids
  neighbours: np.ndarray        # (n_artists, K) similar artists
  neighbour_weights: np.ndarray  # (n_artists, K), rows sum to 1
  genre_popularity: np.ndarray  # sums to 1
  # The first period with a released track of each artist (popularity is 0
  # before it).
  artist_first_period: np.ndarray
  album_artist: np.ndarray      # artist index per album, sorted
  album_start: np.ndarray       # first item of each album
  album_end: np.ndarray         # one past its last item
  album_base_before: np.ndarray  # cumulative_base before the album's items
  album_base_sum: np.ndarray    # sum of base_popularity of the album's items
  album_release: np.ndarray     # release day per album
  album_max_lifetime: np.ndarray  # the longest lifetime of its tracks
  artist_album_start: np.ndarray  # first album of each artist
  artist_album_end: np.ndarray  # one past its last album

  @property
  def n_items(self) -> int:
    return len(self.item_ids)

  @property
  def n_artists(self) -> int:
    return len(self.artist_ids)

  def freshness(self, items: np.ndarray, periods: np.ndarray,
                period_days: int) -> np.ndarray:
    """Popularity multipliers of items in periods: 0 before release, then
    from 1 at release decaying towards _FRESH_FLOOR.

    Sampling and the oracle both call this, so their numbers are identical.

    Args:
      items: item indices.
      periods: a period per item.
      period_days: days per period (popularity is constant within one).

    Returns:
      A float64 multiplier per item.
    """
    mid = (periods + 0.5) * period_days
    age = np.maximum(mid - self.release_day[items], 0.0)
    g = _FRESH_FLOOR + (1.0 - _FRESH_FLOOR) * np.exp(
        -age / self.lifetime_days[items])
    return np.where(self.release_period[items] <= periods, g, 0.0)

  def album_max_freshness(self, albums: np.ndarray, periods: np.ndarray,
                          period_days: int) -> np.ndarray:
    """A bound of `freshness` over each album's tracks in the period: theirs
    with the album's longest lifetime (they share the release day), so no
    track of the album is fresher. Rows are released albums."""
    mid = (periods + 0.5) * period_days
    age = np.maximum(mid - self.album_release[albums], 0.0)
    return _FRESH_FLOOR + (1.0 - _FRESH_FLOOR) * np.exp(
        -age / self.album_max_lifetime[albums])

  def artist_tracks(self, artists: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Every track of each artist.

    Args:
      artists: artist indices, repeats allowed.

    Returns:
      (index into `artists`, item) for every track of each, in order.
    """
    start = self.artist_start[artists]
    counts = self.artist_end[artists] - start
    which = np.repeat(np.arange(len(artists)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts,
                                                  counts)
    return which, start[which] + offsets

  def sample_tracks_by_base(self, rng: np.random.Generator,
                            artists: np.ndarray) -> np.ndarray:
    """Draws a track of each artist, proportional to its static popularity.

    Args:
      rng: the random stream; draws one uniform per artist.
      artists: artist indices.

    Returns:
      An item index per artist.
    """
    target = (self.artist_base_before[artists] +
              rng.random(len(artists)) * self.artist_base_sum[artists])
    pos = np.searchsorted(self.cumulative_base, target, "right")
    return np.clip(pos, self.artist_start[artists],
                   self.artist_end[artists] - 1)


def sparse_ids(rng: np.random.Generator, n: int, id_range: int) -> np.ndarray:
  """n distinct random raw ids in [0, max(id_range, 4 n)), in random order."""
  id_range = max(id_range, 4 * n)
  return rng.choice(id_range, n, replace=False).astype(np.uint32)


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


def _artist_neighbours(latent: np.ndarray, genre: np.ndarray,
                       k: int) -> Tuple[np.ndarray, np.ndarray]:
  """The top-k most similar artists (cosine), searched within the genre,
  and their weights (rows sum to 1, the most similar weighs most)."""
  n = len(latent)
  unit = latent / np.linalg.norm(latent, axis=1, keepdims=True)
  nb = np.zeros((n, k), np.int64)
  sims = np.zeros((n, k))
  for g in np.unique(genre):
    rows = np.nonzero(genre == g)[0]
    # Small genres (tiny size) search all artists so k neighbours exist.
    cand = rows if len(rows) > 2 * k else np.arange(n)
    for lo in range(0, len(rows), _NEIGHBOUR_BLOCK):
      r = rows[lo:lo + _NEIGHBOUR_BLOCK]
      s = unit[r] @ unit[cand].T
      s[cand[None, :] == r[:, None]] = -np.inf
      top = np.argpartition(-s, k - 1, axis=1)[:, :k]
      top_s = np.take_along_axis(s, top, 1)
      order = np.argsort(-top_s, axis=1, kind="stable")
      nb[r] = cand[np.take_along_axis(top, order, 1)]
      sims[r] = np.take_along_axis(top_s, order, 1)
  return nb, _neighbour_weights(sims)


def _neighbour_weights(sims: np.ndarray) -> np.ndarray:
  """Weights of neighbours of these cosines (sorted), rows summing to 1."""
  w = np.exp(4.0 * (sims - sims[:, :1]))
  return w / w.sum(1, keepdims=True)


def _fast_artist_neighbours(latent: np.ndarray, genre: np.ndarray,
                            k: int) -> Tuple[np.ndarray, np.ndarray]:
  """The neighbours of `_artist_neighbours`, up to float rounding of ties.

  Per block of rows: float32 cosines with the whole genre; the k-th largest
  over some of the columns bounds the row's k-th largest from below, so
  every top-k column lies within _PREFILTER_SLACK above it; those few get
  exact float64 cosines and are ranked by them. Quadratic in a genre's
  artists like the exact search, but on float32, into reused buffers (fresh
  ones cost more in page faults than the product), and without partitioning
  every row: the real-shaped sizes have ~220K artists.
  """
  n = len(latent)
  unit = latent / np.linalg.norm(latent, axis=1, keepdims=True)
  unit32 = unit.astype(np.float32)
  nb = np.zeros((n, k), np.int64)
  sims = np.zeros((n, k))
  cosines = np.empty(_NEIGHBOUR_CELLS, np.float32)
  near = np.empty(_NEIGHBOUR_CELLS, bool)
  for g in np.unique(genre):
    rows = np.nonzero(genre == g)[0]
    cand = rows if len(rows) > 2 * k else np.arange(n)
    cand_t = np.ascontiguousarray(unit32[cand].T)
    # Columns are in artist order, which is random in the latents.
    n_sub = min(len(cand), 128 * k)
    block = max(1, min(_NEIGHBOUR_BLOCK, _NEIGHBOUR_CELLS // len(cand)))
    for lo in range(0, len(rows), block):
      r = rows[lo:lo + block]
      s = cosines[:len(r) * len(cand)].reshape(len(r), len(cand))
      np.matmul(unit32[r], cand_t, out=s)
      s[np.arange(len(r)), np.searchsorted(cand, r)] = -np.inf  # not itself
      bound = np.partition(s[:, :n_sub], n_sub - k, axis=1)[:, -k]
      m = near[:s.size].reshape(s.shape)
      np.greater_equal(s, (bound - _PREFILTER_SLACK)[:, None], out=m)
      er, ec = np.nonzero(m)
      exact = np.einsum("md,md->m", unit[r[er]], unit[cand[ec]])
      order = np.lexsort((-exact, er))
      er, ec, exact = er[order], ec[order], exact[order]
      take = np.searchsorted(er, np.arange(len(r)))[:, None] + np.arange(k)
      nb[r] = cand[ec[take]]
      sims[r] = exact[take]
  return nb, _neighbour_weights(sims)


def make_catalogue(rng: np.random.Generator,
                   size: sizes.SizeParams) -> Catalogue:
  """Builds genres, artists, albums and tracks.

  Args:
    rng: the catalogue's random stream.
    size: the dataset size.

  Returns:
    The catalogue, with latents, lengths, popularity and release days.
  """
  n, d = size.n_items, size.latent_dim
  sizes = _album_sizes(rng, n, size.tracks_per_album)
  n_albums = len(sizes)
  n_artists = max(2 * size.n_neighbours + 2,
                  int(n_albums / size.albums_per_artist))
  n_artists = min(n_artists, n_albums)

  genre_pop = 1.0 / (1.0 + np.arange(size.n_genres)) ** 0.8
  genre_pop /= genre_pop.sum()
  genre_center = rng.normal(0, 1, (size.n_genres, d))
  genre_len_shift = rng.normal(0, 0.2, size.n_genres)
  artist_genre = rng.choice(size.n_genres, n_artists, p=genre_pop)
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
  album_release = np.where(new, rng.uniform(0, size.days, n_albums),
                           -rng.uniform(0, 2 * size.days, n_albums))
  album_life = rng.lognormal(np.log(size.days / _LIFETIME_DIVISOR), 0.5,
                             n_albums)
  release = album_release[album]
  lifetime = album_life[album] * rng.lognormal(0, 0.3, n)
  release_period = np.floor(release / size.period_days).astype(np.int64)

  cum_base = np.cumsum(base)
  art_start = np.searchsorted(artist, np.arange(n_artists), "left")
  art_end = np.searchsorted(artist, np.arange(n_artists), "right")
  art_before = np.where(art_start > 0, cum_base[art_start - 1], 0.0)
  art_sum = cum_base[art_end - 1] - art_before
  search = (_fast_artist_neighbours if size.fast_neighbours
            else _artist_neighbours)
  nb, nb_w = search(artist_latent, artist_genre, size.n_neighbours)
  # Drawn last and in this order: moving a draw changes every file.
  if size.metadata_only_items:
    # Raw ids like the real download's, dense up to the full catalogue;
    # the metadata-only items take the others (`metadata`).
    item_ids = rng.choice(n + size.metadata_only_items, n,
                          replace=False).astype(np.uint32)
  else:
    item_ids = sparse_ids(rng, n, _ITEM_ID_RANGE)
  artist_ids = sparse_ids(rng, n_artists, _ARTIST_ID_RANGE)
  album_ids = sparse_ids(rng, n_albums, _ALBUM_ID_RANGE)

  album_end = album_start + sizes
  album_before = np.where(album_start > 0, cum_base[album_start - 1], 0.0)
  return Catalogue(
      item_ids=item_ids, artist=artist, album=album,
      next_in_album=next_in_album, latent=latent, length=length,
      base_popularity=base, release_day=release,
      release_period=release_period, lifetime_days=lifetime,
      cumulative_base=cum_base, artist_start=art_start, artist_end=art_end,
      artist_base_before=art_before, artist_base_sum=art_sum,
      artist_ids=artist_ids, artist_latent=artist_latent,
      artist_genre=artist_genre, artist_popularity=artist_pop,
      album_ids=album_ids, neighbours=nb, neighbour_weights=nb_w,
      genre_popularity=genre_pop,
      artist_first_period=np.minimum.reduceat(release_period, art_start),
      album_artist=album_artist, album_start=album_start,
      album_end=album_end, album_base_before=album_before,
      album_base_sum=cum_base[album_end - 1] - album_before,
      album_release=album_release,
      album_max_lifetime=np.maximum.reduceat(lifetime, album_start),
      artist_album_start=np.searchsorted(album_artist, np.arange(n_artists),
                                         "left"),
      artist_album_end=np.searchsorted(album_artist, np.arange(n_artists),
                                       "right"))
