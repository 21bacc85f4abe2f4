"""DCN-v2 ranking model (Wang et al., 2021, arXiv 2008.13535) with TFRS.

Example:

>>> model = dcn_v2(num_fields=8, vocab_size=1000)
>>> model(tf.zeros([2, 8], tf.int64)).shape
TensorShape([2, 1])
"""

from typing import Optional, Sequence

import tensorflow as tf
import tensorflow_recommenders as tfrs

from gba_tf.models import common


def dcn_v2(num_fields: int, vocab_size: int, embedding_dim: int = 8,
           num_cross_layers: int = 2, projection_dim: Optional[int] = None,
           deep: Sequence[int] = (64, 32), seed: int = 0) -> tf.keras.Model:
  """Stacked DCN-v2: ids [batch, num_fields] -> logits [batch, 1].

  One embedding table serves every field (ids are global), so a
  `variable_partitioner` shards it across PS tasks and its gradients are
  IndexedSlices. The concatenated embeddings x0 go through
  `num_cross_layers` cross layers, x_{l+1} = x0 * (W x_l + b) + x_l
  (DCN-v2 paper, Eq. 1; `tfrs.layers.dcn.Cross`), then a deep MLP.

  Args:
    num_fields: categorical fields per example.
    vocab_size: rows of the shared embedding table.
    embedding_dim: width of each field's embedding.
    num_cross_layers: cross layers.
    projection_dim: low-rank size of W (DCN-Mix style); None for full rank.
    deep: units of the MLP after the cross network.
    seed: initializer seed.
  """
  ids, x = common.ids_and_embeddings(num_fields, vocab_size, embedding_dim,
                                    seed)
  x0 = tf.keras.layers.Flatten()(x)
  x = x0
  for i in range(num_cross_layers):
    x = tfrs.layers.dcn.Cross(
        projection_dim=projection_dim, name=f"cross_{i}",
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 1 + i)
    )(x0, x)
  x = common.relu_stack(x, deep, "deep", seed + 50)
  return tf.keras.Model(ids, common.logit(x, "logits", seed + 100),
                        name="dcn_v2")
