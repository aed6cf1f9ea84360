"""A fixed, seeded sample of a window's examples, and its 95% intervals.

Scoring every example of a day against millions of candidates takes hours on
a few cores, so evaluation can score a sample of n of the window's examples
instead (--eval_examples). The sample
  * is the same for every retriever (the model, the baselines, the oracle)
    and every consumer (the epoch's and ItemKNN's choice, the final scores):
    it is drawn once, where the window's examples are loaded;
  * is the same in every run, whatever order the records are read in: an
    example is kept when its key, a seeded 64-bit hash of (user, timestamp,
    target), is among the n smallest keys of the window; the n smallest of
    such keys are a simple random sample without replacement;
  * is drawn while the examples stream in, so at most about 2n of them and
    a batch (and the user and target of every example, for the Yambda
    protocol, which asks every user) are held at once.

Each figure of a sample comes with a 95% interval for the value on all of
the window's examples (`rank_intervals`): Recall@k, a share of hits, has the
Wilson interval; NDCG@k and MRR, means of values in [0, 1], the normal
interval from the sample's standard deviation; the weighted metrics, ratios
of weighted sums, the normal interval from the linearised standard error of
the weighted mean. All apply the finite population correction of sampling n
of N without replacement, so an interval shrinks to its point as n nears N.
"""

import contextlib
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from tfrs_yambda import schema

# The sample's seed: fixed, so that every run scores the same examples.
SEED = 0
# The standard normal's 97.5% quantile.
Z_95 = 1.959963984540054
# A metric's interval is stored under its name + this suffix.
CI_SUFFIX = "_ci95"
# The features an example's key hashes.
KEY_FEATURES = (schema.USER_ID, schema.TIMESTAMP, schema.TARGET_ITEM)


class WindowExamples(dict):
  """A window's examples, {feature: array, one row each}, and their origin.

  A dict, as every consumer of examples reads them, that also says whether
  and how they were sampled.

  Attributes:
    window_examples: the number of examples in the window.
    seed: the sample's seed; None when every example is kept.
    population: user ids and targets of every example of the window (the
      examples themselves when they are all kept).
    load_seconds: the seconds it took to read them (None: not measured).
  """

  def __init__(self, rows: Dict[str, np.ndarray],
               window_examples: Optional[int] = None,
               seed: Optional[int] = None,
               population: Optional[Dict[str, np.ndarray]] = None,
               load_seconds: Optional[float] = None):
    super().__init__(rows)
    self.window_examples = (num_rows(rows) if window_examples is None
                            else int(window_examples))
    self.seed = seed
    self.population = self if population is None else population
    self.load_seconds = load_seconds

  @property
  def sampled(self) -> bool:
    return self.seed is not None

  def description(self) -> Dict:
    """What results.json records of the examples scored."""
    return {"sampled": self.sampled, "examples": num_rows(self),
            "window_examples": self.window_examples, "seed": self.seed}


def num_rows(examples: Dict[str, np.ndarray]) -> int:
  """The number of examples in a {feature: array} dict."""
  return len(examples[schema.TARGET_ITEM]) if examples else 0


def describe(examples: Dict[str, np.ndarray]) -> Dict:
  """`WindowExamples.description`; plain dicts count as every example."""
  if isinstance(examples, WindowExamples):
    return examples.description()
  return WindowExamples(examples).description()


def population(examples: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Every example of the window (user ids and targets at least), even when
  `examples` is a sample of them."""
  return getattr(examples, "population", examples)


def sampling_fraction(examples: Dict[str, np.ndarray]) -> float:
  """n / N: the share of the window's examples in `examples` (1 if all)."""
  described = describe(examples)
  return described["examples"] / max(described["window_examples"], 1)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijection of uint64 that scrambles all bits."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def sample_keys(examples: Dict[str, np.ndarray], seed: int = SEED
                ) -> np.ndarray:
  """Each example's seeded 64-bit key, uint64 [examples].

  A function of the example's user, timestamp and target alone, so the same
  example has the same key in any batch, order or run.
  """
  key = _mix(np.full(num_rows(examples), seed, np.uint64) +
             np.uint64(0x9E3779B97F4A7C15))
  for feature in KEY_FEATURES:
    key = _mix(key ^ np.asarray(examples[feature]).astype(np.uint64))
  return key


def _smallest(parts: List[Dict[str, np.ndarray]], n: int
              ) -> Dict[str, np.ndarray]:
  """The n rows of `parts` with the smallest keys (ties: smaller seed item,
  then the earlier read; equal keys are the same user, time and target)."""
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.lexsort((rows["_arrival"], rows[schema.SEED_ITEM],
                      rows["_key"]))[:n]
  return {k: v[order] for k, v in rows.items()}


def draw(batches: Iterable[Dict[str, np.ndarray]], n: int,
         seed: int = SEED, features: Sequence[str] = ()) -> WindowExamples:
  """The n examples of smallest `sample_keys` among all of `batches`.

  Args:
    batches: the window's examples, {feature: array} per batch; the features
      include `KEY_FEATURES` and `schema.SEED_ITEM`.
    n: the sample size (> 0).
    seed: the keys' seed.
    features: the (empty) features of the result when there is no batch.

  Returns:
    The sample, in (user, timestamp, target) order, whatever order the
    batches came in; when the window holds at most n examples, all of them in
    the order read, unsampled.
  """
  if n <= 0:
    raise ValueError(f"The sample size must be positive, not {n}.")
  held, pending, pending_rows, total = [], [], 0, 0
  users, targets = [], []
  for batch in batches:
    rows = num_rows(batch)
    users.append(np.asarray(batch[schema.USER_ID]))
    targets.append(np.asarray(batch[schema.TARGET_ITEM]))
    pending.append({**batch, "_key": sample_keys(batch, seed),
                    "_arrival": np.arange(total, total + rows)})
    total += rows
    pending_rows += rows
    # Each merge sorts at most 2n rows (plus a batch) and drops at least
    # half of them: O(N log n) in all, never holding the window.
    if pending_rows >= n:
      held, pending, pending_rows = [_smallest(held + pending, n)], [], 0
  if pending:
    held = [_smallest(held + pending, n)]
  if not held:
    return WindowExamples({k: np.zeros([0]) for k in features}, 0)
  kept = held[0]
  if total <= n:
    order = np.argsort(kept["_arrival"])
    return WindowExamples(
        {k: v[order] for k, v in kept.items() if not k.startswith("_")})
  order = np.lexsort((kept["_arrival"], kept[schema.SEED_ITEM],
                      kept[schema.TARGET_ITEM], kept[schema.TIMESTAMP],
                      kept[schema.USER_ID]))
  return WindowExamples(
      {k: v[order] for k, v in kept.items() if not k.startswith("_")},
      total, seed, {schema.USER_ID: np.concatenate(users),
                    schema.TARGET_ITEM: np.concatenate(targets)})


def wilson_interval(hits: float, n: float, fraction: float = 0.0
                    ) -> List[float]:
  """The 95% Wilson interval of a share `hits` / `n` of a sample.

  Args:
    hits: the successes (a float count, e.g. a share times n).
    n: the sample size.
    fraction: n / N, the share of the population sampled (without
      replacement); the interval is Wilson's for the effective sample size
      n / (1 - fraction).

  Returns:
    [low, high]; [nan, nan] for an empty sample.
  """
  if n <= 0:
    return [float("nan")] * 2
  p = hits / n
  if fraction >= 1.0:
    return [float(p), float(p)]
  n_eff = n / (1.0 - fraction)
  z2 = Z_95 ** 2
  denominator = 1.0 + z2 / n_eff
  centre = (p + z2 / (2.0 * n_eff)) / denominator
  half = Z_95 / denominator * np.sqrt(p * (1.0 - p) / n_eff +
                                      z2 / (4.0 * n_eff ** 2))
  # No hit (or no miss) puts that end at 0 (1), exactly, not a rounding off.
  return [0.0 if hits <= 0 else float(max(centre - half, 0.0)),
          1.0 if hits >= n else float(min(centre + half, 1.0))]


def mean_interval(values: np.ndarray, weights: Optional[np.ndarray] = None,
                  fraction: float = 0.0) -> List[float]:
  """The normal 95% interval of a (weighted) mean of a sample's values.

  With weights the mean is sum(w v) / sum(w), and its standard error the
  linearised one of that ratio:
  sqrt((1 - f) n / (n - 1) sum(w^2 (v - mean)^2)) / sum(w),
  which is s / sqrt(n) times sqrt(1 - f) when every weight is 1. When every
  value is the same (no hit at all, say), that interval would be a point:
  values in [0, 1] then get the Wilson interval of their mean, whose
  variance mean (1 - mean) bounds theirs, at Kish's effective sample size.

  Returns:
    [low, high]; [nan, nan] with fewer than two values.
  """
  values = np.asarray(values, np.float64)
  weights = (np.ones_like(values) if weights is None
             else np.asarray(weights, np.float64))
  n, total = len(values), weights.sum()
  if n < 2 or total <= 0:
    return [float("nan")] * 2
  mean = float(np.sum(values * weights) / total)
  spread = np.sum((weights * (values - mean)) ** 2)
  if spread == 0 and 0.0 <= mean <= 1.0:
    n_eff = total ** 2 / np.sum(weights ** 2)
    return wilson_interval(mean * n_eff, n_eff, fraction)
  se = np.sqrt(max(1.0 - fraction, 0.0) * n / (n - 1) * spread) / total
  return [mean - Z_95 * float(se), mean + Z_95 * float(se)]


def rank_intervals(ranks: np.ndarray, ks: Sequence[int],
                   weights: Optional[np.ndarray] = None,
                   fraction: float = 0.0) -> Dict[str, List[float]]:
  """95% intervals of `metrics.rank_metrics`' values on a sample's ranks.

  Args:
    ranks: the sample's 1-based ranks.
    ks: the cut-offs.
    weights: per-example weights (the weighted metrics), or None.
    fraction: the share of the window's examples in the sample.

  Returns:
    {"recall@k_ci95", "ndcg@k_ci95" for each k, "mrr_ci95": [low, high]}.
  """
  ranks = np.asarray(ranks, np.float64)
  out = {}
  for k in ks:
    hit = ranks <= k
    out[f"recall@{k}"] = (
        wilson_interval(float(hit.sum()), len(ranks), fraction)
        if weights is None else mean_interval(hit, weights, fraction))
    out[f"ndcg@{k}"] = mean_interval(
        np.where(hit, 1.0 / np.log2(1.0 + ranks), 0.0), weights, fraction)
  out["mrr"] = mean_interval(1.0 / ranks, weights, fraction)
  return {name + CI_SUFFIX: value for name, value in out.items()}


def row_intervals(ranks: np.ndarray, cold_ranks: np.ndarray,
                  weights: np.ndarray, ks: Sequence[int],
                  fraction: float) -> Dict[str, List[float]]:
  """`rank_intervals` of one retriever's row: its metrics, those of its cold
  targets ("cold_target_" + name) and its weighted ones ("weighted_")."""
  out = rank_intervals(ranks, ks, fraction=fraction)
  for prefix, values in (
      ("cold_target_", rank_intervals(cold_ranks, ks, fraction=fraction)),
      ("weighted_", rank_intervals(ranks, ks, weights, fraction))):
    out.update({prefix + name: value for name, value in values.items()})
  return out


class Timings(dict):
  """Seconds per part of an evaluation, {part: seconds}, for results.json."""

  @contextlib.contextmanager
  def part(self, name: str):
    """Adds the seconds the `with` block takes to `name`'s."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self[name] = round(self.get(name, 0.0) + time.perf_counter() - start,
                         3)
