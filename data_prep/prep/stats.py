"""Pass 2, stats: what the catalogue and the report need from each bucket.

Per bucket (all events of its users): sort by (uid, time), attach feedback
and count per-item training positives and first listen, per-(item, length)
training-window counts (for the median track length), per-user positives and
the report's counts. Each bucket's stats are one .npz file, which the
catalogue pass merges.
"""

import json
import os
from typing import Dict, Tuple

import numpy as np

from data_prep.prep import buckets
from data_prep.prep import config as config_lib
from data_prep.prep import work as work_lib
from tfrs_yambda import schema


def length_key(item: np.ndarray, length: np.ndarray) -> np.ndarray:
  """(item, track length) as one uint64: the float32 bits identify a length.

  Args:
    item: raw item id per listen.
    length: track length per listen (NaN: unknown).

  Returns:
    The uint64 keys; every NaN has one key per item.
  """
  bits = np.ascontiguousarray(length, np.float32).view(np.uint32)
  bits = np.where(np.isnan(length), np.uint32(0x7FC00000), bits)  # one NaN
  return (item.astype(np.uint64) << np.uint64(32)) | bits.astype(np.uint64)


def reduce_keys(keys: np.ndarray, *weights: np.ndarray):
  """Unique keys and the sum of each weight array per key.

  Args:
    keys: keys, in any order, repeats allowed.
    *weights: arrays of one weight per key.

  Returns:
    (sorted unique keys, then one int64 array of summed weights per input
    array).
  """
  unique, inverse = np.unique(keys, return_inverse=True)
  return (unique,) + tuple(
      np.bincount(inverse, weights=w, minlength=len(unique)).astype(np.int64)
      for w in weights)


def bucket_stats(listens: buckets.Listens, split: Dict[str, int],
                 min_played_ratio: int) -> Tuple[Dict[str, np.ndarray],
                                                 Dict[str, int]]:
  """What the catalogue and the report need from one bucket.

  Track lengths count training-window listens only, and each item's first
  listen is kept, so that the catalogue knows nothing after the cut.

  Args:
    listens: the bucket's listens.
    split: the time cuts (`rules.time_split`).
    min_played_ratio: the positive rule's least percent played.

  Returns:
    (arrays for the catalogue merge, the report's counts).
  """
  ts = listens.ts
  keys, key_listens, key_train = reduce_keys(
      length_key(listens.item, listens.length),
      ts < split["train_end"], listens.is_train)
  first_items, first_inverse = np.unique(listens.item, return_inverse=True)
  first_ts = np.full(len(first_items), np.iinfo(np.int64).max)
  np.minimum.at(first_ts, first_inverse, ts)
  user_start = np.flatnonzero(np.r_[True, listens.uid[1:] != listens.uid[:-1]]
                              ) if len(listens) else np.zeros(0, np.int64)
  user_train = (np.add.reduceat(listens.is_train.astype(np.int64), user_start)
                if len(listens) else np.zeros(0, np.int64))
  user_of_row = np.cumsum(np.r_[True, listens.uid[1:] != listens.uid[:-1]]
                          ) - 1 if len(listens) else np.zeros(0, np.int64)
  arrays = {"keys": keys, "key_listens": key_listens, "key_train": key_train,
            "first_items": first_items, "first_ts": first_ts,
            "uids": listens.uid[user_start], "user_train": user_train}
  in_gap = ((ts >= split["train_end"]) & (ts < split["validation_start"])) | (
      (ts >= split["validation_end"]) & (ts < split["test_start"]))
  counts = {
      **listens.duplicates,
      "listens": len(listens),
      "explicit_events_dropped_no_earlier_listen": listens.orphans,
      "listens_skipped_below_min_played_ratio": int(
          np.sum(listens.ratio < min_played_ratio)),
      "listens_disliked": int(np.sum(
          listens.feedback == schema.FEEDBACK_DISLIKED)),
      "listens_liked": int(np.sum(listens.feedback == schema.FEEDBACK_LIKED)),
      "positives_without_seed_first_listen_of_user": int(
          np.sum(listens.positive & ~listens.has_seed)),
      "positives_in_gap_not_targets": int(np.sum(listens.positive & in_gap)),
      "listens_at_or_after_last_timestamp_not_targets": int(
          np.sum(ts >= split["last_timestamp"])),
  }
  for name in listens.windows:
    targets = listens.window(name)[2]
    counts[f"{name}_examples"] = int(targets.sum())
    if name != "train":
      counts[f"{name}_examples_unknown_user"] = int(np.sum(
          targets & (user_train[user_of_row] == 0)))
  return arrays, counts


def stats_unit(work_root: str, split: Dict[str, int],
               config: config_lib.PrepConfig, bucket: int) -> int:
  """Pass 2 for one bucket: writes its stats file.

  Args:
    work_root: the work folder's root.
    split: the time cuts.
    config: the prep's configuration.
    bucket: the bucket.

  Returns:
    The bucket's event count (for progress).
  """
  work = work_lib.Work.at(work_root)
  path = work.bucket_stats(bucket)
  if os.path.exists(path):
    return int(np.load(path)["events"])
  table = buckets.read_bucket(work, bucket)
  listens = buckets.Listens(table, split, config.min_played_ratio)
  arrays, counts = bucket_stats(listens, split, config.min_played_ratio)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, events=table.num_rows, counts=json.dumps(counts), **arrays)
  os.replace(path + ".tmp", path)
  return table.num_rows
