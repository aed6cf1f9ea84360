"""One generator run: `generate()` builds the world, simulates it chunk by
chunk, ranks the oracle window and writes every file and the summary."""

import json
import sys
import time
from typing import Dict

import numpy as np
import pyarrow as pa

from data_prep import yambda
from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import oracle as oracle_lib
from data_prep.generate import positive_oracle
from data_prep.generate import simulation
from data_prep.generate import sizes
from data_prep.generate import world as world_lib
from data_prep.generate import writers

# Most-popular baselines of the summary: the top this many items.
_MOSTPOP_K = 100


def _log(msg: str) -> None:
  print(f"[generate] {msg}", file=sys.stderr, flush=True)


def generate(output_dir: str, size: str = "demo", seed: int = 0) -> str:
  """Writes the dataset of the given size into output_dir.

  Logs progress to stderr and prints the summary (also in params.json) as
  one JSON line to stdout.

  Args:
    output_dir: the dataset's folder (the Yambda layout starts there).
    size: a key of SIZES.
    seed: the seed; the same size and seed give the same bytes.

  Returns:
    output_dir.

  Raises:
    ValueError: for an unknown size.
  """
  if size not in sizes.SIZES:
    raise ValueError(
        f"unknown size {size!r}; expected one of {list(sizes.SIZES)}")
  size_params = sizes.SIZES[size]
  t0 = time.time()
  # Children by index: adding the last one left the others' streams as they
  # were.
  (catalogue_rng, users_rng, simulation_rng, embeddings_rng, mappings_rng,
   oracle_rng) = np.random.default_rng(seed).spawn(6)
  world = world_lib.make_world(size_params, catalogue_rng, users_rng)
  catalogue = world.catalogue
  _log(f"{size}: catalogue of {catalogue.n_items} items, "
       f"{catalogue.n_artists} artists, {size_params.n_users} users "
       f"({time.time() - t0:.1f}s)")
  writers.write_embeddings(embeddings_rng, world, output_dir)
  writers.write_mappings(mappings_rng, catalogue, output_dir)

  end = size_params.days * sizes.DAY
  test_start = end - sizes.DAY
  # Training listens per item, for the most-popular baselines.
  pop_all = np.zeros(catalogue.n_items, np.int64)
  pop_week = np.zeros(catalogue.n_items, np.int64)
  oracle_tables = []
  n_rows = n_listens = 0
  n_users = size_params.n_users
  with writers.AtomicParquetWriter(
      yambda.multi_event_path(output_dir, size),
      yambda.MULTI_EVENT_SCHEMA) as event_writer:
    for lo in range(0, n_users, size_params.chunk_users):
      hi = min(n_users, lo + size_params.chunk_users)
      events, snapshots = simulation.simulate_chunk(simulation_rng, world,
                                                    lo, hi)
      event_writer.write(writers.event_table(world, events, lo))
      listens = events.event_type == 0
      n_rows += len(events.timestamp)
      n_listens += int(listens.sum())
      train = listens & (events.timestamp < test_start)
      pop_all += np.bincount(events.item[train], minlength=catalogue.n_items)
      recent = train & (events.timestamp >= test_start - 7 * sizes.DAY)
      pop_week += np.bincount(events.item[recent],
                              minlength=catalogue.n_items)
      sample = None
      if size_params.positive_oracle_sample:
        quota = size_params.positive_oracle_sample * (hi - lo) // n_users
        sample = positive_oracle.positive_sample(oracle_rng, snapshots, quota)
      result = oracle_lib.oracle(world, snapshots, sample)
      oracle_tables.append(writers.oracle_table(world, snapshots, result))
      _log(f"users {hi}/{n_users}: {n_rows} rows "
           f"({n_rows / (time.time() - t0):.0f} rows/s)")

  oracle = pa.concat_tables(oracle_tables)
  oracle = oracle.sort_by([("uid", "ascending"), ("timestamp", "ascending")])
  positive = np.asarray(oracle["positive"])
  oracle = oracle.drop(["positive"])
  yambda.write_atomic(oracle, writers.oracle_path(output_dir, size))
  summary = _summary(catalogue, oracle, positive, pop_all, pop_week,
                     test_start)
  summary.update(n_rows=n_rows, n_listens=n_listens, n_users=n_users,
                 n_items=catalogue.n_items, n_artists=catalogue.n_artists,
                 n_albums=len(catalogue.album_ids), timeline_seconds=end)
  writers.write_params(output_dir, size, seed, size_params, summary)
  _log(f"done in {time.time() - t0:.1f}s")
  print(json.dumps(summary), flush=True)
  return output_dir


def _summary(catalogue: catalogue_lib.Catalogue, oracle: pa.Table,
             positive: np.ndarray, pop_all: np.ndarray, pop_week: np.ndarray,
             test_start: int) -> Dict[str, float]:
  """Oracle and most-popular recall over the listens of the last day, and
  the positive oracle's over its positive listens (where it has ranks)."""
  last = np.asarray(oracle["timestamp"]) >= test_start
  ranks = np.asarray(oracle["oracle_rank"])[last]
  out = {f"oracle_{k}": round(v, 4)
         for k, v in oracle_lib.oracle_recall(ranks).items()}
  pos_ranks = np.asarray(oracle["positive_oracle_rank"])[last & positive]
  out.update({f"positive_oracle_{k}": round(v, 4) for k, v in
              oracle_lib.oracle_recall(pos_ranks[pos_ranks > 0]).items()})
  out["n_test_positive_listens"] = int(np.sum(last & positive))
  by_id = np.argsort(catalogue.item_ids)
  test_items = by_id[np.searchsorted(catalogue.item_ids[by_id],
                                     np.asarray(oracle["item_id"])[last])]
  for name, counts in (("mostpop_all", pop_all), ("mostpop_7d", pop_week)):
    top = np.argsort(-counts, kind="stable")[:_MOSTPOP_K]
    out[f"{name}_recall@{_MOSTPOP_K}"] = round(
        float(np.isin(test_items, top).mean())
        if len(test_items) else float("nan"), 4)
  out["n_test_listens"] = int(last.sum())
  out["test_items_unseen_in_train"] = round(
      float((pop_all[test_items] == 0).mean()) if len(test_items) else 0.0, 4)
  return out
