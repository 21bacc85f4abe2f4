"""Tests for the health monitor and the switch decision (pure, fast)."""

import json
import os
import tempfile

from absl.testing import parameterized
import tensorflow as tf

from gba_tf import switching

HEALTHY = switching.HealthState.HEALTHY
STRAGGLING = switching.HealthState.STRAGGLING


class HealthMonitorTest(parameterized.TestCase):

  def test_ratios_are_leave_one_out(self):
    monitor = switching.HealthMonitor(num_workers=4)
    # Worker 1: 0.20 / median(0.05, 0.05, 0.10) = 0.20 / 0.05 = 4.0.
    # Worker 2: 0.10 / median(0.05, 0.20, 0.05) = 2.0.
    # Worker 0: 0.05 / median(0.20, 0.10, 0.05) = 0.5.
    self.assertEqual(monitor.ratios([0.05, 0.20, 0.10, 0.05]),
                     (0.5, 4.0, 2.0, 0.5))
    # With two workers the slow one is compared with the fast one:
    # 0.08 / 0.02 = 4 (a mean-based median would give 0.08 / 0.05 = 1.6).
    self.assertEqual(switching.HealthMonitor(2).ratios([0.02, 0.08]),
                     (0.25, 4.0))

  def test_straggler_needs_window_consecutive_checks(self):
    monitor = switching.HealthMonitor(num_workers=2, window=3)
    slow, fast = [0.02, 0.08], [0.02, 0.021]
    self.assertEqual(monitor.observe(slow).state, HEALTHY)
    self.assertEqual(monitor.observe(slow).state, HEALTHY)
    # One healthy check resets the streak.
    self.assertEqual(monitor.observe(fast).streak, 0)
    reports = [monitor.observe(slow) for _ in range(3)]
    self.assertEqual([r.state for r in reports],
                     [HEALTHY, HEALTHY, STRAGGLING])
    self.assertEqual([r.changed for r in reports], [False, False, True])
    self.assertEqual(reports[-1].slow_workers, (1,))
    self.assertIn("worker 1 at 4.0x", reports[-1].describe())

  def test_recovery_uses_the_lower_ratio(self):
    monitor = switching.HealthMonitor(num_workers=2, window=2, slow_ratio=2.0,
                                   recover_ratio=1.5,
                                   initial_state=STRAGGLING)
    # 1.8x is below slow_ratio but above recover_ratio: not recovered.
    for _ in range(4):
      self.assertEqual(monitor.observe([0.050, 0.090]).state, STRAGGLING)
    self.assertEqual(monitor.observe([0.050, 0.060]).state, STRAGGLING)
    report = monitor.observe([0.050, 0.060])
    self.assertEqual((report.state, report.changed), (HEALTHY, True))

  def test_small_absolute_gaps_are_noise(self):
    # 3x slower but only 2 ms apart: below min_gap_s = 10 ms.
    monitor = switching.HealthMonitor(num_workers=2, window=1)
    self.assertEqual(monitor.observe([0.001, 0.003]).slow_workers, ())
    self.assertEqual(monitor.observe([0.001, 0.013]).slow_workers, (1,))

  @parameterized.named_parameters(
      ("one_worker", dict(num_workers=1), "num_workers=1"),
      ("window", dict(num_workers=2, window=0), "window=0"),
      ("slow_ratio", dict(num_workers=2, slow_ratio=1.0), "slow_ratio=1.0"),
      ("recover_ratio", dict(num_workers=2, recover_ratio=3.0),
       "recover_ratio=3.0"),
      ("min_gap", dict(num_workers=2, min_gap_s=-1), "min_gap_s=-1"),
  )
  def test_bad_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      switching.HealthMonitor(**kwargs)

  def test_bad_latencies(self):
    monitor = switching.HealthMonitor(num_workers=2)
    with self.assertRaisesRegex(ValueError, "3 latencies"):
      monitor.observe([0.1, 0.1, 0.1])
    with self.assertRaisesRegex(ValueError, "finite"):
      monitor.observe([0.1, float("nan")])


  def test_recovering_streak_resets_on_a_slow_check(self):
    monitor = switching.HealthMonitor(num_workers=2, window=2,
                                   initial_state=STRAGGLING)
    healthy, slow = [0.05, 0.05], [0.05, 0.20]
    self.assertEqual(monitor.observe(healthy).streak, 1)
    # A slow check in between: the recovering streak starts over.
    report = monitor.observe(slow)
    self.assertEqual((report.state, report.streak), (STRAGGLING, 0))
    self.assertEqual(monitor.observe(healthy).streak, 1)
    report = monitor.observe(healthy)
    self.assertEqual((report.state, report.changed), (HEALTHY, True))

  def test_ratio_exactly_at_a_threshold(self):
    # Slow means strictly above slow_ratio; recovered means not above
    # recover_ratio. 0.10 / 0.05 = 2.0 exactly, 50 ms apart (> min gap).
    monitor = switching.HealthMonitor(num_workers=2, window=1, slow_ratio=2.0,
                                   recover_ratio=2.0)
    self.assertEqual(monitor.observe([0.05, 0.10]).slow_workers, ())
    self.assertEqual(monitor.state, HEALTHY)
    straggling = switching.HealthMonitor(num_workers=2, window=1,
                                      slow_ratio=3.0, recover_ratio=2.0,
                                      initial_state=STRAGGLING)
    report = straggling.observe([0.05, 0.10])
    self.assertEqual((report.state, report.changed), (HEALTHY, True))

  def test_peers_at_zero_latency(self):
    monitor = switching.HealthMonitor(num_workers=2, window=1)
    # All zero: nobody is slow (0 / 0 counts as 1).
    self.assertEqual(monitor.ratios([0.0, 0.0]), (1.0, 1.0))
    self.assertEqual(monitor.observe([0.0, 0.0]).slow_workers, ())
    # A worker over a peer at zero is infinitely slower, and 50 ms apart.
    self.assertEqual(monitor.ratios([0.0, 0.05]), (0.0, float("inf")))
    self.assertEqual(monitor.observe([0.0, 0.05]).slow_workers, (1,))

  @parameterized.named_parameters(
      ("negative", [-0.1, 0.1]),
      ("infinite", [float("inf"), 0.1]),
      ("minus_infinite", [0.1, float("-inf")]),
  )
  def test_latencies_out_of_range(self, latencies):
    monitor = switching.HealthMonitor(num_workers=2)
    with self.assertRaisesRegex(ValueError,
                                r"Received: latencies=.*finite and >= 0"):
      monitor.observe(latencies)
    self.assertEqual((monitor.state, monitor.observe([0.1, 0.1]).streak),
                     (HEALTHY, 0))

  def test_latencies_from_logs(self):
    logs = {"loss": 0.5, "step_seconds/w0": 0.02, "step_seconds/w1": 0.08}
    self.assertEqual(switching.latencies_from_logs(logs, 2), (0.02, 0.08))
    # A worker missing, or no logs at all: no check this batch.
    self.assertIsNone(switching.latencies_from_logs(logs, 3))
    self.assertIsNone(switching.latencies_from_logs(None, 2))


class GBALatencySourceTest(tf.test.TestCase):

  def test_windows_close_on_completed_pushes(self):
    reads = iter([
        # (worker_pushed, worker_compute_seconds) cumulative, clock. Worker
        # 1's token-to-push time is short: it is slow before its token read
        # (its input), which only its push count shows.
        (([0, 0], [0.0, 0.0]), 10.0),   # opens the window
        (([3, 0], [0.06, 0.0]), 10.1),  # 3 pushes < 4: still open
        (([6, 1], [0.12, 0.02]), 10.2),  # 7 pushes: closes
        (([10, 1], [0.20, 0.02]), 10.5),  # w1 pushed nothing: gets 0.3 s
    ])
    current = {}

    def read_metrics():
      (pushed, seconds), now = next(reads)
      current["now"] = now
      return {"worker_pushed": pushed, "worker_compute_seconds": seconds}

    source = switching.GBALatencySource(read_metrics, lambda: current["now"],
                                     window_pushes=4)
    self.assertIsNone(source.poll())
    self.assertIsNone(source.poll())
    # The window lasted 10.2 - 10.0 = 0.2 s: w0 0.2 / 6 = 0.0333 s per
    # step, w1 0.2 / 1 = 0.2 (its 0.02 s token-to-push would hide it).
    self.assertAllClose(source.poll(), (0.2 / 6, 0.2))
    # 0.3 s: w0 0.3 / 4 = 0.075; w1 no push, the window's 0.3 s.
    self.assertAllClose(source.poll(), (0.075, 0.3))


def _sync_logs(w0, w1):
  return {"loss": 0.5, "step_seconds/w0": w0, "step_seconds/w1": w1}


class HealthCallbackTest(tf.test.TestCase):
  """The callback driven batch by batch, as `model.fit` calls it."""

  def _callback(self, auto=True, **kwargs):
    lines = []
    callback = switching.HealthCallback(
        switching.HealthMonitor(num_workers=2, window=2), "sync",
        check_every=2, auto=auto, log=lines.append, **kwargs)
    callback.set_model(tf.keras.Sequential([tf.keras.layers.Dense(1)]))
    return callback, lines

  def test_sync_averages_each_check_and_stops_to_switch(self):
    callback, lines = self._callback()
    # Check 1 averages batches 0-1: w1 = (0.08 + 0.10) / 2 = 0.09.
    callback.on_train_batch_end(0, _sync_logs(0.02, 0.08))
    self.assertEqual(callback.reports, [])
    callback.on_train_batch_end(1, _sync_logs(0.02, 0.10))
    self.assertLen(callback.reports, 1)
    self.assertAllClose(callback.reports[0].latencies, (0.02, 0.09))
    self.assertFalse(callback.model.stop_training)
    # Check 2 (window = 2): straggling, so sync stops to switch to GBA.
    callback.on_train_batch_end(2, _sync_logs(0.02, 0.08))
    callback.on_train_batch_end(3, _sync_logs(0.02, 0.08))
    self.assertEqual(callback.target, "gba")
    self.assertTrue(callback.model.stop_training)
    self.assertIn("[switch] sync -> gba: stragglers for 2 checks: worker 1",
                  lines[-1])
    record = callback.switch_record(40)
    self.assertEqual((record.from_mode, record.to_mode, record.global_step),
                     ("sync", "gba", 40))
    self.assertEqual(record.step_seconds, [0.02, 0.08])

  def test_without_auto_it_only_reports(self):
    callback, lines = self._callback(auto=False)
    for batch in range(4):
      callback.on_train_batch_end(batch, _sync_logs(0.02, 0.08))
    self.assertEqual(callback.reports[-1].state, STRAGGLING)
    self.assertIsNone(callback.target)
    self.assertFalse(callback.model.stop_training)
    self.assertTrue(any("[health] sync:" in line for line in lines))

  def test_batches_without_latencies_are_skipped(self):
    callback, _ = self._callback()
    for batch in range(4):
      callback.on_train_batch_end(batch, {"loss": 0.5})
    self.assertEqual(callback.reports, [])

  def test_ps_modes_poll_the_latency_source(self):
    polls = []

    class Source:
      def poll(self):
        polls.append(1)
        return (0.02, 0.08) if len(polls) % 2 == 0 else None

    callback, _ = self._callback(latency_source=Source())
    # check_every = 2: a poll every batch (2 // 2), a window every 2nd poll.
    for batch in range(4):
      callback.on_train_batch_end(batch, None)
    self.assertLen(polls, 4)
    self.assertLen(callback.reports, 2)
    self.assertEqual(callback.target, "gba")


class SwitchingTest(tf.test.TestCase):

  def _report(self, state, changed, slow=(), ratios=(1.0, 1.0)):
    return switching.HealthReport(state, changed, slow, ratios, (0.02, 0.02), 0)

  def test_decide(self):
    straggling = self._report(STRAGGLING, True, (1,), (0.25, 4.0))
    healthy = self._report(HEALTHY, True)
    self.assertEqual(switching.decide("sync", straggling), "gba")
    self.assertIsNone(switching.decide("gba", straggling))
    self.assertEqual(switching.decide("gba", healthy), "sync")
    self.assertIsNone(switching.decide("sync", healthy))
    # Without a state change (hysteresis not yet satisfied) nothing moves.
    self.assertIsNone(switching.decide(
        "sync", self._report(STRAGGLING, False, (1,))))
    self.assertIn("worker 1 at 4.0x",
                  switching.reason("sync", "gba", straggling, 3))

  def test_state_file_round_trip(self):
    model_dir = tempfile.mkdtemp()
    self.assertEqual(switching.current_mode(model_dir), "sync")
    state = switching.SwitchState.load(model_dir)
    state.record(switching.Switch("sync", "gba", "stragglers", 15, 1.0,
                                  [0.02, 0.08]))
    state.save(model_dir)
    self.assertEqual(switching.current_mode(model_dir), "gba")
    loaded = switching.SwitchState.load(model_dir)
    self.assertEqual(loaded.switches, state.switches)
    with open(os.path.join(model_dir, switching.STATE_FILE), "w") as f:
      json.dump({"mode": "turbo"}, f)
    with self.assertRaisesRegex(ValueError, "mode='turbo'"):
      switching.current_mode(model_dir)


if __name__ == "__main__":
  tf.test.main()
