"""A vectorised categorical draw, shared by the world and the sampler."""

import numpy as np


def choose(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
  """Draws one column per row, proportional to the row's weights.

  Args:
    rng: the random stream; draws one uniform per row.
    weights: (rows, columns) non-negative float weights, each row with
      some > 0.

  Returns:
    (rows,) column indices, never one of weight 0.
  """
  rows, cols = weights.shape
  # np.cumsum(weights, 1) transposed: the same additions in the same order,
  # a whole column at a time (cumsum and reductions along rows of a few
  # columns loop per row, several times slower).
  c = np.empty((cols, rows), weights.dtype)
  if cols:
    c[0] = weights[:, 0]
  for j in range(1, cols):
    np.add(c[j - 1], weights[:, j], out=c[j])
  u = rng.random(rows) * c[-1]
  idx = np.count_nonzero(c <= u, axis=0)
  # Below the last column, the first sum above u follows a weight > 0. Past
  # it (should float rounding make u the total), the last column of weight
  # > 0.
  beyond = np.nonzero(idx == cols)[0]
  if len(beyond):
    w = weights[beyond]
    idx[beyond] = cols - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
  return idx
