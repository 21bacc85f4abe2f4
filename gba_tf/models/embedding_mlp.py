"""A small CTR model: one shared embedding table + MLP, logits out."""

from typing import Sequence

import tensorflow as tf

from gba_tf.models import common


def embedding_mlp(num_fields: int, vocab_size: int, embedding_dim: int = 8,
                  hidden: Sequence[int] = (64, 32), seed: int = 0):
  """Keras functional model: ids [batch, num_fields] -> logits [batch, 1].

  The embedding table is one variable, so a `variable_partitioner` on the
  strategy shards it across PS tasks and its gradients are IndexedSlices.
  """
  ids, x = common.ids_and_embeddings(num_fields, vocab_size, embedding_dim,
                                    seed)
  x = tf.keras.layers.Flatten()(x)
  x = common.relu_stack(x, hidden, "hidden", seed + 1)
  return tf.keras.Model(ids, common.logit(x, "logits", seed + 100),
                        name="embedding_mlp")
