r"""Command-line recommendations from TF Serving or from a SavedModel.

  # From TF Serving (REST on 8501, or gRPC on 8500):
  python -m export.recommend --user_id=42 --seed_item_id=7 \
      --history_item_ids=1,2,3 --server=localhost:8501 --protocol=rest \
      --model_name=yambda_bruteforce --history_length=50
  # In-process, from an exported version folder (BruteForce or ScaNN):
  python -m export.recommend --user_id=42 --seed_item_id=7 \
      --history_item_ids=1,2,3 \
      --saved_model=/tmp/tfrs_yambda/demo/export/yambda_scann/1
"""

import json

from absl import app
from absl import flags

from export import client

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this program's flags in `flag_values` (called by its main)."""
  fv = flag_values
  flags.DEFINE_integer("user_id", None, "The listener's uid.", flag_values=fv)
  flags.DEFINE_integer("seed_item_id", None, "The track playing now.",
                       flag_values=fv)
  flags.DEFINE_list("history_item_ids", [],
                    "Recently played track ids, oldest first.",
                    flag_values=fv)
  flags.DEFINE_string("server", None,
                      "TF Serving host:port; unset: run --saved_model here.",
                      flag_values=fv)
  flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "How to reach it.",
                    flag_values=fv)
  flags.DEFINE_string("model_name", client.DEFAULT_MODEL_NAME,
                      "Served model.", flag_values=fv)
  flags.DEFINE_integer("model_version", None,
                       "Pin a version (default latest).", flag_values=fv)
  flags.DEFINE_string("saved_model", None,
                      "A SavedModel version folder (in-process serving, and "
                      "where the history length is read from).",
                      flag_values=fv)
  flags.DEFINE_integer("history_length", None,
                       "The model's history length N (default: from "
                       "--saved_model's metadata).", flag_values=fv)
  flags.DEFINE_integer("top", 10, "How many results to print.",
                       flag_values=fv)
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.",
                    flag_values=fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    history = [int(x) for x in FLAGS.history_item_ids]
  except ValueError:
    raise app.UsageError(
        f"--history_item_ids must be integers: {FLAGS.history_item_ids}"
    ) from None
  if FLAGS.server is None and FLAGS.saved_model is None:
    raise app.UsageError("Give --server or --saved_model.")
  try:
    recs = client.recommend(
        FLAGS.user_id, FLAGS.seed_item_id, history, server=FLAGS.server,
        protocol=FLAGS.protocol, model_name=FLAGS.model_name,
        saved_model=FLAGS.saved_model, history_length=FLAGS.history_length,
        version=FLAGS.model_version)
  except (client.RequestError, client.ServingError) as e:
    raise app.UsageError(str(e)) from None
  top = slice(0, FLAGS.top)
  if FLAGS.json:
    print(json.dumps({"item_ids": recs.item_ids[top].tolist(),
                      "scores": recs.scores[top].tolist()}))
    return
  print(f"{'rank':>4}  {'item_id':>12}  score")
  for rank, (item, score) in enumerate(zip(recs.item_ids[top],
                                           recs.scores[top]), 1):
    print(f"{rank:>4}  {item:>12}  {score:.4f}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["user_id", "seed_item_id"])
  app.run(main)
