"""Every shard applies the same M gradients in each global step, under load.

4 worker processes and 2 PS processes on loopback push concurrently, with no
serialization by the test. Push `p` carries a one-hot gradient in column `p`
of a dense variable and in row `p` of an embedding table, both split over
the two PS tasks. A logging optimizer writes every aggregated gradient it
applies, per variable shard, into a log indexed by the global step (its
`iterations` before the increment), on that shard's PS. The log of each shard
then says which pushes went into which global step, independently of the
other shard.
"""

import numpy as np
import pytest

import gba_tf
from gba_tf.launch import local_cluster
import tensorflow as tf

from tests import testing_utils

# 96 pushes with M = 4: 24 global steps, 4 workers pushing at once.
_PUSHES = 96
_M = 4


class _LoggingSGD(tf.keras.optimizers.SGD):
  """SGD(lr=1) that also logs each applied gradient at its global step."""

  def build(self, var_list):
    super().build(var_list)
    if hasattr(self, "_logs"):
      return
    steps = _PUSHES // _M
    self._logs = [
        self.add_variable_from_reference(v, "log",
                                         shape=[steps] + v.shape.as_list())
        for v in var_list]

  def update_step(self, gradient, variable):
    log = self._logs[self._index_dict[self._var_key(variable)]]
    step = tf.cast(self.iterations, tf.int64)
    if isinstance(gradient, tf.IndexedSlices):
      rows = tf.cast(gradient.indices, tf.int64)
      log.scatter_nd_update(
          tf.stack([tf.fill(tf.shape(rows), step), rows], axis=1),
          gradient.values)
    else:
      log.scatter_nd_update([[step]], gradient[None])
    super().update_step(gradient, variable)


@pytest.mark.cluster
class PushOrderTest(tf.test.TestCase):

  def test_every_shard_aggregates_the_same_pushes_per_step(self):
    testing_utils.collect_before_switching_cluster()
    with local_cluster.LocalCluster(num_workers=4, num_ps=2) as cluster:
      config = gba_tf.GBAConfig(global_batch_size=_M, local_batch_size=1,
                                decay="none", max_staleness=None)
      strategy = gba_tf.GBAStrategy(cluster.resolver(), config,
                                    testing_utils.two_shards())
      coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
      with strategy.scope():
        dense = tf.Variable(tf.zeros([2, _PUSHES]), name="dense")
        table = tf.Variable(tf.zeros([2 * _PUSHES, 1]), name="table")
        optimizer = _LoggingSGD(1.0)
      variables = list(dense.variables) + list(table.variables)
      testing_utils.keep_alive(strategy, coordinator, dense, table, optimizer)
      with strategy.scope():
        optimizer.build(variables)

      @tf.function
      def step(push_id):
        def replica_fn(push_id):
          with tf.GradientTape() as tape:
            one_hot = tf.one_hot(push_id, _PUSHES)
            # Row p of shard 0 and row p of shard 1 (global row P + p).
            rows = tf.nn.embedding_lookup(
                table, tf.stack([push_id, push_id + _PUSHES]))
            loss = (tf.reduce_sum(dense * one_hot[None, :])
                    + tf.reduce_sum(rows))
          grads = tape.gradient(loss, variables)
          optimizer.apply_gradients(zip(grads, variables))

        strategy.run(replica_fn, args=(push_id,))

      for p in range(_PUSHES):
        coordinator.schedule(step, args=(tf.constant(p, tf.int64),))
      coordinator.join()

      metrics = strategy.gba_metrics()
      self.assertEqual((metrics["pushed"], metrics["applied"],
                        metrics["pending"], metrics["global_steps"]),
                       (_PUSHES, _PUSHES, 0, _PUSHES // _M))
      # All four workers pushed: the pushes really were concurrent.
      self.assertTrue(all(n > 0 for n in metrics["worker_pushed"]),
                      metrics["worker_pushed"])
      # Pushes per (shard, step): a dense shard logs [steps, 1, P]; a table
      # shard logs [steps, P, 1] (its rows are push ids, offset by P on
      # shard 1). Each entry is 1/M where the push went in, else 0.
      logs = [log.numpy() for log in optimizer._logs]  # pylint: disable=protected-access
      sets = [
          [frozenset(np.flatnonzero(logs[k][s].ravel())) for s in range(
              _PUSHES // _M)] for k in range(4)]
      for k in range(4):
        for s, pushes in enumerate(sets[k]):
          self.assertLen(pushes, _M, f"shard {k}, global step {s}")
          self.assertAllClose(logs[k][s].ravel()[sorted(pushes)],
                              [1.0 / _M] * _M)
        # Every push in exactly one global step.
        self.assertEqual(sorted(p for s in sets[k] for p in s),
                         list(range(_PUSHES)))
      for s in range(_PUSHES // _M):
        self.assertEqual(
            len({sets[k][s] for k in range(4)}), 1,
            f"global step {s}: shards aggregated {[sets[k][s] for k in range(4)]}")
      self.assertEqual(optimizer.iterations.numpy(), _PUSHES // _M)


if __name__ == "__main__":
  tf.test.main()
