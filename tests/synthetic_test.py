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

  def test_zipf_shape(self):
    # P(rank r) = r^-s / H with s = 1.1 over 1000 ranks. Rank 1 vs rank 2:
    # 2^1.1 = 2.14; rank 1 vs rank 10: 10^1.1 = 12.6.
    data = synthetic.SyntheticCTR(num_fields=2, vocab_per_field=1000)
    p = data.rank_probabilities()
    self.assertAllClose(p[0] / p[1], 2 ** 1.1)
    self.assertAllClose(p[0] / p[9], 10 ** 1.1)
    ids, _ = data.sample(200_000, seed=0)
    counts = np.bincount(ids[:, 0], minlength=1000)
    # Empirical frequencies follow the law for the head ranks (+-5%).
    self.assertAllClose(counts[:5] / counts.sum(), p[:5], rtol=0.05)
    # A heavy tail: the top 1% of ids carry over a third of the mass,
    # yet most ids are seen.
    self.assertGreater(counts[:10].sum() / counts.sum(), 0.33)
    self.assertGreater((counts > 0).mean(), 0.9)

  def test_labels_follow_the_hidden_model(self):
    data = synthetic.SyntheticCTR(num_fields=4, vocab_per_field=200)
    ids, labels = data.sample(100_000, seed=7)
    prob = 1.0 / (1.0 + np.exp(-data.logits(ids)))
    # Calibration: in each decile of the true probability, the click rate
    # matches the mean probability.
    edges = np.quantile(prob, np.linspace(0, 1, 11))
    bucket = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, 9)
    for b in range(10):
      in_b = bucket == b
      self.assertAllClose(labels[in_b].mean(), prob[in_b].mean(), atol=0.02)
    # The true probabilities rank examples best: their AUC is the ceiling
    # that best_auc() reports (same sample, same value).
    self.assertAlmostEqual(synthetic.auc(labels, prob),
                           synthetic.auc(labels, data.logits(ids)))

  def test_default_generator_meets_the_benchmark_spec(self):
    data = synthetic.SyntheticCTR()
    self.assertGreaterEqual(data.num_fields, 8)
    self.assertGreaterEqual(data.vocab_size, 100_000)


if __name__ == "__main__":
  tf.test.main()
