"""Data prep: validation errors, feedback rule, catalogue, record round trip."""

import collections
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import prep
from data_prep import rules
from data_prep import yambda
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import schema
from tests.conftest import HISTORY_LENGTH


def _copy_with_events(src_root, dst_root, table):
  """A Yambda folder sharing src's metadata files, with the given events."""
  for name in ("embeddings.parquet", "artist_item_mapping.parquet",
               "album_item_mapping.parquet"):
    os.symlink(os.path.join(src_root, name), os.path.join(dst_root, name))
  path = yambda.multi_event_path(dst_root, "tiny")
  os.makedirs(os.path.dirname(path))
  pq.write_table(table, path)
  return path


@pytest.fixture(scope="module")
def events_table(tiny_yambda):
  return pq.read_table(yambda.multi_event_path(tiny_yambda, "tiny"))


@pytest.mark.parametrize("column", yambda.required_columns("multi_event"))
def test_missing_column_is_a_clear_error_and_writes_nothing(
    tiny_yambda, events_table, tmp_path, column):
  path = _copy_with_events(tiny_yambda, str(tmp_path),
                           events_table.drop_columns([column]))
  out = str(tmp_path / "out")
  with pytest.raises(yambda.YambdaFormatError,
                     match=f"{path}: required column '{column}' is missing"):
    prep.prepare(str(tmp_path), "tiny", out)
  assert not os.path.exists(out)


def test_wrong_type_is_a_clear_error(tiny_yambda, events_table, tmp_path):
  table = events_table.set_column(
      events_table.schema.get_field_index("event_type"), "event_type",
      pa.array(np.zeros(events_table.num_rows, np.int32)))
  _copy_with_events(tiny_yambda, str(tmp_path), table)
  with pytest.raises(yambda.YambdaFormatError,
                     match="column 'event_type' has type int32"):
    prep.prepare(str(tmp_path), "tiny", str(tmp_path / "out"))


def test_corrupt_file_is_a_clear_error(tmp_path):
  path = tmp_path / "bad.parquet"
  path.write_bytes(b"this is not parquet")
  with pytest.raises(yambda.YambdaFormatError, match="not a readable parquet"):
    yambda.check_schema(str(path), "multi_event")


def test_unknown_event_type_names_the_row(tiny_yambda, events_table, tmp_path):
  types = events_table.column("event_type").cast(pa.string()).to_pylist()
  types[7] = "skip"
  table = events_table.set_column(
      events_table.schema.get_field_index("event_type"), "event_type",
      pa.array(types).dictionary_encode())
  _copy_with_events(tiny_yambda, str(tmp_path), table)
  with pytest.raises(yambda.YambdaFormatError,
                     match="'event_type' has 1 values outside.*'skip'"):
    prep.prepare(str(tmp_path), "tiny", str(tmp_path / "out"))


def test_listen_without_played_ratio_is_an_error(tiny_yambda, events_table,
                                                 tmp_path):
  types = np.asarray(events_table.column("event_type").cast(pa.string()))
  ratio = events_table.column("played_ratio_pct").to_pylist()
  ratio[int(np.flatnonzero(types == "listen")[3])] = None
  table = events_table.set_column(
      events_table.schema.get_field_index("played_ratio_pct"),
      "played_ratio_pct", pa.array(ratio, pa.uint16()))
  _copy_with_events(tiny_yambda, str(tmp_path), table)
  with pytest.raises(yambda.YambdaFormatError,
                     match="'played_ratio_pct' is null for 1 listen"):
    prep.prepare(str(tmp_path), "tiny", str(tmp_path / "out"))


def test_feedback_attaches_to_the_latest_earlier_listen():
  rows = [  # uid, timestamp, item, event type
      (1, 0, 10, "listen"), (1, 5, 10, "like"),
      (1, 10, 11, "listen"), (1, 12, 11, "dislike"), (1, 13, 11, "undislike"),
      (1, 20, 12, "listen"), (1, 21, 13, "like"),  # 13 never listened: orphan
      (1, 30, 10, "listen"), (1, 31, 10, "unlike"),
      (2, 0, 12, "listen"), (2, 1, 12, "dislike"), (2, 2, 10, "like"),
  ]
  events = pd.DataFrame({
      "uid": [r[0] for r in rows], "timestamp": [r[1] for r in rows],
      "item_id": [r[2] for r in rows],
      "event_type": np.array([yambda.EVENT_TYPES.index(r[3]) for r in rows],
                             np.int8)})
  listens, orphans = rules.attach_feedback(events)
  assert orphans == 2
  assert listens["feedback"].tolist() == [
      schema.FEEDBACK_LIKED, schema.FEEDBACK_NONE, schema.FEEDBACK_NONE,
      schema.FEEDBACK_NONE, schema.FEEDBACK_DISLIKED]
  # What a window starting at `before` may know: only earlier feedback.
  listens, _ = rules.attach_feedback(events, before=13)
  assert listens["feedback"].tolist() == [
      schema.FEEDBACK_LIKED, schema.FEEDBACK_DISLIKED, schema.FEEDBACK_NONE,
      schema.FEEDBACK_NONE, schema.FEEDBACK_DISLIKED]
  listens, _ = rules.attach_feedback(events, before=5)
  assert listens["feedback"].tolist() == [
      schema.FEEDBACK_NONE, schema.FEEDBACK_NONE, schema.FEEDBACK_NONE,
      schema.FEEDBACK_NONE, schema.FEEDBACK_DISLIKED]


def test_catalogue_is_ordered_by_training_frequency(catalogue):
  counts = catalogue.item_train_count[1:]
  assert np.all(np.diff(counts) <= 0)
  assert catalogue.item_ids[0] == -1 and catalogue.num_items == len(
      np.unique(catalogue.item_ids[1:]))
  assert catalogue.item_index(np.array([catalogue.item_ids[5], -7]))[
      0] == 5
  assert catalogue.item_index(np.array([-7]))[0] == 0


def test_sampling_probability_is_training_frequency(catalogue):
  p = catalogue.sampling_probability()
  counts = catalogue.item_train_count
  seen = counts > 0
  np.testing.assert_allclose(p[seen], counts[seen] / counts.sum(), rtol=1e-5)
  assert np.all(p[~seen] > 0) and np.all(p[~seen] <= p[seen].min())
  assert p[seen].sum() == pytest.approx(1.0, abs=1e-5)


def reference_listens(root, uids=None, before=None):
  """{uid: [[timestamp, item_id, played ratio, feedback], ...]} in time order,
  computed row by row from the raw parquet: feedback attaches to the user's
  latest earlier listen of the track, the last one winning; with `before`,
  only explicit events before that time count."""
  events = pq.read_table(yambda.multi_event_path(root, "tiny")).to_pandas()
  if uids is not None:
    events = events[events["uid"].isin(uids)]
  if before is not None:
    events = events[(events["event_type"].astype(str) == "listen") |
                    (events["timestamp"] < before)]
  events["event_type"] = events["event_type"].astype(str)
  events["order"] = (events["event_type"] != "listen").astype(int)
  events = events.sort_values(["uid", "timestamp", "order"], kind="stable")
  feedback_of = {"like": schema.FEEDBACK_LIKED,
                 "dislike": schema.FEEDBACK_DISLIKED,
                 "unlike": schema.FEEDBACK_NONE,
                 "undislike": schema.FEEDBACK_NONE}
  by_user = {}
  for uid, rows in events.groupby("uid", sort=True):
    listens, last_listen = [], {}
    for row in rows.itertuples():
      if row.event_type == "listen":
        last_listen[row.item_id] = len(listens)
        listens.append([row.timestamp, row.item_id, row.played_ratio_pct,
                        schema.FEEDBACK_NONE])
      elif row.item_id in last_listen:
        listens[last_listen[row.item_id]][3] = feedback_of[row.event_type]
    by_user[uid] = listens
  return by_user


WINDOWS = {"train": (None, "train_end"),
           "validation": ("validation_start", "validation_end"),
           "test": ("test_start", "last_timestamp")}


def _reference_examples(root, metadata, split):
  """The expected examples, computed row by row from the raw parquet.

  A window knows the feedback given before its start for the listens before
  it, and the feedback given before its end for its own listens."""
  start, stop = WINDOWS[split]
  lo, hi = (metadata[start] if start else 0), metadata[stop]
  at_start = reference_listens(root, before=lo)
  expected = collections.Counter()
  for uid, listens in reference_listens(root, before=hi).items():
    positives = []
    for i, (ts, item, ratio, fb) in enumerate(listens):
      if ts < lo:
        fb = at_start[uid][i][3]
      positive = ratio >= metadata["min_played_ratio"] and (
          fb != schema.FEEDBACK_DISLIKED)
      if positive and i > 0 and lo <= ts < hi:
        history = ([-1] * HISTORY_LENGTH + positives)[-HISTORY_LENGTH:]
        weight = min(ratio, 200) / 100 * (2.0 if fb == schema.FEEDBACK_LIKED
                                          else 1.0)
        expected[(uid, ts, listens[i - 1][1], item, tuple(history),
                  round(weight, 4))] += 1
      if positive:
        positives.append(item)
  return expected


def _pipeline_examples(prepared_dir, catalogue, split):
  rule = input_pipeline.ExampleRule(
      min_played_ratio=catalogue.metadata["min_played_ratio"])
  ex = evaluate.load_examples(prepared_dir, split, HISTORY_LENGTH, rule)
  ids = catalogue.item_ids
  return collections.Counter(zip(
      ex[schema.USER_ID].tolist(), ex[schema.TIMESTAMP].tolist(),
      ids[ex[schema.SEED_ITEM]].tolist(), ids[ex[schema.TARGET_ITEM]].tolist(),
      [tuple(h) for h in ids[ex[schema.HISTORY_ITEMS]].tolist()],
      np.round(ex[schema.WEIGHT].astype(np.float64), 4).tolist()))


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_records_round_trip_to_the_reference_examples(tiny_yambda, prepared,
                                                      catalogue, split):
  expected = _reference_examples(tiny_yambda, catalogue.metadata, split)
  actual = _pipeline_examples(prepared, catalogue, split)
  assert sum(expected.values()) == catalogue.metadata[f"num_{split}_examples"]
  assert actual == expected


def test_sharded_and_unsharded_prep_give_the_same_examples(
    tiny_yambda, prepared, catalogue, prep_config, tmp_path):
  single = str(tmp_path / "single")
  config = prep.PrepConfig(**{**prep_config.as_dict(), "num_shards": 1})
  prep.prepare(tiny_yambda, "tiny", single, config)
  assert len(os.listdir(os.path.join(single, "records"))) == 3
  for split in ("train", "validation", "test"):
    assert (_pipeline_examples(single, catalogue, split) ==
            _pipeline_examples(prepared, catalogue, split))


def test_report_counts_what_was_dropped(prepared):
  with open(os.path.join(prepared, "prep_report.json")) as f:
    report = json.load(f)
  assert report["events"] == sum(report[f"events_{t}"]
                                 for t in yambda.EVENT_TYPES)
  assert report["listens"] == report["events_listen"]
  assert report["train_examples"] > 10 * report["test_examples"] > 0
  assert 0 < report["record_bytes_per_event"] < 40
  assert report["items_without_audio_embedding"] > 0
  assert report["items_without_artist"] > 0
  assert not any(name.endswith(".tmp") for name in os.listdir(
      os.path.join(prepared, "records")))
