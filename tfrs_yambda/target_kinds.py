"""Recall by kind of target: where a retriever wins and where it loses.

A test example's target relates to its query in one of a few ways (a replay
of the seed, a return to a track of the history, the seed's album or artist,
anything else); Recall@k per kind separates what a retriever remembers from
what it generalises. `tfrs_yambda.evaluate` reports it for every retriever,
and by the generator's mixture component on generated data.
"""

from typing import Dict, Sequence

import numpy as np

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema


def target_kinds(test: Dict[str, np.ndarray],
                 catalogue: catalogue_lib.Catalogue) -> Dict[str, np.ndarray]:
  """Each test example's kind of target, by its relation to the query.

  Exclusive, in this order: the seed itself (a replay); a track in the
  history (a return to it); the seed's album; the seed's artist; anything
  else. They separate what a retriever remembers from what it generalises.
  """
  seed, target = test[schema.SEED_ITEM], test[schema.TARGET_ITEM]
  in_history = (test[schema.HISTORY_ITEMS] == target[:, np.newaxis]).any(1)
  album, artist = catalogue.item_album, catalogue.item_artist
  # Index 0 is "no album/artist": not a shared one.
  same_album = (album[target] == album[seed]) & (album[target] > 0)
  same_artist = (artist[target] == artist[seed]) & (artist[target] > 0)
  kinds = {"replay of the seed": target == seed}
  left = ~kinds["replay of the seed"]
  for name, mask in (("in the history", in_history),
                     ("seed's album", same_album),
                     ("seed's artist", same_artist)):
    kinds[name] = left & mask
    left &= ~mask
  kinds["other"] = left
  return kinds


def recall_by_target_kind(kept_ranks: Dict[str, tuple],
                          kinds: Dict[str, np.ndarray],
                          ks: Sequence[int]) -> Dict[str, Dict]:
  """{"share": {kind: share of examples}, retriever: {kind: {recall@k}}}."""
  out = {"share": {kind: float(mask.mean()) if len(mask) else 0.0
                   for kind, mask in kinds.items()}}
  for name, (ranks, keep) in kept_ranks.items():
    out[name] = {kind: {f"recall@{k}": float(np.mean(ranks[mask & keep] <= k))
                        if np.any(mask & keep) else float("nan")
                        for k in ks}
                 for kind, mask in kinds.items()}
  return out
