"""The TF / tf_keras internals GBA hooks into still exist (TF 2.21 pins).

If TensorFlow moves one of them, this file says which, before any cluster
test hangs or trains silently without GBA.
"""

import functools

import gba_tf  # noqa: F401
import tensorflow as tf
from tf_keras.src.optimizers import optimizer as keras_optimizer

from gba_tf import compat
from tests import testing_utils


class CompatTest(tf.test.TestCase):

  def test_strategy_hooks_exist(self):
    extended = compat.ParameterServerStrategyV2Extended
    for name in ("_call_for_each_replica", "colocate_vars_with",
                 "_assert_being_scheduled_by_cluster_coordinator"):
      self.assertTrue(hasattr(extended, name), name)
    self.assertTrue(hasattr(compat.ReplicaContext, "merge_call"))
    self.assertTrue(issubclass(gba_tf.GBAStrategy,
                               tf.distribute.experimental.ParameterServerStrategy))

  def test_optimizer_merge_fn_is_recognised(self):
    optimizer = tf.keras.optimizers.SGD(0.1)
    self.assertIsInstance(optimizer, keras_optimizer.Optimizer)
    fn = optimizer._distributed_apply_gradients_fn  # pylint: disable=protected-access
    self.assertIs(compat.optimizer_of_merge_fn(fn), optimizer)
    self.assertIsNone(compat.optimizer_of_merge_fn(lambda s: s))
    legacy = tf.keras.optimizers.legacy.SGD(0.1)
    partial = functools.partial(legacy._distributed_apply, apply_state={})  # pylint: disable=protected-access
    self.assertIs(compat.optimizer_of_merge_fn(partial), legacy)
    self.assertTrue(hasattr(optimizer, "_compute_current_learning_rate"))

  def test_checkpoint_state_is_written_relative(self):
    directory = self.get_temp_dir()
    compat.update_checkpoint_state(directory, "ckpt-2", ["ckpt-1", "ckpt-2"])
    with open(f"{directory}/checkpoint") as f:
      text = f.read()
    self.assertIn('model_checkpoint_path: "ckpt-2"', text)
    self.assertIn('all_model_checkpoint_paths: "ckpt-1"', text)
    state = tf.train.get_checkpoint_state(directory)
    self.assertEqual(state.model_checkpoint_path, f"{directory}/ckpt-2")

  def test_device_datasets_can_leave_autotune_off(self):
    module = compat._multi_device_iterator_ops  # pylint: disable=protected-access
    testing_utils.unpatched_device_datasets(self)

    def device_autotune():
      strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
      iterator = iter(strategy.experimental_distribute_dataset(
          tf.data.Dataset.range(8).batch(2)))
      self.assertEqual(next(iterator).numpy().tolist(), [0, 1])
      # TF 2.21: distributed iterator -> this worker's iterator ->
      # OwnedMultiDeviceIterator -> the per-device OwnedIterator.
      device = iterator._iterators[0]._iterator._device_iterators[0]  # pylint: disable=protected-access
      return device._dataset.options().autotune.enabled  # pylint: disable=protected-access

    # Unset (None) means TF's default, on: what the hook changes.
    self.assertIn(device_autotune(), (None, True))
    compat.disable_device_autotune()
    compat.disable_device_autotune()  # a second call wraps nothing again
    self.assertIs(device_autotune(), False)
    wrapped = module._create_device_dataset.__wrapped__  # pylint: disable=protected-access
    self.assertFalse(hasattr(wrapped, "gba_tf_no_autotune"))

  def test_data_sleep(self):
    ds = tf.data.Dataset.range(3).apply(compat.data_sleep(1000))
    self.assertEqual(list(ds.as_numpy_iterator()), [0, 1, 2])


if __name__ == "__main__":
  tf.test.main()
