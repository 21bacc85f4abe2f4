"""DeepFM-style CTR model (Guo et al., 2017, arXiv 1703.04247).

Example:

>>> model = deepfm(num_fields=8, vocab_size=1000)
>>> model(tf.zeros([2, 8], tf.int64)).shape
TensorShape([2, 1])
"""

from typing import Sequence

import tensorflow as tf

from gba_tf.models import common


class FactorizationMachine(tf.keras.layers.Layer):
  """Second-order FM term: sum_{i<j} <v_i, v_j> per example (paper Eq. 3).

  Computed in O(F d) as 0.5 * sum_d((sum_i v_i)^2 - sum_i v_i^2).
  Input [batch, fields, d]; output [batch, 1].
  """

  def call(self, embeddings):
    square_of_sum = tf.square(tf.reduce_sum(embeddings, axis=1))
    sum_of_squares = tf.reduce_sum(tf.square(embeddings), axis=1)
    return 0.5 * tf.reduce_sum(square_of_sum - sum_of_squares, axis=1,
                               keepdims=True)


class SumFields(tf.keras.layers.Layer):
  """[batch, fields, 1] first-order weights -> their sum, [batch, 1]."""

  def call(self, weights):
    return tf.reduce_sum(weights, axis=1)


def deepfm(num_fields: int, vocab_size: int, embedding_dim: int = 8,
           deep: Sequence[int] = (64, 32), seed: int = 0) -> tf.keras.Model:
  """DeepFM: first-order weights + FM interactions + MLP, summed as logits.

  The FM and deep parts share one embedding table (the paper's point: no
  feature engineering, one set of embeddings); a second one-wide table holds
  the first-order weights. Both are single variables that a
  `variable_partitioner` shards.
  """
  ids, embeddings = common.ids_and_embeddings(num_fields, vocab_size,
                                             embedding_dim, seed)
  first_order = tf.keras.layers.Embedding(
      vocab_size, 1, name="linear",
      embeddings_initializer="zeros")(ids)
  linear = SumFields(name="linear_sum")(first_order)
  fm = FactorizationMachine(name="fm")(embeddings)
  x = tf.keras.layers.Flatten()(embeddings)
  x = common.relu_stack(x, deep, "deep", seed + 1)
  deep_logit = common.logit(x, "deep_logit", seed + 100)
  logits = tf.keras.layers.Add(name="logits")([linear, fm, deep_logit])
  return tf.keras.Model(ids, logits, name="deepfm")
