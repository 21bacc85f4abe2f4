"""`HealthCallback`: the Keras glue between `model.fit` and switching.

It feeds the `HealthMonitor` from the running mode's latency source and,
in auto mode, stops `fit` when `decision.decide` names the other mode.
"""

import time
from typing import Callable, List, Optional

import tensorflow as tf

from gba_tf.switching import decision
from gba_tf.switching import measure
from gba_tf.switching import monitor as monitor_lib


class HealthCallback(tf.keras.callbacks.Callback):
  """Checks worker health every `check_every` batches; may stop to switch.

  Sync mode reads the all-gathered `step_seconds/w<i>` of every batch's logs
  (see `measure.timed_train_step`) and averages them per check; every worker
  computes the same decision at the same batch, so all stop together. GBA
  mode polls the PS-side counters through `latency_source`.

  After `fit` returns, `target` is the mode to switch to (None: none) and
  `reports` holds every check.

  Args:
    monitor: the `HealthMonitor`.
    mode: the running mode, "sync", "gba" or "async".
    check_every: batches between checks.
    auto: whether to stop training when `decision.decide` names another mode.
    latency_source: `measure.GBALatencySource` for PS modes; None for sync.
    log: where one-line reports go.
  """

  def __init__(self, monitor: monitor_lib.HealthMonitor, mode: str,
               check_every: int, auto: bool = False,
               latency_source: Optional[measure.GBALatencySource] = None,
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
    self.reports: List[monitor_lib.HealthReport] = []
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
    latencies = measure.latencies_from_logs(logs, self.monitor.num_workers)
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
    target = decision.decide(self.mode, report) if self.auto else None
    if target and self.target is None:
      self.target = target
      self.reason = decision.reason(self.mode, target, report,
                                    self.monitor.window)
      self.log(f"[switch] {self.mode} -> {target}: {self.reason}")
      self.model.stop_training = True

  def switch_record(self, global_step: int) -> decision.Switch:
    last = self.reports[-1]
    return decision.Switch(self.mode, self.target, self.reason,
                           int(global_step), time.time(),
                           [float(t) for t in last.latencies])
