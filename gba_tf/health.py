"""Straggler detection from per-worker step latency, with hysteresis.

The monitor is pure Python and holds no cluster state: the runtime feeds it
one latency per worker per check, from whichever mode is running,

* GBA / async: seconds from token read to gradient push per local step, from
  the PS-side counters (`GBAStrategy.gba_metrics()`), see `GBALatencySource`;
* sync (MultiWorkerMirroredStrategy): each worker's time from the end of the
  previous step's synchronisation to having its gradients ready, all-gathered every step
  so that every worker sees the same numbers (`timed_train_step`).

A worker is *slow* at a check when its latency exceeds `slow_ratio` times the
median of the *other* workers (leave-one-out, so that with 2 workers the slow
one is compared with the fast one, not with their mean) and exceeds it by at
least `min_gap_s` (so that microsecond noise on idle workers never counts).

Example:

>>> monitor = HealthMonitor(num_workers=4, window=2)
>>> monitor.observe([0.05, 0.21, 0.05, 0.05]).state
<HealthState.HEALTHY: 'healthy'>
>>> report = monitor.observe([0.05, 0.20, 0.05, 0.05])
>>> report.state, report.slow_workers, report.changed
(<HealthState.STRAGGLING: 'straggling'>, (1,), True)
"""

import dataclasses
import enum
import statistics
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# A worker this many times slower than its peers' median is a straggler. The
# synchronous step time is set by the slowest worker, so 2x means half of the
# other workers' time is spent waiting.
_DEFAULT_SLOW_RATIO = 2.0
# Once straggling, a worker counts as recovered below this ratio: the gap
# between the two ratios keeps a worker hovering near 2x from flapping.
_DEFAULT_RECOVER_RATIO = 1.5
# Differences below 10 ms are scheduling noise, not stragglers.
_DEFAULT_MIN_GAP_S = 0.010


class HealthState(enum.Enum):
  """Cluster health as the monitor sees it.

  Transitions (each after `window` consecutive checks that agree):
    HEALTHY -> STRAGGLING: some worker is slow (ratio > slow_ratio).
    STRAGGLING -> HEALTHY: no worker is above recover_ratio.
  """
  HEALTHY = "healthy"
  STRAGGLING = "straggling"


@dataclasses.dataclass(frozen=True)
class HealthReport:
  """The monitor's view after one check.

  Attributes:
    state: health after this check.
    changed: whether this check changed the state.
    slow_workers: workers slow at this check, by index.
    ratios: each worker's latency over its peers' median.
    latencies: the latencies observed, in seconds.
    streak: consecutive checks that disagreed with the state before this one
      (0 when they agree).
  """
  state: HealthState
  changed: bool
  slow_workers: Tuple[int, ...]
  ratios: Tuple[float, ...]
  latencies: Tuple[float, ...]
  streak: int

  def describe(self) -> str:
    """One line for logs: who is slow and by how much."""
    times = " ".join(f"w{i}={1000 * t:.0f}ms"
                     for i, t in enumerate(self.latencies))
    if self.slow_workers:
      slow = ", ".join(f"worker {i} at {self.ratios[i]:.1f}x its peers"
                       for i in self.slow_workers)
    else:
      slow = "no slow worker"
    return f"{self.state.value}: {slow} (step times {times})"


class HealthMonitor:
  """Names slow workers; changes state only after `window` agreeing checks.

  Not thread-safe: call `observe` from one thread (a Keras callback).

  Args:
    num_workers: workers observed at every check.
    window: consecutive checks needed to change state (hysteresis).
    slow_ratio: latency over peers' median above which a worker is slow.
    recover_ratio: below this every worker counts as recovered; must be
      <= slow_ratio.
    min_gap_s: a slow worker is also at least this many seconds slower.
    initial_state: the state before any check (GBA mode starts STRAGGLING:
      it was chosen because of stragglers).
  """

  def __init__(self, num_workers: int, window: int = 3,
               slow_ratio: float = _DEFAULT_SLOW_RATIO,
               recover_ratio: float = _DEFAULT_RECOVER_RATIO,
               min_gap_s: float = _DEFAULT_MIN_GAP_S,
               initial_state: HealthState = HealthState.HEALTHY):
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or (
        num_workers < 2):
      raise ValueError(f"Received: num_workers={num_workers!r}; straggler "
                       "detection needs at least 2 workers.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
      raise ValueError(f"Received: window={window!r}, which must be an "
                       "integer >= 1.")
    if not slow_ratio > 1.0:
      raise ValueError(f"Received: slow_ratio={slow_ratio!r}, which must be "
                       "> 1.")
    if not 1.0 <= recover_ratio <= slow_ratio:
      raise ValueError(f"Received: recover_ratio={recover_ratio!r}, which "
                       f"must be in [1, slow_ratio={slow_ratio}].")
    if not min_gap_s >= 0:
      raise ValueError(f"Received: min_gap_s={min_gap_s!r}, which must be "
                       ">= 0.")
    self.num_workers = num_workers
    self.window = window
    self.slow_ratio = slow_ratio
    self.recover_ratio = recover_ratio
    self.min_gap_s = min_gap_s
    self.state = HealthState(initial_state)
    self._streak = 0

  @staticmethod
  def _peer_medians(latencies: Sequence[float]) -> Tuple[float, ...]:
    latencies = list(latencies)
    return tuple(statistics.median(latencies[:i] + latencies[i + 1:])
                 for i in range(len(latencies)))

  @staticmethod
  def _ratios(latencies, peers) -> Tuple[float, ...]:
    return tuple(t / p if p > 0 else (float("inf") if t > 0 else 1.)
                 for t, p in zip(latencies, peers))

  def ratios(self, latencies: Sequence[float]) -> Tuple[float, ...]:
    """Each latency over the median of the other workers' latencies."""
    return self._ratios(latencies, self._peer_medians(latencies))

  def observe(self, latencies: Sequence[float]) -> HealthReport:
    latencies = tuple(float(t) for t in latencies)
    if len(latencies) != self.num_workers:
      raise ValueError(f"Received {len(latencies)} latencies for "
                       f"num_workers={self.num_workers}.")
    if any(not np.isfinite(t) or t < 0 for t in latencies):
      raise ValueError(f"Received: latencies={latencies}, which must be "
                       "finite and >= 0.")
    peers = self._peer_medians(latencies)
    ratios = self._ratios(latencies, peers)

    def gap(i):
      return latencies[i] - peers[i] >= self.min_gap_s
    slow = tuple(i for i, r in enumerate(ratios)
                 if r > self.slow_ratio and gap(i))
    recovered = not any(r > self.recover_ratio and gap(i)
                        for i, r in enumerate(ratios))
    if self.state is HealthState.HEALTHY:
      disagrees = bool(slow)
    else:
      disagrees = recovered
    self._streak = self._streak + 1 if disagrees else 0
    changed = self._streak >= self.window
    if changed:
      self.state = (HealthState.STRAGGLING
                    if self.state is HealthState.HEALTHY
                    else HealthState.HEALTHY)
      self._streak = 0
    return HealthReport(self.state, changed, slow, ratios, latencies,
                        self._streak)


class GBALatencySource:
  """Per-worker seconds per local step from the GBA counters, per window.

  `worker_compute_seconds` (token read to push) and `worker_pushed` are
  cumulative PS-side counters. A window closes once the workers together
  pushed `window_pushes` more gradients: it is measured in completed work,
  because Keras schedules closures far ahead of their execution under
  ParameterServerStrategy. A worker's latency is its added seconds over its
  added pushes; a worker that pushed nothing in the window gets the window's
  length, a lower bound on its step time.

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
    seconds = np.asarray(metrics["worker_compute_seconds"], np.float64)
    if self._start is None:
      self._start = (now, pushed, seconds)
      return None
    d_pushed, d_seconds = pushed - self._start[1], seconds - self._start[2]
    if d_pushed.sum() < self.window_pushes:
      return None
    elapsed = now - self._start[0]
    self._start = (now, pushed, seconds)
    return tuple(float(s / n) if n > 0 else float(elapsed)
                 for n, s in zip(d_pushed, d_seconds))


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
