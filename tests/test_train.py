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


def test_main_job_writes_results_logs_checkpoints_and_savedmodels(
    tiny_yambda, prepared, tmp_path):
  workdir = str(tmp_path)
  subprocess.run(_train_command(workdir, tiny_yambda, prepared,
                                "--profile_steps=3,4"), cwd=_REPO,
                 check=True, capture_output=True)
  results = _results(workdir)
  retrievers = {"model", "most_popular", "recent_popular",
                "seed_cooccurrence", "oracle"}
  assert set(results) == retrievers | {"recall_curve", "test_targets",
                                       "yambda_protocol", "by_target_kind",
                                       "by_component"}
  by_kind = results["by_target_kind"]
  assert set(by_kind) == retrievers | {"share"}
  assert abs(sum(by_kind["share"].values()) - 1) < 1e-6
  # Every test target has the generator's component (the oracle covers all).
  by_component = results["by_component"]
  assert set(by_component["share"]) == set(generate.COMPONENTS)
  assert abs(sum(by_component["share"].values()) - 1) < 1e-6
  oracle = by_component["oracle"]
  assert oracle["album"]["recall@10"] > oracle["explore"]["recall@10"]
  assert results["model"]["recall@100"] > results["most_popular"]["recall@100"]
  assert 0 < results["model"]["coverage@100"] <= 1
  assert set(results["recall_curve"]) == retrievers | {"k"}
  protocol = results["yambda_protocol"]
  assert set(protocol["retrievers"]) == retrievers - {"oracle"}
  assert protocol["users"] > 0 and protocol["ks"] == [10, 50, 100]
  assert (protocol["retrievers"]["model"]["recall@100"] >
          protocol["retrievers"]["most_popular"]["recall@100"])
  with open(os.path.join(workdir, "eval", "recall_at_k.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for name in ("projector_config.pbtxt", "metadata.tsv", "checkpoint"):
    assert os.path.exists(os.path.join(workdir, "logs", "projector", name))
  assert results["model"]["train_steps"] == _total_steps(prepared)
  assert glob.glob(os.path.join(workdir, "logs", "train", "events.out.*"))
  assert glob.glob(os.path.join(workdir, "logs", "metrics", "events.out.*"))
  # The profiler's trace of steps 3-4, for TensorBoard's Profile tab.
  assert glob.glob(os.path.join(workdir, "logs", "plugins", "profile",
                                "*", "*.xplane.pb"))
  assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  for kind in ("bruteforce", "scann"):
    assert os.path.exists(os.path.join(workdir, "export", f"yambda_{kind}",
                                       "1", "saved_model.pb"))
  # The run is over: its backup is gone, so a rerun starts afresh.
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
  model = _results(workdir)["model"]
  assert model["train_steps"] == _total_steps(prepared)
  assert 0 < model["resumed_from_step"] < model["train_steps"]


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
                       "--uniform_negatives=64"),
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
