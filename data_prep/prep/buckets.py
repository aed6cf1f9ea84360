"""Buckets: the streaming prep's unit of work, and its listens.

The scan partitions the input by a hash of uid into buckets, so that all
events of a user are in one bucket and one bucket's rows fit in a worker's
memory. The stats and records passes read a bucket back (`read_bucket`) and
turn it into `Listens`: its listens sorted by (uid, time), with the feedback,
positives and targets each window may know, by the shared rules.
"""

import os
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import records_plan
from data_prep import rules
from data_prep.prep import work as work_lib

# Compact bucket columns: 22 bytes per event.
BUCKET_SCHEMA = pa.schema([
    ("uid", pa.uint32()), ("timestamp", pa.uint32()), ("item_id", pa.uint32()),
    ("is_organic", pa.uint8()), ("played_ratio_pct", pa.float32()),
    ("track_length_seconds", pa.float32()), ("event_type", pa.int8()),
])
# Raw ids below this use direct lookup tables (int32: at most 1 GiB).
DENSE_ID_LIMIT = 1 << 28


def bucket_of(uid: np.ndarray, num_buckets: int) -> np.ndarray:
  """The bucket of each event's user.

  It is the shard hash, so that bucket % num_shards is the user's shard.
  """
  return records_plan.shard_of(uid, num_buckets)


def read_bucket(work: work_lib.Work, bucket: int) -> pa.Table:
  """All rows of one bucket, in file order (BUCKET_SCHEMA)."""
  folder = work.bucket_dir(bucket)
  if not os.path.isdir(folder):
    return BUCKET_SCHEMA.empty_table()
  # Parts in scan-unit order, i.e. in file order.
  parts = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
  return pa.concat_tables(
      [pq.read_table(os.path.join(folder, f)) for f in parts] or
      [BUCKET_SCHEMA.empty_table()])


def feedback_attachments(uid: np.ndarray, item: np.ndarray, ts: np.ndarray,
                         code: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray, int]:
  """`rules.explicit_attachments` of a bucket's rows, the same result faster.

  Explicit events are a small share of all events, so the rule (a 4-key
  sort) runs only on the rows of (user, track) pairs that have explicit
  events; every other listen has no feedback.

  Args:
    uid: user per row.
    item: item per row.
    ts: timestamp per row.
    code: event code per row.

  Returns:
    What `rules.explicit_attachments` returns, as rows of the bucket.
  """
  explicit = code != rules.LISTEN
  if not explicit.any():
    return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
  # Only rows whose track has explicit events in the bucket can be involved.
  if item.max() < DENSE_ID_LIMIT:
    flagged = np.zeros(int(item.max()) + 1, bool)
    flagged[item[explicit]] = True
    candidates = np.flatnonzero(flagged[item])
  else:
    candidates = np.arange(len(item))
  pair = ((uid[candidates].astype(np.uint64) << np.uint64(32)) |
          item[candidates].astype(np.uint64))
  explicit_pairs = np.unique(pair[explicit[candidates]])
  pos = np.minimum(np.searchsorted(explicit_pairs, pair),
                   len(explicit_pairs) - 1)
  rows = candidates[explicit_pairs[pos] == pair]
  event_rows, listen_rows, orphans = rules.explicit_attachments(
      uid[rows], item[rows], ts[rows], code[rows])
  return rows[event_rows], rows[listen_rows], orphans


class Listens:
  """One bucket's listens sorted by (uid, timestamp), with derived flags.

  Duplicate events are dropped first (`rules.duplicate_events`; counted in
  `duplicates`). `window(name)` gives each window's feedback, positives and
  targets as the window may know them (`rules.window_feedback`); the
  attributes `feedback` and `positive` use all feedback, for the report's
  counts.
  """

  def __init__(self, table: pa.Table, split: Dict[str, int],
               min_played_ratio: int):
    uid = table.column("uid").to_numpy()
    ts = table.column("timestamp").to_numpy()
    item = table.column("item_id").to_numpy()
    code = table.column("event_type").to_numpy()
    # Stable: rows with equal (uid, time) keep file order, as in memory. The
    # one sort finds duplicates and orders the listens.
    order = np.argsort(rules.user_time_key(uid, ts), kind="stable")
    # A user's rows are all in this bucket, in file order: duplicates of an
    # event are found here, never in a global pass.
    dropped, self.duplicates = rules.duplicate_events(uid, ts, item, code,
                                                      order)
    if dropped.any():
      kept = ~dropped
      order = (np.cumsum(kept) - 1)[order[kept[order]]]
      uid, ts, item, code = uid[kept], ts[kept], item[kept], code[kept]
      table = table.filter(pa.array(kept))
    self._attachments = feedback_attachments(uid, item, ts, code)
    self.orphans = self._attachments[2]
    self._code, self._event_ts = code, ts
    feedback = self._feedback_at(None)
    rows = order[code[order] == rules.LISTEN]
    self._rows = rows
    self.uid = uid[rows].astype(np.int64)
    self.ts = ts[rows].astype(np.int64)
    self.item = item[rows].astype(np.int64)
    self.organic = table.column("is_organic").to_numpy()[rows].astype(np.int64)
    self.length = table.column("track_length_seconds").to_numpy()[rows]
    # Rounded as the records store it, so the pipeline sees the same positives.
    self.ratio = np.round(table.column("played_ratio_pct").to_numpy()[rows])
    self.feedback = feedback[rows]
    self.positive = rules.is_positive(self.ratio, self.feedback,
                                      min_played_ratio)
    self.has_seed = np.r_[False, self.uid[1:] == self.uid[:-1]]
    self.windows = rules.windows(split)
    self._by_window = {}
    for name, (lo, hi) in self.windows.items():
      window_fb = rules.window_feedback(self._feedback_before, self.ts, lo, hi)
      window_positive = rules.is_positive(self.ratio, window_fb,
                                          min_played_ratio)
      self._by_window[name] = (window_fb, window_positive, window_positive &
                               self.has_seed & (self.ts >= lo) &
                               (self.ts < hi))
    self.is_train = self._by_window["train"][2]

  def _feedback_at(self, before: Optional[int]) -> np.ndarray:
    """Feedback per bucket row as of `before` (all when None), from the
    attachments found once."""
    event_rows, listen_rows, _ = self._attachments
    return rules.feedback_at(len(self._code), event_rows, listen_rows,
                             self._code, self._event_ts, before)

  def _feedback_before(self, cut: int) -> np.ndarray:
    return self._feedback_at(cut)[self._rows]

  def window(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feedback, positive, is_target) per listen, as window `name` knows
    them."""
    return self._by_window[name]

  def __len__(self):
    return len(self.uid)
