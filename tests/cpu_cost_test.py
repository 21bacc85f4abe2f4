"""CPU per local step compared at equal load (`gba_tf.launch.cpu_cost`)."""

import math

import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf

from gba_tf.launch import cpu_cost


def _run(mode, step_ms, rate, ps, worker=1.0, chief=1.0):
  return {"mode": mode, "step_ms": step_ms, "local_steps_per_s": rate,
          "cpu_ms_per_local_step": {"ps": ps, "worker": worker,
                                    "chief": chief}}


class SummarizeTest(tf.test.TestCase):

  def test_medians_ratios_and_lines_by_hand(self):
    rows = [
        # 200 ms of compute: both modes at 10 local steps/s.
        _run("pss", 200, 10.0, 5.0), _run("pss", 200, 10.0, 7.0),
        _run("pss", 200, 10.0, 6.0),
        _run("gba", 200, 10.0, 8.0), _run("gba", 200, 10.0, 6.4),
        _run("gba", 200, 10.0, 7.2),
        # No compute: PSS at 40 local steps/s, GBA at 20.
        _run("pss", 0, 40.0, 3.75), _run("gba", 0, 20.0, 6.0),
    ]
    s = cpu_cost.summarize(rows)
    at200 = s["by_step_ms"]["200"]
    # Medians: PSS (5, 7, 6) -> 6; GBA (8, 6.4, 7.2) -> 7.2; 7.2 / 6 = 1.2.
    self.assertAllClose(at200["pss"]["median_cpu_ms_per_local_step"]["ps"],
                        6.0)
    self.assertAllClose(at200["gba_over_pss"]["ps"], 1.2)
    self.assertEqual(at200["gba"]["runs"], 3)
    # Without compute the ratio is 6 / 3.75 = 1.6: the modes ran at
    # different loads.
    self.assertAllClose(s["by_step_ms"]["0"]["gba_over_pss"]["ps"], 1.6)
    # PSS, CPU ms per s: 50, 70, 60 at 10 steps/s (mean 60), 150 at 40.
    # Least squares through (10, 60) thrice and (40, 150): slope 90 / 30 =
    # 3 ms per step, intercept 60 - 3 * 10 = 30 ms per s.
    self.assertAllClose(s["fit"]["pss"]["ps"]["marginal_ms_per_step"], 3.0)
    self.assertAllClose(s["fit"]["pss"]["ps"]["background_ms_per_s"], 30.0)
    # GBA: 72 ms/s (mean) at 10, 120 at 20: 4.8 ms per step, 24 ms per s.
    self.assertAllClose(s["fit"]["gba"]["ps"]["marginal_ms_per_step"], 4.8)
    self.assertAllClose(s["fit"]["gba"]["ps"]["background_ms_per_s"], 24.0)
    self.assertAllClose(s["gba_over_pss_marginal"]["ps"], 4.8 / 3.0)
    # 1 ms per step at every rate: all marginal, no background.
    self.assertAllClose(s["fit"]["pss"]["worker"]["marginal_ms_per_step"],
                        1.0)
    self.assertAllClose(s["fit"]["pss"]["worker"]["background_ms_per_s"],
                        0.0, atol=1e-9)
    self.assertNotEmpty(cpu_cost.table(s))

  def test_one_rate_gives_no_line(self):
    s = cpu_cost.summarize([_run("pss", 100, 10.0, 5.0),
                            _run("pss", 100, 10.0, 6.0)])
    self.assertTrue(math.isnan(s["fit"]["pss"]["ps"]["marginal_ms_per_step"]))
    self.assertNotIn("gba_over_pss", s["by_step_ms"]["100"])


if __name__ == "__main__":
  tf.test.main()
