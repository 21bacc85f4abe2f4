"""`switching.timed_train_step` under a real MultiWorkerMirroredStrategy.

Runs in a fresh process (a collective strategy and the suite's shared
parameter-server cluster do not share a process well): one worker, a
dataset that sleeps a known time per batch, `model.fit` with the timed
step. The logged `step_seconds/w0` must hold that time, measured from the
end of the previous step's synchronisation (so 0 on the first step).
"""

import json
import subprocess
import sys

import tensorflow as tf

from tests import testing_utils

_SLEEP_MS = 60

_PROGRAM = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gba_tf
import tensorflow as tf
from gba_tf import compat, switching

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
  model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(4,))])
  switching.timed_train_step(model, strategy)
  model.compile("sgd", "mse")
data = tf.data.Dataset.from_tensors(
    (tf.ones([8, 4]), tf.ones([8, 1]))).repeat(6).apply(
        compat.data_sleep(%d * 1000))
seen = []
class Record(tf.keras.callbacks.Callback):
  def on_train_batch_end(self, batch, logs=None):
    seen.append(switching.latencies_from_logs(logs, 1)[0])
model.fit(data, epochs=1, verbose=0, callbacks=[Record()])
names = [v.name for v in model.variables]
print(json.dumps({"seen": seen, "reduction": model.distribute_reduction_method,
                  "names": names}))
""" % _SLEEP_MS


class TimedTrainStepTest(tf.test.TestCase):

  def test_logs_each_steps_compute_time_from_the_last_sync(self):
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM, testing_utils.ROOT],
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = out["seen"]
    self.assertLen(seen, 6)
    # The first step has no previous synchronisation: 0 by definition.
    self.assertEqual(seen[0], 0.0)
    # Each later step includes its batch's 60 ms of input time (the data
    # is read inside the step), and far less than a second of anything else.
    for seconds in seen[1:]:
      self.assertBetween(seconds, _SLEEP_MS / 1000 * 0.9, 1.0)
    # Every worker logs the same all-gathered values: taken as they are,
    # not summed across workers.
    self.assertEqual(out["reduction"], "first")
    # The timer is no model variable (it stays out of checkpoints).
    self.assertLen(out["names"], 2)


if __name__ == "__main__":
  tf.test.main()
