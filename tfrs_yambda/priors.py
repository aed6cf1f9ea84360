"""After training: the model's score priors, fitted and sized.

A trained model may hold two priors that scoring mixes into its dense
softmax: the history prior (`history_bonus`: the listener's own recent
tracks) and the next-artist prior (`artist_prior`: the tracks of the
artists played after the seed's). Neither is learned with the towers. The
artist prior's tables are counted from the training examples, as the
baselines are (`fit_artist_prior`); then each prior's size is chosen on the
validation examples by one metric, the history prior's first (the artist
prior off), then the artist prior's with the history prior as chosen, like
ItemKNN's neighbourhood and the epoch (`choose`). `restore` sets a chosen
size on a model retrained with the same settings.
"""

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from tfrs_yambda import artist_prior
from tfrs_yambda import baselines
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import evaluate
from tfrs_yambda import history_bonus
from tfrs_yambda import metrics
from tfrs_yambda import ranking


def fit_artist_prior(model, catalogue: catalogue_lib.Catalogue,
                     fitted_baselines: List) -> None:
  """Fills the model's artist prior tables (if it has that prior) from the
  baselines' training counts: (seed, target) pairs and recent popularity."""
  layer = model.query_tower.artist_prior
  if layer is None:
    return
  fitted = {b.name: b for b in fitted_baselines}
  config = model.query_tower.config
  layer.set_tables(artist_prior.fit(
      catalogue.item_artist, len(catalogue.artist_ids),
      fitted[baselines.SeedCooccurrence.name].pair_counts(),
      fitted[baselines.RecentPopular.name].scores,
      config.artist_prior_artists, config.artist_prior_tracks))


def choose(model, catalogue: catalogue_lib.Catalogue,
           examples: Dict[str, np.ndarray], ks: Sequence[int], metric: str,
           scales: Sequence[float], half_lives: Sequence[float],
           masses: Sequence[float], protocol_metric: str = "",
           protocol: Optional[Callable[[], Dict[str, float]]] = None
           ) -> Dict[str, Dict]:
  """Sets the model's priors to the sizes best by `metric` on the
  validation `examples`.

  The artist prior is about the next track only: the seed's next artists
  say little about the rest of a listener's day, which the Yambda
  protocol scores, and a mass that lifts them far enough crowds out the
  tracks of the day (on the demo, the protocol's NDCG@10 fell below
  ItemKNN's at the mass MRR chose). With `protocol_metric`, each mass
  scores the mean of `metric` and that metric of the protocol on the same
  day, so it must serve both.

  Args:
    model: the trained model (its artist prior's tables fitted).
    catalogue: its catalogue.
    examples: the validation day's examples.
    ks: the cut-offs of the metrics.
    metric: the name of the next-track metric (e.g. "mrr", "recall@100").
    scales, half_lives: the history prior's settings tried
      (`history_bonus.choose_decay`).
    masses: the artist prior's masses tried (`artist_prior.choose_mass`).
    protocol_metric: "", or a metric of `protocol()`'s.
    protocol: the model's protocol metrics on the validation day, as the
      priors are set (needed with `protocol_metric`).

  Returns:
    The selection's entries: {"history_bonus": {"scale", "half_life",
    "by_setting"}} and/or {"artist_prior": {"mass", "by_mass"}}.

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

  selection = {}
  if tower.artist_prior is not None:
    tower.artist_prior.set_mass(0.0)  # off while the history's is chosen
  if tower.history_bonus is not None:
    (scale, half_life), by_setting = history_bonus.choose_decay(
        tower.history_bonus, score, scales, half_lives)
    # JSON has no infinity: "inf" as a string, as the flag spells it.
    selection["history_bonus"] = {"scale": scale, "half_life": f"{half_life:g}",
                                  "by_setting": by_setting}
    print(f"History bonus: scale {scale:g}, half-life {half_life:g} slots, "
          f"chosen on the validation day ({metric} by scale/half-life: " +
          ", ".join(f"{k}: {v:.4f}" for k, v in by_setting.items()) + ")")
  if tower.artist_prior is not None:
    both = score
    if protocol_metric:
      def both():
        values = protocol()
        if protocol_metric not in values:
          raise ValueError(f"--artist_prior_protocol_metric={protocol_metric} "
                           f"is not one of the protocol's {sorted(values)}.")
        return (score() + values[protocol_metric]) / 2
    mass, by_mass = artist_prior.choose_mass(tower.artist_prior, both, masses)
    selection["artist_prior"] = {"mass": mass, "by_mass": by_mass}
    name = f"mean of {metric} and protocol {protocol_metric}" if (
        protocol_metric) else metric
    print(f"Artist prior: mass {mass:g}, chosen on the validation day "
          f"({name} by mass: " +
          ", ".join(f"{k}: {v:.4f}" for k, v in by_mass.items()) + ")")
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
