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
