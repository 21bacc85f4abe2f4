"""Reference models: shapes, shardable embeddings, and the FM identity."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from gba_tf import models
from gba_tf.models.deepfm import FactorizationMachine


class ModelsTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.named_parameters(*[(n, n) for n in models.MODELS])
  def test_logits_and_one_embedding_table(self, name):
    model = models.MODELS[name](num_fields=8, vocab_size=500, seed=1)
    ids = np.random.default_rng(0).integers(0, 500, (4, 8))
    self.assertEqual(model(ids).shape, (4, 1))
    # The shared table is one variable: a variable_partitioner shards it.
    self.assertEqual(model.get_layer("embedding").embeddings.shape, (500, 8))
    # Deterministic by seed.
    again = models.MODELS[name](num_fields=8, vocab_size=500, seed=1)
    self.assertAllClose(model(ids), again(ids))

  def test_fm_term_equals_pairwise_sum(self):
    v = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    # sum_{i<j} <v_i, v_j> over fields, by brute force.
    expected = [[sum(v[b, i] @ v[b, j] for i in range(3)
                     for j in range(i + 1, 3))] for b in range(2)]
    self.assertAllClose(FactorizationMachine()(v), expected,
                        rtol=1e-5)

  def test_dcn_uses_tfrs_cross_layers(self):
    model = models.dcn_v2(num_fields=4, vocab_size=50, num_cross_layers=3)
    cross = [l for l in model.layers if l.name.startswith("cross_")]
    self.assertLen(cross, 3)
    self.assertEqual(type(cross[0]).__module__.split(".")[0],
                     "tensorflow_recommenders")


if __name__ == "__main__":
  tf.test.main()
