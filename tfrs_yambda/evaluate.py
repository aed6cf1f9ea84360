"""Full-catalogue evaluation of the model, the baselines and the oracle.

All retrievers are scored on the very same examples of one window
("validation" or "test": every positive listen in it that has a seed), by the
rank of the true next track among the window's candidates; see
`tfrs_yambda.metrics`. The candidates are the authors' catalogue, the items
listened to before the window starts (`Catalogue.num_candidates`): nothing
after the window's cut decides what is a candidate, and a target first played
inside the window is a miss for every retriever. Targets without a training
positive ("cold") are scored against the service's catalogue, every
catalogued item, as a cold track is served. The model and the baselines also
report what they retrieve: Coverage@k and the mean popularity percentile of
their top-k items, beside the same for the test targets, so a popularity bias
is visible. The Yambda authors' protocol (one query per user,
all test-day listens relevant) is `tfrs_yambda.yambda_protocol`.

With --eval_examples=n, every retriever is scored on one seeded sample of n
of the window's examples, each figure with its 95% interval (`eval_sample`);
results say which were scored ("sample") and each part's seconds ("timings").

`evaluate` returns one row per retriever plus the sections named in
`SECTIONS`; `retrievers` picks the rows. The model is ranked by
`tfrs_yambda.ranking` (cold examples by `tfrs_yambda.blockwise_ranks`), the
oracle read by `tfrs_yambda.oracle`, and `tfrs_yambda.report` formats the
results as tables.
"""

import dataclasses
import glob
import os
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tfrs_yambda import baselines
from tfrs_yambda import blockwise_ranks
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import eval_sample
from tfrs_yambda import input_pipeline
from tfrs_yambda import itemknn
from tfrs_yambda import metrics
from tfrs_yambda import oracle as oracle_lib
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import target_kinds as target_kinds_lib

# Queries per baseline top-k call (their lists are int64 [batch, k]).
_BASELINE_BATCH = 4096
# Results entries that are not retrievers.
SECTIONS = ("recall_curve", "test_targets", "yambda_protocol", "by_target_kind",
            "by_component", "window", "candidates", "sample", "timings")
WINDOWS = ("validation", "test")
# Largest k of the Recall@k curve (capped at the catalogue size).
CURVE_MAX_K = 1000


def retrievers(results: Dict[str, Dict]) -> Dict[str, Dict]:
  """The retriever rows of `evaluate`'s results (without `SECTIONS`)."""
  return {k: v for k, v in results.items() if k not in SECTIONS}


def collect(dataset: tf.data.Dataset,
            keys: Sequence[str]) -> Dict[str, np.ndarray]:
  """Concatenates the given features of a batched dataset into numpy arrays."""
  parts = {k: [] for k in keys}
  for batch in dataset:
    for k in keys:
      parts[k].append(batch[k].numpy())
  return {k: np.concatenate(v) if v else np.zeros([0])
          for k, v in parts.items()}


def has_validation(catalogue: catalogue_lib.Catalogue) -> bool:
  """Whether the data was prepared with a validation window."""
  meta = catalogue.metadata
  return meta["validation_end"] > meta["validation_start"]


def window_start(catalogue: catalogue_lib.Catalogue, window: str) -> int:
  """The cut of a window: what is computed for it knows nothing after it."""
  if window not in WINDOWS:
    raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
  start = catalogue.metadata[f"{window}_start"]
  if window == "validation" and start >= catalogue.metadata["validation_end"]:
    raise ValueError("The data was prepared without a validation window "
                     "(--validation_window_seconds=0).")
  return start


def baseline_queries(examples: Dict[str, np.ndarray]
                     ) -> Dict[str, np.ndarray]:
  """What a baseline reads of each example: its seed and history."""
  return {k: examples[k] for k in (schema.SEED_ITEM, schema.HISTORY_ITEMS)}


def baseline_retrieved(baseline, queries: Dict[str, np.ndarray],
                       retrieved: metrics.RetrievedItemStats) -> None:
  """Adds a baseline's top lists for `queries` to `retrieved`, in batches."""
  for start in range(0, len(queries[schema.SEED_ITEM]), _BASELINE_BATCH):
    retrieved.add(baseline.top_k(
        {k: v[start:start + _BASELINE_BATCH] for k, v in queries.items()},
        retrieved.ks[-1]))


def load_examples(prepared_dir: str, split: str, history_length: int,
                  rule: input_pipeline.ExampleRule, age_reference=None,
                  keys: Sequence[str] = None) -> Dict[str, np.ndarray]:
  """Every example of one split of prepared records, in file order.

  Like `input_pipeline.batches`, this reads files, not a catalogue: callers
  that hold the catalogue pass its `history_length`, the N the records were
  written with.

  Args:
    prepared_dir: the prep's output folder.
    split: "train", "validation" or "test".
    history_length: N, history positives per example.
    rule: the positive / weight rule (`test_rule` for scored examples).
    age_reference: see `input_pipeline.expand_record` (None: age 0).
    keys: the features to keep (default: all of `schema.example_spec`).

  Returns:
    {feature: numpy array with one row per example}.
  """
  return collect(_split_batches(prepared_dir, split, history_length, rule,
                                age_reference),
                 keys or list(schema.example_spec(1)))


def _split_batches(prepared_dir: str, split: str, history_length: int,
                   rule: input_pipeline.ExampleRule,
                   age_reference=None) -> tf.data.Dataset:
  """The examples of one split's records in file order, in batches."""
  pattern = os.path.join(prepared_dir, "records", f"{split}-*.tfrecord")
  return input_pipeline.batches(pattern, 8192, history_length, rule,
                                age_reference, training=False)


def test_rule(rule: input_pipeline.ExampleRule) -> input_pipeline.ExampleRule:
  """The rule test examples are loaded with: weights on, even when training
  ignores them, so that weighted metrics mean the same in every run."""
  return dataclasses.replace(rule, use_weights=True)


def window_examples(catalogue: catalogue_lib.Catalogue, prepared_dir: str,
                    window: str, rule: input_pipeline.ExampleRule,
                    eval_examples: int = 0, seed: int = eval_sample.SEED
                    ) -> eval_sample.WindowExamples:
  """The examples every retriever is scored on in one window.

  Args:
    catalogue: the prepared data's catalogue (its history length is N).
    prepared_dir: the folder holding its records.
    window: "validation" or "test".
    rule: the training rule; the examples are loaded with `test_rule`.
    eval_examples: 0: every example; n > 0: the sample `eval_sample.draw`
      keeps of them (all, in file order, when the window has at most n).
    seed: the sample's seed.

  Returns:
    {feature: numpy array with one row per example}, as `load_examples`,
    which also says how they were drawn and the seconds it took.
  """
  start = time.perf_counter()
  if eval_examples <= 0:
    examples = load_examples(prepared_dir, window, catalogue.history_length,
                             test_rule(rule))
    return eval_sample.WindowExamples(
        examples, load_seconds=round(time.perf_counter() - start, 3))
  keys = list(schema.example_spec(1))
  examples = eval_sample.draw(
      ({k: batch[k].numpy() for k in keys} for batch in _split_batches(
          prepared_dir, window, catalogue.history_length, test_rule(rule))),
      eval_examples, seed, keys)
  examples.load_seconds = round(time.perf_counter() - start, 3)
  return examples


def fit_baselines(catalogue: catalogue_lib.Catalogue, prepared_dir: str,
                  rule: input_pipeline.ExampleRule,
                  recent_half_life_days: float = 7.0,
                  knn_config: Optional[itemknn.ItemKNNConfig] = None,
                  shards: int = 0) -> List:
  """The baselines, fitted on the training examples in one streaming pass.

  Args:
    catalogue: the prepared data's catalogue.
    prepared_dir: the folder holding its records.
    rule: which listens are training positives.
    recent_half_life_days: the recent-popularity baseline's half-life.
    knn_config: ItemKNN's window and neighbourhood sizes (its lists hold the
      largest; `itemknn.choose_neighbours` picks one); default
      `itemknn.ItemKNNConfig()`.
    shards: 0, or fit on the first k shards (a hashed sample of users).

  Returns:
    [MostPopular, RecentPopular, SeedCooccurrence] (see
    `baselines.TrainingCounts.baselines`), then `itemknn.ItemKNN`.
  """
  knn_config = knn_config or itemknn.ItemKNNConfig()
  num_indices = catalogue.num_items + 1
  counts = baselines.TrainingCounts(num_indices, recent_half_life_days)
  pairs = itemknn.PairCounts(num_indices, knn_config.window,
                             knn_config.max_pairs)
  pattern = os.path.join(prepared_dir, "records", "train-*.tfrecord")
  pattern = sorted(glob.glob(pattern))[:shards] if shards else pattern
  for batch in input_pipeline.batches(
      pattern, 8192, catalogue.history_length, rule,
      age_reference=catalogue.metadata["train_end"], training=False):
    targets = batch[schema.TARGET_ITEM].numpy()
    counts.add(batch[schema.SEED_ITEM].numpy(), targets,
               batch[schema.EXAMPLE_AGE].numpy())
    pairs.add(batch[schema.HISTORY_ITEMS].numpy(), targets)
  keys, cooccurrences = pairs.result()
  if pairs.prune_thresholds:
    logging.warning("ItemKNN kept %d of its pairs: counts may be short by up "
                    "to %d.", len(keys), sum(pairs.prune_thresholds))
  k = max(knn_config.neighbours)
  knn = itemknn.ItemKNN(num_indices, *itemknn.neighbour_lists(
      num_indices, keys, cooccurrences, counts.popularity, k), k,
                        knn_config.seed_weight)
  return counts.baselines() + [knn]


def _subset(examples: Dict[str, np.ndarray], mask) -> Dict[str, np.ndarray]:
  return {k: v[mask] for k, v in examples.items()}


def evaluate(model, catalogue: catalogue_lib.Catalogue, prepared_dir: str,
             rule: input_pipeline.ExampleRule,
             ks: Sequence[int] = metrics.DEFAULT_KS,
             window: str = "test",
             with_baselines: bool = True,
             recent_half_life_days: float = 7.0,
             fitted_baselines: Optional[Sequence] = None,
             test: Optional[Dict[str, np.ndarray]] = None,
             eval_examples: int = 0) -> Dict[str, Dict]:
  """Metrics of one window for the model and (optionally) the baselines and
  the oracle.

  Args:
    model: the trained `TwoTowerModel` (its query and candidate towers).
    catalogue: the prepared data's catalogue; its history length is the
      examples' N.
    prepared_dir: the folder holding its records.
    rule: the training positive rule (the window's examples are loaded with
      weights on, `test_rule`).
    ks: the cut-offs of Recall@k, NDCG@k, coverage and popularity.
    window: "validation" (for every choice) or "test" (scored once, last).
    with_baselines: also score the baselines and (generated data) the oracle.
    recent_half_life_days: the recent-popularity baseline's half-life, when
      the baselines are fitted here.
    fitted_baselines: `fit_baselines`' result, if the caller has it already.
    test: the window's examples (`window_examples`, or all of them as
      `load_examples` reads them), if the caller has them already.
    eval_examples: when `test` is None, the sample size `window_examples`
      loads them with (0: every example).

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
    percentile, and the share that are not candidates), "recall_curve"
    ({"k": cut-offs from 1 to CURVE_MAX_K, retriever: Recall@k at each}),
    "sample" (`eval_sample.WindowExamples.description`) and "timings"
    (seconds per part). On a sample, each Recall@k, NDCG@k and MRR has its
    95% interval beside it, named with the suffix "_ci95".
  """
  cut = window_start(catalogue, window)
  timings = eval_sample.Timings()
  if test is None:
    test = window_examples(catalogue, prepared_dir, window, rule,
                           eval_examples)
  timings["load_examples"] = getattr(test, "load_seconds", None)
  sample = eval_sample.describe(test)
  fraction = eval_sample.sampling_fraction(test)
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
    if sample["sampled"]:
      result.update(eval_sample.row_intervals(
          ranks[keep], cold_ranks[keep[cold]], weights[keep], ks, fraction))
    curves[name] = metrics.recall_curve(ranks[keep], curve_ks).tolist()
    return result

  with timings.part("model"):
    # Cold examples over every item, a block of items at a time; then the
    # window's candidates, one table.
    cold_ranks = blockwise_ranks.target_ranks(model, cold_examples,
                                              catalogue.num_items + 1)
    retrieved = metrics.RetrievedItemStats(list_ks, candidate_popularity)
    results = {"model": scored("model", ranking.model_ranks(
        model, test, ranking.candidate_table(ranking.candidate_embeddings(
            model, num_candidates + 1)), retrieved), cold_ranks, retrieved)}
  if with_baselines:
    if fitted_baselines is None:
      with timings.part("fit_baselines"):
        fitted_baselines = fit_baselines(catalogue, prepared_dir, rule,
                                         recent_half_life_days)
    queries = baseline_queries(test)
    for baseline in fitted_baselines:
      with timings.part(baseline.name):
        retrieved = metrics.RetrievedItemStats(list_ks, candidate_popularity)
        baseline_retrieved(baseline, queries, retrieved)
        # Index order puts non-candidates after every candidate, so a
        # candidate's rank is the same among the candidates alone.
        results[baseline.name] = scored(
            baseline.name,
            ranking.miss_non_candidates(baseline.ranks(queries, targets),
                                        targets, num_candidates),
            baseline.ranks(_subset(queries, cold), targets[cold]), retrieved)

    path = oracle_lib.oracle_path(catalogue)
    if path:
      with timings.part("oracle"):
        oracle = oracle_lib.oracle_ranks(path, catalogue, test)
      column = ("positive_oracle_rank" if "positive_oracle_rank" in oracle
                and np.any(oracle["positive_oracle_rank"] > 0)
                else "oracle_rank")
      ranks = oracle[column].to_numpy()
      known = ranks > 0
      results["oracle"] = scored(
          "oracle",
          ranking.miss_non_candidates(ranks, targets, num_candidates),
          ranks[cold], keep=known)
      results["oracle"]["coverage_of_test_examples"] = float(known.mean())
      results["oracle"]["distribution"] = (
          "next positive listen" if column == "positive_oracle_rank"
          else "next listen")
      components = oracle["component"].to_numpy()
      if np.any(components != ""):
        # Where the generator's truth says each target came from.
        results["by_component"] = target_kinds_lib.recall_by_target_kind(
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
  results["by_target_kind"] = target_kinds_lib.recall_by_target_kind(
      kept_ranks, target_kinds_lib.target_kinds(test, catalogue), ks)
  results["sample"] = sample
  results["timings"] = timings
  return results


def _named_by_ks(values: Dict[str, float], list_ks: Sequence[int],
                 ks: Sequence[int]) -> Dict[str, float]:
  """Renames "metric@<capped k>" to "metric@<requested k>"."""
  out = {}
  for capped, k in zip(list_ks, ks):
    for metric in ("coverage", "popularity"):
      out[f"{metric}@{k}"] = values[f"{metric}@{capped}"]
  return out
