"""Switching between sync (all-reduce) and GBA training at checkpoints.

The paper's premise (arXiv 2205.11048, Sec. 1 and 3): because GBA applies
the same global batch as synchronous training, a job can move between the
two *without re-tuning*; sync is fastest when the cluster is healthy, GBA
when stragglers appear. Here the decision and the checkpoint boundary belong
to gba_tf; restarting processes in the other topology (the parameter servers
come and go) belongs to whatever runs them: `gba-launch`
(`gba_tf.launch.launcher`) on one machine, Kubernetes in a real cluster.

Protocol, per phase:

1. The job reads the current mode from `<model_dir>/switch_state.json`
   (`current_mode`; sync when the file does not exist yet).
2. It restores the latest checkpoint and trains; `callback.HealthCallback`
   feeds the `monitor.HealthMonitor` every few optimizer steps.
3. When the monitor changes state (stragglers persisted for the window, or
   the cluster stayed healthy for the window), `decide` names the other
   mode; the callback stops `fit`, the chief writes a checkpoint and appends
   the switch with its reason and the measured step times to the state
   file, and every task exits with `EXIT_SWITCH`.
4. The launcher sees `EXIT_SWITCH`, stops the phase's tasks and starts the
   next mode's topology, which resumes from that checkpoint.

Example:

>>> from gba_tf.switching import monitor
>>> report = monitor.HealthReport(monitor.HealthState.STRAGGLING, True, (1,),
...                               (1.0, 4.0), (0.05, 0.2), 0)
>>> decide("sync", report)
'gba'
"""

import dataclasses
import json
import os
from typing import List, Optional

from gba_tf.switching import monitor

# Exit status of a task that stopped to switch modes: EX_TEMPFAIL from
# sysexits.h, "try again": the launcher relaunches instead of failing.
EXIT_SWITCH = 75

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


def decide(mode: str, report: monitor.HealthReport) -> Optional[str]:
  """The mode to switch to after `report`, or None to stay.

  Only a *change* of health state switches: the monitor's hysteresis
  (`window` agreeing checks) is what keeps the job from flapping.
  """
  if not report.changed:
    return None
  if mode == "sync" and report.state is monitor.HealthState.STRAGGLING:
    return "gba"
  if mode == "gba" and report.state is monitor.HealthState.HEALTHY:
    return "sync"
  return None


def reason(mode: str, target: str, report: monitor.HealthReport,
           window: int) -> str:
  if target == "gba":
    slow = ", ".join(f"worker {i} at {report.ratios[i]:.1f}x its peers' "
                     "step time" for i in report.slow_workers)
    return f"stragglers for {window} checks: {slow}"
  return (f"healthy for {window} checks: every worker within "
          f"{max(report.ratios):.1f}x of its peers")
