"""TF Serving path: export files, REST/gRPC client, local server, CLIs.

The tensorflow_model_server binary is not available here, so the REST bodies
are decoded by `export.serving_api`, which follows TF Serving's documented
JSON rules, and run through the exported signature by `export.local_server`;
the results must equal the in-process call of the same SavedModel. TF
Serving's status, metadata and errors: test_serving_contract.py; histories
from raw events: test_serving_history.py.
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from export import client
from export import serving_api
from export import tf_serving
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import schema
from tests.conftest import EXPORT_K
from tests.conftest import HISTORY_LENGTH

K = EXPORT_K
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def queries(prepared, catalogue):
  """12 real test queries as (user, seed, history) lists, plus edge cases."""
  test = evaluate.load_examples(prepared, "test", HISTORY_LENGTH,
                                input_pipeline.ExampleRule())
  pick = np.linspace(0, len(test[schema.USER_ID]) - 1, 12).astype(int)
  ids = catalogue.item_ids
  users = test[schema.USER_ID][pick].tolist()
  seeds = ids[test[schema.SEED_ITEM][pick]].tolist()
  histories = [h[h >= 0].tolist()
               for h in ids[test[schema.HISTORY_ITEMS][pick]]]
  unknown = int(ids.max()) + 999
  long_history = ids[1:1 + 2 * HISTORY_LENGTH].tolist()
  # Unknown user and seed; an empty history; a history longer than N.
  users += [-7, users[0]]
  seeds += [unknown, seeds[0]]
  histories += [[], long_history]
  return users, seeds, histories


def test_export_writes_the_tf_serving_files(exported):
  export_dir, paths = exported
  with open(os.path.join(export_dir, "models.config")) as f:
    config = text_format.Parse(f.read(),
                               model_server_config_pb2.ModelServerConfig())
  models = {c.name: c for c in config.model_config_list.config}
  assert sorted(models) == ["yambda_bruteforce", "yambda_scann"]
  for kind in ("bruteforce", "scann"):
    model = models[f"yambda_{kind}"]
    assert os.path.isabs(model.base_path)
    assert os.path.dirname(paths[kind]) == model.base_path
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.latest.num_versions == 1

  with open(os.path.join(export_dir, "batching_parameters.txt")) as f:
    batching = text_format.Parse(f.read(),
                                 tf_serving.batching_parameters_class()())
  assert batching.max_batch_size.value == 256
  assert not batching.pad_variable_length_inputs


@pytest.mark.parametrize("kind", ["bruteforce", "scann"])
def test_warmup_requests_replay_through_the_signature(exported, kind):
  path = exported[1][kind]
  requests = tf_serving.read_warmup(
      os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))
  assert [len(tf.make_ndarray(r.inputs["user_id"])) for r in requests] == list(
      tf_serving.WARMUP_BATCH_SIZES)
  serve = client.load_signature(path)
  for request in requests:
    assert request.model_spec.name == f"yambda_{kind}"
    assert request.model_spec.signature_name == "serving_default"
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    assert inputs["history_item_ids"].shape[1] == HISTORY_LENGTH
    out = serve(**{k: tf.constant(v) for k, v in inputs.items()})
    assert out["item_ids"].shape == (len(inputs["user_id"]), K)


def test_rest_bodies_decode_to_the_request_tensors(exported, queries):
  inputs = client.make_inputs(*queries, history_length=HISTORY_LENGTH)
  specs = client.load_signature(
      exported[1]["bruteforce"]).structured_input_signature[1]
  for fmt, decoded_fmt in (("instances", "row"), ("inputs", "column")):
    # Through real JSON text, as on the wire.
    body = json.loads(json.dumps(client.rest_body(inputs, fmt)))
    decoded, got_fmt = serving_api.decode_predict_body(body, specs)
    assert got_fmt == decoded_fmt
    for name, value in inputs.items():
      assert decoded[name].dtype == np.int64
      np.testing.assert_array_equal(decoded[name], value)


@pytest.mark.parametrize("kind", ["bruteforce", "scann"])
@pytest.mark.parametrize("protocol,fmt", [("rest", "instances"),
                                          ("rest", "inputs"),
                                          ("grpc", None)])
def test_served_results_match_the_in_process_call(exported, servers, queries,
                                                  kind, protocol, fmt):
  path = exported[1][kind]
  local = client.recommend(*queries, saved_model=path)
  server = servers[0] if protocol == "rest" else servers[1]
  served = client.recommend(*queries, server=server, protocol=protocol,
                            model_name=f"yambda_{kind}",
                            history_length=HISTORY_LENGTH,
                            rest_format=fmt or "instances")
  assert served.item_ids.shape == (len(queries[0]), K)
  np.testing.assert_array_equal(served.item_ids, local.item_ids)
  np.testing.assert_allclose(served.scores, local.scores, atol=1e-6)

  # One query (scalars in, [k] out) gives the batch's row.
  one = client.recommend(queries[0][0], queries[1][0], queries[2][0],
                         server=server, protocol=protocol,
                         model_name=f"yambda_{kind}",
                         history_length=HISTORY_LENGTH)
  np.testing.assert_array_equal(one.item_ids, local.item_ids[0])


def test_client_histories_have_the_model_width():
  inputs = client.make_inputs([1, 2, 3], [4, 5, 6],
                              [[], [7, -1, 8], list(range(10, 40))],
                              history_length=5)
  np.testing.assert_array_equal(inputs["history_item_ids"], [
      [-1, -1, -1, -1, -1], [-1, -1, -1, 7, 8], [35, 36, 37, 38, 39]])
  # Without N: as wide as the longest history.
  assert client.make_inputs(1, 2, [3, 4])["history_item_ids"].shape == (1, 2)
  assert client.make_inputs(1, 2)["history_item_ids"].shape == (1, 0)


@pytest.mark.parametrize("query,message", [
    ((1.5, 2, [3]), "integer ids"),
    ((1, "2", [3]), "integer ids"),
    ((1, 2, [3.0, 4.5]), "integer ids"),
    ((None, 2, [3]), "Missing input 'user_id'"),
    ((1, None, [3]), "Missing input 'seed_item_id'"),
    (([[1]], [2], [[3]]), "rank 1"),
    ((1, 2, [[3, 4]]), "rank 1"),
    (([1, 2], [3], [[], []]), "2 user ids but 1 seed"),
    (([1, 2], [3, 4], [[5]]), "1 rows for 2 queries"),
    (([1], [2], [[3, [4]]]), "rectangular"),
])
def test_client_rejects_malformed_queries_before_sending(query, message):
  with pytest.raises(client.RequestError, match=message):
    # Nothing listens there: a RequestError proves nothing was sent.
    client.recommend(*query, server="localhost:1", protocol="rest")


def _post(server, model, body):
  request = urllib.request.Request(
      f"http://{server}/v1/models/{model}:predict",
      data=json.dumps(body).encode(), method="POST")
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,message", [
    ({"instances": [{"user_id": 1.5, "seed_item_id": 2,
                     "history_item_ids": [3]}]}, "expected type int64"),
    ({"inputs": {"user_id": [1], "seed_item_id": [True],
                 "history_item_ids": [[3]]}}, "expected type int64"),
    ({"instances": [{"user_id": 1, "history_item_ids": [3]}]},
     "expected an object with the inputs"),
    ({"inputs": {"user_id": [[1]], "seed_item_id": [2],
                 "history_item_ids": [[3]]}}, "expected rank 1"),
    ({"instances": [{"user_id": 1, "seed_item_id": 2, "history_item_ids": [3]},
                    {"user_id": 1, "seed_item_id": 2,
                     "history_item_ids": [3, 4]}]}, "rectangular"),
    ({"inputs": {}, "instances": []}, "Exactly one of"),
])
def test_server_refuses_malformed_bodies_clearly(servers, body, message):
  status, answer = _post(servers[0], "yambda_bruteforce", body)
  assert status == 400
  assert message in answer["error"]


def test_server_errors_reach_the_client(servers):
  with pytest.raises(client.ServingError, match="Servable not found"):
    client.recommend(1, 2, [3], server=servers[0], model_name="nope")
  with pytest.raises(client.ServingError, match="Servable not found"):
    client.recommend(1, 2, [3], server=servers[1], protocol="grpc",
                     model_name="nope")
  with pytest.raises(client.ServingError, match="No answer"):
    client.recommend(1, 2, [3], server="localhost:1", timeout=2)


def _run(args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=True).stdout


def test_recommend_cli_over_rest_matches_in_process(exported, servers,
                                                    queries):
  user, seed, history = queries[0][0], queries[1][0], queries[2][0]
  out = _run(["export.recommend", f"--user_id={user}",
              f"--seed_item_id={seed}",
              f"--history_item_ids={','.join(map(str, history))}",
              f"--server={servers[0]}", "--protocol=rest",
              "--model_name=yambda_scann",
              f"--history_length={HISTORY_LENGTH}", f"--top={K}", "--json"])
  local = client.recommend(user, seed, history,
                           saved_model=exported[1]["scann"])
  assert json.loads(out)["item_ids"] == local.item_ids.tolist()


def test_saved_model_cli_runs_the_scann_export(exported, tmp_path):
  # Stock saved_model_cli cannot: ScaNN's ops are not registered there.
  path = exported[1]["scann"]
  _run(["export.saved_model_cli", "run", "--dir", path, "--tag_set", "serve",
        "--signature_def", "serving_default", "--input_exprs",
        "user_id=[1,2];seed_item_id=[2,3];history_item_ids=[[3,-1],[-1,-1]]",
        "--outdir", str(tmp_path)])
  local = client.predict_saved_model(path, {
      "user_id": np.array([1, 2]), "seed_item_id": np.array([2, 3]),
      "history_item_ids": np.array([[3, -1], [-1, -1]])})
  np.testing.assert_array_equal(np.load(tmp_path / "item_ids.npy"),
                                local["item_ids"])
  np.testing.assert_allclose(np.load(tmp_path / "scores.npy"),
                             local["scores"], atol=1e-6)
