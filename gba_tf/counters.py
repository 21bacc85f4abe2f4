"""Runtime counters of GBA, kept in TF variables on the first PS task.

Python side effects run only when a `tf.function` is traced, so every count
that must be true at run time (DESIGN invariant 4: pushed = applied + dropped
+ pending) is a variable updated by the traced step itself.

Thread-safety: the variables are only updated inside the aggregator's
`tf.CriticalSection`, so concurrent workers never lose an update; reads from
the coordinator (`as_dict`) are a consistent snapshot only between steps.
"""

from typing import Dict, List, Union

import numpy as np
import tensorflow as tf

# Staleness histogram buckets 0..HISTOGRAM_SIZE-2, plus one overflow bucket.
# 32 global steps covers every tau that the default policy does not drop.
HISTOGRAM_SIZE = 33

_SCALARS = ("pushed", "accepted", "applied", "decayed", "dropped",
            "nonfinite", "pending", "global_steps")


class GBACounters:
  """Counts pushed / applied / decayed / dropped gradients and staleness.

  Attributes (all `tf.Variable`, created on `device`):
    pushed: local gradients that reached the accumulator.
    accepted: pushed gradients that were not dropped.
    applied: gradients included in applied global steps (M per step).
    decayed: accepted gradients whose weight was < 1 (they are within
      `applied` or `pending`).
    dropped: gradients staler than `max_staleness` or not finite.
    nonfinite: dropped gradients that held a NaN or Inf (a subset of
      `dropped`): rejected before they reach the accumulator.
    pending: accepted gradients waiting for the next global step (< M).
    global_steps: optimizer steps applied by GBA.
    staleness_histogram: pushed gradients per tau (last bucket: tau >= 32).
    worker_pushed / worker_dropped: per worker index.
    worker_last_token: the last token each worker pushed with.
    worker_compute_seconds: per worker, summed time from token read to push.
  """

  def __init__(self, num_workers: int, device: str):
    self.num_workers = num_workers
    with tf.device(device):
      for name in _SCALARS:
        setattr(self, name, tf.Variable(
            tf.constant(0, tf.int64), trainable=False, name=f"gba_{name}"))
      self.staleness_histogram = tf.Variable(
          tf.zeros([HISTOGRAM_SIZE], tf.int64), trainable=False,
          name="gba_staleness_histogram")
      zeros = tf.zeros([num_workers], tf.int64)
      self.worker_pushed = tf.Variable(zeros, trainable=False,
                                       name="gba_worker_pushed")
      self.worker_dropped = tf.Variable(zeros, trainable=False,
                                        name="gba_worker_dropped")
      self.worker_last_token = tf.Variable(
          zeros - 1, trainable=False, name="gba_worker_last_token")
      self.worker_compute_seconds = tf.Variable(
          tf.zeros([num_workers], tf.float64), trainable=False,
          name="gba_worker_compute_seconds")

  def record_push(self, tau, token, worker_index, accepted, decayed,
                  compute_seconds, finite=True):
    """Ops that count one pushed gradient. Call inside the critical section."""
    one = tf.constant(1, tf.int64)
    a = tf.cast(accepted, tf.int64)
    f = tf.cast(finite, tf.int64)
    bucket = tf.minimum(tau, HISTOGRAM_SIZE - 1)
    w = tf.reshape(tf.cast(worker_index, tf.int64), [1, 1])
    return [
        self.pushed.assign_add(one),
        self.accepted.assign_add(a),
        self.pending.assign_add(a),
        self.dropped.assign_add(one - a),
        self.nonfinite.assign_add(one - f),
        self.decayed.assign_add(a * tf.cast(decayed, tf.int64)),
        self.staleness_histogram.scatter_nd_add(
            tf.reshape(bucket, [1, 1]), [one]),
        self.worker_pushed.scatter_nd_add(w, [one]),
        self.worker_dropped.scatter_nd_add(w, [one - a]),
        self.worker_last_token.scatter_nd_update(w, [token]),
        self.worker_compute_seconds.scatter_nd_add(
            w, [tf.cast(compute_seconds, tf.float64)]),
    ]

  def record_apply(self, num_aggregate: int):
    m = tf.constant(num_aggregate, tf.int64)
    return [
        self.applied.assign_add(m),
        self.pending.assign_sub(m),
        self.global_steps.assign_add(1),
    ]

  def as_dict(self) -> Dict[str, Union[int, float, List]]:
    """A snapshot as Python numbers and lists (call eagerly, between steps)."""
    out = {name: int(getattr(self, name).numpy()) for name in _SCALARS}
    out["staleness_histogram"] = self.staleness_histogram.numpy().tolist()
    out["worker_pushed"] = self.worker_pushed.numpy().tolist()
    out["worker_dropped"] = self.worker_dropped.numpy().tolist()
    out["worker_last_token"] = self.worker_last_token.numpy().tolist()
    seconds = self.worker_compute_seconds.numpy()
    out["worker_compute_seconds"] = seconds.tolist()
    pushed = np.maximum(self.worker_pushed.numpy(), 1)
    out["worker_mean_step_seconds"] = (seconds / pushed).tolist()
    return out
