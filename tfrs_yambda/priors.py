"""After training: the model's score priors, fitted and sized.

A trained model may hold three priors that scoring mixes into its dense
softmax: the history prior (`history_bonus`: the listener's own recent
tracks), the next-artist prior (`artist_prior`: the tracks of the artists
played after the seed's) and the successor prior (`successor_prior`: the
tracks played right after the seed). None is learned with the towers. The
artist and successor priors' tables are counted from the training
examples, as the baselines are (`fit`); then each prior's size is chosen
on the validation examples, one prior at a time in that order, each with
those before it as chosen and those after it off, like ItemKNN's
neighbourhood and the epoch (`choose`). `restore` sets the chosen sizes on
a model retrained with the same settings. The choice's flags are defined
here (`define_flags`).
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np

from tfrs_yambda import artist_prior
from tfrs_yambda import baselines
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import evaluate
from tfrs_yambda import history_bonus
from tfrs_yambda import metrics
from tfrs_yambda import ranking
from tfrs_yambda import successor_prior


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the flags of the priors' choice (`choose`) in `flag_values`:
  the settings tried and the metrics that choose."""
  fv = flag_values
  flags.DEFINE_list("history_bonus_scales",
                    ["0", "0.1", "0.2", "0.3", "0.5", "1", "2"],
                    "With --history_bonus: the prior's masses tried on the "
                    "validation day; 0 is no bonus.", flag_values=fv)
  flags.DEFINE_list("history_bonus_half_lives", ["10", "50", "inf"],
                    "With --history_bonus: the half-lives (history slots) "
                    "tried with each mass; the best pair by "
                    "--history_bonus_metric is kept.", flag_values=fv)
  flags.DEFINE_list("artist_prior_masses", ["0", "0.1", "0.3", "1", "2"],
                    "With --artist_prior: its masses tried on the validation "
                    "day, after the history bonus's choice.", flag_values=fv)
  flags.DEFINE_list("successor_prior_masses", ["0", "0.3", "1", "2"],
                    "With --successor_prior: its masses tried on the "
                    "validation day, after the artist prior's; chosen once "
                    "for next tracks and once for the Yambda protocol's "
                    "queries.", flag_values=fv)
  flags.DEFINE_string("artist_prior_protocol_metric", "ndcg@10",
                      "If set (and --yambda_protocol), each artist prior mass "
                      "scores the mean of --history_bonus_metric and this "
                      "protocol metric on the validation day, and it chooses "
                      "the successor prior's protocol mass.", flag_values=fv)
  flags.DEFINE_string("history_bonus_metric", "mrr",
                      "The validation metric that chooses the priors (one "
                      "that weighs the top of the list most).",
                      flag_values=fv)
  for name, admits in (("history_bonus_scales", lambda x: x >= 0),
                       ("artist_prior_masses", lambda x: x >= 0),
                       ("successor_prior_masses", lambda x: x >= 0),
                       ("history_bonus_half_lives", lambda x: x > 0)):
    flags.register_validator(  # when parsed, not after training
        name, lambda values, admits=admits: bool(values) and all(
            admits(_number(x)) for x in values), flag_values=fv,
        message=f"--{name}: numbers, masses >= 0 and half-lives > 0.")


def _number(text: str) -> float:
  """`text` as a float, or NaN (which no bound admits)."""
  try:
    return float(text)
  except ValueError:
    return math.nan


def fit(model, catalogue: catalogue_lib.Catalogue,
        fitted_baselines: List) -> None:
  """Fills the model's artist and successor prior tables (those it has) from
  the baselines' training counts: (seed, target) pairs and recent
  popularity."""
  tower = model.query_tower
  if tower.artist_prior is None and tower.successor_prior is None:
    return
  fitted = {b.name: b for b in fitted_baselines}
  transitions = fitted[baselines.SeedCooccurrence.name].pair_counts()
  config = tower.config
  if tower.artist_prior is not None:
    tower.artist_prior.set_tables(artist_prior.fit(
        catalogue.item_artist, len(catalogue.artist_ids), transitions,
        fitted[baselines.RecentPopular.name].scores,
        config.artist_prior_artists, config.artist_prior_tracks))
  if tower.successor_prior is not None:
    tower.successor_prior.set_tables(successor_prior.fit(
        catalogue.num_items + 1, transitions, config.successor_prior_tracks))


def choose_mass(set_mass: Callable[[float], None], score: Callable[[], float],
                masses: Sequence[float]) -> Tuple[float, Dict[str, float]]:
  """Sets the mass (`set_mass`) with the best `score()`, as
  `history_bonus.choose_decay` (ties and NaN scores: the smaller mass).

  Returns:
    (mass chosen, {"mass": its score}).
  """
  masses = sorted({float(m) for m in masses})
  if not masses:
    raise ValueError("No prior mass to choose from.")
  by_mass = {}
  for mass in masses:
    set_mass(mass)
    by_mass[f"{mass:g}"] = score()
  values = [np.nan_to_num(v, nan=-np.inf) for v in by_mass.values()]
  best = masses[int(np.argmax(values))]
  set_mass(best)
  return best, by_mass


def choose(model, catalogue: catalogue_lib.Catalogue,
           examples: Dict[str, np.ndarray], ks: Sequence[int], metric: str,
           scales: Sequence[float], half_lives: Sequence[float],
           masses: Sequence[float], protocol_metric: str = "",
           protocol: Optional[Callable[[], Dict[str, float]]] = None,
           successor_masses: Sequence[float] = (0.0,)) -> Dict[str, Dict]:
  """Sets the model's priors to the sizes best by `metric` on the
  validation `examples`.

  The seed's priors are about the next track; the Yambda protocol scores
  a listener's day, after a gap, and a mass that lifts the seed's next
  artists or tracks far enough crowds out the tracks of the day (on the
  demo, the protocol's NDCG@10 fell below ItemKNN's at the artist mass
  MRR chose). With `protocol_metric`, each artist prior mass scores the
  mean of `metric` and that metric of the protocol on the same day, so it
  must serve both; the successor prior, which only says what plays right
  after the seed, has a protocol mass of its own, chosen by that metric
  alone (`successor_prior`).

  Args:
    model: the trained model (its priors' tables fitted, `fit`).
    catalogue: its catalogue.
    examples: the validation day's examples.
    ks: the cut-offs of the metrics.
    metric: the name of the next-track metric (e.g. "mrr", "recall@100").
    scales, half_lives: the history prior's settings tried
      (`history_bonus.choose_decay`).
    masses: the artist prior's masses tried (`choose_mass`).
    protocol_metric: "", or a metric of `protocol()`'s.
    protocol: the model's protocol metrics on the validation day, as the
      priors are set (needed with `protocol_metric`).
    successor_masses: the successor prior's masses tried, for both.

  Returns:
    The selection's entries, for the priors the model has:
    {"history_bonus": {"scale", "half_life", "by_setting"},
     "artist_prior": {"mass", "by_mass"},
     "successor_prior": {"mass", "by_mass", "protocol_mass",
                         "protocol_by_mass" ({} without the protocol)}}.

  Raises:
    ValueError: `metric` or `protocol_metric` is not one of the metrics.
  """
  tower = model.query_tower
  table = ranking.candidate_table(ranking.candidate_embeddings(
      model, catalogue.num_candidates(
          evaluate.window_start(catalogue, "validation")) + 1))

  def score():
    values = metrics.rank_metrics(
        ranking.model_ranks(model, examples, table), ks)
    if metric not in values:
      raise ValueError(f"--history_bonus_metric={metric} is not a metric of "
                       f"--eval_ks={list(ks)}.")
    return values[metric]

  def protocol_score():
    values = protocol()
    if protocol_metric not in values:
      raise ValueError(f"--artist_prior_protocol_metric={protocol_metric} "
                       f"is not one of the protocol's {sorted(values)}.")
    return values[protocol_metric]

  def report(what, by, chosen, name):
    print(f"{what}: {chosen}, chosen on the validation day ({name}: " +
          ", ".join(f"{k}: {v:.4f}" for k, v in by.items()) + ")")

  selection = {}
  # Off while those before them are chosen.
  for layer in (tower.artist_prior, tower.successor_prior):
    if layer is not None:
      layer.set_mass(0.0)
  if tower.successor_prior is not None:
    tower.successor_prior.set_protocol_mass(0.0)
  if tower.history_bonus is not None:
    (scale, half_life), by_setting = history_bonus.choose_decay(
        tower.history_bonus, score, scales, half_lives)
    # JSON has no infinity: "inf" as a string, as the flag spells it.
    selection["history_bonus"] = {"scale": scale, "half_life": f"{half_life:g}",
                                  "by_setting": by_setting}
    report("History bonus", by_setting,
           f"scale {scale:g}, half-life {half_life:g} slots",
           f"{metric} by scale/half-life")
  if tower.artist_prior is not None:
    both = score
    if protocol_metric:
      def both():
        return (score() + protocol_score()) / 2
    mass, by_mass = choose_mass(tower.artist_prior.set_mass, both, masses)
    selection["artist_prior"] = {"mass": mass, "by_mass": by_mass}
    report("Artist prior", by_mass, f"mass {mass:g}",
           (f"mean of {metric} and protocol {protocol_metric}"
            if protocol_metric else metric) + " by mass")
  layer = tower.successor_prior
  if layer is not None:
    mass, by_mass = choose_mass(layer.set_mass, score, successor_masses)
    entry = {"mass": mass, "by_mass": by_mass, "protocol_mass": 0.0,
             "protocol_by_mass": {}}
    report("Successor prior", by_mass, f"mass {mass:g}", f"{metric} by mass")
    if protocol_metric:
      entry["protocol_mass"], entry["protocol_by_mass"] = choose_mass(
          layer.set_protocol_mass, protocol_score, successor_masses)
      report("Successor prior, the protocol's queries",
             entry["protocol_by_mass"], f"mass {entry['protocol_mass']:g}",
             f"protocol {protocol_metric} by mass")
    selection["successor_prior"] = entry
  return selection


def restore(model, selection: Dict) -> None:
  """Sets the priors' sizes chosen before (`choose`'s entries)."""
  tower = model.query_tower
  if "history_bonus" in selection:
    tower.history_bonus.set_decay(
        selection["history_bonus"]["scale"],
        float(selection["history_bonus"]["half_life"]))
  if "artist_prior" in selection:
    tower.artist_prior.set_mass(selection["artist_prior"]["mass"])
  if "successor_prior" in selection:
    entry = selection["successor_prior"]
    tower.successor_prior.set_mass(entry["mass"])
    tower.successor_prior.set_protocol_mass(entry["protocol_mass"])
