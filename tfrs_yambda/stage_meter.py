"""What each stage of the main job costs: wall time, peak memory, disk.

`StageMeter` measures the stages of one run (generate, prep, train,
evaluate, export) as they happen, for `eval/results.json`'s "stages" and the
benchmark tables: a user with the real files needs to know whether each
stage fits their machine before they start it.

Peak memory is the resident memory of this process and all its descendants
(the prep's and the generator's worker pools), sampled every
`interval_seconds` by a thread, and this process's own high-water mark,
reset at each stage's start where Linux allows it (/proc/self/clear_refs),
so that a spike between two samples is still counted. Disk is the bytes
under the stage's output folders once it is done.

A stage starts from what is live: `release_freed_memory` first hands the
earlier stages' freed heap back to the system.
"""

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from typing import Dict, Iterator, Optional, Sequence


def tree_rss_bytes(pid: Optional[int] = None) -> int:
  """Resident bytes of a process and all its descendants (0 if gone)."""
  total = 0
  stack = [pid or os.getpid()]
  while stack:
    p = stack.pop()
    try:
      with open(f"/proc/{p}/status") as f:
        for line in f:
          if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
      for task in os.listdir(f"/proc/{p}/task"):
        with open(f"/proc/{p}/task/{task}/children") as f:
          stack.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
      continue  # exited while we looked
  return total


def _own_peak_bytes() -> int:
  """This process's resident high-water mark (VmHWM), 0 where unknown."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _reset_own_peak() -> None:
  """Resets VmHWM to the current RSS (Linux >= 4.0; a no-op elsewhere)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def release_freed_memory() -> bool:
  """Returns freed heap pages to the system (glibc's malloc_trim).

  TensorFlow's CPU tensors and NumPy's small arrays come from malloc, which
  keeps freed blocks in its heap for later calls; after training on the
  500m rehearsal (a bounded run, in a throwaway probe) that was 2.0 GiB of
  resident memory that nothing used, on top of every later stage's peak.

  Returns:
    Whether this C library could release (False where it has no
    malloc_trim: not glibc).
  """
  trim = getattr(_libc(), "malloc_trim", None)
  if trim is None:
    return False
  trim(0)
  return True


def _libc():
  try:
    return ctypes.CDLL(ctypes.util.find_library("c"))
  except OSError:
    return None


def disk_bytes(paths: Sequence[str]) -> int:
  """Bytes of the files under these folders (or files); missing ones: 0."""
  total = 0
  for path in paths:
    if os.path.isfile(path):
      total += os.path.getsize(path)
      continue
    for folder, _, files in os.walk(path):
      for name in files:
        try:
          total += os.path.getsize(os.path.join(folder, name))
        except OSError:
          continue  # removed while we walked
  return total


# The main job's stages, in the order it runs them.
STAGES = ("generate", "prep", "train", "evaluate", "projector", "export")


class StageMeter:
  """Measures named stages; `stages` holds one row per finished stage.

  Usage:
    meter = StageMeter()
    with meter.stage("prep", outputs=[prepared_dir]):
      ...
    meter.stages  # {"prep": {"wall_seconds": ..., "peak_rss_gib": ...,
                  #           "disk_gib": ...}}

  A stage that runs twice (a second training stage) adds up its wall time
  and keeps the larger peak.
  """

  def __init__(self, interval_seconds: float = 0.2):
    self.interval_seconds = interval_seconds
    self.stages: Dict[str, Dict[str, float]] = {}

  @contextlib.contextmanager
  def stage(self, name: str, outputs: Sequence[str] = ()) -> Iterator[None]:
    """Measures the body as stage `name`; `outputs`: its folders."""
    release_freed_memory()
    _reset_own_peak()
    peak = [tree_rss_bytes()]
    done = threading.Event()

    def sample():
      while not done.wait(self.interval_seconds):
        peak[0] = max(peak[0], tree_rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    try:
      yield
    finally:
      wall = time.time() - started
      done.set()
      sampler.join()
      peak_bytes = max(peak[0], tree_rss_bytes(), _own_peak_bytes())
      row = self.stages.setdefault(name, {"wall_seconds": 0.0,
                                          "peak_rss_gib": 0.0})
      row["wall_seconds"] = round(row["wall_seconds"] + wall, 1)
      row["peak_rss_gib"] = round(max(row["peak_rss_gib"],
                                      peak_bytes / 2**30), 2)
      if outputs:
        row["disk_gib"] = round(disk_bytes(outputs) / 2**30, 3)

  def table(self) -> str:
    """The stages as a Markdown table, in the main job's order (`STAGES`;
    others after, as they ran): results.json stores them sorted by name."""
    lines = ["| stage | wall | peak RSS (GiB) | disk (GiB) |",
             "|---|---:|---:|---:|"]
    order = {name: i for i, name in enumerate(STAGES)}
    for name, row in sorted(self.stages.items(),
                            key=lambda item: order.get(item[0], len(order))):
      # Whole seconds first: 539.8 s is 9 min 0 s, not 8 min 60 s.
      minutes, seconds = divmod(round(row["wall_seconds"]), 60)
      disk = row.get("disk_gib")
      lines.append(f"| {name} | {minutes} min {seconds} s | "
                   f"{row['peak_rss_gib']:.2f} | "
                   f"{'' if disk is None else f'{disk:.2f}'} |")
    return "\n".join(lines)
