"""GBAStrategy on real in-process TF servers (2 workers, 2 PS).

The staleness tests choreograph workers with PS-resident queues instead of
sleeps: a "held" local step reads its token, signals `started`, then blocks on
`gate` inside its forward pass while the other worker completes global
steps. Its staleness is then known exactly, with no timing assumption.
"""

import os
from unittest import mock

import numpy as np
from absl.testing import parameterized

import gba_tf
import tensorflow as tf

from tests import testing_utils

_PS0 = "/job:ps/replica:0/task:0/device:CPU:0"


def _np_grads(ids, coeffs, g):
  """Gradients of loss = sum_j <coeffs_j, E[ids_j]> + <g, w> (by hand).

  d/dw = g; d/dE[r] = sum of coeffs_j over the j with ids_j == r, so a
  duplicated id adds its coefficients.
  """
  table = np.zeros([6, 2], np.float32)
  np.add.at(table, np.asarray(ids), np.asarray(coeffs, np.float32))
  return np.asarray(g, np.float32), table


class _Harness:
  """w[2] and E[6, 2], both split over 2 PS; the test picks each gradient."""

  def __init__(self, strategy, optimizer_fn):
    self.strategy = strategy
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
      self.w = tf.Variable(tf.zeros([2]), name="w")
      self.table = tf.Variable(tf.zeros([6, 2]), name="table")
      self.optimizer = optimizer_fn()
    self.vars = list(self.w.variables) + list(self.table.variables)
    with tf.device(_PS0):
      self.gate = tf.queue.FIFOQueue(16, tf.float32, shapes=[[]])
      self.started = tf.queue.FIFOQueue(16, tf.float32, shapes=[[]])

    @tf.function
    def step(ids, coeffs, g, hold):
      def replica_fn(ids, coeffs, g, hold):
        def wait():
          with tf.control_dependencies([self.started.enqueue(1.0)]):
            return self.gate.dequeue()

        x = tf.cond(hold, wait, lambda: tf.constant(1.0))
        with tf.GradientTape() as tape:
          emb = tf.nn.embedding_lookup(self.table, ids)
          loss = x * (tf.reduce_sum(emb * coeffs) +
                      tf.reduce_sum(self.w * g))
        grads = tape.gradient(loss, self.vars)
        self.optimizer.apply_gradients(zip(grads, self.vars))
        return loss

      return self.strategy.run(replica_fn, args=(ids, coeffs, g, hold))

    self._step = step

  def schedule(self, push, hold=False):
    ids, coeffs, g = push
    return self.coordinator.schedule(self._step, args=(
        tf.constant(ids, tf.int64), tf.constant(coeffs, tf.float32),
        tf.constant(g, tf.float32), tf.constant(hold)))

  def run(self, *pushes):
    for rv in [self.schedule(p) for p in pushes]:
      rv.fetch()

  def hold(self, push):
    """Schedules a held step; returns once it has read its token."""
    rv = self.schedule(push, hold=True)
    self.started.dequeue()
    return rv

  def release(self, rv):
    self.gate.enqueue(1.0)
    rv.fetch()

  def params(self):
    return self.w.numpy(), self.table.numpy()


# Local pushes: (ids, coefficient rows, dense gradient). Ids repeat within a
# push (F1: none, F2: 1 twice, S: 4 twice) and rows span both shards
# (rows 0-2 live on ps:0, rows 3-5 on ps:1).
S = ([1, 4, 4], [[1, 0], [0, 1], [0, 1]], [1, 1])
F1 = ([0, 1, 5], [[1, 1], [2, 2], [1, 0]], [2, 0])
F2 = ([1, 1, 3], [[1, 0], [1, 0], [0, 4]], [0, 2])
F3 = ([2, 2, 2], [[1, 0], [0, 1], [1, 1]], [4, 4])
F4 = ([5, 0, 3], [[2, 0], [0, 2], [1, 1]], [-2, 2])
F5 = ([3, 4, 5], [[1, 2], [3, 4], [5, 6]], [8, -8])


class _RowRecordingSGD(tf.keras.optimizers.SGD):
  """SGD that also counts, per row of each sparse variable, the steps whose
  gradient held that row (what a lazy optimizer would update)."""

  def build(self, var_list):
    super().build(var_list)
    if not hasattr(self, "rows_seen"):
      self._seen_by_key = {}
      self.rows_seen = []
      for v in var_list:
        if v.shape.rank == 2:
          seen = self.add_variable_from_reference(v, "rows_seen",
                                                  shape=v.shape[:1])
          self._seen_by_key[self._var_key(v)] = seen
          self.rows_seen.append(seen)

  def update_step(self, gradient, variable):
    if isinstance(gradient, tf.IndexedSlices):
      seen = self._seen_by_key[self._var_key(variable)]
      rows = tf.cast(gradient.indices, tf.int64)
      seen.scatter_nd_add(rows[:, None], tf.ones(tf.shape(rows), seen.dtype))
    super().update_step(gradient, variable)


class GBAStrategyExactnessTest(tf.test.TestCase):

  def test_each_global_step_applies_weighted_mean_of_m_gradients(self):
    # M = 2; tau <= 0 counts fully, then 0.5^(tau - 0); tau > 2 dropped.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              staleness_threshold=0, decay="exponential",
                              decay_rate=0.5, max_staleness=2)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(1.0))
    # The table and w really are split across both PS tasks.
    self.assertEqual(len(h.table.variables), 2)
    self.assertIn("/job:ps/replica:0/task:0", h.table.variables[0].device)
    self.assertIn("/job:ps/replica:0/task:1", h.table.variables[1].device)
    self.assertIn("/job:ps/replica:0/task:1", h.w.variables[1].device)

    def delta(*weighted):
      # Sum_i f(tau_i) g_i / M with M = 2, lr = 1 (paper Sec. 3.2).
      dw = sum(wt * _np_grads(*p)[0] for wt, p in weighted) / 2
      de = sum(wt * _np_grads(*p)[1] for wt, p in weighted) / 2
      return -dw, -de

    held = h.hold(S)  # token 0
    h.run(F1, F2)     # tokens 0, 0 -> global step 1
    w1, e1 = delta((1, F1), (1, F2))
    self.assertAllClose(h.params(), (w1, e1))
    self.assertEqual(h.optimizer.iterations.numpy(), 1)

    h.run(F3, F4)     # tokens 1, 1 -> global step 2
    w2, e2 = delta((1, F3), (1, F4))
    self.assertAllClose(h.params(), (w1 + w2, e1 + e2))

    h.release(held)   # token 0 applied at step 2: tau = 2, f = 0.5^2 = 0.25
    m = strategy.gba_metrics()
    # Accumulators, allocated at the first push: two buffers (one per open
    # global step) for each shard: w's two [1] shards (2 x 2 x 4 B) and the
    # table's two [3, 2] shards (2 x 2 x 24 B): 112 B, twice the 56 B of
    # the variables.
    self.assertEqual(m["accumulator_bytes"], 112)
    self.assertEqual(m["pending"], 1)
    self.assertEqual(m["staleness_histogram"][2], 1)
    self.assertEqual(m["decayed"], 1)
    # Pending: the parameters have not moved.
    self.assertAllClose(h.params(), (w1 + w2, e1 + e2))

    h.run(F5)         # token 2, tau 0 -> global step 3 = (0.25 S + F5) / 2
    w3, e3 = delta((0.25, S), (1, F5))
    self.assertAllClose(h.params(), (w1 + w2 + w3, e1 + e2 + e3))
    self.assertEqual(h.optimizer.iterations.numpy(), 3)

    held = h.hold(S)  # token 3
    h.run(F1, F2, F3, F4, F5, F1)  # global steps 4, 5, 6
    before = h.params()
    h.release(held)   # tau = 6 - 3 = 3 > max_staleness 2: dropped
    self.assertAllClose(h.params(), before)

    m = strategy.gba_metrics()
    # 13 pushes: 12 applied in 6 global steps, 1 dropped, none pending.
    self.assertEqual((m["pushed"], m["applied"], m["dropped"], m["pending"],
                      m["global_steps"]), (13, 12, 1, 0, 6))
    self.assertEqual(m["pushed"], m["applied"] + m["dropped"] + m["pending"])
    self.assertEqual(m["accumulator_bytes"], 112)  # 13 pushes later: same
    self.assertEqual(m["staleness_histogram"][3], 1)
    self.assertEqual(h.optimizer.iterations.numpy(), 6)
    # The held steps ran on one worker, the others on the other one.
    self.assertEqual(sorted(m["worker_pushed"]), [2, 11])
    self.assertEqual(sorted(m["worker_dropped"]), [0, 1])

    # The dropped push took ticket 12 (step 6) and put it back: the queue
    # holds 12, 13 (step 6) and 14, 15 (step 7), and hands out the smallest
    # first. It added nothing to step 6. One push at a time: F2 and F3
    # (token 6) take 12 and 13 and make step 6 with tau 0; F4 and F5 (token
    # 7) take 14 and 15 and make step 7 with tau 0. (Put back behind 13, 14,
    # 15, as a FIFO did, ticket 12 went to F5: F3 and F4, computed on step
    # 6's parameters, made step 7 with tau 1 and were decayed to 0.5.)
    decayed = m["decayed"]
    for push in (F2, F3, F4, F5):
      h.run(push)
    w6, e6 = delta((1, F2), (1, F3))
    w7, e7 = delta((1, F4), (1, F5))
    self.assertAllClose(h.params(), (before[0] + w6 + w7,
                                     before[1] + e6 + e7))
    m = strategy.gba_metrics()
    self.assertEqual((m["pushed"], m["applied"], m["dropped"], m["pending"],
                      m["global_steps"], m["decayed"]),
                     (17, 16, 1, 0, 8, decayed))

  def test_normalize_by_weights_divides_by_the_sum_of_weights(self):
    # The first three steps of the test above, with normalize="weights":
    # steps with no decayed gradient are unchanged (the weights sum to
    # M = 2); step 3 = (0.25 S + F5) / 1.25 instead of / 2.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              staleness_threshold=0, decay="exponential",
                              decay_rate=0.5, max_staleness=2,
                              normalize="weights")
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(1.0))

    def delta(*weighted):
      total = sum(wt for wt, _ in weighted)
      dw = sum(wt * _np_grads(*p)[0] for wt, p in weighted) / total
      de = sum(wt * _np_grads(*p)[1] for wt, p in weighted) / total
      return -dw, -de

    held = h.hold(S)  # token 0
    h.run(F1, F2)     # step 1: (F1 + F2) / 2
    h.run(F3, F4)     # step 2: (F3 + F4) / 2
    w1, e1 = delta((1, F1), (1, F2))
    w2, e2 = delta((1, F3), (1, F4))
    self.assertAllClose(h.params(), (w1 + w2, e1 + e2))
    h.release(held)   # tau = 2: weight 0.25
    h.run(F5)         # step 3: (0.25 S + F5) / 1.25
    w3, e3 = delta((0.25, S), (1, F5))
    self.assertAllClose(h.params(), (w1 + w2 + w3, e1 + e2 + e3))
    # And the sum was cleared with its step: two more undecayed steps on
    # the same two parities divide by 2 again. (One push at a time: pushes
    # scheduled together could read a token a step old, tau 1, decayed.)
    for push in (F1, F2, F3, F4):
      h.run(push)
    w4, e4 = delta((1, F1), (1, F2))
    w5, e5 = delta((1, F3), (1, F4))
    self.assertAllClose(h.params(), (w1 + w2 + w3 + w4 + w5,
                                     e1 + e2 + e3 + e4 + e5))
    self.assertEqual(h.optimizer.iterations.numpy(), 5)

  def test_token_is_read_at_run_time_not_schedule_time(self):
    # Keras fit schedules a whole epoch ahead; tokens must still be fresh.
    # 12 steps scheduled at once on one worker (the other is held): each
    # reads the then-current step, so every tau is 0. Tokens taken at
    # schedule() time would all be 0 and reach tau = 5.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              max_staleness=None)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(0.1))
    held = h.hold(S)
    h.run(*([F1, F2, F3] * 4))
    m = strategy.gba_metrics()
    self.assertEqual(m["staleness_histogram"][0], 12)
    self.assertEqual(m["global_steps"], 6)
    # Tokens are recorded at push: the held worker has not pushed yet (-1);
    # the other pushed last with token 5 (global step 6 completed by it).
    self.assertEqual(sorted(m["worker_last_token"]), [-1, 5])
    h.release(held)   # read token 0 before its (blocked) forward pass
    self.assertEqual(strategy.gba_metrics()["staleness_histogram"][6], 1)

  def test_each_local_step_of_a_multi_step_closure_reads_its_token(self):
    # Keras `steps_per_execution=k` runs k local steps in one closure (a
    # tf.range loop around strategy.run). M = 2, 4 local steps in one
    # closure, nothing else running: step pairs (0, 1) and (2, 3) complete
    # global steps 0 and 1. Tokens read per local step are 0, 0, 1, 1, so
    # every tau is 0; one token per closure would be 0 for all four and
    # give local steps 2 and 3 tau = 1.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              max_staleness=None)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
      w = tf.Variable(tf.zeros([2]), name="w")
      optimizer = tf.keras.optimizers.SGD(1.0)

    @tf.function
    def four_steps():
      def replica_fn():
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(w * [1.0, 2.0])
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])
      for _ in tf.range(4):
        strategy.run(replica_fn)

    coordinator.schedule(four_steps).fetch()
    m = strategy.gba_metrics()
    self.assertEqual(m["global_steps"], 2)
    self.assertEqual(m["staleness_histogram"][:2], [4, 0])
    self.assertAllClose(w.numpy(), [-2.0, -4.0])

  def test_sparse_rows_are_those_the_step_touched_even_if_they_cancel(self):
    # M = 2. Step 1 pushes +1 and -1 on row 1 (they cancel) and +1 on row
    # 4; step 2 pushes +1 on row 4 twice. tf_keras deduplicates a
    # synchronous global batch's sparse gradient into its unique ids, so
    # sync hands the optimizer rows {1, 4} at step 1 (row 1 with a zero
    # sum) and {4} at step 2. A lazy optimizer (one that updates only the
    # rows it is given) sees the difference; the recording optimizer below
    # counts, per table row, the steps whose gradient held it.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: _RowRecordingSGD(1.0))
    h.run(([1, 4], [[1, 0], [1, 0]], [0, 0]), ([1], [[-1, 0]], [0, 0]))
    h.run(([4], [[1, 0]], [0, 0]), ([4], [[1, 0]], [0, 0]))
    # Rows 0-2 on ps:0, 3-5 on ps:1 (local rows 0-2 of each shard).
    seen = [v.numpy() for v in h.optimizer.rows_seen]
    self.assertAllEqual(np.concatenate(seen), [0, 1, 0, 0, 2, 0])
    self.assertEqual(h.optimizer.iterations.numpy(), 2)

  def test_a_push_sends_each_sparse_row_once_summed(self):
    # M = 2, one push (the step stays open): ids [4, 1, 4, 4] with
    # coefficients [1, 0], [2, 0], [3, 0], [4, 0]. Rows 0-2 are on ps:0 and
    # 3-5 on ps:1, so ps:1 gets local row 1 three times, summing to
    # [8, 0]; ps:0 gets local row 1 once, [2, 0]. Summed on the worker, each
    # shard notes the row once (stored as row + 1 = 2) and holds the sum.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(1.0))
    h.run(([4, 1, 4, 4], [[1, 0], [2, 0], [3, 0], [4, 0]], [0, 0]))
    sparse = [slot for slot, _ in
              strategy.extended.aggregator._slots.values() if slot.sparse]
    self.assertLen(sparse, 2)
    noted, held = [], []
    for slot in sparse:
      queue = slot._rows[0]
      noted.append(queue.dequeue_many(queue.size()).numpy().tolist())
      held.append(slot._buffers.numpy()[0, 1].tolist())
    self.assertCountEqual(noted, [[[2]], [[2]]])
    self.assertCountEqual(held, [[8.0, 0.0], [2.0, 0.0]])

  def test_no_update_lost_under_concurrent_pushes(self):
    # 40 local steps scheduled at once on both workers, every push the same:
    # ids [0, 3, 3] with unit coefficients -> dE[0] = [1, 1], dE[3] = [2, 2];
    # dw = [1, 1]. No decay, nothing dropped, M = 4, SGD lr = 1: each of the
    # 10 global steps moves w by -1, E[0] by -1 and E[3] by -2. A lost or
    # doubled read-modify-write anywhere would break the totals.
    config = gba_tf.GBAConfig(global_batch_size=4, local_batch_size=1,
                              decay="none", max_staleness=None)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(1.0))
    push = ([0, 3, 3], [[1, 1], [1, 1], [1, 1]], [1, 1])
    for _ in range(40):
      h.schedule(push)
    h.coordinator.join()
    w, table = h.params()
    self.assertAllClose(w, [-10.0, -10.0])
    expected = np.zeros([6, 2], np.float32)
    expected[0], expected[3] = -10.0, -20.0
    self.assertAllClose(table, expected)
    m = strategy.gba_metrics()
    self.assertEqual((m["pushed"], m["applied"], m["global_steps"]),
                     (40, 40, 10))
    self.assertTrue(all(n > 0 for n in m["worker_pushed"]))

  def test_non_finite_gradients_are_rejected_and_counted(self):
    # M = 2, SGD lr = 1, no decay. Pushes: F1, then a push whose dense
    # gradient holds a NaN and one whose embedding gradient holds an Inf
    # (both rejected whole, neither touches any buffer), then F2: the one
    # global step applies (F1 + F2) / 2 exactly, as if the bad pushes had
    # never happened.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              decay="none", max_staleness=None)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(1.0))
    nan_dense = ([0, 1, 2], [[1, 1], [1, 1], [1, 1]], [np.nan, 1])
    inf_sparse = ([3, 4, 5], [[np.inf, 0], [0, 1], [1, 1]], [1, 1])
    h.run(F1)
    h.run(nan_dense)
    h.run(inf_sparse)
    h.run(F2)
    w, table = h.params()
    g1, e1 = _np_grads(*F1)
    g2, e2 = _np_grads(*F2)
    self.assertAllClose(w, -(g1 + g2) / 2)
    self.assertAllClose(table, -(e1 + e2) / 2)
    self.assertTrue(np.isfinite(table).all())
    m = strategy.gba_metrics()
    self.assertEqual((m["pushed"], m["applied"], m["dropped"], m["nonfinite"],
                      m["pending"], m["global_steps"]), (4, 2, 2, 2, 0, 1))
    self.assertEqual(sum(m["worker_dropped"]), 2)

  def test_legacy_optimizer_is_aggregated_too(self):
    # The legacy optimizer_v2 reaches merge_call through functools.partial;
    # it must not bypass GBA. M = 2, SGD lr = 1: after F1, F2 the change is
    # -(F1 + F2) / 2, exactly as with the new optimizer above.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.legacy.SGD(1.0))
    h.run(F1)
    self.assertAllClose(h.w.numpy(), [0.0, 0.0])  # pending, not applied
    h.run(F2)
    (w1, e1), (w2, e2) = _np_grads(*F1), _np_grads(*F2)
    self.assertAllClose(h.params(), (-(w1 + w2) / 2, -(e1 + e2) / 2))
    self.assertEqual(h.optimizer.iterations.numpy(), 1)
    self.assertEqual(strategy.gba_metrics()["global_steps"], 1)

  def test_weight_decay_once_per_global_step(self):
    # Decoupled weight decay is part of the optimizer step: with zero
    # gradients, lr = 1 and weight_decay = 0.1, 4 local steps with M = 2 are
    # 2 global steps: w = w0 * 0.9^2 = 0.81 * w0 (not 0.9^4 = 0.6561 * w0).
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy,
                 lambda: tf.keras.optimizers.SGD(1.0, weight_decay=0.1))
    h.w.assign([1.0, 2.0])
    zero = ([0], [[0, 0]], [0, 0])
    h.run(zero, zero, zero, zero)
    self.assertAllClose(h.w.numpy(), [0.81, 1.62])
    self.assertEqual(h.optimizer.iterations.numpy(), 2)

  def test_iterations_and_lr_schedule_count_global_steps(self):
    # lr = 1.0 at global step 0, then 0.5. Constant gradient g = [1, 1] on w,
    # E untouched. 4 local steps with M = 2 -> 2 global steps:
    # w = -(1.0 * g) - (0.5 * g) = [-1.5, -1.5]. A schedule evaluated at local
    # steps would give 1.0 + 0.5 + 0.5 + 0.5 over four M=1-sized updates.
    schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[0], values=[1.0, 0.5])
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    h = _Harness(strategy, lambda: tf.keras.optimizers.SGD(schedule))
    push = ([0], [[0, 0]], [1, 1])
    h.run(push, push)
    self.assertAllClose(h.w.numpy(), [-1.0, -1.0])
    h.run(push, push)
    self.assertAllClose(h.w.numpy(), [-1.5, -1.5])
    self.assertEqual(h.optimizer.iterations.numpy(), 2)
    self.assertEqual(strategy.gba_metrics()["global_steps"], 2)

  def test_async_preset_equals_parameter_server_strategy(self):
    # M = 1, no decay: every local gradient is one Adam step, exactly as in
    # plain ParameterServerStrategy. Adam's slots make any difference in
    # which gradients were applied, or at which step, visible.
    pushes = [F1, F2, F3, F4, F5, S]
    resolver = testing_utils.shared_cluster().resolver()
    adam = lambda: tf.keras.optimizers.Adam(0.1)
    gba = _Harness(gba_tf.GBAStrategy(
        resolver, gba_tf.GBAConfig.preset("async", local_batch_size=1),
        testing_utils.two_shards()), adam)
    pss = _Harness(tf.distribute.experimental.ParameterServerStrategy(
        resolver, testing_utils.two_shards()), adam)
    for p in pushes:
      gba.run(p)
      pss.run(p)
    self.assertAllClose(gba.params(), pss.params(), atol=1e-6)
    self.assertEqual(gba.optimizer.iterations.numpy(), len(pushes))
    self.assertGreater(np.abs(gba.params()[1]).sum(), 0.0)


def _ctr_model(vocab=40, dim=4):
  ids = tf.keras.Input(shape=(3,), dtype=tf.int64)
  emb = tf.keras.layers.Embedding(
      vocab, dim, embeddings_initializer=tf.keras.initializers.RandomUniform(
          -0.1, 0.1, seed=1))(ids)
  x = tf.keras.layers.Flatten()(emb)
  x = tf.keras.layers.Dense(8, activation="relu",
                            kernel_initializer=tf.keras.initializers.
                            GlorotUniform(seed=2))(x)
  out = tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.
                              GlorotUniform(seed=3))(x)
  return tf.keras.Model(ids, out)


_params = testing_utils.layer_weights


_bce = tf.keras.losses.BinaryCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _mean_bce(y, logits):
  # Mean over the *local* batch: GBA's mean of M local gradients is then the
  # global-batch mean (Keras refuses AUTO reduction inside a strategy).
  return tf.reduce_mean(_bce(y, logits))


def _learnable_data(n, seed, vocab=40):
  """Label = 1 when the sum of the hidden per-id weights is positive."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(n, 3))
  hidden = np.random.default_rng(0).normal(size=vocab)
  y = (hidden[ids].sum(1) > 0).astype(np.float32)
  return ids.astype(np.int64), y[:, None]


class GBAStrategySyncEquivalenceTest(tf.test.TestCase):

  def test_serialized_gba_equals_single_process_global_batch(self):
    # Pushes serialized (each local step finishes before the next starts),
    # so every tau is 0 and GBA must equal one process training on the
    # concatenated global batch: mean of M local mean-gradients = global
    # mean-gradient; Adam slots and the sparse embedding rows must agree.
    m, local, steps = 3, 8, 4
    ids, y = _learnable_data(m * local * steps, seed=7)
    loss_fn = _mean_bce
    config = gba_tf.GBAConfig(global_batch_size=m * local,
                              local_batch_size=local)
    # The strategy first: it connects the context to the cluster, and a
    # variable made before that is not readable after (the test failed run
    # on its own, with no earlier test to connect).
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())

    ref = _ctr_model()
    ref_opt = tf.keras.optimizers.Adam(0.05)
    for k in range(steps):
      sl = slice(k * m * local, (k + 1) * m * local)
      with tf.GradientTape() as tape:
        loss = loss_fn(y[sl], ref(ids[sl]))
      grads = tape.gradient(loss, ref.trainable_variables)
      ref_opt.apply_gradients(zip(grads, ref.trainable_variables))

    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
      model = _ctr_model()
      opt = tf.keras.optimizers.Adam(0.05)
    # Same starting point: sharded initialisation draws per shard.
    init = _ctr_model()
    for v, v0 in zip(_params(model), _params(init)):
      v.assign(v0)

    @tf.function
    def step(x, t):
      def replica_fn(x, t):
        with tf.GradientTape() as tape:
          loss = loss_fn(t, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
      strategy.run(replica_fn, args=(x, t))

    for j in range(m * steps):
      sl = slice(j * local, (j + 1) * local)
      coordinator.schedule(step, args=(tf.constant(ids[sl]),
                                       tf.constant(y[sl]))).fetch()

    self.assertEqual(opt.iterations.numpy(), steps)
    self.assertEqual(strategy.gba_metrics()["staleness_histogram"][0],
                     m * steps)
    for v, r in zip(_params(model), _params(ref)):
      self.assertAllClose(tf.convert_to_tensor(v), r, atol=1e-5, rtol=1e-5)
    # The embedding really moved (the comparison is not of two zeros).
    self.assertGreater(np.abs(_params(ref)[0].numpy() -
                              _params(init)[0].numpy()).max(), 1e-3)


def _dataset_fn(local_batch):
  def dataset_fn(input_context):
    del input_context
    ids, y = _learnable_data(2048, seed=3)
    return tf.data.Dataset.from_tensor_slices((ids, y)).shuffle(
        2048, seed=1).repeat().batch(local_batch)
  return dataset_fn


class GBAStrategyKerasTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("sgd", lambda: tf.keras.optimizers.SGD(0.5), 1),
      ("adagrad", lambda: tf.keras.optimizers.Adagrad(0.3), 1),
      ("adam", lambda: tf.keras.optimizers.Adam(0.02), 1),
      # 4 local steps per scheduled function: each still reads its token.
      ("adam_steps_per_execution", lambda: tf.keras.optimizers.Adam(0.02), 4),
  )
  def test_fit_learns_and_conserves_gradients(self, optimizer_fn,
                                              steps_per_execution):
    config = gba_tf.GBAConfig(global_batch_size=64, local_batch_size=16)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    with strategy.scope():
      model = _ctr_model()
      model.compile(optimizer_fn(),
                    tf.keras.losses.BinaryCrossentropy(from_logits=True),
                    steps_per_execution=steps_per_execution)
    log_dir = self.get_temp_dir()
    metrics_cb = gba_tf.callbacks.GBAMetrics(strategy, log_dir)
    history = model.fit(
        tf.keras.utils.experimental.DatasetCreator(_dataset_fn(16)),
        epochs=4, steps_per_epoch=40, verbose=0, callbacks=[metrics_cb])
    losses = history.history["loss"]
    self.assertLess(losses[-1], 0.9 * losses[0])
    m = strategy.gba_metrics()
    # 160 local steps; nothing dropped by default this fresh -> 40 steps.
    self.assertEqual(m["pushed"], 160)
    self.assertEqual(m["pushed"], m["applied"] + m["dropped"] + m["pending"])
    self.assertLess(m["pending"], config.num_aggregate)
    self.assertEqual(m["applied"], config.num_aggregate * m["global_steps"])
    self.assertEqual(model.optimizer.iterations.numpy(), m["global_steps"])
    self.assertEqual(m["global_steps"], (160 - m["dropped"]) // 4)
    # Both workers contributed, and the callback logged the counters.
    self.assertEqual(sum(m["worker_pushed"]), 160)
    self.assertTrue(all(n > 0 for n in m["worker_pushed"]))
    self.assertEqual(history.history["gba/global_steps"][-1],
                     m["global_steps"])
    tags = set()
    for path in tf.io.gfile.glob(f"{log_dir}/gba/events.*"):
      for event in tf.compat.v1.train.summary_iterator(path):
        tags.update(v.tag for v in event.summary.value)
    self.assertContainsSubset({"gba/global_steps", "gba/staleness",
                               "gba/worker_0/pushed"}, tags)

  def test_tfrs_ranking_model_fit(self):
    import tensorflow_recommenders as tfrs  # pylint: disable=g-import-not-at-top

    class Ranker(tfrs.Model):

      def __init__(self):
        super().__init__()
        self.tower = _ctr_model()
        self.task = tfrs.tasks.Ranking(loss=_bce)

      def compute_loss(self, inputs, training=False):
        ids, y = inputs
        return tf.reduce_mean(self.task(labels=y, predictions=self.tower(ids)))

    config = gba_tf.GBAConfig(global_batch_size=32, local_batch_size=16)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    with strategy.scope():
      model = Ranker()
      model.compile(tf.keras.optimizers.Adagrad(0.3))
    history = model.fit(
        tf.keras.utils.experimental.DatasetCreator(_dataset_fn(16)),
        epochs=3, steps_per_epoch=40, verbose=0)
    losses = history.history["loss"]
    self.assertLess(losses[-1], 0.9 * losses[0])
    self.assertEqual(model.optimizer.iterations.numpy(),
                     strategy.gba_metrics()["global_steps"])

  def test_custom_loop_learns(self):
    config = gba_tf.GBAConfig(global_batch_size=32, local_batch_size=16)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
      model = _ctr_model()
      opt = tf.keras.optimizers.Adam(0.02)
    per_worker = coordinator.create_per_worker_dataset(
        lambda: _dataset_fn(16)(None))
    iterator = iter(per_worker)

    @tf.function
    def step(iterator):
      def replica_fn(x, t):
        with tf.GradientTape() as tape:
          loss = _mean_bce(t, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss
      return strategy.run(replica_fn, args=next(iterator))

    def epoch():
      rvs = [coordinator.schedule(step, args=(iterator,)) for _ in range(40)]
      coordinator.join()
      return np.mean([rv.fetch() for rv in rvs])

    first = epoch()
    for _ in range(2):
      last = epoch()
    self.assertLess(last, 0.9 * first)
    self.assertEqual(strategy.gba_metrics()["pushed"], 120)


class GBAStrategyInputTest(tf.test.TestCase):

  def test_workers_device_datasets_do_not_autotune(self):
    # With autotuning on in these datasets (TF's default), `fit` returned up
    # to a minute after training ended (README, "`fit` can return late").
    testing_utils.unpatched_device_datasets(self)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  gba_tf.GBAConfig(global_batch_size=8,
                                                   local_batch_size=4))
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    dataset = strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.range(64).batch(4).repeat())
    iterator = iter(coordinator.create_per_worker_dataset(dataset))
    for w in range(testing_utils.NUM_WORKERS):
      # TF 2.21: worker w's distributed iterator -> its single-worker
      # iterator -> OwnedMultiDeviceIterator -> the per-device iterator,
      # whose dataset lives on worker w (the chief built it there).
      device = (iterator._values[w]._get_values()._iterators[0]  # pylint: disable=protected-access
                ._iterator._device_iterators[0])  # pylint: disable=protected-access
      with tf.device(f"/job:worker/replica:0/task:{w}/device:CPU:0"):
        options = device._dataset.options()  # pylint: disable=protected-access
      self.assertIs(options.autotune.enabled, False)


class GBAStrategyArgumentsTest(tf.test.TestCase):

  def test_rejects_non_config(self):
    with self.assertRaisesRegex(TypeError, "Received: config={'global"):
      gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                         config={"global_batch_size": 4})

  def test_needs_resolver_or_tf_config(self):
    with mock.patch.dict(os.environ), \
        self.assertRaisesRegex(ValueError, "TF_CONFIG is not set"):
      os.environ.pop("TF_CONFIG", None)
      gba_tf.GBAStrategy(config=gba_tf.GBAConfig())


if __name__ == "__main__":
  tf.test.main()
