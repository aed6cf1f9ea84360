"""A user's raw recent events -> the history the model was trained on.

Training histories are a user's last N *positive* listens, oldest first
(`tfrs_yambda.input_pipeline`): played at least `min_played_ratio` percent
and not disliked (`data_prep.rules.is_positive`), where each like, dislike,
unlike or undislike attaches to the user's latest listen of that track before
it and the last one wins (`rules.explicit_attachments`, `rules.feedback_at`).
Skips and disliked listens never reach a history, and every slot holds an
item the model knows. Sending "the recently played tracks" instead shows the
model histories it never saw; these functions run the prep's own rules on a
user's short event list.

An event is (item_id, played_ratio_pct, event_type), as in Yambda's
multi_event table, oldest first: event_type is one of `EVENT_TYPES` (or its
index, the prep's code); played_ratio_pct is a listen's percent played (None
for the other types). Events carry no time: their order is their time.
"""

from typing import Collection, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from data_prep import rules
from data_prep import yambda

EVENT_TYPES = yambda.EVENT_TYPES
Event = Tuple[int, Optional[float], Union[str, int]]
# A list of events, or columns named as Yambda's.
Events = Union[Sequence[Event], Mapping[str, Sequence]]


def _code(event_type) -> int:
  if isinstance(event_type, str) and event_type in EVENT_TYPES:
    return EVENT_TYPES.index(event_type)
  if (isinstance(event_type, (int, np.integer)) and
      not isinstance(event_type, bool) and
      0 <= event_type < len(EVENT_TYPES)):
    return int(event_type)
  raise ValueError(f"Unknown event type {event_type!r}: one of "
                   f"{EVENT_TYPES} or its index.")


def _item(item_id) -> int:
  if (isinstance(item_id, (int, np.integer)) and
      not isinstance(item_id, bool)):
    return int(item_id)
  raise ValueError(f"Item ids are integers, got {item_id!r}.")


def event_columns(events: Events
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Events -> (item int64, played ratio float64, event code int64) arrays.

  Args:
    events: (item_id, played_ratio_pct, event_type) triples, oldest first,
      or {"item_id", "played_ratio_pct", "event_type"} columns.

  Returns:
    The columns; the ratio is NaN where an event has none.

  Raises:
    ValueError: an event that is not a triple, a non-integer item id, an
      unknown event type, or a listen without a finite played ratio.
  """
  if isinstance(events, Mapping):
    columns = [list(events[k]) for k in ("item_id", "played_ratio_pct",
                                         "event_type")]
    if len({len(c) for c in columns}) > 1:
      raise ValueError("The event columns differ in length.")
    rows = list(zip(*columns))
  else:
    rows = list(events)
  if any(not isinstance(r, Sequence) or len(r) != 3 for r in rows):
    raise ValueError("Each event is (item_id, played_ratio_pct, event_type).")
  items = np.array([_item(r[0]) for r in rows], np.int64)
  codes = np.array([_code(r[2]) for r in rows], np.int64)
  ratios = np.full(len(rows), np.nan)
  for i, (_, ratio, _) in enumerate(rows):
    if codes[i] != rules.LISTEN:
      continue  # explicit events have no played ratio
    if (isinstance(ratio, bool) or not isinstance(ratio, (int, float,
                                                          np.number)) or
        not np.isfinite(ratio)):
      raise ValueError(f"Event {i}: a listen needs a played ratio (percent), "
                       f"got {ratio!r}.")
    ratios[i] = ratio
  return items, ratios, codes


def positive_items(events: Events,
                   min_played_ratio: float = rules.LISTEN_PLUS_RATIO
                   ) -> np.ndarray:
  """The items of the positive listens among `events`, oldest first.

  Feedback comes from every explicit event in the list, attached by the
  prep's functions with the event order as time; the positive rule is
  `rules.is_positive` on the ratio rounded as the prep stores it.

  Args:
    events: see `event_columns`.
    min_played_ratio: the prep's --min_played_ratio (the export's
      export_metadata.json has it).

  Returns:
    int64 item ids, one per positive listen, in event order.
  """
  items, ratios, codes = event_columns(events)
  time = np.arange(len(codes))
  event_rows, listen_rows, _ = rules.explicit_attachments(
      np.zeros(len(codes), np.int64), items, time, codes)
  feedback = rules.feedback_at(len(codes), event_rows, listen_rows, codes,
                               time)
  listen = codes == rules.LISTEN
  # Rounded as the prep rounds it before the rule (the records hold it so).
  ratio = np.round(np.where(listen, ratios, 0.0))
  return items[listen & rules.is_positive(ratio, feedback, min_played_ratio)]


def known(items: np.ndarray, known_item_ids: Collection[int]) -> np.ndarray:
  """Whether each item is one of `known_item_ids` (sorted or not)."""
  ids = np.asarray(list(known_item_ids) if not isinstance(
      known_item_ids, np.ndarray) else known_item_ids, np.int64)
  if len(ids) > 1 and np.any(ids[1:] < ids[:-1]):
    ids = np.sort(ids)
  if not len(ids):
    return np.zeros(len(items), bool)
  pos = np.minimum(np.searchsorted(ids, items), len(ids) - 1)
  return ids[pos] == items


def history_item_ids(events: Events,
                     known_item_ids: Optional[Collection[int]] = None,
                     history_length: Optional[int] = None,
                     min_played_ratio: float = rules.LISTEN_PLUS_RATIO
                     ) -> np.ndarray:
  """The history the model expects: known positives, the most recent N.

  Unknown ids are dropped *before* the cut, so each of the N slots holds an
  item the model knows, as in training.

  Args:
    events: see `event_columns`.
    known_item_ids: the ids the model knows (`client.load_known_item_ids`,
      or the catalogue's item_ids[1:]); None keeps every positive (the
      model drops unknown ones itself, but after this cut).
    history_length: the model's N; None: no cut.
    min_played_ratio: see `positive_items`.

  Returns:
    int64 item ids, oldest first, at most `history_length` of them.
  """
  items = positive_items(events, min_played_ratio)
  if known_item_ids is not None:
    items = items[known(items, known_item_ids)]
  if history_length is not None:
    items = items[max(0, len(items) - history_length):]
  return items


def last_listen(events: Events) -> Optional[int]:
  """The item of the latest listen, skips included (a training seed is the
  listen just before the target, whatever was played of it); None if none."""
  items, _, codes = event_columns(events)
  listens = items[codes == rules.LISTEN]
  return int(listens[-1]) if len(listens) else None
