"""A model trained under GBA exports a SavedModel that plain TF serves."""

import os
import subprocess
import sys

import numpy as np

import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf

from gba_tf import models
from gba_tf.data import synthetic
from tests import testing_utils

# Run in a fresh interpreter with TensorFlow only: no gba_tf, no tf_keras
# switch, no cluster. Prints the served logits of the ids in argv[2].
_SERVE = """
import sys
import numpy as np
import tensorflow as tf
assert "gba_tf" not in sys.modules
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
if sys.argv[2] == "-":
  # Four rows of small ids, shaped as the signature asks.
  width = serve.structured_input_signature[1]["ids"].shape[1]
  ids = np.arange(4 * width).reshape(4, width) % 7
else:
  ids = np.load(sys.argv[2])
logits = serve(ids=tf.constant(ids, tf.int64))["logits"]
np.save(sys.argv[3], logits.numpy())
"""


def serve_in_fresh_process(test, export_dir, ids=None):
  """Logits of `ids` from the SavedModel, computed by a fresh process.

  `ids=None`: four rows of small ids, as wide as the signature's input.
  """
  tmp = test.get_temp_dir()
  ids_path = "-"
  out_path = os.path.join(tmp, "logits.npy")
  if ids is not None:
    ids_path = os.path.join(tmp, "ids.npy")
    np.save(ids_path, ids)
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
  proc = subprocess.run(
      [sys.executable, "-c", _SERVE, export_dir, ids_path, out_path],
      cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
  test.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
  return np.load(out_path)


class ExportTest(tf.test.TestCase):

  def test_sharded_model_serves_the_same_predictions_without_gba(self):
    strategy = gba_tf.GBAStrategy(
        testing_utils.shared_cluster().resolver(),
        gba_tf.GBAConfig(global_batch_size=8, local_batch_size=4),
        variable_partitioner=testing_utils.two_shards())
    with strategy.scope():
      model = models.embedding_mlp(8, 20, hidden=(4,))
      model.compile(tf.keras.optimizers.Adagrad(0.5),
                    tf.keras.losses.BinaryCrossentropy(from_logits=True))
    table = model.layers[1].embeddings
    # The embedding really is split over both PS tasks.
    self.assertIsInstance(table, tf.__internal__.distribute.ShardedVariable)
    self.assertLen({v.device for v in table.variables}, 2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (64, 8))
    labels = rng.integers(0, 2, 64).astype(np.float32)
    before = tf.convert_to_tensor(table).numpy()
    model.fit(tf.keras.utils.experimental.DatasetCreator(
        synthetic.dataset_fn(ids, labels, 4)), epochs=1, steps_per_epoch=8,
              verbose=0)
    self.assertNotAllClose(before, tf.convert_to_tensor(table).numpy())

    export_dir = os.path.join(self.get_temp_dir(), "model", "1")
    self.assertEqual(gba_tf.export.export_saved_model(model, export_dir),
                     export_dir)
    want = model(tf.constant(ids[:16]), training=False).numpy()
    got = serve_in_fresh_process(self, export_dir, ids[:16])
    self.assertEqual(got.shape, (16, 1))
    self.assertAllClose(got, want, atol=1e-6)
    # Not a constant function: different ids, different logits.
    self.assertGreater(np.ptp(got), 0.0)

    with self.assertRaisesRegex(ValueError, "Received: export_dir=.*not empty"):
      gba_tf.export.export_saved_model(model, export_dir)


if __name__ == "__main__":
  tf.test.main()
