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
    the metadata files, `item_metadata.metadata_item_ids`), indexed by
    `item_order`; training counts, track lengths and the artist and album
    vocabularies (`item_metadata.first_mapping`, `to_vocab`) come from before
    train_end.
  * Records (`data_prep.records_plan`): each user's listens are cut into
    chunks with a bounded context, and a user's records all go to one shard.
Rows of one user with equal timestamps keep their order in the input file.

Odd inputs (each counted in prep_report.json, never a silent guess):
  * Ids and times: every uint32 value works, 0 and 4294967295 included, for
    uid, item_id, artist_id, album_id and timestamp (the test window may end
    at 2**32); a negative one or one above is a YambdaFormatError.
  * Duplicate events (`duplicate_events`): rows equal in uid, timestamp,
    item_id and event_type are one event. The first row in file order is
    kept (its played ratio, organic flag and track length, even where a
    copy's differ); copies are dropped (duplicate_events_dropped, and per
    type), so a repeated listen is neither an extra example nor a seed.
  * Several rows of an item in embeddings.parquet
    (`item_metadata.first_embedding_rows`): the first in file order is its
    embedding, even where later ones differ; those are ignored
    (embedding_rows_duplicate_item_first_kept).
  * An item mapped to several artists (albums): the smallest id is kept
    (items_with_several_artists_first_kept); identical rows count as one.
  * No listen at all, or windows that leave no training time: an error.
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
    listen_min: the earliest listen's timestamp (None: there are none).
    listen_max: the latest listen's timestamp (None: there are none).

  Returns:
    {"last_timestamp", "test_start", "validation_start", "validation_end",
    "train_end"} in seconds.

  Raises:
    yambda.YambdaFormatError: there are no listens (listen_min is None).
    ValueError: the windows and gaps leave no training time.
  """
  if listen_min is None or listen_max is None:
    raise yambda.YambdaFormatError("The input has no listen events.")
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


# --- Duplicates ---------------------------------------------------------------


def repeated_rows(*keys: np.ndarray, order: np.ndarray = None
                  ) -> np.ndarray:
  """Rows equal in every key to an earlier row (the first in file order kept).

  Sorting by the first key alone, then only the (few) rows that tie on it by
  every key, keeps the cost near one sort.

  Args:
    *keys: equally long arrays, one value per row, in file order.
    order: the rows' stable sort by the first key, where the caller has it.

  Returns:
    A boolean mask: True for each row after the first of its kind.
  """
  first_key = keys[0]
  repeated = np.zeros(len(first_key), bool)
  if order is None:
    order = np.argsort(first_key, kind="stable")
  tie = first_key[order[1:]] == first_key[order[:-1]]
  if not tie.any():
    return repeated
  rows = np.sort(order[np.r_[tie, False] | np.r_[False, tie]])
  # lexsort is stable and `rows` ascend, so each run starts at its first row.
  rows = rows[np.lexsort([k[rows] for k in reversed(keys)])]
  same = np.ones(len(rows) - 1, bool)
  for k in keys:
    same &= k[rows[1:]] == k[rows[:-1]]
  repeated[rows[1:][same]] = True
  return repeated


def user_time_key(uid: np.ndarray, ts: np.ndarray) -> np.ndarray:
  """(uid, timestamp) as one uint64 sort key (both fit 32 bits, validated)."""
  return (uid.astype(np.uint64) << np.uint64(32)) | ts.astype(np.uint64)


def duplicate_events(uid: np.ndarray, ts: np.ndarray, item: np.ndarray,
                     code: np.ndarray, order: np.ndarray = None
                     ) -> Tuple[np.ndarray, Dict[str, int]]:
  """Event rows that repeat an earlier row's (uid, timestamp, item, type).

  Such rows are one event: the first row in file order is kept, whatever the
  copies' played ratio or other columns, and the copies are dropped before
  anything else (feedback, seeds, targets) is decided.

  Args:
    uid: user per event row (uint32 values).
    ts: timestamp per row (uint32 values).
    item: item per row.
    code: event code per row.
    order: the rows' stable sort by `user_time_key`, where the caller has it.

  Returns:
    (a boolean mask, True for each dropped copy; the report's counts:
    duplicate_events_dropped, and duplicate_events_dropped_<type> per type).
  """
  dropped = repeated_rows(user_time_key(uid, ts), item, code, order=order)
  by_type = np.bincount(code[dropped].astype(np.int64),
                        minlength=len(yambda.EVENT_TYPES))
  counts = {"duplicate_events_dropped": int(by_type.sum())}
  counts.update({f"duplicate_events_dropped_{t}": int(by_type[i])
                 for i, t in enumerate(yambda.EVENT_TYPES)})
  return dropped, counts


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
