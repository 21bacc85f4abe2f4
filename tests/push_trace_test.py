"""The push trace: its rows, recorded on a real cluster, and their phases."""

import numpy as np

import gba_tf
from gba_tf import accumulator
from gba_tf import push_trace
import tensorflow as tf

from tests import testing_utils


class PhasesTest(tf.test.TestCase):

  # Two workers, three pushes each (read, arrive, ticket, landed, end, claimed;
  # token and step are 0, not read here):
  #   w0: 0.00 .03 .04 .05 .05 -  | .06 .10 .11 .12 .12 -  | .15 .19 .20 .21 .25 C
  #   w1: 0.01 .03 .03 .04 .09 C  | .10 .13 .14 .15 .15 -  | .20 .23 .24 .25 .25 -
  # arrive - read: w0 .03 .04 .04 (mean 0.11/3); w1 .02 .03 .03 (mean 0.08/3).
  # ticket - arrive: .01 .01 .01 0 .01 .01 -> 0.05/6.  landed - ticket: .01 each.
  # end - landed of the two claimers: .04 (w0) and .05 (w1) -> 0.045.
  # gap, end to the worker's next read: w0 .06-.05 = .01, .15-.12 = .03 -> .02;
  # w1 .10-.09 = .01, .20-.15 = .05 -> .03.
  ROWS = [
      [0, 0, 0, 0.00, 0.03, 0.04, 0.05, 0.05, 0],
      [1, 0, 0, 0.01, 0.03, 0.03, 0.04, 0.09, 1],
      [0, 0, 0, 0.06, 0.10, 0.11, 0.12, 0.12, 0],
      [1, 0, 0, 0.10, 0.13, 0.14, 0.15, 0.15, 0],
      [0, 0, 0, 0.15, 0.19, 0.20, 0.21, 0.25, 1],
      [1, 0, 0, 0.20, 0.23, 0.24, 0.25, 0.25, 0],
  ]

  def test_hand_derived_phases(self):
    # Shuffled: the rows are put in read order first.
    rows = [self.ROWS[i] for i in (3, 0, 5, 1, 4, 2)]
    p = push_trace.phases(rows, num_workers=3, warmup_fraction=0.0)
    self.assertEqual(p["pushes"], 6)
    self.assertAllClose(p["arrive_s"][:2], [0.11 / 3, 0.08 / 3])
    self.assertAllClose(p["ticket_wait_s"], 0.05 / 6)
    self.assertAllClose(p["land_s"], 0.01)
    self.assertAllClose(p["apply_s"], 0.045)
    self.assertAllClose(p["claim_fraction"], 2 / 6)
    self.assertAllClose(p["gap_s"][:2], [0.02, 0.03])
    # log sd of w1's (.02, .03, .03): by numpy's definition, written out.
    logs = np.log([0.02, 0.03, 0.03])
    self.assertAllClose(p["arrive_log_sd"][1],
                        np.sqrt(np.mean((logs - logs.mean()) ** 2)))
    # Worker 2 never pushed.
    self.assertEqual((p["arrive_s"][2], p["gap_s"][2]), (None, None))

  def test_warmup_leaves_out_the_earliest_pushes(self):
    # 1/3 of 6: the two earliest reads (w0's and w1's first pushes) go, and
    # with them w1's only claim: apply_s is over w0's claim alone.
    p = push_trace.phases(self.ROWS, num_workers=2, warmup_fraction=1 / 3)
    self.assertEqual(p["pushes"], 4)
    self.assertAllClose(p["apply_s"], 0.04)
    self.assertAllClose(p["gap_s"], [0.03, 0.05])

  def test_the_ring_reads_oldest_first(self):
    # 6 entries written into a ring of 4, entry i at i % 4: [4, 5, 2, 3].
    self.assertEqual(
        accumulator._oldest_first(np.array([4, 5, 2, 3]), 6).tolist(),  # pylint: disable=protected-access
        [2, 3, 4, 5])
    # 2 entries, not wrapped: the unwritten rest is left out.
    self.assertEqual(
        accumulator._oldest_first(np.array([0, 1, 0, 0]), 2).tolist(),  # pylint: disable=protected-access
        [0, 1])

  def test_bad_warmup(self):
    with self.assertRaisesRegex(ValueError, r"Received: warmup_fraction=1"):
      push_trace.phases(self.ROWS, num_workers=2, warmup_fraction=1)

  # Three loops of 4 local steps, two workers (read, end; worker 0 first):
  #   loop 0: w0 .00-.05, w1 .01-.06, w0 .07-.12, w1 .08-.13
  #   loop 1: w0 .23-.28, w1 .24-.29, w0 .31-.36, w1 .32-.37
  #   loop 2: w0 .57-.62, w1 .58-.63
  # Gaps within loops: .07-.05 = .08-.06 = .02 (loop 0), .03 (loop 1): .025
  # per worker. Across a loop's end: w0 .23-.12 = .11, .57-.36 = .21; those
  # are the loops' pauses, .23-.13 = .10 and .57-.37 = .20 (median .15).
  LOOPS = [[0, .00, .05], [1, .01, .06], [0, .07, .12], [1, .08, .13],
           [0, .23, .28], [1, .24, .29], [0, .31, .36], [1, .32, .37],
           [0, .57, .62], [1, .58, .63]]

  @classmethod
  def _loop_rows(cls, drop=()):
    return [[w, 0, 0, read, read, read, read, end, 0]
            for i, (w, read, end) in enumerate(cls.LOOPS) if i not in drop]

  def test_a_loops_end_is_its_pause_not_a_gap(self):
    p = push_trace.phases(self._loop_rows(), num_workers=2,
                          warmup_fraction=0.0, loop_steps=4)
    self.assertAllClose(p["gap_s"], [0.025, 0.025])
    self.assertAllClose(p["loop_pause_s"], 0.15)
    # Without loops, the pauses are gaps: w0 (.02 + .11 + .03 + .21) / 4.
    p = push_trace.phases(self._loop_rows(), num_workers=2,
                          warmup_fraction=0.0)
    self.assertAllClose(p["gap_s"][0], 0.0925)
    self.assertIsNone(p["loop_pause_s"])

  def test_a_loop_end_one_push_off_its_multiple_is_found(self):
    # Loop 1 without w1's .32 push: loop 2 begins at the 8th read, not the
    # 9th; the longest all-idle time (.57 - .36 = .21) marks it.
    p = push_trace.phases(self._loop_rows(drop=(7,)), num_workers=2,
                          warmup_fraction=0.0, loop_steps=4)
    self.assertAllClose(p["loop_pause_s"], (0.10 + 0.21) / 2)
    self.assertAllClose(p["gap_s"], [0.025, 0.02])

  def test_bad_loop_steps(self):
    with self.assertRaisesRegex(ValueError, r"Received: loop_steps=-1"):
      push_trace.phases(self.ROWS, num_workers=2, loop_steps=-1)


def _dataset_fn(input_context):
  del input_context
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 40, size=(512, 3))
  labels = (ids.sum(axis=1, keepdims=True) % 2).astype(np.float32)
  return tf.data.Dataset.from_tensor_slices((ids, labels)).repeat().batch(16)


class PushTraceClusterTest(tf.test.TestCase):

  def test_every_push_is_traced_in_order_of_its_landmarks(self):
    config = gba_tf.GBAConfig(global_batch_size=64, local_batch_size=16)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config, testing_utils.two_shards())
    aggregator = strategy.extended.aggregator
    self.assertIsNone(aggregator.push_trace())
    self.assertNotIn("push_phases", strategy.gba_metrics())
    aggregator.enable_push_trace()
    with strategy.scope():
      ids = tf.keras.Input(shape=(3,), dtype=tf.int64)
      x = tf.keras.layers.Flatten()(tf.keras.layers.Embedding(40, 4)(ids))
      model = tf.keras.Model(ids, tf.keras.layers.Dense(1)(x))
      model.compile(tf.keras.optimizers.Adagrad(0.1),
                    tf.keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(tf.keras.utils.experimental.DatasetCreator(_dataset_fn),
              epochs=1, steps_per_epoch=40, verbose=0)
    m = strategy.gba_metrics()
    rows = aggregator.push_trace()
    # One row per push, each worker's as many as the counters say.
    self.assertLen(rows, m["pushed"])
    worker = rows[:, push_trace.WORKER].astype(int)
    self.assertEqual(np.bincount(worker, minlength=2).tolist(),
                     m["worker_pushed"])
    # Its token and step give the staleness the counters histogram.
    tau = np.maximum(rows[:, push_trace.STEP] - rows[:, push_trace.TOKEN], 0)
    histogram = m["staleness_histogram"]
    self.assertEqual(
        np.bincount(tau.astype(int), minlength=len(histogram)).tolist(),
        histogram)
    # Each push's landmarks in the order the push passes them.
    times = rows[:, push_trace.READ:push_trace.END + 1]
    self.assertTrue(np.all(np.diff(times, axis=1) >= 0), times)
    # A claim per applier hand-over: at least one, and never more than the
    # global steps (one claim can cover steps that completed meanwhile).
    claims = int(rows[:, push_trace.CLAIMED].sum())
    self.assertBetween(claims, 1, m["global_steps"])
    # The phases, with 10% start-up left out.
    phases = push_trace.phases(rows, num_workers=2)
    self.assertEqual(phases["pushes"], m["pushed"] - m["pushed"] // 10)
    self.assertTrue(all(s > 0 for s in phases["arrive_s"]), phases)
    self.assertGreater(phases["apply_s"], 0)


def _ancestors(op):
  """Every op `op` depends on, by data or control edges."""
  seen, stack = set(), [op]
  while stack:
    current = stack.pop()
    for source in [t.op for t in current.inputs] + list(
        current.control_inputs):
      if source not in seen:
        seen.add(source)
        stack.append(source)
  return seen


class ReadTimeOrderTest(tf.test.TestCase):

  def _token_reads(self, traced):
    """The step function's reads of the global step, and its timestamps."""
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config)
    if traced:
      strategy.extended.aggregator.enable_push_trace()
    step = testing_utils.push_twice(strategy)
    graph = step.get_concrete_function().graph
    handle = next(internal for external, internal in graph.captures
                  if external is strategy.extended.tokens.global_step.handle)
    reads = [op for op in graph.get_operations()
             if op.type == "ReadVariableOp" and op.inputs[0] is handle]
    return reads, [op for op in graph.get_operations()
                   if op.type == "Timestamp"]

  def test_a_traced_read_is_timed_before_it_runs(self):
    # On CPU a timestamp waits for a free thread while a variable read runs
    # inline: a time taken after the token read came up to tens of ms late
    # on a busy PS (4 workers on 2 cores: 5-13% of the reads were stamped
    # after the step their token named had finished). Traced, the read
    # must wait for its timestamp.
    reads, _ = self._token_reads(traced=True)
    self.assertNotEmpty(reads)
    for read in reads:
      self.assertIn("Timestamp", {op.type for op in _ancestors(read)})
    # Untraced, the token read (the first: a rejected push reads the global
    # step again, later) waits for nothing, and the time follows it.
    reads, stamps = self._token_reads(traced=False)
    token_read = min(reads, key=lambda op: len(_ancestors(op)))
    self.assertNotIn("Timestamp", {op.type for op in _ancestors(token_read)})
    self.assertTrue(any(token_read in _ancestors(s) for s in stamps))


if __name__ == "__main__":
  tf.test.main()
