"""A vectorised categorical draw, shared by the world and the sampler."""

import numpy as np


def choose(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
  """Draws one column per row, proportional to the row's weights.

  Args:
    rng: the random stream; draws one uniform per row.
    weights: (rows, columns) non-negative weights, each row with some > 0.

  Returns:
    (rows,) column indices, never one of weight 0.
  """
  c = np.cumsum(weights, axis=1)
  u = rng.random(len(weights)) * c[:, -1]
  idx = (c <= u[:, None]).sum(1)
  # Float rounding must never land on a zero-weight slot.
  last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
  return np.minimum(idx, last)
