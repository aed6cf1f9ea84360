"""The dataset sizes: `SizeParams` and the table `SIZES` of named sizes.

Every field of `SizeParams` is written to params.json, so renaming one changes
the generated files. The fields after `positive_oracle_sample` switch on what
the real-shaped sizes (50m, 500m) need; their defaults are the behaviour the
other sizes were published with, so those sizes' parquet files do not change.
"""

import dataclasses
from typing import Dict

DAY = 86400  # seconds


@dataclasses.dataclass(frozen=True)
class SizeParams:
  """Parameters of one dataset size."""
  n_users: int
  n_items: int
  days: int
  events_per_user: float        # mean listens per user
  n_genres: int = 24
  tracks_per_album: float = 8.0
  albums_per_artist: float = 2.0
  latent_dim: int = 16
  embed_dim: int = 128
  period_days: int = 1          # popularity is constant within a period
  trend_k: int = 300            # size of the trending component's support
  n_neighbours: int = 10        # similar artists per artist
  repeat_window: int = 20
  session_mean: float = 12.0    # mean listens per session
  max_events_factor: float = 4.0
  # The oracle covers the validation and test days (and the gap before the
  # validation window, which starts 3600 s before end - 2 days).
  oracle_days: int = 3
  chunk_users: int = 4096       # users simulated (and written) together
  # 0: the positive oracle ranks every oracle listen. Otherwise at most this
  # many: every oracle listen of a seeded sample of users, each chunk its
  # share; the others get -1. See the package docstring.
  positive_oracle_sample: int = 0
  # The listen oracle likewise: at most this many listens, every oracle
  # listen of a seeded sample of users (the positive oracle's sample is
  # drawn among them); -1 elsewhere. 0: every listen.
  oracle_sample: int = 0
  # Rejection sampling of an artist's track: proposals per pending listen in
  # each round after the first (taking the first accepted one keeps it
  # exact). 1 draws the random stream as the published sizes did.
  proposals_per_round: int = 1
  # Draw an artist's track by album: the album from per-period tables (one
  # search), the track by rejection within it (see `timeline`), for the
  # three components that pick an artist in one call. Same distribution,
  # far fewer proposals than rejection over the whole artist.
  album_tables: bool = False
  # Artist neighbours from a float32 pre-filter and exact float64 cosines of
  # the candidates, instead of float64 products of whole genres.
  fast_neighbours: bool = False
  # Every chunk of users its own random streams (spawned per chunk), so that
  # chunks can run in parallel processes with the same bytes.
  independent_chunk_streams: bool = False
  # Items that are never listened to, only in the metadata files (raw ids
  # disjoint from the catalogue's). More than 0 also writes the metadata
  # with the real download's shares, streamed (see `metadata`).
  metadata_only_items: int = 0
  # Share of the album-mapped items that are also on a compilation album.
  second_album_share: float = 0.0


SIZES: Dict[str, SizeParams] = {
    "tiny": SizeParams(n_users=400, n_items=3000, days=20,
                       events_per_user=110, n_genres=8, trend_k=100,
                       chunk_users=400),
    "demo": SizeParams(n_users=4000, n_items=35000, days=60,
                       events_per_user=420, n_genres=24, trend_k=300,
                       chunk_users=4000),
    "large": SizeParams(n_users=100_000, n_items=1_000_000, days=300,
                        events_per_user=480, n_genres=40, period_days=3,
                        trend_k=1000, chunk_users=8192,
                        positive_oracle_sample=20_000),
}

# The real download's shapes (see the package docstring): users, items
# played and events of Yambda's 50m and 500m, over 301 days so that the
# timeline ends just past the protocol's last timestamp, 26,000,000 s; and
# metadata of the full catalogue, about 9.39M items, for both.
_REAL_SHAPE = dict(days=301, n_genres=40, period_days=3, trend_k=1000,
                   proposals_per_round=8, album_tables=True,
                   fast_neighbours=True, independent_chunk_streams=True,
                   second_album_share=0.115)
_REAL_ITEMS = 9_390_000  # catalogue plus metadata-only items
SIZES["50m"] = SizeParams(n_users=10_000, n_items=950_000,
                          events_per_user=4_880, chunk_users=5000,
                          metadata_only_items=_REAL_ITEMS - 950_000,
                          oracle_sample=10_000, positive_oracle_sample=5_000,
                          **_REAL_SHAPE)
SIZES["500m"] = SizeParams(n_users=100_000, n_items=3_030_000,
                           events_per_user=4_880, chunk_users=7693,
                           metadata_only_items=_REAL_ITEMS - 3_030_000,
                           oracle_sample=50_000,
                           positive_oracle_sample=10_000,
                           **_REAL_SHAPE)
