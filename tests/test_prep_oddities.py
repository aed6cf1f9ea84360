"""Odd but valid inputs, in both preps: ids and times at the uint32 limits,
duplicate events, duplicate embedding rows (tests/test_prep_random.py tries
random valid inputs).

Every case runs the streaming prep and the in-memory reference
(benchmarks/reference_prep.py): they must write the same catalogue and the
same records (so the same examples), and count the same things.
"""

import collections
import dataclasses
import glob
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from benchmarks import reference_prep
from data_prep import item_metadata
from data_prep import prep
from data_prep import records_plan
from data_prep import yambda
from data_prep.prep import catalogue as prep_catalogue
from tests.test_prep import _copy_with_events
from tests.test_prep import _pipeline_examples
from tests.test_prep import _reference_examples
from tfrs_yambda import catalogue as catalogue_lib

TOP = 2**32 - 1  # the largest uint32: uid, item, artist, album, timestamp
LIMITS = (0, 1, 2**31 - 1, 2**31, TOP)
# Report entries that measure the run, not what it decided.
_RUN_KEYS = ("seconds", "events_per_second", "record_bytes",
             "record_bytes_per_listen", "record_bytes_per_event")


# --- Helpers ------------------------------------------------------------------


def _records(out):
  """{(file, record's features): count} of every TFRecord the prep wrote."""
  found = collections.Counter()
  for path in sorted(glob.glob(os.path.join(out, "records", "*.tfrecord"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # framing: length, its crc, data, data crc
      n = struct.unpack("<Q", data[pos:pos + 8])[0]
      example = tf.train.Example.FromString(data[pos + 12:pos + 12 + n])
      pos += n + 16
      found[(os.path.basename(path), tuple(
          (k, tuple(v.int64_list.value))
          for k, v in sorted(example.features.feature.items())))] += 1
  return found


def _assert_same_output(out, report, expected_out, expected_report,
                        differing=()):
  """Two prepared folders hold the same catalogue and records, and their
  reports agree on every count both have (but those named or prefixed in
  `differing`)."""
  ours = catalogue_lib.load(os.path.join(out, "catalogue"))
  theirs = catalogue_lib.load(os.path.join(expected_out, "catalogue"))
  for field in dataclasses.fields(ours):
    if field.name == "metadata":
      continue
    mine, other = getattr(ours, field.name), getattr(theirs, field.name)
    assert mine.dtype == other.dtype, field.name
    np.testing.assert_array_equal(mine, other, err_msg=field.name)
  def decided(metadata):  # not where the input was, nor how the run ran
    return {k: v for k, v in metadata.items()
            if k not in ("prep_config", "source")}

  assert decided(ours.metadata) == decided(theirs.metadata)
  assert _records(out) == _records(expected_out)
  common = {k for k in set(report) & set(expected_report)
            if not k.startswith(_RUN_KEYS + tuple(differing))}
  assert ({k: report[k] for k in common} ==
          {k: expected_report[k] for k in common})


def _both_preps(root, size, out_root, config):
  """Both preps' (output folder, report), or the error each raised."""
  results = []
  for name, module in (("streaming", prep),
                       ("reference", reference_prep)):
    out = os.path.join(out_root, name)
    try:
      results.append((out, module.prepare(root, size, out, config)))
    except ValueError as e:  # YambdaFormatError is a ValueError
      results.append(e)
  return results


def _with_ids(table, column, mapping):
  """The table with `column`'s values renamed by {old: new}."""
  values = table.column(column).to_numpy().astype(np.int64)
  old = np.array(list(mapping), np.int64)
  new = np.array(list(mapping.values()), np.int64)
  pos = np.minimum(np.searchsorted(np.sort(old), values), len(old) - 1)
  hit = np.sort(old)[pos] == values
  renamed = np.where(hit, new[np.argsort(old)][pos], values)
  return table.set_column(table.schema.get_field_index(column), column,
                          pa.array(renamed, table.schema.field(column).type))


def _to_limits(values, weights=None):
  """{old: new} sending the values of most weight (rows, by default) to
  LIMITS, and any other value that is one of LIMITS to where a renamed one
  came from."""
  ids, inverse = np.unique(values, return_inverse=True)
  weight = np.bincount(inverse, weights=weights)
  top = ids[np.argsort(-weight, kind="stable")[:len(LIMITS)]].tolist()
  mapping = dict(zip(top, LIMITS))
  freed = [t for t in top if t not in LIMITS]
  for clash in [i for i in ids.tolist() if i in LIMITS and i not in mapping]:
    mapping[clash] = freed.pop()
  assert len(set(mapping.values())) == len(mapping)
  return {int(k): int(v) for k, v in mapping.items()}


# --- Ids and times at the uint32 limits -------------------------------------


@pytest.fixture(scope="module")
def at_limits(tiny_yambda, prep_config, tmp_path_factory):
  """The tiny data with uids, item, artist and album ids 0, 1, 2**31 - 1,
  2**31 and 2**32 - 1, the last event at timestamp 2**32 - 1; both preps'
  (root, [(output, report)] * 2, {column: {old id: new id}})."""
  root = str(tmp_path_factory.mktemp("limits"))
  events = pq.read_table(yambda.multi_event_path(tiny_yambda, "tiny"))
  listened, listens = np.unique(events.column("item_id").to_numpy(),
                                return_counts=True)
  uids = _to_limits(events.column("uid").to_numpy())
  items = _to_limits(events.column("item_id").to_numpy())
  events = _with_ids(_with_ids(events, "uid", uids), "item_id", items)
  ts = events.column("timestamp").to_numpy().astype(np.int64)
  events = events.set_column(
      events.schema.get_field_index("timestamp"), "timestamp",
      pa.array(ts + TOP - ts.max(), pa.uint32()))
  path = yambda.multi_event_path(root, "tiny")
  os.makedirs(os.path.dirname(path))
  pq.write_table(events, path)
  renamed = {"uid": uids, "item_id": items}
  for name, key in (("artist_item_mapping", "artist_id"),
                    ("album_item_mapping", "album_id")):
    table = pq.read_table(os.path.join(tiny_yambda, f"{name}.parquet"))
    # The most listened ids of items mapped once: the rule keeps an item's
    # smallest id, which a renamed one might no longer be, and a vocabulary
    # holds only ids of items listened before the training cut.
    mapped = table.column("item_id").to_numpy()
    once, count = np.unique(mapped, return_counts=True)
    pos = np.minimum(np.searchsorted(listened, mapped), len(listened) - 1)
    weight = np.where(np.isin(mapped, once[count == 1]) & (
        listened[pos] == mapped), listens[pos], 0)
    renamed[key] = _to_limits(table.column(key).to_numpy(), weight)
    table = _with_ids(_with_ids(table, "item_id", items), key, renamed[key])
    pq.write_table(table, os.path.join(root, f"{name}.parquet"))
  pq.write_table(_with_ids(pq.read_table(yambda.embeddings_path(tiny_yambda)),
                           "item_id", items), yambda.embeddings_path(root))
  results = _both_preps(root, "tiny", str(tmp_path_factory.mktemp("out")),
                        prep_config)
  return root, results, renamed


def test_ids_and_times_at_the_uint32_limits_give_the_same_output(at_limits):
  _, results, _ = at_limits
  (out, report), (reference_out, reference_report) = results
  _assert_same_output(out, report, reference_out, reference_report)
  assert report["train_examples"] > 0 and report["test_examples"] > 0


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_ids_at_the_limits_round_trip_to_the_row_by_row_examples(
    at_limits, split):
  root, [(out, _), _], _ = at_limits
  cat = catalogue_lib.load(os.path.join(out, "catalogue"))
  assert cat.metadata["last_timestamp"] > TOP - 86_400
  expected = _reference_examples(root, cat.metadata, split)
  assert _pipeline_examples(out, cat, split) == expected
  if split == "test":  # the top uid and item really are in the examples
    assert TOP in {key[0] for key in expected}
    assert TOP in {key[3] for key in expected} | {key[2] for key in expected}


def test_raw_ids_at_the_limits_round_trip_through_the_catalogue(at_limits):
  _, [(out, _), _], renamed = at_limits
  cat = catalogue_lib.load(os.path.join(out, "catalogue"))
  for raw in LIMITS:
    for ids, lookup in ((cat.user_ids, cat.user_index),
                        (cat.item_ids, cat.item_index)):
      index = lookup(np.array([raw]))[0]
      assert index > 0 and ids[index] == raw
    for vocab in (cat.artist_ids, cat.album_ids):
      assert raw in vocab.tolist()
  assert cat.item_ids.dtype == np.int64 and cat.user_ids.dtype == np.int64
  assert set(renamed["artist_id"].values()) == set(LIMITS)


def test_record_plan_of_users_and_times_at_the_top():
  # The key uid << 32 | time overflowed int64 from uid 2**31 and merged the
  # next user into a window ending at 2**32: records lost their targets.
  uid = np.repeat(np.array([0, 2**31, TOP], np.int64), 4)
  ts = np.tile(np.array([TOP - 30, TOP - 20, TOP - 10, TOP], np.int64), 3)
  positive = np.ones(len(uid), bool)
  context, start, stop = records_plan.plan_records(
      uid, ts, positive, TOP - 20, TOP + 1, history_length=1, chunk_length=2)
  covered = np.concatenate([np.arange(s, e) for s, e in zip(start, stop)])
  np.testing.assert_array_equal(covered, np.flatnonzero(ts >= TOP - 20))
  for c, e in zip(context, stop):
    assert len(set(uid[c:e])) == 1  # a record never spans two users
  assert records_plan.plan_records(
      uid[:0], ts[:0], positive[:0], 0, 10, 1, 2)[0].shape == (0,)


def test_values_above_uint32_are_the_same_clear_error_in_both_preps(
    tiny_yambda, tmp_path):
  table = pq.read_table(yambda.multi_event_path(tiny_yambda, "tiny"))
  uid = table.column("uid").to_numpy().astype(np.int64)
  uid[11] = 2**32
  table = table.set_column(0, "uid", pa.array(uid, pa.int64()))
  path = _copy_with_events(tiny_yambda, str(tmp_path), table)
  errors = _both_preps(str(tmp_path), "tiny", str(tmp_path / "out"),
                       prep.PrepConfig())
  assert all(isinstance(e, yambda.YambdaFormatError) for e in errors)
  assert str(errors[0]) == str(errors[1])
  assert str(errors[0]).startswith(
      f"{path}: column 'uid' has 1 values above 4294967295")
  assert "(row 11 of the file)" in str(errors[0])


# --- Duplicates ---------------------------------------------------------------


def _insert(table, rows, positions):
  """The table with rows[i] inserted before row positions[i] (of the
  original table)."""
  assert len(positions) == rows.num_rows
  order = np.argsort(np.r_[np.arange(table.num_rows),
                           np.asarray(positions) - 0.5], kind="stable")
  return pa.concat_tables([table, rows]).take(pa.array(order))


def test_duplicate_events_are_one_event_the_first_row_kept(
    tiny_yambda, prepared, prep_config, tmp_path):
  table = pq.read_table(yambda.multi_event_path(tiny_yambda, "tiny"))
  frame = table.to_pandas()
  types = frame["event_type"].astype(str).to_numpy()
  ts = frame["timestamp"].to_numpy()
  cat = catalogue_lib.load(os.path.join(prepared, "catalogue"))
  listens = np.flatnonzero(types == "listen")
  positives = listens[frame["played_ratio_pct"].to_numpy()[listens] >= 80]
  # Copies right after, and far after, their rows: listens of every window
  # (one copy with another played ratio), and explicit events.
  later = np.r_[[positives[i] for i in (50, 51, 52)],
                [positives[np.searchsorted(ts[positives], cat.metadata[k])]
                 for k in ("validation_start", "test_start")],
                np.flatnonzero(types == "like")[:2],
                np.flatnonzero(types == "dislike")[:1]]
  copies = table.take(pa.array(later))
  ratio = copies.column("played_ratio_pct").to_pylist()
  ratio[0] = 7
  copies = copies.set_column(
      copies.schema.get_field_index("played_ratio_pct"), "played_ratio_pct",
      pa.array(ratio, copies.schema.field("played_ratio_pct").type))
  # And a copy before its row, played 0%: the first row wins, so that
  # positive training listen is a skip from now on.
  user_first = frame.iloc[listens].groupby("uid")["timestamp"].min()
  first = next(r for r in positives[60:] if user_first[frame["uid"][r]] < ts[
      r] < cat.metadata["train_end"])
  skip = table.take(pa.array([first])).set_column(
      copies.schema.get_field_index("played_ratio_pct"), "played_ratio_pct",
      pa.array([0], copies.schema.field("played_ratio_pct").type))
  with_copies = _insert(table, pa.concat_tables([copies, skip]),
                        np.r_[later[:3] + 1, [table.num_rows] * 5, first])
  _copy_with_events(tiny_yambda, str(tmp_path), with_copies)
  results = _both_preps(str(tmp_path), "tiny", str(tmp_path / "out"),
                        prep_config)

  # What the prep of the data with that listen played 0%, and no copies, is.
  expected_root = tmp_path / "expected"
  expected_root.mkdir()
  played = table.column("played_ratio_pct").to_pylist()
  played[first] = 0
  _copy_with_events(tiny_yambda, str(expected_root), table.set_column(
      table.schema.get_field_index("played_ratio_pct"), "played_ratio_pct",
      pa.array(played, table.schema.field("played_ratio_pct").type)))
  expected = str(tmp_path / "expected_out")
  expected_report = prep.prepare(str(expected_root), "tiny", expected,
                                 prep_config)
  assert expected_report["train_examples"] < cat.metadata["num_train_examples"]
  for out, report in results:
    _assert_same_output(out, report, expected, expected_report, (
        "events", "duplicate_events", "dropped_rows", "input_sorted"))
    assert report["duplicate_events_dropped"] == 9
    assert report["duplicate_events_dropped_listen"] == 6  # skip copy too
    assert report["duplicate_events_dropped_like"] == 2
    assert report["duplicate_events_dropped_dislike"] == 1
    assert report["events"] == expected_report["events"] + 9
  assert results[0][1]["dropped_rows_by_reason"][
      "duplicate_event_first_row_kept"] == 9


def _embeddings_with_repeats(tiny_yambda, root):
  """embeddings.parquet of tiny with rows repeated: an exact copy, a
  different and a NaN vector, in the same batch and in later ones; returns
  (the repeated rows' count, the item whose first row is then NaN)."""
  table = pq.read_table(yambda.embeddings_path(tiny_yambda))
  n, width = table.num_rows, len(table.column("normalized_embed")[0])
  rows = [3, 700, 701, 1200, 5]
  copies = table.take(pa.array(rows)).to_pylist()
  copies[1]["normalized_embed"] = [0.5] * width
  copies[2]["normalized_embed"] = [float("nan")] * width
  copies[3]["embed"] = copies[3]["normalized_embed"] = [-1.0] * width
  copies = pa.Table.from_pylist(copies, schema=table.schema)
  pq.write_table(_insert(table, copies, [4, n, n, 1201, n]),
                 yambda.embeddings_path(root))
  # The same rows, but a NaN first: that one is the item's embedding.
  nan_first = _insert(table, copies.slice(2, 1), [701])
  return len(rows), nan_first, int(copies.column("item_id")[2].as_py())


def test_duplicate_embedding_rows_first_kept_and_counted(
    tiny_yambda, prepared, catalogue, prep_config, tmp_path, monkeypatch):
  monkeypatch.setattr(prep_catalogue, "AUDIO_BATCH_ROWS", 500)
  root = tmp_path / "root"
  root.mkdir()
  _copy_with_events(tiny_yambda, str(root), pq.read_table(
      yambda.multi_event_path(tiny_yambda, "tiny")))
  os.remove(yambda.embeddings_path(str(root)))
  repeated, nan_first, nan_item = _embeddings_with_repeats(tiny_yambda,
                                                           str(root))
  with open(os.path.join(prepared, "prep_report.json")) as f:
    clean = __import__("json").load(f)
  for out, report in _both_preps(str(root), "tiny", str(tmp_path / "out"),
                                 prep_config):
    assert report["embedding_rows_duplicate_item_first_kept"] == repeated
    clean["embedding_rows_duplicate_item_first_kept"] = repeated
    _assert_same_output(out, report, prepared, clean)

  # First kept even where it is the NaN one: the error names that row.
  pq.write_table(nan_first, yambda.embeddings_path(str(root)))
  errors = _both_preps(str(root), "tiny", str(tmp_path / "nan"), prep_config)
  assert str(errors[0]) == str(errors[1])
  assert f"item_id {nan_item} (row 701 of the file)" in str(errors[0])


def test_an_identical_mapping_row_is_not_a_second_artist(tmp_path):
  path = str(tmp_path / "artists.parquet")
  pq.write_table(pa.table({"item_id": [5, 5, 6, 6, TOP], "artist_id": [
      9, 9, 3, 1, TOP]}, schema=yambda.ARTIST_MAPPING_SCHEMA), path)
  mapped, multi = item_metadata.first_mapping(
      path, "artist_mapping", "artist_id", np.array([5, 6, 7, TOP]))
  assert mapped.tolist() == [9, 1, -1, TOP] and multi == 1
