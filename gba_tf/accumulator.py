"""PS-side gradient accumulation: exactly M local gradients per global step.

Aggregation (arXiv 2205.11048, Sec. 3.2): global step `s` applies
`sum_i f(tau_i) * g_i / M` over exactly M accepted local gradients, on every
shard the same M. (`GBAConfig(normalize="weights")` divides by
`sum_i f(tau_i)` instead, summed on the first PS task as the pushes land.)

The push path (docs/design.md, "Push and apply") keeps every gradient-sized
operation per shard and out of any lock; the only work all workers serialize
on is scalar, on the first PS task:

1. Stage: each gradient moves to its shard's PS task, which checks that it
   is finite. A gradient with a NaN or Inf is rejected whole and counted
   (`nonfinite`, within `dropped`); it takes no ticket.
2. Ticket: a finite push dequeues a ticket from a queue on the first PS
   task, smallest ticket first. Ticket `t` is the push's place in the
   global order: it joins global step `s = t // M`, so `tau = s - token`
   and the weight `f(tau)` are known from the ticket alone (a lookup in
   `StalenessPolicy.weight_table()`). A dropped push (tau > max_staleness)
   puts its ticket back, and it is the next one handed out (see
   `_Tickets`). The queue holds the tickets of two global steps; the
   tickets of step `s + 2` are queued only once step `s` is applied, so at
   most two steps are ever open.
3. Add: on each shard, the weighted gradient is added into buffer `s % 2` of
   its variable, with one `scatter_nd_add` (atomic under the variable's own
   mutex, so no lock is taken and concurrent adds never lose an update).
4. Land and apply: the push reports its landing to a scalar critical section
   on the first PS task. The push whose landing completes step `s` (M
   landings), when step `s - 1` is applied, claims the apply and hands the
   step to the applier (`gba_tf.applier`): one function, started once from
   the chief, that runs on the parameter servers and applies each step it
   is handed. It reads and clears buffer `s % 2` on every shard and runs
   the optimizer there, in parallel across shards and outside any lock,
   while other pushes add into the other buffer. Applies run one at a time
   and in order: a step that completes while another is applied is chained
   by the applier. The claiming push waits for the applier's reply, so it
   returns, as a synchronous step would, once its step is applied; no
   other push waits, and no push carries the apply in its own graph.

Every shard therefore applies, for step `s`, exactly the gradients holding
tickets `s*M .. s*M + M - 1`, whatever order they reached the shards in.

* Dense gradients accumulate into a zero-initialised buffer.
* Sparse gradients (`tf.IndexedSlices`, embeddings) are summed row-wise and
  applied as `IndexedSlices` over the rows the step's pushes touched, so
  slot optimizers (Adagrad, Adam) see the update of synchronous training:
  tf_keras deduplicates a synchronous global batch's sparse gradient into
  the same summed unique rows. Each push notes its rows in a queue next to
  the buffers; the apply reads and clears only those rows.
* Memory: two buffers per variable, so exactly 2x the variables served
  (plus, between a push and its apply, the row ids of the open steps).

Thread-safety: `push` builds ops that are safe to run concurrently from any
number of workers; building (tracing) is done by one Python thread at a time.
"""

import collections
import dataclasses
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from gba_tf import applier as applier_lib
from gba_tf import counters as counters_lib
from gba_tf import push_trace as push_trace_lib
from gba_tf import schedule
from gba_tf import staleness as staleness_lib
from gba_tf import stall as stall_lib
from gba_tf import tokens as tokens_lib

# The global order (tickets, staleness, weights, when a step is complete)
# follows `gba_tf.schedule`, evaluated here with TF ops on the first PS task;
# the simulator evaluates the same functions on numpy.
_TF_OPS = schedule.Ops(maximum=tf.maximum, minimum=tf.minimum,
                       take=tf.gather)

# Layout of the scheduling state: landings of the open step with parity p at
# index p, the next step to apply, and whether a push is applying it.
_NEXT = 2
_BUSY = 3

# Entries (one per accepted push) a sparse slot's row queue can hold; an open
# step holds M of them.
_ROW_QUEUE_CAPACITY = 1 << 20

# Entries of the applier's queues: one claim is open at a time (plus a stop
# request, and replies that a dead claimer left).
_REPLY_CAPACITY = 1024

# Hold-time samples kept by `enable_hold_profile` (a ring; newest win).
_HOLD_PROFILE_SIZE = 16384
# Pushes kept by `enable_push_trace` (a ring; newest win).
_TRACE_SIZE = 16384


class _Slot:
  """Two accumulation buffers (one per open global step) for a variable shard.

  Args:
    var: the variable shard, on its PS task.
    sparse: whether its gradients are `tf.IndexedSlices`.
  """

  def __init__(self, var, sparse: bool):
    self.sparse = sparse
    self._dense_shape = var.shape
    # Elements of the variable (None if its shape is not fully known).
    self.size = var.shape.num_elements()
    self._buffers = tf.Variable(
        tf.zeros([schedule.OPEN_STEPS] + var.shape.as_list(), var.dtype),
        trainable=False, name=_slot_name(var))
    self.nbytes = (self._buffers.shape.num_elements()
                   * self._buffers.dtype.size)
    self.device = self._buffers.device
    if sparse:
      # The rows each accepted push added to, one queue per open step: the
      # apply reads and clears those rows only, not the whole table (a scan
      # of every row per apply was a large part of the PS's extra CPU with a
      # 100k-row embedding). Held only between a push and its step's apply,
      # as ids + 1 so that the queue's zero padding is no row.
      with tf.device(self.device):
        self._rows = [
            tf.queue.PaddingFIFOQueue(
                _ROW_QUEUE_CAPACITY, tf.int64, shapes=[[None]],
                name=f"{_slot_name(var)}_rows{p}")
            for p in range(schedule.OPEN_STEPS)]

  def _rows_of(self, parity):
    return tf.queue.QueueBase.from_list(tf.cast(parity, tf.int32), self._rows)

  def stage(self, grad):
    """Moves the gradient next to the buffers (before it takes a ticket).

    A sparse gradient is first summed per row where it was computed (what
    tf_keras' `apply_gradients` does there before any update): an
    embedding's gradient repeats a row once per lookup of it, about half
    of its rows in a CTR batch, and every repeat would otherwise cross to
    the PS, be added there, and be noted for the apply to deduplicate
    again. The sum is the same; the PS does the work once per row.
    """
    if self.sparse and isinstance(grad, tf.IndexedSlices):
      rows, position = tf.unique(tf.cast(grad.indices, tf.int64))
      grad = tf.IndexedSlices(
          tf.math.unsorted_segment_sum(grad.values, position,
                                       tf.shape(rows)[0]),
          rows, grad.dense_shape)
    with tf.device(self.device):
      if not self.sparse:
        # A dense variable that got a sparse gradient in one trace only
        # (e.g. tf.gather on a small table): a dense buffer is exact.
        return tf.identity(tf.convert_to_tensor(grad))
      if not isinstance(grad, tf.IndexedSlices):
        raise TypeError(
            "GBA accumulates this variable as sparse (its first gradient was "
            f"tf.IndexedSlices) but received a dense gradient {grad!r}.")
      return tf.IndexedSlices(tf.identity(grad.values),
                              tf.identity(grad.indices), grad.dense_shape)

  def add(self, grad, parity, weight, accepted):
    """Adds `weight * grad` into buffer `parity` if `accepted`: one atomic
    scatter op, and no branch. Returns the op's result (the variable).

    A push that is not accepted (dropped, or not finite) adds nothing: a
    dense gradient is scaled by 0 with `multiply_no_nan` (0 even where the
    gradient is NaN or Inf), and a sparse one adds none of its rows. The
    add is not a `tf.cond`: every node of a branch, taken or not, is
    processed on the PS and every tensor it takes crosses into it (one
    `Switch` each), so a branch cost every push about as many nodes again
    as the add itself.
    """
    with tf.device(self.device):
      if self.sparse:
        kept = tf.where(accepted, tf.shape(grad.indices)[0], 0)
        rows = grad.indices[:kept]
        indices = tf.stack([tf.fill(tf.shape(rows), parity), rows], axis=1)
        # Noted before added: a push that dies in between leaves a noted row
        # with nothing added, never an added row the apply would not clear.
        # A push that adds no row notes an empty entry, which is no row.
        noted = self._rows_of(parity).enqueue(rows + 1)
        with tf.control_dependencies([noted]):
          return self._buffers.scatter_nd_add(
              indices,
              grad.values[:kept] * tf.cast(weight, grad.values.dtype))
      return self.add_scaled(
          tf.math.multiply_no_nan(grad, _scale(grad.dtype, weight, accepted)),
          tf.reshape(parity, [1, 1]))

  def add_scaled(self, grad, index):
    """Adds a dense gradient, already weighted (any shape with the
    variable's elements), into the buffer at `index` ([[parity]])."""
    with tf.device(self.device):
      return self._buffers.scatter_nd_add(
          index, tf.reshape(grad, [1] + self._dense_shape.as_list()))

  def take(self, parity, divisor):
    """Buffer `parity` divided by `divisor` (M, or the sum of the step's
    weights), and the buffer cleared."""
    with tf.device(self.device):
      if not self.sparse:
        # A gather (ResourceGather) copies this one buffer; reading the whole
        # variable would alias it and make concurrent adds copy both buffers.
        summed = tf.gather(self._buffers, parity)
        m = tf.cast(divisor, summed.dtype)
        with tf.control_dependencies([summed]):
          reset = self._buffers.scatter_nd_update(
              tf.reshape(parity, [1, 1]), tf.zeros_like(summed)[None])
        with tf.control_dependencies([reset]):
          return summed / m
      # Every row an accepted push of this step added to, once: what
      # tf_keras' deduplication of a synchronous global batch's sparse
      # gradient gives (a row whose gradients sum to zero included). All of
      # the step's pushes landed, so the queue holds exactly their rows;
      # the next step of this parity takes tickets only after this apply.
      queue = self._rows_of(parity)
      noted = tf.reshape(queue.dequeue_many(queue.size()), [-1])
      rows, _ = tf.unique(tf.boolean_mask(noted, noted > 0) - 1)
      at = tf.stack([tf.fill(tf.shape(rows), parity), rows], axis=1)
      values = self._buffers.gather_nd(at)
      with tf.control_dependencies([values]):
        reset = self._buffers.scatter_nd_update(at, tf.zeros_like(values))
      with tf.control_dependencies([reset]):
        return tf.IndexedSlices(
            values / tf.cast(divisor, values.dtype), tf.identity(rows),
            dense_shape=tf.constant(self._dense_shape.as_list(), tf.int64))


def _scale(dtype, weight, accepted):
  """A gradient's factor in the buffer: its weight, or 0 if not accepted."""
  return tf.where(accepted, tf.cast(weight, dtype), tf.zeros([], dtype))


class _TaskPush:
  """One push's gradients for the variable shards of one PS task.

  The dense gradients of one dtype cross to the task as one flat tensor,
  concatenated where they were computed: one RecvTensor RPC, one finite
  check and one weighting for all of them, not one each per variable (the
  kernels and biases of a model's dense layers are most of its variables,
  each small). The PS splits the weighted tensor back into each
  variable's buffer. Sparse gradients cross one by one (`_Slot.stage`).

  The first PS task's float32 pack also carries the pushing worker's index
  as its last element (exact below 2**24 workers), which would otherwise
  cross as an RPC of its own; `worker_index` is then read from there.

  Args:
    device: the PS task.
    entries: (slot, local gradient, variable) of the variables there.
    worker_index: int64 scalar to carry, or None.
  """

  def __init__(self, device: str, entries, worker_index=None):
    self.device = device
    self.worker_index = None
    self._single = []
    self._packs = []
    dense = collections.defaultdict(list)
    for slot, grad, _ in entries:
      if slot.sparse or slot.size is None:
        self._single.append((slot, slot.stage(grad)))
      else:
        grad = tf.convert_to_tensor(grad)
        dense[grad.dtype].append((slot, grad))
    for dtype, members in dense.items():
      parts = [tf.reshape(g, [-1]) for _, g in members]
      carries = worker_index is not None and dtype == tf.float32
      if carries:
        parts.append(tf.reshape(tf.cast(worker_index, tf.float32), [1]))
      flat = tf.concat(parts, 0)
      with tf.device(device):
        flat = tf.identity(flat)
        if carries:  # one float32 pack per task: carried once
          self.worker_index = tf.cast(flat[-1], tf.int64)
        self._packs.append((flat, [slot for slot, _ in members]))
    # The tensors on this task once the push's gradients have arrived.
    self.landed = ([flat for flat, _ in self._packs]
                   + [_dense_part(g) for _, g in self._single])

  def finite(self):
    """Whether every gradient of the push for this task is finite."""
    with tf.device(self.device):
      return tf.reduce_all(tf.stack(
          [tf.reduce_all(tf.math.is_finite(t)) for t in self.landed]))

  def add(self, parity, weight, accepted):
    """Adds each gradient into its buffer (`_Slot.add`); returns a tensor
    that is computed once every add has run."""
    with tf.device(self.device):
      added = [slot.add(g, parity, weight, accepted)
               for slot, g in self._single]
      index = tf.reshape(parity, [1, 1])
      for flat, slots in self._packs:
        scaled = tf.math.multiply_no_nan(
            flat, _scale(flat.dtype, weight, accepted))
        sizes = [slot.size for slot in slots]
        # The carried worker index, if any, is the rest.
        parts = tf.split(scaled, sizes + [-1])
        added.extend(slot.add_scaled(part, index)
                     for slot, part in zip(slots, parts))
      with tf.control_dependencies(added):
        return tf.identity(parity)


def _slot_name(var) -> str:
  return "gba_acc/" + var.name.split(":")[0].replace("/", "_") + "_sum"


@dataclasses.dataclass
class OptimizerStep:
  """One optimizer's part of a local step: what it pushes and how it applies.

  Attributes:
    grads_and_vars: the local gradients (None gradients are skipped).
    apply_fn: applies a list of (aggregated gradient, variable) with the
      optimizer at the global step (learning rate, clipping, update,
      constraints), advancing its `iterations` once; returns its update op.
  """

  grads_and_vars: List[Tuple[Any, tf.Variable]]
  apply_fn: Callable[[List[Tuple[Any, tf.Variable]]], Any]


def _oldest_first(ring, count: int):
  """The `count` entries written so far into `ring` (each at index
  `i % len(ring)`), oldest first; the newest `len(ring)` if it wrapped."""
  if count <= len(ring):
    return ring[:count]
  start = count % len(ring)
  return np.concatenate([ring[start:], ring[:start]])


def _time_after(tensor):
  """`tf.timestamp()` once `tensor` is computed (float64 seconds)."""
  with tf.control_dependencies([tensor]):
    return tf.timestamp()


def _per_device_barriers(ops) -> List[tf.Operation]:
  """One no-op per device that waits for `ops` on that device.

  A cross-task control edge costs a message; grouping first sends one per
  task instead of one per op.
  """
  by_device = collections.defaultdict(list)
  for op in tf.nest.flatten(ops):
    if op is None:
      continue
    by_device[op.device].append(op)
  barriers = []
  for device, group in by_device.items():
    with tf.device(device):
      barriers.append(tf.group(*group))
  return barriers


class GradientAggregator:
  """Pushes local gradients; applies the optimizers once per M of them.

  Args:
    extended: the strategy's Extended (for `colocate_vars_with` and to
      record the optimizers' update ops).
    num_aggregate: M.
    policy: the `StalenessPolicy`.
    tokens: the `TokenService`.
    counters: the `GBACounters`.
    device: the first PS task: tickets, scheduling state and counters.
    normalize: "global_batch" divides each step's weighted sum by M;
      "weights" by the sum of its weights (`GBAConfig.normalize`).
  """

  def __init__(self, extended, num_aggregate: int,
               policy: staleness_lib.StalenessPolicy,
               tokens: tokens_lib.TokenService,
               counters: counters_lib.GBACounters, device: str,
               normalize: str = "global_batch"):
    self._extended = extended
    self.num_aggregate = num_aggregate
    self.tokens = tokens
    self.counters = counters
    self._slots: Dict[int, Tuple[_Slot, Any]] = {}
    self._device = device
    self._tables = schedule.Tables.of(policy)
    m = num_aggregate
    with tf.device(device):
      self._schedule = tf.Variable(tf.zeros([4], tf.int64), trainable=False,
                                   name="gba_schedule")
      self._tickets = _Tickets(schedule.OPEN_STEPS * m)
      # exclusive_resource_access=False: the global step guarded here is
      # also read, lock-free, by every worker's token read.
      self._lock = tf.CriticalSection(name="gba_schedule_lock")
      # Completed steps for the applier, and its replies (the last step of
      # each chain it applied) to the claiming pushes (`gba_tf.applier`).
      self._ready = tf.queue.FIFOQueue(_REPLY_CAPACITY, tf.int64,
                                       shapes=[[]], name="gba_ready")
      self._applied = tf.queue.FIFOQueue(_REPLY_CAPACITY, tf.int64,
                                         shapes=[[]], name="gba_applied")
      # Sum of the accepted weights of each open step ("weights" only).
      self._weight_sums = (
          tf.Variable(tf.zeros([schedule.OPEN_STEPS], tf.float32),
                      trainable=False, name="gba_weight_sums")
          if normalize == "weights" else None)
    self._hold_micros = None
    self._trace = None
    # Recovery from pushes that die half-way (`gba_tf.stall`): seconds
    # without progress before the chief acts (None: never), and between its
    # reads of the schedule.
    self.stall_seconds = stall_lib.DEFAULT_STALL_SECONDS
    self.poll_seconds = stall_lib.DEFAULT_POLL_SECONDS
    self._watchdog = None
    self._apply_parts = None
    self._applier = None
    # Tickets of the first two global steps (no device scope: an eager
    # queue op runs where the queue lives).
    self._tickets.enqueue_many(
        tf.range(*schedule.initial_tickets(m), dtype=tf.int64))

  def _slot(self, var, grad) -> _Slot:
    key = id(var)
    entry = self._slots.get(key)
    if entry is None:
      # Buffers are created on the coordinator the first time a step
      # function is traced, lifted out of the trace like optimizer slots.
      with tf.init_scope(), self._extended.colocate_vars_with(var):
        slot = _Slot(var, isinstance(grad, tf.IndexedSlices))
      # Keep `var` alive with its slot: a key of a dead variable's id could
      # otherwise be reused by a new variable and find the wrong slot.
      entry = self._slots[key] = (slot, var)
    return entry[0]

  def enable_hold_profile(self) -> None:
    """Records how long each critical section is held (for benchmarks).

    Call before the first step is traced; `hold_profile()` reads the
    samples. Each sample costs two timestamps and one scatter on the first
    PS task.
    """
    with tf.device(self._device):
      self._hold_micros = tf.Variable(
          tf.zeros([_HOLD_PROFILE_SIZE], tf.float64), trainable=False,
          name="gba_hold_micros")
      self._hold_count = tf.Variable(tf.constant(0, tf.int64),
                                     trainable=False, name="gba_hold_count")

  def enable_push_trace(self) -> None:
    """Records every push's landmarks (`gba_tf.push_trace`; calibration).

    Call before the first step is traced; `push_trace()` reads the rows.
    Each push then costs four more timestamps and one scatter on the first
    PS task.
    """
    self.tokens.time_before_read = True
    with tf.device(self._device):
      self._trace = tf.Variable(
          tf.zeros([_TRACE_SIZE, len(push_trace_lib.COLUMNS)], tf.float64),
          trainable=False, name="gba_push_trace")
      self._trace_count = tf.Variable(tf.constant(0, tf.int64),
                                      trainable=False,
                                      name="gba_push_trace_count")

  def push_trace(self):
    """The traced pushes' rows (`gba_tf.push_trace.COLUMNS`), oldest first;
    None if tracing is off."""
    if self._trace is None:
      return None
    return _oldest_first(self._trace.numpy(), int(self._trace_count.numpy()))

  def hold_profile(self):
    """Microseconds each critical section was held, oldest first."""
    return _oldest_first(self._hold_micros.numpy(),
                         int(self._hold_count.numpy()))

  def _timed(self, body):
    """Runs `body` (inside a critical section), timing it if profiling."""
    if self._hold_micros is None:
      return body()
    start = tf.timestamp()
    with tf.control_dependencies([start]):
      outputs = body()
    with tf.control_dependencies(outputs):
      micros = (tf.timestamp() - start) * 1e6
      index = self._hold_count.assign_add(1, read_value=True) - 1
      record = self._hold_micros.scatter_nd_update(
          tf.reshape(index % _HOLD_PROFILE_SIZE, [1, 1]),
          tf.reshape(micros, [1]))
    with tf.control_dependencies([record]):
      return tuple(tf.identity(o) for o in outputs)

  @property
  def buffer_bytes(self) -> int:
    """Bytes of every accumulation buffer, summed over the PS.

    Two buffers per variable that has had a gradient, shaped like it: twice
    the bytes of those variables, fixed once each has been pushed once.
    """
    return sum(slot.nbytes for slot, _ in self._slots.values())

  def push(self, steps: Sequence[OptimizerStep], token, read_time,
           worker_index):
    """Builds one local step's push, and the apply when it completes a step.

    Call in cross-replica context (inside `merge_call`).

    Args:
      steps: every optimizer's gradients of this local step (one push for
        all of them: they join the same global step).
      token: int64 token read before the forward pass.
      read_time: float64 seconds at which the token was read.
      worker_index: int64 index of the pushing worker.

    Returns:
      A bool tensor: whether this push completed a global step (and waited
      for the applier to apply it).
    """
    m = self.num_aggregate
    staged = []
    for step in steps:
      staged.append([(self._slot(v, g), g, v) for g, v in step.grads_and_vars
                     if g is not None])
    # The shard tasks the push touches: the transfer, the finite check and
    # the add each run per task.
    by_task = {}
    for device, entries in _group_by_device(
        [entry for part in staged for entry in part]).items():
      task = by_task[device] = _TaskPush(
          device, entries, worker_index if device == self._device else None)
      if task.worker_index is not None:
        worker_index = task.worker_index
    tensors = [t for task in by_task.values() for t in task.landed]
    # A NaN or Inf from one worker (bad data, an overflow) would poison every
    # later global step: checked next to each shard, before any ticket. Every
    # tensor crossing tasks costs a RecvTensor RPC, so each shard task sends
    # the first PS task one flag for all of its gradients.
    checks = [task.finite() for task in by_task.values()]

    with tf.device(self._device):
      # After the read time (same task): never a negative compute time.
      with tf.control_dependencies(tensors + [read_time]):
        arrive_time = tf.timestamp()
      compute_seconds = arrive_time - read_time
      finite = (tf.reduce_all(tf.stack(checks)) if checks
                else tf.constant(True))
      # Traced, each timestamp is waited for by what follows it: TF runs a
      # cheap op whenever its thread gets to it, and a timestamp that
      # nothing waits for was seen to run only after the push had landed.
      traced = self._trace is not None
      # No tf.cond here or below: a branch's nodes are processed on every
      # push, taken or not, with one Switch per tensor it takes. A queue op
      # of 0 elements instead is a no-op that returns at once: a rejected
      # push dequeues no ticket (and gets -1).
      with tf.control_dependencies([arrive_time] if traced else []):
        ticket = _dequeue_if(self._tickets, finite, -1)
      ticket_time = _time_after(ticket) if traced else None
      # A rejected push has no ticket; its tau (for the histogram) is
      # measured against the global step.
      with tf.control_dependencies([ticket_time] if traced else []):
        step_index = tf.where(finite, schedule.step_of(ticket, m),
                              self.tokens.global_step.read_value())
      tau = schedule.staleness(step_index, token, _TF_OPS)
      weight = self._tables.weight(tau, _TF_OPS)
      accepted = tf.logical_and(finite, self._tables.accepts(tau, _TF_OPS))

      # A dropped push puts its ticket back (an empty enqueue otherwise).
      returned = _enqueue_if(self._tickets, ticket,
                             tf.logical_and(finite, tf.logical_not(accepted)))
      counted = self.counters.record_push(
          tau, token, worker_index, accepted, weight < 1.0, compute_seconds,
          finite)
      parity = schedule.parity(step_index)
      if self._weight_sums is not None:
        # Added before the push lands, so the apply reads the whole sum.
        counted.append(self._weight_sums.scatter_nd_add(
            tf.reshape(parity, [1, 1]),
            tf.reshape(tf.where(accepted, tf.cast(weight, tf.float32), 0.0),
                       [1])))

      # What each shard needs of the decision, packed into one tensor so that
      # it crosses to each shard task in one RPC, not three.
      decision = tf.stack([tf.cast(parity, tf.float32),
                           tf.cast(weight, tf.float32),
                           tf.cast(accepted, tf.float32)])

    adds = []
    for device, task in by_task.items():
      with tf.device(device):
        if device == self._device:
          local_parity, local_weight, local_accepted = parity, weight, accepted
        else:
          local = tf.identity(decision)
          local_parity = tf.cast(local[0], tf.int64)
          local_weight, local_accepted = local[1], local[2] > 0
        adds.append(task.add(local_parity, local_weight, local_accepted))

    with tf.control_dependencies(_per_device_barriers(adds) + counted
                                 + [returned]):
      with tf.device(self._device):
        claim, next_step = self._lock.execute(
            lambda: self._timed(
                lambda: self._land(parity, tf.cast(accepted, tf.int64))),
            exclusive_resource_access=False)

    # What the applier (and a dead push's claimed apply, for the stall
    # watchdog) needs: the slots and optimizers, not this trace's gradients.
    self._apply_parts = (
        [[(slot, None, var) for slot, _, var in part] for part in staged],
        [OptimizerStep([], step.apply_fn) for step in steps])
    self._start_applier()
    self._start_watchdog()

    with tf.device(self._device):
      # The applier applies the step (and any that complete meanwhile); its
      # reply (the last step of its chain) says it is done. Not an apply in
      # this graph: see `gba_tf.applier` for why. Only the claiming push
      # sends and waits (`_await_reply`); the others' queue ops take 0
      # elements.
      landed_time = _time_after(claim) if traced else None
      with tf.control_dependencies([landed_time] if traced else []):
        announced = _enqueue_if(self._ready, next_step, claim)
      with tf.control_dependencies([announced]):
        completed = _await_reply(self._applied, claim, next_step)
      if not traced:
        return completed
      return self._record_trace(
          completed, worker_index, token, step_index,
          [read_time, arrive_time, ticket_time, landed_time], claim)

  def _record_trace(self, completed, worker_index, token, step, times,
                    claim):
    """Appends this push's row (`gba_tf.push_trace.COLUMNS`) to the ring."""
    row = tf.stack([tf.cast(x, tf.float64)
                    for x in (worker_index, token, step)] + times
                   + [_time_after(completed),
                      tf.cast(claim, tf.float64)])
    index = self._trace_count.assign_add(1, read_value=True) - 1
    record = self._trace.scatter_nd_update(
        tf.reshape(index % _TRACE_SIZE, [1, 1]), tf.reshape(row, [1, -1]))
    with tf.control_dependencies([record]):
      return tf.identity(completed)

  def _apply_chain(self, staged, steps, claim, step):
    """Applies `step` if `claim`, then each following step that completed.

    The loop runs on the first PS task; each iteration applies one global
    step on every shard and finishes it in the scalar critical section
    (the stall watchdog's recovery of a claimed step whose claimer died).
    Returns the last step applied (`step - 1` if none).
    """
    with tf.device(self._device):
      _, following = tf.while_loop(
          lambda c, unused_step: c,
          lambda unused_claim, step: self._apply_step(staged, steps, step),
          (claim, step), parallel_iterations=1)
      return following - 1

  def _serve_function(self):
    """The applier's loop (`gba_tf.applier`): applies each step the pushes
    announce, replies, and ends on `applier.STOP`.

    One loop, one step per iteration: a step that completed while its
    predecessor was applied is the next iteration's (no reply until the
    chain ends), and otherwise the iteration waits for the next announced
    step. The loop is entered once per call, so the tensors and variables
    it takes cross into it once (a loop nested in it, one per chain,
    entered them again for every applied step).
    """
    staged, steps = self._apply_parts

    @tf.function
    def serve(limit):
      with tf.device(self._device):
        # `limit` 0 only registers the function: it waits for no step.
        first = _dequeue_if(self._ready, tf.not_equal(limit, 0),
                            applier_lib.STOP)

        def apply_one(step):
          more, following = self._apply_step(staged, steps, step)
          # The chain ends here: reply, and wait for the next claim (or
          # STOP). Otherwise `following` is applied next, unannounced.
          ends = tf.logical_not(more)
          replied = _enqueue_if(self._applied, step, ends)
          with tf.control_dependencies([replied]):
            return _dequeue_if(self._ready, ends, following)

        tf.while_loop(lambda step: step >= 0, apply_one, [first],
                      parallel_iterations=1)

    return serve

  def _apply_step(self, staged, steps, step):
    """Applies `step` on every shard and finishes it; returns whether the
    following step is complete (and claimed for this chain), and it."""
    m = self.num_aggregate
    applied = self._apply(staged, steps, step)
    with tf.control_dependencies(_per_device_barriers(applied)):
      with tf.device(self._device):
        more, following = self._lock.execute(
            lambda: self._timed(lambda: self._finish(step)),
            exclusive_resource_access=False)
        # The tickets of step + 2 only once `step` is finished: they share
        # its buffer parity, and the finish clears that parity's landing
        # count. Issued earlier, a landing on one of them could be counted
        # and then cleared (seen with 8 workers on 2 cores: the step stayed
        # one landing short until the stall watchdog re-issued a ticket,
        # and the lost push's gradient went into it as well).
        with tf.control_dependencies([more, following]):
          refill = self._tickets.enqueue_many(
              tf.range(*schedule.refill(step, m)))
    with tf.control_dependencies([refill]):
      return tf.identity(more), tf.identity(following)

  def _reply(self, last):
    with tf.control_dependencies([self._applied.enqueue(last)]):
      return tf.constant(True)

  def _start_applier(self) -> None:
    if self._applier is not None:
      return
    strategy = self._extended._container_strategy()  # pylint: disable=protected-access
    self._applier = applier_lib.Applier(
        self._serve_function(), strategy.scope,
        lambda: self._ready.enqueue(tf.constant(applier_lib.STOP, tf.int64)))
    self._applier.start()

  def stop_applier(self) -> None:
    """Ends the applier's loop (it also ends at exit)."""
    if self._applier is not None:
      self._applier.stop()

  def _start_watchdog(self) -> None:
    if self._watchdog is None and self.stall_seconds is not None:
      self._watchdog = stall_lib.StallWatchdog(
          self, self.stall_seconds, self.poll_seconds)
      self._watchdog.start()

  def stop_watchdog(self) -> None:
    """Ends the stall watchdog thread (it also ends with the aggregator)."""
    if self._watchdog is not None:
      self._watchdog.stop()

  def stop_threads(self) -> None:
    """Ends both threads bound to this aggregator's cluster: the stall
    watchdog and the applier (before the cluster goes away)."""
    self.stop_watchdog()
    self.stop_applier()

  def progress(self) -> Tuple[Tuple[int, int], int, int, int]:
    """(landed per parity, next step to apply, apply claimed, tickets left).

    Two eager reads on the first PS task, from the coordinator. Eager ops,
    not a `tf.function`: registering a function with a remote context from
    the watchdog's thread can deadlock against the coordinator's own calls.
    """
    values = [int(v) for v in self._schedule.numpy()]
    size = int(self._tickets.size().numpy())
    return (tuple(values[:schedule.OPEN_STEPS]), values[_NEXT], values[_BUSY],
            size)

  def recover(self, action: stall_lib.StallAction, observed) -> bool:
    """Carries out a `StallAction` if the state is still `observed`.

    Returns whether it acted. Called by the stall watchdog on the
    coordinator, never while the pushes it replaces could still run.
    """
    if self.progress() != observed:
      return False
    m = self.num_aggregate
    if action.finish_apply:
      if self._apply_parts is None:
        raise RuntimeError("no push has been traced; nothing to apply")
      staged, steps = self._apply_parts

      @tf.function
      def finish(step):
        last = self._apply_chain(staged, steps, tf.constant(True), step)
        # The claimer may still wait for its reply.
        return self._reply(last)

      with self._extended._container_strategy().scope():  # pylint: disable=protected-access
        finish(tf.constant(observed[1], tf.int64))
    tickets = [step * m + i for step, n in action.reissue for i in range(n)]
    if tickets:
      self._tickets.enqueue_many(tf.constant(tickets, tf.int64))
    return True

  def _land(self, parity, landed):
    """Counts a landing; claims the next step if it is complete and free."""
    state = self._schedule.read_value()
    counts = state[:schedule.OPEN_STEPS] + landed * tf.one_hot(
        parity, schedule.OPEN_STEPS, dtype=tf.int64)
    next_step, busy = state[_NEXT], state[_BUSY]
    ready = schedule.complete(
        tf.gather(counts, schedule.parity(next_step)), self.num_aggregate)
    claim = tf.logical_and(ready, tf.equal(busy, 0))
    new_state = tf.concat(
        [counts, tf.stack([next_step, busy + tf.cast(claim, tf.int64)])], 0)
    with tf.control_dependencies([self._schedule.assign(new_state)]):
      return tf.identity(claim), tf.identity(next_step)

  def _finish(self, step):
    """Marks `step` applied; claims the following one if it is complete."""
    state = self._schedule.read_value()
    cleared = tf.one_hot(schedule.parity(step), schedule.OPEN_STEPS,
                         on_value=0, off_value=1, dtype=tf.int64)
    counts = state[:schedule.OPEN_STEPS] * cleared
    following = step + 1
    more = schedule.complete(
        tf.gather(counts, schedule.parity(following)), self.num_aggregate)
    new_state = tf.concat(
        [counts, tf.stack([following, tf.cast(more, tf.int64)])], 0)
    with tf.control_dependencies([
        self._schedule.assign(new_state),
        self.tokens.global_step.assign(following)]):
      return tf.identity(more), tf.identity(following)

  def _apply(self, staged, steps: Sequence[OptimizerStep], step) -> List[Any]:
    """Applies global step `step` with every optimizer; returns its ops."""
    parity = schedule.parity(step)
    ops = []
    divisor = self.num_aggregate
    if self._weight_sums is not None:
      with tf.device(self._device):
        total = tf.gather(self._weight_sums, parity)
        # Cleared before this step finishes, so before the tickets of step
        # `step + 2` (the next user of this parity) exist.
        with tf.control_dependencies([total]):
          reset = self._weight_sums.scatter_nd_update(
              tf.reshape(parity, [1, 1]), tf.zeros([1]))
        # A tensor after the reset: the variable that scatter_nd_update
        # returns is not an op `_per_device_barriers` can wait for.
        with tf.control_dependencies([reset]):
          ops.append(tf.identity(total))
        # Accepted gradients have weights > 0; 1 only guards a division.
        divisor = tf.where(total > 0, total, 1.0)
    for part, opt_step in zip(staged, steps):
      if not part:
        continue
      aggregated = [(slot.take(parity, divisor), var)
                    for slot, _, var in part]
      with self._extended.record_updates() as updates:
        result = opt_step.apply_fn(aggregated)
      ops.extend(updates)
      ops.append(result)
      # New tf_keras optimizers return no update op (`_update_step` returns
      # None); a one-row read of each variable, ordered after its update by
      # tf.function's automatic control dependencies, stands in for it.
      ops.extend(_after_update(var) for _, _, var in part)
    return [op for op in tf.nest.flatten(ops)
            if isinstance(op, (tf.Tensor, tf.Operation))]


def stop_all_threads() -> None:
  """Stops every aggregator's stall watchdog and applier: a thread polling
  or waiting on a cluster must not outlive it (a test leaving its cluster,
  a local cluster stopping). Both also stop at exit."""
  stall_lib.stop_all()
  applier_lib.stop_all()


def _after_update(var):
  """A tiny read of `var` that runs after every earlier update of it."""
  with tf.device(var.device):
    if var.shape.rank == 0:
      return var.read_value()
    return var.sparse_read([0])


class _Tickets:
  """The ticket queue on the first PS task: smallest ticket first.

  A `PriorityQueue` keyed by the ticket, not a FIFO, so that a ticket put
  back by a dropped push (or re-issued by the stall watchdog) is the next
  one handed out, ahead of the later step's tickets already queued. Behind
  them, as in a FIFO, it left its step open while the next pushes, computed
  on the current parameters, drew the later step's tickets: one step staler
  than they were, so decayed, or dropped by a preset that drops tau > 0
  (which put back their tickets in turn). With 4 workers and a 1/4-speed
  straggler, the `backup_workers` preset dropped 56-62% of its pushes.

  Without drops or re-issues the order is the FIFO's: tickets are queued in
  increasing order. TF's PriorityQueue needs a value besides the priority
  (the ticket again); this class hides it, so that the queue reads like a
  one-component FIFO (`_enqueue_if` and `_dequeue_if` take it as one).

  Args:
    capacity: tickets the queue holds (those of the open steps).
  """

  def __init__(self, capacity: int):
    self._queue = tf.queue.PriorityQueue(capacity, [tf.int64], shapes=[[]],
                                         name="gba_tickets")

  def enqueue_many(self, tickets):
    """Enqueues an int64 vector of tickets."""
    return self._queue.enqueue_many([tickets, tickets])

  def dequeue_many(self, n):
    """The `n` smallest tickets (waiting while fewer are left)."""
    return self._queue.dequeue_many(n)[0]

  def size(self):
    return self._queue.size()


def _enqueue_if(queue, value, keep):
  """Enqueues the scalar `value` if `keep`: an enqueue of 1 or 0 elements,
  not a branch (see `GradientAggregator.push`)."""
  return queue.enqueue_many(tf.reshape(value, [1])[:tf.cast(keep, tf.int32)])


def _dequeue_if(queue, take, otherwise):
  """A scalar dequeued from `queue` if `take`, else `otherwise`: a dequeue
  of 1 or 0 elements (0 returns at once), not a branch."""
  taken = queue.dequeue_many(tf.cast(take, tf.int32))
  return tf.concat([taken, tf.reshape(tf.cast(otherwise, taken.dtype), [1])],
                   0)[0]


def _await_reply(replies, claim, step):
  """Whether `step` is applied: if `claim`, waits for the applier's reply.

  A reply is the last step of a chain the applier applied. Replies older
  than `step` are dropped (a claimer that died waiting left them), and the
  reply that answers is put back before returning, for any other claimer
  it answers too. Taken for good, it could leave a claimer waiting forever:
  claims are announced in order, but a claimer may reach its dequeue after
  the next one has claimed; the later claimer then dropped the earlier
  one's reply as old, its own reply answered the earlier claimer, and it
  waited for a reply no chain would send (seen as a job hung at its last
  step with M = 1). Put back, a reply stays until a later claimer drops
  it: no claim can be answered by a reply older than it, since claims are
  for steps not yet applied. Without `claim` the queue ops take and put
  back 0 elements.
  """
  got = replies.dequeue_many(tf.cast(claim, tf.int32))
  got, = tf.while_loop(
      lambda r: tf.reduce_any(r < step),
      lambda unused_r: [replies.dequeue_many(1)], [got],
      shape_invariants=[tf.TensorShape([None])], parallel_iterations=1)
  with tf.control_dependencies([replies.enqueue_many(got)]):
    return tf.reduce_any(got >= step)


def _dense_part(grad):
  """The values of a gradient: `IndexedSlices.values`, or the tensor."""
  return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def _group_by_device(entries) -> Dict[str, list]:
  by_device = collections.defaultdict(list)
  for entry in entries:
    by_device[entry[0].device].append(entry)
  return by_device
