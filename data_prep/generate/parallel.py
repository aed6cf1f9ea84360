"""Runs streams of jobs in a pool of forked processes, handing each stream's
results over in its order.

The world is built before the pool forks, so the workers share it
copy-on-write instead of each building or unpickling it; a job is sent as
its index. Each stream's results come back in that stream's order to the
main process (which writes them to that stream's files), so the files do
not depend on the number of workers, provided every job draws from its own
random stream (`SizeParams.independent_chunk_streams`). Jobs start in the
order given (the long ones first keeps the workers busy to the end), and at
most `workers + 2` are in flight: a slow job holds back at most that many
finished results, which bounds their memory and spill files.
"""

import multiprocessing
import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

Job = Callable[[], Any]
Stream = Tuple[Sequence[Job], Callable[[Any], None]]

# The running pool's jobs: set before it forks, so the workers inherit them
# with everything they refer to.
_JOBS: List[Job] = []

# How long to wait on one job before looking at the others' results.
_POLL_SECONDS = 0.05


def default_workers() -> int:
  """Every core this process may run on."""
  return len(os.sched_getaffinity(0))


def _run_job(index: int) -> Any:
  return _JOBS[index]()


def run_in_order(streams: Sequence[Stream], workers: int) -> None:
  """Runs every stream's jobs and consumes each stream's results in order.

  Args:
    streams: (jobs, consume) pairs: callables without arguments, and what
      is called in this process with each of their results, in order.
    workers: processes; 1 runs every job here, stream after stream.
  """
  global _JOBS
  if workers <= 1:
    for jobs, consume in streams:
      for job in jobs:
        consume(job())
    return
  order = [(s, j) for s, (jobs, _) in enumerate(streams)
           for j in range(len(jobs))]
  _JOBS = [streams[s][0][j] for s, j in order]
  heads = [0] * len(streams)  # each stream's next result to consume
  started: Dict[Tuple[int, int], Any] = {}
  try:
    with multiprocessing.get_context("fork").Pool(workers) as pool:
      n_started = 0
      while n_started < len(order) or started:
        while n_started < len(order) and len(started) < workers + 2:
          started[order[n_started]] = pool.apply_async(_run_job,
                                                       (n_started,))
          n_started += 1
        ready = [(s, heads[s]) for s in range(len(streams))
                 if (s, heads[s]) in started and
                 started[(s, heads[s])].ready()]
        if not ready:
          next(iter(started.values())).wait(_POLL_SECONDS)
          continue
        for key in ready:
          s, _ = key
          streams[s][1](started.pop(key).get())
          heads[s] += 1
  finally:
    _JOBS = []
