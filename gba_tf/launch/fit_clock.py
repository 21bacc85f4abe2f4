"""Times `model.fit` to the end of training, not to its return.

Under ParameterServerStrategy, `fit` returning releases what it traced (its
per-worker iterator, the functions they ran). Each release removes a function
from the eager context of every remote task (`Context.remove_function`), and
on the 2-core machine of README "Micro-benchmark" that blocked the chief's
main thread for 5-10 s with every process idle: py-spy showed
`AtomicFunction.__del__` -> `Context.remove_function` under `fit`'s return.
A clock stopped when `fit` returns counts that stall as training: 1,500
local steps that trained in about 12 s measured 21 s, and the stall came
and went between repeats, which is what the throughput benchmark's "rate
modes" were.
The wait was found later: tf.data's autotune thread, which the
iterators' deletion joins (`gba_tf.compat.disable_device_autotune`, README
"`fit` can return late"). The clock still stops at the end of training, so
a stall of any other kind stays out of the rate too.
`timed_fit` stops the clock when training ends (`on_train_end`) and reports
the release separately.

Example:

>>> import numpy as np
>>> import tensorflow as tf
>>> model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
>>> model.compile("sgd", "mse")
>>> x = np.zeros((8, 2), np.float32)
>>> history, train_seconds, release_seconds = timed_fit(
...     model, x, x[:, :1], epochs=1, verbose=0)
>>> train_seconds > 0 and release_seconds >= 0
True
"""

import time
from typing import Any, Tuple

import tensorflow as tf


class _TrainEnd(tf.keras.callbacks.Callback):
  """Notes the time at which `fit` finished training."""

  def __init__(self):
    super().__init__()
    self.at = None

  def on_train_end(self, logs=None):
    del logs
    self.at = time.perf_counter()


def timed_fit(model, *args, **kwargs) -> Tuple[Any, float, float]:
  """`model.fit(*args, **kwargs)`, and (its history, the seconds from the
  call to the end of training, the seconds from there to `fit`'s return).

  The clock's callback runs before any callback in `kwargs["callbacks"]`,
  so their `on_train_end` work counts as release, not training.
  """
  clock = _TrainEnd()
  callbacks = [clock] + list(kwargs.pop("callbacks", None) or [])
  start = time.perf_counter()
  history = model.fit(*args, callbacks=callbacks, **kwargs)
  returned = time.perf_counter()
  if clock.at is None:
    raise RuntimeError("fit returned without calling on_train_end, so the "
                       "end of its training is unknown.")
  return history, clock.at - start, returned - clock.at
