"""Where the health monitor's latencies come from, per mode.

* GBA: `GBALatencySource` turns the PS-side counters of
  `GBAStrategy.gba_metrics()` into seconds per local step per worker.
* sync: `timed_train_step` makes `model.fit` under MultiWorkerMirroredStrategy
  all-gather each worker's step time into the batch logs, and
  `latencies_from_logs` reads them back.

This is the TensorFlow side of switching; `monitor.py` and `decision.py` are
pure Python.
"""

from typing import Optional, Tuple

import numpy as np
import tensorflow as tf


class GBALatencySource:
  """Per-worker seconds per local step from the GBA counters, per window.

  `worker_pushed` is a cumulative PS-side counter. A window closes once the
  workers together pushed `window_pushes` more gradients: it is measured in
  completed work, because Keras schedules closures far ahead of their
  execution under ParameterServerStrategy. A worker's latency is the
  window's length over its pushes in it: its whole step, wherever its time
  goes. (The token-to-push seconds, `worker_compute_seconds`, miss time
  spent before the token read, such as waiting for input: TensorFlow may
  run the token read before or after the step's input arrives, and a worker
  slowed in its input then looks healthy.) A worker that pushed nothing in
  the window gets the window's length, a lower bound on its step time.

  Args:
    read_metrics: returns `GBAStrategy.gba_metrics()`-shaped dicts.
    clock: returns seconds (injectable for tests).
    window_pushes: gradients per window, summed over workers.
  """

  def __init__(self, read_metrics, clock, window_pushes: int):
    if window_pushes < 1:
      raise ValueError(f"Received: window_pushes={window_pushes!r}, which "
                       "must be >= 1.")
    self._read = read_metrics
    self._clock = clock
    self.window_pushes = window_pushes
    self._start = None

  def poll(self) -> Optional[Tuple[float, ...]]:
    """Latencies of the window that just closed, or None while it is open."""
    metrics = self._read()
    now = self._clock()
    pushed = np.asarray(metrics["worker_pushed"], np.float64)
    if self._start is None:
      self._start = (now, pushed)
      return None
    d_pushed = pushed - self._start[1]
    if d_pushed.sum() < self.window_pushes:
      return None
    elapsed = now - self._start[0]
    self._start = (now, pushed)
    return tuple(float(elapsed / n) if n > 0 else float(elapsed)
                 for n in d_pushed)


def timed_train_step(model: tf.keras.Model, strategy) -> None:
  """Makes `model.fit` under MultiWorkerMirroredStrategy log step latencies.

  Replaces `model.train_step` with the standard Keras step that also logs
  `step_seconds/w<i>` for every worker i: the time from the end of the
  previous step's synchronisation to worker i's gradients being ready, its data
  and compute time, excluding the wait for slower peers. The values are
  all-gathered inside the step, so every worker logs the same numbers and
  takes the same switching decision at the same step.

  Call under `strategy.scope()` after building the model, before `compile`.
  The timer variable is kept out of the model's checkpoint. Logs then show
  this worker's metrics (`distribute_reduction_method = "first"`) instead of
  their sum over workers.
  """
  num_workers = strategy.num_replicas_in_sync
  # One timestamp per replica: SyncOnRead keeps each worker's own value.
  last_done = tf.Variable(
      0.0, dtype=tf.float64, trainable=False,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.NONE)

  def train_step(data):
    x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      y_pred = model(x, training=True)
      loss = model.compute_loss(x, y, y_pred, sample_weight)
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    with tf.control_dependencies([g for g in grads if g is not None]):
      ready = tf.timestamp()
    previous = last_done.read_value()
    # The first step of a fit has no previous all-reduce: report 0.
    compute = tf.where(previous > 0, ready - previous, tf.zeros_like(ready))
    gathered = tf.distribute.get_replica_context().all_gather(
        tf.reshape(tf.cast(compute, tf.float32), [1]), axis=0)
    # The all-gather returns when the slowest worker has arrived: that is
    # when this step's synchronisation ends (the gradient all-reduce that
    # follows no longer waits). A data dependency orders the timestamp;
    # program order alone does not order a timestamp after a collective.
    with tf.control_dependencies([gathered]):
      synced = tf.timestamp()
    last_done.assign(synced)
    with tf.control_dependencies([gathered]):
      model.optimizer.apply_gradients(zip(grads, variables))
    logs = model.compute_metrics(x, y, y_pred, sample_weight)
    for i in range(num_workers):
      logs[f"step_seconds/w{i}"] = gathered[i]
    return logs

  # Keras' default ("auto" = "sum") all-reduces every log value across
  # workers, which would double the all-gathered times (and the losses) on 2
  # workers; the values are identical on every worker, so take the local
  # one.
  model.distribute_reduction_method = "first"
  # Assigned around Keras' attribute tracking: a function is not state.
  object.__setattr__(model, "train_step", train_step)
  object.__setattr__(model, "_gba_step_timer", last_done)


def latencies_from_logs(logs, num_workers: int) -> Optional[Tuple[float, ...]]:
  """The `step_seconds/w<i>` values of a batch's logs, or None if absent."""
  try:
    return tuple(float(logs[f"step_seconds/w{i}"])
                 for i in range(num_workers))
  except (KeyError, TypeError):
    return None
