"""Queries the exported retrieval model: TF Serving (REST, gRPC) or in-process.

  from export import client
  recs = client.recommend(user_id=42, seed_item_id=7, history_item_ids=[1, 2],
                          server="localhost:8501", protocol="rest")
  recs.item_ids, recs.scores              # [k] each ([batch, k] for a batch)

Without `server`, the same signature runs in this process from `saved_model`.

A history is what the model was trained on: the user's most recent
*positive* listens (played at least 50%, not disliked), oldest first, of
tracks the model knows; not every recent play. From a user's raw events
(item, played ratio, event type), `recommend_from_events` builds it with the
prep's own rules (`export.events`):

  recs = client.recommend_from_events(
      42, [(7, 100, "listen"), (8, 12, "listen"), (7, None, "dislike")],
      server="localhost:8501", saved_model=path)  # path: ids known, N

Requests are checked here, before they leave the client, so a malformed query
fails with a message that names the input rather than a server-side shape or
type error. Histories are sent exactly `history_length` wide (oldest first,
left-padded with -1, cut to the most recent items): every request then has the
same shape, which TF Serving's batching needs (see batching_parameters.txt).
"""

import contextlib
import dataclasses
import functools
import json
import os
import urllib.error
import urllib.request
from typing import Dict, Optional, Sequence, Union

import numpy as np

from data_prep import rules
from export import events as events_lib
from tfrs_yambda import schema

SIGNATURE_NAME = "serving_default"
# In each exported version's assets.extra/: the raw item ids the model knows.
KNOWN_ITEM_IDS_FILE = "known_item_ids.npy"
DEFAULT_MODEL_NAME = "yambda_bruteforce"
INPUT_NAMES = (schema.SERVING_USER_ID, schema.SERVING_SEED_ITEM_ID,
               schema.SERVING_HISTORY_ITEM_IDS)
PADDING_ID = schema.SERVING_PADDING_ID

IntOrInts = Union[int, Sequence[int], np.ndarray]


class RequestError(ValueError):
  """A query that the model's signature cannot accept."""


class ServingError(RuntimeError):
  """The server answered with an error (or not at all)."""


@dataclasses.dataclass
class Recommendations:
  item_ids: np.ndarray  # int64 [k], or [batch, k]
  scores: np.ndarray    # float32, same shape


def _integer_array(name: str, value, rank: int) -> np.ndarray:
  """`value` as an int64 array of the given rank, or a RequestError."""
  if value is None:
    raise RequestError(f"Missing input {name!r}.")
  try:
    array = np.asarray(value)
  except ValueError as e:  # Ragged nested lists.
    raise RequestError(f"{name!r} is not a rectangular array: {e}") from None
  if array.dtype == object:
    raise RequestError(f"{name!r} is not a rectangular array of integers.")
  if array.size and array.dtype.kind not in "iu":
    raise RequestError(f"{name!r} must hold integer ids, got dtype "
                       f"{array.dtype} ({array.ravel()[:3].tolist()}...).")
  if array.ndim != rank:
    raise RequestError(f"{name!r} must have rank {rank}, got shape "
                       f"{array.shape}.")
  if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(
      np.int64).max:
    raise RequestError(f"{name!r} has ids beyond int64.")
  return array.astype(np.int64)


def _history_matrix(histories, batch: int,
                    history_length: Optional[int]) -> np.ndarray:
  """Histories (ragged ok) -> int64 [batch, width], -1 left padding."""
  if histories is None:
    histories = [[]] * batch
  if isinstance(histories, np.ndarray) and histories.ndim == 2:
    histories = list(histories)
  if len(histories) != batch:
    raise RequestError(f"{schema.SERVING_HISTORY_ITEM_IDS!r} has "
                       f"{len(histories)} rows for {batch} queries.")
  rows = [_integer_array(f"{schema.SERVING_HISTORY_ITEM_IDS}[{i}]", h, 1)
          for i, h in enumerate(histories)]
  # Padding inside a history is dropped, as the model does.
  rows = [r[r != PADDING_ID] for r in rows]
  if history_length is not None:
    rows = [r[max(0, len(r) - history_length):] for r in rows]
    width = history_length
  else:
    width = max([len(r) for r in rows], default=0)
  out = np.full([batch, width], PADDING_ID, np.int64)
  for i, r in enumerate(rows):
    if len(r):
      out[i, width - len(r):] = r
  return out


def make_inputs(user_id: IntOrInts, seed_item_id: IntOrInts,
                history_item_ids=None,
                history_length: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Checked signature inputs for one query (scalars) or a batch (sequences).

  Args:
    user_id: a uid, or one per query.
    seed_item_id: the track just played (any listen, skips too), or one
      per query.
    history_item_ids: the user's recent *positive* listens (played at least
      the prep's min_played_ratio, not disliked) of known tracks, oldest
      first, as `events.history_item_ids` makes them from raw events: a list
      for one query, a list of lists (any lengths) for a batch; None or []
      for no history.
    history_length: the model's N: histories are cut to their N most recent
      items and left-padded with -1 to exactly N. None: padded to the
      longest history in the request.

  Returns:
    {user_id: int64 [b], seed_item_id: int64 [b], history_item_ids: int64
    [b, width]}.

  Raises:
    RequestError: a missing input, a non-integer id, a wrong rank or
      mismatched batch sizes.
  """
  single = np.ndim(user_id) == 0 and user_id is not None
  rank = 0 if single else 1
  users = _integer_array(schema.SERVING_USER_ID, user_id, rank).reshape([-1])
  seeds = _integer_array(schema.SERVING_SEED_ITEM_ID, seed_item_id,
                         rank).reshape([-1])
  if len(users) != len(seeds):
    raise RequestError(f"{len(users)} user ids but {len(seeds)} seed items.")
  if single:
    history_item_ids = [[] if history_item_ids is None else history_item_ids]
  return {
      schema.SERVING_USER_ID: users,
      schema.SERVING_SEED_ITEM_ID: seeds,
      schema.SERVING_HISTORY_ITEM_IDS: _history_matrix(
          history_item_ids, len(users), history_length),
  }


# --- REST ------------------------------------------------------------------


def rest_body(inputs: Dict[str, np.ndarray], fmt: str = "instances",
              signature_name: str = SIGNATURE_NAME) -> Dict:
  """TF Serving's JSON predict body, row ("instances") or column ("inputs")."""
  if fmt == "instances":
    batch = len(inputs[schema.SERVING_USER_ID])
    rows = [{name: inputs[name][i].tolist() for name in inputs}
            for i in range(batch)]
    return {"signature_name": signature_name, "instances": rows}
  if fmt == "inputs":
    return {"signature_name": signature_name,
            "inputs": {name: value.tolist() for name, value in inputs.items()}}
  raise ValueError(f"Unknown REST format {fmt!r}: 'instances' or 'inputs'.")


def parse_rest_response(body: Dict) -> Dict[str, np.ndarray]:
  """TF Serving's JSON predict response (either format) -> output arrays."""
  if "error" in body:
    raise ServingError(body["error"])
  if "outputs" in body:
    columns = body["outputs"]
  elif "predictions" in body:
    rows = body["predictions"]
    columns = {name: [r[name] for r in rows] for name in rows[0]} if rows else {
        "item_ids": [], "scores": []}
  else:
    raise ServingError(f"Not a predict response: {sorted(body)}")
  return {"item_ids": np.asarray(columns["item_ids"], np.int64),
          "scores": np.asarray(columns["scores"], np.float32)}


def rest_url(server: str, model_name: str,
             version: Optional[int] = None) -> str:
  base = server if server.startswith("http") else f"http://{server}"
  path = f"/v1/models/{model_name}"
  if version is not None:
    path += f"/versions/{version}"
  return f"{base}{path}:predict"


def predict_rest(server: str, model_name: str, inputs: Dict[str, np.ndarray],
                 fmt: str = "instances", version: Optional[int] = None,
                 timeout: float = 10.0) -> Dict[str, np.ndarray]:
  """POSTs one predict request to TF Serving's REST API (port 8501)."""
  data = json.dumps(rest_body(inputs, fmt)).encode()
  request = urllib.request.Request(
      rest_url(server, model_name, version), data=data,
      headers={"Content-Type": "application/json"}, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return parse_rest_response(json.load(response))
  except urllib.error.HTTPError as e:
    detail = e.read().decode(errors="replace")
    with contextlib.suppress(ValueError):  # not JSON: keep the text
      detail = json.loads(detail).get("error", detail)
    raise ServingError(f"HTTP {e.code} from {e.url}: {detail}") from None
  except urllib.error.URLError as e:
    raise ServingError(f"No answer from {server}: {e.reason}") from None


# --- gRPC ------------------------------------------------------------------


def predict_grpc(server: str, model_name: str, inputs: Dict[str, np.ndarray],
                 version: Optional[int] = None,
                 timeout: float = 10.0) -> Dict[str, np.ndarray]:
  """One PredictionService.Predict call to TF Serving's gRPC port (8500)."""
  import grpc  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top
  from export import tf_serving  # pylint: disable=g-import-not-at-top

  request = tf_serving.predict_request(model_name, inputs, SIGNATURE_NAME,
                                       version)
  with grpc.insecure_channel(server) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
      response = stub.Predict(request, timeout=timeout)
    except grpc.RpcError as e:
      raise ServingError(f"gRPC {e.code().name} from {server}: "
                         f"{e.details()}") from None
  return {"item_ids": tf.make_ndarray(response.outputs["item_ids"]),
          "scores": tf.make_ndarray(response.outputs["scores"])}


# --- In-process --------------------------------------------------------------


def load_scann_ops() -> bool:
  """Registers ScaNN's TF ops in this process (needed to load ScaNN models)."""
  try:
    # Imported for its side effect, registering the ops.
    from scann.scann_ops.py import scann_ops  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=4)
def load_signature(saved_model: str):
  """The serving_default signature of a SavedModel (ScaNN ops loaded)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  load_scann_ops()
  return tf.saved_model.load(saved_model).signatures[SIGNATURE_NAME]


def export_metadata(saved_model: str) -> Dict:
  path = os.path.join(saved_model, "assets.extra", "export_metadata.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


@functools.lru_cache(maxsize=4)
def load_known_item_ids(saved_model: str) -> Optional[np.ndarray]:
  """The raw item ids a SavedModel knows, sorted; None if not exported."""
  path = os.path.join(saved_model, "assets.extra", KNOWN_ITEM_IDS_FILE)
  return np.load(path) if os.path.exists(path) else None


def predict_saved_model(saved_model: str,
                        inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Runs the signature in this process."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  outputs = load_signature(saved_model)(
      **{k: tf.constant(v, tf.int64) for k, v in inputs.items()})
  return {k: v.numpy() for k, v in outputs.items()}


def recommend(user_id: IntOrInts, seed_item_id: IntOrInts,
              history_item_ids=None, *, server: Optional[str] = None,
              protocol: str = "rest", model_name: str = DEFAULT_MODEL_NAME,
              saved_model: Optional[str] = None,
              history_length: Optional[int] = None,
              rest_format: str = "instances", version: Optional[int] = None,
              timeout: float = 10.0) -> Recommendations:
  """Top-k tracks for one query (scalar ids) or a batch (sequences of ids).

  Args:
    user_id, seed_item_id, history_item_ids: the query, see `make_inputs`.
    server: "host:port" of TF Serving (8501 REST, 8500 gRPC); None runs
      `saved_model` in this process.
    protocol: "rest" or "grpc".
    model_name: the served model (models.config name).
    saved_model: a version folder, for in-process use (or to read N from).
    history_length: the model's N; default: the SavedModel's metadata, else
      the longest history in the request.
    rest_format: "instances" (row) or "inputs" (column) JSON.
    version: a model version to pin; None serves the latest.
    timeout: seconds to wait for the server.

  Returns:
    Recommendations: item_ids int64 and scores float32, [k] for one query,
    [batch, k] for a batch.

  Raises:
    RequestError: the query is malformed (nothing is sent).
    ServingError: the server refused the request or did not answer.
  """
  if history_length is None and saved_model:
    history_length = export_metadata(saved_model).get("history_length")
  inputs = make_inputs(user_id, seed_item_id, history_item_ids, history_length)
  if server:
    if protocol == "rest":
      outputs = predict_rest(server, model_name, inputs, rest_format, version,
                             timeout)
    elif protocol == "grpc":
      outputs = predict_grpc(server, model_name, inputs, version, timeout)
    else:
      raise ValueError(f"Unknown protocol {protocol!r}: 'rest' or 'grpc'.")
  elif saved_model:
    outputs = predict_saved_model(saved_model, inputs)
  else:
    raise ValueError("Give a server (TF Serving) or a saved_model path.")
  single = np.ndim(user_id) == 0
  return Recommendations(
      item_ids=outputs["item_ids"][0] if single else outputs["item_ids"],
      scores=outputs["scores"][0] if single else outputs["scores"])


def recommend_from_events(user_id: int, events: events_lib.Events,
                          seed_item_id: Optional[int] = None, *,
                          known_item_ids=None,
                          min_played_ratio: Optional[float] = None,
                          **kwargs) -> Recommendations:
  """Top-k tracks for one user from their raw recent events.

  The history is built as training builds it (`events.history_item_ids`):
  the positive listens only, unknown ids dropped, then the most recent N.

  Args:
    user_id: the user's uid.
    events: the user's recent events, oldest first, up to now:
      (item_id, played_ratio_pct, event_type) triples, event_type "listen",
      "like", "dislike", "unlike" or "undislike" (played_ratio_pct None for
      all but listens). See `export.events`.
    seed_item_id: the track just played; None: the last listen in `events`.
    known_item_ids: the ids the model knows; None: `saved_model`'s
      (`load_known_item_ids`), if given. Without either, unknown ids are
      dropped by the model, but only after the cut to N.
    min_played_ratio: the positive rule's least percent played; None:
      `saved_model`'s export metadata, else the prep's default (50).
    **kwargs: `recommend`'s keywords (server, protocol, model_name,
      saved_model, history_length, ...).

  Returns:
    Recommendations of [k] item ids and scores.

  Raises:
    RequestError: malformed events, or no seed and no listen to take it from.
    ServingError: see `recommend`.
  """
  saved_model = kwargs.get("saved_model")
  metadata = export_metadata(saved_model) if saved_model else {}
  if known_item_ids is None and saved_model:
    known_item_ids = load_known_item_ids(saved_model)
  if min_played_ratio is None:
    min_played_ratio = metadata.get("min_played_ratio")
  if min_played_ratio is None:
    min_played_ratio = rules.LISTEN_PLUS_RATIO
  if kwargs.get("history_length") is None:
    kwargs["history_length"] = metadata.get("history_length")
  try:
    history = events_lib.history_item_ids(
        events, known_item_ids, kwargs["history_length"], min_played_ratio)
    if seed_item_id is None:
      seed_item_id = events_lib.last_listen(events)
  except (ValueError, TypeError, KeyError) as e:
    raise RequestError(f"Malformed events: {e}") from None
  if seed_item_id is None:
    raise RequestError("No seed_item_id, and no listen in the events.")
  return recommend(user_id, seed_item_id, history.tolist(), **kwargs)
