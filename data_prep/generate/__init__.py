"""A seeded, deterministic generator of a dataset in the raw Yambda layout.

The files it writes look like a Yambda download to the rest of the project
(same paths, same schemas, sparse raw ids), and every listen is drawn from a
known next-listen distribution P(next | user, seed track, time). For the last
`oracle_days` days (the validation and test days of the evaluation, and the
gap before the validation window) it also writes, per listen, the exact rank
of the listened item under that distribution (the "oracle") and under the
next-POSITIVE-listen distribution (the "positive oracle").

Why two oracles. The evaluation's targets are not next listens but next
positive listens: played at least LISTEN_PLUS_RATIO percent (Yambda's Listen+)
and not disliked (`is_positive`). Here the played ratio depends on the user's
affinity to the track, so positivity is informative: a model of the evaluated
target should rank a track the user will likely play through above an equally
likely listen they will likely skip. The listen oracle ignores that, so it is
not a ceiling for the evaluated metric; the positive oracle is. Given the
state before a listen, P(it is item i | it is positive) is proportional to
P(next listen = i) * P(positive | user, i), and P(positive | user, i) =
positive_prob(affinity(user, i)) = (1 - p_skip) * (p_full + (1 - p_full) *
50/69): not skipped, then played through (or replayed), or played partly with
a uniform ratio in 31..99, 50 of whose 69 values reach 50 (dislikes only
follow skips, so a listen that reaches it is positive). The sampler draws
ratios from the same probabilities and affinity (`played_ratio`). The positive
oracle's rank is exact (ties broken pessimistically by raw item id, as for the
listen oracle); its probability is to float32 precision. Its rank is written
for every listen (only positive listens are targets). For the `large` size (1M
items) it is computed for a seeded sample of users only, about
`positive_oracle_sample` listens in all, -1 (probability NaN) elsewhere: the
rank needs P(positive) of every released item for each user (explore gives
every item listen probability, and each has its own P(positive)), which at 1M
items makes ranking all of the oracle window's listens far slower than the
rest of the run.

Sizes. `tiny` (tests), `demo` (the quick start) and `large` (benchmarks)
are the published ones: their files must not change, so everything below is
switched on by `SizeParams` fields whose defaults are their behaviour. `50m`
and `500m` have the real download's shapes: 10,000 / 100,000 users with the
same long-tailed activity, about 934K / 3.0M tracks played, about 50M /
500M events over 301 days (timestamps up to 26,006,400 s: the protocol's
last timestamp, 26,000,000, with a test day and a validation day before it),
written where a download has them (flat/50m/, flat/500m/). Their metadata
files are the full catalogue's, like the real ones (shared by all sizes):
about 9.39M items, 9.27M with an artist, 8.65M on an album (9.65M rows:
about 1M also on a compilation), 7.72M with embeddings (`embed` and
`normalized_embed`, 128 wide); the items never played are metadata-only
items with raw ids of their own (`metadata`). For speed, these sizes draw
an artist's track by album from per-period tables (`timeline`), search
artist neighbours with a float32 pre-filter, and give every chunk of users
its own random streams, so that chunks run in a pool of `--workers`
processes (`parallel`) with the same bytes whatever their number. Their
listen oracle too ranks a seeded sample of users only (`oracle_sample`,
about 10K / 50K listens, the positive oracle 5K / 10K of them; -1 and
NaN elsewhere): ranking the ~5M oracle listens of 500m against 3M items
would take longer than the rest of the run. The evaluation reports the
oracle over the examples it has ranks for.

The generative model, per user and listen:
  * Catalogue: genres -> artists (latent taste vectors) -> albums -> tracks,
    with audio embeddings that are a noisy projection of the track latent.
    Popularity is long-tailed and drifts: each album has a release day (some
    within the timeline) and each track a freshness that decays after release.
  * Next listen = a per-user mixture of eight components (album, artist,
    neighbour, fav_track, fav_artist, repeat, trending, explore; see
    `distribution`). The first listen of a session ignores the seed.
  * The played ratio depends on the user's affinity to the track: tracks far
    from their taste (most explore listens) are skipped or played partly,
    tracks close to it are played through, replayed and liked. So the ratio
    (the example weight) tells signal from noise, as it should for weights
    to matter; and the strong popularity drift (short freshness, many
    releases) is what example age is for.

Modules, in the order data flows through them:
  sizes           SizeParams and the SIZES table;
  components      the mixture's components, their order and weights;
  catalogue       genres, artists, albums, tracks, freshness;
  timeline        per-period popularity tables (and album tables);
  users           tastes, favourites, mixture weights, activity;
  world           World: size, catalogue, timeline and users in one object;
  sampling        the categorical draw the others share;
  distribution    the next-listen mixture and its sampler;
  played_ratio    affinity, played ratio, P(positive), the positive rule;
  simulation      events and oracle snapshots of a chunk of users;
  oracle          the listen oracle (and the driver of both oracles);
  positive_oracle the positive oracle;
  writers         the parquet files, the oracle file and params.json;
  metadata        the real-shaped sizes' metadata files, metadata-only items;
  parallel        the pool that runs chunks in order-preserving parallel;
  run             generate(): one whole run.

Usage:
  python -m data_prep.generate --size=demo --output_dir=/tmp/gen_demo \
      [--seed=0] [--workers=N]
"""

# The public API, used outside the package.
# pylint: disable=g-importing-member
from data_prep.generate.components import ALBUM
from data_prep.generate.components import ARTIST
from data_prep.generate.components import COMPONENTS
from data_prep.generate.components import EXPLORE
from data_prep.generate.components import FAV_ARTIST
from data_prep.generate.components import FAV_TRACK
from data_prep.generate.components import NEIGHBOUR
from data_prep.generate.components import REPEAT
from data_prep.generate.components import TRENDING
from data_prep.generate.oracle import oracle_recall
from data_prep.generate.played_ratio import is_positive
from data_prep.generate.played_ratio import LISTEN_PLUS_RATIO
from data_prep.generate.played_ratio import positive_prob
from data_prep.generate.run import generate
from data_prep.generate.sizes import DAY
from data_prep.generate.sizes import SIZES
from data_prep.generate.sizes import SizeParams
from data_prep.generate.writers import ORACLE_SCHEMA
from data_prep.generate.writers import oracle_path
from data_prep.generate.writers import params_path

__all__ = [
    "ALBUM", "ARTIST", "COMPONENTS", "DAY", "EXPLORE", "FAV_ARTIST",
    "FAV_TRACK", "LISTEN_PLUS_RATIO", "NEIGHBOUR", "ORACLE_SCHEMA", "REPEAT",
    "SIZES", "SizeParams", "TRENDING", "generate", "is_positive",
    "oracle_path", "oracle_recall", "params_path", "positive_prob",
]
