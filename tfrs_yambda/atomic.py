"""Files that are complete or absent: written under a temporary name, renamed.

Every output a user or another process may read while it is being written
(results.json, prep reports, TF Serving's models.config, which the server
polls) goes through here, so a crash or a reader never sees half a file.
`os.replace` is atomic within one file system, so the temporary file lives
beside its destination.
"""

import json
import os
from typing import Any


def write_text(text: str, path: str) -> str:
  """Writes `text` to `path` atomically, creating its folder; returns `path`."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_json(value: Any, path: str) -> str:
  """Writes `value` as indented, key-sorted JSON atomically; returns `path`."""
  return write_text(json.dumps(value, indent=2, sort_keys=True), path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
