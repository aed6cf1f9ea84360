"""Simulating a chunk of users: their events, and snapshots for the oracles.

Users of a chunk advance together, one listen per active user per step: the
next item from `distribution.sample_next`, then its outcome (organic flag,
played ratio, like/dislike, the gap to the next listen). Listens in the last
`oracle_days` days also leave a `Snapshots` row: the state the listen was
drawn from, which is all the oracles need.

A chunk holds all its events until the end (they are sorted by user), so
they are kept in compact types, in buffers sized for the most listens the
chunk's users may have (pages never written take no memory): a chunk of the
real-shaped sizes has tens of millions of rows, and step by step arrays
would leave that much again behind in the allocator once joined.
"""

import dataclasses
from typing import Dict, Iterator, NamedTuple, Tuple

import numpy as np

from data_prep import yambda
from data_prep.generate import components
from data_prep.generate import distribution
from data_prep.generate import played_ratio
from data_prep.generate import sizes
from data_prep.generate import world as world_lib

# P(undoing a like / a dislike) later, with an unlike / undislike.
_UNLIKE_PROB = 0.08
_UNDISLIKE_PROB = 0.12
# What a chunk keeps of each listen until it is assembled, and in what type.
_LISTEN_COLUMNS = (("user", np.int32), ("ts", np.int32), ("item", np.int32),
                   ("organic", bool), ("ratio", np.int16), ("like", bool),
                   ("dislike", bool), ("gap", np.int64))


@dataclasses.dataclass
class ChunkEvents:
  """Events of a chunk of users, sorted by (user, timestamp, event type)."""
  user: np.ndarray     # chunk-local user index, int32
  timestamp: np.ndarray  # int64
  item: np.ndarray     # int32
  organic: np.ndarray  # bool
  ratio: np.ndarray    # played ratio, percent; -1 for non-listens; int16
  event_type: np.ndarray  # index into yambda.EVENT_TYPES, int8


@dataclasses.dataclass
class Snapshots:
  """What the oracles need about each listen in the oracle window: the state
  it was drawn from (see `distribution.sample_next`) and its outcome."""
  user: np.ndarray
  timestamp: np.ndarray
  target: np.ndarray       # the listened item
  seed: np.ndarray
  period: np.ndarray
  mixture: np.ndarray      # (m, len(COMPONENTS)) the state's mixture weights
  history: np.ndarray      # (m, repeat_window)
  history_len: np.ndarray
  component: np.ndarray    # the component the target was drawn from
  ratio: np.ndarray        # the target listen's played ratio
  disliked: np.ndarray     # and whether it was disliked: its positivity

  def take(self, rows: np.ndarray) -> "Snapshots":
    """The snapshots at these row indices, in their order."""
    return Snapshots(**{field.name: getattr(self, field.name)[rows]
                        for field in dataclasses.fields(self)})


class ListenOutcome(NamedTuple):
  """How each listen went, and when the user's next listen starts."""
  organic: np.ndarray
  ratio: np.ndarray        # played ratio, percent
  like: np.ndarray
  dislike: np.ndarray
  gap: np.ndarray          # seconds to the user's next listen
  ends_session: np.ndarray


def listen_outcome(rng: np.random.Generator, world: world_lib.World,
                   user: np.ndarray, item: np.ndarray,
                   component: np.ndarray) -> ListenOutcome:
  """Draws the outcome of each listen.

  None of it feeds back into the next-listen distribution, so the listen
  oracle does not need it; the positive oracle needs P(positive), which
  `played_ratio.positive_prob` derives from the same affinity.

  Args:
    rng: the random stream.
    world: the world.
    user: user indices.
    item: the listened items.
    component: the component each was drawn from.

  Returns:
    The outcomes.
  """
  m = len(user)
  organic = rng.random(m) < components.ORGANIC_PROB[component]
  affinity = played_ratio.affinity(world, user, item)
  ratio = played_ratio.draw_played_ratio(rng, affinity)
  skip = ratio <= 30
  like = ~skip & (rng.random(m) < 0.25 * np.clip(affinity - 0.3, 0, 1))
  dislike = skip & (rng.random(m) < 0.1 * np.clip(0.6 - affinity, 0, 1))

  # Within a session the next listen starts when this one stops playing.
  played = np.maximum(1, (world.catalogue.length[item] * ratio) // 100)
  ends_session = rng.random(m) < 1.0 / world.size.session_mean
  pause = np.maximum(600, rng.exponential(world.users.session_gap[user])
                     ).astype(np.int64)
  gap = played + np.where(ends_session, pause, rng.integers(2, 12, m))
  return ListenOutcome(organic=organic, ratio=ratio, like=like,
                       dislike=dislike, gap=gap, ends_session=ends_session)


def simulate_chunk(rng: np.random.Generator, world: world_lib.World,
                   lo: int, hi: int) -> Tuple[ChunkEvents, Snapshots]:
  """Simulates users [lo, hi) over the whole timeline.

  Args:
    rng: the simulation's random stream, shared by the chunks in order.
    world: the world.
    lo: the chunk's first user.
    hi: one past its last user.

  Returns:
    (the chunk's events, the snapshots of its listens in the oracle window).
  """
  listens, snapshots = _simulate(rng, world, lo, hi)
  return _assemble_events(rng, listens, world.size.days * sizes.DAY), snapshots


def simulate_chunk_blocks(rng: np.random.Generator, world: world_lib.World,
                          lo: int, hi: int, block_users: int
                          ) -> Tuple[Iterator[ChunkEvents], Snapshots]:
  """`simulate_chunk`, its events assembled block of users by block.

  A chunk's listens are kept (compact) until its last user is done; the
  like/dislike rows, the sort and the tables are made per block of users,
  so they never exist for the whole chunk at once. The random stream is
  drawn in another order than `simulate_chunk`'s.

  Args:
    rng: the chunk's random stream.
    world: the world.
    lo: the chunk's first user.
    hi: one past its last user.
    block_users: users per block.

  Returns:
    (the events of each block in order, with chunk-local users; the
    snapshots).
  """
  listens, snapshots = _simulate(rng, world, lo, hi)
  user = listens["user"]
  # Stable: each user's listens stay in step order, which is time order.
  order = np.argsort(user.astype(np.uint16) if hi - lo <= 1 << 16 else user,
                     kind="stable")
  firsts = np.r_[0, np.cumsum(np.bincount(user, minlength=hi - lo))]
  cuts = firsts[np.minimum(np.arange(0, hi - lo + block_users, block_users),
                           hi - lo)]

  def blocks() -> Iterator[ChunkEvents]:
    for a, b in zip(cuts[:-1], cuts[1:]):
      rows = order[a:b]
      yield _assemble_events(rng, {k: v[rows] for k, v in listens.items()},
                             world.size.days * sizes.DAY)

  return blocks(), snapshots


def _simulate(rng: np.random.Generator, world: world_lib.World, lo: int,
              hi: int) -> Tuple[Dict[str, np.ndarray], Snapshots]:
  """The simulation loop: the chunk's listens (columns in step order, users
  chunk-local) and its snapshots."""
  size = world.size
  n = hi - lo
  end = size.days * sizes.DAY
  oracle_start = end - size.oracle_days * sizes.DAY
  period_seconds = size.period_days * sizes.DAY
  window = size.repeat_window

  now = world.users.start[lo:hi] + rng.integers(0, 3600, n)
  max_events = world.users.max_events[lo:hi]
  capacity = int(max_events.sum())
  listens = {k: np.empty(capacity, dtype) for k, dtype in _LISTEN_COLUMNS}
  filled = 0
  snaps = {f.name: [] for f in dataclasses.fields(Snapshots)}
  state = _initial_state(now, max_events, lo, end, window)
  while len(state["local"]):
    # The state each active user's next listen is drawn from.
    u, times, seeds = state["user"], state["now"], state["seed"]
    hist, hist_len = state["history"], state["history_len"]
    period = times // period_seconds
    mix = distribution.mixture(world, u, seeds, period, state["first"],
                               hist_len)
    item, comp = distribution.sample_next(rng, world, u, seeds, period, mix,
                                          hist, hist_len)
    outcome = listen_outcome(rng, world, u, item, comp)

    in_window = np.nonzero(times >= oracle_start)[0]
    if len(in_window):
      for k, v in (("user", u), ("timestamp", times), ("target", item),
                   ("seed", seeds), ("period", period), ("mixture", mix),
                   ("history", hist), ("history_len", hist_len),
                   ("component", comp), ("ratio", outcome.ratio),
                   ("disliked", outcome.dislike)):
        snaps[k].append(v[in_window])
    rows = slice(filled, filled + len(u))
    for k, v in (("user", state["local"]), ("ts", times), ("item", item),
                 ("organic", outcome.organic), ("ratio", outcome.ratio),
                 ("like", outcome.like), ("dislike", outcome.dislike),
                 ("gap", outcome.gap)):
      listens[k][rows] = v
    filled += len(u)
    state = _advance(state, item, outcome, end, window)

  cols = {k: v[:filled] for k, v in listens.items()}
  if snaps["user"]:
    snapshots = Snapshots(**{k: np.concatenate(v) for k, v in snaps.items()})
  else:
    shapes = {"mixture": (0, len(components.COMPONENTS)),
              "history": (0, window)}
    snapshots = Snapshots(**{
        k: np.zeros(shapes.get(k, 0), bool if k == "disliked" else np.int64)
        for k in snaps})
  return cols, snapshots


def _initial_state(now: np.ndarray, max_events: np.ndarray, lo: int,
                   end: int, window: int) -> Dict[str, np.ndarray]:
  """The state of the chunk's users who start listening before `end`: one
  row each, in chunk order. Kept for the active users only (rather than
  gathered from and scattered back to the whole chunk's every step)."""
  local = np.nonzero(now < end)[0]  # chunk-local user indices
  m = len(local)
  return dict(
      local=local, user=lo + local, now=now[local],
      seed=np.full(m, -1, np.int64), first=np.ones(m, bool),
      history=np.zeros((m, window), np.int32),
      history_pos=np.zeros(m, np.int64),  # the ring buffer's next slot
      history_len=np.zeros(m, np.int64), n_done=np.zeros(m, np.int64),
      max_events=max_events[local])


def _advance(state: Dict[str, np.ndarray], item: np.ndarray,
             outcome: ListenOutcome, end: int,
             window: int) -> Dict[str, np.ndarray]:
  """Moves every active user past the listen just drawn; returns the state
  of those who listen again. Writes the history rows in place (the step's
  snapshots are copies); the other fields get new arrays."""
  history_pos = state["history_pos"]
  state["history"][np.arange(len(item)), history_pos] = item
  state["history_pos"] = (history_pos + 1) % window
  state["history_len"] = np.minimum(state["history_len"] + 1, window)
  state["seed"] = item
  state["first"] = outcome.ends_session
  state["now"] = state["now"] + outcome.gap
  state["n_done"] = state["n_done"] + 1
  keep = (state["now"] < end) & (state["n_done"] < state["max_events"])
  if keep.all():
    return state
  return {k: v[keep] for k, v in state.items()}


def _assemble_events(rng: np.random.Generator, out: Dict[str, np.ndarray],
                     end: int) -> ChunkEvents:
  """Listens plus like/dislike/unlike/undislike rows, sorted by (user, ts).

  One stable sort of a single int64 key (user, timestamp, event type): the
  order of a lexicographic sort, at a fraction of its time and memory.
  """
  listen_t, like_t, dislike_t, unlike_t, undislike_t = range(5)
  assert yambda.EVENT_TYPES == ("listen", "like", "dislike", "unlike",
                                "undislike")
  assert end < 1 << 37 and len(out["user"]) < 1 << 40
  user, ts, item = out["user"], out["ts"], out["item"]
  parts = [(user, ts, item, out["organic"], out["ratio"], listen_t)]
  for flag, code, undo_code, undo_prob in (
      ("like", like_t, unlike_t, _UNLIKE_PROB),
      ("dislike", dislike_t, undislike_t, _UNDISLIKE_PROB)):
    i = np.nonzero(out[flag])[0]
    # Strictly between this listen and the next one of the user.
    r_ts = ts[i] + 1 + (rng.random(len(i)) * (out["gap"][i] - 1)).astype(
        np.int64)
    parts.append((user[i], r_ts, item[i], out["organic"][i], -1, code))
    j = rng.random(len(i)) < undo_prob
    u_ts = r_ts[j] + 1 + rng.exponential(2 * sizes.DAY, j.sum()).astype(
        np.int64)
    parts.append((user[i][j], u_ts, item[i][j], out["organic"][i][j], -1,
                  undo_code))
  n = [len(pt[0]) for pt in parts]
  cols = [np.concatenate([pt[c] for pt in parts]) for c in range(4)]
  cols += [np.concatenate([np.broadcast_to(np.asarray(pt[c], np.int16), k)
                           for pt, k in zip(parts, n)]) for c in (4, 5)]
  del parts, out, user, ts, item
  keep = np.nonzero(cols[1] < end)[0]
  key = ((cols[0][keep].astype(np.int64) << 40) |
         (cols[1][keep].astype(np.int64) << 3) | cols[5][keep])
  order = keep[np.argsort(key, kind="stable")]
  del key, keep
  return ChunkEvents(
      user=cols[0][order], timestamp=cols[1][order].astype(np.int64),
      item=cols[2][order], organic=cols[3][order],
      ratio=cols[4][order], event_type=cols[5][order].astype(np.int8))
