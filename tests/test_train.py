"""The main job end to end: outputs, resume after SIGKILL, two workers."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from data_prep import generate
from tests.conftest import HISTORY_LENGTH

# Every test here runs the main job in subprocesses.
pytestmark = pytest.mark.e2e

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_command(workdir, tiny_yambda, prepared, *extra):
  # Prep flags equal to the session's prep, so the prepared data is reused.
  return [sys.executable, "-m", "tfrs_yambda.train",
          "--flagfile=" + os.path.join(_REPO, "configs", "tiny.cfg"),
          f"--workdir={workdir}", f"--yambda_dir={tiny_yambda}",
          f"--prepared_dir={prepared}", "--generate=false",
          f"--history_length={HISTORY_LENGTH}", "--chunk_length=64",
          "--num_shards=2", *extra]


def _results(workdir):
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    return json.load(f)


def _total_steps(prepared, batch_size=256, epochs=2):
  with open(os.path.join(prepared, "catalogue", "metadata.json")) as f:
    return json.load(f)["num_train_examples"] // batch_size * epochs


def _eval_scalars(logdir):
  """{tag: [step, ...]} of the eval/* scalars in a TensorBoard log folder."""
  tags = {}
  for path in glob.glob(os.path.join(logdir, "events.out.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith("eval/"):
          tags.setdefault(value.tag, []).append(event.step)
  return tags


def test_main_job_chooses_on_validation_retrains_and_scores_test_once(
    tiny_yambda, prepared, tmp_path):
  workdir = str(tmp_path)
  # The export in a process of its own, from the retrained model's
  # checkpoint (export.from_checkpoint).
  subprocess.run(_train_command(workdir, tiny_yambda, prepared,
                                "--profile_steps=3,4", "--retrain",
                                "--fresh_export_process", "--history_bonus",
                                "--history_bonus_scales=0,0.1,0.3",
                                "--history_bonus_half_lives=10,inf",
                                "--artist_prior", "--artist_prior_masses=0,1",
                                "--successor_prior",
                                "--successor_prior_masses=0,2"),
                 cwd=_REPO, check=True, capture_output=True)
  results = _results(workdir)
  assert set(results) == {"selection", "validation", "retrain", "test",
                          "stages", "model"}
  assert results["model"]["prepared_dir"] == prepared + "_retrain"
  assert results["model"]["checkpoint"].startswith(
      os.path.join(workdir, "checkpoints", "retrain", "ckpt-"))
  # What each stage cost (the prepared data was reused; the retraining's
  # own prep ran).
  stages = results["stages"]
  assert set(stages) == {"prep", "train", "evaluate", "projector", "export"}
  for row in stages.values():
    assert row["wall_seconds"] >= 0 and row["peak_rss_gib"] > 0.1
  assert stages["train"]["wall_seconds"] > 1
  assert stages["export"]["disk_gib"] > 0
  # The epoch is chosen on the validation day, from per-epoch scores that
  # also reach TensorBoard.
  selection = results["selection"]
  assert len(selection["by_epoch"]) == 2 and selection["epoch"] in (1, 2)
  best = max(e["recall@100"] for e in selection["by_epoch"])
  assert selection["by_epoch"][selection["epoch"] - 1]["recall@100"] == best
  assert selection["train_steps"] == _total_steps(prepared)
  scalars = _eval_scalars(os.path.join(workdir, "logs", "metrics"))
  assert len(scalars["eval/recall@100"]) == 2
  # The retrained model: the chosen epoch count, on data prepared without a
  # validation window (everything before the test gap).
  with open(os.path.join(prepared + "_retrain", "catalogue",
                         "metadata.json")) as f:
    retrain_meta = json.load(f)
  assert retrain_meta["train_end"] == retrain_meta["test_start"] - 1800
  assert results["retrain"]["train_steps"] == (
      retrain_meta["num_train_examples"] // 256 * selection["epoch"])

  # ItemKNN's neighbourhood size: the best on the validation day.
  knn = selection["itemknn_neighbours"]
  assert knn["by_k"][str(knn["chosen"])] == max(knn["by_k"].values())
  # So is the history bonus, which the retrained model keeps.
  bonus = selection["history_bonus"]
  assert set(bonus["by_setting"]) == {"0/inf", "0.1/10", "0.1/inf",
                                      "0.3/10", "0.3/inf"}
  chosen = f"{bonus['scale']:g}/{bonus['half_life']}"
  assert bonus["by_setting"][chosen] == max(bonus["by_setting"].values())
  weights = tf.train.load_checkpoint(results["model"]["checkpoint"]
                                     ).get_tensor(
      "model/query_tower/history_bonus/slot_weight/.ATTRIBUTES/VARIABLE_VALUE")
  decay = 0.5 ** (np.arange(HISTORY_LENGTH - 1, -1, -1) /
                  float(bonus["half_life"]))
  np.testing.assert_allclose(weights, bonus["scale"] * decay / decay.sum(),
                             rtol=1e-6)

  # The artist prior's mass too, after the history bonus's; the retrained
  # model keeps it, with tables counted from its own training data.
  prior = selection["artist_prior"]
  assert set(prior["by_mass"]) == {"0", "1"}
  assert prior["by_mass"][f"{prior['mass']:g}"] == max(
      prior["by_mass"].values())
  reader = tf.train.load_checkpoint(results["model"]["checkpoint"])
  key = "model/query_tower/artist_prior/{}/.ATTRIBUTES/VARIABLE_VALUE"
  assert reader.get_tensor(key.format("mass")) == prior["mass"]
  assert reader.get_tensor(key.format("next_weights")).sum() > 0
  # The successor prior's two masses, next-track and the protocol's, each
  # the best by its own metric.
  successor = selection["successor_prior"]
  assert set(successor["by_mass"]) == set(successor["protocol_by_mass"]) == {
      "0", "2"}
  for by, chosen in (("by_mass", "mass"), ("protocol_by_mass",
                                           "protocol_mass")):
    assert successor[by][f"{successor[chosen]:g}"] == max(
        successor[by].values())
  key = "model/query_tower/successor_prior/{}/.ATTRIBUTES/VARIABLE_VALUE"
  assert reader.get_tensor(key.format("mass")) == successor["mass"]
  assert reader.get_tensor(key.format("protocol_mass")) == successor[
      "protocol_mass"]
  assert reader.get_tensor(key.format("probabilities")).sum() > 0

  retrievers = {"model", "most_popular", "recent_popular",
                "seed_cooccurrence", "item_knn", "oracle"}
  for window in ("validation", "test"):
    scores = results[window]
    assert scores["window"] == window
    assert set(scores) == retrievers | {
        "recall_curve", "test_targets", "yambda_protocol", "by_target_kind",
        "by_component", "window", "candidates", "sample", "timings"}
    assert 0 < scores["candidates"]["authors"] < scores["candidates"]["service"]
    by_kind = scores["by_target_kind"]
    assert set(by_kind) == retrievers | {"share"}
    assert abs(sum(by_kind["share"].values()) - 1) < 1e-6
    # Every target has the generator's component (the oracle covers all).
    by_component = scores["by_component"]
    assert set(by_component["share"]) == set(generate.COMPONENTS)
    assert abs(sum(by_component["share"].values()) - 1) < 1e-6
    oracle = by_component["oracle"]
    assert oracle["album"]["recall@10"] > oracle["explore"]["recall@10"]
    assert scores["model"]["recall@100"] > scores["most_popular"]["recall@100"]
    assert 0 < scores["model"]["coverage@100"] <= 1
    assert set(scores["recall_curve"]) == retrievers | {"k"}
    protocol = scores["yambda_protocol"]
    assert protocol["window"] == window
    assert set(protocol["retrievers"]) == retrievers - {"oracle"}
    assert protocol["users"] > 0 and protocol["ks"] == [10, 50, 100]
    assert (protocol["retrievers"]["model"]["recall@100"] >
            protocol["retrievers"]["most_popular"]["recall@100"])
  with open(os.path.join(workdir, "eval", "recall_at_k.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for name in ("projector_config.pbtxt", "metadata.tsv", "checkpoint"):
    assert os.path.exists(os.path.join(workdir, "logs", "projector", name))
  assert glob.glob(os.path.join(workdir, "logs", "train", "events.out.*"))
  assert glob.glob(os.path.join(workdir, "logs", "retrain", "train",
                                "events.out.*"))
  # The profiler's trace of steps 3-4, for TensorBoard's Profile tab.
  assert glob.glob(os.path.join(workdir, "logs", "plugins", "profile",
                                "*", "*.xplane.pb"))
  assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  for kind in ("bruteforce", "scann"):
    assert os.path.exists(os.path.join(workdir, "export", f"yambda_{kind}",
                                       "1", "saved_model.pb"))
    with open(os.path.join(workdir, "export", f"yambda_{kind}", "1",
                           "assets.extra", "export_metadata.json")) as f:
      metadata = json.load(f)
      assert metadata["history_bonus"] and metadata["artist_prior"]
      assert metadata["successor_prior"]
  # The run is over: its backups are gone, so a rerun starts afresh.
  assert not glob.glob(os.path.join(workdir, "backup", "**", "checkpoint"),
                       recursive=True)


def test_a_run_killed_with_sigkill_resumes_from_its_backup(
    tiny_yambda, prepared, tmp_path):
  workdir = str(tmp_path)
  command = _train_command(workdir, tiny_yambda, prepared,
                           "--checkpoint_every_steps=20",
                           "--eval_every_epoch=false")
  process = subprocess.Popen(command, cwd=_REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not glob.glob(os.path.join(workdir, "backup", "**", "checkpoint"),
                      recursive=True):
    assert process.poll() is None, "training ended before its first backup"
    assert time.time() < deadline, "no backup written"
    time.sleep(0.2)
  time.sleep(1.0)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(workdir, "eval", "results.json"))

  subprocess.run(command, cwd=_REPO, check=True, capture_output=True)
  training = _results(workdir)["selection"]
  assert training["train_steps"] == _total_steps(prepared)
  assert 0 < training["resumed_from_step"] < training["train_steps"]


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_two_workers_train_with_multi_worker_mirrored_strategy(
    tiny_yambda, prepared, tmp_path):
  # With the streaming frequency estimate and uniform negatives, whose
  # variables and random draws are the parts with distribution-specific
  # behaviour; the default configuration differs only by not using them.
  workdir = str(tmp_path)
  cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
  workers = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}}))
    workers.append(subprocess.Popen(
        _train_command(workdir, tiny_yambda, prepared, "--epochs=1",
                       "--eval_every_epoch=false",
                       "--sampling_probability=streaming",
                       "--uniform_negatives=64",
                       # The chief alone exports, in a process of its own.
                       "--fresh_export_process"),
        cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  logs = [w.communicate(timeout=420)[0] for w in workers]
  assert [w.returncode for w in workers] == [0, 0], logs[1][-3000:]
  steps = _total_steps(prepared, epochs=1)
  for log in logs:
    assert "on 2 replica(s)" in log
    assert f"Trained to step {steps} of {steps}" in log
  # The chief's estimate was updated once per step and checkpointed.
  checkpoint = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  estimator = "model/frequency_estimator/{}/.ATTRIBUTES/VARIABLE_VALUE"
  assert tf.train.load_variable(checkpoint, estimator.format("step")) == steps
  assert np.any(tf.train.load_variable(checkpoint,
                                       estimator.format("interval")) > 0)
  serve = tf.saved_model.load(os.path.join(
      workdir, "export", "yambda_bruteforce", "1")).signatures[
          "serving_default"]
  out = serve(user_id=tf.constant([1], tf.int64),
              seed_item_id=tf.constant([2], tf.int64),
              history_item_ids=tf.constant([[3, -1]], tf.int64))
  assert out["item_ids"].shape[0] == 1
  assert np.all(np.isfinite(out["scores"].numpy()))
