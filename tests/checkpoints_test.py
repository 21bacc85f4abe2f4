"""Checkpoints restore exactly across modes: GBA -> sync -> GBA.

GBA runs on the shared in-process cluster (embedding table and dense kernel
sharded over 2 PS); sync runs under MirroredStrategy, whose mirrored
variables and checkpoint layout are those of MultiWorkerMirroredStrategy
with one worker. Exactness is checked on the checkpoint files themselves:
restoring checkpoint A and saving again must give a checkpoint whose every
tensor (weights, Adam slots, `iterations`) equals A's; a slot restored wrong
or left at its initial value would differ.
"""

import numpy as np
import tensorflow as tf

import gba_tf
from gba_tf import models
from gba_tf import checkpoints
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


if __name__ == "__main__":
  tf.test.main()
