"""Pieces every reference model shares: the id input and embedding, MLPs."""

from typing import Sequence

import tensorflow as tf


def ids_and_embeddings(num_fields: int, vocab_size: int, embedding_dim: int,
                       seed: int):
  """ids [batch, num_fields] int64 -> embeddings [batch, num_fields, dim].

  One table serves every field (ids are global), so a `variable_partitioner`
  shards it across PS tasks and its gradients are IndexedSlices.
  """
  ids = tf.keras.Input(shape=(num_fields,), dtype=tf.int64, name="ids")
  embeddings = tf.keras.layers.Embedding(
      vocab_size, embedding_dim, name="embedding",
      embeddings_initializer=tf.keras.initializers.RandomUniform(
          -0.05, 0.05, seed=seed))(ids)
  return ids, embeddings


def relu_stack(x, units: Sequence[int], name: str, seed: int):
  """Dense ReLU layers `<name>_<i>`, layer i initialized with seed + i."""
  for i, width in enumerate(units):
    x = tf.keras.layers.Dense(
        width, activation="relu", name=f"{name}_{i}",
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed + i))(x)
  return x


def logit(x, name: str, seed: int):
  return tf.keras.layers.Dense(
      1, name=name,
      kernel_initializer=tf.keras.initializers.GlorotUniform(seed))(x)
