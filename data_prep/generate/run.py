"""One generator run: `generate()` builds the world, simulates it chunk by
chunk, ranks the oracle window and writes every file and the summary.

Sizes with `independent_chunk_streams` run their chunks (and the blocks of
their metadata files) in a pool of processes (`parallel`); the others run
here, one chunk after another, on the streams the published files came
from.
"""

import contextlib
import functools
import json
import os
import sys
import time
from typing import Dict, NamedTuple, Optional, Union

import numpy as np
import pyarrow as pa

from data_prep import yambda
from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import metadata
from data_prep.generate import oracle as oracle_lib
from data_prep.generate import parallel
from data_prep.generate import positive_oracle
from data_prep.generate import simulation
from data_prep.generate import sizes
from data_prep.generate import world as world_lib
from data_prep.generate import writers

# Most-popular baselines of the summary: the top this many items.
_MOSTPOP_K = 100
# Users whose events are assembled together in a parallel run's chunk.
_BLOCK_USERS = 512


def _log(msg: str) -> None:
  print(f"[generate] {msg}", file=sys.stderr, flush=True)


class _ChunkResult(NamedTuple):
  """What the main process needs of a simulated chunk of users."""
  # multi_event rows, or the Arrow stream file that holds them (parallel
  # runs: a worker writes its chunk there rather than sending it through a
  # pipe, and the main process copies it into the parquet file).
  events: Union[pa.Table, str]
  oracle: pa.Table   # `writers.oracle_table`
  n_rows: int
  n_listens: int
  pop_all: np.ndarray   # training listens per item
  pop_week: np.ndarray  # those of the week before the test day
  seconds: float        # the chunk's time, of which
  oracle_seconds: float  # the oracle's
  cpu_seconds: float    # its processor time (the time without contention)


def _chunk(world: world_lib.World, simulation_rng: np.random.Generator,
           oracle_rng: np.random.Generator, lo: int, hi: int,
           dense: Optional[positive_oracle.DenseContext] = None,
           spill: Optional[str] = None) -> _ChunkResult:
  """Simulates users [lo, hi), ranks their oracle window, makes the tables.

  With `spill` (a path), the events are assembled per block of users and
  written to that Arrow stream file, which bounds the chunk's memory.
  """
  t0, cpu0 = time.time(), time.process_time()
  size = world.size
  test_start = (size.days - 1) * sizes.DAY
  n_items = world.catalogue.n_items
  stats = dict(n_rows=0, n_listens=0, pop_all=np.zeros(n_items, np.int64),
               pop_week=np.zeros(n_items, np.int64))

  def count(events: simulation.ChunkEvents) -> None:
    listens = events.event_type == 0
    train = listens & (events.timestamp < test_start)
    recent = train & (events.timestamp >= test_start - 7 * sizes.DAY)
    stats["n_rows"] += len(events.timestamp)
    stats["n_listens"] += int(listens.sum())
    stats["pop_all"] += np.bincount(events.item[train], minlength=n_items)
    stats["pop_week"] += np.bincount(events.item[recent], minlength=n_items)

  if spill is None:
    events, snapshots = simulation.simulate_chunk(simulation_rng, world, lo,
                                                  hi)
    table = writers.event_table(world, events, lo)
    count(events)
  else:
    blocks, snapshots = simulation.simulate_chunk_blocks(
        simulation_rng, world, lo, hi, _BLOCK_USERS)
    with pa.OSFile(spill, "wb") as sink, pa.ipc.new_stream(
        sink, yambda.MULTI_EVENT_SCHEMA) as stream:
      for events in blocks:
        stream.write_table(writers.event_table(world, events, lo))
        count(events)
    table = spill
  t_oracle = time.time()
  share = (hi - lo) / size.n_users
  if size.oracle_sample:
    quota = int(size.oracle_sample * share)
    result = oracle_lib.sampled_oracle(
        oracle_rng, world, snapshots, quota,
        int(size.positive_oracle_sample * share)
        if size.positive_oracle_sample else quota, dense)
  else:
    sample = None
    if size.positive_oracle_sample:
      quota = size.positive_oracle_sample * (hi - lo) // size.n_users
      sample = positive_oracle.positive_sample(oracle_rng, snapshots, quota)
    result = oracle_lib.oracle(world, snapshots, sample)
  return _ChunkResult(
      table, writers.oracle_table(world, snapshots, result), stats["n_rows"],
      stats["n_listens"], stats["pop_all"].astype(np.int32),
      stats["pop_week"].astype(np.int32), time.time() - t0,
      time.time() - t_oracle, time.process_time() - cpu0)


def _write_events(writer: writers.AtomicParquetWriter,
                  events: Union[pa.Table, str]) -> None:
  """Appends a chunk's events (a table, or a spill file it then removes)."""
  if isinstance(events, pa.Table):
    writer.write(events)
    return
  with pa.OSFile(events) as source:
    for batch in pa.ipc.open_stream(source):
      writer.write(pa.Table.from_batches([batch]))
  os.remove(events)


def generate(output_dir: str, size: str = "demo", seed: int = 0,
             workers: Optional[int] = None) -> str:
  """Writes the dataset of the given size into output_dir.

  Logs progress to stderr and prints the summary (also in params.json) as
  one JSON line to stdout.

  Args:
    output_dir: the dataset's folder (the Yambda layout starts there).
    size: a key of SIZES.
    seed: the seed; the same size and seed give the same bytes.
    workers: processes for sizes with independent chunk streams (default:
      every core); the bytes do not depend on it.

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

  n_users = size_params.n_users
  chunks = [(lo, min(n_users, lo + size_params.chunk_users))
            for lo in range(0, n_users, size_params.chunk_users)]
  if size_params.independent_chunk_streams:
    # The dense pass's latents of every item, once for all chunks.
    dense = positive_oracle.dense_context(
        world, np.array([len(world.timeline.n_released) - 1]))
    spill = yambda.multi_event_path(output_dir, size) + ".chunk{}.tmp"
    jobs = [functools.partial(_chunk, world, s, o, lo, hi, dense,
                              spill.format(i))
            for i, ((lo, hi), s, o) in enumerate(zip(
                chunks, simulation_rng.spawn(len(chunks)),
                oracle_rng.spawn(len(chunks))))]
    workers = parallel.default_workers() if workers is None else workers
  else:
    jobs = [functools.partial(_chunk, world, simulation_rng, oracle_rng, lo,
                              hi) for lo, hi in chunks]
    workers = 1
  meta_jobs = []
  if size_params.metadata_only_items:
    meta_jobs = metadata.block_jobs(
        metadata.plan(embeddings_rng, mappings_rng, world), world, output_dir)
  else:
    writers.write_embeddings(embeddings_rng, world, output_dir)
    writers.write_mappings(mappings_rng, catalogue, output_dir)

  end = size_params.days * sizes.DAY
  test_start = end - sizes.DAY
  # Training listens per item, for the most-popular baselines.
  totals = dict(pop_all=np.zeros(catalogue.n_items, np.int64),
                pop_week=np.zeros(catalogue.n_items, np.int64), n_rows=0,
                n_listens=0, n_users=0)
  oracle_tables = []
  with writers.AtomicParquetWriter(
      yambda.multi_event_path(output_dir, size),
      yambda.MULTI_EVENT_SCHEMA) as event_writer, metadata.Writers(
          output_dir) if meta_jobs else contextlib.nullcontext() as meta:

    def consume(result: _ChunkResult) -> None:
      _write_events(event_writer, result.events)
      oracle_tables.append(result.oracle)
      for key in ("pop_all", "pop_week", "n_rows", "n_listens"):
        totals[key] += getattr(result, key)
      totals["n_users"] += chunks[len(oracle_tables) - 1][1] - chunks[
          len(oracle_tables) - 1][0]
      _log(f"users {totals['n_users']}/{n_users}: {totals['n_rows']} rows "
           f"({totals['n_rows'] / (time.time() - t0):.0f} rows/s; chunk "
           f"{result.seconds:.1f}s, {result.cpu_seconds:.1f}s CPU, oracle "
           f"{result.oracle_seconds:.1f}s)")

    # The chunks first: the metadata's short blocks fill in at the end.
    streams = [(jobs, consume)]
    if meta_jobs:
      streams.append((meta_jobs, meta.write))
    parallel.run_in_order(streams, workers)
  metadata_counts = meta.counts if meta_jobs else {}

  oracle = pa.concat_tables(oracle_tables)
  oracle = oracle.sort_by([("uid", "ascending"), ("timestamp", "ascending")])
  positive = np.asarray(oracle["positive"])
  oracle = oracle.drop(["positive"])
  yambda.write_atomic(oracle, writers.oracle_path(output_dir, size))
  summary = _summary(catalogue, oracle, positive, totals["pop_all"],
                     totals["pop_week"], test_start)
  summary.update(n_rows=totals["n_rows"], n_listens=totals["n_listens"],
                 n_users=n_users, n_items=catalogue.n_items,
                 n_artists=catalogue.n_artists,
                 n_albums=len(catalogue.album_ids), timeline_seconds=end)
  summary.update(metadata_counts)
  writers.write_params(output_dir, size, seed, size_params, summary)
  _log(f"done in {time.time() - t0:.1f}s")
  print(json.dumps(summary), flush=True)
  return output_dir


def _summary(catalogue: catalogue_lib.Catalogue, oracle: pa.Table,
             positive: np.ndarray, pop_all: np.ndarray, pop_week: np.ndarray,
             test_start: int) -> Dict[str, float]:
  """Oracle and most-popular recall over the listens of the last day (the
  oracle's where it has ranks), and the positive oracle's over its positive
  listens (where it has ranks)."""
  last = np.asarray(oracle["timestamp"]) >= test_start
  ranks = np.asarray(oracle["oracle_rank"])[last]
  out = {f"oracle_{k}": round(v, 4)
         for k, v in oracle_lib.oracle_recall(ranks[ranks > 0]).items()}
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
