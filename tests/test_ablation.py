"""The seed-spread tables of tfrs_yambda.ablation."""

import pytest

from tfrs_yambda import ablation


def test_spread_is_mean_and_sample_standard_deviation():
  rows = [{"recall@100": 0.50}, {"recall@100": 0.52}, {"recall@100": 0.54}]
  mean, std = ablation.spread(rows, ["recall@100"])["recall@100"]
  assert mean == pytest.approx(0.52)
  assert std == pytest.approx(0.02)
  assert ablation.spread(rows[:1], ["recall@100"])["recall@100"][1] == 0.0


def test_a_difference_counts_only_beyond_twice_the_larger_spread():
  assert ablation.differs([0.55, 0.01], [0.52, 0.005])
  assert not ablation.differs([0.53, 0.01], [0.52, 0.002])
  assert not ablation.differs([0.535, 0.002], [0.52, 0.01])


def test_table_marks_the_differences_that_exceed_the_spread():
  rows = {"full model": {"recall@100": [0.52, 0.004]},
          "- seed features": {"recall@100": [0.45, 0.005]},
          "- user id": {"recall@100": [0.515, 0.006]}}
  lines = ablation.table(rows, ["recall@100"], "full model",
                         "recall@100").splitlines()
  assert "0.5200 ± 0.0040" in lines[1]
  assert lines[2].rstrip().endswith("-0.0700*")
  assert lines[3].rstrip().endswith("-0.0050")


def _results(rate, kinds, components):
  window = {"by_target_kind": {"share": {k: 0.5 for k in kinds},
                               "model": {k: {"recall@100": v}
                                         for k, v in kinds.items()}}}
  if components:
    window["by_component"] = {"model": {k: {"recall@100": v}
                                        for k, v in components.items()}}
  return {"selection": {"steady_examples_per_second": rate},
          "validation": window}


def test_where_and_cost_reads_the_rate_and_the_models_recall_by_kind():
  row = ablation.where_and_cost(_results(
      5000.0, {"repeat": 0.9, "new artist": 0.3}, {"similar": 0.4}))
  assert row == {"examples/s": 5000.0, "repeat": 0.9, "new artist": 0.3,
                 "component similar": 0.4}
  # Without the generator's components (real data) only the kinds.
  assert "component similar" not in ablation.where_and_cost(
      _results(5000.0, {"repeat": 0.9}, {}))


def test_rates_print_without_decimals():
  rows = {"full model": {"examples/s": [9846.04, 12.3],
                         "recall@100": [0.5, 0.01]}}
  line = ablation.table(rows, ["examples/s", "recall@100"]).splitlines()[1]
  assert "9846 ± 12" in line and "0.5000 ± 0.0100" in line
