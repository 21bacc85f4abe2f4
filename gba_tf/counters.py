"""Runtime counters of GBA, kept in TF variables on the first PS task.

Python side effects run only when a `tf.function` is traced, so every count
that must be true at run time (docs/design.md, invariant 4: pushed = applied +
dropped + pending) is a variable updated by the traced step itself.

Every per-push count is one slot of a single int64 vector, `counts`, so that
counting a push is one `scatter_nd_add` (plus one `scatter_nd_update` for the
worker's last token): two ops, not a dozen, and no lock. Each op holds the
variable's mutex for its read-modify-write, so concurrent pushes never lose a
count. `applied` and `global_steps` are derived from the global step
(`applied = M * global_steps`), so the apply path updates no counter at all;
`pending` is the aggregator's own count of landings, so the conservation
pushed = applied + dropped + pending + lost is measured, not derived.

Thread-safety: updates are atomic ops; reads from the coordinator (`as_dict`)
are a consistent snapshot only between steps.
"""

from typing import Dict, List, Union

import numpy as np
import tensorflow as tf

# Staleness histogram buckets 0..HISTOGRAM_SIZE-2, plus one overflow bucket.
# 32 global steps covers every tau that the default policy does not drop.
HISTOGRAM_SIZE = 33

# Layout of `counts`: these scalars, the histogram, then per-worker blocks.
_SCALARS = ("pushed", "accepted", "decayed", "dropped", "nonfinite")
_HISTOGRAM = len(_SCALARS)
_WORKER_BLOCKS = ("worker_pushed", "worker_dropped",
                  "worker_compute_micros")


class GBACounters:
  """Counts pushed / applied / decayed / dropped gradients and staleness.

  Reported by `as_dict()` (and `GBAStrategy.gba_metrics()`):
    pushed: local gradients that reached the parameter servers.
    accepted: pushed gradients that were not dropped.
    applied: gradients included in applied global steps (M per step).
    decayed: accepted gradients whose weight was < 1 (they are within
      `applied` or `pending`).
    dropped: gradients staler than `max_staleness` or not finite.
    nonfinite: dropped gradients that held a NaN or Inf (a subset of
      `dropped`): rejected before they reach the accumulator.
    pending: accepted gradients landed in the accumulator and not yet
      applied (< 2M: the step being assembled, and the next one while the
      first is applied), read from the aggregator's landing counts.
    lost: accepted gradients that never landed: their push died half-way
      (a worker killed mid-push; `gba_tf.stall`). pushed = applied +
      dropped + pending + lost.
    global_steps: optimizer steps applied by GBA.
    staleness_histogram: pushed gradients per tau (last bucket: tau >= 32).
    worker_pushed / worker_dropped: per worker index.
    worker_last_token: the last token each worker pushed with.
    worker_compute_seconds: per worker, summed time from token read to push.

  Args:
    num_workers: workers in the cluster.
    num_aggregate: M, to derive `applied` from the global step.
    global_step: the `TokenService`'s global step variable.
    device: where the counters live (the first PS task).
  """

  def __init__(self, num_workers: int, num_aggregate: int, global_step,
               device: str):
    self.num_workers = num_workers
    self._num_aggregate = num_aggregate
    self._global_step = global_step
    size = _HISTOGRAM + HISTOGRAM_SIZE + num_workers * len(_WORKER_BLOCKS)
    with tf.device(device):
      self.counts = tf.Variable(tf.zeros([size], tf.int64), trainable=False,
                                name="gba_counts")
      self.worker_last_token = tf.Variable(
          tf.fill([num_workers], tf.constant(-1, tf.int64)), trainable=False,
          name="gba_worker_last_token")

  def _worker_slot(self, block: str, worker_index):
    base = _HISTOGRAM + HISTOGRAM_SIZE + (
        _WORKER_BLOCKS.index(block) * self.num_workers)
    return base + worker_index

  def record_push(self, tau, token, worker_index, accepted, decayed,
                  compute_seconds, finite):
    """Ops that count one pushed gradient (atomic; no lock needed)."""
    one = tf.constant(1, tf.int64)
    a = tf.cast(accepted, tf.int64)
    w = tf.cast(worker_index, tf.int64)
    indices = tf.stack([
        tf.constant(_SCALARS.index("pushed"), tf.int64),
        tf.constant(_SCALARS.index("accepted"), tf.int64),
        tf.constant(_SCALARS.index("decayed"), tf.int64),
        tf.constant(_SCALARS.index("dropped"), tf.int64),
        tf.constant(_SCALARS.index("nonfinite"), tf.int64),
        _HISTOGRAM + tf.minimum(tau, HISTOGRAM_SIZE - 1),
        self._worker_slot("worker_pushed", w),
        self._worker_slot("worker_dropped", w),
        self._worker_slot("worker_compute_micros", w),
    ])
    micros = tf.cast(tf.round(compute_seconds * 1e6), tf.int64)
    # The worker index and token are known when the step starts; the
    # update must wait for the push itself.
    with tf.control_dependencies([accepted, tau]):
      w = tf.identity(w)
    updates = tf.stack([
        one, a, a * tf.cast(decayed, tf.int64), one - a,
        one - tf.cast(finite, tf.int64), one, one, one - a, micros])
    return [
        self.counts.scatter_nd_add(tf.reshape(indices, [-1, 1]), updates),
        self.worker_last_token.scatter_nd_update(tf.reshape(w, [1, 1]),
                                                 tf.reshape(token, [1])),
    ]

  def as_dict(self, pending: int) -> Dict[str, Union[int, float, List]]:
    """A snapshot as Python numbers and lists (call eagerly, between steps).

    Args:
      pending: accepted landings not yet applied (from the aggregator).
    """
    counts = self.counts.numpy()
    out = {name: int(counts[i]) for i, name in enumerate(_SCALARS)}
    steps = int(self._global_step.numpy())
    out["global_steps"] = steps
    out["applied"] = steps * self._num_aggregate
    out["pending"] = pending
    out["lost"] = out["accepted"] - out["applied"] - pending
    out["staleness_histogram"] = counts[
        _HISTOGRAM:_HISTOGRAM + HISTOGRAM_SIZE].tolist()
    n = self.num_workers
    blocks = {name: counts[self._worker_slot(name, 0):
                           self._worker_slot(name, 0) + n]
              for name in _WORKER_BLOCKS}
    out["worker_pushed"] = blocks["worker_pushed"].tolist()
    out["worker_dropped"] = blocks["worker_dropped"].tolist()
    out["worker_last_token"] = self.worker_last_token.numpy().tolist()
    seconds = blocks["worker_compute_micros"] / 1e6
    out["worker_compute_seconds"] = seconds.tolist()
    pushed = np.maximum(blocks["worker_pushed"], 1)
    out["worker_mean_step_seconds"] = (seconds / pushed).tolist()
    return out
