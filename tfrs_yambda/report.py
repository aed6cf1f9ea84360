"""The evaluation's results as text: the tables the main job prints.

Everything here reads the dicts that `tfrs_yambda.evaluate.evaluate` and
`tfrs_yambda.yambda_protocol.evaluate` return (and results.json stores) and
returns strings; nothing is computed that is not in them. A retriever without
a value in a column (the oracle has ranks but no top-k lists, so no
coverage) shows "-". A figure of a sampled evaluation shows the half-width
of its 95% interval, "0.5743 ± 0.0031" (results.json holds the interval's
bounds; Wilson's, for Recall@k, need not be symmetric).
"""

from typing import Dict, Sequence

from tfrs_yambda import eval_sample
from tfrs_yambda import evaluate


def format_table(results: Dict[str, Dict], ks: Sequence[int],
                 prefix: str = "", columns: Sequence[str] = None) -> str:
  """A text table of the retrievers' metrics, one row per retriever.

  Args:
    results: one window's results (their sections are skipped, see
      `evaluate.retrievers`), or {retriever: metrics}.
    ks: the cut-offs of the default columns.
    prefix: show the metrics named `prefix` + column, e.g. "cold_target_".
    columns: default Recall@k, NDCG@k and MRR.

  Returns:
    A header and one line per retriever, values to four decimals (with the
    half-width of their 95% interval where the row has one).
  """
  columns = columns or ([f"recall@{k}" for k in ks] +
                        [f"ndcg@{k}" for k in ks] + ["mrr"])
  rows = evaluate.retrievers(results)
  with_intervals = any(prefix + c + eval_sample.CI_SUFFIX in row
                       for row in rows.values() for c in columns)
  width = max(17 if with_intervals else 11,
              max(len(c) for c in columns) + 2)
  lines = ["{:<20}".format("retriever") + "".join(
      f"{c:>{width}}" for c in columns)]
  for name, row in rows.items():
    cells = [_cell(row.get(prefix + c),
                   row.get(prefix + c + eval_sample.CI_SUFFIX))
             for c in columns]
    lines.append("{:<20}".format(name) + "".join(f"{c:>{width}}"
                                                 for c in cells))
  return "\n".join(lines)


def _cell(value, interval=None) -> str:
  """"0.5743", "0.5743 ± 0.0031" (the interval's half-width) or "-"."""
  if value is None:
    return "-"
  if interval is None:
    return f"{value:.4f}"
  return f"{value:.4f} ± {(interval[1] - interval[0]) / 2:.4f}"


def timings_line(results: Dict) -> str:
  """The seconds each part of a window's evaluation took, on one line."""
  parts = dict(results.get("timings", {}))
  protocol = results.get("yambda_protocol", {}).get("timings")
  if protocol:
    parts.setdefault("yambda_protocol", protocol["total"])
  return "Seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds
                                  in parts.items() if seconds is not None)


def target_kind_table(by_kind: Dict[str, Dict], k: int) -> str:
  """Recall@k of every retriever (columns) per kind of target (rows).

  Args:
    by_kind: `target_kinds.recall_by_target_kind`'s result.
    k: the cut-off shown.
  """
  names = [n for n in by_kind if n != "share"]
  lines = ["{:<22}{:>7}".format("target", "share") +
           "".join(f"{n[:18]:>20}" for n in names)]
  for kind, share in by_kind["share"].items():
    lines.append("{:<22}{:>7.3f}".format(kind, share) + "".join(
        f"{by_kind[n][kind][f'recall@{k}']:>20.4f}" for n in names))
  return "\n".join(lines)


def retrieved_table(results: Dict[str, Dict], ks: Sequence[int]) -> str:
  """Coverage@k and popularity@k of each retriever, then the test targets'."""
  table = format_table(
      results, ks, columns=[f"coverage@{k}" for k in ks] +
      [f"popularity@{k}" for k in ks])
  targets = results.get("test_targets")
  if targets:
    table += (f"\ntest targets: {targets['distinct_items']} distinct items "
              f"in {targets['examples']} examples (coverage "
              f"{targets['coverage']:.4f}), mean popularity percentile "
              f"{targets['popularity']:.4f}")
  return table


def protocol_table(protocol: Dict) -> str:
  """The Yambda protocol's table: Recall@k, NDCG@k, Coverage@k per retriever.

  Args:
    protocol: `yambda_protocol.evaluate`'s result.
  """
  ks = protocol["ks"]
  columns = [f"{m}@{k}" for m in ("recall", "ndcg", "coverage") for k in ks]
  return format_table(protocol["retrievers"], ks, columns=columns)


def window_report(results: Dict, ks: Sequence[int], window: str) -> str:
  """Every table of one window's evaluation, with what each one measures.

  Args:
    results: `evaluate.evaluate`'s result for the window, with the protocol's
      under "yambda_protocol" if it was scored.
    ks: the cut-offs of the tables.
    window: "validation" or "test", for the titles.

  Returns:
    The report, starting with an empty line (as printed between windows).
  """
  candidates = results["candidates"]
  sample = results.get("sample", {})
  parts = [
      f"\n=== {window.upper()} DAY ===\n" + (
          f"A seeded sample of {sample['examples']} of the "
          f"{sample['window_examples']} examples (seed {sample['seed']}): "
          "each figure ± the half-width of\nits 95% interval for all of "
          "them; coverage@k counts the sample's top-k lists only.\n"
          if sample.get("sampled") else "") + "Next-track retrieval over the "
      f"authors' catalogue ({candidates['authors']} items listened to "
      f"before the {window} day; {results['model']['examples']} examples, "
      f"{100 * results['test_targets']['not_candidates']:.1f}% of them "
      "first played inside it: misses for every retriever):",
      format_table(results, ks),
      f"\nTargets never seen in training "
      f"({results['model']['cold_target_examples']} examples), over the "
      f"service's catalogue ({candidates['service']} items):",
      format_table(results, ks, prefix="cold_target_"),
      "\nEach example counted at its weight (played ratio, likes): "
      "how well a retriever finds what users play through:",
      format_table(results, ks, prefix="weighted_"),
  ]
  # One cut-off for the per-kind tables: 100 if scored, else a middle one.
  k = 100 if 100 in ks else ks[len(ks) // 2]
  parts += [f"\nRecall@{k} by kind of target (what a retriever remembers and "
            "what it generalises):",
            target_kind_table(results["by_target_kind"], k)]
  if "by_component" in results:
    parts += [f"\nRecall@{k} by the generator's mixture component that drew "
              "the target (generated data only):",
              target_kind_table(results["by_component"], k)]
  parts += ["\nWhat each retriever retrieves: coverage@k (distinct items in "
            "all top-k lists / candidates)\nand popularity@k (mean "
            "training-count percentile of the top-k items; 1 = most played):",
            retrieved_table(results, ks)]
  protocol = results.get("yambda_protocol")
  if protocol:
    parts += [f"\nYambda protocol: {protocol['users']} users seen in "
              f"training, one query each from their state at the start of "
              f"the gap before the {window} day, "
              f"{protocol['mean_relevant_items']:.1f} relevant items on "
              f"average ({protocol['users_unseen_in_training']} users unseen "
              "in training left out):",
              protocol_table(protocol)]
  if "timings" in results:
    parts.append("\n" + timings_line(results))
  return "\n".join(parts)
