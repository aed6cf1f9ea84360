"""Trained query tower + a top-k index -> SavedModels in TF Serving's layout.

  <export_dir>/<model_name>/<version>/saved_model.pb, variables/, assets/,
      assets.extra/export_metadata.json, assets.extra/known_item_ids.npy (the
      raw ids the model knows, sorted), assets.extra/tf_serving_warmup_requests
  <export_dir>/models.config, <export_dir>/batching_parameters.txt
      (TF Serving's model and batching config, see export/tf_serving.py)

Two servables are written from the same trained model:
  * `<name>_bruteforce`: `tfrs.layers.factorized_top_k.BruteForce`, exact, made
    of stock TensorFlow ops, so stock TF Serving can serve it;
  * `<name>_scann`: `tfrs.layers.factorized_top_k.ScaNN`, approximate and much
    faster on large catalogues; it needs ScaNN's custom ops in the server.
A model with K > 1 query heads is served by either index through
`query_heads.MaxSimTopK`: K lookups, merged into one top k in the SavedModel;
one with a prior (history, artist or successor) through
`history_bonus.HistoryBonusTopK`, which mixes the priors into the index's list
and adds the priors' own items to it; the signature below is the same.

Signature `serving_default` (raw Yambda ids in and out):
  inputs   user_id int64 [batch], seed_item_id int64 [batch],
           history_item_ids int64 [batch, any] (oldest first, -1 pads)
  outputs  item_ids int64 [batch, k], scores float32 [batch, k]
An unknown user or seed maps to the model's "unknown" embeddings. The history
is laid out as training's: ids the model does not know are dropped (in
training every slot holds a known item), then it is cut to its most recent N
(the catalogue's `history_length`); an empty history is allowed. Training
histories are the user's last N *positive* listens (`data_prep.rules`), so
callers send those, not every recent play (`client.recommend_from_events`).
"""

import gc
import os
import shutil
from typing import Dict, Optional, Sequence, Tuple
import uuid

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
from scann.scann_ops.py import scann_ops
from scann.scann_ops.py import scann_builder

from export import client
from export import tf_serving
from tfrs_yambda import atomic
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import history_bonus
from tfrs_yambda import query_heads
from tfrs_yambda import ranking
from tfrs_yambda import schema

# The query tower's priors (layers of these names; None when off).
PRIORS = ("history_bonus", "artist_prior", "successor_prior")


class ServingQueryModel(tf.keras.Model):
  """Raw-id serving inputs -> query embedding(s), via the trained query tower.

  Raw ids become catalogue indices, and the history is laid out as training
  lays it out: known items only, the most recent N =
  `catalogue.history_length`, oldest first, index 0 padding in front.
  """

  def __init__(self, query_tower: tf.keras.Model,
               catalogue: catalogue_lib.Catalogue, **kwargs):
    """Builds the id lookup; see the class docstring.

    Args:
      query_tower: the trained query tower (catalogue indices in).
      catalogue: the catalogue the model was trained on.
      **kwargs: passed to `tf.keras.Model`.
    """
    super().__init__(**kwargs)
    self.query_tower = query_tower
    # The towers' content table is left out of training's checkpoints
    # (towers.ItemEncoder); a SavedModel must hold it. Stand-in towers
    # without an item encoder have none.
    encoder = getattr(query_tower, "item_encoder", None)
    self.item_content = encoder.content if encoder is not None else None
    self.history_length = catalogue.history_length
    # Vocabulary order is catalogue index order: id at index i maps to i.
    self.item_lookup = tf.keras.layers.IntegerLookup(
        vocabulary=catalogue.item_ids[1:].astype(np.int64), num_oov_indices=1,
        name="item_lookup")
    # Index -> raw id, for the priors' items (only a tower with priors).
    self.raw_item_ids = tf.Variable(
        catalogue.item_ids.astype(np.int64), trainable=False,
        name="raw_item_ids") if has_priors(query_tower) else None

  def features(self, inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """The query tower's features of serving inputs."""
    # Look up first: padding (-1) and unknown ids both become index 0 and are
    # dropped *before* the cut to the most recent N, so an unknown id never
    # takes a slot. Then pad with index 0 at the front as training does
    # (oldest first, the latest last).
    history = self.item_lookup(
        tf.cast(inputs[schema.SERVING_HISTORY_ITEM_IDS], tf.int64))
    history = tf.reverse(tf.ragged.boolean_mask(history, history > 0)[
        :, -self.history_length:], axis=[1]).to_tensor(
            default_value=0, shape=[None, self.history_length])
    return {
        schema.USER_ID: tf.cast(inputs[schema.SERVING_USER_ID], tf.int64),
        schema.SEED_ITEM: self.item_lookup(
            tf.cast(inputs[schema.SERVING_SEED_ITEM_ID], tf.int64)),
        schema.HISTORY_ITEMS: tf.reverse(history, axis=[1]),
    }

  def call(self, inputs: Dict[str, tf.Tensor]) -> tf.Tensor:
    return self.query_tower(self.features(inputs))

  def with_bonus(self, inputs: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, ...]:
    """(query embeddings, the priors' slots, their raw ids (-1 for index
    0), their prior weights), what `history_bonus.HistoryBonusTopK` reads;
    needs the tower's `bonus`."""
    features = self.features(inputs)
    slots, weights = self.query_tower.bonus(features)
    raw = tf.where(slots > 0, tf.gather(self.raw_item_ids, slots),
                   tf.constant(-1, tf.int64))
    return self.query_tower(features), slots, raw, weights


def has_priors(query_tower) -> bool:
  """Whether the tower mixes a prior into its scores."""
  return any(getattr(query_tower, name, None) is not None
             for name in PRIORS)


class Servable(tf.Module):
  """A top-k index with a raw-id serving signature."""

  def __init__(self, index: tfrs.layers.factorized_top_k.TopK, k: int):
    super().__init__()
    self.index = index
    self.k = k

  @tf.function(input_signature=[schema.serving_input_signature()])
  def serve(self, inputs):
    scores, item_ids = self.index(inputs, k=self.k)
    return {"item_ids": item_ids, "scores": scores}


class ScaNN(tfrs.layers.factorized_top_k.ScaNN):
  """TFRS's ScaNN layer, with two builder options that layer does not expose.

  * `anisotropic_quantization_threshold`: asymmetric hashing that weighs the
    quantisation error parallel to a vector more than the orthogonal error
    (Guo et al. 2020), which is what matters for dot products; ScaNN's
    recommended 0.2 for unit vectors.
  * `reorder_int8`: rescore the candidates with int8-quantised vectors, a
    quarter of float32's memory traffic, which bounds rescoring.
  At a recall@100 of about 0.95 these raised the bare index's queries/s by
  about 1.4x on a 1M-item catalogue (benchmarks/README.md). Everything else,
  saving included, is TFRS's layer.
  """

  def __init__(self, query_model: Optional[tf.keras.Model] = None,
               k: int = 10, num_leaves: int = 100,
               num_leaves_to_search: int = 10,
               num_reordering_candidates: Optional[int] = None,
               anisotropic_quantization_threshold: float = float("nan"),
               reorder_int8: bool = False, dimensions_per_block: int = 2,
               training_iterations: int = 12, **kwargs):
    super().__init__(query_model, k=k, num_leaves=num_leaves,
                     num_leaves_to_search=num_leaves_to_search,
                     training_iterations=training_iterations,
                     dimensions_per_block=dimensions_per_block,
                     num_reordering_candidates=num_reordering_candidates,
                     **kwargs)

    def build_searcher(candidates):
      builder = scann_ops.builder(candidates, k, "dot_product").tree(
          num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
          training_iterations=training_iterations).score_ah(
              dimensions_per_block,
              anisotropic_quantization_threshold=(
                  anisotropic_quantization_threshold))
      if num_reordering_candidates is not None:
        builder = builder.reorder(
            num_reordering_candidates,
            quantize=(scann_builder.ReorderType.INT8 if reorder_int8
                      else scann_builder.ReorderType.FLOAT32))
      # A unique name: two indices in one process must not share a searcher.
      return builder.build(shared_name=f"{self.name}/{uuid.uuid4()}")

    self._build_searcher = build_searcher


def check_finite_candidates(candidates: np.ndarray,
                            identifiers: np.ndarray) -> None:
  """Refuses candidate embeddings with NaN or inf, naming the first item ids.

  A non-finite candidate would score NaN (or inf) against every query: served
  at the top of, or at random places in, every top-k list.
  """
  candidates = np.asarray(candidates)
  bad = ~np.isfinite(candidates.reshape(len(candidates), -1)).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    ids = np.asarray(identifiers)[rows[:5]].tolist()
    raise ValueError(
        f"{len(rows)} of {len(candidates)} candidate embeddings are not "
        f"finite (NaN or inf), e.g. of item ids {ids}"
        f"{'...' if len(rows) > 5 else ''}; refusing to build a top-k index "
        f"over them (was the model trained to a NaN loss?).")


def build_index(kind: str, query_model: tf.keras.Model,
                candidates: np.ndarray, identifiers: np.ndarray, k: int,
                scann_options: Optional[Dict] = None, heads: int = 1,
                bonus: bool = False,
                temperature: Optional[float] = None):
  """Builds a BruteForce or ScaNN top-k layer over the candidate embeddings.

  With `heads` > 1 (the query model returns [batch, heads, d]) the index is
  wrapped in `query_heads.MaxSimTopK`, which merges the heads' lookups; with
  `bonus` (the query tower has a history or artist prior), in
  `history_bonus.HistoryBonusTopK`, which mixes the priors in (at the
  model's training `temperature`) and scores the priors' items by their
  rows of `candidates`, which must then be catalogue indices 1..n in order.
  The outermost layer holds the query model; with neither it is TFRS's
  layer itself.

  Raises ValueError if any candidate embedding is not finite.
  """
  check_finite_candidates(candidates, identifiers)
  if bonus and temperature is None:
    raise ValueError("A history bonus index needs the model's temperature.")
  head_query_model = query_model if heads == 1 and not bonus else None
  if kind == "bruteforce":
    index = tfrs.layers.factorized_top_k.BruteForce(head_query_model, k=k)
  elif kind == "scann":
    index = ScaNN(head_query_model, k=k, **(scann_options or {}))
  else:
    raise ValueError(f"Unknown index kind {kind!r}.")
  if heads > 1:
    index = query_heads.MaxSimTopK(index, None if bonus else query_model, k=k)
  if bonus:
    # Row i: catalogue index i's embedding (index 0, never a slot's item).
    by_index = np.concatenate([np.zeros_like(candidates[:1]),
                               np.asarray(candidates)])
    index = history_bonus.HistoryBonusTopK(index, query_model, by_index,
                                           len(candidates), temperature, k=k)
  index.index(tf.convert_to_tensor(candidates),
              tf.constant(identifiers, tf.int64))
  return index


def default_scann_options(num_candidates: int, k: int) -> Dict:
  """Tree + asymmetric-hashing settings scaled to the catalogue size.

  About sqrt(n) leaves (at most 2,000), 10% of them searched, anisotropic
  quantisation, and 10·k candidates rescored with int8 vectors. Chosen with
  benchmarks/ann_benchmark.py on 1,000 validation requests over the 500m
  rehearsal's 3M most popular candidates (k=100): recall@100 0.954 of exact
  search on the bare index, where 5% searched and 7·k rescored (the earlier
  choice, made on the demo model padded to 1M items) gave 0.927 (see
  benchmarks/README.md). Leaves hold ~sqrt(n) items, so on a smaller
  catalogue 10% of the leaves is fewer items than a good top-k needs: leaves
  holding at least 100 * k items are searched (all of them on catalogues
  that small).
  """
  leaves = int(max(1, min(2000, round(np.sqrt(num_candidates)))))
  share = max(0.10, min(1.0, 100 * k / max(num_candidates, 1)))
  return {
      "num_leaves": leaves,
      "num_leaves_to_search": int(max(1, min(leaves, np.ceil(share * leaves)))),
      "num_reordering_candidates": int(min(num_candidates, 10 * k)),
      "anisotropic_quantization_threshold": 0.2,
      "reorder_int8": True,
  }


def next_version(model_dir: str) -> int:
  """A new version number; a served version is never overwritten."""
  versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()
             ] if os.path.isdir(model_dir) else []
  return max(versions, default=0) + 1


def save(servable: Servable, export_dir: str, model_name: str,
         metadata: Dict,
         warmup: Optional[Sequence[Dict[str, np.ndarray]]] = None,
         known_item_ids: Optional[np.ndarray] = None) -> str:
  """Saves under <export_dir>/<model_name>/<version>/ via a temporary name.

  `warmup` requests (serving inputs) go to TF Serving's warmup file, which the
  server replays before it serves the version. `known_item_ids`, sorted, go
  to assets.extra/known_item_ids.npy, where clients read which history ids
  the model knows (`client.load_known_item_ids`).
  """
  model_dir = os.path.join(export_dir, model_name)
  os.makedirs(model_dir, exist_ok=True)
  version = next_version(model_dir)
  final = os.path.join(model_dir, str(version))
  # TF Serving skips folders whose name is not a number.
  tmp = os.path.join(model_dir, f".tmp-{version}")
  shutil.rmtree(tmp, ignore_errors=True)
  tf.saved_model.save(
      servable, tmp, signatures={"serving_default": servable.serve},
      # ScaNN's index is a resource of custom ops in the "Scann" namespace.
      options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
  atomic.write_json(metadata,
                    os.path.join(tmp, "assets.extra", "export_metadata.json"))
  if warmup:
    tf_serving.write_warmup(tmp, model_name, warmup)
  if known_item_ids is not None:
    np.save(os.path.join(tmp, "assets.extra", client.KNOWN_ITEM_IDS_FILE),
            np.sort(np.asarray(known_item_ids, np.int64)))
  os.replace(tmp, final)
  return final


def export_all(model, catalogue: catalogue_lib.Catalogue, export_dir: str,
               model_name: str = "yambda", k: int = 100,
               scann_options: Optional[Dict] = None) -> Dict[str, str]:
  """Writes the BruteForce and the ScaNN SavedModels; returns their paths.

  Also writes, next to them, TF Serving's models.config (every model under
  export_dir) and batching_parameters.txt, and into each version its warmup
  requests.

  Args:
    model: the trained `TwoTowerModel`.
    catalogue: the catalogue it was trained on: the candidates (every
      catalogued item), the raw ids, and the history length N.
    export_dir: where <model_name>_<kind>/<version>/ go.
    model_name: the served models' name prefix.
    k: items each request returns (at most the catalogue's size).
    scann_options: `ScaNN` settings (default: `default_scann_options`).

  Returns:
    {"bruteforce": version folder, "scann": version folder}.
  """
  history_length = catalogue.history_length
  num_indices = catalogue.num_items + 1
  # Index 0 ("unknown") is never served: candidates are indices 1..n.
  # One copy, shared by both indices.
  candidates = ranking.candidate_embeddings(model, num_indices, start=1)
  identifiers = catalogue.item_ids[1:]
  query_model = ServingQueryModel(model.query_tower, catalogue)
  heads = model.query_tower.config.query_heads
  k = min(k, catalogue.num_items)
  scann_options = scann_options or default_scann_options(len(candidates), k)
  warmup = tf_serving.warmup_inputs(catalogue)
  paths = {}
  # ScaNN first: its build allocates outside TensorFlow's allocator, which
  # keeps what TensorFlow frees for TensorFlow's own later tensors. Built
  # after BruteForce, it added its 4-7 GB on top of BruteForce's freed copies
  # (a 22.8 GiB peak at 9.4M candidates; benchmarks/README.md).
  for kind in ("scann", "bruteforce"):
    index = build_index(kind, query_model, candidates, identifiers, k,
                        scann_options, heads,
                        has_priors(model.query_tower), model.temperature)
    metadata = {"index": kind, "k": k, "history_length": history_length,
                "query_heads": heads,
                # Which priors it mixes in (true / false each).
                **{name: getattr(model.query_tower, name) is not None
                   for name in PRIORS},
                # The prep's positive rule, for clients that build histories.
                "min_played_ratio": catalogue.metadata.get("min_played_ratio"),
                "num_candidates": int(len(candidates)),
                "catalogue": catalogue.metadata.get("source"),
                "scann_options": scann_options if kind == "scann" else None}
    paths[kind] = save(Servable(index, k), export_dir, f"{model_name}_{kind}",
                       metadata, warmup, identifiers)
    # One index in memory at a time: each holds a copy of the candidates
    # (2.4 GB at 9.4M items), and ScaNN's build needs a few more.
    del index
    gc.collect()
  tf_serving.write_model_config(export_dir)
  tf_serving.write_batching_parameters(export_dir)
  return paths
