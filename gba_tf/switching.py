"""Switching between sync (all-reduce) and GBA training at checkpoints.

The paper's premise (arXiv 2205.11048, Sec. 1 and 3): because GBA applies
the same global batch as synchronous training, a job can move between the
two *without re-tuning*; sync is fastest when the cluster is healthy, GBA
when stragglers appear. Here the decision and the checkpoint boundary belong
to gba_tf; restarting processes in the other topology (the parameter servers
come and go) belongs to whatever runs them: `scripts/launch_local.py` on
one machine, Kubernetes in a real cluster.

Protocol, per phase:

1. The job reads the current mode from `<model_dir>/switch_state.json`
   (`current_mode`; sync when the file does not exist yet).
2. It restores the latest checkpoint and trains; `HealthCallback` feeds the
   `HealthMonitor` every few optimizer steps.
3. When the monitor changes state (stragglers persisted for the window, or
   the cluster stayed healthy for the window), `decide` names the other
   mode; the callback stops `fit`, the chief writes a checkpoint and appends
   the switch with its reason and the measured step times to the state
   file, and every task exits with `EXIT_SWITCH`.
4. The launcher sees `EXIT_SWITCH`, stops the phase's tasks and starts the
   next mode's topology, which resumes from that checkpoint.

Example:

>>> from gba_tf import health
>>> report = health.HealthReport(health.HealthState.STRAGGLING, True, (1,),
...                              (1.0, 4.0), (0.05, 0.2), 0)
>>> decide("sync", report)
'gba'
"""

import dataclasses
import json
import os
import time
from typing import Callable, List, Optional

import tensorflow as tf

from gba_tf import health

# Exit status of a task that stopped to switch modes: EX_TEMPFAIL from
# sysexits.h, "try again": the launcher relaunches instead of failing.
EXIT_SWITCH = 75
# Exit status of a chief that lost a parameter server: the launcher restarts
# the phase, which resumes from the last checkpoint (EX_PROTOCOL + 0 = 76).
EXIT_RESUME = 76

STATE_FILE = "switch_state.json"
SWITCHABLE_MODES = ("sync", "gba")


@dataclasses.dataclass(frozen=True)
class Switch:
  """One mode change, as logged and stored in the state file."""
  from_mode: str
  to_mode: str
  reason: str
  global_step: int
  unix_time: float
  step_seconds: List[float]


@dataclasses.dataclass
class SwitchState:
  """Contents of `<model_dir>/switch_state.json`. Not thread-safe."""
  mode: str = "sync"
  switches: List[Switch] = dataclasses.field(default_factory=list)

  @classmethod
  def load(cls, model_dir: str) -> "SwitchState":
    path = os.path.join(model_dir, STATE_FILE)
    if not os.path.exists(path):
      return cls()
    with open(path) as f:
      data = json.load(f)
    if data.get("mode") not in SWITCHABLE_MODES:
      raise ValueError(f"Received: mode={data.get('mode')!r} in {path}, "
                       f"which is not one of {SWITCHABLE_MODES}.")
    return cls(data["mode"], [Switch(**s) for s in data.get("switches", [])])

  def save(self, model_dir: str) -> None:
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, STATE_FILE)
    # Written whole then renamed: a reader never sees half a file.
    with open(path + ".tmp", "w") as f:
      json.dump({"mode": self.mode,
                 "switches": [dataclasses.asdict(s) for s in self.switches]},
                f, indent=2)
    os.replace(path + ".tmp", path)

  def record(self, switch: Switch) -> None:
    self.switches.append(switch)
    self.mode = switch.to_mode


def current_mode(model_dir: Optional[str]) -> str:
  """The mode an auto job runs next: sync until a switch says otherwise."""
  if not model_dir:
    return "sync"
  return SwitchState.load(model_dir).mode


def decide(mode: str, report: health.HealthReport) -> Optional[str]:
  """The mode to switch to after `report`, or None to stay.

  Only a *change* of health state switches: the monitor's hysteresis
  (`window` agreeing checks) is what keeps the job from flapping.
  """
  if not report.changed:
    return None
  if mode == "sync" and report.state is health.HealthState.STRAGGLING:
    return "gba"
  if mode == "gba" and report.state is health.HealthState.HEALTHY:
    return "sync"
  return None


def reason(mode: str, target: str, report: health.HealthReport,
           window: int) -> str:
  if target == "gba":
    slow = ", ".join(f"worker {i} at {report.ratios[i]:.1f}x its peers' "
                     "step time" for i in report.slow_workers)
    return f"stragglers for {window} checks: {slow}"
  return (f"healthy for {window} checks: every worker within "
          f"{max(report.ratios):.1f}x of its peers")


class HealthCallback(tf.keras.callbacks.Callback):
  """Checks worker health every `check_every` batches; may stop to switch.

  Sync mode reads the all-gathered `step_seconds/w<i>` of every batch's logs
  (see `health.timed_train_step`) and averages them per check; every worker
  computes the same decision at the same batch, so all stop together. GBA
  mode polls the PS-side counters through `latency_source`.

  After `fit` returns, `target` is the mode to switch to (None: none) and
  `reports` holds every check.

  Args:
    monitor: the `HealthMonitor`.
    mode: the running mode, "sync", "gba" or "async".
    check_every: batches between checks.
    auto: whether to stop training when `decide` names another mode.
    latency_source: `health.GBALatencySource` for PS modes; None for sync.
    log: where one-line reports go.
  """

  def __init__(self, monitor: health.HealthMonitor, mode: str,
               check_every: int, auto: bool = False,
               latency_source: Optional[health.GBALatencySource] = None,
               log: Callable[[str], None] = print):
    super().__init__()
    # Under ParameterServerStrategy Keras allows batch-level callbacks only
    # if they accept unfetched logs; PS modes read no logs here, and sync
    # logs are converted by `float()`.
    self._supports_tf_logs = True
    self.monitor = monitor
    self.mode = mode
    self.check_every = check_every
    self.auto = auto
    self.latency_source = latency_source
    self.log = log
    self.target = None
    self.reason = None
    self.reports: List[health.HealthReport] = []
    self._batches = 0
    self._sum = None
    self._count = 0

  def on_train_batch_end(self, batch, logs=None):
    self._batches += 1
    if self.latency_source is not None:
      # PS modes: poll twice per check interval; the source decides when
      # enough gradients completed to close a window.
      if self._batches % max(1, self.check_every // 2):
        return
      latencies = self.latency_source.poll()
      if latencies is not None:
        self._observe(latencies)
      return
    latencies = health.latencies_from_logs(logs, self.monitor.num_workers)
    if latencies is not None:
      self._sum = latencies if self._sum is None else tuple(
          a + b for a, b in zip(self._sum, latencies))
      self._count += 1
    if self._batches % self.check_every or not self._count:
      return
    latencies = tuple(s / self._count for s in self._sum)
    self._sum, self._count = None, 0
    self._observe(latencies)

  def _observe(self, latencies):
    report = self.monitor.observe(latencies)
    previous = self.reports[-1].slow_workers if self.reports else ()
    self.reports.append(report)
    # Log changes only: a check every few steps would flood the job's log.
    if report.changed or report.slow_workers != previous:
      self.log(f"[health] {self.mode}: {report.describe()}")
    target = decide(self.mode, report) if self.auto else None
    if target and self.target is None:
      self.target = target
      self.reason = reason(self.mode, target, report, self.monitor.window)
      self.log(f"[switch] {self.mode} -> {target}: {self.reason}")
      self.model.stop_training = True

  def switch_record(self, global_step: int) -> Switch:
    last = self.reports[-1]
    return Switch(self.mode, self.target, self.reason, int(global_step),
                  time.time(), [float(t) for t in last.latencies])
