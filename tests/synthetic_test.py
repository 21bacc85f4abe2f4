"""Tests of the synthetic CTR data and the AUC helper."""

import numpy as np

import gba_tf  # noqa: F401
import tensorflow as tf

from gba_tf.data import synthetic


class AucTest(tf.test.TestCase):

  def test_auc_by_hand_with_ties(self):
    # Positives score 0.9 and 0.5, negatives 0.5 and 0.1. Pairs (pos, neg):
    # (0.9,0.5)=1, (0.9,0.1)=1, (0.5,0.5)=tie=1/2, (0.5,0.1)=1 -> 3.5/4.
    self.assertAlmostEqual(
        synthetic.auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]), 0.875)
    self.assertAlmostEqual(synthetic.auc([0, 1], [0.2, 0.8]), 1.0)
    self.assertAlmostEqual(synthetic.auc([1, 0], [0.2, 0.8]), 0.0)
    with self.assertRaisesRegex(ValueError, "one class only"):
      synthetic.auc([1, 1], [0.1, 0.2])


class SyntheticCTRTest(tf.test.TestCase):

  def test_deterministic_by_seed_and_best_auc_above_chance(self):
    data = synthetic.SyntheticCTR(num_fields=3, vocab_per_field=50)
    ids, labels = data.sample(500, seed=4)
    ids2, labels2 = synthetic.SyntheticCTR(num_fields=3,
                                           vocab_per_field=50).sample(500, 4)
    self.assertAllEqual(ids, ids2)
    self.assertAllEqual(labels, labels2)
    # Field f owns ids [50 f, 50 f + 50).
    self.assertAllInRange(ids[:, 1], 50, 99)
    self.assertGreater(data.best_auc(n=2000), 0.6)
    self.assertFalse(np.array_equal(ids, data.sample(500, seed=5)[0]))


if __name__ == "__main__":
  tf.test.main()
