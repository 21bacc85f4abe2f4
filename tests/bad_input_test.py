"""Bad input, one table: every case fails early with one line naming the value.

Config values, TF_CONFIG, flags and flagfiles, dataset element shapes and
dtypes, an unsupported optimizer, a global batch that does not divide: each
raises `ValueError` before any server starts or any variable changes. The
last tests show that rejected input (refused up front, or NaN gradients
refused on the PS while `model.fit` runs) leaves an already-trained model
as it was, and that the training binary prints exactly one line.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import gba_tf
from gba_tf import models
from gba_tf import switching
from gba_tf.data import movielens
from gba_tf.data import synthetic
from gba_tf.launch import flags as gba_flags
from gba_tf.launch import job_config
from gba_tf.launch import tasks
from tests import testing_utils

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
_GBA = {"chief": ["h:1"], "worker": ["h:2", "h:3"], "ps": ["h:4"]}


def _tf_config(spec, task_type="worker", index=0):
  return json.dumps({"cluster": spec, "task": {"type": task_type,
                                               "index": index}})


def _job_config(*argv, mode="gba", spec=None):
  """config_from_flags for `argv` against a TF_CONFIG cluster `spec`."""
  if "train_steps" not in FLAGS:
    gba_flags.define_flags()
  FLAGS.unparse_flags()
  try:
    FLAGS(["train.py"] + list(argv))
    return job_config.config_from_flags(
        tasks.TaskConfig(spec or _GBA, "chief", 0), mode)
  finally:
    FLAGS.unparse_flags()


def _flagfile(text):
  path = os.path.join(tempfile.mkdtemp(), "job.cfg")
  with open(path, "w") as f:
    f.write(text)
  return path


def _v1_optimizer_step():
  strategy = gba_tf.GBAStrategy(
      testing_utils.shared_cluster().resolver(),
      gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1))
  coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
  with strategy.scope():
    v = tf.Variable(1.0)
  optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)

  @tf.function
  def step():
    def replica_fn():
      optimizer.apply_gradients([(tf.constant(1.0), v)])
    strategy.run(replica_fn)

  coordinator.schedule(step).fetch()


_IDS = np.zeros((4, 8), np.int64)
_LABELS = np.zeros(4, np.float32)

# (name, call, message the ValueError must contain)
_CASES = [
    # Config values.
    ("global_batch_not_multiple",
     lambda: gba_tf.GBAConfig(global_batch_size=100, local_batch_size=64),
     "global_batch_size=100, which is not a multiple of local_batch_size=64"),
    ("negative_local_batch",
     lambda: gba_tf.GBAConfig(local_batch_size=-8), "local_batch_size=-8"),
    ("unknown_decay", lambda: gba_tf.GBAConfig(decay="cosine"),
     "decay='cosine'"),
    ("decay_rate_above_one", lambda: gba_tf.GBAConfig(decay_rate=1.5),
     "decay_rate=1.5"),
    ("unknown_preset",
     lambda: gba_tf.GBAConfig.preset("hogwild", local_batch_size=8),
     "preset='hogwild'"),
    ("health_window", lambda: switching.HealthMonitor(2, window=0), "window=0"),
    # TF_CONFIG.
    ("tf_config_malformed",
     lambda: tasks.parse_tf_config('{"cluster": ', "gba"),
     "not valid JSON"),
    ("tf_config_no_ps",
     lambda: tasks.parse_tf_config(
         _tf_config({"chief": ["h:1"], "worker": ["h:2"]}, "chief"), "gba"),
     "no 'ps' tasks; --mode=gba needs at least one"),
    ("tf_config_unknown_task",
     lambda: tasks.parse_tf_config(_tf_config(_GBA, "evaluator"), "gba"),
     "task type 'evaluator'"),
    ("tf_config_index_out_of_range",
     lambda: tasks.parse_tf_config(_tf_config(_GBA, "worker", 5), "gba"),
     "task index 5 for 'worker', but the cluster has 2"),
    ("tf_config_not_an_object",
     lambda: tasks.parse_tf_config("[1, 2]", "gba"),
     "without a 'cluster' object"),
    ("tf_config_unset_in_gba", lambda: tasks.parse_tf_config("", "gba"),
     "TF_CONFIG unset; --mode=gba"),
    ("tf_config_no_chief_in_async",
     lambda: tasks.parse_tf_config(
         _tf_config({"worker": ["h:2"], "ps": ["h:3"]}), "async"),
     "0 'chief' tasks; --mode=async"),
    ("tf_config_ps_in_sync",
     lambda: tasks.parse_tf_config(
         _tf_config({"worker": ["h:2"], "ps": ["h:3"]}), "sync"),
     "1 'ps' task(s); --mode=sync"),
    ("tf_config_unknown_job",
     lambda: tasks.parse_tf_config(
         _tf_config({"trainer": ["h:1"]}, "trainer"), "sync"),
     "cluster job 'trainer'"),
    ("tf_config_negative_index",
     lambda: tasks.parse_tf_config(_tf_config(_GBA, "worker", -1), "gba"),
     "task index -1"),
    ("tf_config_bad_address",
     lambda: tasks.parse_tf_config(_tf_config({"worker": ["localhost"]}),
                                     "sync"),
     "cluster['worker']=['localhost']"),
    # Flags and flagfiles.
    ("flags_straggler_format", lambda: _job_config("--straggler=fast"),
     "straggler='fast', which is not INDEX:SLOWDOWN"),
    ("flags_straggler_speedup", lambda: _job_config("--straggler=1:0.5"),
     "straggler='1:0.5'; need INDEX >= 0 and a finite SLOWDOWN >= 1"),
    ("flags_learning_rate", lambda: _job_config("--learning_rate=-0.1"),
     "--learning_rate=-0.1"),
    ("flags_step_ms", lambda: _job_config("--step_ms=-5"), "--step_ms=-5.0"),
    ("flags_vocab_per_field", lambda: _job_config("--vocab_per_field=0"),
     "--vocab_per_field=0"),
    ("flags_decay_rate", lambda: _job_config("--decay_rate=1.5"),
     "decay_rate=1.5"),
    ("flags_global_not_divisible_by_sync_workers",
     lambda: _job_config("--global_batch_size=96", "--local_batch_size=32",
                         mode="sync", spec={"worker": ["h:1"] * 5}),
     "global_batch_size=96, which is not a multiple of the 5 sync workers"),
    ("flags_workers_disagree_with_tf_config",
     lambda: _job_config("--workers=8"), "--workers=8, but TF_CONFIG has 2"),
    ("flags_straggler_out_of_range",
     lambda: _job_config("--straggler=3:4"),
     "--straggler=3:4, but there are only 2 workers"),
    ("flags_second_straggler_out_of_range",
     lambda: _job_config("--straggler=1:2,3:4"),
     "--straggler=1:2,3:4, but there are only 2 workers"),
    ("flags_straggler_named_twice",
     lambda: _job_config("--straggler=1:2,1:3"),
     "straggler='1:2,1:3', which names worker 1 twice"),
    ("flags_straggler_list_format",
     lambda: _job_config("--straggler=1:2;0:3"),
     "straggler='1:2;0:3', which is not INDEX:SLOWDOWN"),
    ("flags_nonfinite_worker_out_of_range",
     lambda: _job_config("--inject_nonfinite_worker=2"),
     "--inject_nonfinite_worker=2, but there are only 2 workers"),
    ("flagfile_bad_value",
     lambda: _job_config("--flagfile=" + _flagfile("--train_steps=-3\n")),
     "--train_steps=-3"),
    ("flagfile_global_not_multiple",
     lambda: _job_config("--flagfile=" + _flagfile(
         "--local_batch_size=48\n--global_batch_size=100\n")),
     "global_batch_size=100, which is not a multiple of local_batch_size=48"),
    # Dataset elements.
    ("dataset_float_ids",
     lambda: synthetic.validate_examples(_IDS.astype(np.float32), _LABELS),
     "ids of dtype float32"),
    ("dataset_wrong_rank",
     lambda: synthetic.validate_examples(_IDS[:, 0], _LABELS),
     "ids of dtype int64 and shape (4,)"),
    ("dataset_wrong_field_count",
     lambda: synthetic.validate_examples(_IDS[:, :7], _LABELS, 8),
     "shape (4, 7); expected integer ids [n, 8]"),
    ("dataset_label_count",
     lambda: synthetic.validate_examples(_IDS, _LABELS[:3]),
     "labels of dtype float32 and shape (3,)"),
    ("dataset_string_labels",
     lambda: synthetic.validate_examples(_IDS, np.array(["1"] * 4)),
     "labels of dtype <U1"),
    ("dataset_id_outside_vocab",
     lambda: synthetic.validate_examples(_IDS + 10, _LABELS, 8, 10),
     "ids in [10, 10], outside the vocabulary [0, 10)"),
    ("movielens_split", lambda: movielens.load("/nonexistent", 0.0),
     "test_fraction=0.0"),
    # Unsupported optimizer.
    ("tf1_optimizer", _v1_optimizer_step,
     "optimizer=GradientDescentOptimizer, a TF1"),
]


class BadInputTest(parameterized.TestCase, tf.test.TestCase):

  def test_table_is_large_enough(self):
    self.assertGreaterEqual(len(_CASES), 15)

  @parameterized.named_parameters(*_CASES)
  def test_rejected_with_the_value_named(self, call, message):
    with self.assertRaises(ValueError) as caught:
      call()
    # One line names the value and what was expected. An error raised while
    # tf.function traces user code arrives under autograph's "in user code"
    # frames; its last line is that one line. Any other must be one line.
    text = str(caught.exception).strip()
    if "in user code:" in text:
      text = text.splitlines()[-1].strip()
      self.assertStartsWith(text, "ValueError: ")
    self.assertNotIn("\n", text)
    self.assertIn(message, text)
    self.assertIn("Received", text)

  def test_rejected_input_keeps_what_was_trained(self):
    # Train 4 local steps (2 global) under GBA. Then (1) building a dataset
    # whose ids are floats is refused before anything runs, and (2)
    # `model.fit` on data whose labels are NaN runs 4 local steps whose
    # gradients are all NaN: each is rejected on the PS before aggregation.
    # Both times the trained weights and `iterations` are as they were.
    # (Without the PS-side check, (2) would turn every weight into NaN.)
    strategy = gba_tf.GBAStrategy(
        testing_utils.shared_cluster().resolver(),
        gba_tf.GBAConfig(global_batch_size=8, local_batch_size=4))
    with strategy.scope():
      model = models.embedding_mlp(8, 20, hidden=(4,))
      model.compile(tf.keras.optimizers.SGD(0.5),
                    tf.keras.losses.BinaryCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (64, 8))
    labels = rng.integers(0, 2, 64).astype(np.float32)
    model.fit(tf.keras.utils.experimental.DatasetCreator(
        synthetic.dataset_fn(ids, labels, 4)), epochs=1, steps_per_epoch=4,
              verbose=0)
    trained = [w.copy() for w in model.get_weights()]
    self.assertEqual(int(model.optimizer.iterations.numpy()), 2)
    self.assertGreater(max(np.abs(w).max() for w in trained), 0.0)
    with self.assertRaisesRegex(ValueError, "ids of dtype float64"):
      synthetic.dataset_fn(ids.astype(np.float64), labels, 4)

    def nan_labels(input_context):
      del input_context
      return tf.data.Dataset.from_tensor_slices(
          (ids, np.full((64, 1), np.nan, np.float32))).batch(4).repeat()

    model.fit(tf.keras.utils.experimental.DatasetCreator(nan_labels),
              epochs=1, steps_per_epoch=4, verbose=0)
    self.assertEqual(strategy.gba_metrics()["nonfinite"], 4)
    for before, after in zip(trained, model.get_weights()):
      self.assertAllEqual(before, after)
    self.assertEqual(int(model.optimizer.iterations.numpy()), 2)

  def test_training_binary_prints_one_line(self):
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "scripts", "train.py"),
         "--mode=sync", "--global_batch_size=100", "--local_batch_size=64"],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True,
        text=True, timeout=120, check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertEqual(
        proc.stderr.strip().splitlines()[-1],
        "train.py: error: Received: global_batch_size=100, which is not a "
        "multiple of local_batch_size=64.")


if __name__ == "__main__":
  tf.test.main()
