"""The generator's oracle: what a retriever that knew the truth would rank.

A generated dataset (`data_prep.generate`) comes with
<root>/generator/<size>/oracle.parquet: for each listen, the rank of its item
under the distribution the generator drew the next listen from
("oracle_rank"), under the distribution of the next positive listen
("positive_oracle_rank", the ceiling of what evaluation scores), and which
mixture component drew it ("component"). Evaluation scores the oracle beside
the model as the ceiling a retriever can expect to reach: how much of a miss
is the data's own randomness. Real Yambda data has no oracle.
"""

import os
from typing import Dict, Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import schema


def oracle_path(catalogue: catalogue_lib.Catalogue) -> Optional[str]:
  """The generator's oracle file for this data, if the data was generated."""
  source = catalogue.metadata.get("source", "")
  size_dir = os.path.dirname(source)
  root = os.path.dirname(os.path.dirname(size_dir))
  path = os.path.join(root, "generator", os.path.basename(size_dir),
                      "oracle.parquet")
  return path if os.path.exists(path) else None


def oracle_ranks(path: str, catalogue: catalogue_lib.Catalogue,
                 test: Dict[str, np.ndarray]) -> pd.DataFrame:
  """The oracle's view of each test example, joined on (user, time, item).

  Args:
    path: the oracle file (`oracle_path`).
    catalogue: the catalogue the examples' indices refer to.
    test: the examples (user id, timestamp and target of each).

  Returns:
    One row per example: the oracle's rank of its target ("oracle_rank", -1
    where the oracle has none), its rank under the generator's
    next-positive-listen distribution, the ceiling of the evaluated target
    ("positive_oracle_rank", -1 where none: not computed for that listen, or
    the file predates it) and the generator's mixture component it was drawn
    from ("component", "" where none, or where the file predates it).
  """
  names = pq.read_schema(path).names
  optional = [c for c in ("component", "positive_oracle_rank") if c in names]
  oracle = pd.read_parquet(
      path, columns=["uid", "timestamp", "item_id", "oracle_rank"] + optional)
  oracle["component"] = (oracle["component"].astype(str)
                         if "component" in names else "")
  if "positive_oracle_rank" not in names:
    oracle["positive_oracle_rank"] = -1
  keys = pd.DataFrame({
      "uid": test[schema.USER_ID].astype(np.int64),
      "timestamp": test[schema.TIMESTAMP].astype(np.int64),
      "item_id": catalogue.item_ids[test[schema.TARGET_ITEM]],
  })
  oracle = oracle.astype({"uid": np.int64, "timestamp": np.int64,
                          "item_id": np.int64})
  joined = keys.merge(oracle, how="left", on=["uid", "timestamp", "item_id"])
  return pd.DataFrame({
      "oracle_rank": joined["oracle_rank"].fillna(-1).to_numpy(np.int64),
      "positive_oracle_rank": joined["positive_oracle_rank"].fillna(-1)
                              .to_numpy(np.int64),
      "component": joined["component"].fillna("").to_numpy(str)})
