"""What TF Serving reads next to the SavedModels: warmup, models, batching.

  <export_dir>/models.config                 ModelServerConfig (text proto),
                                             every model under <export_dir>
  <export_dir>/batching_parameters.txt       BatchingParameters (text proto)
  <export_dir>/<model>/<version>/assets.extra/tf_serving_warmup_requests
                                             TFRecord of PredictionLog protos

The protos come from `tensorflow-serving-api` (the same package the gRPC client
uses), so the files are what `tensorflow_model_server` parses, field for field;
only BatchingParameters, which that package does not ship, is declared here
from its .proto definition.
"""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfrs_yambda import atomic
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema

WARMUP_FILE = "tf_serving_warmup_requests"
MODEL_CONFIG_FILE = "models.config"
BATCHING_FILE = "batching_parameters.txt"
SIGNATURE_NAME = "serving_default"

# Batch sizes replayed at warmup: a single query and the small batches that
# server-side batching forms under load.
WARMUP_BATCH_SIZES = (1, 2, 8, 32)


def predict_request(model_name: str, inputs: Dict[str, np.ndarray],
                    signature_name: str = SIGNATURE_NAME,
                    version: Optional[int] = None
                    ) -> predict_pb2.PredictRequest:
  """A PredictRequest proto with int64 tensors for the named inputs."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  if version is not None:
    request.model_spec.version.value = version
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(
        tf.make_tensor_proto(np.asarray(value, np.int64)))
  return request


def warmup_inputs(catalogue: catalogue_lib.Catalogue,
                  seed: int = 0) -> List[Dict[str, np.ndarray]]:
  """Requests built from real catalogue ids, one per warmup batch size.

  Users are the most active training users, items are drawn by training
  popularity, as live traffic would be. Histories are exactly the model's N
  (`catalogue.history_length`) wide, left-padded with -1: the width clients
  send (see `client.make_inputs`), so warmup exercises the shapes that
  traffic will. The first rows cover the edge cases: an unknown user and
  seed with an empty history, and a short history.

  Args:
    catalogue: the catalogue the model was trained on.
    seed: seed of the drawn users and items.

  Returns:
    One dict of serving inputs per `WARMUP_BATCH_SIZES` entry.
  """
  history_length = catalogue.history_length
  rng = np.random.default_rng(seed)
  users = catalogue.user_ids[1:][np.argsort(-catalogue.user_train_count[1:],
                                            kind="stable")]
  counts = catalogue.item_train_count[1:].astype(np.float64) + 1.0
  popularity = counts / counts.sum()
  unknown_item = int(catalogue.item_ids.max()) + 1
  requests = []
  for batch in WARMUP_BATCH_SIZES:
    user = users[rng.integers(0, max(1, min(len(users), 1000)), batch)]
    seed_item = rng.choice(catalogue.item_ids[1:], batch, p=popularity)
    history = rng.choice(catalogue.item_ids[1:], (batch, history_length),
                         p=popularity)
    lengths = rng.integers(0, history_length + 1, batch)
    lengths[0] = 0
    lengths[1:2] = min(3, history_length)
    history[np.arange(history_length)[None, :] < (history_length -
                                                  lengths)[:, None]] = -1
    user[0], seed_item[0] = -1, unknown_item
    requests.append({
        schema.SERVING_USER_ID: user.astype(np.int64),
        schema.SERVING_SEED_ITEM_ID: seed_item.astype(np.int64),
        schema.SERVING_HISTORY_ITEM_IDS: history.astype(np.int64),
    })
  return requests


def write_warmup(version_dir: str, model_name: str,
                 inputs: Sequence[Dict[str, np.ndarray]]) -> str:
  """Writes assets.extra/tf_serving_warmup_requests; returns its path."""
  path = os.path.join(version_dir, "assets.extra", WARMUP_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path) as writer:
    for request_inputs in inputs:
      log = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(
              request=predict_request(model_name, request_inputs)))
      writer.write(log.SerializeToString())
  return path


def read_warmup(path: str) -> List[predict_pb2.PredictRequest]:
  """The PredictRequests of a warmup file (as TF Serving replays them)."""
  requests = []
  for record in tf.data.TFRecordDataset(path):
    log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    requests.append(log.predict_log.request)
  return requests


def served_models(export_dir: str) -> List[str]:
  """Model folders under export_dir holding at least one numbered version."""
  names = []
  for name in sorted(os.listdir(export_dir)):
    model_dir = os.path.join(export_dir, name)
    if os.path.isdir(model_dir) and any(
        v.isdigit() and os.path.exists(
            os.path.join(model_dir, v, "saved_model.pb"))
        for v in os.listdir(model_dir)):
      names.append(name)
  return names


def model_server_config(
    export_dir: str, names: Sequence[str]
) -> model_server_config_pb2.ModelServerConfig:
  """Serves the latest version of each named model from its absolute path."""
  config = model_server_config_pb2.ModelServerConfig()
  for name in names:
    model = config.model_config_list.config.add()
    model.name = name
    # Absolute: TF Serving resolves base_path on the server, not relative to
    # this file. Docker mounts the folder at the same path (see README).
    model.base_path = os.path.join(os.path.abspath(export_dir), name)
    model.model_platform = "tensorflow"
    # The newest version only: a new export replaces the served one once it
    # has loaded (and warmed up); older versions stay on disk for rollback.
    model.model_version_policy.latest.num_versions = 1
  return config


# Kept in text so that the "why" comments reach whoever tunes the server.
_BATCHING_PARAMETERS = """\
# TF Serving BatchingParameters (text proto), read with
#   tensorflow_model_server --enable_batching \\
#     --batching_parameters_file=<this file> ...
# Requests arriving within batch_timeout_micros are run as one batch of at most
# max_batch_size queries: one query-tower and one index call instead of many.
max_batch_size { value: 256 }
# Latency added to a lone request at most; small, since single queries are fast.
batch_timeout_micros { value: 500 }
# Requests queued beyond max_enqueued_batches * max_batch_size are refused
# (UNAVAILABLE) rather than served late.
max_enqueued_batches { value: 64 }
# One batch per core in flight; set to the server's number of cores.
num_batch_threads { value: %(threads)d }
# Off on purpose: TF Serving pads variable-width inputs with their *first
# element*, which would repeat a real item into history_item_ids. Clients send
# histories exactly history_length wide, left-padded with -1, so every request
# has the same shape and no padding is needed.
pad_variable_length_inputs: false
"""


def batching_parameters_class():
  """tensorflow.serving.BatchingParameters, built from its .proto definition.

  tensorflow-serving-api does not ship session_bundle_config_pb2, so the
  message (fields 1-7 of tensorflow_serving/servables/tensorflow/
  session_bundle_config.proto) is declared here, in a private descriptor pool.
  """
  pool = descriptor_pool.DescriptorPool()
  pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
  file_proto = descriptor_pb2.FileDescriptorProto(
      name="tensorflow_serving/batching_parameters.proto",
      package="tensorflow.serving", syntax="proto3",
      dependency=["google/protobuf/wrappers.proto"])
  message = file_proto.message_type.add(name="BatchingParameters")
  field = descriptor_pb2.FieldDescriptorProto
  for number, name, wrapper in (
      (1, "max_batch_size", "Int64Value"),
      (2, "batch_timeout_micros", "Int64Value"),
      (3, "max_enqueued_batches", "Int64Value"),
      (4, "num_batch_threads", "Int64Value"),
      (5, "thread_pool_name", "StringValue")):
    message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                      label=field.LABEL_OPTIONAL,
                      type_name=f".google.protobuf.{wrapper}")
  message.field.add(name="allowed_batch_sizes", number=6,
                    type=field.TYPE_INT64, label=field.LABEL_REPEATED)
  message.field.add(name="pad_variable_length_inputs", number=7,
                    type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
  pool.Add(file_proto)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def write_batching_parameters(export_dir: str,
                              threads: Optional[int] = None) -> str:
  """Writes batching_parameters.txt (checked by parsing it) to export_dir."""
  text = _BATCHING_PARAMETERS % {"threads": threads or os.cpu_count() or 1}
  # Parse before writing: a typo would otherwise surface only in the server.
  text_format.Parse(text, batching_parameters_class()())
  return atomic.write_text(text, os.path.join(export_dir, BATCHING_FILE))


def write_model_config(export_dir: str) -> str:
  """Writes models.config serving every model under export_dir."""
  config = model_server_config(export_dir, served_models(export_dir))
  # Atomically: TF Serving may poll models.config
  # (--model_config_file_poll_wait_seconds) and must never see half a file.
  return atomic.write_text(text_format.MessageToString(config),
                           os.path.join(export_dir, MODEL_CONFIG_FILE))


def read_model_config(path: str) -> Dict[str, str]:
  """models.config -> {model name: base path}."""
  with open(path) as f:
    config = text_format.Parse(f.read(),
                               model_server_config_pb2.ModelServerConfig())
  return {c.name: c.base_path for c in config.model_config_list.config}
