"""Histories from a user's raw events, built as training builds them.

Training histories are the last N positive listens (played enough, not
disliked; feedback attached by the prep's rules) of known tracks, oldest
first. The client's raw-events call must send exactly that, with the prep's
own functions, and the command line must agree with it.
"""

import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pandas as pd
import pytest

from data_prep import rules
from export import client
from export import events


def test_history_keeps_known_positives_oldest_first():
  raw = [(1, 100, "listen"), (2, 10, "listen"),    # 2: a skip
         (3, 90, "listen"), (3, None, "dislike"),  # 3: disliked
         (4, 49.6, "listen"),                      # rounds to 50: positive
         (99, 100, "listen"),                      # unknown to the model
         (3, 70, "listen"),                        # a later, liked, listen
         (3, None, "like"), (5, 100, "listen"), (6, None, "dislike")]
  assert events.positive_items(raw).tolist() == [1, 4, 99, 3, 5]
  known = [1, 2, 3, 4, 5, 6]
  # The unknown id is dropped before the cut: it takes none of the 3 slots.
  assert events.history_item_ids(raw, known, 3).tolist() == [4, 3, 5]
  assert events.history_item_ids(raw, None, 3).tolist() == [99, 3, 5]
  assert events.last_listen(raw) == 5
  with pytest.raises(ValueError, match="played ratio"):
    events.positive_items([(1, None, "listen")])
  with pytest.raises(ValueError, match="Unknown event type"):
    events.positive_items([(1, 100, "play")])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 120),
                          st.sampled_from(events.EVENT_TYPES)), max_size=12))
def test_positives_are_the_preps_on_the_same_events(raw):
  raw = [(i, r if t == "listen" else None, t) for i, r, t in raw]
  table = pd.DataFrame({
      "uid": np.zeros(len(raw), np.int64),
      "item_id": np.array([e[0] for e in raw], np.int64),
      "timestamp": np.arange(len(raw)),
      "event_type": np.array([events.EVENT_TYPES.index(e[2]) for e in raw],
                             np.int64),
      "played_ratio_pct": [e[1] for e in raw]})
  listens, _ = rules.attach_feedback(table)
  expected = listens["item_id"][rules.is_positive(
      listens["played_ratio_pct"].astype(float).to_numpy(),
      listens["feedback"].to_numpy())]
  assert events.positive_items(raw).tolist() == expected.tolist()


def test_recommend_from_events_sends_the_training_history(monkeypatch,
                                                          tmp_path):
  sent = {}

  def fake_predict(server, model_name, inputs, *args):
    del server, model_name, args
    sent.update(inputs)
    return {"item_ids": np.zeros([1, 2], np.int64),
            "scores": np.zeros([1, 2], np.float32)}

  monkeypatch.setattr(client, "predict_rest", fake_predict)
  raw = [(1, 100, "listen"), (7, 100, "listen"), (2, 5, "listen"),
         (3, 80, "listen"), (8, 30, "listen")]
  client.recommend_from_events(42, raw, server="x:1", history_length=3,
                               known_item_ids=np.array([3, 2, 1, 8]))
  assert sent["history_item_ids"].tolist() == [[-1, 1, 3]]
  assert sent["seed_item_id"].tolist() == [8]  # the last listen, a skip
  with pytest.raises(client.RequestError, match="Malformed events"):
    client.recommend_from_events(42, [(1, 2)], server="x:1")


def test_events_from_the_command_line_match_the_client(exported, catalogue):
  path = exported[1]["bruteforce"]
  ids = catalogue.item_ids
  raw = [(int(ids[1]), 100, "listen"), (int(ids[2]), 20, "listen"),
         (int(ids.max()) + 5, 90, "listen"), (int(ids[3]), 60, "listen"),
         (int(ids[1]), None, "like"), (int(ids[4]), 30, "listen")]
  expected = client.recommend(7, ids[4], [ids[1], ids[3]],
                              saved_model=path)
  got = client.recommend_from_events(7, raw, saved_model=path)
  np.testing.assert_array_equal(got.item_ids, expected.item_ids)
  spec = ",".join(f"{i}:{'' if r is None else r}:{t}" for i, r, t in raw)
  out = subprocess.run(
      [sys.executable, "-m", "export.recommend", "--user_id=7",
       f"--events={spec}", f"--saved_model={path}", "--json", "--top=20"],
      capture_output=True, text=True, check=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert json.loads(out.stdout)["item_ids"] == expected.item_ids.tolist()
