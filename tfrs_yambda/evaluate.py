"""Full-catalogue evaluation of the model, the baselines and the oracle.

All retrievers are scored on the very same test examples (every positive
listen in the test window that has a seed), by the rank of the true next
track among all catalogue items; see `tfrs_yambda.metrics`.
"""

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_yambda import baselines
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import schema

# Bound on the scores matrix of one query batch (floats), to cap memory.
_MAX_SCORES_PER_BATCH = 1 << 25


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


@tf.function(reduce_retracing=True)
def _ranks(queries: tf.Tensor, candidates: tf.Tensor,
           targets: tf.Tensor) -> tf.Tensor:
  scores = tf.matmul(queries, candidates, transpose_b=True)
  index = tf.range(tf.shape(candidates)[0], dtype=targets.dtype)
  scores = tf.where(index[tf.newaxis, :] == 0, -np.inf, scores)
  target_scores = tf.gather(scores, targets, batch_dims=1)[:, tf.newaxis]
  ahead = (scores > target_scores) | ((scores == target_scores) & (
      index[tf.newaxis, :] < targets[:, tf.newaxis]))
  return 1 + tf.reduce_sum(tf.cast(ahead, tf.int64), axis=1)


def model_ranks(model, test: Dict[str, np.ndarray],
                candidates: tf.Tensor) -> np.ndarray:
  """Rank of each test example's target under the model's scores."""
  batch_size = max(1, min(4096, _MAX_SCORES_PER_BATCH // candidates.shape[0]))
  features = {k: test[k] for k in schema.QUERY_FEATURES}
  features[schema.TARGET_ITEM] = test[schema.TARGET_ITEM]
  ranks = []
  for batch in tf.data.Dataset.from_tensor_slices(features).batch(batch_size):
    queries = model.query_tower(batch)
    ranks.append(_ranks(queries, candidates, batch[schema.TARGET_ITEM]).numpy())
  return np.concatenate(ranks) if ranks else np.zeros([0], np.int64)


def oracle_path(catalogue: catalogue_lib.Catalogue) -> Optional[str]:
  """The generator's oracle file for this data, if the data was generated."""
  source = catalogue.metadata.get("source", "")
  size_dir = os.path.dirname(source)
  root = os.path.dirname(os.path.dirname(size_dir))
  path = os.path.join(root, "generator", os.path.basename(size_dir),
                      "oracle.parquet")
  return path if os.path.exists(path) else None


def oracle_ranks(path: str, catalogue: catalogue_lib.Catalogue,
                 test: Dict[str, np.ndarray]) -> np.ndarray:
  """The oracle's rank of each test target (-1 where the oracle has none)."""
  oracle = pd.read_parquet(path, columns=["uid", "timestamp", "item_id",
                                          "oracle_rank"])
  keys = pd.DataFrame({
      "uid": test[schema.USER_ID].astype(np.int64),
      "timestamp": test[schema.TIMESTAMP].astype(np.int64),
      "item_id": catalogue.item_ids[test[schema.TARGET_ITEM]],
  })
  oracle = oracle.astype({"uid": np.int64, "timestamp": np.int64,
                          "item_id": np.int64})
  joined = keys.merge(oracle, how="left", on=["uid", "timestamp", "item_id"])
  return joined["oracle_rank"].fillna(-1).to_numpy(np.int64)


def load_examples(prepared_dir: str, split: str, history_length: int,
                  rule: input_pipeline.ExampleRule, age_reference=None,
                  keys: Sequence[str] = None) -> Dict[str, np.ndarray]:
  pattern = os.path.join(prepared_dir, "records", f"{split}-*.tfrecord")
  dataset = input_pipeline.batches(pattern, 8192, history_length, rule,
                                   age_reference, training=False)
  return collect(dataset, keys or list(schema.example_spec(1)))


def evaluate(model, catalogue: catalogue_lib.Catalogue, prepared_dir: str,
             history_length: int, rule: input_pipeline.ExampleRule,
             ks: Sequence[int] = metrics.DEFAULT_KS,
             with_baselines: bool = True,
             recent_half_life_days: float = 7.0) -> Dict[str, Dict]:
  """Metrics for the model and (optionally) the baselines and the oracle."""
  test = load_examples(prepared_dir, "test", history_length, rule)
  num_indices = catalogue.num_items + 1
  # Targets never seen in training are retrievable only by content features.
  cold = catalogue.item_train_count[test[schema.TARGET_ITEM]] == 0

  def scored(ranks, keep=None):
    keep = np.ones(len(ranks), bool) if keep is None else keep
    result = metrics.rank_metrics(ranks[keep], ks)
    for name, value in metrics.rank_metrics(ranks[keep & cold], ks).items():
      result[f"cold_target_{name}"] = value
    return result

  results = {"model": scored(
      model_ranks(model, test, candidate_embeddings(model, num_indices)))}
  if not with_baselines:
    return results

  train = load_examples(prepared_dir, "train", history_length, rule,
                        age_reference=catalogue.metadata["train_end"],
                        keys=[schema.SEED_ITEM, schema.TARGET_ITEM,
                              schema.EXAMPLE_AGE])
  seeds, targets = test[schema.SEED_ITEM], test[schema.TARGET_ITEM]
  for baseline in (
      baselines.MostPopular(num_indices, train[schema.TARGET_ITEM]),
      baselines.RecentPopular(num_indices, train[schema.TARGET_ITEM],
                              train[schema.EXAMPLE_AGE],
                              recent_half_life_days),
      baselines.SeedCooccurrence(num_indices, train[schema.SEED_ITEM],
                                 train[schema.TARGET_ITEM])):
    results[baseline.name] = scored(baseline.ranks(seeds, targets))

  path = oracle_path(catalogue)
  if path:
    ranks = oracle_ranks(path, catalogue, test)
    known = ranks > 0
    results["oracle"] = scored(ranks, keep=known)
    results["oracle"]["coverage_of_test_examples"] = float(known.mean())
  return results


def format_table(results: Dict[str, Dict], ks: Sequence[int],
                 prefix: str = "") -> str:
  """A text table of the retrievers' metrics (those named `prefix` + metric)."""
  columns = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
  lines = ["{:<20}".format("retriever") + "".join(f"{c:>11}" for c in columns)]
  for name, row in results.items():
    lines.append("{:<20}".format(name) + "".join(
        f"{row.get(prefix + c, float('nan')):>11.4f}" for c in columns))
  return "\n".join(lines)


def write_json(results: Dict, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
