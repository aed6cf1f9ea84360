"""TF Serving's API as messages: REST paths and bodies, status and metadata.

What `tensorflow_model_server` reads and writes, with no model behind it:
`export.local_server` runs the models and the servers around these functions.
The shapes and wordings follow TF Serving's REST API documentation
(https://www.tensorflow.org/tfx/serving/api_rest) and its sources
(http_rest_api_util.cc, json_tensor.cc, get_model_status_impl.cc,
get_model_metadata_impl.cc, http_server.cc), so a TF Serving client gets the
answers it would get from TF Serving:

  GET  /v1/models/<name>[/versions/<n>|/labels/<l>]            model status
  GET  /v1/models/<name>[/versions/<n>|/labels/<l>]/metadata   signatures
  POST /v1/models/<name>[/versions/<n>|/labels/<l>]:predict    predict

Predict bodies hold exactly one of "instances" (row format: one object per
query holding every named input; rows are stacked along a new batch
dimension, so all rows must have the same shapes) or "inputs" (column
format: an object of named, already batched values); every value must be a
rectangular list of the signature's dtype (integers for int64: 1.5, "1",
true or an integer beyond int64 are errors). A response comes in the
request's format, {"predictions": [{...}, ...]} or {"outputs": {...}}.
Errors are {"error": "..."} with TF Serving's HTTP status for the error's
code: 400 for a bad request, 404 for an unknown model or version.
"""

import dataclasses
import json
import re
import urllib.parse
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2

DEFAULT_SIGNATURE = "serving_default"
# GetModelMetadata's one metadata field.
SIGNATURE_DEF = "signature_def"
_INT64 = np.iinfo(np.int64)
# Status codes by number: TF's error codes are gRPC's.
_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
          "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
          "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
          "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
          "DATA_LOSS", "UNAUTHENTICATED")
# TF Serving's ToHTTPStatusCode (http_server.cc).
_HTTP_STATUS = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500,
                "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
                "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
                "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
                "FAILED_PRECONDITION": 400, "ABORTED": 409,
                "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
                "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
_DTYPE_KINDS = {"int64": (int,), "int32": (int,), "float32": (int, float),
                "float64": (int, float)}
# TF Serving's path patterns; case-insensitive, as there.
_V1 = re.compile(r"/v1/.*", re.IGNORECASE)
_VERSION = r"(?:/versions/(\d+)|/labels/([^/:]+))?"
_POST = re.compile(rf"/v1/models/([^/:]+){_VERSION}:(classify|regress|predict)",
                   re.IGNORECASE)
_GET = re.compile(rf"/v1/models(?:/([^/:]+))?{_VERSION}(?:/(metadata))?",
                  re.IGNORECASE)


class StatusError(Exception):
  """An error that TF Serving answers with a status code (`code`)."""
  code = "INTERNAL"


class BadRequest(StatusError, ValueError):  # noqa: N818 (named after 400)
  """A request TF Serving refuses with INVALID_ARGUMENT (HTTP 400)."""
  code = "INVALID_ARGUMENT"


class NotFound(StatusError, LookupError):  # noqa: N818 (named after 404)
  """An unknown model or version: NOT_FOUND (HTTP 404)."""
  code = "NOT_FOUND"


class FailedPrecondition(StatusError):  # noqa: N818 (TF Serving's code)
  """FAILED_PRECONDITION (HTTP 400): e.g. gRPC's unknown signature."""
  code = "FAILED_PRECONDITION"


def error_status(error: BaseException) -> Tuple[str, str]:
  """(status code name, message) of an exception, as TF Serving reports it.

  A TensorFlow runtime error keeps its own code, as TF Serving passes the
  session's status on; any other exception is this server's bug: INTERNAL.
  """
  if isinstance(error, StatusError):
    return error.code, str(error)
  code = getattr(error, "error_code", None)  # tf.errors.OpError
  if isinstance(code, int) and 0 < code < len(_CODES):
    return _CODES[code], str(getattr(error, "message", error))
  return "INTERNAL", f"{type(error).__name__}: {error}"


def http_status(code: str) -> int:
  """TF Serving's HTTP status for a status code name."""
  return _HTTP_STATUS.get(code, 500)


# --- Paths --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Route:
  """A parsed REST path: the model, the version choice and the call."""
  name: str
  version: Optional[int]
  label: Optional[str]
  # "predict", "classify", "regress", "status" or "metadata".
  call: str


def parse_path(method: str, path: str) -> Route:
  """A REST request line -> its Route, as TF Serving's handler parses it.

  Args:
    method: "GET", "POST", ...
    path: the request path (a query string is ignored).

  Returns:
    The Route.

  Raises:
    NotFound: a path outside /v1/, which TF Serving does not handle.
    BadRequest: a path or method that is not one of the API's calls.
  """
  path = urllib.parse.urlsplit(path).path
  if not _V1.fullmatch(path):
    raise NotFound(f"Not found: {method} {path}")
  match = (_POST if method == "POST" else _GET if method == "GET" else
           None)
  match = match and match.fullmatch(path)
  malformed = BadRequest(f"Malformed request: {method} {path}")
  if not match:
    raise malformed
  name, version, label, call = match.groups()
  name = urllib.parse.unquote(name or "")
  if version is not None:
    if len(version) > 19 or int(version) > _INT64.max:
      raise BadRequest(f"Failed to convert version: {version[:40]} to "
                       "numeric.")
    version = int(version)
  if label is not None:
    label = urllib.parse.unquote(label)
  if method == "GET":
    # As TF Serving compares it: "/METADATA" matches the pattern but is a
    # status request.
    call = "metadata" if call == "metadata" else "status"
    if not name:
      raise BadRequest("Missing model name in request.")
  elif call not in ("predict", "classify", "regress"):
    raise malformed  # ":PREDICT" matches the pattern, no call.
  return Route(name, version, label, call)


# --- Predict ------------------------------------------------------------------


def _debug(value, limit: int = 200) -> str:
  """A JSON value for an error message, cut to `limit` characters."""
  try:
    text = json.dumps(value, default=str)
  except (ValueError, RecursionError):  # an int of 5,000 digits, deep lists
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[:limit] + "..."


def parse_json(data: bytes) -> Dict:
  """A request body -> its JSON object, or BadRequest (TF Serving's words)."""
  if not data:
    raise BadRequest("JSON Parse error: The document is empty")
  try:
    body = json.loads(data)
  except (ValueError, RecursionError) as e:  # RecursionError: deep nesting
    raise BadRequest(f"JSON Parse error: {e}") from None
  if not isinstance(body, dict):
    raise BadRequest(f"JSON Value: {_debug(body)} Is not object")
  return body


def signature_name(body: Dict) -> str:
  """The body's "signature_name" (default serving_default), or BadRequest."""
  name = body.get("signature_name", "")
  if not isinstance(name, str):
    raise BadRequest(f"JSON Value: {_debug(body)} not formatted correctly. "
                     "'signature_name' key must be a string value.")
  return name or DEFAULT_SIGNATURE


def _tensor(name: str, value, spec) -> np.ndarray:
  """A JSON value -> an array of the spec's dtype and rank, or BadRequest.

  Walked level by level rather than given to np.array, which would take
  true as 1, wrap 2**63 around and turn mixed lists into floats.
  """
  shape, level = [], [value]
  while level and all(isinstance(v, list) for v in level):
    if len({len(v) for v in level}) > 1:
      raise BadRequest(f"Input {name!r}: not a rectangular list.")
    shape.append(len(level[0]))
    level = [x for v in level for x in v]
  if any(isinstance(v, list) for v in level):
    raise BadRequest(f"Input {name!r}: not a rectangular list.")
  dtype = spec.dtype.name
  kinds = _DTYPE_KINDS.get(dtype, ())
  bounds = np.iinfo(dtype) if int in kinds and float not in kinds else None
  for v in level:
    # bool is an int subclass: `type`, not isinstance.
    if type(v) not in kinds or (bounds and type(v) is int and
                                not bounds.min <= v <= bounds.max):
      raise BadRequest(f"Input {name!r}: JSON value {_debug(v, 40)} is not "
                       f"of the expected type {dtype}.")
  rank = len(spec.shape)
  if len(shape) != rank:
    raise BadRequest(f"Input {name!r}: expected rank {rank}, got shape "
                     f"{shape}.")
  return np.array(level, dtype).reshape(shape)


def check_batch(inputs: Dict[str, np.ndarray]) -> None:
  """Every input must have the same batch size (BadRequest otherwise)."""
  sizes = {n: a.shape[0] for n, a in inputs.items() if a.ndim}
  if len(set(sizes.values())) > 1:
    raise BadRequest(f"Inputs of different batch sizes: {sizes}.")


def decode_predict_body(body: Dict, input_specs: Dict):
  """JSON predict body -> ({input name: array}, "row" or "column").

  Args:
    body: the parsed JSON request.
    input_specs: the signature's {name: tf.TensorSpec}.

  Returns:
    Arrays of each spec's dtype and rank, one batch size for all; and the
    request's format, which the response keeps.

  Raises:
    BadRequest: what TF Serving answers with HTTP 400; nothing else.
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
        got = (sorted(map(str, row)) if isinstance(row, dict) else
               type(row).__name__)
        raise BadRequest(f"instances[{i}]: expected an object with the "
                         f"inputs {sorted(names)}, got {got}.")
    columns = {n: [row[n] for row in rows] for n in names}
    fmt = "row"
  else:
    columns = body["inputs"]
    if not isinstance(columns, dict) or set(columns) != names:
      got = (sorted(map(str, columns)) if isinstance(columns, dict) else
             _debug(columns))
      raise BadRequest(f"'inputs' must name the inputs {sorted(names)}, "
                       f"got {got}.")
    fmt = "column"
  inputs = {n: _tensor(n, columns[n], input_specs[n]) for n in sorted(names)}
  check_batch(inputs)
  return inputs, fmt


def _set(names) -> str:
  return "{" + ",".join(sorted(names)) + "}"


def check_inputs(inputs: Dict[str, np.ndarray], input_specs: Dict) -> None:
  """gRPC inputs (arrays) against the signature: names, dtypes, ranks, batch.

  Raises:
    BadRequest: with TF Serving's words where it has them.
  """
  if set(inputs) != set(input_specs):
    sent, wanted = set(inputs), set(input_specs)
    raise BadRequest(
        f"input size does not match signature: {len(sent)}!={len(wanted)} "
        f"len({_set(sent)}) != len({_set(wanted)}). Sent extra: "
        f"{_set(sent - wanted)}. Missing but required: "
        f"{_set(wanted - sent)}.")
  for name, array in inputs.items():
    spec = input_specs[name]
    if array.dtype != spec.dtype.as_numpy_dtype:
      raise BadRequest(f"Input {name!r}: expects type {spec.dtype.name}, got "
                       f"{array.dtype}.")
    if array.ndim != len(spec.shape):
      raise BadRequest(f"Input {name!r}: expected rank {len(spec.shape)}, "
                       f"got shape {list(array.shape)}.")
  check_batch(inputs)


def encode_predict_response(outputs: Dict[str, np.ndarray], fmt: str) -> Dict:
  """Output arrays -> TF Serving's JSON response in the request's format."""
  outputs = {k: np.asarray(v).tolist() for k, v in outputs.items()}
  if fmt == "column":
    return {"outputs": outputs}
  batch = len(next(iter(outputs.values())))
  return {"predictions": [{k: v[i] for k, v in outputs.items()}
                          for i in range(batch)]}


# --- Status and metadata ------------------------------------------------------


def status_response(versions: Iterable[int]
                    ) -> get_model_status_pb2.GetModelStatusResponse:
  """GetModelStatusResponse: each version AVAILABLE (loaded and serving)."""
  response = get_model_status_pb2.GetModelStatusResponse()
  for version in versions:
    status = response.model_version_status.add(
        version=version,
        state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    # Present with its defaults: error_code OK, error_message "".
    status.status.SetInParent()
  return response


def read_signature_defs(saved_model: str, tag: str = "serve"
                        ) -> get_model_metadata_pb2.SignatureDefMap:
  """The SignatureDefs of a SavedModel's `tag` graph, from saved_model.pb."""
  proto = saved_model_pb2.SavedModel()
  with open(f"{saved_model}/saved_model.pb", "rb") as f:
    proto.ParseFromString(f.read())
  for graph in proto.meta_graphs:
    if tag in graph.meta_info_def.tags:
      signatures = get_model_metadata_pb2.SignatureDefMap()
      for key, value in graph.signature_def.items():
        signatures.signature_def[key].CopyFrom(value)
      return signatures
  raise ValueError(f"{saved_model} has no MetaGraph tagged {tag!r}.")


def metadata_response(name: str, version: int,
                      signatures: get_model_metadata_pb2.SignatureDefMap
                      ) -> get_model_metadata_pb2.GetModelMetadataResponse:
  """GetModelMetadataResponse: the model spec and the packed SignatureDefMap.

  As TF Serving's: model_spec has the name and the version served, no
  signature_name; metadata["signature_def"] is the SignatureDefMap in an Any.
  """
  response = get_model_metadata_pb2.GetModelMetadataResponse()
  response.model_spec.name = name
  response.model_spec.version.value = version
  response.metadata[SIGNATURE_DEF].Pack(signatures)
  return response


def _to_dict(message) -> Dict:
  # TF Serving's JsonPrintOptions: always_print_fields_with_no_presence and
  # preserve_proto_field_names (int64 values become strings, as there).
  return json_format.MessageToDict(
      message, always_print_fields_with_no_presence=True,
      preserving_proto_field_name=True)


def status_json(response: get_model_status_pb2.GetModelStatusResponse
                ) -> Dict:
  """The REST body of a status response, e.g. {"model_version_status": [{
  "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
  "error_message": ""}}]}."""
  return _to_dict(response)


def metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse
                  ) -> Dict:
  """The REST body of a metadata response: {"model_spec": {...}, "metadata":
  {"signature_def": <SignatureDefMap>}}, whose map is again under
  "signature_def", as TF Serving writes it."""
  signatures = get_model_metadata_pb2.SignatureDefMap()
  response.metadata[SIGNATURE_DEF].Unpack(signatures)
  return {"model_spec": _to_dict(response.model_spec),
          "metadata": {SIGNATURE_DEF: _to_dict(signatures)}}
