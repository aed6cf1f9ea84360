"""The sampled evaluation: a fixed sample of each window, and its intervals."""

import numpy as np
import pytest

from tfrs_yambda import eval_sample
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import ranking
from tfrs_yambda import report
from tfrs_yambda import schema
from tfrs_yambda import yambda_protocol
from tests.conftest import HISTORY_LENGTH

KS = (10, 100)


def _population(size=20_000, hit_share=0.3, seed=0):
  """Examples whose ranks give a known Recall@100 on all of them: exactly
  `hit_share` of the ranks are <= 100 (the others 101..5000)."""
  rng = np.random.default_rng(seed)
  hits = int(size * hit_share)
  ranks = np.concatenate([rng.integers(1, 101, hits),
                          rng.integers(101, 5001, size - hits)])
  return {
      schema.USER_ID: rng.integers(0, 500, size),
      schema.TIMESTAMP: rng.integers(0, 10**7, size),
      schema.TARGET_ITEM: rng.integers(1, 30_000, size),
      schema.SEED_ITEM: rng.integers(1, 30_000, size),
      schema.WEIGHT: rng.uniform(0.5, 2.0, size),
      "rank": rng.permutation(ranks),
  }


def _batches(examples, size, order):
  return [{k: v[order][start:start + size] for k, v in examples.items()}
          for start in range(0, len(order), size)]


def test_sample_is_fixed_whatever_the_order_and_batches():
  population = _population()
  n = len(population["rank"])
  sample = eval_sample.draw([population], 400)
  shuffled = eval_sample.draw(
      _batches(population, 777, np.random.default_rng(1).permutation(n)), 400)
  assert sample.description() == {"sampled": True, "examples": 400,
                                  "window_examples": n,
                                  "seed": eval_sample.SEED}
  for name in population:
    np.testing.assert_array_equal(sample[name], shuffled[name])
  # The sample: the examples of the 400 smallest keys, in (user, time) order.
  keys = eval_sample.sample_keys(population)
  assert set(sample["rank"].tolist()) <= set(population["rank"].tolist())
  np.testing.assert_array_equal(
      np.sort(eval_sample.sample_keys(sample)), np.sort(keys)[:400])
  assert np.all(np.diff(sample[schema.USER_ID]) >= 0)
  # Every example stays in the population (the Yambda protocol's users).
  np.testing.assert_array_equal(
      np.sort(shuffled.population[schema.USER_ID]),
      np.sort(population[schema.USER_ID]))
  other = eval_sample.draw([population], 400, seed=1)
  assert not np.array_equal(np.sort(other["rank"]), np.sort(sample["rank"]))
  # A window of at most n examples is kept whole, in the order read.
  everything = eval_sample.draw(_batches(population, 3000, np.arange(n)), n)
  assert not everything.sampled and everything.population is everything
  np.testing.assert_array_equal(everything["rank"], population["rank"])


def test_wilson_interval_is_the_formula():
  # The textbook 30 / 100: [0.2189, 0.3958].
  np.testing.assert_allclose(eval_sample.wilson_interval(30, 100),
                             [0.21894885, 0.39584855], atol=1e-7)
  # From n of N without replacement: Wilson's at n / (1 - n / N).
  z, n, f = eval_sample.Z_95, 400, 0.04
  p, m = 0.3, 400 / (1 - 0.04)
  centre = (p + z**2 / (2 * m)) / (1 + z**2 / m)
  half = z / (1 + z**2 / m) * np.sqrt(p * (1 - p) / m + z**2 / (4 * m**2))
  np.testing.assert_allclose(eval_sample.wilson_interval(120, n, f),
                             [centre - half, centre + half])
  assert eval_sample.wilson_interval(120, n, 1.0) == [p, p]
  assert np.isnan(eval_sample.wilson_interval(0, 0)).all()


def test_mean_interval_is_the_normal_formula():
  values = np.array([0.0, 0.5, 1.0, 0.25, 0.75])
  se = values.std(ddof=1) / np.sqrt(5) * np.sqrt(1 - 0.5)
  np.testing.assert_allclose(
      eval_sample.mean_interval(values, fraction=0.5),
      [0.5 - eval_sample.Z_95 * se, 0.5 + eval_sample.Z_95 * se])
  # Unit weights give the unweighted interval; weights move the centre.
  np.testing.assert_allclose(
      eval_sample.mean_interval(values, np.ones(5)),
      eval_sample.mean_interval(values))
  low, high = eval_sample.mean_interval(values, np.array([1, 1, 1, 1, 4.0]))
  assert (low + high) / 2 == pytest.approx(np.average(
      values, weights=[1, 1, 1, 1, 4]))
  assert np.isnan(eval_sample.mean_interval(values[:1])).all()
  # No spread (no hit at all): not a point, but Wilson's interval of 0 / n.
  assert eval_sample.mean_interval(np.zeros(100)) == (
      eval_sample.wilson_interval(0, 100))


def test_intervals_cover_the_window_value_95_percent_of_the_time():
  population = _population()
  # MRR is a mean of 1 / rank, which the few ranks near 1 dominate: its
  # normal interval needs thousands of examples (400 of them: 86% covered).
  n, size = 2000, len(population["rank"])
  truth = metrics.rank_metrics(population["rank"], KS)
  assert truth["recall@100"] == 0.3
  weighted = metrics.rank_metrics(population["rank"], KS,
                                  population[schema.WEIGHT])
  covered = {name: 0 for name in ("recall@10", "recall@100", "ndcg@100",
                                  "mrr", "weighted_recall@100",
                                  "weighted_ndcg@100", "weighted_mrr")}
  seeds = 400
  for seed in range(seeds):
    sample = eval_sample.draw([population], n, seed=seed)
    intervals = eval_sample.rank_intervals(sample["rank"], KS,
                                           fraction=n / size)
    intervals.update({
        "weighted_" + k: v for k, v in eval_sample.rank_intervals(
            sample["rank"], KS, sample[schema.WEIGHT], n / size).items()})
    for name in covered:
      low, high = intervals[name + eval_sample.CI_SUFFIX]
      value = (weighted[name[len("weighted_"):]]
               if name.startswith("weighted_") else truth[name])
      covered[name] += low <= value <= high
  for name, count in covered.items():
    # 95% of 400: 380, give or take 2 standard deviations (about 9).
    assert 0.92 <= count / seeds <= 0.98, (name, count)


def test_sample_width_matches_the_sample_size():
  population = _population()
  size = len(population["rank"])
  widths = []
  for n in (100, 400, 1600):
    sample = eval_sample.draw([population], n)
    low, high = eval_sample.rank_intervals(
        sample["rank"], KS, fraction=n / size)["recall@100_ci95"]
    widths.append(high - low)
  # About 1 / sqrt(n), a little narrower as n / N grows.
  assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.15)
  assert widths[1] / widths[2] == pytest.approx(2.0 * np.sqrt(
      (1 - 400 / size) / (1 - 1600 / size)), rel=0.15)


def test_report_shows_each_interval_half_width():
  rows = {"model": {"recall@10": 0.5743, "recall@10_ci95": [0.5712, 0.5774],
                    "mrr": 0.2},
          "oracle": {"recall@10": 0.9}}
  table = report.format_table(rows, [10], columns=["recall@10", "mrr"])
  assert "0.5743 ± 0.0031" in table
  assert table.splitlines()[2].split() == ["oracle", "0.9000", "-"]
  assert "±" not in report.format_table({"model": {"recall@10": 0.5}}, [10],
                                        columns=["recall@10"])


def test_query_batches_stay_bounded():
  # The demo's catalogue keeps its batches (so its numbers); millions of
  # candidates get at least 64 queries, under 2**28 scores.
  assert ranking.query_batch_size(35_001) == 958
  assert ranking.query_batch_size(3_001) == 4096
  assert ranking.query_batch_size(3_000_001) == 64
  assert ranking.query_batch_size(9_400_001) == 28
  assert ranking.query_batch_size(30_000_001) == 8
  assert ranking.query_batch_size(10**9) == 1


# --- On the tiny prepared data ----------------------------------------------


def test_window_examples_sampled_or_whole(prepared, catalogue):
  rule = input_pipeline.ExampleRule()
  whole = evaluate.window_examples(catalogue, prepared, "test", rule)
  loaded = evaluate.load_examples(prepared, "test", HISTORY_LENGTH,
                                  evaluate.test_rule(rule))
  assert not whole.sampled and whole.load_seconds > 0
  assert set(whole) == set(loaded)
  for name, values in loaded.items():
    np.testing.assert_array_equal(whole[name], values)
  sample = evaluate.window_examples(catalogue, prepared, "test", rule,
                                    eval_examples=300)
  again = evaluate.window_examples(catalogue, prepared, "test", rule,
                                   eval_examples=300)
  assert sample.description() == {
      "sampled": True, "examples": 300, "window_examples": len(
          loaded[schema.TARGET_ITEM]), "seed": eval_sample.SEED}
  for name, values in sample.items():
    np.testing.assert_array_equal(values, again[name])
  # The sample's rows are rows of the window, history and weight included.
  full = {(u, t, i): (s, h.tobytes(), w) for u, t, i, s, h, w in zip(
      *(loaded[k] for k in (schema.USER_ID, schema.TIMESTAMP,
                            schema.TARGET_ITEM, schema.SEED_ITEM,
                            schema.HISTORY_ITEMS, schema.WEIGHT)))}
  for u, t, i, s, h, w in zip(*(sample[k] for k in (
      schema.USER_ID, schema.TIMESTAMP, schema.TARGET_ITEM, schema.SEED_ITEM,
      schema.HISTORY_ITEMS, schema.WEIGHT))):
    assert full[(u, t, i)] == (s, h.tobytes(), w)


@pytest.fixture(scope="module")
def sampled_results(trained_model, prepared, catalogue):
  rule = input_pipeline.ExampleRule()
  sample = evaluate.window_examples(catalogue, prepared, "test", rule,
                                    eval_examples=300)
  baselines = evaluate.fit_baselines(catalogue, prepared, rule)
  results = evaluate.evaluate(trained_model, catalogue, prepared, rule, KS,
                              fitted_baselines=baselines, test=sample)
  return sample, baselines, results


def test_every_retriever_is_scored_on_the_same_sample(
    sampled_results, trained_model, catalogue):
  sample, baselines, results = sampled_results
  assert results["sample"] == sample.description()
  num_candidates = catalogue.num_candidates(catalogue.metadata["test_start"])
  targets = sample[schema.TARGET_ITEM]
  expected = {"model": ranking.model_ranks(
      trained_model, sample,
      ranking.candidate_embeddings(trained_model, num_candidates + 1))}
  for baseline in baselines:
    expected[baseline.name] = ranking.miss_non_candidates(
        baseline.ranks(evaluate.baseline_queries(sample), targets), targets,
        num_candidates)
  for name, ranks in expected.items():
    row = results[name]
    assert row["examples"] == 300
    assert row["recall@100"] == metrics.rank_metrics(ranks, KS)["recall@100"]
    for metric in ("recall@10", "ndcg@100", "mrr", "cold_target_recall@100",
                   "weighted_recall@100", "weighted_mrr"):
      low, high = row[metric + eval_sample.CI_SUFFIX]
      assert low <= row[metric] <= high or np.isnan(row[metric]), metric
  assert results["oracle"]["examples"] <= 300
  assert "recall@100_ci95" in results["oracle"]
  timings = results["timings"]
  assert set(timings) == ({"load_examples", "model", "oracle"} |
                          {b.name for b in baselines})
  assert all(seconds >= 0 for seconds in timings.values())
  text = report.window_report(results, list(KS), "test")
  assert "A seeded sample of 300 of the" in text and " ± " in text
  assert "Seconds: load_examples" in text


def test_every_example_is_scored_without_a_sample(trained_model, prepared,
                                                  catalogue):
  rule = input_pipeline.ExampleRule()
  results = evaluate.evaluate(trained_model, catalogue, prepared, rule, KS,
                              with_baselines=False)
  loaded = evaluate.load_examples(prepared, "test", HISTORY_LENGTH,
                                  evaluate.test_rule(rule))
  assert results["sample"] == {
      "sampled": False, "examples": len(loaded[schema.TARGET_ITEM]),
      "window_examples": len(loaded[schema.TARGET_ITEM]), "seed": None}
  assert not any(k.endswith(eval_sample.CI_SUFFIX) for k in results["model"])
  num_candidates = catalogue.num_candidates(catalogue.metadata["test_start"])
  ranks = ranking.model_ranks(trained_model, loaded,
                              ranking.candidate_embeddings(
                                  trained_model, num_candidates + 1))
  assert {k: results["model"][k] for k in ("recall@10", "recall@100", "mrr")
          } == {k: v for k, v in metrics.rank_metrics(ranks, KS).items()
                if k in ("recall@10", "recall@100", "mrr")}
  assert "±" not in report.format_table(results, KS)


def test_the_protocol_asks_every_user_of_a_sampled_window(
    sampled_results, trained_model, prepared, catalogue):
  sample, baselines, _ = sampled_results
  rule = input_pipeline.ExampleRule()
  on_sample = yambda_protocol.evaluate(trained_model, catalogue, prepared,
                                       rule, baselines[:1], test=sample)
  on_all = yambda_protocol.evaluate(trained_model, catalogue, prepared, rule,
                                    baselines[:1])
  assert on_sample["users"] == on_all["users"] > len(
      np.unique(sample[schema.USER_ID]))
  assert on_sample["retrievers"] == on_all["retrievers"]
  assert on_sample["mean_relevant_items"] == on_all["mean_relevant_items"]
  assert set(on_sample["timings"]) == {"relevant_sets", "user_states",
                                       "model", baselines[0].name, "total"}
