r"""A small TF Serving stand-in: the exported models over REST and gRPC.

  python -m export.local_server \
      --model_config_file=/tmp/tfrs_yambda/demo/export/models.config \
      --rest_api_port=8501 --port=8500

Same URLs, JSON rules, gRPC services and answers as `tensorflow_model_server`
for model status, model metadata and Predict (`export.serving_api` has the
messages), so `export.client`, curl and any TF Serving client talk to either.
Two uses:
  * tests and development where the TF Serving binary is not installed;
  * serving the ScaNN model, whose custom ops stock TF Serving lacks: this
    process imports ScaNN, so its ops are registered before the model loads.
It is not a production server (one Python process, no request batching, no
version hot-swap): for production use TF Serving with the BruteForce model, or
a TF Serving build that links ScaNN's ops. It listens on localhost unless
told otherwise (--host=0.0.0.0 exposes it on every interface).

As models.config's policy (and TF Serving's default) asks, each model serves
its latest version, loaded before the server answers: status reports that
version AVAILABLE, and any other version is NOT_FOUND. Classify, Regress,
MultiInference and HandleReloadConfigRequest are not implemented.
"""

import http.server
import json
import os
import threading
from concurrent import futures
from typing import Dict, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from export import client
from export import serving_api
from export import tf_serving

FLAGS = flags.FLAGS


class Servable:
  """One loaded version of a model: its signatures and their SignatureDefs."""

  def __init__(self, name: str, version: int, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    client.load_scann_ops()
    self.name, self.version, self.path = name, version, path
    self.signatures = dict(tf.saved_model.load(path).signatures)
    # Read from saved_model.pb, as TF Serving reports them.
    self.signature_defs = serving_api.read_signature_defs(path)

  def signature(self, name: str, grpc: bool = False):
    """The callable signature `name`; unknown: TF Serving's error for the API.

    TF Serving refuses an unknown signature with INVALID_ARGUMENT over REST
    but FAILED_PRECONDITION over gRPC, in different words; both are HTTP 400.
    """
    if name not in self.signatures:
      if grpc:
        raise serving_api.FailedPrecondition(
            f'Serving signature key "{name}" not found.')
      raise serving_api.BadRequest(
          f'Serving signature name: "{name}" not found in signature def')
    return self.signatures[name]

  def predict(self, signature_name: str, inputs: Dict[str, np.ndarray],
              grpc: bool = False) -> Dict[str, np.ndarray]:
    """Runs a signature on checked inputs; returns its outputs."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    signature = self.signature(signature_name, grpc)
    try:
      outputs = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    except (TypeError, ValueError) as e:  # arguments the function refused
      raise serving_api.BadRequest(str(e)) from None
    return {k: v.numpy() for k, v in outputs.items()}


class Models:
  """The latest `num_versions` versions of each model, loaded at start."""

  def __init__(self, base_paths: Dict[str, str], num_versions: int = 1):
    self.servables: Dict[str, Dict[int, Servable]] = {}
    for name, base in base_paths.items():
      versions = sorted(int(v) for v in os.listdir(base) if v.isdigit())
      if not versions:
        raise FileNotFoundError(f"No numbered version under {base}.")
      self.servables[name] = {
          v: Servable(name, v, os.path.join(base, str(v)))
          for v in versions[-num_versions:]}

  def get(self, name: str, version: Optional[int] = None,
          label: Optional[str] = None) -> Servable:
    """The servable a request's model spec names (TF Serving's errors)."""
    if not name:
      raise serving_api.BadRequest("ModelSpec has no name specified.")
    if label is not None:  # models.config assigns no labels
      raise serving_api.BadRequest(
          f"Unrecognized servable version label: {label}")
    versions = self.servables.get(name, {})
    if version is None and versions:
      return versions[max(versions)]
    if version in versions:
      return versions[version]
    request = (f"Latest({name})" if version is None else
               f"Specific({name}, {version})")
    raise serving_api.NotFound(f"Servable not found for request: {request}")

  def status(self, name: str, version: Optional[int] = None):
    """GetModelStatusResponse; a version label is ignored, as TF Serving does.
    """
    versions = self.servables.get(name, {})
    if version is None:
      if not versions:
        raise serving_api.NotFound(
            f"Could not find any versions of model {name}")
      return serving_api.status_response(sorted(versions))
    if version not in versions:
      raise serving_api.NotFound(
          f"Could not find version {version} of model {name}")
    return serving_api.status_response([version])

  def metadata(self, name: str, version: Optional[int] = None,
               label: Optional[str] = None):
    servable = self.get(name, version, label)
    return serving_api.metadata_response(servable.name, servable.version,
                                         servable.signature_defs)


def rest_handler(models: Models):
  """An http.server handler class answering TF Serving's REST API."""

  class Handler(http.server.BaseHTTPRequestHandler):
    """Status, metadata and predict; errors as {"error": ...}."""
    timeout = 60  # seconds a client may take to send its request

    def _reply(self, code: int, body: Dict):
      data = json.dumps(body).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _body(self) -> bytes:
      try:
        length = int(self.headers.get("Content-Length") or 0)
      except ValueError:
        raise serving_api.BadRequest("Bad Content-Length header.") from None
      return self.rfile.read(length) if length > 0 else b""

    def _answer(self, method: str, data: bytes) -> Dict:
      route = serving_api.parse_path(method, self.path)
      if route.call == "status":
        return serving_api.status_json(models.status(route.name,
                                                     route.version))
      if route.call == "metadata":
        return serving_api.metadata_json(models.metadata(
            route.name, route.version, route.label))
      # TF Serving reads the JSON and its signature name before the model.
      body = serving_api.parse_json(data)
      signature_name = serving_api.signature_name(body)
      servable = models.get(route.name, route.version, route.label)
      signature = servable.signature(signature_name)
      if route.call != "predict":  # TF Serving's refusal for our signatures
        method_name = servable.signature_defs.signature_def[
            signature_name].method_name
        raise serving_api.BadRequest(
            f"Expected {route.call} signature method_name to be "
            f"tensorflow/serving/{route.call}. Was: {method_name}")
      inputs, fmt = serving_api.decode_predict_body(
          body, signature.structured_input_signature[1])
      return serving_api.encode_predict_response(
          servable.predict(signature_name, inputs), fmt)

    def _handle(self):
      try:
        # Read the whole body first, even for a request refused unread: a
        # socket closed on unread data may reset before the answer arrives.
        answer = self._answer(self.command, self._body())
      except Exception as e:  # pylint: disable=broad-except
        code, message = serving_api.error_status(e)
        if code == "INTERNAL":
          logging.exception("%s %s", self.command, self.path)
        return self._reply(serving_api.http_status(code), {"error": message})
      self._reply(200, answer)

    # Other methods get TF Serving's "Malformed request" (400) from _answer.
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      logging.debug(format, *args)

  return Handler


def _abort(context, error: Exception):
  """Ends a gRPC call with TF Serving's status for `error`."""
  import grpc  # pylint: disable=g-import-not-at-top
  code, message = serving_api.error_status(error)
  if code == "INTERNAL":
    logging.error("gRPC call failed: %r", error)
  context.abort(grpc.StatusCode[code], message)


def _model_spec(spec):
  """(name, version or None, label or None) of a request's ModelSpec."""
  choice = spec.WhichOneof("version_choice")
  return (spec.name, spec.version.value if choice == "version" else None,
          spec.version_label if choice == "version_label" else None)


def grpc_servicers(models: Models):
  """(PredictionService, ModelService) servicers over the loaded models."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import model_service_pb2_grpc  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top

  class Predictions(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress, MultiInference are
    unimplemented."""

    def Predict(self, request, context):  # pylint: disable=invalid-name
      try:
        servable = models.get(*_model_spec(request.model_spec))
        name = (request.model_spec.signature_name or
                serving_api.DEFAULT_SIGNATURE)
        signature = servable.signature(name, grpc=True)
        inputs = {}
        for key, proto in request.inputs.items():
          try:
            inputs[key] = tf.make_ndarray(proto)
          except Exception as e:  # pylint: disable=broad-except
            raise serving_api.BadRequest(f"Input {key!r}: {e}") from None
        serving_api.check_inputs(inputs,
                                 signature.structured_input_signature[1])
        known = sorted(signature.structured_outputs)
        wanted = list(request.output_filter) or known
        for key in wanted:
          if key not in known:
            raise serving_api.BadRequest(
                f"output tensor alias not found in signature: {key} "
                f"Outputs expected to be in the set {{{','.join(known)}}}.")
        outputs = servable.predict(name, inputs, grpc=True)
      except Exception as e:  # pylint: disable=broad-except
        return _abort(context, e)
      response = predict_pb2.PredictResponse()
      # The version and signature that served the request, as TF Serving.
      response.model_spec.name = servable.name
      response.model_spec.version.value = servable.version
      response.model_spec.signature_name = name
      for key in wanted:
        response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
      return response

    def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
      try:
        if not request.HasField("model_spec"):
          raise serving_api.BadRequest("Missing ModelSpec")
        if not request.metadata_field:
          raise serving_api.BadRequest(
              "GetModelMetadataRequest must specify at least one "
              "metadata_field")
        for field in request.metadata_field:
          if field != serving_api.SIGNATURE_DEF:
            raise serving_api.BadRequest(
                f"Metadata field {field} is not supported")
        return models.metadata(*_model_spec(request.model_spec))
      except Exception as e:  # pylint: disable=broad-except
        return _abort(context, e)

  class ModelStatus(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus; HandleReloadConfigRequest is unimplemented."""

    def GetModelStatus(self, request, context):  # pylint: disable=invalid-name
      try:
        if not request.HasField("model_spec"):
          raise serving_api.BadRequest("Missing ModelSpec")
        name, version, _ = _model_spec(request.model_spec)
        return models.status(name, version)
      except Exception as e:  # pylint: disable=broad-except
        return _abort(context, e)

  return Predictions(), ModelStatus()


def start(base_paths: Dict[str, str], rest_port: int = 0,
          grpc_port: Optional[int] = None, host: str = "localhost"):
  """Loads the models, starts the servers in threads.

  Args:
    base_paths: {model name: base path holding numbered versions}.
    rest_port: REST port; 0 picks a free one.
    grpc_port: gRPC port; 0 picks a free one; None: no gRPC server.
    host: the interface to listen on ("0.0.0.0": all of them).

  Returns:
    (REST "host:port", gRPC "host:port" or None, a function that stops both).
  """
  models = Models(base_paths)
  rest = http.server.ThreadingHTTPServer((host, rest_port),
                                         rest_handler(models))
  threading.Thread(target=rest.serve_forever, daemon=True).start()
  grpc_server, grpc_address = None, None
  if grpc_port is not None:
    import grpc  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import model_service_pb2_grpc  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    predictions, model_status = grpc_servicers(models)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        predictions, grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        model_status, grpc_server)
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
  # Loopback by default: a development server, not one to expose unasked.
  flags.DEFINE_string("host", "localhost",
                      "Interface to listen on; --host=0.0.0.0 exposes the "
                      "server on every interface.", flag_values=fv)


def main(argv: Sequence[str]):
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
