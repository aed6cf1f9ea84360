r"""Ablations and seed spreads: train per design element and seed, one table.

  python -m tfrs_yambda.ablation --base_flagfile=configs/demo.cfg \
      --ablation_dir=/tmp/tfrs_yambda/ablation [--seeds=3] [--variant=NAME]

Every variant is the base configuration with one element off (or, for the
negatives, the frequency estimate, the attention history encoder, the
recent-history pool and the query heads, one option on; the float16 content
table is a memory setting; "- candidate-space history, 64 wide" is the demo's
model before --candidate_history), trained by `tfrs_yambda.train` once per seed
(--seed=1..N) in its own process on the same prepared data (the first run
generates and prepares it). Variants are compared on the validation day only:
the ablation table gives each variant's mean and standard deviation over the
seeds, and its difference in --compare_metric from the full model, marked "*"
where it exceeds twice the larger of the two seed spreads; a second table gives
each variant's training cost (steady examples/s) and its validation recall@100
by kind of target and by generator component, where a design element is aimed.
The headline table gives every retriever's validation and test metrics for the
full model over the seeds (the test day is scored once per run, never used to
choose). Each run logs its flags to TensorBoard's HParams dashboard
(`tensorboard --logdir <ablation_dir>`); everything goes to
<ablation_dir>/ablation.json. Finished runs are not rerun.
"""

import os
import subprocess
import sys
from typing import Dict, List, Sequence

from absl import app
from absl import flags
import numpy as np

from tfrs_yambda import atomic

FLAGS = flags.FLAGS

# Variant -> the train flags that switch one design element off or on.
VARIANTS = {
    "full model": [],
    "- history features": ["--use_history=false"],
    "- seed features": ["--use_seed=false"],
    "- audio embeddings": ["--use_audio=false"],
    "- artist/album embeddings": ["--use_artist_album=false"],
    "- user id": ["--use_user_id=false"],
    "- example age": ["--use_example_age=false"],
    "- logQ correction": ["--logq_correction=false"],
    "- example weights": ["--use_example_weights=false"],
    # ItemKNN's form of score in the towers (the query adds the history's
    # and the seed's candidate embeddings, weighted by slot), and the width
    # that suits it.
    "- candidate-space history": ["--candidate_history=false"],
    "- candidate-space history, 64 wide": ["--candidate_history=false",
                                           "--output_dim=64"],
    # The priors mixed into the softmax, sized on the validation day after
    # training: the history's own items, the seed artist's next artists',
    # the seed's next tracks.
    "- history bonus": ["--history_bonus=false"],
    "- artist prior": ["--artist_prior=false"],
    "- successor prior": ["--successor_prior=false"],
    "+ mixed negatives (M=1024, all items)": ["--uniform_negatives=1024",
                                              "--uniform_pool=all"],
    "+ mixed negatives (M=4096, all items)": ["--uniform_negatives=4096",
                                              "--uniform_pool=all"],
    "+ mixed negatives (M=4096, trained items)": ["--uniform_negatives=4096",
                                                  "--uniform_pool=trained"],
    "streaming frequency estimate": ["--sampling_probability=streaming"],
    "attention history encoder": ["--history_encoder=attention"],
    # The last 20 history items pooled on their own beside the whole mean:
    # aimed at repeats of recent listens.
    "+ recent history pool (R=20)": ["--recent_history=20"],
    "query heads (K=4)": ["--query_heads=4"],
    "attention encoder + query heads (K=4)": ["--history_encoder=attention",
                                              "--query_heads=4"],
    # Not a design element: whether halving the content table's memory
    # (the 500m configuration's setting) costs quality.
    "item content in float16": ["--content_dtype=float16"],
}
COLUMNS = ("recall@10", "recall@100", "recall@500", "ndcg@100",
           "weighted_recall@100", "cold_target_recall@100")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this program's flags in `flag_values` (called by its main)."""
  fv = flag_values
  flags.DEFINE_string("base_flagfile", "configs/demo.cfg",
                      "The configuration every variant starts from.",
                      flag_values=fv)
  flags.DEFINE_string("ablation_dir", "/tmp/tfrs_yambda/ablation",
                      "Where the variants' runs and the tables go.",
                      flag_values=fv)
  # Repeated rather than a list: variant names contain commas.
  flags.DEFINE_multi_string("variant", None,
                            "A variant of VARIANTS to run; repeat the flag "
                            "for several (default: all).", flag_values=fv)
  flags.DEFINE_integer("seeds", 3, "Training seeds per variant (1..N).",
                       flag_values=fv)
  flags.DEFINE_string("compare_metric", "recall@100",
                      "Validation metric of the difference column.",
                      flag_values=fv)


def _run_dir(ablation_dir: str, name: str, seed: int) -> str:
  slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
  return os.path.join(ablation_dir, slug, f"seed-{seed}")


def run_variant(name: str, seed: int, ablation_dir: str,
                base_flagfile: str) -> dict:
  """Trains one variant with one seed (unless done); returns results.json.

  Args:
    name: a key of `VARIANTS`.
    seed: the training seed (--seed).
    ablation_dir: the runs go to <ablation_dir>/<variant>/seed-<seed>/, and
      the data every run shares to <ablation_dir>/data/.
    base_flagfile: the configuration the variant changes.

  Returns:
    The run's results.json.
  """
  workdir = _run_dir(ablation_dir, name, seed)
  results = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(results):
    data = os.path.join(ablation_dir, "data")
    subprocess.run(
        [sys.executable, "-m", "tfrs_yambda.train",
         f"--flagfile={base_flagfile}", f"--workdir={workdir}",
         f"--yambda_dir={data}/yambda", f"--prepared_dir={data}/prepared",
         f"--seed={seed}", "--export=false", "--projector_items=0",
         *VARIANTS[name]],
        check=True)
  return atomic.read_json(results)


def spread(rows: Sequence[Dict[str, float]],
           columns: Sequence[str]) -> Dict[str, List[float]]:
  """{column: [mean, standard deviation (ddof=1; 0 for one run)]}."""
  out = {}
  for c in columns:
    values = np.array([row[c] for row in rows], np.float64)
    out[c] = [float(values.mean()),
              float(values.std(ddof=1)) if len(values) > 1 else 0.0]
  return out


def differs(a: List[float], b: List[float]) -> bool:
  """Whether two [mean, std] differ by more than twice the larger spread."""
  return abs(a[0] - b[0]) > 2 * max(a[1], b[1])


def _cell(value: List[float]) -> str:
  if abs(value[0]) >= 100:  # a rate, not a metric
    return f"{value[0]:.0f} ± {value[1]:.0f}"
  return f"{value[0]:.4f} ± {value[1]:.4f}"


def table(rows: Dict[str, Dict[str, List[float]]], columns: Sequence[str],
          reference: str = None, metric: str = None) -> str:
  """Mean ± std per row; with `reference`, each row's difference in `metric`
  from it, "*" where it exceeds twice the larger seed spread."""
  first = max(len(name) for name in ["name", *rows]) + 2
  width = max(17, max(len(c) for c in columns) + 2)
  header = f"{'name':<{first}}" + "".join(f"{c:>{width}}" for c in columns)
  if reference:
    header += f"{'diff ' + metric:>{width + 2}}"
  lines = [header]
  for name, values in rows.items():
    line = f"{name:<{first}}" + "".join(
        f"{_cell(values[c]):>{width}}" for c in columns)
    if reference and name != reference:
      diff = values[metric][0] - rows[reference][metric][0]
      mark = "*" if differs(values[metric], rows[reference][metric]) else " "
      line += f"{diff:>+{width + 1}.4f}{mark}"
    lines.append(line)
  return "\n".join(lines)


def where_and_cost(results: Dict, metric: str = "recall@100"
                   ) -> Dict[str, float]:
  """One run's training cost and its validation `metric` where it was aimed.

  Args:
    results: a run's results.json.
    metric: a per-kind metric of `target_kinds.recall_by_target_kind`.

  Returns:
    {"examples/s": steady training examples per second, "<kind>": the
    model's `metric` on the validation targets of each kind, and
    "component <name>": on those the generator's mixture component drew
    (generated data only)}.
  """
  window = results["validation"]
  row = {"examples/s": results["selection"]["steady_examples_per_second"]}
  for section, prefix in (("by_target_kind", ""),
                          ("by_component", "component ")):
    for kind, values in window.get(section, {}).get("model", {}).items():
      row[prefix + kind] = values[metric]
  return row


def retriever_rows(results: Dict) -> Dict[str, Dict]:
  """The retriever rows of one window's results."""
  return {k: v for k, v in results.items() if isinstance(v, dict) and
          "mrr" in v}


def main(argv):
  del argv
  names = FLAGS.variant or list(VARIANTS)
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"Unknown variants {sorted(unknown)}; known: "
                         f"{list(VARIANTS)}")
  seeds = range(1, FLAGS.seeds + 1)
  runs = {name: [run_variant(name, seed, FLAGS.ablation_dir,
                            FLAGS.base_flagfile) for seed in seeds]
          for name in names}
  columns = [c for c in COLUMNS]
  ablation = {name: spread([r["validation"]["model"] for r in results],
                           columns) for name, results in runs.items()}
  output = {"seeds": list(seeds), "compare_metric": FLAGS.compare_metric,
            "validation_ablation": ablation}
  print(f"Validation day, model, mean ± std over {FLAGS.seeds} seeds:")
  reference = "full model" if "full model" in ablation else None
  print(table(ablation, columns, reference, FLAGS.compare_metric))
  details = {name: [where_and_cost(r) for r in results]
             for name, results in runs.items()}
  # Columns every run has (a kind absent from a window has no row).
  detail_columns = [c for c in details[names[0]][0]
                    if all(c in row for rows in details.values()
                           for row in rows)]
  output["validation_where_and_cost"] = {
      name: spread(rows, detail_columns) for name, rows in details.items()}
  print(f"\nValidation day, model: training examples/s and recall@100 by "
        f"kind of target and by generator component, mean ± std over "
        f"{FLAGS.seeds} seeds:")
  print(table(output["validation_where_and_cost"], detail_columns))
  if reference:
    for window in ("validation", "test"):
      rows = {}
      for retriever in retriever_rows(runs[reference][0][window]):
        rows[retriever] = spread(
            [r[window][retriever] for r in runs[reference]], columns)
      output[f"headline_{window}"] = rows
      print(f"\nFull model and baselines, {window} day, mean ± std over "
            f"{FLAGS.seeds} seeds:")
      print(table(rows, columns))
  path = atomic.write_json(output,
                           os.path.join(FLAGS.ablation_dir, "ablation.json"))
  print(f"Written to {path}; TensorBoard: tensorboard --logdir "
        f"{FLAGS.ablation_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
