"""Token service: the global step, and the token each local step carries.

GBA (arXiv 2205.11048, Sec. 3.2) tags every local gradient with a *token*:
the parameter version (global step) the worker read before its forward pass.
The staleness of the gradient when it is aggregated at global step `s` is
`tau = s - token`.

Where the token is read matters (docs/design.md, invariant 2). Keras `fit` schedules a
whole epoch of closures on the coordinator before the first one runs, so a
token taken at `schedule()` time would be hundreds of steps old. The token is
therefore read *inside* the scheduled function, as the first op of the
replica function (on the first PS task, where the variable lives), and the
forward pass is made to depend on it.

The global step lives in a variable on the first PS task, next to the
accumulator's scheduling state; the accumulator advances it once a global step
has been applied on every shard, so a token names parameters that are fully
applied. It counts global steps applied by this strategy instance; staleness
only needs differences of it, so it is not checkpointed (the optimizer's
`iterations` is, and advances in step with it).

Token lifecycle (one per local step):
  ISSUED (read before the forward pass) -> PUSHED (gradient reached the PS
  and drew a ticket: its place in the global order, hence its global step s
  and tau = s - token) -> DROPPED (tau > max_staleness) | PENDING -> APPLIED
  (all M gradients of step s landed on every shard).
  A worker that dies between ISSUED and PUSHED loses its token and nothing
  else (paper, appendix): no state was taken on its behalf.

Thread-safety: reads are lock-free; the step is only advanced inside the
aggregator's scheduling critical section.
"""

import tensorflow as tf

from gba_tf import compat


def current_worker_index():
  """The worker running the current closure (int64 tensor), or None.

  `ClusterCoordinator` binds it when the closure is dispatched, so the same
  traced function reports the right worker on every worker. None outside a
  function or a coordinator's closure (eager code, MultiWorkerMirrored).
  """
  if not compat.inside_function():
    return None
  try:
    index = tf.distribute.coordinator.experimental_get_current_worker_index()
  except (RuntimeError, ValueError):
    return None
  return tf.cast(index, tf.int64)


class TokenService:
  """Owns the global step; issues tokens inside scheduled functions."""

  def __init__(self, device: str):
    with tf.device(device):
      self.global_step = tf.Variable(
          tf.constant(0, tf.int64), trainable=False, name="gba_global_step")
    # Set by `GradientAggregator.enable_push_trace`: the read time is then
    # taken before the read (see `issue`).
    self.time_before_read = False

  def issue(self):
    """Reads the token and the time it was read. Call in the replica fn.

    Both are taken on the first PS task, where the push that carries them
    lands: neither crosses to the worker and back (two RecvTensor RPCs per
    local step on the PS), and the time to the push's arrival is read off
    one clock. The forward pass waits for the token only (`token` below).

    Returns:
      `(token, read_time)`: int64 scalar tensor and float64 seconds.
    """
    with tf.device(self.global_step.device):
      if self.time_before_read:
        # Traced: the time first, then the read. On CPU a timestamp is
        # queued to the thread pool while a variable read runs inline right
        # after what it waits for, so a time taken after the read can come
        # tens of ms after the value was taken, on a busy PS (traces showed
        # reads stamped after the step their token named had finished).
        # Taken before, the read follows it at once.
        read_time = tf.timestamp()
        with tf.control_dependencies([read_time]):
          token = self.global_step.read_value()
        return token, read_time
      # Not traced: the read first, so that no step waits for a timestamp
      # queued on a busy PS; the time may then come late (see above), which
      # only shortens `worker_compute_seconds`.
      token = self.global_step.read_value()
      with tf.control_dependencies([token]):
        read_time = tf.timestamp()
      return token, read_time

  @staticmethod
  def worker_index():
    """The worker running the current closure, or 0 outside a coordinator."""
    index = current_worker_index()
    return tf.constant(0, tf.int64) if index is None else index
