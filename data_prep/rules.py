"""The rules of a prepared dataset, written once for every stage that uses them.

The streaming prep (`data_prep.prep`), the in-memory reference
(`benchmarks/reference_prep.py`), the TF input pipeline and a serving client
all decide the same things the same way by calling these functions. They are
pure array functions (numpy, or tensors where said), so each caller keeps its
own data flow.

What a prepared dataset decides (and records in the catalogue's metadata.json):
  * Time split (`time_split`, `windows`): global cuts. The test window is
    [test_start, last_timestamp), the validation window the day before it,
    each after a gap of gap_seconds; training targets are listens before
    train_end. Gap listens are never targets but still serve as seed and
    history, as they would at serving time. Defaults reproduce the Yambda
    authors' split when --last_timestamp=26000000 (train < 25,823,600;
    validation [25,825,400, 25,911,800); test from 25,913,600).
  * Positives (`is_positive`): a listen with played_ratio_pct >=
    --min_played_ratio (Listen+ at the default 50) that the user did not
    dislike afterwards. Only positives are targets and history; any listen
    can be a seed (it is what was just played).
  * Explicit feedback (`explicit_attachments`, `feedback_at`): each like /
    dislike / unlike / undislike attaches to the user's latest listen of that
    track at or before it; the last one wins (an unlike cancels a like).
    Events with no such listen are dropped and counted. A window's records
    carry only the feedback given before its cut (`window_feedback`), so
    nothing later changes a weight or a positive.
  * Catalogue: every listened item (and with --metadata_items every item of
    the metadata files, `metadata_item_ids`), indexed by `item_order`;
    training counts, track lengths and the artist and album vocabularies
    (`first_mapping`, `to_vocab`) come from before train_end.
  * Records (`data_prep.records_plan`): each user's listens are cut into
    chunks with a bounded context, and a user's records all go to one shard.
Rows of one user with equal timestamps keep their order in the input file.
"""

from typing import Callable, Dict, Tuple

import numpy as np

from data_prep import yambda
from tfrs_yambda import schema

# Event codes are indices in yambda.EVENT_TYPES; listens are code 0.
LISTEN = yambda.EVENT_TYPES.index("listen")
# Listen+ (the Yambda authors' positive): played at least this percent.
LISTEN_PLUS_RATIO = 50
WINDOWS = ("train", "validation", "test")
# First-listen time of an item never listened to (metadata files only).
NEVER_LISTENED = -1
# What the prep may do with NaN/inf in a kept item's normalized_embed.
NONFINITE_EMBEDDINGS = ("error", "missing")

# The feedback each explicit event type leaves on its listen.
_EXPLICIT_FEEDBACK = {"like": schema.FEEDBACK_LIKED,
                      "dislike": schema.FEEDBACK_DISLIKED,
                      "unlike": schema.FEEDBACK_NONE,
                      "undislike": schema.FEEDBACK_NONE}


# --- Time split and windows ---------------------------------------------------


def time_split(config, listen_min: int, listen_max: int) -> Dict[str, int]:
  """The global time cuts, the Yambda authors' way.

  test = [test_start, last_timestamp), validation = [validation_start,
  validation_end), each after a gap of `gap_seconds`; training targets end at
  train_end. Without a validation window, training runs up to the test gap
  (validation_start == validation_end == train_end + gap).

  Args:
    config: a `PrepConfig` (last_timestamp, test_window_seconds, gap_seconds,
      validation_window_seconds).
    listen_min: the earliest listen's timestamp.
    listen_max: the latest listen's timestamp.

  Returns:
    {"last_timestamp", "test_start", "validation_start", "validation_end",
    "train_end"} in seconds.

  Raises:
    ValueError: the windows and gaps leave no training time.
  """
  last = config.last_timestamp or listen_max + 1
  test_start = last - config.test_window_seconds
  validation_end = test_start - config.gap_seconds
  if config.validation_window_seconds > 0:
    validation_start = validation_end - config.validation_window_seconds
    train_end = validation_start - config.gap_seconds
  else:
    validation_start = validation_end
    train_end = validation_end
  if train_end <= listen_min:
    raise ValueError(
        f"The test window, validation window and gaps "
        f"({config.test_window_seconds}s + "
        f"{config.validation_window_seconds}s + gaps of "
        f"{config.gap_seconds}s) leave no training time before {last}.")
  return {"last_timestamp": last, "test_start": test_start,
          "validation_start": validation_start,
          "validation_end": validation_end, "train_end": train_end}


def windows(split: Dict[str, int]) -> Dict[str, Tuple[int, int]]:
  """The windows whose listens are targets, and when.

  Args:
    split: the cuts of `time_split`.

  Returns:
    Window name -> [start, stop) of its targets' timestamps, in `WINDOWS`
    order; an empty validation window is left out.
  """
  out = {"train": (0, split["train_end"])}
  if split["validation_end"] > split["validation_start"]:
    out["validation"] = (split["validation_start"], split["validation_end"])
  out["test"] = (split["test_start"], split["last_timestamp"])
  return out


# --- Positives ----------------------------------------------------------------


def is_positive(played_ratio, feedback, min_played_ratio=LISTEN_PLUS_RATIO):
  """The positive rule: played long enough and not disliked.

  Only operators are used, so numpy arrays and tf tensors alike work: the
  prep, the input pipeline and a serving client share this one definition.

  Args:
    played_ratio: percent played per listen, rounded as the records store it.
    feedback: explicit feedback per listen (schema.FEEDBACK_*).
    min_played_ratio: the least percent a positive is played.

  Returns:
    A boolean array (or tensor) of the inputs' shape.
  """
  return (played_ratio >= min_played_ratio) & (
      feedback != schema.FEEDBACK_DISLIKED)


# --- Explicit feedback --------------------------------------------------------


def explicit_attachments(uid: np.ndarray, item: np.ndarray, ts: np.ndarray,
                         code: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray, int]:
  """The listen each explicit event attaches to, and the orphan count.

  Each like / dislike / unlike / undislike attaches to the user's latest
  listen of that track at or before it. Sorting by (uid, item, time,
  listen-first) puts each explicit event right after the listens of the same
  track it can belong to, so the attachment is a running maximum rather than
  a join.

  Args:
    uid: user per event row.
    item: item per event row.
    ts: timestamp per event row.
    code: event code per row (index in yambda.EVENT_TYPES).

  Returns:
    (explicit event rows, their listen rows), grouped by listen and in
    (time, event type) order within a group, and the number of explicit
    events without an earlier listen.
  """
  order = np.lexsort((code, ts, item, uid))
  is_listen = code[order] == LISTEN
  pos = np.arange(len(order))
  last_listen = np.maximum.accumulate(np.where(is_listen, pos, -1))
  same_track = np.zeros(len(order), bool)
  ok = last_listen >= 0
  lo = order[last_listen[ok]]
  same_track[ok] = (uid[lo] == uid[order[ok]]) & (item[lo] == item[order[ok]])
  explicit = ~is_listen
  rows = np.flatnonzero(explicit & same_track)
  orphans = int(np.sum(explicit & ~same_track))
  return order[rows], order[last_listen[rows]], orphans


def feedback_at(num_rows: int, event_rows: np.ndarray, listen_rows: np.ndarray,
                code: np.ndarray, ts: np.ndarray, before: int = None
                ) -> np.ndarray:
  """Feedback per row as known at a cut, from `explicit_attachments`.

  The last explicit event of each listen wins (an unlike cancels a like).

  Args:
    num_rows: rows of the event arrays.
    event_rows: explicit event rows, as `explicit_attachments` returns them.
    listen_rows: the listen row of each of them.
    code: event code per row.
    ts: timestamp per row.
    before: only explicit events before this time count (what a window may
      know); None: all of them.

  Returns:
    int8 feedback (schema.FEEDBACK_*) per row; 0 for every row that is not a
    listen with feedback.
  """
  if before is not None:
    keep = ts[event_rows] < before
    event_rows, listen_rows = event_rows[keep], listen_rows[keep]
  feedback = np.zeros(num_rows, np.int8)
  if len(listen_rows):
    # Explicit events of one listen are contiguous: keep the last of each run.
    last_of_run = np.append(listen_rows[1:] != listen_rows[:-1], True)
    mapping = np.array([_EXPLICIT_FEEDBACK[t] for t in yambda.EVENT_TYPES[1:]],
                       np.int8)
    feedback[listen_rows[last_of_run]] = mapping[
        code[event_rows[last_of_run]] - 1]
  return feedback


def attach_feedback(events, before: int = None):
  """The listens of an events table, each with its feedback.

  Args:
    events: a pandas DataFrame with uid, item_id, timestamp and event_type
      (codes) columns.
    before: only explicit events before this time count; None: all.

  Returns:
    (the listen rows with a `feedback` column, the count of explicit events
    without an earlier listen).
  """
  uid = events["uid"].to_numpy()
  code = events["event_type"].to_numpy()
  ts = events["timestamp"].to_numpy()
  event_rows, listen_rows, orphans = explicit_attachments(
      uid, events["item_id"].to_numpy(), ts, code)
  feedback = feedback_at(len(events), event_rows, listen_rows, code, ts,
                         before)
  listens = events.loc[code == LISTEN].copy()
  listens["feedback"] = feedback[code == LISTEN]
  return listens, orphans


def window_feedback(feedback_before: Callable[[int], np.ndarray],
                    ts: np.ndarray, start: int, stop: int) -> np.ndarray:
  """Each listen's feedback as a window [start, stop) may know it.

  Listens before the window (its queries' seeds and histories) see the
  feedback given before `start`; the window's own listens (its targets, and
  the histories of its later targets) the feedback given before `stop`. So a
  like or dislike after a window never changes its examples or weights.

  Args:
    feedback_before: cut -> feedback per listen from the explicit events
      before the cut.
    ts: timestamp per listen.
    start: the window's start.
    stop: the window's stop.

  Returns:
    Feedback per listen.
  """
  at_stop = feedback_before(stop)
  if start <= 0 or not np.any(ts < start):
    return at_stop
  return np.where(ts < start, feedback_before(start), at_stop)


# --- Catalogue: item order and vocabularies -----------------------------------


def item_order(item_ids: np.ndarray, train_counts: np.ndarray,
               first_listen: np.ndarray) -> np.ndarray:
  """Catalogue index order: most training positives first, then by first
  listen (never-listened items last), ties by raw id.

  Items first listened before any cut after training are then a prefix of
  the index range, which later items never shift: a window's catalogue is the
  prefix of items first listened before its start, and nothing listened after
  a cut changes an index that is used before it.

  Args:
    item_ids: raw item ids.
    train_counts: training positives per item.
    first_listen: first listen time per item (NEVER_LISTENED: none).

  Returns:
    Positions into the arrays, in catalogue order (index i + 1 is row i).
  """
  first = np.where(first_listen == NEVER_LISTENED, np.iinfo(np.int64).max,
                   first_listen)
  return np.lexsort((item_ids, first, -train_counts))


def metadata_item_ids(root: str) -> np.ndarray:
  """Sorted ids of every item in the metadata files (embeddings, mappings).

  Args:
    root: a folder with the Yambda layout.

  Returns:
    int64 raw item ids, ascending, unique.
  """
  ids = [yambda.read_table(path, kind, ["item_id"]).column(
      "item_id").to_numpy().astype(np.int64) for path, kind in (
          (yambda.embeddings_path(root), "embeddings"),
          (yambda.artist_mapping_path(root), "artist_mapping"),
          (yambda.album_mapping_path(root), "album_mapping"))]
  return np.unique(np.concatenate(ids))


def first_mapping(path: str, kind: str, key: str, items: np.ndarray
                  ) -> Tuple[np.ndarray, int]:
  """Each item's artist (or album): the smallest id it maps to.

  Args:
    path: the mapping file.
    kind: "artist_mapping" or "album_mapping".
    key: the mapped column ("artist_id" or "album_id").
    items: sorted raw item ids of the catalogue.

  Returns:
    (mapped id per item, -1 where none; the count of items mapped to more
    than one).
  """
  table = yambda.read_table(path, kind).to_pandas()
  table = table[table["item_id"].isin(items)]
  multi = int((table.groupby("item_id").size() > 1).sum())
  first = table.groupby("item_id")[key].min()
  mapped = first.reindex(items).fillna(-1).to_numpy(np.int64)
  return mapped, multi


def to_vocab(raw: np.ndarray, known: np.ndarray
             ) -> Tuple[np.ndarray, np.ndarray]:
  """Raw ids -> vocabulary indices, from the items known at the training cut.

  The vocabulary holds the ids of the `known` items only (those listened to
  before the training cut), so nothing after the cut adds or shifts a row; an
  id only later items have maps to 0, as a model trained before the cut knows
  nothing of it.

  Args:
    raw: raw id per item (-1: none).
    known: whether each item was listened to before the training cut.

  Returns:
    (index per item, 0 = none; the vocabulary, [0] = -1).
  """
  vocab = np.unique(raw[(raw >= 0) & known])
  pos = np.minimum(np.searchsorted(vocab, raw), max(len(vocab) - 1, 0))
  found = (raw >= 0) & (vocab[pos] == raw) if len(vocab) else np.zeros(
      len(raw), bool)
  index = np.where(found, pos + 1, 0)
  return index.astype(np.int64), np.concatenate([[-1], vocab]).astype(np.int64)


def artists_and_albums(root: str, items: np.ndarray, known: np.ndarray):
  """Each item's artist and album index, and both vocabularies (both preps).

  Args:
    root: the Yambda folder (its mapping files).
    items: sorted raw item ids of the catalogue.
    known: whether each item was listened to before the training cut.

  Returns:
    {"artist", "album": index per item (0 = none), "artist_ids",
    "album_ids": the vocabularies ([0] = -1), "multi_artist", "multi_album":
    items mapped to several (the first kept)}.
  """
  found = {}
  for kind, path in (("artist", yambda.artist_mapping_path(root)),
                     ("album", yambda.album_mapping_path(root))):
    raw, found[f"multi_{kind}"] = first_mapping(
        path, f"{kind}_mapping", f"{kind}_id", items)
    found[kind], found[f"{kind}_ids"] = to_vocab(raw, known)
  return found


def nonfinite_embedding_error(path: str, item_id: int, row: int
                              ) -> yambda.YambdaFormatError:
  """The error of a NaN/inf embedding of a catalogue item (both preps).

  Args:
    path: the embeddings file.
    item_id: the item's raw id.
    row: its row in the file.

  Returns:
    The error to raise, naming the file, column, item and row.
  """
  return yambda.YambdaFormatError(
      f"{path}: column 'normalized_embed' has NaN or inf values for item_id "
      f"{item_id} (row {row} of the file), an item the catalogue keeps. Fix "
      f"the file, or pass --nonfinite_embeddings=missing to treat such items "
      f"as having no audio embedding.")
