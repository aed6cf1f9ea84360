r"""A small TF Serving stand-in: the exported models over REST and gRPC.

  python -m export.local_server \
      --model_config_file=/tmp/tfrs_yambda/demo/export/models.config \
      --rest_api_port=8501 --port=8500

Same URLs, JSON rules and gRPC service as `tensorflow_model_server` for the
Predict API, so `export.client` (and curl, and any TF Serving client) talks to
either. Two uses:
  * tests and development where the TF Serving binary is not installed;
  * serving the ScaNN model, whose custom ops stock TF Serving lacks: this
    process imports ScaNN, so its ops are registered before the model loads.
It is not a production server (one Python process, no request batching, no
version hot-swap): for production use TF Serving with the BruteForce model, or
a TF Serving build that links ScaNN's ops.

The JSON decoding follows TF Serving's REST API documentation
(https://www.tensorflow.org/tfx/serving/api_rest): exactly one of "instances"
(row format: a list with one object per query holding every named input; the
rows are stacked along a new batch dimension, so all rows must have the same
shapes) or "inputs" (column format: an object of named, already batched
values); every value must be a rectangular list matching the signature's
dtype (integers for int64: 1.5, "1" or true are errors); a response comes in
the request's format, {"predictions": [{...}, ...]} or {"outputs": {...}};
errors as {"error": "..."} with HTTP 400 (404 for an unknown model).
"""

import http.server
import json
import os
import re
import threading
from concurrent import futures
from typing import Dict, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

from export import client
from export import tf_serving

FLAGS = flags.FLAGS

_DTYPE_KINDS = {"int64": "iu", "int32": "iu", "float32": "iuf",
                "float64": "iuf"}
_PREDICT_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(/versions/(?P<version>\d+))?:predict$")


class BadRequest(ValueError):  # noqa: N818 (named after HTTP 400)
  """A request that TF Serving would refuse with INVALID_ARGUMENT."""


def _tensor(name: str, value, spec) -> np.ndarray:
  """A JSON value -> an array of the spec's dtype and rank, or BadRequest."""
  try:
    array = np.array(value)
  except ValueError:
    raise BadRequest(f"Input {name!r}: not a rectangular list.") from None
  dtype = spec.dtype.name
  if array.dtype == object:
    raise BadRequest(f"Input {name!r}: not a rectangular list.")
  if array.size and (array.dtype.kind not in _DTYPE_KINDS.get(dtype, "") or
                     array.dtype == bool):
    raise BadRequest(f"Input {name!r}: JSON values {array.ravel()[:1]} are "
                     f"not of the expected type {dtype}.")
  rank = len(spec.shape)
  if array.ndim != rank:
    raise BadRequest(f"Input {name!r}: expected rank {rank}, got shape "
                     f"{list(array.shape)}.")
  return array.astype(dtype)


def decode_predict_body(body: Dict, input_specs: Dict):
  """JSON predict body -> ({input name: array}, "row" or "column").

  Args:
    body: the parsed JSON request.
    input_specs: the signature's {name: tf.TensorSpec}.

  Raises:
    BadRequest: what TF Serving answers with HTTP 400.
  """
  if not isinstance(body, dict):
    raise BadRequest("The request body must be a JSON object.")
  if ("instances" in body) == ("inputs" in body):
    raise BadRequest("Exactly one of 'instances' or 'inputs' is required.")
  names = set(input_specs)
  if "instances" in body:
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
      raise BadRequest("'instances' must be a non-empty list.")
    for i, row in enumerate(rows):
      if not isinstance(row, dict) or set(row) != names:
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise BadRequest(f"instances[{i}]: expected an object with the "
                         f"inputs {sorted(names)}, got {got}.")
    columns = {n: [row[n] for row in rows] for n in names}
    fmt = "row"
  else:
    columns = body["inputs"]
    if not isinstance(columns, dict) or set(columns) != names:
      got = sorted(columns) if isinstance(columns, dict) else columns
      raise BadRequest(f"'inputs' must name the inputs {sorted(names)}, "
                       f"got {got}.")
    fmt = "column"
  return {n: _tensor(n, columns[n], input_specs[n]) for n in names}, fmt


def encode_predict_response(outputs: Dict[str, np.ndarray], fmt: str) -> Dict:
  """Output arrays -> TF Serving's JSON response in the request's format."""
  outputs = {k: np.asarray(v).tolist() for k, v in outputs.items()}
  if fmt == "column":
    return {"outputs": outputs}
  batch = len(next(iter(outputs.values())))
  return {"predictions": [{k: v[i] for k, v in outputs.items()}
                          for i in range(batch)]}


class Models:
  """The latest version of each configured model, loaded once."""

  def __init__(self, base_paths: Dict[str, str]):
    self.paths = {}
    for name, base in base_paths.items():
      versions = [int(v) for v in os.listdir(base) if v.isdigit()]
      if not versions:
        raise FileNotFoundError(f"No numbered version under {base}.")
      self.paths[name] = {v: os.path.join(base, str(v)) for v in versions}
    self._lock = threading.Lock()

  def signature(self, name: str, version: Optional[int] = None):
    if name not in self.paths:
      raise KeyError(f"Servable not found for request: Latest({name})")
    versions = self.paths[name]
    version = max(versions) if version is None else version
    if version not in versions:
      raise KeyError(f"Servable not found for request: "
                     f"Specific({name}, {version})")
    with self._lock:  # Load once even when requests race.
      return client.load_signature(versions[version])

  def predict(self, name: str, version: Optional[int],
              inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    outputs = self.signature(name, version)(
        **{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}

  def input_specs(self, name: str, version: Optional[int] = None):
    return self.signature(name, version).structured_input_signature[1]


def rest_handler(models: Models):
  """An http.server handler class serving POST /v1/models/<name>:predict."""

  class Handler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST predict endpoint."""

    def _reply(self, code: int, body: Dict):
      data = json.dumps(body).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_POST(self):  # pylint: disable=invalid-name
      match = _PREDICT_PATH.match(self.path)
      if not match:
        return self._reply(404,
                           {"error": f"Malformed request: POST {self.path}"})
      name = match["name"]
      version = int(match["version"]) if match["version"] else None
      try:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        inputs, fmt = decode_predict_body(body,
                                          models.input_specs(name, version))
        outputs = models.predict(name, version, inputs)
      except KeyError as e:
        return self._reply(404, {"error": str(e.args[0])})
      except (BadRequest, ValueError) as e:
        return self._reply(400, {"error": str(e)})
      except Exception as e:  # pylint: disable=broad-except
        # A TF runtime error (e.g. InvalidArgumentError), as TF Serving does.
        return self._reply(400, {"error": str(getattr(e, "message", e))})
      self._reply(200, encode_predict_response(outputs, fmt))

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      logging.debug(format, *args)

  return Handler


def grpc_servicer(models: Models):
  """A PredictionService servicer answering Predict from the loaded models."""
  import grpc  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top

  class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict only; the other PredictionService methods are unimplemented."""

    def Predict(self, request, context):  # pylint: disable=invalid-name
      spec = request.model_spec
      version = spec.version.value if spec.HasField("version") else None
      try:
        specs = models.input_specs(spec.name, version)
        if set(request.inputs) != set(specs):
          raise BadRequest(f"Expected inputs {sorted(specs)}, got "
                           f"{sorted(request.inputs)}.")
        inputs = {}
        for name, proto in request.inputs.items():
          array = tf.make_ndarray(proto)
          if array.dtype != specs[name].dtype.as_numpy_dtype:
            raise BadRequest(f"Input {name!r}: expects type "
                             f"{specs[name].dtype.name}, got {array.dtype}.")
          inputs[name] = array
        outputs = models.predict(spec.name, version, inputs)
      except KeyError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
      except Exception as e:  # pylint: disable=broad-except
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      str(getattr(e, "message", e)))
      response = predict_pb2.PredictResponse()
      response.model_spec.CopyFrom(spec)
      for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
      return response

  return Servicer()


def start(base_paths: Dict[str, str], rest_port: int = 0,
          grpc_port: Optional[int] = None, host: str = "localhost"):
  """Starts the servers in threads; returns (rest address, grpc address, stop).

  Port 0 picks a free port. `grpc_port` None: no gRPC server.
  """
  models = Models(base_paths)
  rest = http.server.ThreadingHTTPServer((host, rest_port),
                                         rest_handler(models))
  threading.Thread(target=rest.serve_forever, daemon=True).start()
  grpc_server, grpc_address = None, None
  if grpc_port is not None:
    import grpc  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        grpc_servicer(models), grpc_server)
    bound = grpc_server.add_insecure_port(f"{host}:{grpc_port}")
    grpc_server.start()
    grpc_address = f"{host}:{bound}"

  def stop():
    rest.shutdown()
    rest.server_close()
    if grpc_server is not None:
      grpc_server.stop(None)

  return f"{host}:{rest.server_address[1]}", grpc_address, stop


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the server's flags in `flag_values` (called by its main): the
  names `tensorflow_model_server` uses."""
  fv = flag_values
  flags.DEFINE_string("model_config_file", None,
                      "models.config written by the export (all its models).",
                      flag_values=fv)
  flags.DEFINE_string("model_name", None, "One model: its name ...",
                      flag_values=fv)
  flags.DEFINE_string("model_base_path", None, "... and its base path.",
                      flag_values=fv)
  flags.DEFINE_integer("rest_api_port", 8501, "REST port.", flag_values=fv)
  flags.DEFINE_integer("port", 8500, "gRPC port.", flag_values=fv)
  flags.DEFINE_string("host", "0.0.0.0", "Interface to listen on.",
                      flag_values=fv)


def main(argv):
  del argv
  if FLAGS.model_config_file:
    base_paths = tf_serving.read_model_config(FLAGS.model_config_file)
  elif FLAGS.model_name and FLAGS.model_base_path:
    base_paths = {FLAGS.model_name: FLAGS.model_base_path}
  else:
    raise app.UsageError("Give --model_config_file, or --model_name and "
                         "--model_base_path.")
  rest, grpc_address, _ = start(base_paths, FLAGS.rest_api_port, FLAGS.port,
                                FLAGS.host)
  for name in base_paths:
    print(f"Serving {name}: REST http://{rest}/v1/models/{name}:predict, "
          f"gRPC {grpc_address}", flush=True)
  threading.Event().wait()


if __name__ == "__main__":
  define_flags()
  app.run(main)
