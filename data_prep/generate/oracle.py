"""The listen oracle: the exact rank of each listened item under the true
next-listen distribution, and, from `positive_oracle`, its rank under the
next-positive-listen distribution.

The distribution of a snapshot's next listen is written out entry by entry:
each component lists its items with their probabilities (the artist
components every track of the artist), entries of the same item add up, and
explore adds the same probability to every released item. Ranks break ties
pessimistically by raw item id (a fixed item order). A target that only
explore lists ties with every other released item that no component lists;
those are counted from the sorted raw ids of the released items, not listed.

`sampled_oracle` ranks a seeded sample of users only (`oracle_sample`), -1
and NaN elsewhere: at ~5M oracle listens (500m) ranking all is far slower
than the rest of the run.
"""

from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np

from data_prep.generate import components
from data_prep.generate import distribution
from data_prep.generate import positive_oracle
from data_prep.generate import simulation
from data_prep.generate import world as world_lib

# Snapshots ranked together: bounds the memory of the written-out entries.
_BATCH = 4096


class OracleResult(NamedTuple):
  """Per snapshot: the target's rank (1 = most likely) and probability under
  the listen oracle, then under the positive oracle (-1 and NaN where the
  positive oracle did not rank it)."""
  rank: np.ndarray
  prob: np.ndarray
  positive_rank: np.ndarray
  positive_prob: np.ndarray


def oracle_recall(oracle_ranks: np.ndarray,
                  ks: Sequence[int] = (10, 100, 500)) -> Dict[str, float]:
  """Recall@k of the oracle: the share of targets ranked within the top k.

  Args:
    oracle_ranks: the targets' ranks, 1-based.
    ks: the cut-offs.

  Returns:
    {"recall@k": share} per k; NaN when there are no targets.
  """
  ranks = np.asarray(oracle_ranks)
  if ranks.size == 0:
    return {f"recall@{k}": float("nan") for k in ks}
  return {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}


def _expand_artists(world: world_lib.World, entry: np.ndarray,
                    artists: np.ndarray, weights: np.ndarray,
                    periods: np.ndarray):
  """(entry, item, prob) for every track of each (entry, artist, weight):
  the artist's weight spread by base popularity * freshness."""
  catalogue = world.catalogue
  which, items = catalogue.artist_tracks(artists)
  period = periods[which]
  prob = (weights[which] * catalogue.base_popularity[items] *
          catalogue.freshness(items, period, world.size.period_days) /
          world.timeline.artist_norm[period, artists[which]])
  return entry[which], items, prob


def _slot_entries(entry: np.ndarray, slots: np.ndarray, weights: np.ndarray):
  """Flattens (m, S) slot values and weights; drops zero weights."""
  e = np.repeat(entry, slots.shape[1])
  keep = weights.ravel() > 0
  return e[keep], slots.ravel()[keep], weights.ravel()[keep]


def _released_ids(world: world_lib.World,
                  periods: np.ndarray) -> Dict[int, np.ndarray]:
  """Per period, the sorted raw ids of the items released by then: explore
  ties are broken by raw id. Built once per chunk, for its few periods."""
  timeline = world.timeline
  return {int(q): np.sort(world.catalogue.item_ids[
      timeline.by_release[:timeline.n_released[q]]])
          for q in np.unique(periods)}


def _normalised(weights: np.ndarray, share: np.ndarray) -> np.ndarray:
  """Rows of `weights` scaled to sum to `share` (all-zero rows stay 0)."""
  return weights / np.maximum(weights.sum(1, keepdims=True), 1e-300) * share


def _oracle_batch(world: world_lib.World, snapshots: simulation.Snapshots,
                  lo: int, hi: int, released_ids: Dict[int, np.ndarray],
                  positive: Optional[np.ndarray],
                  dense: positive_oracle.DenseContext) -> OracleResult:
  """The oracle of snapshots [lo, hi) (sorted by user).

  `released_ids`: `_released_ids` of the snapshots' periods. The positive
  oracle ranks the rows where `positive` is set (none when it is None).
  """
  catalogue, timeline, users = world.catalogue, world.timeline, world.users
  m = hi - lo
  row = np.arange(m)
  u = snapshots.user[lo:hi]
  s = np.maximum(snapshots.seed[lo:hi], 0)
  per = snapshots.period[lo:hi]
  mix = snapshots.mixture[lo:hi]
  parts = []

  # Every component's (entry, item, probability); entries are rows here.
  parts.append((row, catalogue.next_in_album[s], mix[:, components.ALBUM]))
  parts.append(_expand_artists(world, row, catalogue.artist[s],
                               mix[:, components.ARTIST], per))
  nw = _normalised(distribution.neighbour_weights(world, s, per),
                   mix[:, [components.NEIGHBOUR]])
  e, art, w = _slot_entries(row, catalogue.neighbours[catalogue.artist[s]],
                            nw)
  parts.append(_expand_artists(world, e, art, w, per[e]))
  fw = _normalised(distribution.fav_track_weights(world, u, per),
                   mix[:, [components.FAV_TRACK]])
  parts.append(_slot_entries(row, users.fav_tracks[u], fw))
  aw = _normalised(distribution.fav_artist_weights(world, u, per),
                   mix[:, [components.FAV_ARTIST]])
  e, art, w = _slot_entries(row, users.fav_artists[u], aw)
  parts.append(_expand_artists(world, e, art, w, per[e]))
  hl = snapshots.history_len[lo:hi]
  rw = (np.arange(world.size.repeat_window)[None, :] < hl[:, None]) * (
      mix[:, [components.REPEAT]] / np.maximum(hl, 1)[:, None])
  parts.append(_slot_entries(row, snapshots.history[lo:hi], rw))
  parts.append(_slot_entries(
      row, timeline.trend_items[per],
      timeline.trend_prob[per] * mix[:, [components.TRENDING]]))

  # Sum the entries per (row, item): the listed items of each row.
  e = np.concatenate([x[0] for x in parts])
  it = np.concatenate([x[1] for x in parts])
  w = np.concatenate([x[2] for x in parts])
  keep = w > 0
  n_items = catalogue.n_items
  key = e[keep].astype(np.int64) * n_items + it[keep]
  uniq, inv = np.unique(key, return_inverse=True)
  listed_row, listed_item = uniq // n_items, uniq % n_items
  # Explore gives every released item the same probability: added to the
  # listed items here, and counted for all the others below.
  n_rel = timeline.n_released[per]
  explore = mix[:, components.EXPLORE] / np.maximum(n_rel, 1)
  released = catalogue.release_period[listed_item] <= per[listed_row]
  prob = np.bincount(inv, weights=w[keep]) + np.where(
      released, explore[listed_row], 0.0)
  target = snapshots.target[lo:hi]
  target_key = row * n_items + target
  pos = np.minimum(np.searchsorted(uniq, target_key), len(uniq) - 1)
  listed = uniq[pos] == target_key
  target_prob = np.where(listed, prob[pos], explore)
  if np.any(target_prob <= 0):
    raise AssertionError("oracle: a listened item has probability 0")
  # Ties are broken pessimistically by raw item id (a fixed item order).
  target_id = catalogue.item_ids[target]
  smaller = catalogue.item_ids[listed_item] < target_id[listed_row]
  better = ((prob > target_prob[listed_row]) |
            ((prob == target_prob[listed_row]) & smaller))
  rank = 1 + np.bincount(listed_row, weights=better,
                         minlength=m).astype(np.int64)
  # A target with explore probability only ties with every unlisted released
  # item (listed ones have more); those with a smaller raw id rank ahead.
  tie = np.nonzero(~listed)[0]
  if len(tie):
    listed_smaller = np.bincount(listed_row, weights=released & smaller,
                                 minlength=m)
    smaller_released = np.zeros(len(tie), np.int64)
    for q, ids in released_ids.items():
      rows = per[tie] == q
      smaller_released[rows] = np.searchsorted(ids, target_id[tie][rows],
                                               "left")
    rank[tie] += smaller_released - listed_smaller[tie].astype(np.int64)
  pos_rank = np.full(m, -1, np.int64)
  pos_prob = np.full(m, np.nan)
  if positive is not None and positive.any():
    rows = np.nonzero(positive)[0]
    pos_rank[rows], pos_prob[rows] = positive_oracle.positive_batch(
        world, snapshots, lo, rows,
        positive_oracle.ListedItems(row=listed_row, item=listed_item,
                                    prob=prob),
        explore, target_prob, dense)
  return OracleResult(rank, target_prob, pos_rank, pos_prob)


def oracle(world: world_lib.World, snapshots: simulation.Snapshots,
           positive: Optional[np.ndarray] = None,
           dense: Optional[positive_oracle.DenseContext] = None
           ) -> OracleResult:
  """Ranks every snapshot's target under both oracles.

  In batches of snapshots sorted by user, so that a user's dense pass (see
  `positive_oracle`) is shared.

  Args:
    world: the world.
    snapshots: the snapshots, in any order.
    positive: where the positive oracle ranks (all rows when None).
    dense: `positive_oracle.dense_context` of the ranked periods or later
      ones, when computed once for many calls.

  Returns:
    The ranks and probabilities, in the snapshots' order.
  """
  n = len(snapshots.user)
  if positive is None:
    positive = np.ones(n, bool)
  order = np.argsort(snapshots.user, kind="stable")
  snapshots = snapshots.take(order)
  positive = positive[order]
  if dense is None:
    dense = positive_oracle.dense_context(world, snapshots.period[positive])
  parts = [[np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0, np.int64)],
           [np.zeros(0)]]
  released_ids = _released_ids(world, snapshots.period)
  for lo in range(0, n, _BATCH):
    result = _oracle_batch(world, snapshots, lo, min(n, lo + _BATCH),
                           released_ids, positive[lo:lo + _BATCH], dense)
    for part, x in zip(parts, result):
      part.append(x)
  out = []
  for part in parts:
    x = np.concatenate(part)
    x[order] = x.copy()  # Back to the snapshots' order.
    out.append(x)
  return OracleResult(*out)


def sampled_oracle(rng: np.random.Generator, world: world_lib.World,
                   snapshots: simulation.Snapshots, listen_quota: int,
                   positive_quota: int,
                   dense: Optional[positive_oracle.DenseContext] = None
                   ) -> OracleResult:
  """Both oracles of a seeded sample of users, -1 (NaN) for the others.

  Whole users, as for the positive oracle (`positive_oracle.positive_sample`):
  about `listen_quota` snapshots for the listen oracle, and among them about
  `positive_quota` for the positive one, which needs the listen oracle's
  entries of the same snapshots.

  Args:
    rng: the oracle's random stream.
    world: the world.
    snapshots: the chunk's snapshots.
    listen_quota: at most this many snapshots ranked.
    positive_quota: at most this many of them ranked by the positive oracle.
    dense: as for `oracle`.

  Returns:
    The ranks and probabilities, in the snapshots' order.
  """
  n = len(snapshots.user)
  rows = np.nonzero(positive_oracle.positive_sample(rng, snapshots,
                                                    listen_quota))[0]
  sample = snapshots.take(rows)
  positive = positive_oracle.positive_sample(rng, sample, positive_quota)
  out = OracleResult(np.full(n, -1, np.int64), np.full(n, np.nan),
                     np.full(n, -1, np.int64), np.full(n, np.nan))
  for full, part in zip(out, oracle(world, sample, positive, dense)):
    full[rows] = part
  return out
