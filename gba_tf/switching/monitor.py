"""Straggler detection from per-worker step latency, with hysteresis.

The monitor is pure Python (no TensorFlow) and holds no cluster state: the runtime feeds it
one latency per worker per check, from whichever mode is running,

* GBA / async: seconds from token read to gradient push per local step, from
  the PS-side counters (`GBAStrategy.gba_metrics()`), see `measure.GBALatencySource`;
* sync (MultiWorkerMirroredStrategy): each worker's time from the end of the
  previous step's synchronisation to having its gradients ready, all-gathered every step
  so that every worker sees the same numbers (`measure.timed_train_step`).

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
import math
import statistics
from typing import Sequence, Tuple

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
    if any(not math.isfinite(t) or t < 0 for t in latencies):
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
