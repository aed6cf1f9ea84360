"""The programs' command lines: no flag on import, flagfiles, configs."""

import dataclasses
import importlib
import os

from absl import app
from absl import flags
import pytest

from data_prep.prep import config as prep_config
from tfrs_yambda import model as model_lib
from tfrs_yambda import towers
from tfrs_yambda import train_flags
from tfrs_yambda import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each program's main module; each defines its flags in `define_flags`.
PROGRAMS = ("tfrs_yambda.train", "tfrs_yambda.ablation",
            "export.local_server", "export.recommend",
            "export.from_checkpoint",
            "benchmarks.ann_benchmark", "benchmarks.exported_benchmark",
            "benchmarks.train_throughput", "benchmarks.ranking_benchmark",
            "benchmarks.prep_benchmark", "benchmarks.catalogue_merge_benchmark")


def _define(module, argv=("program",)) -> flags.FlagValues:
  """A program's flags, defined and parsed in a FlagValues of their own."""
  flag_values = flags.FlagValues()
  define = (train_flags.define_flags if module.__name__ == "tfrs_yambda.train"
            else module.define_flags)
  define(flag_values)
  flag_values(list(argv))
  return flag_values


def test_programs_import_together_and_define_flags_only_when_asked():
  # Before, train and local_server both defined --model_name on import, so
  # one process could not import them both.
  modules = [importlib.import_module(name) for name in PROGRAMS]
  for module in modules:
    own = set(_define(module))
    assert not own & set(flags.FLAGS), module.__name__
  # The job's flags include the prep's, defined once.
  assert set(_define(modules[0])) >= {
      f.metadata.get("flag_name", f.name)
      for f in dataclasses.fields(prep_config.PrepConfig)}


@pytest.mark.parametrize("flagfile", sorted(
    name for name in os.listdir(os.path.join(ROOT, "configs"))
    if name.endswith(".cfg")))
def test_every_flagfile_parses_into_the_configs(flagfile):
  train = importlib.import_module("tfrs_yambda.train")
  flag_values = _define(train, ["train", "--flagfile=" + os.path.join(
      ROOT, "configs", flagfile)])
  assert flag_values.workdir
  config = train_flags.train_config(flag_values)
  assert config.batch_size == flag_values.batch_size
  assert config.eval_ks == (10, 100, 500)
  assert train_flags.tower_config(flag_values).min_item_count == (
      flag_values.min_item_count)
  assert train_flags.retrieval_config(flag_values).temperature == 0.05
  assert prep_config.from_flags(flag_values).num_shards == (
      flag_values.num_shards)


def test_default_flags_make_the_default_configs():
  flag_values = _define(importlib.import_module("tfrs_yambda.train"))
  assert train_flags.train_config(flag_values) == trainer.TrainConfig()
  assert train_flags.tower_config(flag_values) == towers.TowerConfig()
  assert (train_flags.retrieval_config(flag_values) ==
          model_lib.RetrievalConfig())
  assert prep_config.from_flags(flag_values) == prep_config.PrepConfig()


def test_profile_steps_take_first_and_last():
  assert train_flags.profile_steps([]) == ()
  assert train_flags.profile_steps(["3", "4"]) == (3, 4)
  for bad in (["3"], ["4", "3"], ["0", "2"]):
    with pytest.raises(app.UsageError, match="FIRST,LAST"):
      train_flags.profile_steps(bad)
