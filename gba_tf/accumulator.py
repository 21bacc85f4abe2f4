"""PS-side gradient accumulation: exactly M local gradients per global step.

Every variable shard gets an accumulator slot co-located with it on its PS
task, so pushing a gradient moves it to where it is applied and nowhere else.
One `tf.CriticalSection` on the first PS task makes a whole local step's push
(all shards) and, every M-th push, the optimizer step atomic across workers:
without it, concurrent read-modify-writes from workers lose updates
(DESIGN.md: ~30% were lost in a test without the lock).

Aggregation (arXiv 2205.11048, Sec. 3.2): the global step applies
`sum_i f(tau_i) * g_i / M` over the M accepted local gradients.

* Dense gradients accumulate into a zero-initialised buffer.
* Sparse gradients (`tf.IndexedSlices`, embeddings) are summed row-wise
  and applied as `IndexedSlices` over exactly the rows touched by the M
  local batches, so slot optimizers (Adagrad, Adam) see the update of
  synchronous training: tf_keras deduplicates a synchronous global batch's
  sparse gradient into the same summed unique rows.

Each push first stages its gradients on their shards' PS tasks and checks
there that they are finite; only then does it take the lock, so the lock is
held for PS-local work (plus one hop per other PS task). A gradient with a
NaN or Inf is rejected whole and counted (`nonfinite`, within `dropped`).

Thread-safety: `push_and_maybe_apply` builds ops that run under the critical
section; building (tracing) is done by one Python thread at a time.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import tensorflow as tf

from gba_tf import counters as counters_lib
from gba_tf import staleness as staleness_lib
from gba_tf import tokens as tokens_lib


class _DenseSlot:
  """Sum of weighted dense gradients for one variable shard."""

  def __init__(self, var):
    self._sum = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                            name=_slot_name(var, "sum"))
    self.nbytes = _variable_bytes(self._sum)

  def stage(self, grad):
    """Moves the gradient next to the buffer (before the lock is taken)."""
    if isinstance(grad, tf.IndexedSlices):
      # A dense variable that got a sparse gradient in one trace only
      # (e.g. tf.gather on a small table): a dense buffer is exact.
      grad = tf.convert_to_tensor(grad)
    with tf.device(self._sum.device):
      return tf.identity(grad)

  def push(self, grad, weight):
    with tf.device(self._sum.device):
      return self._sum.assign_add(grad * tf.cast(weight, grad.dtype))

  def take(self, num_aggregate: int):
    mean = self._sum.read_value() / tf.cast(num_aggregate, self._sum.dtype)
    with tf.control_dependencies([mean]):
      reset = self._sum.assign(tf.zeros_like(self._sum))
    with tf.control_dependencies([reset]):
      return tf.identity(mean)


class _SparseSlot:
  """Weighted `IndexedSlices` summed into rows of one embedding shard.

  Rows are summed into a buffer shaped like the shard, and a mask remembers
  which rows were touched; `take` gathers only those rows. (A growing list
  of indices would be smaller, but variables of unknown shape abort the
  remote runtime in TF 2.21: "Check failed: size >= 0".) Cost: one extra
  shard-sized buffer, like one optimizer slot; apply scans the mask once.
  """

  def __init__(self, var):
    self._dense_shape = var.shape
    self._sum = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                            name=_slot_name(var, "sum"))
    self._touched = tf.Variable(tf.zeros(var.shape[:1], tf.int32),
                                trainable=False,
                                name=_slot_name(var, "touched"))
    self.nbytes = (_variable_bytes(self._sum)
                   + _variable_bytes(self._touched))

  def stage(self, grad):
    """Moves the gradient next to the buffer (before the lock is taken)."""
    if not isinstance(grad, tf.IndexedSlices):
      raise TypeError(
          "GBA accumulates this variable as sparse (its first gradient was "
          f"tf.IndexedSlices) but received a dense gradient {grad!r}.")
    with tf.device(self._sum.device):
      return tf.IndexedSlices(tf.identity(grad.values),
                              tf.cast(grad.indices, tf.int64),
                              grad.dense_shape)

  def push(self, grad, weight):
    with tf.device(self._sum.device):
      indices = grad.indices
      values = grad.values * tf.cast(weight, grad.values.dtype)
    return [
        self._sum.scatter_add(tf.IndexedSlices(values, indices)),
        self._touched.scatter_update(tf.IndexedSlices(
            tf.ones_like(indices, tf.int32), indices)),
    ]

  def take(self, num_aggregate: int):
    rows = tf.reshape(tf.where(self._touched.read_value() > 0), [-1])
    values = tf.gather(self._sum.read_value(), rows)
    values /= tf.cast(num_aggregate, values.dtype)
    with tf.control_dependencies([values]):
      resets = [
          self._sum.scatter_update(
              tf.IndexedSlices(tf.zeros_like(values), rows)),
          self._touched.scatter_update(
              tf.IndexedSlices(tf.zeros_like(rows, tf.int32), rows)),
      ]
    with tf.control_dependencies(resets):
      return tf.IndexedSlices(
          tf.identity(values), tf.identity(rows),
          dense_shape=tf.constant(self._dense_shape.as_list(), tf.int64))


def _variable_bytes(var) -> int:
  return var.shape.num_elements() * var.dtype.size


def _slot_name(var, suffix: str) -> str:
  return "gba_acc/" + var.name.split(":")[0].replace("/", "_") + "_" + suffix


class GradientAggregator:
  """Pushes local gradients; applies the optimizer once per M of them.

  Args:
    extended: the strategy's Extended (for `colocate_vars_with`).
    num_aggregate: M.
    policy: the `StalenessPolicy`.
    tokens: the `TokenService`.
    counters: the `GBACounters`.
    device: the PS device holding the lock (the first PS task).
  """

  def __init__(self, extended, num_aggregate: int,
               policy: staleness_lib.StalenessPolicy,
               tokens: tokens_lib.TokenService,
               counters: counters_lib.GBACounters, device: str):
    self._extended = extended
    self.num_aggregate = num_aggregate
    self.policy = policy
    self.tokens = tokens
    self.counters = counters
    self._slots: Dict[int, object] = {}
    self._device = device
    with tf.device(device):
      # exclusive_resource_access=False: the model variables guarded here are
      # also read, lock-free, by every worker's forward pass.
      self._lock = tf.CriticalSection(name="gba_lock")

  def _slot(self, var, grad):
    key = id(var)
    slot = self._slots.get(key)
    if slot is None:
      # Slots are created on the coordinator the first time a step function
      # is traced, lifted out of the trace like tf_keras optimizer slots.
      with tf.init_scope(), self._extended.colocate_vars_with(var):
        slot = (_SparseSlot(var) if isinstance(grad, tf.IndexedSlices)
                else _DenseSlot(var))
      # Keep `var` alive with its slot: a key of a dead variable's id could
      # otherwise be reused by a new variable and find the wrong slot.
      self._slots[key] = (slot, var)
    return self._slots[key][0]

  @property
  def buffer_bytes(self) -> int:
    """Bytes of every accumulation buffer, summed over the PS.

    The buffers are created once, shaped like the variables they serve, so
    this is fixed once every variable has had its first gradient.
    """
    return sum(slot.nbytes for slot, _ in self._slots.values())

  def push_and_maybe_apply(
      self,
      grads_and_vars: Sequence[Tuple[object, tf.Variable]],
      token,
      read_time,
      worker_index,
      apply_fn: Callable[[List[Tuple[object, tf.Variable]]], object],
      before_apply: Callable[[], None] = lambda: None):
    """Builds the locked push (+ apply every M-th accepted push).

    Args:
      grads_and_vars: this local step's gradients.
      token: int64 token read before the forward pass.
      read_time: float64 seconds at which the token was read.
      worker_index: int64 index of the pushing worker.
      apply_fn: applies a list of (aggregated gradient, variable) with the
        optimizer and advances `optimizer.iterations` once.
      before_apply: runs in the apply branch before `apply_fn` (e.g. to
        re-evaluate the learning-rate schedule at the global step).

    Returns:
      A bool tensor: whether this push completed a global step.
    """
    grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
    slots = [(self._slot(v, g), g, v) for g, v in grads_and_vars]
    # Outside the lock: the worker's own time (token read to gradients
    # ready, on its own clock) and the transfer of every gradient to its
    # shard's PS, so that the lock is held for PS-local work only.
    staged = [(slot, slot.stage(g), v) for slot, g, v in slots]
    tensors = [g.values if isinstance(g, tf.IndexedSlices) else g
               for _, g, _ in staged]
    with tf.control_dependencies(tensors):
      compute_seconds = tf.timestamp() - read_time
    # A NaN or Inf from one worker (bad data, an overflow) would poison every
    # later global step: checked next to each shard, before the lock, and
    # the whole local gradient is rejected and counted.
    checks = []
    for tensor in tensors:
      with tf.device(tensor.device):
        checks.append(tf.reduce_all(tf.math.is_finite(tensor)))
    finite = tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)
    m = self.num_aggregate

    def locked_on_ps():
      tau = self.tokens.staleness(token)
      weight = self.policy.weight(tau)
      accepted = tf.logical_and(self.policy.accepts(tau), finite)
      counted = self.counters.record_push(
          tau, token, worker_index, accepted, weight < 1.0, compute_seconds,
          finite)

      def push():
        ops = []
        for slot, grad, _ in staged:
          pushed = slot.push(grad, weight)
          ops.extend(pushed if isinstance(pushed, list) else [pushed])
        with tf.control_dependencies(ops):
          return tf.constant(True)

      with tf.control_dependencies(counted):
        pushed = tf.cond(accepted, push, lambda: tf.constant(False))

      def apply():
        before_apply()
        aggregated = [(slot.take(m), var) for slot, _, var in staged]
        result = apply_fn(aggregated)
        deps = [result] if result is not None else []
        with tf.control_dependencies(deps):
          advanced = self.counters.record_apply(m) + [
              self.tokens.global_step.assign_add(1)]
        with tf.control_dependencies(advanced):
          return tf.constant(True)

      with tf.control_dependencies([pushed]):
        ready = self.counters.pending.read_value() >= m
      return tf.cond(ready, apply, lambda: tf.constant(False))

    def locked():
      # Control flow and scalar policy math run on the lock's PS task: a
      # tf.cond placed on the worker would call its branches remotely, one
      # more round trip each while every other worker waits for the lock.
      with tf.device(self._device):
        return locked_on_ps()

    return self._lock.execute(locked, exclusive_resource_access=False)
