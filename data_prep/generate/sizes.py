"""The dataset sizes: `SizeParams` and the table `SIZES` of named sizes.

Every field of `SizeParams` is written to params.json, so renaming one changes
the generated files.
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
