"""The generator's files: the Yambda-layout parquet files, the oracle and
params.json.

The events, embeddings and mappings have the exact schemas of a Yambda
download (`data_prep.yambda`); the oracle and params.json live under
`generator/<size>/`, where nothing of the real download goes. Every file is
written under a temporary name and renamed when complete.
"""

import dataclasses
import os
from typing import Any, Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import yambda
from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import components
from data_prep.generate import oracle as oracle_lib
from data_prep.generate import played_ratio
from data_prep.generate import simulation
from data_prep.generate import sizes
from data_prep.generate import world as world_lib
from tfrs_yambda import atomic

# Share of items with an audio embedding, and the embedding's noise.
_EMBEDDED_SHARE = 0.85
EMBEDDING_NOISE = 0.25
# Shares of items without artist/album mappings, and with a second artist.
_UNMAPPED_SHARE = 0.03
_SECOND_ARTIST_SHARE = 0.05


def oracle_path(root: str, size: str) -> str:
  """The oracle's parquet file of a generated dataset."""
  return os.path.join(root, "generator", size, "oracle.parquet")


def params_path(root: str, size: str) -> str:
  """The params.json of a generated dataset: size, seed, summary."""
  return os.path.join(root, "generator", size, "params.json")


ORACLE_SCHEMA = pa.schema([
    ("uid", pa.uint32()),
    ("timestamp", pa.uint32()),
    ("item_id", pa.uint32()),
    ("oracle_rank", pa.int32()),
    ("oracle_prob", pa.float32()),
    # The mixture component the listen was drawn from (one of COMPONENTS).
    ("component", pa.dictionary(pa.int8(), pa.string())),
    # The same under the next-POSITIVE-listen distribution, the one of the
    # evaluated targets (-1 where not computed: see the package docstring).
    ("positive_oracle_rank", pa.int32()),
    ("positive_oracle_prob", pa.float32()),
])


class AtomicParquetWriter:
  """A ParquetWriter on a temporary name, renamed into place on close.

  Keyword arguments go to `pq.ParquetWriter`."""

  def __init__(self, path: str, schema: pa.Schema, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self.path, self.tmp = path, path + ".tmp"
    self.writer = pq.ParquetWriter(self.tmp, schema, **kwargs)

  def write(self, table: pa.Table) -> None:
    self.writer.write_table(table, row_group_size=1 << 20)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self.writer.close()
    if exc_type is None:
      os.replace(self.tmp, self.path)
    else:
      os.remove(self.tmp)
    return False


def event_table(world: world_lib.World, events: simulation.ChunkEvents,
                lo: int) -> pa.Table:
  """A chunk's multi_event rows with the exact Yambda schema.

  Args:
    world: the world.
    events: the events of the chunk of users that starts at user `lo`.
    lo: the chunk's first user.

  Returns:
    The table; ratio and length are null on the rows that are not listens.
  """
  catalogue = world.catalogue
  is_listen = events.event_type == 0
  codes = pa.array(events.event_type.astype(np.int8), pa.int8())
  etype = pa.DictionaryArray.from_arrays(codes, pa.array(yambda.EVENT_TYPES))
  return pa.Table.from_arrays([
      pa.array(world.users.uids[lo + events.user], pa.uint32()),
      pa.array(events.timestamp.astype(np.uint32), pa.uint32()),
      pa.array(catalogue.item_ids[events.item], pa.uint32()),
      pa.array(events.organic.astype(np.uint8), pa.uint8()),
      pa.array(np.where(is_listen, events.ratio, 0).astype(np.uint16),
               pa.uint16(), mask=~is_listen),
      pa.array(np.where(is_listen, catalogue.length[events.item],
                        0).astype(np.uint32), pa.uint32(), mask=~is_listen),
      etype,
  ], schema=yambda.MULTI_EVENT_SCHEMA)


def float_lists(rows: np.ndarray) -> pa.ListArray:
  """A float32 list per row of a 2-d array."""
  offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) *
                     rows.shape[1])
  return pa.ListArray.from_arrays(offsets, pa.array(
      np.ascontiguousarray(rows, np.float32).ravel(), pa.float32()))


def write_embeddings(rng: np.random.Generator, world: world_lib.World,
                     root: str) -> None:
  """Writes audio embeddings for ~85% of items: a noisy projection of the
  latent, and its unit-length version.

  Args:
    rng: the embeddings' random stream.
    world: the world.
    root: the dataset's folder.
  """
  catalogue, size = world.catalogue, world.size
  proj = rng.normal(0, 1.0 / np.sqrt(size.latent_dim),
                    (size.latent_dim, size.embed_dim)).astype(np.float32)
  has = rng.random(catalogue.n_items) < _EMBEDDED_SHARE
  order = np.argsort(catalogue.item_ids, kind="stable")
  order = order[has[order]]
  chunk = 65536
  with AtomicParquetWriter(yambda.embeddings_path(root),
                           yambda.EMBEDDINGS_SCHEMA) as w:
    for lo in range(0, len(order), chunk):
      idx = order[lo:lo + chunk]
      emb = catalogue.latent[idx] @ proj + rng.normal(
          0, EMBEDDING_NOISE, (len(idx), size.embed_dim)).astype(np.float32)
      norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
      w.write(pa.Table.from_arrays(
          [pa.array(catalogue.item_ids[idx], pa.uint32()), float_lists(emb),
           float_lists(norm)], schema=yambda.EMBEDDINGS_SCHEMA))


def write_mappings(rng: np.random.Generator,
                   catalogue: catalogue_lib.Catalogue, root: str) -> None:
  """Writes the artist and album mappings: ~3% of items unmapped, ~5% with a
  second artist.

  Args:
    rng: the mappings' random stream.
    catalogue: the catalogue.
    root: the dataset's folder.
  """
  n = catalogue.n_items
  artist, artist_genre = catalogue.artist, catalogue.artist_genre
  mapped = np.nonzero(rng.random(n) >= _UNMAPPED_SHARE)[0]
  second = mapped[rng.random(len(mapped)) < _SECOND_ARTIST_SHARE]
  # A featured artist: another artist of the same genre when there is one.
  genre = artist_genre[artist[second]]
  other = rng.integers(0, catalogue.n_artists, len(second))
  for _ in range(8):
    bad = (artist_genre[other] != genre) | (other == artist[second])
    other[bad] = rng.integers(0, catalogue.n_artists, bad.sum())
  other = np.where(other == artist[second],
                   (other + 1) % catalogue.n_artists, other)

  items = np.concatenate([mapped, second])
  artists = np.concatenate([artist[mapped], other])
  order = np.lexsort((catalogue.artist_ids[artists],
                      catalogue.item_ids[items]))
  yambda.write_atomic(pa.Table.from_arrays(
      [pa.array(catalogue.item_ids[items[order]], pa.uint32()),
       pa.array(catalogue.artist_ids[artists[order]], pa.uint32())],
      schema=yambda.ARTIST_MAPPING_SCHEMA), yambda.artist_mapping_path(root))
  order = mapped[np.argsort(catalogue.item_ids[mapped], kind="stable")]
  yambda.write_atomic(pa.Table.from_arrays(
      [pa.array(catalogue.item_ids[order], pa.uint32()),
       pa.array(catalogue.album_ids[catalogue.album[order]], pa.uint32())],
      schema=yambda.ALBUM_MAPPING_SCHEMA), yambda.album_mapping_path(root))


def oracle_table(world: world_lib.World, snapshots: simulation.Snapshots,
                 result: oracle_lib.OracleResult) -> pa.Table:
  """A chunk's oracle rows in ORACLE_SCHEMA, plus a "positive" column
  (whether the listen is a positive) for the summary, not written.

  Args:
    world: the world.
    snapshots: the chunk's snapshots.
    result: `oracle.oracle` of them.

  Returns:
    The table, in the snapshots' order.
  """
  schema = ORACLE_SCHEMA.append(pa.field("positive", pa.bool_()))
  return pa.Table.from_arrays([
      pa.array(world.users.uids[snapshots.user], pa.uint32()),
      pa.array(snapshots.timestamp.astype(np.uint32), pa.uint32()),
      pa.array(world.catalogue.item_ids[snapshots.target], pa.uint32()),
      pa.array(result.rank.astype(np.int32), pa.int32()),
      pa.array(result.prob.astype(np.float32), pa.float32()),
      pa.DictionaryArray.from_arrays(
          pa.array(snapshots.component.astype(np.int8), pa.int8()),
          pa.array(components.COMPONENTS)),
      pa.array(result.positive_rank.astype(np.int32), pa.int32()),
      pa.array(result.positive_prob.astype(np.float32), pa.float32()),
      pa.array(played_ratio.is_positive(snapshots.ratio, snapshots.disliked),
               pa.bool_()),
  ], schema=schema)


def write_params(root: str, size_name: str, seed: int,
                 size: sizes.SizeParams, summary: Dict[str, Any]) -> None:
  """Writes params.json: what was generated, and the run's summary.

  Args:
    root: the dataset's folder.
    size_name: the size's key in SIZES.
    seed: the seed.
    size: its parameters.
    summary: the run's numbers.
  """
  atomic.write_json({"size": size_name, "seed": seed,
                     "params": dataclasses.asdict(size),
                     "components": list(components.COMPONENTS),
                     "summary": summary}, params_path(root, size_name))
