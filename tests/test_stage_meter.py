"""Stage costs (wall, peak memory, disk) and bounded training's projection."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tfrs_yambda import input_pipeline
from tfrs_yambda import model as model_lib
from tfrs_yambda import stage_meter
from tfrs_yambda import towers
from tfrs_yambda import trainer
from tests.conftest import SMALL_TOWERS

_MIB = 2**20


def test_a_stage_counts_its_memory_peak_even_when_freed_before_the_end(
    tmp_path):
  meter = stage_meter.StageMeter(interval_seconds=10.0)  # no sample in time
  # The stage starts by releasing freed memory: measure from there.
  stage_meter.release_freed_memory()
  before = stage_meter.tree_rss_bytes()
  with meter.stage("alloc", outputs=[str(tmp_path)]):
    block = np.ones(400 * _MIB // 8)  # touched: resident
    del block
    with open(tmp_path / "out.bin", "wb") as f:
      f.write(b"x" * (3 * _MIB))
  row = meter.stages["alloc"]
  # The process's own high-water mark catches what sampling missed.
  assert row["peak_rss_gib"] * 2**30 >= before + 350 * _MIB
  assert row["disk_gib"] == pytest.approx(3 * _MIB / 2**30, abs=1e-3)
  assert row["wall_seconds"] >= 0


def test_a_stage_counts_its_child_processes(tmp_path):
  meter = stage_meter.StageMeter(interval_seconds=0.05)
  child = ("import numpy, time; b = numpy.ones(300 * 2**20 // 8); "
           "time.sleep(1.0)")
  with meter.stage("child"):
    before = stage_meter.tree_rss_bytes()
    subprocess.run([sys.executable, "-c", child], check=True)
  assert meter.stages["child"]["peak_rss_gib"] * 2**30 >= before + 250 * _MIB
  assert "disk_gib" not in meter.stages["child"]


# Frees 4,000 heap blocks of 60 KiB (below malloc's mmap threshold) between
# blocks that stay, so the heap cannot shrink from its top alone.
_FRAGMENTED_HEAP = """
import numpy as np
from tfrs_yambda import stage_meter
blocks = [np.ones(60 * 1024 // 8) for _ in range(8000)]
kept = blocks[1::2]
del blocks
before = stage_meter.tree_rss_bytes()
released = stage_meter.release_freed_memory()
print(released, before, stage_meter.tree_rss_bytes())
"""


def test_freed_heap_memory_is_released_before_a_stage():
  out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], check=True,
                       capture_output=True, text=True).stdout.split()
  if out[0] != "True":
    pytest.skip("this C library has no malloc_trim")
  before, after = int(out[1]), int(out[2])
  assert before - after > 150 * _MIB


def test_a_stage_run_twice_adds_its_time_and_keeps_its_peak():
  meter = stage_meter.StageMeter()
  for _ in range(2):
    with meter.stage("train"):
      time.sleep(0.2)
  assert meter.stages["train"]["wall_seconds"] >= 0.4
  with pytest.raises(RuntimeError), meter.stage("fails"):
    raise RuntimeError("boom")
  # A failed stage still reports what it cost so far.
  assert list(meter.stages) == ["train", "fails"]
  table = meter.table().splitlines()
  assert table[0].startswith("| stage |") and len(table) == 4


def test_disk_bytes_of_files_folders_and_missing_paths(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "f").write_bytes(b"12345")
  (tmp_path / "g").write_bytes(b"123")
  assert stage_meter.disk_bytes([str(tmp_path / "a"), str(tmp_path / "g"),
                                 str(tmp_path / "missing")]) == 8


def test_bounded_training_stops_at_max_steps_and_projects_an_epoch(
    prepared, catalogue, tmp_path):
  config = trainer.TrainConfig(batch_size=64, epochs=3, max_steps=40,
                               eval_every_epoch=False, shuffle_buffer=5000,
                               checkpoint_every_steps=1000)
  model, selection = trainer.train_model(
      config, catalogue, prepared, towers.TowerConfig(**SMALL_TOWERS),
      model_lib.RetrievalConfig(),
      input_pipeline.ExampleRule(), logs_dir=str(tmp_path / "logs"),
      backup_dir=str(tmp_path / "backup"),
      checkpoints_dir=str(tmp_path / "checkpoints"))
  assert model is not None
  assert selection["train_steps"] == 40
  assert selection["epochs"] == selection["epoch"] == 1  # one bounded pass
  full = catalogue.metadata["num_train_examples"] // 64
  assert selection["full_epoch_steps"] == full > 40
  rate = selection["steady_examples_per_second"]
  assert rate > 0
  assert selection["projected_epoch_seconds"] == pytest.approx(
      full * 64 / rate, abs=0.1)  # both rounded to 0.1
  assert not os.path.exists(tmp_path / "backup" / "checkpoint")


def test_the_table_rounds_to_whole_seconds_and_keeps_the_jobs_order():
  meter = stage_meter.StageMeter()
  # As results.json stores them (sorted by name), with a stage of its own.
  meter.stages.update({
      "custom": {"wall_seconds": 1.0, "peak_rss_gib": 1.0},
      "export": {"wall_seconds": 60.0, "peak_rss_gib": 2.0},
      "prep": {"wall_seconds": 539.8, "peak_rss_gib": 12.16,
               "disk_gib": 10.423},
      "projector": {"wall_seconds": 0.8, "peak_rss_gib": 15.75}})
  assert meter.table().splitlines()[2:] == [
      "| prep | 9 min 0 s | 12.16 | 10.42 |",
      "| projector | 0 min 1 s | 15.75 |  |",
      "| export | 1 min 0 s | 2.00 |  |",
      "| custom | 0 min 1 s | 1.00 |  |"]
