"""Checkpoints restore exactly across modes: GBA -> sync -> GBA.

GBA runs on the shared in-process cluster (embedding table and dense kernel
sharded over 2 PS); sync runs under MirroredStrategy, whose mirrored
variables and checkpoint layout are those of MultiWorkerMirroredStrategy
with one worker. Exactness is checked on the checkpoint files themselves:
restoring checkpoint A and saving again must give a checkpoint whose every
tensor (weights, Adam slots, `iterations`) equals A's; a slot restored wrong
or left at its initial value would differ.
"""

import glob
import os
import tempfile

import numpy as np
import tensorflow as tf

import gba_tf
from gba_tf import models
from gba_tf import checkpoints
from gba_tf.launch import local_cluster
from tests import testing_utils

_VOCAB, _FIELDS = 64, 4


def _model():
  return models.embedding_mlp(_FIELDS, _VOCAB, embedding_dim=4,
                                     hidden=(8,), seed=3)


def _dataset_fn(input_context=None):
  del input_context
  rng = np.random.default_rng(0)
  ids = rng.integers(0, _VOCAB, (256, _FIELDS))
  labels = rng.integers(0, 2, (256, 1)).astype(np.float32)
  return tf.data.Dataset.from_tensor_slices((ids, labels)).repeat().batch(16)


def _train(strategy, model, optimizer, steps):
  with strategy.scope():
    model.compile(optimizer,
                  tf.keras.losses.BinaryCrossentropy(from_logits=True))
  model.fit(tf.keras.utils.experimental.DatasetCreator(_dataset_fn),
            epochs=1, steps_per_epoch=steps, verbose=0)


def _tensors(path):
  reader = tf.train.load_checkpoint(path)
  return {key: reader.get_tensor(key)
          for key in reader.get_variable_to_shape_map()
          if not key.startswith(("save_counter", "_CHECKPOINTABLE"))}


class CrossModeCheckpointTest(tf.test.TestCase):

  def test_gba_to_sync_to_gba_is_exact(self):
    cluster = testing_utils.shared_cluster()
    config = gba_tf.GBAConfig(global_batch_size=32, local_batch_size=16)
    gba = gba_tf.GBAStrategy(cluster.resolver(), config,
                             testing_utils.two_shards())
    with gba.scope():
      model, optimizer = _model(), tf.keras.optimizers.Adam(0.01)
      self.assertEqual(checkpoints.restore_latest(self.get_temp_dir() + "/x",
                                                  model, optimizer), 0)
    self.assertLen(model.layers[1].embeddings.variables, 2)  # really sharded
    _train(gba, model, optimizer, steps=8)  # 8 local steps = 4 global steps
    gba_path = checkpoints.save(self.get_temp_dir() + "/gba", model, optimizer)
    saved = _tensors(gba_path)
    self.assertEqual(int(optimizer.iterations.numpy()), 4)
    # The new optimizer numbers its slots; the embedding's are the two of
    # its shape (Adam m and v).
    table = saved["model/layer_with_weights-0/embeddings/.ATTRIBUTES/"
                  "VARIABLE_VALUE"]
    slots = [k for k in saved if k.startswith("optimizer/_variables/")
             and saved[k].shape == table.shape]
    self.assertLen(slots, 2)
    for key in slots:
      self.assertGreater(np.abs(saved[key]).max(), 0, key)

    # GBA -> sync: every tensor comes back, then sync trains on.
    sync = tf.distribute.MirroredStrategy(["/cpu:0"])
    with sync.scope():
      sync_model, sync_optimizer = _model(), tf.keras.optimizers.Adam(0.01)
      step = checkpoints.restore_latest(self.get_temp_dir() + "/gba",
                                        sync_model, sync_optimizer)
    self.assertEqual(step, 4)
    resaved = _tensors(checkpoints.save(self.get_temp_dir() + "/sync0",
                                        sync_model, sync_optimizer))
    self.assertEqual(sorted(resaved), sorted(saved))
    for key in saved:
      self.assertAllEqual(resaved[key], saved[key], msg=key)
    _train(sync, sync_model, sync_optimizer, steps=3)
    sync_path = checkpoints.save(self.get_temp_dir() + "/sync",
                                 sync_model, sync_optimizer)
    sync_saved = _tensors(sync_path)

    # sync -> GBA, into sharded variables.
    gba2 = gba_tf.GBAStrategy(cluster.resolver(), config,
                              testing_utils.two_shards())
    with gba2.scope():
      model2, optimizer2 = _model(), tf.keras.optimizers.Adam(0.01)
      step = checkpoints.restore_latest(self.get_temp_dir() + "/sync",
                                        model2, optimizer2)
    self.assertEqual(step, 7)
    back = _tensors(checkpoints.save(self.get_temp_dir() + "/gba2", model2,
                                     optimizer2))
    for key in sync_saved:
      self.assertAllEqual(back[key], sync_saved[key], msg=key)
    # And the restored GBA model computes what the sync model computes.
    x = np.arange(2 * _FIELDS).reshape(2, _FIELDS) % _VOCAB
    self.assertAllClose(model2(x), sync_model(x), atol=1e-6)


def _dense_and_adam():
  """A built one-layer model and its built optimizer, on no strategy."""
  model = tf.keras.Sequential([tf.keras.layers.Dense(2)])
  model.build((None, 3))
  optimizer = tf.keras.optimizers.Adam(0.01)
  optimizer.build(model.trainable_variables)
  return model, optimizer


class CheckpointManagerTest(tf.test.TestCase):

  def _gba_model(self, cluster):
    config = gba_tf.GBAConfig(global_batch_size=32, local_batch_size=16)
    strategy = gba_tf.GBAStrategy(cluster.resolver(), config,
                                  testing_utils.two_shards())
    with strategy.scope():
      model, optimizer = _model(), tf.keras.optimizers.Adam(0.01)
      checkpoints.restore_latest("", model, optimizer)
    return model, optimizer

  def test_saves_values_at_call_time_traced_once_keeps_newest(self):
    model, optimizer = self._gba_model(testing_utils.shared_cluster())
    directory = os.path.join(self.get_temp_dir(), "managed")
    manager = checkpoints.CheckpointManager(directory, model, optimizer,
                                            max_to_keep=2)
    bias = model.layers[-1].bias
    for step in (1, 2, 3, 4):
      bias.assign(tf.fill(bias.shape, float(step)))
      optimizer.iterations.assign(step)
      manager.save(step)
    manager.save(4)  # same step: nothing written, nothing traced
    self.assertEqual(manager.traces, 1)
    # Only the newest two remain, and the state file names the last.
    self.assertEqual(tf.train.latest_checkpoint(directory),
                     os.path.join(directory, "ckpt-4"))
    indexes = sorted(f for f in os.listdir(directory)
                     if f.endswith(".index"))
    self.assertEqual(indexes, ["ckpt-3.index", "ckpt-4.index"])
    # Each file holds the values of its own call, not of the trace:
    # ckpt-3 has bias 3.0 and iterations 3.
    key = "model/layer_with_weights-2/bias/.ATTRIBUTES/VARIABLE_VALUE"
    three = _tensors(os.path.join(directory, "ckpt-3"))
    self.assertAllEqual(three[key], np.full(bias.shape, 3.0))
    self.assertEqual(
        three["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"], 3)
    # A new manager on the same directory continues its bookkeeping.
    again = checkpoints.CheckpointManager(directory, model, optimizer,
                                          max_to_keep=2)
    optimizer.iterations.assign(5)
    again.save(5)
    self.assertEqual(sorted(f for f in os.listdir(directory)
                            if f.endswith(".index")),
                     ["ckpt-4.index", "ckpt-5.index"])
    # And restore_latest reads what it wrote.
    bias.assign(tf.zeros(bias.shape))
    self.assertEqual(checkpoints.restore_latest(directory, model,
                                                optimizer), 5)
    self.assertAllEqual(bias, np.full(bias.shape, 4.0))

  def test_samples_recorded_next_to_each_checkpoint_and_dropped_with_it(self):
    # optimizer.iterations cannot say how far training got across modes
    # (async counts local batches), so each save may record the samples.
    model, optimizer = _dense_and_adam()
    directory = os.path.join(self.get_temp_dir(), "progress")
    self.assertEqual(checkpoints.restored_samples(directory), 0)
    manager = checkpoints.CheckpointManager(directory, model, optimizer,
                                            max_to_keep=2)
    # Sync wrote 350 global steps of 1,024; then async, counting local
    # batches of 256 from there, 1,200 more: 350 x 1,024 + 1,200 x 256.
    manager.save(350, samples=358_400)
    self.assertEqual(checkpoints.restored_samples(directory), 358_400)
    manager.save(1_550, samples=665_600)
    self.assertEqual(checkpoints.restored_samples(directory), 665_600)
    # Saved without the record (as before it existed): unknown.
    manager.save(1_600)
    self.assertIsNone(checkpoints.restored_samples(directory))
    # The oldest checkpoint went, and its record with it.
    self.assertEqual(sorted(f for f in os.listdir(directory)
                            if f.endswith(".progress.json")),
                     ["ckpt-1550.progress.json"])

  def test_non_chief_writes_and_keeps_nothing(self):
    # A MultiWorkerMirroredStrategy worker other than the chief must take
    # part in every write, then keep nothing: no file in the directory, no
    # temporary directory left behind.
    model, optimizer = _dense_and_adam()
    directory = os.path.join(self.get_temp_dir(), "non_chief")
    scratch = tempfile.gettempdir()
    before = set(glob.glob(os.path.join(scratch, "gba_ckpt_*")))
    manager = checkpoints.CheckpointManager(directory, model, optimizer,
                                            is_chief=False)
    self.assertEqual(manager.save(3), os.path.join(directory, "ckpt-3"))
    manager.save(4)
    self.assertEqual(manager.traces, 1)  # it really wrote, through one trace
    self.assertFalse(os.path.exists(directory))
    self.assertEqual(set(glob.glob(os.path.join(scratch, "gba_ckpt_*"))),
                     before)

  def test_traces_again_when_the_optimizer_gains_variables(self):
    model, _ = self._gba_model(testing_utils.shared_cluster())
    optimizer = tf.keras.optimizers.Adam(0.01)  # not built: no slots yet
    directory = os.path.join(self.get_temp_dir(), "growing")
    manager = checkpoints.CheckpointManager(directory, model, optimizer)
    manager.save(0)
    optimizer.build(model.trainable_variables)
    manager.save(1)
    # The second write was traced anew (a second function: 2 traces in
    # all, and no more on a third save) and holds the slots: Adam's m and v
    # for each of the 5 weights (embedding table, hidden kernel and bias,
    # output kernel and bias) = 10. The first checkpoint, written before the
    # build, has none.
    self.assertEqual(manager.traces, 2)
    manager.save(2)
    self.assertEqual(manager.traces, 2)
    slots = lambda path: [k for k in _tensors(path)
                          if k.startswith("optimizer/_variables/")]
    self.assertEmpty(slots(os.path.join(directory, "ckpt-0")))
    self.assertLen(slots(os.path.join(directory, "ckpt-1")), 10)

  def test_repeated_saves_leave_parameter_server_memory_flat(self):
    # TF's own eager save keeps every save's traced function on every PS;
    # the leak grows with the number of variables (this 50-layer tower: 100
    # variables, 200 Adam slots over 2 PS). The measure is each PS's median
    # growth of resident memory per save, after a warm-up (measured here:
    # +24 MiB over the first 10 saves, then about 0.005 MiB per save, with
    # a rare 8 MiB allocator step that a median ignores and a steady leak
    # does not). The same measure over eager saves is the control: it must
    # see their leak, or the bound proves nothing.
    testing_utils.collect_before_switching_cluster()
    with local_cluster.LocalCluster(num_workers=1, num_ps=2) as cluster:
      strategy = gba_tf.GBAStrategy(
          cluster.resolver(),
          gba_tf.GBAConfig(global_batch_size=32, local_batch_size=16))
      with strategy.scope():
        model = tf.keras.Sequential(
            [tf.keras.layers.Dense(4) for _ in range(50)])
        model.build((None, 4))
        optimizer = tf.keras.optimizers.Adam(0.01)
        checkpoints.restore_latest("", model, optimizer)
      manager = checkpoints.CheckpointManager(
          os.path.join(self.get_temp_dir(), "soak"), model, optimizer)
      eager = tf.train.Checkpoint(model=model, optimizer=optimizer)
      testing_utils.keep_alive(strategy, model, optimizer, manager, eager)
      pids = [cluster.processes[f"ps:{i}"].pid for i in range(2)]
      eager_dir = os.path.join(self.get_temp_dir(), "eager")

      def growth_per_save(save, first, warmup, count):
        for step in range(first, first + warmup):  # tracing, threads
          save(step)
        samples = []
        for step in range(first + warmup, first + warmup + count + 1):
          save(step)
          samples.append([local_cluster.resident_mib(pid) for pid in pids])
        return np.median(np.diff(np.asarray(samples), axis=0), axis=0)

      traced = growth_per_save(manager.save, 0, 15, 30)
      leaky = growth_per_save(
          lambda step: eager.write(f"{eager_dir}/ckpt-{step}"), 100, 3, 10)
    self.assertEqual(manager.traces, 1)
    bound = 0.1  # MiB per save and PS
    for mib in traced:
      self.assertLess(mib, bound, f"PS MiB per traced save: {traced}")
    # The control: the same measure sees the eager leak. It is asserted
    # where TF puts most of it, the PS that grows most, and there 10x above
    # the bound: how the leak splits over the PS is TF's business, not this
    # test's (one PS grows ~2.5 MiB per eager save; the other 0.19-0.27 in
    # some runs, ~3 MiB in others), so a per-PS control flaked. Without
    # a leak (the control saving through `manager.save`) every PS measures
    # ~0.005 and this fails.
    self.assertGreater(max(leaky), 10 * bound,
                       f"PS MiB per eager save: {leaky}")

if __name__ == "__main__":
  tf.test.main()
