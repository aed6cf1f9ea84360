"""The Yambda authors' evaluation protocol, beside next-track Recall@k.

What the dataset's benchmark fixes (arXiv 2505.22238 and its benchmark code):
  * one global temporal split: train before `train_end`, a gap, then the test
    window [test_start, last_timestamp); data prep already cuts there (see
    `data_prep.prep` and the catalogue's metadata.json);
  * Listen+ = a listen played at least 50% (here: the prep's positive rule,
    `input_pipeline.ExampleRule.positive`, which also drops disliked listens);
  * only users seen in training are evaluated (here: users with at least one
    training positive, the catalogue's users); test items never seen in
    training stay in the relevant sets;
  * each user is asked once, and every distinct Listen+ item of theirs in the
    test window is relevant;
  * the top 100 of the whole catalogue is scored with Recall@k, NDCG@k and
    Coverage@k for k = 10, 50, 100 (definitions: `metrics.set_metrics`;
    Recall@k divides by min(k, |relevant|)).

The query is each user's state at the window's query cut, as this model sees
a user at serving time: user id; seed = their last listen before the cut
(any played ratio, as in training); history = their last N positives before
it, oldest first; example age 0. The cut is the start of the gap before the
window (`query_cut`): `train_end` for the validation day, `validation_end`
for the test day (what a model serving on the test day has seen, and the end
of training in the authors' retraining stage). Nothing from the gap or the
window enters it; the candidates are the window's authors' catalogue (see
`tfrs_yambda.evaluate`). It is rebuilt from the prepared records
(`user_states`): a user's last training record holds every listen up to its
last training target plus N positives of context, so its history is exact;
the seed is also taken from the context of the user's test records (which
reaches back over the gap) when that holds a later training-window listen,
because trailing listens after a user's last positive are not written to the
training records when no target follows them in their chunk. The model's
successor prior, which says what plays right after the seed, weighs at the
mass chosen for these queries (`successor_prior.protocol_query`).

Baselines under the same protocol: most popular and recent popular (no
query), seed co-occurrence from the same end-of-training seed, and ItemKNN
from that seed and history. The protocol's table is
`tfrs_yambda.report.protocol_table`.
"""

import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import eval_sample
from tfrs_yambda import evaluate as evaluate_lib
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import successor_prior

DEFAULT_KS = (10, 50, 100)
# Records parsed per step, and state rows kept before reducing them per user.
_RECORD_BATCH = 512
_REDUCE_ROWS = 1 << 20


def _record_batches(pattern: str):
  """Parsed records of the matching shards in file order, as numpy arrays.

  Yields dicts: uid [n], and per sequence feature (flat values, row splits).
  """
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    return
  dataset = tf.data.TFRecordDataset(files).batch(_RECORD_BATCH).map(
      lambda b: tf.io.parse_example(b, schema.RECORD_FEATURES))
  for batch in dataset:
    out = {schema.UID: batch[schema.UID].numpy()}
    for name in (schema.ITEMS, schema.TIMESTAMPS, schema.PLAYED_RATIOS,
                 schema.FEEDBACK):
      out[name] = batch[name].flat_values.numpy()
    out["row_splits"] = batch[schema.ITEMS].row_splits.numpy()
    yield out


def record_end_states(batch: Dict[str, np.ndarray], before: int,
                      history_length: int,
                      rule: input_pipeline.ExampleRule) -> pd.DataFrame:
  """Each record's last listen and last N positives strictly before `before`.

  Returns one row per record with a listen before `before`: uid,
  listen_time and seed (its last such listen), positive_time (of its last
  such positive; -1 if none), num_positives (<= N) and history (int64 [N],
  0-padded on the left, oldest first, as the input pipeline lays it out).
  """
  splits = batch["row_splits"]
  rows = np.repeat(np.arange(len(splits) - 1), np.diff(splits))
  times = batch[schema.TIMESTAMPS]
  items = batch[schema.ITEMS]
  keep = times < before
  positive = keep & np.asarray(rule.positive(batch[schema.PLAYED_RATIOS],
                                             batch[schema.FEEDBACK]))
  flat = np.arange(len(times))
  last = np.full(len(splits) - 1, -1)
  np.maximum.at(last, rows[keep], flat[keep])
  last_positive = np.full(len(splits) - 1, -1)
  np.maximum.at(last_positive, rows[positive], flat[positive])

  # The last N positives of each record, placed right-aligned.
  where = np.flatnonzero(positive)
  owner = rows[where]
  count = np.bincount(owner, minlength=len(splits) - 1)
  first_of_owner = np.cumsum(count) - count
  from_end = count[owner] - 1 - (np.arange(len(where)) - first_of_owner[owner])
  recent = from_end < history_length
  history = np.zeros((len(splits) - 1, history_length), np.int64)
  history[owner[recent], history_length - 1 - from_end[recent]] = items[
      where[recent]]

  has = last >= 0
  return pd.DataFrame({
      "uid": batch[schema.UID][has],
      "listen_time": times[last[has]],
      "seed": items[last[has]],
      "positive_time": np.where(last_positive[has] >= 0,
                                times[last_positive[has]], -1),
      "num_positives": np.minimum(count[has], history_length),
      "history": list(history[has]),
  })


# Which record's state wins for a user: the latest listen (seed), the latest
# positive (history); ties prefer the longer history, then a training record.
_SEED_ORDER = ["listen_time", "split_rank"]
_HISTORY_ORDER = ["positive_time", "num_positives", "split_rank"]


def _best_per_user(states: pd.DataFrame, by: List[str]) -> pd.DataFrame:
  """The row of each uid that is largest by the columns `by`, in order."""
  return states.sort_values(["uid"] + by, kind="stable").groupby(
      "uid", sort=True).tail(1)


def query_cut(catalogue: catalogue_lib.Catalogue, window: str) -> int:
  """The time of the users' states for a window: the start of its gap."""
  meta = catalogue.metadata
  return meta["train_end"] if window == "validation" else meta[
      "validation_end"]


def user_states(prepared_dir: str, train_end: int, history_length: int,
                rule: input_pipeline.ExampleRule) -> pd.DataFrame:
  """Every user's state at time `train_end`, from the prepared records.

  Returns a frame indexed by uid with columns seed (item index) and history
  (int64 [N] each): the user's last listen before `train_end` and last N
  positives before it. The seed comes from whichever record (of any window)
  holds the latest such listen; the history from the record with the latest
  such positive, the longer one on ties (a training record's, which is
  complete: see the module docstring).
  """
  seeds, histories, pending = [], [], []

  def reduce():
    merged = pd.concat(pending, ignore_index=True)
    pending.clear()
    return ([_best_per_user(pd.concat(seeds + [merged]), _SEED_ORDER)],
            [_best_per_user(pd.concat(histories + [merged]), _HISTORY_ORDER)])

  for split_rank, split in enumerate(("test", "validation", "train")):
    pattern = os.path.join(prepared_dir, "records", f"{split}-*.tfrecord")
    for batch in _record_batches(pattern):
      states = record_end_states(batch, train_end, history_length, rule)
      states["split_rank"] = split_rank
      pending.append(states)
      # Bounded memory: at most about one row per user plus one reduction's.
      if sum(len(p) for p in pending) > _REDUCE_ROWS:
        seeds, histories = reduce()
  if pending:
    seeds, histories = reduce()
  if not seeds:
    return pd.DataFrame({"seed": pd.Series(dtype=np.int64),
                         "history": pd.Series(dtype=object)})
  return pd.DataFrame({
      "seed": seeds[0].set_index("uid")["seed"],
      "history": histories[0].set_index("uid")["history"],
  })


def relevant_sets(test: Dict[str, np.ndarray], known_users: np.ndarray):
  """Users with test-window Listen+ items, split by whether training saw them.

  Args:
    test: test examples (user id and target item of every test positive).
    known_users: raw uids seen in training.

  Returns:
    (uids of the evaluated users, ascending; their distinct relevant items,
    one sorted array each; number of users left out as unseen in training).
  """
  pairs = pd.DataFrame({"uid": test[schema.USER_ID],
                        "item": test[schema.TARGET_ITEM]}).drop_duplicates()
  seen = pairs["uid"].isin(known_users)
  unseen_users = int(pairs.loc[~seen, "uid"].nunique())
  grouped = pairs[seen].sort_values(["uid", "item"]).groupby("uid", sort=True)
  uids = np.array(list(grouped.groups), np.int64)
  relevant = [g.to_numpy(np.int64) for _, g in grouped["item"]]
  return uids, relevant, unseen_users


def queries(uids: np.ndarray, states: pd.DataFrame,
            history_length: int) -> Dict[str, np.ndarray]:
  """Query features for `uids` at the end of training (age 0).

  Users without any recorded training listen (impossible when every user
  with a training positive has records) would get the unknown seed and an
  empty history.
  """
  known = states.reindex(uids)
  empty = np.zeros(history_length, np.int64)
  return {
      schema.USER_ID: uids.astype(np.int64),
      schema.SEED_ITEM: known["seed"].fillna(0).to_numpy(np.int64),
      schema.HISTORY_ITEMS: np.stack(
          [h if isinstance(h, np.ndarray) else empty
           for h in known["history"]]) if len(uids) else np.zeros(
               (0, history_length), np.int64),
  }


def evaluate(model, catalogue: catalogue_lib.Catalogue, prepared_dir: str,
             rule: input_pipeline.ExampleRule,
             fitted_baselines: Sequence = (),
             ks: Sequence[int] = DEFAULT_KS,
             test: Optional[Dict[str, np.ndarray]] = None,
             window: str = "test") -> Dict:
  """The protocol's metrics of one window for the model and the baselines.

  Args:
    model: the trained `TwoTowerModel`.
    catalogue: the prepared data's catalogue; its history length is the
      queries' N.
    prepared_dir: the folder holding its records.
    rule: the positive rule (Listen+).
    fitted_baselines: baselines to score beside the model.
    ks: the cut-offs; the top lists are max(ks) long.
    test: the window's examples (`evaluate.window_examples`), if the caller
      has them already; only their user ids and targets are read, and those
      of every example of the window when `test` is a sample of them: the
      protocol asks every user.
    window: "validation" or "test".

  Returns:
    {"users": evaluated users, "users_unseen_in_training": left out,
     "mean_relevant_items": mean |relevant|, "ks": ks,
     "retrievers": {name: metrics.set_metrics(...)}, "timings": seconds per
     part and in "total"}.
  """
  started = time.perf_counter()
  timings = eval_sample.Timings()
  history_length = catalogue.history_length
  num_candidates = catalogue.num_candidates(
      evaluate_lib.window_start(catalogue, window))
  with timings.part("relevant_sets"):
    if test is None:
      test = evaluate_lib.load_examples(
          prepared_dir, window, history_length, rule,
          keys=[schema.USER_ID, schema.TARGET_ITEM])
    uids, relevant, unseen = relevant_sets(eval_sample.population(test),
                                           catalogue.user_ids[1:])
  with timings.part("user_states"):
    states = user_states(prepared_dir, query_cut(catalogue, window),
                         history_length, rule)
  features = queries(uids, states, history_length)
  k = min(max(ks), num_candidates)
  list_ks = [min(x, k) for x in ks]

  def scored(top):
    values = metrics.set_metrics(top, relevant, list_ks, num_candidates)
    return {f"{metric}@{x}": values[f"{metric}@{capped}"]
            for capped, x in zip(list_ks, ks)
            for metric in ("recall", "ndcg", "coverage")}

  # Items 1..num_candidates are the candidates: a prefix of the embeddings;
  # the baselines' lists, in index order on ties, never leave it for k <= n.
  with timings.part("model"), successor_prior.protocol_query(model):
    rows = {"model": scored(ranking.model_top_k(
        model, features, ranking.candidate_table(
            ranking.candidate_embeddings(model, num_candidates + 1)), k))}
  for baseline in fitted_baselines:
    with timings.part(baseline.name):
      rows[baseline.name] = scored(np.asarray(baseline.top_k(features, k)))
  timings["total"] = round(time.perf_counter() - started, 3)
  return {
      "window": window,
      "query_cut": int(query_cut(catalogue, window)),
      "users": int(len(uids)),
      "users_unseen_in_training": unseen,
      "users_without_training_listens": int(np.sum(~np.isin(uids,
                                                            states.index))),
      "mean_relevant_items": float(np.mean([len(r) for r in relevant]))
                             if relevant else float("nan"),
      "ks": list(ks),
      "retrievers": rows,
      "timings": timings,
  }
