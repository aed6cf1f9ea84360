"""Out-of-core prep: validation, resuming, shuffled input, staged, Spark runs.

Every run is compared with the session's `prepared` folder through the input
pipeline's examples, which tests/test_prep.py checks against a row-by-row
reference.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import prep
from data_prep import yambda
from data_prep.prep import buckets
from data_prep.prep import catalogue as prep_catalogue
from data_prep.prep import records as prep_records
from data_prep.prep import stats as prep_stats
from data_prep.prep import validation
from data_prep.prep import work as work_lib
from tests.test_prep import _copy_with_events
from tests.test_prep import _pipeline_examples


@pytest.fixture(scope="module")
def events_table(tiny_yambda):
  return pq.read_table(yambda.multi_event_path(tiny_yambda, "tiny"))


def _small_units(prep_config, **overrides):
  """The session's config with small batches and buckets, so that the tiny
  input spans several scan batches and buckets per shard."""
  return prep.PrepConfig(**{**prep_config.as_dict(), "read_batch_rows": 5000,
                            "bucket_events": 8000, **overrides})


def _assert_same_examples(out, prepared, catalogue):
  for split in ("train", "validation", "test"):
    assert (_pipeline_examples(out, catalogue, split) ==
            _pipeline_examples(prepared, catalogue, split))


def _set(table, name, values, type_):
  return table.set_column(table.schema.get_field_index(name), name,
                          pa.array(values, type_))


@pytest.mark.parametrize("name,values,type_,message", [
    ("uid", lambda v: [None] + v[1:], pa.uint32(), "'uid' has 1 nulls"),
    ("timestamp", lambda v: v[:3] + [-5] + v[4:], pa.int64(),
     "'timestamp' has 1 negative values"),
    ("item_id", lambda v: v[:9] + [2**33] + v[10:], pa.int64(),
     "'item_id' has 1 values above 4294967295"),
    ("played_ratio_pct", lambda v: v[:2] + [-1.0] + v[3:], pa.float32(),
     "'played_ratio_pct' has 1 negative values"),
])
def test_bad_values_are_one_clear_error_naming_file_column_and_row(
    tiny_yambda, events_table, tmp_path, name, values, type_, message):
  column = events_table.column(name).to_pylist()
  table = _set(events_table, name, values(column), type_)
  path = _copy_with_events(tiny_yambda, str(tmp_path), table)
  out = str(tmp_path / "out")
  with pytest.raises(yambda.YambdaFormatError) as error:
    prep.prepare(str(tmp_path), "tiny", out,
                 prep.PrepConfig(read_batch_rows=5000))
  assert str(error.value).startswith(f"{path}: column ")
  assert message in str(error.value)
  assert "first bad row (row " in str(error.value)
  # Validation fails before anything that looks like output exists.
  assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_oddities_are_counted_not_errors(tiny_yambda, events_table, prep_config,
                                         tmp_path):
  types = np.asarray(events_table.column("event_type").cast(pa.string()))
  lengths = events_table.column("track_length_seconds").to_pylist()
  listen_rows = np.flatnonzero(types == "listen")
  for row in listen_rows[:3]:
    lengths[row] = None
  table = _set(events_table, "track_length_seconds", lengths, pa.uint32())
  _copy_with_events(tiny_yambda, str(tmp_path), table)
  report = prep.prepare(str(tmp_path), "tiny", str(tmp_path / "out"),
                        prep_config)
  assert report["listens_without_track_length"] == 3
  assert report["input_sorted_by_uid_timestamp"]
  assert report["dropped_rows_by_reason"] == {
      "explicit_event_without_earlier_listen_of_the_track":
          report["explicit_events_dropped_no_earlier_listen"],
      "duplicate_event_first_row_kept": 0}


@pytest.mark.e2e  # worker processes
def test_shuffled_input_on_a_process_pool_gives_the_same_examples(
    tiny_yambda, events_table, prepared, catalogue, prep_config, tmp_path):
  order = np.random.default_rng(0).permutation(events_table.num_rows)
  _copy_with_events(tiny_yambda, str(tmp_path), events_table.take(order))
  out = str(tmp_path / "out")
  report = prep.prepare(str(tmp_path), "tiny", out,
                        _small_units(prep_config, num_workers=2))
  assert not report["input_sorted_by_uid_timestamp"]
  assert report["num_buckets"] > prep_config.num_shards
  _assert_same_examples(out, prepared, catalogue)
  with open(os.path.join(prepared, "prep_report.json")) as f:
    reference = json.load(f)
  for key in ("train_examples", "test_examples", "items", "users",
              "listens_liked", "test_examples_cold_target", "train_records"):
    assert report[key] == reference[key], key


def test_interrupted_run_resumes_without_redoing_finished_units(
    tiny_yambda, prepared, catalogue, prep_config, tmp_path, monkeypatch):
  config = _small_units(prep_config)
  out = str(tmp_path / "out")
  original = prep_records.records_unit

  def fail_on_last_bucket(work_root, split, cfg, bucket):
    if bucket == 3:
      raise KeyboardInterrupt("simulated interruption")
    return original(work_root, split, cfg, bucket)

  monkeypatch.setattr(prep_records, "records_unit", fail_on_last_bucket)
  with pytest.raises(KeyboardInterrupt):
    prep.prepare(tiny_yambda, "tiny", out, config)
  assert not os.path.exists(out)  # nothing that looks finished
  records = os.path.join(out + ".tmp", "records")
  assert not os.path.exists(records) or not os.listdir(records)

  # The rerun reads no input and processes only the buckets left (3 and on).
  read, validated = [], []
  read_bucket, validate = buckets.read_bucket, validation.validate_batch
  monkeypatch.setattr(prep_records, "records_unit", original)
  monkeypatch.setattr(buckets, "read_bucket",
                      lambda work, b: read.append(b) or read_bucket(work, b))
  monkeypatch.setattr(validation, "validate_batch",
                      lambda *a: validated.append(1) or validate(*a))
  prep.prepare(tiny_yambda, "tiny", out, config)
  assert read and min(read) == 3 and not validated
  assert not os.path.exists(out + ".tmp")
  _assert_same_examples(out, prepared, catalogue)


def test_changed_config_restarts_the_work_folder(tiny_yambda, prep_config,
                                                 tmp_path):
  out = str(tmp_path / "out")
  prep.prepare(tiny_yambda, "tiny", out, prep_config, stage="scan")
  changed = prep.PrepConfig(**{**prep_config.as_dict(), "min_played_ratio": 80})
  report = prep.prepare(tiny_yambda, "tiny", out, changed)
  with open(os.path.join(out, "catalogue", "metadata.json")) as f:
    assert json.load(f)["min_played_ratio"] == 80
  assert report["events"] > 0


def test_shards_run_stage_by_stage_give_the_same_examples(
    tiny_yambda, prepared, catalogue, prep_config, tmp_path):
  config = _small_units(prep_config)
  out = str(tmp_path / "out")
  for stage in ("scan", "stats", "catalogue", "records", "finalize"):
    shards = (range(config.num_shards)
              if stage in ("scan", "stats", "records") else [-1])
    for shard in shards:
      prep.prepare(tiny_yambda, "tiny", out, config, stage=stage,
                   shard_index=shard)
  assert sorted(os.listdir(os.path.join(out, "records"))) == [
      "test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord",
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
      "validation-00000-of-00002.tfrecord",
      "validation-00001-of-00002.tfrecord"]
  _assert_same_examples(out, prepared, catalogue)


def test_catalogue_merge_in_batches_equals_one_sort(
    tiny_yambda, prep_config, tmp_path, monkeypatch):
  config = _small_units(prep_config)
  out = str(tmp_path / "out")
  for stage in ("scan", "stats"):
    for shard in range(config.num_shards):
      prep.prepare(tiny_yambda, "tiny", out, config, stage=stage,
                   shard_index=shard)
  work = work_lib.Work(out)
  with open(work.job) as f:
    num_buckets = json.load(f)["num_buckets"]
  assert num_buckets >= 4
  buckets = [np.load(work.bucket_stats(b)) for b in range(num_buckets)]
  one_sort = prep_stats.reduce_keys(
      *(np.concatenate([z[k] for z in buckets])
        for k in ("keys", "key_listens", "key_train")))
  # Merging after every bucket, in a few batches, and once at the end.
  for min_keys in (0, 300, 10**9):
    monkeypatch.setattr(prep_catalogue, "MERGE_MIN_KEYS", min_keys)
    merged = prep_catalogue.merge_stats(work, num_buckets)
    for got, want in zip(merged[:3], one_sort):
      np.testing.assert_array_equal(got, want)


def test_encoded_examples_parse_as_tf_examples():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = np.array([0, 1, 127, 128, 300, 2**31, 2**40, 5], np.int64)
  buf, offsets = prep_records.varint_encode(values)
  packed = buf[offsets[2]:offsets[7]]
  parsed = tf.train.Example.FromString(
      prep_records.encode_example(123456, 2,
                                  {"items": packed, "feedback": b"\x01"}))
  expected = tf.train.Example(features=tf.train.Features(feature={
      "uid": tf.train.Feature(int64_list=tf.train.Int64List(value=[123456])),
      "num_context": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
      "items": tf.train.Feature(int64_list=tf.train.Int64List(
          value=values[2:7].tolist())),
      "feedback": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
  }))
  assert parsed == expected


_HAS_SPARK = (importlib.util.find_spec("pyspark") is not None and
              shutil.which("java") is not None)


@pytest.mark.skipif(not _HAS_SPARK, reason="pyspark or java not installed")
@pytest.mark.slow  # JVM start and Spark's Python workers: about a minute
def test_spark_local_run_on_two_shards_gives_the_same_examples(
    tiny_yambda, prepared, catalogue, prep_config, tmp_path):
  out = str(tmp_path / "out")
  prep.prepare(tiny_yambda, "tiny", out,
               _small_units(prep_config, runner="spark", num_workers=2))
  _assert_same_examples(out, prepared, catalogue)
