"""A causal self-attention history encoder: SASRec inside the query tower.

The mean of the history's item features forgets their order: a track heard
a minute ago counts as much as one from last week, and what followed what is
lost. Self-attention (Kang & McAuley 2018, "Self-Attentive Sequential
Recommendation") reads the history as a sequence instead. Here the sequence
is the user's last N positive listens, oldest first, with the seed (the
track just played) appended as its last position; the seed's output vector,
which has attended to everything before it, summarises the history for the
query MLP in place of the mean. Training is unchanged: the same Retrieval
loss, logQ correction and example weights as the mean-pooled tower.

Order enters through learned position embeddings only. The time since each
listen would say more, but the serving signature carries ids, not
timestamps, so the model could not be given it at serving.
"""

import tensorflow as tf


def attention_mask(valid: tf.Tensor, queries: int) -> tf.Tensor:
  """[batch, n] valid slots -> [batch, queries, n] who may attend to whom.

  The queries are the last `queries` of the n slots. Slot i attends to slot
  j if j is not later (causal: a later listen never changes an earlier
  slot's vector) and j is valid, i.e. not padding. Every slot may attend to
  itself, so a padding slot, whose row would otherwise be empty, attends to
  itself alone and never leaks the future into its (unused) vector.

  Args:
    valid: whether each slot holds an item.
    queries: how many of the last slots ask (n: all; 1: the last only).

  Returns:
    A boolean mask, True where attention is allowed.
  """
  n = tf.shape(valid)[1]
  query_slots = tf.range(n - queries, n)[:, tf.newaxis]
  key_slots = tf.range(n)[tf.newaxis, :]
  causal = key_slots <= query_slots
  itself = key_slots == query_slots
  return causal[tf.newaxis] & (valid[:, tf.newaxis, :] | itself[tf.newaxis])


class CausalHistoryEncoder(tf.keras.layers.Layer):
  """(history, seed) item indices -> the seed position's [batch, width].

  Each slot of the sequence (history oldest first, front-padded with index
  0, then the seed) is its item's features, projected to `width`, plus a
  learned embedding of its position counted from the end: the seed is
  position 0, the latest history item 1, and so on. Histories are
  right-aligned, so counting from the end gives a slot the same position
  however full the history is, and padding more in front changes nothing.
  Then come `blocks` pre-LayerNorm Transformer blocks: causal multi-head
  self-attention that never attends to padding (`attention_mask`), then a
  position-wise feed-forward of width `width` (SASRec's), each added back to
  its input (residual), with dropout. The last block only computes the seed
  position: nothing reads the others.
  """

  def __init__(self, item_encoder: tf.keras.layers.Layer, max_length: int,
               width: int, blocks: int = 2, heads: int = 2,
               dropout: float = 0.0, **kwargs):
    """See the class docstring.

    Args:
      item_encoder: the shared `towers.ItemEncoder` (its `sequence` method
        looks up each distinct item of a batch once).
      max_length: the longest sequence, N history slots + 1 for the seed.
      width: d, the sequence's width.
      blocks: attention blocks (at least 1).
      heads: attention heads, each of width d / heads.
      dropout: dropout rate of the inputs, the attention weights and each
        block's residual branches (training only).
      **kwargs: passed to `tf.keras.layers.Layer`.
    """
    super().__init__(**kwargs)
    if blocks < 1 or heads < 1 or width % heads:
      raise ValueError(f"Need blocks >= 1 and heads dividing width, got "
                       f"blocks={blocks}, heads={heads}, width={width}.")
    self.item_encoder = item_encoder
    self.max_length = max_length
    self.projection = tf.keras.layers.Dense(width, name="item_projection")
    self.positions = self.add_weight(
        name="position_embedding", shape=(max_length, width),
        initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02))
    self.input_dropout = tf.keras.layers.Dropout(dropout)
    self.blocks = [_Block(width, heads, dropout, name=f"block_{i}")
                   for i in range(blocks)]
    self.output_norm = tf.keras.layers.LayerNormalization(name="output_norm")

  def call(self, history: tf.Tensor, seed=None, training=None,
           sequence: bool = False) -> tf.Tensor:
    """Encodes the sequence; returns its last position (or every position).

    Args:
      history: [batch, n] item indices, oldest first, 0 = padding.
      seed: [batch] item indices of the seed, the last position; None: the
        sequence is the history alone (a tower without seed features), and
        its latest item is position 0.
      training: whether dropout is on.
      sequence: return every position's vector, [batch, n (+ 1), width]
        (to inspect the encoder); by default only the last, [batch, width].

    Returns:
      The encoded last position, or every position.
    """
    items, valid = history, history > 0
    if seed is not None:
      # The seed (even an unknown one, index 0) is always a position.
      items = tf.concat([history, seed[:, tf.newaxis]], axis=1)
      valid = tf.concat([valid, tf.ones_like(seed[:, tf.newaxis], tf.bool)],
                        axis=1)
    length = items.shape[1]
    if length is not None and length > self.max_length:
      raise ValueError(f"A sequence of {length} is longer than the "
                       f"{self.max_length} positions the encoder has.")
    n = tf.shape(items)[1]
    # Slot i of n is position n - 1 - i from the end.
    x = (self.item_encoder.sequence(items, self.projection) +
         tf.reverse(self.positions[:n], axis=[0]))
    x = self.input_dropout(x, training=training)
    for i, block in enumerate(self.blocks):
      last = i == len(self.blocks) - 1 and not sequence
      x = block(x, attention_mask(valid, 1 if last else n), training=training)
    x = self.output_norm(x)
    return x if sequence else x[:, -1]


class _Block(tf.keras.layers.Layer):
  """x + attention(LN(x)), then x + feed-forward(LN(x)), for the queries.

  The queries are the last `mask.shape[1]` slots of x; keys and values are
  all of x. Layer norm before each branch (pre-LN) keeps the residual path
  an identity, which trains stably without a warm-up of its own.
  """

  def __init__(self, width: int, heads: int, dropout: float, **kwargs):
    super().__init__(**kwargs)
    self.attention_norm = tf.keras.layers.LayerNormalization()
    self.attention = tf.keras.layers.MultiHeadAttention(
        heads, width // heads, dropout=dropout)
    self.feed_forward_norm = tf.keras.layers.LayerNormalization()
    self.feed_forward = tf.keras.Sequential([
        tf.keras.layers.Dense(width, activation="relu"),
        tf.keras.layers.Dense(width)])
    self.dropout = tf.keras.layers.Dropout(dropout)

  def call(self, x: tf.Tensor, mask: tf.Tensor, training=None) -> tf.Tensor:
    queries = tf.shape(mask)[1]
    normed = self.attention_norm(x)
    x = x[:, -queries:] + self.dropout(self.attention(
        normed[:, -queries:], normed, attention_mask=mask,
        training=training), training=training)
    return x + self.dropout(
        self.feed_forward(self.feed_forward_norm(x)), training=training)
