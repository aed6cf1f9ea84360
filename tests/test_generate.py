"""Tests of the Yambda-layout generator on the tiny size."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep import generate
from data_prep import yambda

SIZE = "tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """One tiny dataset, generated once for the module."""
  return generate.generate(str(tmp_path_factory.mktemp("gen")), SIZE, seed=0)


@pytest.fixture(scope="module")
def events(root):
  return pq.read_table(yambda.multi_event_path(root, SIZE))


@pytest.fixture(scope="module")
def oracle(root):
  return pq.read_table(generate.oracle_path(root, SIZE))


def _all_files(root):
  return {
      "multi_event": yambda.multi_event_path(root, SIZE),
      "embeddings": yambda.embeddings_path(root),
      "artist_mapping": yambda.artist_mapping_path(root),
      "album_mapping": yambda.album_mapping_path(root),
  }


def test_files_have_the_yambda_schemas(root):
  for kind, path in _all_files(root).items():
    assert os.path.exists(path), path
    assert pq.read_schema(path).equals(yambda.schemas()[kind]), kind
    yambda.check_schema(path, kind)
  assert pq.read_schema(generate.oracle_path(root, SIZE)).equals(
      generate.ORACLE_SCHEMA)
  assert not [f for f in os.listdir(root) if f.endswith(".tmp")]


def test_params_json(root):
  with open(generate.params_path(root, SIZE)) as f:
    params = json.load(f)
  assert params["seed"] == 0 and params["size"] == SIZE
  assert params["params"]["n_users"] == generate.SIZES[SIZE].n_users


def test_event_values(events):
  etype = np.asarray(events["event_type"].combine_chunks().dictionary_decode()
                     .to_pylist())
  assert set(etype) <= set(yambda.EVENT_TYPES)
  assert {"listen", "like", "dislike"} <= set(etype)
  listen = etype == "listen"
  ratio = events["played_ratio_pct"]
  length = events["track_length_seconds"]
  # Null exactly on the rows that are not listens.
  np.testing.assert_array_equal(ratio.is_null().to_numpy(), ~listen)
  np.testing.assert_array_equal(length.is_null().to_numpy(), ~listen)
  r = ratio.to_numpy(zero_copy_only=False)[listen]
  assert (r > 100).any() and (r < 30).any()
  assert set(np.unique(events["is_organic"].to_numpy())) == {0, 1}
  ts = events["timestamp"].to_numpy()
  assert ts.max() < generate.SIZES[SIZE].days * generate.DAY


def test_rows_sorted_and_listens_unique(events):
  uid = events["uid"].to_numpy().astype(np.int64)
  ts = events["timestamp"].to_numpy().astype(np.int64)
  key = uid * (1 << 32) + ts
  assert np.all(np.diff(key) >= 0)
  listen = events["played_ratio_pct"].is_valid().to_numpy()
  assert len(np.unique(key[listen])) == listen.sum()


def test_ids_are_sparse(events):
  uid = np.unique(events["uid"].to_numpy())
  items = np.unique(events["item_id"].to_numpy())
  assert uid.max() >= 2 * len(uid) and items.max() >= 2 * len(items)


def test_some_items_lack_metadata(root):
  n_items = generate.SIZES[SIZE].n_items
  emb = pq.read_table(yambda.embeddings_path(root))
  assert 0.7 * n_items < emb.num_rows < n_items
  widths = {len(x) for x in emb["normalized_embed"].to_pylist()[:50]}
  assert widths == {generate.SIZES[SIZE].embed_dim}
  art = pq.read_table(yambda.artist_mapping_path(root))
  alb = pq.read_table(yambda.album_mapping_path(root))
  assert len(np.unique(art["item_id"].to_numpy())) < n_items
  assert len(np.unique(alb["item_id"].to_numpy())) < n_items
  # Some tracks have two artists.
  assert art.num_rows > len(np.unique(art["item_id"].to_numpy()))


def test_oracle_ranks(oracle, events):
  n_items = generate.SIZES[SIZE].n_items
  ranks = oracle["oracle_rank"].to_numpy()
  prob = oracle["oracle_prob"].to_numpy()
  assert len(ranks) > 0
  assert ranks.min() >= 1 and ranks.max() <= n_items
  assert np.all((prob > 0) & (prob <= 1))
  rec = generate.oracle_recall(ranks)
  assert rec["recall@10"] <= rec["recall@100"] <= rec["recall@500"]
  assert rec["recall@100"] > 0.3
  # Every oracle row is a listen event (joinable on uid, timestamp, item_id).
  listen = events.filter(events["played_ratio_pct"].is_valid())
  keys = set(zip(listen["uid"].to_pylist(), listen["timestamp"].to_pylist(),
                 listen["item_id"].to_pylist()))
  okeys = list(zip(oracle["uid"].to_pylist(), oracle["timestamp"].to_pylist(),
                   oracle["item_id"].to_pylist()))
  assert all(k in keys for k in okeys)
  days = generate.SIZES[SIZE].days
  start = (days - generate.SIZES[SIZE].oracle_days) * generate.DAY
  in_window = listen["timestamp"].to_numpy() >= start
  assert in_window.sum() == oracle.num_rows


def test_oracle_recall_values():
  rec = generate.oracle_recall(np.array([1, 5, 50, 200, 1000]), ks=(10, 100))
  assert rec == {"recall@10": 0.4, "recall@100": 0.6}


def test_same_seed_same_files(root, tmp_path):
  again = generate.generate(str(tmp_path), SIZE, seed=0)
  files = list(_all_files(root).values()) + [generate.oracle_path(root, SIZE)]
  for path in files:
    other = os.path.join(again, os.path.relpath(path, root))
    with open(path, "rb") as a, open(other, "rb") as b:
      assert a.read() == b.read(), path
