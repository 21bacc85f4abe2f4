"""A push that dies half-way does not stop GBA training (`gba_tf.stall`).

The decision is checked by hand; the recovery on real in-process servers,
with the dead push's leftovers made by hand: a ticket taken and never landed,
or an apply claimed and never finished. (A SIGKILLed worker leaves the same
state at random; `tests/faults_test.py` kills real worker processes.)
"""

import gc
import time

import numpy as np
import pytest

import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf

from gba_tf import stall
from gba_tf.launch import local_cluster
from tests import testing_utils


class StallActionTest(tf.test.TestCase):

  def test_tickets_left_is_no_stall(self):
    # Pushes can still take tickets and land: nothing to do, whatever else.
    self.assertIsNone(stall.stall_action((1, 0), 4, 1, 1, num_aggregate=2))

  def test_lost_ticket_of_next_step_is_reissued(self):
    # M = 3, next step 4 (parity 0) has 2 landings, step 5 is complete:
    # one ticket of step 4 never landed.
    self.assertEqual(stall.stall_action((2, 3), 4, 0, 0, num_aggregate=3),
                     stall.StallAction(reissue=((4, 1),)))

  def test_lost_refill_reissues_the_whole_step(self):
    # M = 2. The push that applied step 5 died after finishing it and before
    # queueing step 7's tickets; step 6 was applied later by another push,
    # which queued step 8's, and those landed. Next step 7 (parity 1) has
    # no landings and no tickets left: both of its tickets are re-issued.
    self.assertEqual(stall.stall_action((2, 0), 7, 0, 0, num_aggregate=2),
                     stall.StallAction(reissue=((7, 2),)))

  def test_both_open_steps_short(self):
    # Next step 9 (parity 1) has 1 of 4, step 10 (parity 0) 3 of 4.
    self.assertEqual(stall.stall_action((3, 1), 9, 0, 0, num_aggregate=4),
                     stall.StallAction(reissue=((9, 3), (10, 1))))

  def test_claimed_apply_is_finished(self):
    self.assertEqual(stall.stall_action((2, 2), 3, 1, 0, num_aggregate=2),
                     stall.StallAction(finish_apply=True))

  def test_complete_and_unclaimed_is_no_stall(self):
    # Cannot stand while pushes run (the last landing claims); nothing to
    # re-issue.
    self.assertIsNone(stall.stall_action((2, 2), 3, 0, 0, num_aggregate=2))


class _ProgressOnly:
  """Stands in for a GradientAggregator: a schedule that never stalls."""

  num_aggregate = 2

  def progress(self):
    return (0, 0), 0, 0, 4  # tickets left: nothing to recover


class StallWatchdogTest(tf.test.TestCase):

  def test_thread_ends_with_its_aggregator(self):
    # The watchdog holds its aggregator weakly; it must not keep it alive
    # between polls, or a strategy's watchdog would poll forever.
    aggregator = _ProgressOnly()
    watchdog = stall.StallWatchdog(aggregator, stall_seconds=1.0,
                                   poll_seconds=0.01)
    watchdog.start()
    self.addCleanup(watchdog.stop)
    time.sleep(0.1)
    self.assertTrue(watchdog._thread.is_alive())
    del aggregator
    gc.collect()
    watchdog._thread.join(5)
    self.assertFalse(watchdog._thread.is_alive())


# Gradients of the six local steps; loss <g, w>, so each push's gradient is
# its g whatever the weights.
_GRADS = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0],
                   [0, 0, 0, 4], [5, 0, 0, 0], [0, 6, 0, 0]], np.float32)


@pytest.mark.cluster
class StallRecoveryTest(tf.test.TestCase):
  """On a local cluster of its own (2 workers, 2 PS processes): recovery
  leaves pushes blocked on the ticket queue for a while, which the shared
  in-process servers do not survive after another test moved the context
  to a cluster of its own and back."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    testing_utils.collect_before_switching_cluster()
    cls.cluster = local_cluster.LocalCluster(num_workers=2, num_ps=2)

  @classmethod
  def tearDownClass(cls):
    cls.cluster.stop()
    super().tearDownClass()

  def _train(self, leave_dead_push):
    # M = 2, nothing decayed (threshold 10): six pushes are three global
    # steps of weight 1 each, in whatever order they land.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              staleness_threshold=10)
    strategy = gba_tf.GBAStrategy(
        self.cluster.resolver(), config,
        variable_partitioner=testing_utils.two_shards())
    aggregator = strategy.extended.aggregator
    aggregator.stall_seconds, aggregator.poll_seconds = 1.0, 0.1
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
      w = tf.Variable(tf.zeros([4]), name="w")
      optimizer = tf.keras.optimizers.SGD(1.0)

    @tf.function
    def step(g):
      def replica_fn(g):
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(w * g)
        shards = w.variables
        optimizer.apply_gradients(zip(tape.gradient(loss, shards), shards))
      strategy.run(replica_fn, args=(g,))

    leave_dead_push(aggregator)
    for g in _GRADS:
      coordinator.schedule(step, args=(tf.constant(g),))
    # Without recovery the fifth push blocks on the empty ticket queue
    # forever; wait for the three global steps with a deadline instead.
    deadline = time.monotonic() + 60
    while (strategy.gba_metrics()["global_steps"] < 3
           and time.monotonic() < deadline):
      time.sleep(0.1)
    metrics = strategy.gba_metrics()
    self.assertEqual(metrics["global_steps"], 3, metrics)
    coordinator.join()
    aggregator.stop_watchdog()
    # The applier (gba_tf.applier) waits for the next step until stopped.
    self.applier_ran = aggregator._applier.running
    testing_utils.keep_alive(strategy, coordinator, w, optimizer)
    self.assertFalse(aggregator._applier.running)
    return strategy, w, optimizer, aggregator

  def _assert_sync_result(self, strategy, w, optimizer):
    # Every gradient applied once, weight 1, averaged over M = 2, lr 1:
    # w = -sum(g) / 2 = -[6, 8, 3, 4] / 2.
    self.assertAllClose(tf.convert_to_tensor(w), [-3.0, -4.0, -1.5, -2.0])
    self.assertEqual(optimizer.iterations.numpy(), 3)
    m = strategy.gba_metrics()
    self.assertEqual((m["pushed"], m["applied"], m["pending"], m["lost"]),
                     (6, 6, 0, 0))

  def test_lost_ticket_is_reissued(self):
    def take_a_ticket(aggregator):
      # A push took ticket 0 (step 0) and died: pushes 1-3 take tickets
      # 1-3 (step 0 one short, step 1 complete), push 4 waits on the empty
      # queue until the chief re-issues a ticket of step 0.
      self.assertEqual(aggregator._tickets.dequeue_many(1).numpy()[0], 0)

    strategy, w, optimizer, aggregator = self._train(take_a_ticket)
    self._assert_sync_result(strategy, w, optimizer)
    self.assertEqual(aggregator._watchdog.recoveries, 1)

  def test_claimed_apply_is_finished_by_the_chief(self):
    def claim_the_apply(aggregator):
      # A push claimed step 0's apply and died before applying it: steps 0
      # and 1 fill (4 pushes), none may claim, push 5 waits on the empty
      # queue until the chief applies steps 0 and 1 itself.
      aggregator._schedule.assign([0, 0, 0, 1])

    strategy, w, optimizer, aggregator = self._train(claim_the_apply)
    self._assert_sync_result(strategy, w, optimizer)
    self.assertEqual(aggregator._watchdog.recoveries, 1)

  def test_no_recovery_while_training_is_healthy(self):
    strategy, w, optimizer, aggregator = self._train(lambda unused: None)
    self._assert_sync_result(strategy, w, optimizer)
    self.assertEqual(aggregator._watchdog.recoveries, 0)
    # Steps were applied by the applier, which ran until stopped.
    self.assertTrue(self.applier_ran)
    self.assertIsNone(aggregator._applier.error)


if __name__ == "__main__":
  tf.test.main()
