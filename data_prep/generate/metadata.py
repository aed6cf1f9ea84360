"""The metadata files of the real-shaped sizes: the full catalogue's.

A Yambda download's metadata covers about 9.39M tracks whatever the size,
most of which the 50m and 500m events never play. So these sizes add
`metadata_only_items` never-listened items, with their own raw ids (the
catalogue's ids and theirs together are dense up to their count, like the
real ids): albums of ~8 tracks by existing artists (some) or by new ones
(most), with latents around their artist's like the catalogue's tracks.

Every item, played or not, then gets the real download's shares: an artist
for ~98.7% (a second, featured one for a handful), an album for ~92.2%
(and `second_album_share` of those a compilation album besides), an audio
embedding for ~82.2%. The files are made in blocks of raw ids, each block
with its own random streams (jobs for `parallel`), and written in id order,
so memory stays bounded (embeddings.parquet is ~8 GB) and the bytes do not
depend on the number of workers.
"""

import dataclasses
import functools
import os
from typing import Callable, List, NamedTuple

import numpy as np
import pyarrow as pa

from data_prep import yambda
from data_prep.generate import catalogue as catalogue_lib
from data_prep.generate import world as world_lib
from data_prep.generate import writers

# The real download's shares, over its 9,390,623 items: 9,270,506 with an
# artist (9,271,906 rows), 8,653,783 with an album (9,651,644 rows), about
# 7.72M with an embedding.
_ARTIST_MAPPED_SHARE = 9_270_506 / 9_390_623
_SECOND_ARTIST_SHARE = 1_400 / 9_270_506
_ALBUM_MAPPED_SHARE = 8_653_783 / 9_390_623
_EMBEDDED_SHARE = 7_720_000 / 9_390_623
# Metadata-only albums by existing artists (the others by new artists).
_EXISTING_ARTIST_SHARE = 0.3
_COMPILATION_TRACKS = 20  # tracks per compilation album, on average
_TRACK_NOISE = 0.35       # a track's latent around its artist's (catalogue)
_ARTIST_NOISE = 0.7       # a new artist's latent around its genre's
_ID_BLOCK = 1 << 18       # raw ids per block written


@dataclasses.dataclass
class _Items:
  """Every item (catalogue, then metadata-only) by raw id, and its artists'
  and albums' tables (existing ones first, then new ones)."""
  item_of_id: np.ndarray    # per raw id: the item, catalogue ones first
  artist: np.ndarray        # per item
  album: np.ndarray         # per item
  artist_ids: np.ndarray    # raw id per artist
  artist_genre: np.ndarray
  artist_latent: np.ndarray
  album_ids: np.ndarray     # raw id per album
  compilation_ids: np.ndarray  # raw ids of the compilation albums
  n_catalogue: int


def _new_ids(rng: np.random.Generator, taken: np.ndarray, n: int,
             id_range: int) -> np.ndarray:
  """n distinct raw ids not in `taken`, from [0, max(id_range, 4 (n +
  len(taken))))."""
  id_range = max(id_range, 4 * (n + len(taken)))
  free = np.ones(id_range, bool)
  free[taken] = False
  return rng.choice(np.nonzero(free)[0], n, replace=False).astype(np.uint32)


def _items(rng: np.random.Generator, world: world_lib.World) -> _Items:
  """Draws the metadata-only items' albums, artists and raw ids."""
  catalogue, size = world.catalogue, world.size
  n_cat, n_meta = catalogue.n_items, size.metadata_only_items
  n_artists = catalogue.n_artists
  taken = np.zeros(n_cat + n_meta, bool)
  taken[catalogue.item_ids] = True
  meta_ids = rng.permutation(np.nonzero(~taken)[0])
  item_of_id = np.empty(n_cat + n_meta, np.int64)
  item_of_id[catalogue.item_ids] = np.arange(n_cat)
  item_of_id[meta_ids] = n_cat + np.arange(n_meta)

  sizes = catalogue_lib._album_sizes(  # pylint: disable=protected-access
      rng, n_meta, size.tracks_per_album)
  n_albums = len(sizes)
  existing = rng.random(n_albums) < _EXISTING_ARTIST_SHARE
  n_new = max(1, int((~existing).sum() / size.albums_per_artist))
  pop = catalogue.artist_popularity / catalogue.artist_popularity.sum()
  # Every new artist gets one album, the others go to random new artists.
  new_artist = np.r_[np.arange(n_new),
                     rng.integers(0, n_new, max(0, (~existing).sum() - n_new))]
  album_artist = np.empty(n_albums, np.int64)
  album_artist[existing] = rng.choice(n_artists, existing.sum(), p=pop)
  album_artist[~existing] = n_artists + rng.permutation(new_artist)[
      :(~existing).sum()]

  # A genre's centre: the mean of its artists' latents.
  n_genres = len(catalogue.genre_popularity)
  centers = np.zeros((n_genres, size.latent_dim))
  np.add.at(centers, catalogue.artist_genre, catalogue.artist_latent)
  centers /= np.maximum(np.bincount(catalogue.artist_genre,
                                    minlength=n_genres), 1)[:, None]
  genre = rng.choice(n_genres, n_new, p=catalogue.genre_popularity)
  latent = centers[genre] + rng.normal(0, _ARTIST_NOISE,
                                       (n_new, size.latent_dim))
  album_ids = _new_ids(rng, catalogue.album_ids, n_albums,
                       catalogue_lib._ALBUM_ID_RANGE)  # pylint: disable=protected-access
  n_compilations = max(1, int(round(
      size.second_album_share * _ALBUM_MAPPED_SHARE * (n_cat + n_meta) /
      _COMPILATION_TRACKS)))
  compilation_ids = _new_ids(
      rng, np.r_[catalogue.album_ids, album_ids], n_compilations,
      catalogue_lib._ALBUM_ID_RANGE)  # pylint: disable=protected-access
  album = np.repeat(np.arange(n_albums), sizes)
  return _Items(
      item_of_id=item_of_id,
      artist=np.r_[catalogue.artist, album_artist[album]],
      album=np.r_[catalogue.album, len(catalogue.album_ids) + album],
      artist_ids=np.r_[catalogue.artist_ids, _new_ids(
          rng, catalogue.artist_ids, n_new,
          catalogue_lib._ARTIST_ID_RANGE)],  # pylint: disable=protected-access
      artist_genre=np.r_[catalogue.artist_genre, genre],
      artist_latent=np.r_[catalogue.artist_latent, latent],
      album_ids=np.r_[catalogue.album_ids, album_ids],
      compilation_ids=compilation_ids, n_catalogue=n_cat)


def _featured(rng: np.random.Generator, items: _Items,
              artists: np.ndarray) -> np.ndarray:
  """Another artist of the same genre as each artist (a featured artist)."""
  by_genre = np.argsort(items.artist_genre, kind="stable")
  genre = items.artist_genre[artists]
  start = np.searchsorted(items.artist_genre[by_genre], genre, "left")
  count = np.searchsorted(items.artist_genre[by_genre], genre, "right") - start
  pick = (rng.random(len(artists)) * count).astype(np.int64)
  other = by_genre[start + pick]
  # Not the artist itself: the next one of the genre instead.
  return np.where(other == artists, by_genre[start + (pick + 1) % count],
                  other)


def _pairs(ids: np.ndarray, first: np.ndarray, second_ids: np.ndarray,
           second: np.ndarray, schema: pa.Schema) -> pa.Table:
  """Mapping rows (item id, id) sorted by item id, then id: one per mapped
  item, another where `second` is set."""
  item = np.r_[ids, ids[second]]
  other = np.r_[first, second_ids]
  order = np.lexsort((other, item))
  return pa.Table.from_arrays([pa.array(item[order], pa.uint32()),
                               pa.array(other[order], pa.uint32())],
                              schema=schema)


class Plan(NamedTuple):
  """What every block of the metadata files draws from."""
  items: _Items
  proj: np.ndarray  # (latent_dim, embed_dim) latent -> embedding
  mapping_rngs: List[np.random.Generator]    # one per block
  embedding_rngs: List[np.random.Generator]  # one per block


class Block(NamedTuple):
  """A block of raw ids' rows of the three files."""
  artists: pa.Table
  albums: pa.Table
  embeddings: str  # an Arrow stream file that holds them
  n_artist_items: int
  n_album_items: int
  n_ids: int        # raw ids of the block: items, catalogue or not


def plan(embeddings_rng: np.random.Generator,
         mappings_rng: np.random.Generator,
         world: world_lib.World) -> Plan:
  """Draws the metadata-only items and the embeddings' projection; every
  block has its own streams, so blocks can be made in any process.

  Args:
    embeddings_rng: the embeddings' random stream.
    mappings_rng: the mappings' (and the metadata-only items') stream.
    world: the world.

  Returns:
    The plan of the blocks.
  """
  size = world.size
  items = _items(mappings_rng, world)
  proj = embeddings_rng.normal(0, 1.0 / np.sqrt(size.latent_dim),
                               (size.latent_dim, size.embed_dim)).astype(
                                   np.float32)
  n_blocks = -(-len(items.item_of_id) // _ID_BLOCK)
  return Plan(items, proj, mappings_rng.spawn(n_blocks),
              embeddings_rng.spawn(n_blocks))


def block(the_plan: Plan, world: world_lib.World, index: int,
          spill: str) -> Block:
  """The rows of raw ids [index, index + 1) * _ID_BLOCK of the three files.

  Args:
    the_plan: `plan(...)`.
    world: the world.
    index: the block.
    spill: where to write the embeddings (an Arrow stream file).

  Returns:
    The block's mapping tables, and the path of its embeddings.
  """
  items, size = the_plan.items, world.size
  rng, emb_rng = the_plan.mapping_rngs[index], the_plan.embedding_rngs[index]
  lo = index * _ID_BLOCK
  ids = np.arange(lo, min(lo + _ID_BLOCK, len(items.item_of_id)))
  item = items.item_of_id[ids]
  artist, album = items.artist[item], items.album[item]

  mapped = rng.random(len(ids)) < _ARTIST_MAPPED_SHARE
  second = rng.random(mapped.sum()) < _SECOND_ARTIST_SHARE
  featured = _featured(rng, items, artist[mapped][second])
  artists = _pairs(ids[mapped], items.artist_ids[artist[mapped]],
                   items.artist_ids[featured], second,
                   yambda.ARTIST_MAPPING_SCHEMA)
  n_artist_items = int(mapped.sum())

  mapped = rng.random(len(ids)) < _ALBUM_MAPPED_SHARE
  second = rng.random(mapped.sum()) < size.second_album_share
  compilation = items.compilation_ids[rng.integers(
      0, len(items.compilation_ids), second.sum())]
  albums = _pairs(ids[mapped], items.album_ids[album[mapped]], compilation,
                  second, yambda.ALBUM_MAPPING_SCHEMA)

  has = emb_rng.random(len(ids)) < _EMBEDDED_SHARE
  item, artist = item[has], artist[has]
  latent = np.empty((len(item), size.latent_dim), np.float32)
  cat = item < items.n_catalogue
  latent[cat] = world.catalogue.latent[item[cat]]
  latent[~cat] = items.artist_latent[artist[~cat]] + emb_rng.normal(
      0, _TRACK_NOISE, ((~cat).sum(), size.latent_dim))
  emb = latent @ the_plan.proj
  emb += writers.EMBEDDING_NOISE * emb_rng.standard_normal(emb.shape,
                                                           np.float32)
  norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  with pa.OSFile(spill, "wb") as sink, pa.ipc.new_stream(
      sink, yambda.EMBEDDINGS_SCHEMA) as stream:
    stream.write_table(pa.Table.from_arrays(
        [pa.array(ids[has].astype(np.uint32), pa.uint32()),
         writers.float_lists(emb), writers.float_lists(norm)],
        schema=yambda.EMBEDDINGS_SCHEMA))
  return Block(artists, albums, spill, n_artist_items, int(mapped.sum()),
               len(ids))


def block_jobs(the_plan: Plan, world: world_lib.World,
               root: str) -> List[Callable[[], Block]]:
  """Every block of `plan`, as jobs for `parallel`, in raw id order."""
  spill = yambda.embeddings_path(root) + ".block{}.tmp"
  return [functools.partial(block, the_plan, world, i, spill.format(i))
          for i in range(len(the_plan.mapping_rngs))]


class Writers:
  """The three metadata files, open while their blocks come in order.

  A context manager; `write` appends a block, `counts` sums them up.
  """

  def __init__(self, root: str):
    self._files = [
        writers.AtomicParquetWriter(
            yambda.artist_mapping_path(root), yambda.ARTIST_MAPPING_SCHEMA),
        writers.AtomicParquetWriter(
            yambda.album_mapping_path(root), yambda.ALBUM_MAPPING_SCHEMA),
        # Floats neither compress nor need statistics: twice as fast.
        writers.AtomicParquetWriter(
            yambda.embeddings_path(root), yambda.EMBEDDINGS_SCHEMA,
            use_dictionary=False, compression="none",
            write_statistics=False)]
    self.counts = dict(artist_rows=0, artist_items=0, album_rows=0,
                       album_items=0, embedding_rows=0, metadata_items=0)

  def __enter__(self) -> "Writers":
    return self

  def __exit__(self, exc_type, exc, tb):
    for f in self._files:
      f.__exit__(exc_type, exc, tb)
    return False

  def write(self, the_block: Block) -> None:
    artists, albums, embeddings = self._files
    artists.write(the_block.artists)
    albums.write(the_block.albums)
    with pa.OSFile(the_block.embeddings) as source:
      for batch in pa.ipc.open_stream(source):
        embeddings.write(pa.Table.from_batches([batch]))
        self.counts["embedding_rows"] += batch.num_rows
    os.remove(the_block.embeddings)
    self.counts["artist_rows"] += the_block.artists.num_rows
    self.counts["artist_items"] += the_block.n_artist_items
    self.counts["album_rows"] += the_block.albums.num_rows
    self.counts["album_items"] += the_block.n_album_items
    self.counts["metadata_items"] += the_block.n_ids
