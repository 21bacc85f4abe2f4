"""A discrete-event simulator of sync, async and GBA training at any scale.

It replays what the runtime does, push by push, with time costs in place of
the work, so that throughput, staleness and drops can be predicted for
thousands of workers on one core. The rules that decide a gradient's fate
are not copied: a push's ticket, global step, staleness, weight and
acceptance, the ticket window and the apply trigger come from
`gba_tf.schedule` and `gba_tf.staleness` (via each mode's `GBAConfig`
preset), the functions `gba_tf.accumulator` evaluates in TensorFlow.

One local step of a PS mode, as the runtime runs it:

1. the coordinator dispatches the worker's next step (`overhead_s`: the
   closure's round trip, Keras' bookkeeping); the worker reads its token
   (the global step) and, at the same time, takes its next input batch
   (optional: an input pipeline one batch ahead, `input_s` per batch, the
   way the local benchmark emulates compute): a worker that waits for its
   batch computes on the token it read before the wait, as TF runs the two
   reads concurrently. It computes for `ComputeModel.sample()` seconds;
2. its push travels `rpc_s` to the parameter servers;
3. `gba`: it takes the smallest ticket left (it waits while both open
   steps' tickets are out; a dropped push's ticket goes back), adds its
   weighted gradient on every shard (`add_s / num_ps` of each shard's
   time, the shards in parallel; then `land_s` of latency) and lands in
   the scalar section on the first PS (`serial_s`); the landing that
   completes a step, once the step before is applied, applies it on every
   shard (`apply_s / num_ps` each) and finishes it in the scalar section
   (`serial_s`), chaining steps that completed meanwhile.
   `gba_lock`: the design before the per-shard push: the whole push (scalar
   bookkeeping, every add, and the apply of a completed step) holds one
   lock on the first PS.
   `async` (plain ParameterServerStrategy): every push applies at once on
   every shard (`async_apply_s / num_ps` each), no scalar section.
4. the reply travels `rpc_s` back; the worker starts its next step.

Training loops (`loop_steps`, optional): Keras' `fit` schedules an epoch's
steps and joins them all before the next epoch, so every `loop_steps`
local steps the workers that finish find no step to run; once the loop's
last push has ended and `loop_pause_s` has passed (the chief's epoch-end
work), all of them start the next loop together, in phase.

`sync` (MultiWorkerMirroredStrategy) runs in lock step: each step lasts the
slowest worker's `overhead_s + compute` plus `allreduce_s`.

Each shard's adds, each shard's applies and the scalar section serve one
thing at a time, first come first served: a parameter server's CPU is the
resource that saturates. A shard's adds do not queue behind its apply: the
applier applies a completed step's buffer while the next step's adds go
into the other buffer, and TF runs the two at once.

`SimResult.trace` has the landmarks of every push in the columns the
runtime's push trace records (`gba_tf.push_trace`), so that a simulated
run and a traced real one are read, and compared, alike.

Example:

>>> cluster = ClusterModel(num_workers=2, compute=timing.ComputeModel(0.1))
>>> result = simulate("sync", cluster, local_steps=200)
>>> round(result.local_steps_per_s, 3)   # 2 workers / 0.1 s
20.0
>>> gba = simulate("gba", cluster, local_steps=200)
>>> # M = 2. The workers push in phase, both from the token of the step
>>> # they join: no push is stale.
>>> gba.num_aggregate, int(gba.tau.max())
(2, 0)
"""

import collections
import dataclasses
import heapq
import math
from typing import Dict, Optional

import numpy as np

from gba_tf import config as config_lib
from gba_tf import push_trace
from gba_tf import schedule
from gba_tf.sim import timing

MODES = ("sync", "async", "gba", "gba_lock", "backup_workers",
         "bounded_staleness", "sync_ps")
# Costs that `ClusterModel.jitter` can make vary from push to push.
JITTERED = ("overhead", "land", "apply")
# PS modes and the GBAConfig preset that gives their rules.
_PRESET = {"gba": "gba", "gba_lock": "gba", "backup_workers": "backup_workers",
           "bounded_staleness": "bounded_staleness", "sync_ps": "sync_ps"}
# Simulated time before this fraction of the pushes is left out of the
# throughput (start-up: every worker starts at t = 0, in phase).
_WARMUP_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class ClusterModel:
  """A cluster and its time costs, in seconds.

  The defaults are calibrated on this project's local cluster (2 CPU cores,
  DCN-v2 of the benchmark, 4 workers + 2 PS); `gba_tf.sim.calibration`
  fits them from measured runs and says how.

  Attributes:
    num_workers: N.
    compute: the workers' compute time model.
    num_ps: parameter-server shards; gradient-sized work splits over them.
    local_batch_size: samples per local step.
    global_batch_size: the synchronous global batch; default N x local.
    overhead_s: per local step, before the token read: the coordinator's
      dispatch of the step (the part of a step that neither the compute
      nor the push accounts for).
    input_s: seconds per batch of an input pipeline that runs one batch
      ahead of training (0: input is free). The local benchmark emulates
      compute this way (`--step_ms`, a sleep in the pipeline).
    input_slowdown: worker index -> factor on its `input_s` (the local
      benchmark's `--straggler` slows the emulated step only).
    rpc_s: one-way latency of a push to the PS and of its reply.
    push_s: from a gradient's computation to its ticket, past `rpc_s`:
      staging the gradient on every shard and its finite check, and the
      parameter-server CPU they wait for.
    land_s: from a push's ticket to its landing, a latency beside `add_s`:
      the adds' round trips to the shard tasks and the wait for the scalar
      section under load (a traced run measures it whole).
    jitter: lognormal shapes of the costs that vary from push to push:
      "overhead" (of `overhead_s`), "land" (of `land_s`) and "apply" (of
      `apply_s`), each a factor with mean 1 (a traced run measures their
      spread); absent or 0: constant.
    serial_s: one visit to the scalar section on the first PS.
    add_s: adding one local gradient into the buffers, summed over shards.
    apply_s: one optimizer apply of a global step, summed over shards.
    async_apply_s: plain async's apply of one local gradient, summed.
    allreduce_s: sync's all-reduce per step.
    max_staleness: the bounded-staleness preset's limit.
    backup_workers: the backup-workers preset's spare workers.
    loop_steps: PS modes: local steps per training loop (a `fit` epoch),
      joined before the next starts; 0: one endless loop.
    loop_pause_s: from a loop's last push end to the next loop's starts.
  """
  num_workers: int
  compute: timing.ComputeModel
  num_ps: int = 2
  local_batch_size: int = 256
  global_batch_size: Optional[int] = None
  overhead_s: float = 0.0
  input_s: float = 0.0
  input_slowdown: Dict[int, float] = dataclasses.field(default_factory=dict)
  rpc_s: float = 0.0
  push_s: float = 0.0
  land_s: float = 0.0
  jitter: Dict[str, float] = dataclasses.field(default_factory=dict)
  serial_s: float = 0.0
  add_s: float = 0.0
  apply_s: float = 0.0
  async_apply_s: float = 0.0
  allreduce_s: float = 0.0
  max_staleness: int = 4
  backup_workers: int = 1
  loop_steps: int = 0
  loop_pause_s: float = 0.0

  def __post_init__(self):
    if isinstance(self.num_workers, bool) or not isinstance(
        self.num_workers, int) or self.num_workers < 1:
      raise ValueError(f"Received: num_workers={self.num_workers!r}, which "
                       "must be an integer >= 1.")
    if not isinstance(self.num_ps, int) or self.num_ps < 1:
      raise ValueError(f"Received: num_ps={self.num_ps!r}, which must be an "
                       "integer >= 1.")
    if isinstance(self.loop_steps, bool) or not isinstance(
        self.loop_steps, int) or self.loop_steps < 0:
      raise ValueError(f"Received: loop_steps={self.loop_steps!r}, which "
                       "must be an integer >= 0.")
    for name in ("overhead_s", "input_s", "rpc_s", "push_s", "land_s",
                 "serial_s", "add_s", "apply_s", "async_apply_s",
                 "allreduce_s", "loop_pause_s"):
      value = getattr(self, name)
      if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Received: {name}={value!r}, which must be a "
                         "finite number >= 0.")
    for name, sigma in self.jitter.items():
      if name not in JITTERED or not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"Received: jitter={self.jitter!r}; keys must be "
                         f"of {JITTERED} and shapes finite numbers >= 0.")

  def input_time(self, worker: int) -> float:
    """Seconds the input pipeline takes for one of `worker`'s batches."""
    return self.input_s * self.input_slowdown.get(worker, 1.0)

  @property
  def sync_global_batch(self) -> int:
    return self.global_batch_size or self.num_workers * self.local_batch_size

  def gba_config(self, mode: str) -> config_lib.GBAConfig:
    """The `GBAConfig` whose rules a PS mode follows (async: M = 1)."""
    name = "async" if mode == "async" else _PRESET[mode]
    return config_lib.GBAConfig.preset(
        name, local_batch_size=self.local_batch_size,
        global_batch_size=self.sync_global_batch,
        num_workers=self.num_workers, backup_workers=self.backup_workers,
        max_staleness=self.max_staleness)


@dataclasses.dataclass
class SimResult:
  """What one simulated run measured.

  Per-push arrays are in the order pushes were decided (ticket order for
  the ticket modes; apply order for async). `token` is the global step the
  push's worker read, `step` the global step it joined (async: the model
  version it was applied to), `tau` its staleness, `weight` its weight
  (0 when dropped).
  """
  mode: str
  num_workers: int
  num_aggregate: int
  local_batch_size: int
  seconds: float
  local_steps: int
  steady_local_steps_per_s: float
  ideal_local_steps_per_s: float
  worker: np.ndarray
  token: np.ndarray
  step: np.ndarray
  tau: np.ndarray
  weight: np.ndarray
  accepted: np.ndarray
  time: np.ndarray
  global_steps: int
  serial_busy_s: float = 0.0
  # PS modes: one row per finished push in `gba_tf.push_trace.COLUMNS`, the
  # landmarks the runtime's `--trace_pushes` records (async: ticket and
  # landing at its apply), so that `push_trace.phases` reads both alike.
  trace: Optional[np.ndarray] = None

  @property
  def local_steps_per_s(self) -> float:
    return self.steady_local_steps_per_s

  @property
  def samples_per_s(self) -> float:
    return self.steady_local_steps_per_s * self.local_batch_size

  @property
  def vs_ideal(self) -> float:
    """Throughput over a perfectly asynchronous system's."""
    return self.steady_local_steps_per_s / self.ideal_local_steps_per_s

  def staleness_histogram(self, size: int = 33) -> np.ndarray:
    """Counts of tau = 0 .. size - 2; the last bin holds larger taus, as
    `GBACounters`' histogram does."""
    return np.bincount(np.minimum(self.tau, size - 1), minlength=size)

  def summary(self) -> Dict[str, float]:
    tau = self.tau
    accepted = self.accepted
    n = max(len(tau), 1)
    return {
        "mode": self.mode, "num_workers": self.num_workers,
        "num_aggregate": self.num_aggregate,
        "local_steps_per_s": float(self.steady_local_steps_per_s),
        "samples_per_s": float(self.samples_per_s),
        "ideal_local_steps_per_s": float(self.ideal_local_steps_per_s),
        "vs_ideal": float(self.vs_ideal),
        "staleness_p50": float(np.percentile(tau, 50)) if len(tau) else 0.0,
        "staleness_p99": float(np.percentile(tau, 99)) if len(tau) else 0.0,
        "staleness_max": int(tau.max()) if len(tau) else 0,
        "dropped_fraction": float(np.sum(~accepted)) / n,
        "decayed_fraction": float(np.sum(accepted & (self.weight < 1.0))) / n,
        "serial_utilization": (float(self.serial_busy_s / self.seconds)
                               if self.seconds else 0.0),
    }


def simulate(mode: str, cluster: ClusterModel, local_steps: int,
             seed: int = 0) -> SimResult:
  """Simulates `local_steps` local steps (pushes) of `mode` on `cluster`."""
  if mode not in MODES:
    raise ValueError(f"Received: mode={mode!r}, which is not one of "
                     f"{MODES}.")
  if isinstance(local_steps, bool) or not isinstance(
      local_steps, int) or local_steps < 1:
    raise ValueError(f"Received: local_steps={local_steps!r}, which must be "
                     "an integer >= 1.")
  if mode == "sync":
    return _simulate_sync(cluster, local_steps, seed)
  return _PSSimulation(mode, cluster, local_steps, seed).run()


def _simulate_sync(cluster: ClusterModel, local_steps: int,
                   seed: int) -> SimResult:
  n = cluster.num_workers
  clocks = cluster.compute.clocks(n, seed)
  steps = max(1, math.ceil(local_steps / n))
  t, ends, computed = 0.0, [], np.zeros(n)
  inputs = np.array([cluster.input_time(w) for w in range(n)])
  ready = inputs.copy()  # when each worker's next batch is ready
  for _ in range(steps):
    times = np.array([c.sample(t) for c in clocks])
    computed += times
    taken = np.maximum(t + cluster.overhead_s, ready)
    ready = taken + inputs
    t = float(np.max(taken + times)) + cluster.allreduce_s
    ends.append(t)
  ends = np.repeat(ends, n)
  zeros = np.zeros(steps * n, np.int64)
  token = np.repeat(np.arange(steps), n)
  # A sync step averages the N workers' gradients: M = N.
  return _result("sync", cluster, n, ends, computed, steps * n,
                 worker=np.tile(np.arange(n), steps), token=token,
                 step=token, tau=zeros, weight=np.ones(steps * n),
                 accepted=np.ones(steps * n, bool), global_steps=steps)


def _result(mode, cluster, m, ends, computed, pushes, global_steps,
            serial_busy=0.0, trace=None, **arrays) -> SimResult:
  ends = np.asarray(ends, np.float64)
  order = np.sort(ends)
  start = order[min(int(len(order) * _WARMUP_FRACTION), len(order) - 1)]
  steady = order[order > start]
  span = order[-1] - start
  rate = float(len(steady) / span if span > 0 else len(order) / order[-1])
  # Ideal: every worker computing back to back (or its input pipeline
  # delivering back to back, if that is slower), never waiting for the
  # parameter servers or its peers.
  steps_each = np.bincount(arrays["worker"], minlength=cluster.num_workers)
  per_step = computed / np.maximum(steps_each, 1) + cluster.overhead_s
  inputs = np.array([cluster.input_time(w)
                     for w in range(cluster.num_workers)])
  ideal = float(np.sum(1.0 / np.maximum(per_step, inputs)))
  return SimResult(mode=mode, num_workers=cluster.num_workers,
                   num_aggregate=m, local_batch_size=cluster.local_batch_size,
                   seconds=float(order[-1]), local_steps=pushes,
                   steady_local_steps_per_s=rate,
                   ideal_local_steps_per_s=ideal, global_steps=global_steps,
                   serial_busy_s=serial_busy, trace=trace,
                   **{k: np.asarray(v) for k, v in arrays.items()},
                   time=ends)


# Event kinds, in the order ties are broken at equal times: the parameter
# servers' work before a worker's next token read (a reply and a read take
# time in reality; with zero costs a read sees every push of its instant).
_ARRIVE, _LAND, _LANDED, _APPLIED, _FINISHED, _START, _TOKEN = range(7)


class _PSSimulation:
  """One run of a PS mode; see the module docstring for the model."""

  def __init__(self, mode, cluster: ClusterModel, local_steps: int, seed):
    self.mode = mode
    self.c = cluster
    self.total = local_steps
    config = cluster.gba_config(mode)
    self.m = config.num_aggregate
    self.tables = schedule.Tables.of(config.policy)
    self.clocks = cluster.compute.clocks(cluster.num_workers, seed)
    # The jittered costs' own stream: the compute draws stay as they are.
    self.jitter_rng = np.random.default_rng([seed, cluster.num_workers, 1])
    self.computed = np.zeros(cluster.num_workers)
    self.ready = [cluster.input_time(w) for w in range(cluster.num_workers)]
    self.events = []
    self.seq = 0
    # Shared resources: when each is next free.
    self.serial_free = 0.0
    self.serial_busy = 0.0
    # The shards' two queues (applies, adds), a time each: see `_shards`.
    self.shard_free = {"apply": 0.0, "add": 0.0}
    # The runtime's state: the tickets (a heap: smallest first, as the
    # runtime's queue), landings per open step, the next step to apply and
    # whether an apply is claimed, the global step.
    self.tickets = list(range(*schedule.initial_tickets(self.m)))
    self.waiting = collections.deque()  # pushes waiting for a ticket
    self.landed = collections.defaultdict(int)
    self.next_step = 0
    self.busy = False
    self.global_step = 0
    # gba_lock: the same sequence, decided at the lock in arrival order.
    self.reserved_landed = collections.defaultdict(int)
    self.reserved_step = 0
    self.started = 0
    # Workers that found the current loop's steps all started, waiting for
    # its last push to end (`loop_steps`).
    self.parked = []
    self.resume_at = 0.0
    self.records = []  # (worker, token, step, tau, weight, accepted)
    self.ends = []
    # worker -> its push's trace row so far (its token among them)
    self.pushing = {}
    self.trace = []

  def push_event(self, t, kind, *args):
    heapq.heappush(self.events, (t, kind, self.seq, args))
    self.seq += 1

  def run(self) -> SimResult:
    for w in range(self.c.num_workers):
      self.push_event(0.0, _START, w)
    handlers = {_START: self.start, _TOKEN: self.token, _ARRIVE: self.arrive,
                _LAND: self.land,
                _LANDED: self.landed_done, _APPLIED: self.applied,
                _FINISHED: self.finished}
    while self.events and len(self.ends) < self.total:
      t, kind, _, args = heapq.heappop(self.events)
      handlers[kind](t, *args)
    records = np.array(self.records, np.float64).reshape(-1, 6)
    return _result(
        self.mode, self.c, self.m, self.ends, self.computed, len(self.ends),
        self.global_step, self.serial_busy,
        trace=np.array(self.trace, np.float64).reshape(
            -1, len(push_trace.COLUMNS)),
        worker=records[:, 0].astype(np.int64),
        token=records[:, 1].astype(np.int64),
        step=records[:, 2].astype(np.int64),
        tau=records[:, 3].astype(np.int64), weight=records[:, 4],
        accepted=records[:, 5].astype(bool))

  # -- a worker's step ------------------------------------------------------

  def jittered(self, name, value):
    """`value` times a lognormal factor of mean 1 (the cost's jitter)."""
    sigma = self.c.jitter.get(name, 0.0)
    if not sigma or not value:
      return value
    return value * float(self.jitter_rng.lognormal(-sigma * sigma / 2, sigma))

  def start(self, t, w):
    if self.started >= self.total:
      return
    loop = self.c.loop_steps
    if loop and self.started and self.started % loop == 0:
      if len(self.ends) < self.started:
        # The loop's steps have all started: wait for its join.
        self.parked.append(w)
        return
      if t < self.resume_at:
        self.push_event(self.resume_at, _START, w)
        return
    self.started += 1
    self.push_event(t + self.jittered("overhead", self.c.overhead_s), _TOKEN,
                    w)

  def token(self, t, w):
    # The step reads its token as it starts: nothing in the step function
    # orders the read after the input's GetNext, so TF runs the two at once
    # and a worker that waits for its batch computes on an older token.
    row = [np.nan] * len(push_trace.COLUMNS)
    row[push_trace.WORKER], row[push_trace.TOKEN] = w, self.global_step
    row[push_trace.READ], row[push_trace.CLAIMED] = t, 0
    self.pushing[w] = row
    begin = max(t, self.ready[w])
    # The batch is taken; the pipeline starts on the next one.
    self.ready[w] = begin + self.c.input_time(w)
    compute = self.clocks[w].sample(begin)
    self.computed[w] += compute
    self.push_event(begin + compute + self.c.rpc_s + self.c.push_s, _ARRIVE,
                    w)

  def reply(self, t, w):
    """The push of worker w is done at t; its next step starts after the
    reply travels back."""
    row = self.pushing.pop(w)
    row[push_trace.END] = t
    self.trace.append(row)
    self.ends.append(t + self.c.rpc_s)
    loop = self.c.loop_steps
    if loop and self.started % loop == 0 and len(self.ends) == self.started:
      # The loop's last push: every worker starts the next loop together.
      self.resume_at = t + self.c.rpc_s + self.c.loop_pause_s
      for v in self.parked:
        self.push_event(self.resume_at, _START, v)
      self.parked = []
    self.push_event(t + self.c.rpc_s, _START, w)

  def _serial(self, t, hold):
    start = max(t, self.serial_free)
    self.serial_free = start + hold
    self.serial_busy += hold
    return self.serial_free

  def _shards(self, t, work_s, queue="apply"):
    """When `work_s` (summed over shards) started at t is done, first come
    first served in `queue`. The pushes' adds queue behind each other, not
    behind an apply: the applier applies a completed step's buffer while
    the next step's adds go into the other parity's, and TF runs the two
    at once."""
    start = max(t, self.shard_free[queue])
    self.shard_free[queue] = start + work_s / self.c.num_ps
    return self.shard_free[queue]

  def _mark(self, w, column, value):
    """Sets one landmark (or the step) of worker w's push in its row."""
    self.pushing[w][column] = value

  def _decide(self, w, step):
    self._mark(w, push_trace.STEP, step)
    token = int(self.pushing[w][push_trace.TOKEN])
    tau = int(schedule.staleness(step, token, schedule.NUMPY_OPS))
    weight = float(self.tables.weight(tau, schedule.NUMPY_OPS))
    accepted = bool(self.tables.accepts(tau, schedule.NUMPY_OPS))
    self.records.append((w, token, step, tau, weight, accepted))
    return accepted

  # -- arrival at the parameter servers -------------------------------------

  def arrive(self, t, w):
    self._mark(w, push_trace.ARRIVE, t)
    if self.mode == "async":
      # Plain PSS: the gradient is applied on every shard at once.
      done = self._shards(t, self.c.async_apply_s)
      self._mark(w, push_trace.TICKET, t)
      self._mark(w, push_trace.LANDED, done)
      self._decide(w, self.global_step)
      self.global_step += 1
      self.reply(done, w)
      return
    # A push without a ticket waits for one (both open steps' are out).
    self.waiting.append(w)
    self._serve_waiting(t)

  def _serve_waiting(self, t):
    """Hands tickets to waiting pushes, first come first served, smallest
    ticket first. A dropped push gives its ticket back, to the next in
    line."""
    take = self._locked_push if self.mode == "gba_lock" else self._ticketed
    while self.waiting and self.tickets:
      take(t, self.waiting.popleft())

  def _refill(self, step):
    """Queues the tickets of `step + 2` (`step` is finished)."""
    for ticket in range(*schedule.refill(step, self.m)):
      heapq.heappush(self.tickets, ticket)

  def _locked_push(self, t, w):
    self._mark(w, push_trace.TICKET, t)
    ticket = heapq.heappop(self.tickets)
    step = int(schedule.step_of(ticket, self.m))
    accepted = self._decide(w, step)
    hold = self.c.serial_s
    if not accepted:
      heapq.heappush(self.tickets, ticket)
    else:
      hold += self.c.add_s
      self.reserved_landed[step] += 1
    applies = 0
    while schedule.complete(self.reserved_landed[self.reserved_step], self.m):
      del self.reserved_landed[self.reserved_step]
      self._refill(self.reserved_step)
      self.reserved_step += 1
      applies += 1
    hold += sum(self.jittered("apply", self.c.apply_s)
                for _ in range(applies))
    done = self._serial(t, hold)
    self._mark(w, push_trace.LANDED, done)
    if applies:
      self._mark(w, push_trace.CLAIMED, 1)
      self.push_event(done, _FINISHED, w, self.reserved_step, True)
    else:
      self.reply(done, w)

  def _ticketed(self, t, w):
    self._mark(w, push_trace.TICKET, t)
    ticket = heapq.heappop(self.tickets)
    step = int(schedule.step_of(ticket, self.m))
    accepted = self._decide(w, step)
    if accepted:
      self.push_event(self._shards(t, self.c.add_s, "add")
                      + self.jittered("land", self.c.land_s), _LAND, w, step,
                      True)
    else:
      heapq.heappush(self.tickets, ticket)
      self.push_event(t, _LAND, w, step, False)

  # -- landing, apply, finish (ticket modes) --------------------------------

  def land(self, t, w, step, accepted):
    self.push_event(self._serial(t, self.c.serial_s), _LANDED, w, step,
                    accepted)

  def landed_done(self, t, w, step, accepted):
    self._mark(w, push_trace.LANDED, t)
    if accepted:
      self.landed[step] += 1
    if not self.busy and schedule.complete(self.landed[self.next_step],
                                           self.m):
      self.busy = True
      self._mark(w, push_trace.CLAIMED, 1)
      self.push_event(self._shards(t, self.jittered("apply", self.c.apply_s)),
                      _APPLIED, w, self.next_step)
    else:
      self.reply(t, w)

  def applied(self, t, w, step):
    self.push_event(self._serial(t, self.c.serial_s), _FINISHED, w, step,
                    False)

  def finished(self, t, w, step, locked):
    if locked:  # gba_lock: the state changed at the lock; publish it.
      self.global_step = step
      self.reply(t, w)
      return
    del self.landed[step]
    self.global_step = self.next_step = step + 1
    self._refill(step)
    self._serve_waiting(t)
    if schedule.complete(self.landed[self.next_step], self.m):
      self.push_event(self._shards(t, self.jittered("apply", self.c.apply_s)),
                      _APPLIED, w, self.next_step)
    else:
      self.busy = False
      self.reply(t, w)
