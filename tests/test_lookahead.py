"""Nothing after a window's cut changes what is computed for it.

The tiny data is prepared twice: as it is, and with events added after the
training cut that the old prep let leak backwards: a listen of a track
nobody played before (on the test day), a like and a dislike (on the test
day) of tracks that were only played during training. Training examples and
weights, validation examples, the index of every earlier item, the model's
vocabularies and the validation day's candidates must be identical.
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import prep
from data_prep import yambda
from tfrs_yambda import catalogue as catalogue_lib
from tests.test_prep import _copy_with_events, _pipeline_examples


def _future_events(table, metadata):
  """A future-only item's listen, a future like and a future dislike."""
  frame = table.to_pandas()
  frame["event_type"] = frame["event_type"].astype(str)
  listens = frame[frame["event_type"] == "listen"]
  last = listens.groupby(["uid", "item_id"])["timestamp"].max()
  # (user, track) pairs played only during training, at least half through.
  played = listens[listens["played_ratio_pct"] >= 50].set_index(
      ["uid", "item_id"]).index.unique()
  pairs = [p for p in last[last < metadata["train_end"]].index if p in played]
  (like_uid, like_item), (dislike_uid, dislike_item) = pairs[0], pairs[1]
  new_item = int(frame["item_id"].max()) + 12345
  t = metadata["test_start"] + 60
  row = {name: None for name in frame.columns}
  rows = [
      dict(row, uid=like_uid, timestamp=t, item_id=new_item, is_organic=1,
           event_type="listen", played_ratio_pct=100,
           track_length_seconds=200),
      dict(row, uid=like_uid, timestamp=t + 1, item_id=like_item,
           is_organic=1, event_type="like"),
      dict(row, uid=dislike_uid, timestamp=t + 2, item_id=dislike_item,
           is_organic=1, event_type="dislike"),
  ]
  extra = pa.Table.from_pylist(rows, schema=pa.schema(
      [f.with_type(pa.string()) if f.name == "event_type" else f
       for f in table.schema]))
  extra = extra.set_column(
      extra.schema.get_field_index("event_type"), "event_type",
      extra.column("event_type").cast(table.schema.field("event_type").type))
  return pa.concat_tables([table, extra]), new_item


def test_future_item_like_and_dislike_change_nothing_before_their_cut(
    tiny_yambda, prepared, catalogue, prep_config, tmp_path):
  table = pq.read_table(yambda.multi_event_path(tiny_yambda, "tiny"))
  altered, new_item = _future_events(table, catalogue.metadata)
  _copy_with_events(tiny_yambda, str(tmp_path), altered)
  out = str(tmp_path / "out")
  report = prep.prepare(str(tmp_path), "tiny", out, prep_config)
  later = catalogue_lib.load(os.path.join(out, "catalogue"))

  # The added events are really there (the test is not vacuous) ...
  with open(os.path.join(prepared, "prep_report.json")) as f:
    before = __import__("json").load(f)
  assert report["listens_liked"] == before["listens_liked"] + 1
  assert report["listens_disliked"] == before["listens_disliked"] + 1
  assert later.num_items == catalogue.num_items + 1
  new_index = int(later.item_index(np.array([new_item]))[0])
  assert new_index > later.num_candidates(later.metadata["test_start"])

  # ... and change no training or validation example, nor any weight.
  for split in ("train", "validation"):
    assert (_pipeline_examples(out, later, split) ==
            _pipeline_examples(prepared, catalogue, split)), split
  # Every item played before the test day keeps its index; vocabularies and
  # counts are equal.
  n = catalogue.num_candidates(catalogue.metadata["test_start"])
  np.testing.assert_array_equal(later.item_ids[:n + 1],
                                catalogue.item_ids[:n + 1])
  for name in ("item_train_count", "artist_ids", "album_ids", "user_ids"):
    np.testing.assert_array_equal(
        getattr(later, name)[:len(getattr(catalogue, name))],
        getattr(catalogue, name))
  np.testing.assert_array_equal(later.item_train_count[
      catalogue.num_items + 1:], 0)
  # The validation day's candidates are the same items.
  cut = catalogue.metadata["validation_start"]
  n = catalogue.num_candidates(cut)
  assert later.num_candidates(cut) == n
  np.testing.assert_array_equal(later.item_ids[1:n + 1],
                                catalogue.item_ids[1:n + 1])


def test_candidates_are_the_items_listened_before_the_cut(catalogue):
  first = catalogue.item_first_listen
  for window in ("validation_start", "test_start"):
    cut = catalogue.metadata[window]
    n = catalogue.num_candidates(cut)
    assert 0 < n < catalogue.num_items
    # A prefix of the index range: indices 1..n, and no later item.
    assert np.all((first[1:n + 1] >= 0) & (first[1:n + 1] < cut))
    assert not np.any((first[n + 1:] >= 0) & (first[n + 1:] < cut))
  # Items of the metadata files nobody played are catalogued, last.
  never = np.flatnonzero(first == -1)
  assert len(never) > 1 and never[0] == 0
  assert np.all(np.diff(never[1:]) == 1) and never[-1] == catalogue.num_items
