"""Switching between sync (all-reduce) and GBA training: the middle layer.

Pure Python, no TensorFlow:

* `monitor`: `HealthMonitor` names slow workers from per-worker step
  latencies, with hysteresis.
* `decision`: which mode to run next (`decide`), the switch log in the model
  directory (`SwitchState`) and the exit code that asks for a restart
  (`EXIT_SWITCH`).

The TensorFlow / Keras glue, kept apart:

* `measure`: the latencies, from the GBA counters or all-gathered in sync.
* `callback`: `HealthCallback`, which runs the monitor inside `model.fit`.

It depends on the library (`gba_tf`) only; the launch layer
(`gba_tf.launch`) depends on it. Every public name is re-exported here.
"""

from gba_tf.switching.monitor import HealthMonitor
from gba_tf.switching.monitor import HealthReport
from gba_tf.switching.monitor import HealthState
from gba_tf.switching.decision import EXIT_SWITCH
from gba_tf.switching.decision import STATE_FILE
from gba_tf.switching.decision import SWITCHABLE_MODES
from gba_tf.switching.decision import Switch
from gba_tf.switching.decision import SwitchState
from gba_tf.switching.decision import current_mode
from gba_tf.switching.decision import decide
from gba_tf.switching.decision import reason
from gba_tf.switching.measure import GBALatencySource
from gba_tf.switching.measure import latencies_from_logs
from gba_tf.switching.measure import timed_train_step
from gba_tf.switching.callback import HealthCallback

__all__ = ["EXIT_SWITCH", "GBALatencySource", "HealthCallback",
           "HealthMonitor", "HealthReport", "HealthState", "STATE_FILE",
           "SWITCHABLE_MODES", "Switch", "SwitchState", "current_mode",
           "decide", "latencies_from_logs", "reason", "timed_train_step"]
