"""The positive oracle: ranks under the next-POSITIVE-listen distribution.

P(next positive listen = i | state) is proportional to P(next listen = i |
state) * positive_prob(affinity(user, i)), the item's score. Every released
item that no component lists has listen probability `explore`, so its score
explore * positive_prob(affinity) differs per item: the rank needs, per
snapshot, the count of released items whose score beats the target's.

Per block of users, one float32 product of their taste vectors with every
released latent (plus the favourite bonuses) gives positive_prob of every
released item to within _FILTER (relative): enough to count the items that
surely beat the target or surely do not, and for the normaliser (explore *
the row's sum, plus the listed items' extra). The few within _FILTER of the
target's score are decided by the exact float64 score, from
`played_ratio.affinity` and `positive_prob` as the sampler computes them;
the listed items are counted by their own score, not the unlisted one.
"""

from typing import NamedTuple, Tuple

import numpy as np

from data_prep.generate import played_ratio
from data_prep.generate import simulation
from data_prep.generate import world as world_lib

_DENSE_ELEMENTS = 1 << 18  # (users x released items) per dense block
# Relative. A bulk (float32) positive_prob is off by less than 2e-5: its
# taste by <= 1.3e-6 (16 products of unit vectors' components), times a slope
# <= 1.8, plus float32 rounding, over positive_prob >= 0.18. (Seen: 4e-7.)
_FILTER = 1e-4


class DenseContext(NamedTuple):
  """What the dense pass needs about the released items."""
  # (latent_dim, n) float32 unit latents of the items released by the last
  # period ranked, in release order.
  unit_latents_t: np.ndarray
  column_of: np.ndarray  # each item's column in release order


class ListedItems(NamedTuple):
  """The items some component lists, per snapshot row of a batch, sorted by
  (row, item), with their listen probabilities (explore included)."""
  row: np.ndarray
  item: np.ndarray
  prob: np.ndarray


def _beats(score: np.ndarray, target_score: np.ndarray,
           smaller: np.ndarray) -> np.ndarray:
  """Whether items of these scores rank ahead of targets of these scores
  (ties: the smaller raw id first)."""
  return (score > target_score) | ((score == target_score) & smaller)


def _exact_positive_prob(world: world_lib.World, user: np.ndarray,
                         items: np.ndarray) -> np.ndarray:
  """P(positive) of each (user, item) listen, as the sampler computes it."""
  return played_ratio.positive_prob(played_ratio.affinity(world, user, items))


def dense_context(world: world_lib.World,
                  periods: np.ndarray) -> DenseContext:
  """The released items' unit latents, for snapshots of these periods."""
  catalogue, timeline = world.catalogue, world.timeline
  n_max = int(timeline.n_released[periods].max()) if len(periods) else 0
  lat = catalogue.latent[timeline.by_release[:n_max]]
  unit_t = np.ascontiguousarray(
      (lat.astype(np.float64) /
       np.linalg.norm(lat, axis=1).astype(np.float64)[:, None]).T
      ).astype(np.float32)
  column_of = np.empty(catalogue.n_items, np.int64)
  column_of[timeline.by_release] = np.arange(catalogue.n_items)
  return DenseContext(unit_t, column_of)


def _bonus_items(world: world_lib.World, block_users: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """(index into block_users, item) for every item with a favourite bonus:
  the favourite tracks and the favourite artists' tracks, of every slot."""
  users = world.users
  idx = np.arange(len(block_users))
  n_ft, n_fa = users.fav_tracks.shape[1], users.fav_artists.shape[1]
  r, items = world.catalogue.artist_tracks(
      users.fav_artists[block_users].ravel())
  return (np.concatenate([np.repeat(idx, n_ft), np.repeat(idx, n_fa)[r]]),
          np.concatenate([users.fav_tracks[block_users].ravel(), items]))


def _count_beats(world: world_lib.World, u: np.ndarray, se: np.ndarray,
                 si: np.ndarray, factor: np.ndarray, approx: np.ndarray,
                 st: np.ndarray, tgt: np.ndarray, k: int) -> np.ndarray:
  """Per row, how many of the entries (row se, item si, score factor *
  positive_prob, approximately `approx`) rank ahead of the row's target
  (exact score st; ties: the smaller raw id first). The target's own entry
  never does. Entries within _FILTER of st get the exact score."""
  item_ids = world.catalogue.item_ids
  # Candidates first: usually few entries score near or above the target.
  cand = np.nonzero(approx >= (st * (1 - _FILTER))[se])[0]
  cand = cand[si[cand] != tgt[se[cand]]]
  ce, ci, cf = se[cand], si[cand], factor[cand]
  beats = approx[cand] > st[ce] * (1 + _FILTER)
  near = np.nonzero(~beats)[0]
  exact = cf[near] * _exact_positive_prob(world, u[ce[near]], ci[near])
  beats[near] = _beats(exact, st[ce[near]],
                       item_ids[ci[near]] < item_ids[tgt[ce[near]]])
  return np.bincount(ce[beats], minlength=k)


def positive_batch(world: world_lib.World, snapshots: simulation.Snapshots,
                   lo: int, rows: np.ndarray, listed: ListedItems,
                   explore: np.ndarray, target_prob: np.ndarray,
                   dense: DenseContext) -> Tuple[np.ndarray, np.ndarray]:
  """Positive-oracle ranks and probabilities of some snapshots of a batch.

  Args:
    world: the world.
    snapshots: all snapshots, sorted by user.
    lo: the batch's first snapshot.
    rows: the rows of the batch to rank (snapshots lo + rows).
    listed: the batch's listed items, from the listen oracle.
    explore: the batch's explore probability per row.
    target_prob: the listen probability of each row's target.
    dense: `dense_context` of the ranked snapshots' periods.

  Returns:
    (rank, probability) per ranked row.
  """
  catalogue, timeline, users = world.catalogue, world.timeline, world.users
  unit_t, col_of = dense
  k = len(rows)
  g = lo + rows
  u, per, tgt = snapshots.user[g], snapshots.period[g], snapshots.target[g]
  ex = explore[rows]
  n_rel = timeline.n_released[per]

  # The entries: the listed items of the rows, sorted by (row, item). (An
  # unlisted target has the unlisted score, and never counts anyway.)
  if k == len(explore):
    se, si, lp = listed
  else:
    local = np.full(len(explore), -1, np.int64)
    local[rows] = np.arange(k)
    le = local[listed.row]
    keep = le >= 0
    se, si, lp = le[keep], listed.item[keep], listed.prob[keep]
  col = col_of[si]  # listed items are released (listen probability > 0)
  row_start = np.searchsorted(se, np.arange(k + 1))
  # The targets' listen probabilities are those the listen oracle ranked.
  st = target_prob[rows] * _exact_positive_prob(world, u, tgt)
  if np.any(st <= 0):
    raise AssertionError("positive oracle: a listened item has score 0")
  thr = st / ex  # unlisted items beat the target where their pp is above

  pj = np.zeros(len(si), np.float32)  # approximate pp of each entry's item
  plain_sum = np.zeros(k)        # approximate sum of pp over released items
  count = np.zeros(k, np.int64)  # unlisted-score items that beat the target
  tp = np.zeros(k, np.float32)   # approximate pp of the target
  near_rows, near_items = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  dense_row = np.zeros(k, bool)  # rows where some can
  user_list, row_user = np.unique(u, return_inverse=True)
  entry_user = row_user[se]
  vec = users.taste[user_list].astype(np.float32)
  ucuts = np.unique(n_rel)
  starts = np.r_[0, ucuts[:-1]]
  block = max(1, _DENSE_ELEMENTS // int(ucuts[-1]))
  unit_t = unit_t[:, :ucuts[-1]]
  for b in range(0, len(user_list), block):
    ub = user_list[b:b + block]
    ra, rb = np.searchsorted(row_user, [b, b + block])
    rr = np.arange(ra, rb)
    ru = row_user[rr] - b
    # Not a BLAS product: threaded BLAS on short rows crawls on a busy
    # machine.
    aff = np.einsum("bd,dn->bn", vec[b:b + block], unit_t)
    bi, items = _bonus_items(world, ub)
    c = col_of[items]
    ok = c < aff.shape[1]
    bi, items, c = bi[ok], items[ok], c[ok]
    aff[bi, c] = played_ratio.affinity(world, ub[bi], items,
                                       aff[bi, c].astype(np.float64))
    pp = played_ratio.positive_prob(aff)  # float32
    cut = np.searchsorted(ucuts, n_rel[rr])
    plain_sum[rr] = np.cumsum(
        np.add.reduceat(pp, starts, axis=1, dtype=np.float64), axis=1)[ru, cut]
    top = np.maximum.accumulate(np.maximum.reduceat(pp, starts, axis=1),
                                axis=1)[ru, cut]
    ea, eb = row_start[ra], row_start[rb]
    pj[ea:eb] = np.take(pp, (entry_user[ea:eb] - b) * pp.shape[1] +
                        col[ea:eb])
    tp[rr] = pp[ru, col_of[tgt[rr]]]
    dense_row[rr] = thr[rr] <= top * (1 + _FILTER)
    # Row by row: a 1-d count is much faster than a 2-d one along rows.
    for r in rr[dense_row[rr]]:
      a = pp[row_user[r] - b, :n_rel[r]]
      hi_t = np.float32(thr[r] * (1 + _FILTER))
      lo_t = np.float32(thr[r] * (1 - _FILTER))
      count[r] = np.count_nonzero(a > hi_t)
      near = np.count_nonzero(a >= lo_t) - count[r]
      if tp[r] > hi_t:
        raise AssertionError("positive oracle: the target beats itself")
      if near > (tp[r] >= lo_t):  # Items near the target's score: below.
        items = timeline.by_release[np.nonzero((a >= lo_t) & (a <= hi_t))[0]]
        near_items.append(items)
        near_rows.append(np.full(len(items), r))

  # Unlisted scores near the target's: the exact comparison.
  rf, items = np.concatenate(near_rows), np.concatenate(near_items)
  other = items != tgt[rf]
  rf, items = rf[other], items[other]
  exact = ex[rf] * _exact_positive_prob(world, u[rf], items)
  count += np.bincount(rf[_beats(exact, st[rf], catalogue.item_ids[items] <
                                 catalogue.item_ids[tgt[rf]])], minlength=k)
  # The listed items count by their score, not by the unlisted one that the
  # dense count used (in dense rows only: elsewhere that beats nothing).
  score = lp * pj
  rank = 1 + count + _count_beats(world, u, se, si, lp, score, st, tgt, k)
  d = np.nonzero(dense_row[se])[0]
  rank -= _count_beats(world, u, se[d], si[d], ex[se[d]], ex[se[d]] * pj[d],
                       st, tgt, k)
  # Each row's sums over its entries (rows without any have none).
  score_sum, pj_sum = np.zeros(k), np.zeros(k)
  has = np.nonzero(row_start[:-1] < row_start[1:])[0]
  score_sum[has] = np.add.reduceat(score, row_start[has])
  pj_sum[has] = np.add.reduceat(pj, row_start[has], dtype=np.float64)
  norm = ex * (plain_sum - pj_sum) + score_sum
  return rank, st / norm


def positive_sample(rng: np.random.Generator,
                    snapshots: simulation.Snapshots,
                    quota: int) -> np.ndarray:
  """Draws a seeded sample of snapshots for the positive oracle (or the
  listen oracle, `oracle.sampled_oracle`).

  Every snapshot of randomly chosen users (users, not single snapshots,
  because the dense pass costs per user).

  Args:
    rng: the oracle's random stream.
    snapshots: the chunk's snapshots.
    quota: at most this many snapshots in all.

  Returns:
    A bool mask over the snapshots.
  """
  user_list, counts = np.unique(snapshots.user, return_counts=True)
  order = rng.permutation(len(user_list))
  chosen = user_list[order[np.cumsum(counts[order]) <= quota]]
  return np.isin(snapshots.user, chosen)
