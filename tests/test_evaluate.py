"""Yambda protocol, coverage and popularity, Recall@k plot, projector."""

import collections
import glob
import os
import types

from matplotlib import image as mpimg
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from tensorboard.plugins import projector as tb_projector
from google.protobuf import text_format

from data_prep import generate
from tfrs_yambda import baselines
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import metrics
from tfrs_yambda import oracle
from tfrs_yambda import plots
from tfrs_yambda import projector
from tfrs_yambda import ranking
from tfrs_yambda import report
from tfrs_yambda import schema
from tfrs_yambda import target_kinds as target_kinds_lib
from tfrs_yambda import yambda_protocol
from tests.conftest import HISTORY_LENGTH
from tests.test_prep import reference_listens

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- Metrics over relevant sets ---------------------------------------------


def test_set_metrics_on_known_lists():
  # User 0: relevant {1, 2, 3}, hits at positions 1 and 3.
  # User 1: relevant {7}, hit at position 4.
  top = np.array([[1, 5, 2, 6], [5, 6, 8, 7]])
  relevant = [np.array([1, 2, 3]), np.array([7])]
  result = metrics.set_metrics(top, relevant, ks=(1, 2, 4), num_items=10)
  d = 1 / np.log2(np.arange(2, 6))  # discounts of positions 1..4
  assert result["recall@1"] == pytest.approx((1 / 1 + 0) / 2)
  assert result["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
  # min(k, |R|): user 0 can hit at most 3 of 4, user 1 at most 1.
  assert result["recall@4"] == pytest.approx((2 / 3 + 1 / 1) / 2)
  assert result["ndcg@1"] == pytest.approx((1 + 0) / 2)
  assert result["ndcg@2"] == pytest.approx((1 / (d[0] + d[1]) + 0) / 2)
  assert result["ndcg@4"] == pytest.approx(
      ((d[0] + d[2]) / (d[0] + d[1] + d[2]) + d[3] / d[0]) / 2)
  assert result["coverage@1"] == pytest.approx(2 / 10)  # {1, 5}
  assert result["coverage@4"] == pytest.approx(6 / 10)  # {1, 2, 5, 6, 7, 8}
  assert result["users"] == 2


def test_set_metrics_perfect_lists_score_one():
  top = np.array([[3, 1, 2, 9], [4, 8, 9, 1]])
  relevant = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8])]
  result = metrics.set_metrics(top, relevant, ks=(1, 3), num_items=9)
  assert result["recall@1"] == result["ndcg@1"] == 1.0
  assert result["recall@3"] == pytest.approx((1 + 2 / 3) / 2)
  assert result["ndcg@3"] < 1.0


def test_set_metrics_rejects_empty_sets_and_short_lists():
  with pytest.raises(ValueError, match="at least one relevant"):
    metrics.set_metrics(np.array([[1, 2]]), [np.array([], np.int64)], (2,), 5)
  with pytest.raises(ValueError, match="shorter"):
    metrics.set_metrics(np.array([[1, 2]]), [np.array([1])], (3,), 5)


def test_popularity_percentile_counts_ties_half():
  # Items 1..4 with 5, 3, 3, 0 training positives (index 0 is unknown).
  percentile = metrics.popularity_percentile(np.array([0, 5, 3, 3, 0]))
  assert np.isnan(percentile[0])
  np.testing.assert_allclose(percentile[1:], [3.5 / 4, 2 / 4, 2 / 4, 0.5 / 4])


def test_retrieved_item_stats_coverage_and_popularity():
  popularity = np.array([np.nan, 0.9, 0.7, 0.5, 0.3, 0.1])
  stats = metrics.RetrievedItemStats([1, 2], popularity)
  stats.add(np.array([[1, 2], [1, 3]]))
  stats.add(np.broadcast_to(np.array([4, 1]), (2, 2)))
  result = stats.result()
  assert result["coverage@1"] == pytest.approx(2 / 5)  # {1, 4}
  assert result["coverage@2"] == pytest.approx(4 / 5)  # {1, 2, 3, 4}
  assert result["popularity@1"] == pytest.approx((0.9 + 0.9 + 0.3 + 0.3) / 4)
  assert result["popularity@2"] == pytest.approx(
      (0.9 + 0.7 + 0.9 + 0.5 + 2 * (0.3 + 0.9)) / 8)
  with pytest.raises(ValueError, match="shorter"):
    stats.add(np.array([[1]]))


def test_recall_curve_from_ranks():
  ks = metrics.recall_curve_ks(1000)
  assert ks[0] == 1 and ks[-1] == 1000 and np.all(np.diff(ks) > 0)
  # Every k to 500, then sampled.
  np.testing.assert_array_equal(ks[:500], np.arange(1, 501))
  assert 500 < len(ks) < 560
  np.testing.assert_array_equal(metrics.recall_curve_ks(7), np.arange(1, 8))
  assert len(metrics.recall_curve_ks(10_000, every_to=0)) < 60
  np.testing.assert_allclose(
      metrics.recall_curve(np.array([10, 1, 3]), [1, 2, 3, 10]),
      [1 / 3, 1 / 3, 2 / 3, 1])


# --- The Yambda protocol's users, relevant sets and queries -----------------


def test_relevant_sets_keep_only_users_seen_in_training():
  test = {schema.USER_ID: np.array([1, 1, 1, 2, 3, 2]),
          schema.TARGET_ITEM: np.array([5, 5, 6, 7, 8, 9])}
  uids, relevant, unseen = yambda_protocol.relevant_sets(
      test, known_users=np.array([3, 1, 4]))
  np.testing.assert_array_equal(uids, [1, 3])
  assert [r.tolist() for r in relevant] == [[5, 6], [8]]  # distinct items
  assert unseen == 1  # user 2


def test_record_end_states_stop_before_the_cut():
  rule = input_pipeline.ExampleRule(min_played_ratio=50)
  # Record 0 (user 7): listens at t=1..5, the cut at t=5; the listen at t=4
  # is a skip, so the seed is item 14 and the history its positives.
  # Record 1 (user 8): everything after the cut: no state.
  batch = {
      schema.UID: np.array([7, 8]),
      "row_splits": np.array([0, 5, 7]),
      schema.ITEMS: np.array([11, 12, 13, 14, 15, 21, 22]),
      schema.TIMESTAMPS: np.array([1, 2, 3, 4, 5, 6, 7]),
      schema.PLAYED_RATIOS: np.array([100, 80, 90, 10, 100, 100, 100]),
      schema.FEEDBACK: np.array([0, schema.FEEDBACK_DISLIKED, 0, 0, 0, 0, 0]),
  }
  states = yambda_protocol.record_end_states(batch, before=5,
                                             history_length=3, rule=rule)
  assert len(states) == 1
  row = states.iloc[0]
  assert (row.uid, row.seed, row.listen_time, row.positive_time,
          row.num_positives) == (7, 14, 4, 3, 2)
  # Item 12 was disliked: not a positive. Left-padded, oldest first.
  assert row.history.tolist() == [0, 11, 13]


def _reference_states(root, catalogue, uids):
  """Seed and history at train_end, computed row by row from the raw parquet
  with the feedback given before train_end."""
  train_end = catalogue.metadata["train_end"]
  expected = {}
  for uid, listens in reference_listens(root, uids, before=train_end).items():
    before = [listen for listen in listens if listen[0] < train_end]
    positives = [item for _, item, ratio, fb in before
                 if round(ratio) >= catalogue.metadata["min_played_ratio"]
                 and fb != schema.FEEDBACK_DISLIKED]
    history = ([0] * HISTORY_LENGTH +
               catalogue.item_index(positives).tolist())[-HISTORY_LENGTH:]
    expected[uid] = (int(catalogue.item_index([before[-1][1]])[0]), history)
  return expected


def test_user_states_match_a_row_by_row_reference(tiny_yambda, prepared,
                                                  catalogue):
  rule = input_pipeline.ExampleRule(
      min_played_ratio=catalogue.metadata["min_played_ratio"])
  states = yambda_protocol.user_states(
      prepared, catalogue.metadata["train_end"], HISTORY_LENGTH, rule)
  test = evaluate.load_examples(prepared, "test", HISTORY_LENGTH, rule,
                                keys=[schema.USER_ID, schema.TARGET_ITEM])
  uids, _, _ = yambda_protocol.relevant_sets(test, catalogue.user_ids[1:])
  expected = _reference_states(tiny_yambda, catalogue, uids)
  assert len(expected) == len(uids) > 50
  actual = {uid: (int(states.loc[uid, "seed"]),
                  states.loc[uid, "history"].tolist()) for uid in uids}
  assert actual == expected


def test_protocol_scores_model_and_baselines(trained_model, prepared,
                                            catalogue):
  rule = input_pipeline.ExampleRule()
  popular = baselines.MostPopular(
      catalogue.num_items + 1,
      np.repeat(np.arange(len(catalogue.item_train_count)),
                catalogue.item_train_count))
  protocol = yambda_protocol.evaluate(trained_model, catalogue, prepared,
                                      rule, [popular], ks=(10, 50, 100))
  assert set(protocol["retrievers"]) == {"model", "most_popular"}
  assert protocol["users"] > 50
  assert protocol["users_without_training_listens"] == 0
  for row in protocol["retrievers"].values():
    for name, value in row.items():
      assert 0.0 <= value <= 1.0, name
  # One list for every user: coverage is exactly k / candidates.
  candidates = catalogue.num_candidates(catalogue.metadata["test_start"])
  assert protocol["retrievers"]["most_popular"]["coverage@50"] == (
      pytest.approx(50 / candidates))
  table = report.protocol_table(protocol)
  assert table.splitlines()[0].split()[1:4] == ["recall@10", "recall@50",
                                                "recall@100"]


def test_weighted_metrics_count_each_test_example_at_its_weight(
    trained_model, prepared, catalogue):
  # Training without weights must not change what weighted metrics mean.
  unweighted = input_pipeline.ExampleRule(use_weights=False)
  results = evaluate.evaluate(trained_model, catalogue, prepared,
                              unweighted, ks=(10, 100), with_baselines=False)
  test = evaluate.load_examples(prepared, "test", HISTORY_LENGTH,
                                input_pipeline.ExampleRule())
  weights = test[schema.WEIGHT]
  assert weights.min() < 1 < weights.max()
  candidates = catalogue.num_candidates(catalogue.metadata["test_start"])
  ranks = ranking.model_ranks(trained_model, test,
                              ranking.candidate_embeddings(
                                  trained_model, candidates + 1))
  hit = ranks <= 100
  assert results["model"]["weighted_recall@100"] == pytest.approx(
      np.sum(weights * hit) / weights.sum())
  assert results["model"]["recall@100"] == pytest.approx(hit.mean())


def test_window_examples_have_the_prepared_history_length_and_weights(
    prepared, catalogue):
  # The catalogue carries the N the records were written with: nothing
  # downstream of the prep is told it again.
  assert catalogue.history_length == HISTORY_LENGTH
  unweighted = input_pipeline.ExampleRule(use_weights=False)
  test = evaluate.window_examples(catalogue, prepared, "test", unweighted)
  assert test[schema.HISTORY_ITEMS].shape[1] == HISTORY_LENGTH
  # Scored examples always carry their weights (`evaluate.test_rule`).
  assert test[schema.WEIGHT].min() < 1 < test[schema.WEIGHT].max()
  np.testing.assert_array_equal(
      test[schema.TARGET_ITEM],
      evaluate.load_examples(prepared, "test", HISTORY_LENGTH, unweighted,
                             keys=[schema.TARGET_ITEM])[schema.TARGET_ITEM])


def test_oracle_files_without_components_still_give_ranks(
    prepared, catalogue, tmp_path):
  path = oracle.oracle_path(catalogue)
  older = str(tmp_path / "oracle.parquet")  # as written before components
  pq.write_table(pq.read_table(path).drop(["component"]), older)
  test = evaluate.load_examples(prepared, "test", HISTORY_LENGTH,
                                input_pipeline.ExampleRule())
  new, old = (oracle.oracle_ranks(p, catalogue, test) for p in (path, older))
  np.testing.assert_array_equal(old["oracle_rank"], new["oracle_rank"])
  assert (new["oracle_rank"] > 0).mean() > 0.99
  assert set(old["component"]) == {""}
  assert set(new["component"]) == set(generate.COMPONENTS)


# --- Plot and projector -------------------------------------------------------


def test_recall_plot_is_a_png(tmp_path):
  path = str(tmp_path / "eval" / "recall_at_k.png")
  ks = metrics.recall_curve_ks(500)
  plots.write_recall_plot(
      {"k": ks.tolist(), "model": np.linspace(0.1, 0.9, len(ks)).tolist(),
       "most_popular": np.linspace(0.0, 0.3, len(ks)).tolist(),
       "oracle": np.linspace(0.3, 1.0, len(ks)).tolist()}, path)
  with open(path, "rb") as f:
    assert f.read(8) == _PNG_SIGNATURE
  pixels = mpimg.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
  assert pixels.std() > 0.05  # something was drawn
  assert os.listdir(os.path.dirname(path)) == ["recall_at_k.png"]


def test_select_items_keeps_popular_and_some_cold():
  counts = np.array([0, 9, 8, 7, 0, 0])
  np.testing.assert_array_equal(
      projector.select_items(counts, 4, cold_share=0.25), [1, 2, 3, 4])
  np.testing.assert_array_equal(
      projector.select_items(counts, 3, cold_share=0.34), [1, 2, 4])
  np.testing.assert_array_equal(projector.select_items(counts, 10), range(1, 6))
  # Too few warm items: the cold ones fill the slots.
  np.testing.assert_array_equal(
      projector.select_items(np.array([0, 5, 0, 0, 0, 0]), 4, 0.25),
      [1, 2, 3, 4])


def test_projector_files_are_consistent(trained_model, catalogue, tmp_path):
  folder = projector.write(trained_model, catalogue, str(tmp_path),
                           max_items=300)
  config = tb_projector.ProjectorConfig()
  with open(os.path.join(folder, "projector_config.pbtxt")) as f:
    text_format.Parse(f.read(), config)
  assert [e.tensor_name for e in config.embeddings] == [projector.TENSOR_NAME]
  checkpoint = tf.train.latest_checkpoint(folder)
  embeddings = tf.train.load_variable(checkpoint, projector.TENSOR_NAME)
  with open(os.path.join(folder, config.embeddings[0].metadata_path)) as f:
    lines = f.read().splitlines()
  rows = [line.split("\t") for line in lines[1:]]
  assert lines[0].split("\t")[0] == "index"
  assert embeddings.shape[0] == len(rows) == 300
  indices = np.array([int(r[0]) for r in rows])
  np.testing.assert_allclose(
      embeddings, trained_model.candidate_tower(tf.constant(indices)).numpy(),
      atol=1e-6)
  cold = collections.Counter(r[-1] for r in rows)
  assert cold["yes"] == min(30, int(np.sum(catalogue.item_train_count == 0)))
  assert [int(r[1]) for r in rows] == catalogue.item_ids[indices].tolist()
  assert glob.glob(os.path.join(folder, "events.out.tfevents.*"))
  assert not os.path.exists(folder + ".tmp")


def test_target_kinds_are_exclusive_and_in_order():
  # Indices 1..6; items 1, 2 on album 1 of artist 1, item 3 on album 2 of
  # artist 1, items 4, 5 on album 3 of artist 2; item 6 has none (0).
  catalogue = types.SimpleNamespace(
      item_album=np.array([0, 1, 1, 2, 3, 3, 0]),
      item_artist=np.array([0, 1, 1, 1, 2, 2, 0]))
  test = {
      schema.SEED_ITEM: np.array([1, 1, 1, 1, 1, 6, 4]),
      schema.TARGET_ITEM: np.array([1, 2, 3, 4, 2, 6, 5]),
      schema.HISTORY_ITEMS: np.array([[0, 0], [0, 0], [0, 0], [0, 0], [2, 0],
                                      [0, 0], [0, 0]]),
  }
  kinds = target_kinds_lib.target_kinds(test, catalogue)
  assert list(kinds) == ["replay of the seed", "in the history",
                         "seed's album", "seed's artist", "other"]
  expected = ["replay of the seed", "seed's album", "seed's artist", "other",
              "in the history", "replay of the seed", "seed's album"]
  for i, kind in enumerate(expected):
    assert [name for name, mask in kinds.items() if mask[i]] == [kind]
  by_kind = target_kinds_lib.recall_by_target_kind(
      {"r": (np.array([1, 5, 50, 200, 2, 1, 1]), np.ones(7, bool))}, kinds,
      [10, 100])
  assert by_kind["share"]["seed's album"] == 2 / 7
  assert by_kind["r"]["seed's album"] == {"recall@10": 1.0, "recall@100": 1.0}
  assert by_kind["r"]["seed's artist"] == {"recall@10": 0.0, "recall@100": 1.0}
  assert by_kind["r"]["other"] == {"recall@10": 0.0, "recall@100": 0.0}
