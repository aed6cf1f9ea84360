"""TF Serving's answers from the local server, to any TF Serving client.

A TF Serving client (the tensorflow-serving-api stubs, raw HTTP as curl
sends it) must get what `tensorflow_model_server` answers: status, metadata,
predict, and its errors for an unknown model, version or signature. Request
bodies are also thrown at the decoder and the server at random (hypothesis):
the answer is always defined, never a crash or a 5xx.
"""

import http.client
import json

from absl import flags
import grpc
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from export import client
from export import local_server
from export import serving_api
from export import tf_serving
from tfrs_yambda import schema

MODEL = "yambda_bruteforce"
SPECS = schema.serving_input_signature()
VALID = {"instances": [{"user_id": 1, "seed_item_id": 2,
                        "history_item_ids": [3, -1]}]}


@pytest.fixture(scope="module")
def stubs(servers):
  """(ModelService, PredictionService) stubs of tensorflow-serving-api."""
  with grpc.insecure_channel(servers[1]) as channel:
    yield (model_service_pb2_grpc.ModelServiceStub(channel),
           prediction_service_pb2_grpc.PredictionServiceStub(channel))


def _http(server, method, path, body=b""):
  """One raw HTTP request, as curl sends it -> (status, parsed JSON)."""
  connection = http.client.HTTPConnection(server, timeout=30)
  connection.request(method, path, body=body)
  response = connection.getresponse()
  status, data = response.status, response.read()
  connection.close()
  assert response.getheader("Content-Type") == "application/json"
  return status, json.loads(data)


def _spec(name, version=None, signature_name=""):
  spec = {"name": name, "signature_name": signature_name}
  return {**spec, "version": str(version)} if version else spec


# --- Status and metadata --------------------------------------------------


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}",
                                  f"/v1/models/{MODEL}/versions/1",
                                  f"/v1/models/{MODEL}/labels/stable"])
def test_rest_status_of_a_served_model(servers, path):
  assert _http(servers[0], "GET", path) == (200, {"model_version_status": [{
      "version": "1", "state": "AVAILABLE",
      "status": {"error_code": "OK", "error_message": ""}}]})


@pytest.mark.parametrize("path,code,error", [
    ("/v1/models/nope", 404, "Could not find any versions of model nope"),
    ("PUT /v1/models/nope", 400, "Malformed request: PUT /v1/models/nope"),
    (f"POST /v1/models/{MODEL}:classify", 400, "Expected classify signature "
     "method_name to be tensorflow/serving/classify. Was: "
     "tensorflow/serving/predict"),
    (f"/v1/models/{MODEL}/versions/7", 404,
     f"Could not find version 7 of model {MODEL}"),
    ("/v1/models/nope/metadata", 404,
     "Servable not found for request: Latest(nope)"),
    (f"/v1/models/{MODEL}/versions/7/metadata", 404,
     f"Servable not found for request: Specific({MODEL}, 7)"),
    (f"/v1/models/{MODEL}/labels/x/metadata", 400,
     "Unrecognized servable version label: x"),
    ("/v1/models", 400, "Missing model name in request."),
    ("/v1/models/a/b", 400, "Malformed request: GET /v1/models/a/b"),
    ("/v2/models/a", 404, "Not found: GET /v2/models/a"),
])
def test_rest_status_and_metadata_errors(servers, path, code, error):
  method, _, path = path.rpartition(" ")
  assert _http(servers[0], method or "GET", path, b"{}") == (
      code, {"error": error})


@pytest.mark.parametrize("version", [None, 1])
def test_rest_metadata_is_the_saved_signature_def(servers, exported, version):
  path = f"/v1/models/{MODEL}" + (f"/versions/{version}" if version else "")
  status, body = _http(servers[0], "GET", path + "/metadata")
  assert status == 200
  assert body["model_spec"] == _spec(MODEL, 1)
  signatures = json_format.ParseDict(
      body["metadata"]["signature_def"],
      get_model_metadata_pb2.SignatureDefMap())
  assert signatures == serving_api.read_signature_defs(
      exported[1]["bruteforce"])
  default = body["metadata"]["signature_def"]["signature_def"][
      "serving_default"]
  assert default["method_name"] == "tensorflow/serving/predict"
  assert {k: v["dtype"] for k, v in default["inputs"].items()} == {
      "user_id": "DT_INT64", "seed_item_id": "DT_INT64",
      "history_item_ids": "DT_INT64"}
  assert default["inputs"]["history_item_ids"]["tensor_shape"]["dim"] == [
      {"size": "-1", "name": ""}, {"size": "-1", "name": ""}]


def test_grpc_status_and_metadata(stubs, exported):
  models, predictions = stubs
  for version in (None, 1):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    if version:
      request.model_spec.version.value = version
    [status] = models.GetModelStatus(request).model_version_status
    assert (status.version, status.state, status.status.error_code) == (
        1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)

    request = get_model_metadata_pb2.GetModelMetadataRequest(
        metadata_field=["signature_def"])
    request.model_spec.name = "yambda_scann"
    if version:
      request.model_spec.version.value = version
    response = predictions.GetModelMetadata(request)
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == ("yambda_scann", 1, "")
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert signatures == serving_api.read_signature_defs(exported[1]["scann"])


def _grpc_error(call, request):
  with pytest.raises(grpc.RpcError) as raised:
    call(request)
  return raised.value.code(), raised.value.details()


def test_grpc_status_and_metadata_errors(stubs):
  models, predictions = stubs
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = "nope"
  assert _grpc_error(models.GetModelStatus, status) == (
      grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")
  status.model_spec.name, status.model_spec.version.value = MODEL, 3
  assert _grpc_error(models.GetModelStatus, status) == (
      grpc.StatusCode.NOT_FOUND, f"Could not find version 3 of model {MODEL}")

  metadata = get_model_metadata_pb2.GetModelMetadataRequest(
      metadata_field=["signature_def"])
  metadata.model_spec.name = "nope"
  assert _grpc_error(predictions.GetModelMetadata, metadata) == (
      grpc.StatusCode.NOT_FOUND,
      "Servable not found for request: Latest(nope)")
  metadata.model_spec.name, metadata.model_spec.version.value = MODEL, 3
  assert _grpc_error(predictions.GetModelMetadata, metadata) == (
      grpc.StatusCode.NOT_FOUND,
      f"Servable not found for request: Specific({MODEL}, 3)")
  metadata.model_spec.version.value = 1
  del metadata.metadata_field[:]
  assert _grpc_error(predictions.GetModelMetadata, metadata) == (
      grpc.StatusCode.INVALID_ARGUMENT,
      "GetModelMetadataRequest must specify at least one metadata_field")


# --- Predict ----------------------------------------------------------------


def test_grpc_predict_names_the_version_and_signature(stubs):
  inputs = client.make_inputs([1, 2], [3, 4], [[5], []], history_length=4)
  response = stubs[1].Predict(tf_serving.predict_request(MODEL, inputs, ""))
  assert (response.model_spec.name, response.model_spec.version.value,
          response.model_spec.signature_name) == (MODEL, 1, "serving_default")
  assert sorted(response.outputs) == ["item_ids", "scores"]


def test_grpc_predict_refuses_bad_inputs_with_invalid_argument(stubs):
  request = tf_serving.predict_request(MODEL, client.make_inputs(1, 2, [3]))
  request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.int32([1])))
  assert _grpc_error(stubs[1].Predict, request) == (
      grpc.StatusCode.INVALID_ARGUMENT,
      "Input 'user_id': expects type int64, got int32.")
  del request.inputs["user_id"]
  assert _grpc_error(stubs[1].Predict, request)[1].startswith(
      "input size does not match signature: 2!=3")


def test_the_server_listens_on_loopback_by_default():
  flag_values = flags.FlagValues()
  local_server.define_flags(flag_values)
  flag_values(["local_server"])
  assert flag_values.host == "localhost"
  assert "--host=0.0.0.0" in flag_values["host"].help


def test_unknown_signature_is_refused_not_served(servers, stubs):
  status, body = _http(servers[0], "POST", f"/v1/models/{MODEL}:predict",
                       json.dumps({**VALID, "signature_name": "x"}))
  assert (status, body) == (400, {
      "error": 'Serving signature name: "x" not found in signature def'})
  inputs = client.make_inputs(1, 2, [3])
  # TF Serving's gRPC Predict: FAILED_PRECONDITION, in other words.
  assert _grpc_error(stubs[1].Predict, tf_serving.predict_request(
      MODEL, inputs, "x")) == (grpc.StatusCode.FAILED_PRECONDITION,
                               'Serving signature key "x" not found.')


def test_unknown_model_or_version_on_predict(servers, stubs):
  body = json.dumps(VALID)
  for path, error in (
      ("/v1/models/nope:predict",
       "Servable not found for request: Latest(nope)"),
      (f"/v1/models/{MODEL}/versions/2:predict",
       f"Servable not found for request: Specific({MODEL}, 2)")):
    assert _http(servers[0], "POST", path, body) == (404, {"error": error})
  inputs = client.make_inputs(1, 2, [3])
  assert _grpc_error(stubs[1].Predict, tf_serving.predict_request(
      MODEL, inputs, version=2)) == (
          grpc.StatusCode.NOT_FOUND,
          f"Servable not found for request: Specific({MODEL}, 2)")


@pytest.mark.parametrize("body,error", [
    (b"", "JSON Parse error: The document is empty"),
    (b"{", "JSON Parse error"),
    (b"\xff\xfe{", "JSON Parse error"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON Parse error"),
    (b"[1]", "JSON Value: [1] Is not object"),
    (b'{"signature_name": 1, "inputs": {}}', "'signature_name' key must be"),
])
def test_raw_bodies_that_are_not_requests(servers, body, error):
  status, answer = _http(servers[0], "POST", f"/v1/models/{MODEL}:predict",
                         body)
  assert status == 400 and error in answer["error"]


# --- Random bodies ------------------------------------------------------------

_LEAVES = (st.none() | st.booleans() | st.integers() |
           st.integers(min_value=2**62, max_value=2**70) |
           st.integers(min_value=-2**70, max_value=-2**63 - 1) |
           st.floats() | st.text(max_size=4))
_JSON = st.recursive(_LEAVES, lambda kids: st.lists(kids, max_size=4) |
                     st.dictionaries(st.text(max_size=4), kids, max_size=3),
                     max_leaves=16)
_KEYS = st.sampled_from(["instances", "inputs", "signature_name", "user_id",
                         "seed_item_id", "history_item_ids"]) | st.text(
                             max_size=4)


@st.composite
def _mutated(draw):
  """A valid body (either format) with one value, key or row changed."""
  rows = draw(st.lists(st.fixed_dictionaries({
      "user_id": st.integers(-2**63, 2**63 - 1),
      "seed_item_id": st.integers(-5, 10**6),
      "history_item_ids": st.lists(st.integers(-1, 50), min_size=2,
                                   max_size=2)}), min_size=1, max_size=3))
  if draw(st.booleans()):
    body, node = {"instances": rows}, draw(st.sampled_from(rows))
  else:
    node = {k: [r[k] for r in rows] for k in rows[0]}
    body = {"inputs": node}
  key = draw(st.sampled_from(sorted(node)))
  change = draw(st.sampled_from(["value", "delete", "add", "wrap", "none"]))
  if change == "value":
    node[key] = draw(_JSON)
  elif change == "delete":
    del node[key]
  elif change == "add":
    node[draw(_KEYS)] = draw(_JSON)
  elif change == "wrap":
    node[key] = [node[key]]
  return body


_BODIES = st.one_of(_JSON, st.dictionaries(_KEYS, _JSON, max_size=3),
                    _mutated())


@settings(max_examples=400, deadline=None)
@given(_BODIES)
def test_decoder_returns_signature_arrays_or_bad_request(body):
  try:
    inputs, fmt = serving_api.decode_predict_body(body, SPECS)
  except serving_api.BadRequest:
    return
  assert fmt in ("row", "column") and set(inputs) == set(SPECS)
  batch = {a.shape[0] for a in inputs.values()}
  assert len(batch) == 1
  for name, array in inputs.items():
    assert array.dtype == np.int64 and array.ndim == len(SPECS[name].shape)


@settings(max_examples=100, deadline=None)
@given(body=_BODIES)
def test_server_answers_random_bodies_without_a_5xx(servers, body):
  status, answer = _http(servers[0], "POST", f"/v1/models/{MODEL}:predict",
                         json.dumps(body))
  event(f"HTTP {status}")
  assert status == 200 or (400 <= status < 500 and set(answer) == {"error"})
  if status == 200:
    assert set(answer) in ({"predictions"}, {"outputs"})
