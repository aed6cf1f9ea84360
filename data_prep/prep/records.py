"""Pass 4, records: each bucket's tf.train.Example chunks, joined into shards.

Per bucket, the same sort as the stats pass, then catalogue indices and one
record per planned chunk (`records_plan.plan_records`) of each window
(train, validation, test). Examples are encoded directly from varints, not
built as protos: a bucket's columns are encoded once and a record's
sequences are slices of them. A shard's file is its buckets' files joined.
"""

import os
import shutil
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

from data_prep import records_plan
from data_prep.prep import buckets
from data_prep.prep import config as config_lib
from data_prep.prep import work as work_lib
from tfrs_yambda import atomic
from tfrs_yambda import schema


def _uvarint(value: int) -> bytes:
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def varint_encode(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
  """Protobuf varints of non-negative ints, concatenated, and their offsets.

  Any run of values [i, j) is then the packed payload buf[off[i]:off[j]], so a
  record's repeated int64 fields are slices of one encoding per bucket.

  Args:
    values: non-negative integers.

  Returns:
    (the varints, concatenated; offsets [len(values) + 1] into them).
  """
  v = np.asarray(values).astype(np.uint64)
  sizes = np.ones(len(v), np.int64)
  for k in range(1, 10):
    sizes += v >= np.uint64(1 << (7 * k))
  offsets = np.zeros(len(v) + 1, np.int64)
  np.cumsum(sizes, out=offsets[1:])
  width = int(sizes.max()) if len(v) else 0
  # Byte k of every value in column k; the row-major selection of the bytes
  # each value needs is the concatenation of all the varints.
  grid = np.empty((len(v), width), np.uint8)
  for k in range(width):
    grid[:, k] = ((v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
    grid[:, k] |= np.where(sizes > k + 1, 0x80, 0).astype(np.uint8)
  used = np.arange(width)[np.newaxis, :] < sizes[:, np.newaxis]
  return grid[used].tobytes(), offsets


# Varints of small lengths, looked up rather than computed (records are many).
_SMALL_VARINTS = [_uvarint(i) for i in range(1 << 14)]


def _varint(value: int) -> bytes:
  return _SMALL_VARINTS[value] if value < 16384 else _uvarint(value)


def _entry_parts(key: bytes, packed: bytes) -> List[bytes]:
  """One Features.feature map entry, key -> Feature{int64_list{packed}}, as
  pieces to join: field headers are (tag, varint length) pairs, innermost
  first."""
  n = len(packed)
  list_header = b"\x0a" + _varint(n)  # Int64List.value, packed
  n += len(list_header)
  feature_header = b"\x1a" + _varint(n)  # Feature.int64_list
  n += len(feature_header)
  key_field = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(n)
  n += len(key_field)
  return [b"\x0a" + _varint(n), key_field, feature_header, list_header, packed]


def encode_example(uid: int, num_context: int,
                   sequences: Dict[str, bytes]) -> bytes:
  """A serialized tf.train.Example of one record, without building protos.

  Args:
    uid: the record's user.
    num_context: how many of its listens are context only.
    sequences: feature name -> packed varints of its values (slices of
      `varint_encode`'s output), in the order to write them.

  Returns:
    The bytes `tf.train.Example(...).SerializeToString()` would give.
  """
  parts = _entry_parts(b"uid", _varint(uid))
  parts += _entry_parts(b"num_context", _varint(num_context))
  for name, packed in sequences.items():
    parts += _entry_parts(name.encode(), packed)
  features = b"".join(parts)
  return b"\x0a" + _varint(len(features)) + features


class _ItemIndex:
  """Raw item id -> catalogue index, with the sort done once per process."""
  _cache: Dict[str, "_ItemIndex"] = {}

  def __init__(self, catalogue_dir: str):
    items = pd.read_parquet(os.path.join(catalogue_dir, "items.parquet"),
                            columns=["item_id", "train_count"])
    ids = items["item_id"].to_numpy(np.int64)[1:]
    self.order = np.argsort(ids, kind="stable")
    self.sorted_ids = ids[self.order]
    self.train_count = items["train_count"].to_numpy(np.int64)
    # Raw ids are dense enough (9.4M in Yambda) for a direct table, which is
    # much faster than a binary search per event.
    self.table = None
    if len(ids) and ids.max() < buckets.DENSE_ID_LIMIT:
      self.table = np.zeros(int(ids.max()) + 1, np.int32)
      self.table[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)

  @classmethod
  def get(cls, catalogue_dir: str) -> "_ItemIndex":
    if catalogue_dir not in cls._cache:
      cls._cache.clear()
      cls._cache[catalogue_dir] = cls(catalogue_dir)
    return cls._cache[catalogue_dir]

  def lookup(self, raw: np.ndarray) -> np.ndarray:
    if self.table is not None:
      inside = raw < len(self.table)
      return np.where(inside, self.table[np.where(inside, raw, 0)],
                      0).astype(np.int64)
    if not len(self.sorted_ids):
      return np.zeros(len(raw), np.int64)
    pos = np.minimum(np.searchsorted(self.sorted_ids, raw),
                     len(self.sorted_ids) - 1)
    return np.where(self.sorted_ids[pos] == raw, self.order[pos] + 1, 0)


def _write_split(path: str, listens: buckets.Listens,
                 encoded: Dict[str, Tuple], plan,
                 targets: np.ndarray) -> Dict[str, int]:
  """Writes one split's planned chunks of one bucket; returns counts."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  context, start, stop = plan
  target_count = np.add.reduceat(targets.astype(np.int64), start) if len(
      start) else np.zeros(0, np.int64)
  # reduceat sums to the next start, not to stop: recount where they differ.
  cut = np.r_[start[1:], len(targets)] != stop
  for i in np.flatnonzero(cut):
    target_count[i] = int(targets[start[i]:stop[i]].sum())
  records = examples = 0
  with tf.io.TFRecordWriter(path + ".tmp") as writer:
    for c, s, e, n in zip(context.tolist(), start.tolist(), stop.tolist(),
                          target_count.tolist()):
      if n == 0:
        continue
      sequences = {name: buf[off[c]:off[e]]
                   for name, (buf, off) in encoded.items()}
      writer.write(encode_example(int(listens.uid[s]), s - c, sequences))
      records += 1
      examples += n
  os.replace(path + ".tmp", path)
  return {"records": records, "examples": examples}


def records_unit(work_root: str, split: Dict[str, int],
                 config: config_lib.PrepConfig, bucket: int) -> int:
  """Pass 4 for one bucket: each window's records, one file per window.

  Args:
    work_root: the work folder's root (with the catalogue written).
    split: the time cuts.
    config: the prep's configuration.
    bucket: the bucket.

  Returns:
    The bucket's event count (for progress).
  """
  work = work_lib.Work.at(work_root)
  if os.path.exists(work.done("records", bucket)):
    return atomic.read_json(work.done("records", bucket))["events"]
  table = buckets.read_bucket(work, bucket)
  listens = buckets.Listens(table, split, config.min_played_ratio)
  index = _ItemIndex.get(work.catalogue)
  item_index = index.lookup(listens.item)
  columns = {
      schema.ITEMS: item_index,
      schema.TIMESTAMPS: listens.ts,
      schema.PLAYED_RATIOS: listens.ratio.astype(np.int64),
      schema.IS_ORGANIC: listens.organic,
  }
  encoded = {name: varint_encode(column) for name, column in columns.items()}
  counts = {"events": table.num_rows}
  os.makedirs(work.path("parts"), exist_ok=True)
  for name, (lo, hi) in listens.windows.items():
    feedback, positive, targets = listens.window(name)
    # Feedback differs by window (what each may know): encoded per window.
    window_encoded = dict(encoded)
    window_encoded[schema.FEEDBACK] = varint_encode(feedback.astype(np.int64))
    window_encoded = {k: window_encoded[k]
                      for k in schema.RECORD_SEQUENCE_FEATURES}
    plan = records_plan.plan_records(listens.uid, listens.ts, positive, lo,
                                     hi, config.history_length,
                                     config.chunk_length)
    written = _write_split(work.bucket_records(name, bucket), listens,
                          window_encoded, plan, targets)
    if written["examples"] != targets.sum():
      raise AssertionError(f"{name} bucket {bucket}: wrote "
                           f"{written['examples']} examples, expected "
                           f"{targets.sum()}")
    counts[f"{name}_records"] = written["records"]
    if name != "train":
      counts[f"{name}_examples_cold_target"] = int(
          np.sum(targets & (index.train_count[item_index] == 0)))
  atomic.write_json(counts, work.done("records", bucket))
  return table.num_rows


def join_shard(work_root: str, plan: work_lib.Plan, num_shards: int,
               shard: int, splits: Sequence[str]) -> None:
  """Concatenates the shard's bucket files (TFRecords are self-framed).

  Args:
    work_root: the work folder's root.
    plan: the job (which buckets make up the shard).
    num_shards: the number of shards.
    shard: the shard.
    splits: the windows whose records to join.
  """
  work = work_lib.Work.at(work_root)
  os.makedirs(work.path("records"), exist_ok=True)
  for split in splits:
    path = work.shard_records(split, shard, num_shards)
    if os.path.exists(path):
      continue
    with open(path + ".tmp", "wb") as out:
      for bucket in plan.shard_buckets(shard, num_shards):
        with open(work.bucket_records(split, bucket), "rb") as part:
          shutil.copyfileobj(part, out, 16 << 20)
    os.replace(path + ".tmp", path)
