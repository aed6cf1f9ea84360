"""Query heads: max-sim scores in the loss, the ranks and the merged top k."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from export import export
from tfrs_yambda import model as model_lib
from tfrs_yambda import query_heads
from tfrs_yambda import ranking
from tfrs_yambda import schema
from tfrs_yambda import towers
from tests.conftest import SMALL_TOWERS
from tests.conftest import assert_steps_lower_the_loss
from tests.conftest import train_batch

HEADS = 3


def _model(catalogue, heads=HEADS, **tower_options):
  tf.keras.utils.set_random_seed(1)
  return model_lib.TwoTowerModel(catalogue, towers.TowerConfig(
      **{**SMALL_TOWERS, "query_heads": heads, **tower_options}))


def _max_sim(queries, candidates):
  """Numpy reference: [batch, heads, d] x [n, d] -> [batch, n]."""
  return np.einsum("bhd,nd->bhn", queries, candidates).max(axis=1)


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _embeddings(seed=0, batch=6, heads=HEADS, n=200, d=8):
  """Random unit (queries [batch, heads, d], candidates [n, d])."""
  rng = np.random.default_rng(seed)
  return (_unit(rng.normal(size=(batch, heads, d))),
          _unit(rng.normal(size=(n, d))))


def _variables(model):
  """(name without Keras's numbering, shape) of each variable, in order."""
  return [(re.sub(r"_\d+", "", v.name), tuple(v.shape))
          for v in model.variables]


def test_max_sim_is_the_max_over_heads_and_one_head_a_dot_product():
  queries, candidates = _embeddings()
  np.testing.assert_allclose(
      query_heads.max_sim(tf.constant(queries), tf.constant(candidates)),
      _max_sim(queries, candidates), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
      query_heads.max_sim(tf.constant(queries[:, 0]), tf.constant(candidates)),
      tf.matmul(queries[:, 0], candidates, transpose_b=True))
  # A NaN in any head is a NaN score, which the ranking counts as a miss.
  broken = queries.copy()
  broken[0, 1, 0] = np.nan
  assert np.isnan(query_heads.max_sim(tf.constant(broken),
                                      tf.constant(candidates))[0]).all()


def test_merge_keeps_each_item_once_with_its_best_score():
  # Two heads' top-3 lists per row; items 7 and 5 are in both of row 0's.
  scores = tf.constant([[0.9, 0.5, 0.4, 0.8, 0.7, 0.6],
                        [0.3, 0.2, 0.1, 0.6, 0.5, 0.4]])
  items = tf.constant([[7, 5, 2, 5, 7, 9], [1, 2, 3, 4, 5, 6]], tf.int64)
  merged_scores, merged_items = query_heads.merge_top_k(scores, items, 3)
  np.testing.assert_array_equal(merged_items, [[7, 5, 9], [4, 5, 6]])
  np.testing.assert_allclose(merged_scores, [[0.9, 0.8, 0.6],
                                             [0.6, 0.5, 0.4]])


@pytest.mark.parametrize("kind", ["bruteforce", "scann"])
def test_max_sim_top_k_of_an_index_is_the_exact_max_sim_top_k(kind):
  queries, candidates = _embeddings()
  # Heads 0 and 1 nearly agree, so their lists share items to merge.
  queries[:, 1] = _unit(queries[:, 0] + 0.1 * queries[:, 1])
  identifiers = 1000 + np.arange(len(candidates), dtype=np.int64)
  k = 10
  per_head = np.argsort(-queries @ candidates.T, axis=-1)[..., :k]
  assert all(np.intersect1d(*lists[:2]).size for lists in per_head)
  if kind == "bruteforce":
    index = tfrs.layers.factorized_top_k.BruteForce(k=k)
  else:  # every leaf searched, every candidate rescored: exhaustive
    index = export.ScaNN(k=k, num_leaves=4, num_leaves_to_search=4,
                         num_reordering_candidates=len(candidates))
  index = query_heads.MaxSimTopK(index, k=k)
  index.index(tf.constant(candidates), tf.constant(identifiers))
  scores, ids = index(tf.constant(queries))
  reference = _max_sim(queries, candidates)
  top = np.argsort(-reference, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(ids, identifiers[top])
  np.testing.assert_allclose(scores, np.take_along_axis(reference, top, 1),
                             atol=1e-5)
  # One-vector queries go to the wrapped index as they are.
  one = queries[:, 0]
  np.testing.assert_array_equal(
      index(tf.constant(one))[1],
      identifiers[np.argsort(-(one @ candidates.T), 1, kind="stable")[:, :k]])


def test_the_tower_gives_unit_heads_and_only_its_output_layer_widens(
    prepared, catalogue):
  batch = train_batch(prepared, catalogue, size=16)
  one, several = _model(catalogue, heads=1), _model(catalogue)
  assert one.query_tower(batch).shape == (16, SMALL_TOWERS["output_dim"])
  queries = several.query_tower(batch).numpy()
  assert queries.shape == (16, HEADS, SMALL_TOWERS["output_dim"])
  np.testing.assert_allclose(np.linalg.norm(queries, axis=-1), 1.0,
                             rtol=1e-5)
  one.compute_loss(batch)
  several.compute_loss(batch)
  wider = [(a, b) for a, b in zip(_variables(one), _variables(several))
           if a != b]
  assert len(_variables(one)) == len(_variables(several))
  # The query MLP's output kernel and bias: d -> K * d columns.
  assert [b[1][-1] for _, b in wider] == [
      HEADS * SMALL_TOWERS["output_dim"]] * 2


def test_the_loss_is_the_one_head_loss_of_the_max_over_heads(
    prepared, catalogue):
  batch = train_batch(prepared, catalogue, size=64)
  model = _model(catalogue)
  targets = batch[schema.TARGET_ITEM]
  queries = model.query_tower(batch).numpy()
  candidates = model.candidate_tower(targets).numpy()
  # The score matrix itself, max over heads plus the example-age trend, as
  # [batch, batch] "queries" against identity "candidates": the one-vector
  # path of the same task then applies temperature, logQ correction,
  # accidental-hit removal and example weights to exactly these scores.
  scores = _max_sim(queries, candidates) + model.temperature * (
      towers.age_features(batch[schema.EXAMPLE_AGE], model.age_scale_days)
      .numpy() @ model.item_encoder.trend(targets).numpy().T)
  expected = tf.nn.compute_average_loss(model.task(
      tf.constant(scores), tf.eye(len(scores)),
      sample_weight=batch[schema.WEIGHT],
      candidate_sampling_probability=model.candidate_probability(
          targets, targets),
      candidate_ids=targets, compute_metrics=False))
  np.testing.assert_allclose(float(model.compute_loss(batch)),
                             float(expected), rtol=1e-4)


@pytest.mark.parametrize("encoder", ["mean", "attention"])
def test_training_several_heads_lowers_the_loss(prepared, catalogue,
                                                encoder):
  assert_steps_lower_the_loss(
      _model(catalogue, history_encoder=encoder, history_dim=16),
      train_batch(prepared, catalogue))


def test_evaluation_ranks_and_top_k_are_max_over_heads(prepared, catalogue):
  model = _model(catalogue)
  examples = {k: v.numpy() for k, v in
              train_batch(prepared, catalogue, size=32).items()}
  candidates = ranking.candidate_embeddings(model, catalogue.num_items + 1)
  queries = model.query_tower(
      {k: examples[k] for k in schema.QUERY_FEATURES}).numpy()
  scores = _max_sim(queries, candidates.numpy())
  scores[:, 0] = -np.inf  # index 0 is never a hit
  targets = examples[schema.TARGET_ITEM]
  target_scores = scores[np.arange(len(targets)), targets][:, None]
  index = np.arange(scores.shape[1])
  expected = 1 + np.sum((scores > target_scores) | (
      (scores == target_scores) & (index < targets[:, None])), axis=1)
  np.testing.assert_array_equal(
      ranking.model_ranks(model, examples, candidates), expected)
  np.testing.assert_array_equal(
      ranking.model_top_k(model, {k: examples[k] for k in
                                  schema.QUERY_FEATURES}, candidates, 5),
      np.argsort(-scores, axis=1, kind="stable")[:, :5])


def test_query_heads_must_be_positive():
  with pytest.raises(ValueError, match="query_heads"):
    towers.TowerConfig(query_heads=0)
