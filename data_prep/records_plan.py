"""Record planning: how each user's listens become records, and in which shard.

A record is one chunk of one user's listening sequence (see
`tfrs_yambda.schema`): up to `chunk_length` listens whose positives are a
window's targets, after a context of earlier listens that gives the first
target its seed and history. The streaming prep and the in-memory reference
plan records with these functions, so both write the same records; a user's
records all go to the shard `shard_of` names.
"""

from typing import Tuple

import numpy as np


def segments(starts: np.ndarray, stops: np.ndarray, length: int
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits each [start, stop) range into consecutive pieces of <= length.

  Args:
    starts: start per range.
    stops: stop per range.
    length: the longest piece.

  Returns:
    (owner range, start, stop) per piece, in range order.
  """
  pieces = np.maximum(0, -(-(stops - starts) // length))
  owner = np.repeat(np.arange(len(starts)), pieces)
  within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces,
                                               pieces)
  seg_start = starts[owner] + within * length
  return owner, seg_start, np.minimum(seg_start + length, stops[owner])


def plan_records(uid: np.ndarray, ts: np.ndarray, positive: np.ndarray,
                 window_start: int, window_stop: int, history_length: int,
                 chunk_length: int
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Chunks each user's listens with target time in [window_start, window_stop).

  A record holds up to `chunk_length` listens whose positives are targets,
  after a context of earlier listens: enough to give the first target its
  seed and `history_length` positives of history. History is so stored once
  per listen, never copied into each example.

  Args:
    uid: user per listen, each user's listens together and in time order.
    ts: timestamp per listen.
    positive: `rules.is_positive` per listen, as the window knows it.
    window_start: the window's first target time.
    window_stop: the end of the window's target times.
    history_length: positives of history a record's context provides.
    chunk_length: listens per record, after its context.

  Returns:
    (context_start, target_start, stop) per record: listens [context_start,
    target_start) are context, [target_start, stop) may be targets.
  """
  if not len(uid):
    return (np.zeros(0, np.int64),) * 3
  user_start = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
  # Within a user timestamps are sorted, so the window is a contiguous range
  # that starts after the user's listens before it. Counting them, rather than
  # searching a (uid, time) key, works for every uint32 uid and time.
  first = user_start + np.add.reduceat((ts < window_start).astype(np.int64),
                                       user_start)
  last = user_start + np.add.reduceat((ts < window_stop).astype(np.int64),
                                      user_start)
  owner, seg_start, seg_stop = segments(first, last, chunk_length)
  positions = np.flatnonzero(positive)
  before = np.searchsorted(positions, seg_start)  # positives before seg_start
  nth = positions[np.maximum(before - history_length, 0)] if len(
      positions) else np.zeros_like(seg_start)
  context = np.where(before >= history_length, nth, 0)
  context = np.minimum(context, seg_start - 1)
  context = np.maximum(context, user_start[owner])
  return context, seg_start, seg_stop


def shard_of(uid: np.ndarray, num_shards: int) -> np.ndarray:
  """The shard of each user's records.

  A multiplicative hash spreads consecutive uids over shards, so shards are
  even whatever the uids' range.

  Args:
    uid: raw user ids.
    num_shards: the number of shards (or, in the streaming prep, buckets).

  Returns:
    int64 shard per uid, in [0, num_shards).
  """
  return ((uid.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
          % np.uint64(num_shards)).astype(np.int64)
