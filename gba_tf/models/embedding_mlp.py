"""A small CTR model: one shared embedding table + MLP, logits out."""

from typing import Sequence

import tensorflow as tf


def embedding_mlp(num_fields: int, vocab_size: int, embedding_dim: int = 8,
                  hidden: Sequence[int] = (64, 32), seed: int = 0):
  """Keras functional model: ids [batch, num_fields] -> logits [batch, 1].

  The embedding table is one variable, so a `variable_partitioner` on the
  strategy shards it across PS tasks and its gradients are IndexedSlices.
  """
  ids = tf.keras.Input(shape=(num_fields,), dtype=tf.int64, name="ids")
  x = tf.keras.layers.Embedding(
      vocab_size, embedding_dim, name="embedding",
      embeddings_initializer=tf.keras.initializers.RandomUniform(
          -0.05, 0.05, seed=seed))(ids)
  x = tf.keras.layers.Flatten()(x)
  for i, units in enumerate(hidden):
    x = tf.keras.layers.Dense(
        units, activation="relu", name=f"hidden_{i}",
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 1 + i))(x)
  logits = tf.keras.layers.Dense(
      1, name="logits",
      kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 100))(x)
  return tf.keras.Model(ids, logits, name="embedding_mlp")
