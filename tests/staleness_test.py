"""Tests of the pure staleness policy (formula and runtime table agree)."""

import numpy as np
from absl.testing import parameterized

import gba_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
import tensorflow as tf

from gba_tf import staleness


class StalenessPolicyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      # threshold 2, rate 0.5, drop past 5:
      # tau 0..2 -> 1; tau 3 -> 0.5^1; 4 -> 0.5^2; 5 -> 0.5^3; 6 -> dropped.
      ("exponential", "exponential", 0.5, [1, 1, 1, .5, .25, .125, 0]),
      # inverse: 1 / (1 + rate * (tau - 2)) with rate 1 -> 1/2, 1/3, 1/4.
      ("inverse", "inverse", 1.0, [1, 1, 1, 1 / 2, 1 / 3, 1 / 4, 0]),
      ("none", "none", 0.5, [1, 1, 1, 1, 1, 1, 0]),
  )
  def test_weights_by_hand(self, decay, rate, expected):
    policy = staleness.StalenessPolicy(threshold=2, decay=decay,
                                       decay_rate=rate, max_staleness=5)
    taus = np.arange(7)
    self.assertAllClose(policy.weight(taus), expected)
    # The runtime looks weights up in this table (clamped at its end), so
    # it gives the same weights, for taus past the hard limit too.
    table = policy.weight_table()
    self.assertAllClose(table, expected)
    self.assertAllClose(table[np.minimum(np.arange(40), len(table) - 1)],
                        policy.weight(np.arange(40)))
    self.assertAllEqual(policy.accepts(taus), [True] * 6 + [False])

  def test_no_hard_limit_never_drops(self):
    policy = staleness.StalenessPolicy(threshold=0, decay="exponential",
                                       decay_rate=0.5, max_staleness=None)
    # tau = 40: 0.5^40 ~ 9.1e-13, tiny but accepted.
    self.assertTrue(bool(policy.accepts(40)))
    self.assertAllClose(policy.weight(40), 0.5**40)
    self.assertAllClose(policy.weight_table()[40], 0.5**40)

  @parameterized.named_parameters(
      ("negative_threshold", dict(threshold=-1), "staleness_threshold=-1"),
      ("unknown_decay", dict(decay="linear"), "decay='linear'"),
      ("bad_rate", dict(decay="exponential", decay_rate=1.5),
       "decay_rate=1.5"),
      ("negative_limit", dict(max_staleness=-2), "max_staleness=-2"),
  )
  def test_rejects_bad_values(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      staleness.StalenessPolicy(**kwargs)


if __name__ == "__main__":
  tf.test.main()
