r"""Ablations: train once per switched design element, compare in one table.

  python -m tfrs_yambda.ablation --base_flagfile=configs/demo.cfg \
      --ablation_dir=/tmp/tfrs_yambda/ablation

Every variant is the base configuration with one element off (or, for the
negatives and the frequency estimate, one option on), trained by
`tfrs_yambda.train` in its own process on the same prepared data (the first
variant generates and prepares it). Each run logs its flags to TensorBoard's
HParams dashboard (`tensorboard --logdir <ablation_dir>`); the table of
Recall@10/100/500, NDCG@100, weighted Recall@100 and Recall@100 on cold
targets is printed and written to <ablation_dir>/ablation.json. Finished
variants are not rerun; `--variant=NAME` (repeatable) runs a subset.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("base_flagfile", "configs/demo.cfg",
                    "The configuration every variant starts from.")
flags.DEFINE_string("ablation_dir", "/tmp/tfrs_yambda/ablation",
                    "Where the variants' runs and the table go.")
# Repeated rather than a list: variant names contain commas.
flags.DEFINE_multi_string("variant", None,
                          "A variant of VARIANTS to run; repeat the flag for "
                          "several (default: all).")

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
    "+ mixed negatives (M=1024, all items)": ["--uniform_negatives=1024",
                                              "--uniform_pool=all"],
    "+ mixed negatives (M=4096, all items)": ["--uniform_negatives=4096",
                                              "--uniform_pool=all"],
    "+ mixed negatives (M=4096, trained items)": ["--uniform_negatives=4096",
                                                  "--uniform_pool=trained"],
    "streaming frequency estimate": ["--sampling_probability=streaming"],
}
COLUMNS = ("recall@10", "recall@100", "recall@500", "ndcg@100",
           "weighted_recall@100", "cold_target_recall@100")


def _run_dir(name: str) -> str:
  slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
  return os.path.join(FLAGS.ablation_dir, slug)


def run_variant(name: str) -> dict:
  """Trains one variant (unless done) and returns its model metrics."""
  workdir = _run_dir(name)
  results = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(results):
    data = os.path.join(FLAGS.ablation_dir, "data")
    subprocess.run(
        [sys.executable, "-m", "tfrs_yambda.train",
         f"--flagfile={FLAGS.base_flagfile}", f"--workdir={workdir}",
         f"--yambda_dir={data}/yambda", f"--prepared_dir={data}/prepared",
         "--eval_every_epoch=false", "--export=false", *VARIANTS[name]],
        check=True)
  with open(results) as f:
    return json.load(f)


def table(rows: dict) -> str:
  first = max(len(name) for name in ["variant", *rows]) + 2
  widths = [max(12, len(c) + 2) for c in COLUMNS]
  lines = [f"{'variant':<{first}}" +
           "".join(f"{c:>{w}}" for c, w in zip(COLUMNS, widths))]
  for name, metrics in rows.items():
    lines.append(f"{name:<{first}}" + "".join(
        f"{metrics[c]:>{w}.4f}" for c, w in zip(COLUMNS, widths)))
  return "\n".join(lines)


def main(argv):
  del argv
  names = FLAGS.variant or list(VARIANTS)
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"Unknown variants {sorted(unknown)}; known: "
                         f"{list(VARIANTS)}")
  rows, baselines = {}, {}
  for name in names:
    results = run_variant(name)
    rows[name] = results["model"]
    # Retriever rows only (results.json also holds other sections).
    baselines = {k: v for k, v in results.items()
                 if k != "model" and "mrr" in v}
  rows.update(baselines)  # the same test examples: one row each suffices
  os.makedirs(FLAGS.ablation_dir, exist_ok=True)
  path = os.path.join(FLAGS.ablation_dir, "ablation.json")
  with open(path + ".tmp", "w") as f:
    json.dump(rows, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  print(table(rows))
  print(f"Written to {path}; TensorBoard: tensorboard --logdir "
        f"{FLAGS.ablation_dir}")


if __name__ == "__main__":
  app.run(main)
