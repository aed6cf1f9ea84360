"""Both preps on random small valid inputs (hypothesis): never a crash, always
a defined answer.

The inputs are what the schema allows, not what the generator writes: a few
users, items, artists and albums with ids at the uint32 limits, events of
every type at random times (near 0 or the top of uint32), exact and near
duplicates, metadata files with repeated, missing and extra items; and small
windows, chunks, buckets and batches. The streaming prep and the in-memory
reference must write the same catalogue and the same records (so the same
examples of every window), or both raise the same clear error.
"""

import os
import tempfile

from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import prep
from data_prep import yambda
from tests.test_prep_oddities import _assert_same_output
from tests.test_prep_oddities import _both_preps
from tests.test_prep_oddities import LIMITS
from tests.test_prep_oddities import TOP

_ITEMS = LIMITS + (7, 1234)
# First timestamps: the epoch, an ordinary time, and 600 s below the top.
_STARTS = (0, 25_000_000, TOP - 600)


def _event_rows(uids, items, start):
  """Events: (uid, timestamp, item, type, played ratio, organic, length)."""
  return st.tuples(
      st.sampled_from(uids), st.integers(start, start + 600),
      st.sampled_from(items),
      st.sampled_from(("listen",) * 4 + yambda.EVENT_TYPES[1:]),
      st.one_of(st.integers(0, 150), st.just(2**16 - 1)),
      st.sampled_from((0, 1, 255)),
      st.one_of(st.none(), st.integers(1, 400), st.just(TOP)))


@st.composite
def _random_yambda(draw):
  """A small valid Yambda folder's tables, with exact and near duplicates,
  and a configuration with small windows, chunks, buckets and batches."""
  uids = draw(st.lists(st.sampled_from(LIMITS), min_size=1, max_size=4,
                       unique=True))
  items = draw(st.lists(st.sampled_from(_ITEMS), min_size=1, max_size=5,
                        unique=True))
  start = draw(st.sampled_from(_STARTS))
  rows = draw(st.lists(_event_rows(uids, items, start), min_size=1,
                       max_size=40))
  if draw(st.sampled_from((True, True, True, False))):
    # Listens at both ends of the time range, so that most inputs leave
    # training time (the others test the error).
    for ts in (start, start + 600):
      rows.insert(draw(st.integers(0, len(rows))), (
          draw(st.sampled_from(uids)), ts, draw(st.sampled_from(items)),
          "listen", 100, 1, 200))
  # Copies of rows anywhere in the file, some with another played ratio.
  for source, at, ratio in draw(st.lists(st.tuples(
      st.integers(0, len(rows) - 1), st.integers(0, len(rows)),
      st.one_of(st.none(), st.integers(0, 150))), max_size=6)):
    copy = rows[source]
    rows.insert(at, copy if ratio is None else copy[:4] + (ratio,) + copy[5:])
  names = [f.name for f in yambda.MULTI_EVENT_SCHEMA]
  columns = {name: list(values) for name, values in zip(
      names[:3] + ["event_type", "played_ratio_pct", "is_organic",
                   "track_length_seconds"], zip(*rows))}
  columns["played_ratio_pct"] = [  # explicit events have no played ratio
      r if t == "listen" else None
      for r, t in zip(columns["played_ratio_pct"], columns["event_type"])]
  events = pa.table({name: columns[name] for name in names},
                    schema=yambda.MULTI_EVENT_SCHEMA)
  meta_items = st.sampled_from(_ITEMS + (99,))
  embedded = draw(st.lists(meta_items, max_size=8))  # repeats: several rows
  vectors = [[float(draw(st.integers(-2, 2))), 1.0] for _ in embedded]
  embeddings = pa.table({"item_id": embedded, "embed": vectors,
                         "normalized_embed": vectors},
                        schema=yambda.EMBEDDINGS_SCHEMA)
  mappings = {}
  for kind in ("artist", "album"):
    pairs = draw(st.lists(st.tuples(meta_items, st.sampled_from(LIMITS)),
                          max_size=8))
    mappings[kind] = pa.table(
        {"item_id": [p[0] for p in pairs], f"{kind}_id": [p[1] for p in pairs]},
        schema=yambda.schemas()[f"{kind}_mapping"])
  config = prep.PrepConfig(
      history_length=2, chunk_length=draw(st.sampled_from((1, 3, 64))),
      num_shards=draw(st.sampled_from((1, 2, 3))), test_window_seconds=100,
      gap_seconds=draw(st.sampled_from((0, 30))),
      validation_window_seconds=draw(st.sampled_from((0, 100))),
      metadata_items=draw(st.booleans()),
      last_timestamp=draw(st.sampled_from((0, start + 400))),
      bucket_events=draw(st.sampled_from((2, 10**6))), num_workers=1,
      read_batch_rows=draw(st.sampled_from((3, 1000))))
  return events, embeddings, mappings, config, draw(st.sampled_from((4, 64)))


def _write_yambda(root, events, embeddings, mappings, row_group_size):
  path = yambda.multi_event_path(root, "random")
  os.makedirs(os.path.dirname(path))
  pq.write_table(events, path, row_group_size=row_group_size)
  pq.write_table(embeddings, yambda.embeddings_path(root))
  pq.write_table(mappings["artist"], yambda.artist_mapping_path(root))
  pq.write_table(mappings["album"], yambda.album_mapping_path(root))


@settings(max_examples=25, deadline=None, database=None)
@given(_random_yambda())
def test_both_preps_agree_on_random_valid_inputs(inputs):
  """Never a crash: both preps write the same catalogue and records, or
  both raise the same clear error (no listen, no training time)."""
  events, embeddings, mappings, config, row_group_size = inputs
  with tempfile.TemporaryDirectory() as root:
    _write_yambda(root, events, embeddings, mappings, row_group_size)
    streaming, reference = _both_preps(root, "random",
                                       os.path.join(root, "out"), config)
    if isinstance(streaming, Exception) or isinstance(reference, Exception):
      assert type(streaming) is type(reference), (streaming, reference)
      assert str(streaming) == str(reference)
      assert ("no listen events" in str(streaming) or
              "leave no training time" in str(streaming))
      event(f"both preps refuse it: {str(streaming)[:60]}")
      return
    _assert_same_output(*streaming, *reference)
    report = streaming[1]
    event(f"prepared, {min(report['train_examples'], 3)}+ train examples, "
          f"{min(report['duplicate_events_dropped'], 1)}+ duplicates")
    assert report["listens"] == report["events_listen"] - report[
        "duplicate_events_dropped_listen"]


@pytest.mark.parametrize("types,message", [
    (("like", "dislike"), "The input has no listen events."),
    (("listen", "listen"), "leave no training time before"),
])
def test_no_listen_or_no_training_time_is_the_same_error_in_both_preps(
    tmp_path, types, message):
  events = pa.table({
      "uid": [TOP, TOP], "timestamp": [TOP - 5, TOP], "item_id": [0, TOP],
      "is_organic": [1, 1], "played_ratio_pct": [
          100 if t == "listen" else None for t in types],
      "track_length_seconds": [100, 100], "event_type": list(types)},
      schema=yambda.MULTI_EVENT_SCHEMA)
  empty = {kind: yambda.schemas()[f"{kind}_mapping"].empty_table()
           for kind in ("artist", "album")}
  _write_yambda(str(tmp_path), events, yambda.EMBEDDINGS_SCHEMA.empty_table(),
                empty, 64)
  errors = _both_preps(str(tmp_path), "random", str(tmp_path / "out"),
                       prep.PrepConfig())
  assert type(errors[0]) is type(errors[1])
  assert str(errors[0]) == str(errors[1]) and message in str(errors[0])
