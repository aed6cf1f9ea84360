r"""Command-line recommendations from TF Serving or from a SavedModel.

  # From TF Serving (REST on 8501, or gRPC on 8500):
  python -m export.recommend --user_id=42 --seed_item_id=7 \
      --history_item_ids=1,2,3 --server=localhost:8501 --protocol=rest \
      --model_name=yambda_bruteforce --history_length=50
  # In-process, from an exported version folder (BruteForce or ScaNN):
  python -m export.recommend --user_id=42 --seed_item_id=7 \
      --history_item_ids=1,2,3 \
      --saved_model=/tmp/tfrs_yambda/demo/export/yambda_scann/1
  # From raw events (ITEM:PLAYED_PCT:TYPE, oldest first): the history is the
  # positive listens of known tracks, as in training; the seed the last listen.
  python -m export.recommend --user_id=42 \
      --events=1:100:listen,2:10:listen,3:80:listen,3::dislike \
      --saved_model=/tmp/tfrs_yambda/demo/export/yambda_bruteforce/1

--history_item_ids is the history the model was trained on: the user's most
recent positive listens (played at least 50%, not disliked) of tracks the
model knows, oldest first; not every recent play. --events builds it.
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
  flags.DEFINE_integer("seed_item_id", None,
                       "The track just played (default with --events: the "
                       "last listen).", flag_values=fv)
  flags.DEFINE_list("history_item_ids", [],
                    "The user's recent positive listens (played >= 50%, not "
                    "disliked) of known tracks, oldest first; not every "
                    "play (use --events for raw events).", flag_values=fv)
  flags.DEFINE_list("events", [],
                    "Raw recent events instead of --history_item_ids, oldest "
                    "first: ITEM:PLAYED_PCT:TYPE, TYPE listen, like, "
                    "dislike, unlike or undislike (PLAYED_PCT empty but for "
                    "listens), e.g. 7:100:listen,7::like.", flag_values=fv)
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


def parse_events(specs):
  """["ITEM:PLAYED_PCT:TYPE", ...] -> (item, ratio or None, type) events."""
  events = []
  for spec in specs:
    parts = spec.split(":")
    try:
      if len(parts) != 3:
        raise ValueError
      events.append((int(parts[0]), float(parts[1]) if parts[1] else None,
                     parts[2]))
    except ValueError:
      raise app.UsageError(f"--events: {spec!r} is not "
                           "ITEM:PLAYED_PCT:TYPE.") from None
  return events


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
  if FLAGS.events and history:
    raise app.UsageError("Give --events or --history_item_ids, not both.")
  if not FLAGS.events and FLAGS.seed_item_id is None:
    raise app.UsageError("Give --seed_item_id (or --events).")
  options = dict(server=FLAGS.server, protocol=FLAGS.protocol,
                 model_name=FLAGS.model_name, saved_model=FLAGS.saved_model,
                 history_length=FLAGS.history_length,
                 version=FLAGS.model_version)
  try:
    if FLAGS.events:
      recs = client.recommend_from_events(
          FLAGS.user_id, parse_events(FLAGS.events), FLAGS.seed_item_id,
          **options)
    else:
      recs = client.recommend(FLAGS.user_id, FLAGS.seed_item_id, history,
                              **options)
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
  flags.mark_flags_as_required(["user_id"])
  app.run(main)
