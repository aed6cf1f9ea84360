"""The item catalogue: vocabularies and per-item metadata, on disk and in RAM.

Data prep writes it next to the records; the model, the evaluation and the
export read it. Items are indexed 1..n in decreasing training frequency (index
0 is "unknown"), so a minimum-count vocabulary is a prefix of the index range
and ties in a ranking can be broken by popularity simply by index.

Layout of a catalogue folder:
  items.parquet     index, item_id, artist, album, track_length_seconds,
                    train_count, first_listen, has_audio
                                                 (row i describes item index i)
  audio.npy         float32 [n_items + 1, audio_dim] normalised embeddings,
                    zeros where an item has none
  users.parquet     index, uid, train_count      (index 1..; 0 is "unknown")
  artists.parquet   index, artist_id
  albums.parquet    index, album_id
  metadata.json     time split, positive rule, example counts, input source,
                    the prep's settings ("prep_config", e.g. history_length)

Candidates. Items are ordered by training count, then by first listen
(never-listened items last), so the items first listened before any time
after the training cut are a prefix of the index range. A window's
candidates are either the authors' catalogue, the items listened to before
the window starts (`num_candidates(cut)`, comparable with the Yambda paper),
or the service's, every catalogued item (with --metadata_items, every item of
the metadata files: how never-played tracks become candidates).
"""

import dataclasses
import json
import os
from typing import Any, Dict

import numpy as np
import pandas as pd

UNKNOWN_INDEX = 0


@dataclasses.dataclass
class Catalogue:
  """Vocabularies and item metadata; arrays are indexed by catalogue index."""
  item_ids: np.ndarray           # int64 [n_items + 1], raw ids; [0] = -1
  item_artist: np.ndarray        # int64 [n_items + 1], artist index, 0 = none
  item_album: np.ndarray         # int64 [n_items + 1], album index, 0 = none
  item_length: np.ndarray        # float32 [n_items + 1], seconds, 0 = unknown
  item_train_count: np.ndarray   # int64 [n_items + 1], training positives
  item_first_listen: np.ndarray  # int64 [n_items + 1], time of the first
                                 # listen; -1 = never (metadata only)
  has_audio: np.ndarray          # bool [n_items + 1]
  audio: np.ndarray              # float32 [n_items + 1, audio_dim]
  user_ids: np.ndarray           # int64 [n_users + 1], raw uids; [0] = -1
  user_train_count: np.ndarray   # int64 [n_users + 1]
  artist_ids: np.ndarray         # int64 [n_artists + 1]; [0] = -1
  album_ids: np.ndarray          # int64 [n_albums + 1]; [0] = -1
  metadata: Dict[str, Any]

  @property
  def num_items(self) -> int:
    """Number of real items (indices 1..num_items)."""
    return len(self.item_ids) - 1

  @property
  def audio_dim(self) -> int:
    return self.audio.shape[1]

  def audio_rows(self, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi-1 of `audio`, float32.

    A memory-mapped table (as `load` opens it) is read with a plain file read
    rather than through the map: mapped pages stay resident in the process,
    so copying a 9.4M-item table into the model through the map would add
    its 4.5 GiB to the process's RSS until the catalogue is dropped.
    """
    audio = self.audio
    if isinstance(audio, np.memmap) and audio.filename:
      width = audio.shape[1]
      with open(audio.filename, "rb") as f:
        rows = np.fromfile(
            f, dtype=audio.dtype, count=(hi - lo) * width,
            offset=audio.offset + lo * width * audio.dtype.itemsize)
      return rows.reshape(hi - lo, width).astype(np.float32, copy=False)
    return np.asarray(audio[lo:hi], np.float32)

  @property
  def history_length(self) -> int:
    """N, the positives of history the prep wrote each record's context for.

    The one definition of N for everything downstream of the prep: examples
    read from these records, the model's queries, the Yambda protocol's
    states and the serving signature all use N history items. The prep's
    --history_length decides it; nothing after the prep sets it again.
    """
    return int(self.metadata["prep_config"]["history_length"])

  def sampling_probability(self) -> np.ndarray:
    """Probability that a training positive is each item (float32 [n + 1]).

    In-batch negatives are other examples' positives, so this is also the
    probability with which an item is drawn as a negative: the logQ correction.
    Items never seen in training get the smallest positive probability rather
    than zero, so log(p) stays finite if one ever enters a batch.
    """
    counts = self.item_train_count.astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    floor = 1.0 / max(counts.sum(), 1.0)
    return np.maximum(p, floor).astype(np.float32)

  def num_candidates(self, cut: int = None) -> int:
    """Candidates of a window starting at `cut`: the items listened to before
    it, which are indices 1..n (see the module docstring); None: all items."""
    if cut is None:
      return self.num_items
    first = self.item_first_listen[1:]
    return int(np.sum((first >= 0) & (first < cut)))

  def item_index(self, raw_ids: np.ndarray) -> np.ndarray:
    """Raw item ids -> catalogue indices (0 for unknown ids)."""
    return _lookup(self.item_ids, raw_ids)

  def user_index(self, raw_uids: np.ndarray) -> np.ndarray:
    return _lookup(self.user_ids, raw_uids)


def id_vocabulary_size(counts: np.ndarray, min_count: int) -> int:
  """Rows of an id embedding over frequency-ordered indices.

  Indices 1..v-1 are those with count >= min_count (a prefix, since indices are
  in decreasing frequency); every other index shares row 0 with "unknown".
  """
  return 1 + int(np.sum(counts[1:] >= max(min_count, 1)))


def _lookup(vocab: np.ndarray, raw) -> np.ndarray:
  """Raw ids -> indices into `vocab` (entry 0 a placeholder), 0 if absent."""
  raw = np.asarray(raw, dtype=np.int64)
  keys = vocab[1:]
  if not len(keys):
    return np.zeros(raw.shape, np.int64)
  order = np.argsort(keys, kind="stable")
  sorted_keys = keys[order]
  pos = np.minimum(np.searchsorted(sorted_keys, raw), len(keys) - 1)
  return np.where(sorted_keys[pos] == raw, order[pos] + 1,
                  UNKNOWN_INDEX).astype(np.int64)


def write(catalogue: Catalogue, path: str) -> None:
  """Writes the catalogue folder (the caller renames it into place)."""
  os.makedirs(path, exist_ok=True)
  items = pd.DataFrame({
      "index": np.arange(len(catalogue.item_ids), dtype=np.int64),
      "item_id": catalogue.item_ids,
      "artist": catalogue.item_artist,
      "album": catalogue.item_album,
      "track_length_seconds": catalogue.item_length,
      "train_count": catalogue.item_train_count,
      "first_listen": catalogue.item_first_listen,
      "has_audio": catalogue.has_audio,
  })
  items.to_parquet(os.path.join(path, "items.parquet"), index=False)
  np.save(os.path.join(path, "audio.npy"), catalogue.audio)
  pd.DataFrame({"index": np.arange(len(catalogue.user_ids)),
                "uid": catalogue.user_ids,
                "train_count": catalogue.user_train_count}).to_parquet(
                    os.path.join(path, "users.parquet"), index=False)
  for name, ids, column in (("artists", catalogue.artist_ids, "artist_id"),
                            ("albums", catalogue.album_ids, "album_id")):
    pd.DataFrame({"index": np.arange(len(ids)), column: ids}).to_parquet(
        os.path.join(path, f"{name}.parquet"), index=False)
  with open(os.path.join(path, "metadata.json"), "w") as f:
    json.dump(catalogue.metadata, f, indent=2, sort_keys=True)


def load(path: str) -> Catalogue:
  """Reads a catalogue folder written by `write`."""
  if not os.path.exists(os.path.join(path, "metadata.json")):
    raise FileNotFoundError(
        f"{path} is not a catalogue folder (no metadata.json); run "
        "`python -m data_prep.prep` first.")
  items = pd.read_parquet(os.path.join(path, "items.parquet"))
  if "first_listen" not in items.columns:
    raise ValueError(
        f"{path} was prepared by an older version (no first_listen column, "
        "so no look-ahead-free candidates); prepare the data again.")
  users = pd.read_parquet(os.path.join(path, "users.parquet"))
  artists = pd.read_parquet(os.path.join(path, "artists.parquet"))
  albums = pd.read_parquet(os.path.join(path, "albums.parquet"))
  with open(os.path.join(path, "metadata.json")) as f:
    metadata = json.load(f)
  return Catalogue(
      item_ids=items["item_id"].to_numpy(np.int64),
      item_artist=items["artist"].to_numpy(np.int64),
      item_album=items["album"].to_numpy(np.int64),
      item_length=items["track_length_seconds"].to_numpy(np.float32),
      item_train_count=items["train_count"].to_numpy(np.int64),
      item_first_listen=items["first_listen"].to_numpy(np.int64),
      has_audio=items["has_audio"].to_numpy(bool),
      # Memory-mapped: at 9.4M items it is 4.5 GB, read once into the
      # model's content table (`towers.ItemEncoder`), not held twice.
      audio=np.load(os.path.join(path, "audio.npy"), mmap_mode="r"),
      user_ids=users["uid"].to_numpy(np.int64),
      user_train_count=users["train_count"].to_numpy(np.int64),
      artist_ids=artists["artist_id"].to_numpy(np.int64),
      album_ids=albums["album_id"].to_numpy(np.int64),
      metadata=metadata,
  )
