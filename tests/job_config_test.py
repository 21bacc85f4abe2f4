"""TF_CONFIG and flags resolve into a JobConfig; errors reach the user as
one line (the table of bad inputs is `tests/bad_input_test.py`).
"""

import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import parameterized
import tensorflow as tf

from gba_tf.data import synthetic
from gba_tf.launch import flags as gba_flags
from gba_tf.launch import job_config
from gba_tf.launch import job_data
from gba_tf.launch import tasks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

_GBA_CLUSTER = {"chief": ["localhost:1"], "worker": ["localhost:2",
                                                    "localhost:3"],
                "ps": ["localhost:4"]}


def _tf_config(cluster_spec, task_type="worker", index=0):
  return json.dumps({"cluster": cluster_spec,
                     "task": {"type": task_type, "index": index}})


class ParseTFConfigTest(parameterized.TestCase):

  def test_valid_configs(self):
    task = tasks.parse_tf_config(_tf_config(_GBA_CLUSTER, "ps", 0), "gba")
    self.assertEqual((task.task_type, task.task_index, task.num_workers),
                     ("ps", 0, 2))
    self.assertFalse(task.is_chief)
    self.assertTrue(tasks.parse_tf_config(
        _tf_config(_GBA_CLUSTER, "chief", 0), "gba").is_chief)
    sync = tasks.parse_tf_config(
        _tf_config({"worker": ["localhost:1", "localhost:2"]}, "worker", 0),
        "sync")
    self.assertTrue(sync.is_chief)
    # No TF_CONFIG: a single local sync worker.
    self.assertTrue(tasks.parse_tf_config(None, "sync").is_chief)


class JobConfigFromFlagsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if "train_steps" not in FLAGS:
      gba_flags.define_flags()

  def _config(self, *argv, mode="gba", cluster_spec=None):
    FLAGS.unparse_flags()
    FLAGS(["train.py"] + list(argv))
    task = tasks.TaskConfig(cluster_spec or _GBA_CLUSTER, "chief", 0)
    return job_config.config_from_flags(task, mode)

  def tearDown(self):
    FLAGS.unparse_flags()
    super().tearDown()

  def test_resolves_from_tf_config(self):
    config = self._config("--local_batch_size=64", "--model_dir=/tmp/x")
    # 2 workers in TF_CONFIG x 64 = global batch 128, M = 2.
    self.assertEqual((config.num_workers, config.num_ps), (2, 1))
    self.assertEqual(config.global_batch_size, 128)
    self.assertEqual(config.gba.num_aggregate, 2)
    sync = self._config("--global_batch_size=512", "--local_batch_size=64",
                        mode="sync",
                        cluster_spec={"worker": ["h:1", "h:2"]})
    self.assertEqual(sync.global_batch_size, 512)


  def test_max_staleness_zero_is_kept_for_bounded_staleness(self):
    # --max_staleness=0 drops every stale gradient; it used to become the
    # preset's default 4 (`FLAGS.max_staleness or 4`).
    zero = self._config("--preset=bounded_staleness", "--max_staleness=0")
    self.assertEqual(zero.gba.max_staleness, 0)
    self.assertEqual(zero.gba.name, "bounded_staleness")
    default = self._config("--preset=bounded_staleness")
    self.assertEqual(default.gba.max_staleness, 4)

  def test_vocab_per_field_sizes_the_synthetic_data(self):
    self.assertEqual(self._config().vocab_per_field, 12_500)
    config = self._config("--vocab_per_field=500", "--train_examples=3000",
                          "--test_examples=1000")
    data = job_data.load_data(config)
    # 8 fields x 500 ids; every field's ids are its own range.
    self.assertEqual(data.vocab_size, 4_000)
    self.assertLess(data.train_ids.max(), 4_000)
    self.assertEqual(set(data.train_ids[:, 1] // 500), {1})
    self.assertEqual(data.best_auc, synthetic.SyntheticCTR(
        vocab_per_field=500, seed=0).best_auc())

  def test_normalize_flag_reaches_the_gba_config(self):
    self.assertEqual(self._config().gba.normalize, "global_batch")
    self.assertEqual(self._config("--normalize=weights").gba.normalize,
                     "weights")

  def test_checkpoint_every_loop_and_its_deprecated_alias(self):
    self.assertTrue(self._config().checkpoint_every_loop)
    self.assertFalse(
        self._config("--nocheckpoint_every_loop").checkpoint_every_loop)
    with self.assertLogs(level="WARNING") as logs:
      self.assertFalse(self._config("--nobackup").checkpoint_every_loop)
    self.assertIn("--backup is deprecated", "\n".join(logs.output))


class TrainBinaryErrorTest(tf.test.TestCase):

  def test_one_line_error_and_exit_code_2(self):
    env = dict(os.environ, TF_CONFIG='{"cluster": {"worker": ',
               TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "scripts", "train.py"),
         "--mode=gba", f"--model_dir={self.get_temp_dir()}"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    self.assertRegex(last, r"^train\.py: error: Received: TF_CONFIG=.*not "
                     r"valid JSON")
    self.assertNotIn("Traceback", proc.stderr)
    # Nothing was written into the model directory.
    self.assertEqual(os.listdir(self.get_temp_dir()), [])

  def test_bad_enum_flag(self):
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "scripts", "train.py"),
         "--mode=turbo"], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True, text=True, timeout=120, check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertRegex(proc.stderr, r"--mode=turbo.*one of")
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  tf.test.main()
