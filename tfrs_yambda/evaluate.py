"""Full-catalogue evaluation of the model, the baselines and the oracle.

All retrievers are scored on the very same examples of one window
("validation" or "test": every positive listen in it that has a seed), by the
rank of the true next track among the window's candidates; see
`tfrs_yambda.metrics`. The candidates are the authors' catalogue, the items
listened to before the window starts (`Catalogue.num_candidates`): nothing
after the window's cut decides what is a candidate, and a target first played
inside the window is a miss for every retriever. Targets without a training
positive ("cold") are scored against the service's catalogue, every
catalogued item, as a cold track is served. The model and the
baselines also report what they retrieve: Coverage@k and the mean popularity
percentile of their top-k items, beside the same for the test targets, so a
popularity bias is visible. The Yambda authors' protocol (one query per user,
all test-day listens relevant) is `tfrs_yambda.yambda_protocol`.

`evaluate` returns one row per retriever plus the sections named in
`SECTIONS`; `retrievers` picks the rows.
"""

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import tensorflow as tf

from tfrs_yambda import baselines
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import schema

# Bound on the scores matrix of one query batch (floats), to cap memory.
_MAX_SCORES_PER_BATCH = 1 << 25
# Queries per baseline top-k call (their lists are int64 [batch, k]).
_BASELINE_BATCH = 4096
# Results entries that are not retrievers.
SECTIONS = ("recall_curve", "test_targets", "yambda_protocol", "by_target_kind",
            "by_component", "window", "candidates")
WINDOWS = ("validation", "test")
# Largest k of the Recall@k curve (capped at the catalogue size).
CURVE_MAX_K = 1000


def retrievers(results: Dict[str, Dict]) -> Dict[str, Dict]:
  """The retriever rows of `evaluate`'s results (without `SECTIONS`)."""
  return {k: v for k, v in results.items() if k not in SECTIONS}


def collect(dataset: tf.data.Dataset, keys: Sequence[str]) -> Dict[str, np.ndarray]:
  """Concatenates the given features of a batched dataset into numpy arrays."""
  parts = {k: [] for k in keys}
  for batch in dataset:
    for k in keys:
      parts[k].append(batch[k].numpy())
  return {k: np.concatenate(v) if v else np.zeros([0]) for k, v in parts.items()}


def candidate_embeddings(model, num_indices: int,
                         batch_size: int = 8192) -> tf.Tensor:
  """Candidate-tower embeddings of every catalogue index, [num_indices, d]."""
  items = tf.data.Dataset.range(num_indices).batch(batch_size)
  return tf.concat([model.candidate_tower(b) for b in items], axis=0)


def _scores(queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
  """Query-candidate scores, [batch, num_indices]; index 0 is never a hit.

  Index 0 and every non-finite score (NaN, +inf, -inf) become -inf: such a
  candidate sorts after every finite one and such a target is a miss (see
  `_ranks`); a NaN would otherwise compare false both ways and rank as a hit.
  """
  scores = tf.matmul(queries, candidates, transpose_b=True)
  index = tf.range(tf.shape(candidates)[0])
  never = (index[tf.newaxis, :] == 0) | ~tf.math.is_finite(scores)
  return tf.where(never, tf.constant(-np.inf, scores.dtype), scores)


@tf.function(reduce_retracing=True)
def _ranks(queries: tf.Tensor, candidates: tf.Tensor, targets: tf.Tensor,
           k: int = 0):
  """Ranks of `targets`, and with k > 0 also the top-k indices, [batch, k].

  Ties rank by index in both, so the top k are the items of ranks 1..k.
  A target whose score is non-finite (or index 0) is a miss: its rank is
  `metrics.NOT_RETRIEVED`, beyond every k.
  """
  scores = _scores(queries, candidates)
  index = tf.range(tf.shape(candidates)[0], dtype=targets.dtype)
  target_scores = tf.gather(scores, targets, batch_dims=1)[:, tf.newaxis]
  ahead = (scores > target_scores) | ((scores == target_scores) & (
      index[tf.newaxis, :] < targets[:, tf.newaxis]))
  ranks = 1 + tf.reduce_sum(tf.cast(ahead, tf.int64), axis=1)
  # _scores made every non-finite score -inf; such a target is never a hit.
  ranks = tf.where(tf.math.is_inf(target_scores[:, 0]),
                   tf.constant(metrics.NOT_RETRIEVED, tf.int64), ranks)
  if not k:
    return ranks
  return ranks, tf.math.top_k(scores, k, sorted=True).indices


@tf.function(reduce_retracing=True)
def _top_k(queries: tf.Tensor, candidates: tf.Tensor, k: int) -> tf.Tensor:
  """Top-k indices; non-finite scores (-inf in `_scores`) come after all
  finite ones, ties by index."""
  return tf.math.top_k(_scores(queries, candidates), k, sorted=True).indices


def _query_batch_size(num_indices: int) -> int:
  return max(1, min(4096, _MAX_SCORES_PER_BATCH // num_indices))


def window_start(catalogue: catalogue_lib.Catalogue, window: str) -> int:
  """The cut of a window: what is computed for it knows nothing after it."""
  if window not in WINDOWS:
    raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
  start = catalogue.metadata[f"{window}_start"]
  if window == "validation" and start >= catalogue.metadata["validation_end"]:
    raise ValueError("The data was prepared without a validation window "
                     "(--validation_window_seconds=0).")
  return start


def _not_candidates(ranks: np.ndarray, targets: np.ndarray,
                    num_candidates: int) -> np.ndarray:
  """Ranks with every target outside indices 1..num_candidates a miss."""
  outside = (targets < 1) | (targets > num_candidates)
  return np.where(outside, metrics.NOT_RETRIEVED, ranks)


def model_ranks(model, test: Dict[str, np.ndarray], candidates: tf.Tensor,
                retrieved: Optional[metrics.RetrievedItemStats] = None
                ) -> np.ndarray:
  """Rank of each test example's target under the model's scores.

  `candidates` are the embeddings of indices 0..n; a target outside 1..n is
  a miss (`metrics.NOT_RETRIEVED`). With `retrieved`, each batch's top-max(k)
  lists are added to it, from the same scores (one matrix product per batch
  either way).
  """
  num_candidates = int(candidates.shape[0]) - 1
  targets = test[schema.TARGET_ITEM]
  features = {k: test[k] for k in schema.QUERY_FEATURES}
  # Index 0 stands in for targets that are not candidates (a miss anyway).
  features[schema.TARGET_ITEM] = np.where(targets <= num_candidates, targets,
                                          0)
  k = retrieved.ks[-1] if retrieved else 0
  ranks = []
  for batch in tf.data.Dataset.from_tensor_slices(features).batch(
      _query_batch_size(candidates.shape[0])):
    queries = model.query_tower(batch)
    out = _ranks(queries, candidates, batch[schema.TARGET_ITEM], k)
    if retrieved:
      out, top = out
      retrieved.add(top.numpy())
    ranks.append(out.numpy())
  if not ranks:
    return np.zeros([0], np.int64)
  return _not_candidates(np.concatenate(ranks), targets, num_candidates)


def model_top_k(model, queries: Dict[str, np.ndarray], candidates: tf.Tensor,
                k: int) -> np.ndarray:
  """The model's top-k catalogue indices for each query, int [n, k]."""
  top = []
  for batch in tf.data.Dataset.from_tensor_slices(queries).batch(
      _query_batch_size(candidates.shape[0])):
    top.append(_top_k(model.query_tower(batch), candidates, k).numpy())
  return (np.concatenate(top).astype(np.int64) if top
          else np.zeros([0, k], np.int64))


def baseline_retrieved(baseline, seeds: np.ndarray,
                       retrieved: metrics.RetrievedItemStats) -> None:
  """Adds a baseline's top lists for `seeds` to `retrieved`, in batches."""
  for start in range(0, len(seeds), _BASELINE_BATCH):
    retrieved.add(baseline.top_k(seeds[start:start + _BASELINE_BATCH],
                                 retrieved.ks[-1]))


def oracle_path(catalogue: catalogue_lib.Catalogue) -> Optional[str]:
  """The generator's oracle file for this data, if the data was generated."""
  source = catalogue.metadata.get("source", "")
  size_dir = os.path.dirname(source)
  root = os.path.dirname(os.path.dirname(size_dir))
  path = os.path.join(root, "generator", os.path.basename(size_dir),
                      "oracle.parquet")
  return path if os.path.exists(path) else None


def oracle_ranks(path: str, catalogue: catalogue_lib.Catalogue,
                 test: Dict[str, np.ndarray]) -> pd.DataFrame:
  """Per test example, the oracle's rank of its target ("oracle_rank", -1
  where the oracle has none), its rank under the generator's next-positive-
  listen distribution, the ceiling of the evaluated target
  ("positive_oracle_rank", -1 where none: not computed for that listen, or
  the file predates it) and the generator's mixture component it was drawn
  from ("component", "" where none, or where the file predates it)."""
  names = pq.read_schema(path).names
  optional = [c for c in ("component", "positive_oracle_rank") if c in names]
  oracle = pd.read_parquet(
      path, columns=["uid", "timestamp", "item_id", "oracle_rank"] + optional)
  oracle["component"] = (oracle["component"].astype(str)
                         if "component" in names else "")
  if "positive_oracle_rank" not in names:
    oracle["positive_oracle_rank"] = -1
  keys = pd.DataFrame({
      "uid": test[schema.USER_ID].astype(np.int64),
      "timestamp": test[schema.TIMESTAMP].astype(np.int64),
      "item_id": catalogue.item_ids[test[schema.TARGET_ITEM]],
  })
  oracle = oracle.astype({"uid": np.int64, "timestamp": np.int64,
                          "item_id": np.int64})
  joined = keys.merge(oracle, how="left", on=["uid", "timestamp", "item_id"])
  return pd.DataFrame({
      "oracle_rank": joined["oracle_rank"].fillna(-1).to_numpy(np.int64),
      "positive_oracle_rank": joined["positive_oracle_rank"].fillna(-1)
                              .to_numpy(np.int64),
      "component": joined["component"].fillna("").to_numpy(str)})


def load_examples(prepared_dir: str, split: str, history_length: int,
                  rule: input_pipeline.ExampleRule, age_reference=None,
                  keys: Sequence[str] = None) -> Dict[str, np.ndarray]:
  pattern = os.path.join(prepared_dir, "records", f"{split}-*.tfrecord")
  dataset = input_pipeline.batches(pattern, 8192, history_length, rule,
                                   age_reference, training=False)
  return collect(dataset, keys or list(schema.example_spec(1)))


def test_rule(rule: input_pipeline.ExampleRule) -> input_pipeline.ExampleRule:
  """The rule test examples are loaded with: weights on, even when training
  ignores them, so that weighted metrics mean the same in every run."""
  return dataclasses.replace(rule, use_weights=True)


def fit_baselines(catalogue: catalogue_lib.Catalogue, prepared_dir: str,
                  history_length: int, rule: input_pipeline.ExampleRule,
                  recent_half_life_days: float = 7.0) -> List:
  """The baselines, fitted on the training examples in one streaming pass."""
  counts = baselines.TrainingCounts(catalogue.num_items + 1,
                                    recent_half_life_days)
  pattern = os.path.join(prepared_dir, "records", "train-*.tfrecord")
  for batch in input_pipeline.batches(
      pattern, 8192, history_length, rule,
      age_reference=catalogue.metadata["train_end"], training=False):
    counts.add(batch[schema.SEED_ITEM].numpy(),
               batch[schema.TARGET_ITEM].numpy(),
               batch[schema.EXAMPLE_AGE].numpy())
  return counts.baselines()


def _subset(examples: Dict[str, np.ndarray], mask: np.ndarray
            ) -> Dict[str, np.ndarray]:
  return {k: v[mask] for k, v in examples.items()}


def evaluate(model, catalogue: catalogue_lib.Catalogue, prepared_dir: str,
             history_length: int, rule: input_pipeline.ExampleRule,
             ks: Sequence[int] = metrics.DEFAULT_KS,
             window: str = "test",
             with_baselines: bool = True,
             recent_half_life_days: float = 7.0,
             fitted_baselines: Optional[Sequence] = None,
             test: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Dict]:
  """Metrics of one window for the model and (optionally) the baselines and
  the oracle.

  `window`: "validation" (for every choice) or "test" (scored once, at the
  end). `test`: the window's examples (`load_examples`), if the caller has
  them already.

  Returns:
    One row per retriever ("model", each baseline's name, "oracle" on
    generated data): Recall@k, NDCG@k, MRR over the authors' candidates; the
    same on cold targets over the service's candidates ("cold_target_" +
    name); the same with each example counted at its weight ("weighted_" +
    name; the examples' weights, so `test` is loaded with the weight rule
    on), and, except for the oracle (which has ranks but no lists),
    "coverage@k" and "popularity@k" (see `metrics.RetrievedItemStats`).
    Sections: "window", "candidates" ({"cut", "authors", "service"}),
    "test_targets" (the targets' own coverage and mean popularity
    percentile, and the share that are not candidates) and "recall_curve"
    ({"k": cut-offs from 1 to CURVE_MAX_K, retriever: Recall@k at each}).
  """
  cut = window_start(catalogue, window)
  if test is None:
    test = load_examples(prepared_dir, window, history_length,
                         test_rule(rule))
  num_candidates = catalogue.num_candidates(cut)
  targets = test[schema.TARGET_ITEM]
  # Targets never seen in training are retrievable only by content features.
  cold = catalogue.item_train_count[targets] == 0
  cold_examples = _subset(test, cold)
  weights = test[schema.WEIGHT]
  popularity = metrics.popularity_percentile(catalogue.item_train_count)
  # Coverage counts the candidates (the top lists never leave them).
  candidate_popularity = popularity[:num_candidates + 1]
  list_ks = [min(k, num_candidates) for k in ks]
  curve_ks = metrics.recall_curve_ks(min(CURVE_MAX_K, num_candidates))
  curves = {"k": curve_ks.tolist()}

  kept_ranks = {}

  def scored(name, ranks, cold_ranks, retrieved=None, keep=None):
    """Metrics of one retriever; `cold_ranks`: its ranks of the cold
    examples over the service's candidates."""
    keep = np.ones(len(ranks), bool) if keep is None else keep
    kept_ranks[name] = (ranks, keep)
    result = metrics.rank_metrics(ranks[keep], ks)
    for metric, value in metrics.rank_metrics(cold_ranks[keep[cold]],
                                              ks).items():
      result[f"cold_target_{metric}"] = value
    for metric, value in metrics.rank_metrics(ranks[keep], ks,
                                              weights[keep]).items():
      if metric != "examples":
        result[f"weighted_{metric}"] = value
    if retrieved:
      result.update(_named_by_ks(retrieved.result(), list_ks, ks))
    curves[name] = metrics.recall_curve(ranks[keep], curve_ks).tolist()
    return result

  all_candidates = candidate_embeddings(model, catalogue.num_items + 1)
  retrieved = metrics.RetrievedItemStats(list_ks, candidate_popularity)
  results = {"model": scored(
      "model",
      model_ranks(model, test, all_candidates[:num_candidates + 1], retrieved),
      model_ranks(model, cold_examples, all_candidates), retrieved)}
  if with_baselines:
    if fitted_baselines is None:
      fitted_baselines = fit_baselines(catalogue, prepared_dir,
                                       history_length, rule,
                                       recent_half_life_days)
    seeds = test[schema.SEED_ITEM]
    for baseline in fitted_baselines:
      retrieved = metrics.RetrievedItemStats(list_ks, candidate_popularity)
      baseline_retrieved(baseline, seeds, retrieved)
      # Index order puts non-candidates after every candidate, so a
      # candidate's rank is the same among the candidates alone.
      results[baseline.name] = scored(
          baseline.name,
          _not_candidates(baseline.ranks(seeds, targets), targets,
                          num_candidates),
          baseline.ranks(seeds[cold], targets[cold]), retrieved)

    path = oracle_path(catalogue)
    if path:
      oracle = oracle_ranks(path, catalogue, test)
      column = ("positive_oracle_rank" if "positive_oracle_rank" in oracle
                and np.any(oracle["positive_oracle_rank"] > 0)
                else "oracle_rank")
      ranks = oracle[column].to_numpy()
      known = ranks > 0
      results["oracle"] = scored(
          "oracle", _not_candidates(ranks, targets, num_candidates),
          ranks[cold], keep=known)
      results["oracle"]["coverage_of_test_examples"] = float(known.mean())
      results["oracle"]["distribution"] = (
          "next positive listen" if column == "positive_oracle_rank"
          else "next listen")
      components = oracle["component"].to_numpy()
      if np.any(components != ""):
        # Where the generator's truth says each target came from.
        results["by_component"] = recall_by_target_kind(
            kept_ranks, {c: components == c for c in sorted(set(components))
                         if c}, ks)
  results["window"] = window
  results["candidates"] = {"cut": int(cut), "authors": num_candidates,
                           "service": catalogue.num_items}
  results["test_targets"] = {
      "examples": int(len(targets)),
      "distinct_items": int(len(np.unique(targets))),
      "coverage": float(len(np.unique(targets))) / max(num_candidates, 1),
      "popularity": float(popularity[targets].mean()) if len(targets)
                    else float("nan"),
      "not_candidates": float(np.mean(targets > num_candidates))
                        if len(targets) else 0.0,
  }
  results["recall_curve"] = curves
  results["by_target_kind"] = recall_by_target_kind(
      kept_ranks, target_kinds(test, catalogue), ks)
  return results


def target_kinds(test: Dict[str, np.ndarray],
                 catalogue: catalogue_lib.Catalogue) -> Dict[str, np.ndarray]:
  """Each test example's kind of target, by its relation to the query.

  Exclusive, in this order: the seed itself (a replay); a track in the
  history (a return to it); the seed's album; the seed's artist; anything
  else. They separate what a retriever remembers from what it generalises.
  """
  seed, target = test[schema.SEED_ITEM], test[schema.TARGET_ITEM]
  in_history = (test[schema.HISTORY_ITEMS] == target[:, np.newaxis]).any(1)
  album, artist = catalogue.item_album, catalogue.item_artist
  # Index 0 is "no album/artist": not a shared one.
  same_album = (album[target] == album[seed]) & (album[target] > 0)
  same_artist = (artist[target] == artist[seed]) & (artist[target] > 0)
  kinds = {"replay of the seed": target == seed}
  left = ~kinds["replay of the seed"]
  for name, mask in (("in the history", in_history),
                     ("seed's album", same_album),
                     ("seed's artist", same_artist)):
    kinds[name] = left & mask
    left &= ~mask
  kinds["other"] = left
  return kinds


def recall_by_target_kind(kept_ranks: Dict[str, tuple],
                          kinds: Dict[str, np.ndarray],
                          ks: Sequence[int]) -> Dict[str, Dict]:
  """{"share": {kind: share of examples}, retriever: {kind: {recall@k}}}."""
  out = {"share": {kind: float(mask.mean()) if len(mask) else 0.0
                   for kind, mask in kinds.items()}}
  for name, (ranks, keep) in kept_ranks.items():
    out[name] = {kind: {f"recall@{k}": float(np.mean(ranks[mask & keep] <= k))
                        if np.any(mask & keep) else float("nan")
                        for k in ks}
                 for kind, mask in kinds.items()}
  return out


def target_kind_table(by_kind: Dict[str, Dict], k: int) -> str:
  """Recall@k of every retriever (columns) per kind of target (rows)."""
  names = [n for n in by_kind if n != "share"]
  lines = ["{:<22}{:>7}".format("target", "share") +
           "".join(f"{n[:18]:>20}" for n in names)]
  for kind, share in by_kind["share"].items():
    lines.append("{:<22}{:>7.3f}".format(kind, share) + "".join(
        f"{by_kind[n][kind][f'recall@{k}']:>20.4f}" for n in names))
  return "\n".join(lines)


def _named_by_ks(values: Dict[str, float], list_ks: Sequence[int],
                 ks: Sequence[int]) -> Dict[str, float]:
  """Renames "metric@<capped k>" to "metric@<requested k>"."""
  out = {}
  for capped, k in zip(list_ks, ks):
    for metric in ("coverage", "popularity"):
      out[f"{metric}@{k}"] = values[f"{metric}@{capped}"]
  return out


def retrieved_table(results: Dict[str, Dict], ks: Sequence[int]) -> str:
  """Coverage@k and popularity@k of each retriever, then the test targets."""
  table = format_table(
      results, ks, columns=[f"coverage@{k}" for k in ks] +
      [f"popularity@{k}" for k in ks])
  targets = results.get("test_targets")
  if targets:
    table += (f"\ntest targets: {targets['distinct_items']} distinct items "
              f"in {targets['examples']} examples (coverage "
              f"{targets['coverage']:.4f}), mean popularity percentile "
              f"{targets['popularity']:.4f}")
  return table


def format_table(results: Dict[str, Dict], ks: Sequence[int],
                 prefix: str = "", columns: Sequence[str] = None) -> str:
  """A text table of the retrievers' metrics (those named `prefix` + metric).

  Columns default to Recall@k, NDCG@k and MRR; a retriever without a value
  (e.g. the oracle's coverage) shows "-".
  """
  columns = columns or ([f"recall@{k}" for k in ks] +
                        [f"ndcg@{k}" for k in ks] + ["mrr"])
  width = max(11, max(len(c) for c in columns) + 2)
  lines = ["{:<20}".format("retriever") + "".join(
      f"{c:>{width}}" for c in columns)]
  for name, row in retrievers(results).items():
    cells = []
    for c in columns:
      value = row.get(prefix + c)
      cells.append(f"{value:>{width}.4f}" if value is not None
                   else f"{'-':>{width}}")
    lines.append("{:<20}".format(name) + "".join(cells))
  return "\n".join(lines)


def write_json(results: Dict, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
