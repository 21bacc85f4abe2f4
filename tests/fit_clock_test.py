"""`timed_fit` stops its clock when training ends, not when `fit` returns."""

import time

import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import numpy as np
import tensorflow as tf

from gba_tf.launch import fit_clock

# Work done after training ended and before `fit` returned: what releasing
# a ParameterServerStrategy fit's functions costs (here a callback's
# on_train_end, which runs after the clock's).
_RELEASE_SECONDS = 0.5


class _SlowRelease(tf.keras.callbacks.Callback):

  def on_train_end(self, logs=None):
    time.sleep(_RELEASE_SECONDS)


class TimedFitTest(tf.test.TestCase):

  def test_release_is_not_training(self):
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((64, 4), np.float32)
    start = time.perf_counter()
    history, train_seconds, release_seconds = fit_clock.timed_fit(
        model, x, x[:, :1], batch_size=8, epochs=2, verbose=0,
        callbacks=[_SlowRelease()])
    total = time.perf_counter() - start
    self.assertLen(history.history["loss"], 2)
    # The sleep falls after the clock stopped: all of it is release, and
    # training plus release is the whole call.
    self.assertGreaterEqual(release_seconds, _RELEASE_SECONDS)
    self.assertLess(train_seconds, total - _RELEASE_SECONDS + 1e-3)
    self.assertAllClose(train_seconds + release_seconds, total, atol=0.05)

  def test_a_fit_without_train_end_is_an_error(self):
    class NoEnd:
      def fit(self, *args, **kwargs):
        del args, kwargs
        return None

    with self.assertRaisesRegex(RuntimeError, "on_train_end"):
      fit_clock.timed_fit(NoEnd())


if __name__ == "__main__":
  tf.test.main()
