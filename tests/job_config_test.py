"""Bad TF_CONFIG and bad flags give one clear line naming the value.

Validated before any server starts or any checkpoint is touched, so nothing
already trained is at risk. The last test runs `scripts/train.py` itself to
check that the user sees exactly one line and exit code 2.
"""

import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import parameterized
import tensorflow as tf

from gba_tf import cluster
from gba_tf import flags as gba_flags
from gba_tf import job

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
    task = cluster.parse_tf_config(_tf_config(_GBA_CLUSTER, "ps", 0), "gba")
    self.assertEqual((task.task_type, task.task_index, task.num_workers),
                     ("ps", 0, 2))
    self.assertFalse(task.is_chief)
    self.assertTrue(cluster.parse_tf_config(
        _tf_config(_GBA_CLUSTER, "chief", 0), "gba").is_chief)
    sync = cluster.parse_tf_config(
        _tf_config({"worker": ["localhost:1", "localhost:2"]}, "worker", 0),
        "sync")
    self.assertTrue(sync.is_chief)
    # No TF_CONFIG: a single local sync worker.
    self.assertTrue(cluster.parse_tf_config(None, "sync").is_chief)

  @parameterized.named_parameters(
      ("malformed_json", '{"cluster": {"worker": ', "gba",
       r"TF_CONFIG='\{\"cluster\": \{\"worker\": ', which is not valid JSON"),
      ("not_an_object", "[1, 2]", "gba", "without a 'cluster' object"),
      ("unset_in_gba", "", "gba", "TF_CONFIG unset; --mode=gba"),
      ("no_ps_in_gba",
       _tf_config({"chief": ["h:1"], "worker": ["h:2"]}, "chief"), "gba",
       "no 'ps' tasks; --mode=gba needs at least one"),
      ("no_chief_in_async",
       _tf_config({"worker": ["h:2"], "ps": ["h:3"]}, "worker"), "async",
       "0 'chief' tasks; --mode=async"),
      ("ps_in_sync", _tf_config({"worker": ["h:2"], "ps": ["h:3"]}), "sync",
       "1 'ps' task.*--mode=sync"),
      ("unknown_task_type", _tf_config(_GBA_CLUSTER, "evaluator", 0), "gba",
       "task type 'evaluator', which is not one of"),
      ("unknown_job", _tf_config({"trainer": ["h:1"]}, "trainer"), "sync",
       "cluster job 'trainer'"),
      ("index_out_of_range", _tf_config(_GBA_CLUSTER, "worker", 2), "gba",
       "task index 2 for 'worker', but the cluster has 2 worker task"),
      ("negative_index", _tf_config(_GBA_CLUSTER, "worker", -1), "gba",
       "task index -1"),
      ("bad_address", _tf_config({"worker": ["localhost"]}), "sync",
       r"cluster\['worker'\]=\['localhost'\]"),
  )
  def test_bad_tf_config(self, text, mode, message):
    with self.assertRaisesRegex(ValueError, message):
      cluster.parse_tf_config(text, mode)


class JobConfigFromFlagsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if "train_steps" not in FLAGS:
      gba_flags.define_flags()

  def _config(self, *argv, mode="gba", cluster_spec=None):
    FLAGS.unparse_flags()
    FLAGS(["train.py"] + list(argv))
    task = cluster.TaskConfig(cluster_spec or _GBA_CLUSTER, "chief", 0)
    return job.config_from_flags(task, mode)

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

  @parameterized.named_parameters(
      ("global_not_multiple", ["--global_batch_size=100",
                               "--local_batch_size=64"], "gba",
       "global_batch_size=100, which is not a multiple of "
       "local_batch_size=64"),
      ("sync_global_not_divisible", ["--global_batch_size=96",
                                     "--local_batch_size=32"], "sync",
       "global_batch_size=96, which is not a multiple of the 5 sync"),
      ("workers_disagree", ["--workers=4"], "gba",
       "--workers=4, but TF_CONFIG has 2 worker"),
      ("straggler_format", ["--straggler=fast"], "gba",
       "straggler='fast', which is not INDEX:SLOWDOWN"),
      ("straggler_index", ["--straggler=7:4"], "gba",
       "--straggler=7:4, but there are only 2 workers"),
      ("straggler_speedup", ["--straggler=1:0.5"], "gba",
       "straggler='1:0.5'; need INDEX >= 0 and SLOWDOWN >= 1"),
      ("train_steps", ["--train_steps=0"], "gba", "--train_steps=0"),
      ("learning_rate", ["--learning_rate=-0.1"], "gba",
       "--learning_rate=-0.1"),
      ("step_ms", ["--step_ms=-5"], "gba", "--step_ms=-5.0"),
      ("decay_rate", ["--decay_rate=1.5"], "gba", "decay_rate=1.5"),
  )
  def test_bad_flags(self, argv, mode, message):
    spec = (_GBA_CLUSTER if mode != "sync" else
            {"worker": [f"h:{i}" for i in range(5)]})
    with self.assertRaisesRegex(ValueError, message):
      self._config(*argv, mode=mode, cluster_spec=spec)


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
