"""Faults injected into real processes through the local launcher.

A GBA job (2 workers + 1 PS + chief, `configs/local_gba.cfg`) runs in the
background; the test reads the task PIDs from `<model_dir>/tasks.json` and
SIGKILLs one once training is under way (the chief has printed a given
Keras epoch), then checks what the job wrote.
"""

import glob
import json
import os
import shutil
import time
import warnings

import pytest

import gba_tf
import tensorflow as tf

from tests import sockets
from tests import testing_utils

# Every run: 240 optimizer steps of 2 local steps, 20 ms each, in loops of
# 40 steps (one checkpoint per loop).
_ARGS = ["--mode=gba", "--train_steps=240", "--steps_per_loop=40",
         "--eval_examples=0"]


_read = testing_utils.read_job_file


def _job(test, model_dir, *extra):
  return testing_utils.LaunchedJob(test, model_dir, *_ARGS, *extra)


def _assert_conserved(test, gba, max_lost=0):
  # No global step applied twice: every pushed gradient is applied, dropped,
  # pending (landed, counted by the aggregator) or lost (its push died
  # half-way: at most one per killed worker), and steps apply exactly M = 2.
  test.assertEqual(gba["pushed"], gba["applied"] + gba["dropped"]
                   + gba["pending"] + gba["lost"])
  test.assertBetween(gba["lost"], 0, max_lost)
  test.assertEqual(gba["applied"], 2 * gba["global_steps"])


@pytest.mark.cluster
class FaultsTest(tf.test.TestCase):

  def test_worker_killed_and_restarted(self):
    # TensorFlow's recovery of the restarted worker (ClusterCoordinator
    # updates its server def while the healthy worker's closures run) has
    # been seen to segfault the chief, in 1 CI run of this test. The
    # launcher then restarts the phase from its last checkpoint (checked
    # here and in test_chief_killed_resumes_from_last_checkpoint), but the
    # resumed phase's counters no longer hold the 800 pushes asserted
    # below: the scenario runs once more, and a second crash fails.
    for run in range(2):
      model_dir = testing_utils.temp_dir(self, "gba_kill_worker_")
      # 400 steps: time for the restarted worker (a fresh TF process) to
      # rejoin and train.
      job = _job(self, model_dir, "--train_steps=400")
      job.wait_for("[chief:0] Epoch 2/")
      # Every task's gRPC server listens on loopback only.
      with open(os.path.join(model_dir, "tasks.json")) as f:
        for name, pid in json.load(f).items():
          listening = sockets.listening_sockets_of(pid)
          self.assertNotEmpty(listening, name)
          self.assertEqual({a for a, _ in listening}, {"127.0.0.1"}, name)
      job.kill("worker:1")
      self.assertEqual(job.finish(), 0, job.excerpt())
      self.assertIn("[launcher] worker:1 exited with code -9; restarting it",
                    job.output)
      if "[launcher] the chief was killed by signal" not in job.output:
        break
      self.assertEqual(_read(model_dir, "result.json")["optimizer_steps"],
                       400)
      # In pytest's warnings summary, where a passing run shows it too.
      warnings.warn(f"run {run}: the chief crashed and the job resumed; "
                    f"running again:\n{job.excerpt()}")
    else:
      self.fail("the chief crashed in both runs")
    phase = _read(model_dir, "phases.jsonl")[-1]
    gba = phase["gba"]
    _assert_conserved(self, gba, max_lost=1)
    self.assertEqual(_read(model_dir, "result.json")["optimizer_steps"],
                     gba["global_steps"])
    # At least once: the killed worker's in-flight step may be pushed again
    # by another worker, never lost. One closure is in flight per worker and
    # each is one local step (no steps_per_execution), so at most one push
    # of the 800 scheduled local steps is repeated.
    self.assertGreaterEqual(gba["pushed"], 800)
    self.assertLessEqual(gba["pushed"], 800 + 1)
    # The restarted worker trained on: its last gradient carried a token
    # read near the end (fresh tokens, not one from before the kill), and
    # no gradient in the job was staler than a few steps.
    self.assertGreater(gba["worker_last_token"][1],
                       gba["global_steps"] - 20)
    worst = max(t for t, n in enumerate(gba["staleness_histogram"]) if n)
    self.assertLessEqual(worst, 6)

  def test_worker_killed_without_restart(self):
    model_dir = testing_utils.temp_dir(self, "gba_lose_worker_")
    job = _job(self, model_dir, "--norestart_tasks")
    job.wait_for("[chief:0] Epoch 2/")
    job.kill("worker:1")
    self.assertEqual(job.finish(), 0, job.excerpt())
    self.assertIn("worker:1 exited with code -9; training goes on without it",
                  job.output)
    gba = _read(model_dir, "phases.jsonl")[-1]["gba"]
    _assert_conserved(self, gba, max_lost=1)
    self.assertGreaterEqual(gba["pushed"], 480)
    self.assertLessEqual(gba["pushed"], 480 + 1)  # as above
    # Worker 0 did the rest alone.
    self.assertGreater(gba["worker_pushed"][0], 240)
    self.assertLess(gba["worker_last_token"][1], gba["global_steps"] - 20)

  def test_ps_killed_resumes_from_last_checkpoint(self):
    model_dir = testing_utils.temp_dir(self, "gba_kill_ps_")
    # Adam: its slots (m, v) live on the PS next to the variables and must
    # come back with them.
    job = _job(self, model_dir, "--optimizer=adam", "--learning_rate=0.01",
               "--verify_restore")
    # Kill the PS in loop 3, once the checkpoint of loop 2 (step 80) is
    # the latest: the next one (step 120) is a loop of training away.
    job.wait_for("[chief:0] Epoch 3/")
    ckpt_dir = os.path.join(model_dir, "ckpt")
    deadline = time.monotonic() + 60
    while not (tf.train.latest_checkpoint(ckpt_dir) or "").endswith("-80"):
      self.assertLess(time.monotonic(), deadline, job.excerpt())
      time.sleep(0.01)
    latest = tf.train.latest_checkpoint(ckpt_dir)
    job.kill("ps:0")
    # A copy: the resumed job writes newer checkpoints and deletes old ones.
    # (Files of a checkpoint are never rewritten, only deleted later.)
    kept = testing_utils.temp_dir(self, "gba_kept_ckpt_")
    for path in glob.glob(latest + ".*"):
      shutil.copy(path, kept)
    last_before_kill = os.path.join(kept, os.path.basename(latest))
    self.assertEqual(job.finish(), 0, job.excerpt())
    self.assertIn("lost a parameter server", job.output)
    # The PS is not restarted in place (a fresh, empty PS on the same port
    # would race the chief's detection): the next phase starts a new one.
    # (Whether the launcher logs the PS's exit before the chief's 76 is a
    # race of its own and not asserted.)
    self.assertNotIn("ps:0 exited with code -9; restarting it", job.output)
    self.assertIn("restarting the phase from the last checkpoint",
                  job.output)
    launch = _read(model_dir, "launch.json")
    self.assertEqual([p["exit_code"] for p in launch["phases"]], [76, 0])
    phase = _read(model_dir, "phases.jsonl")[-1]
    # Resumed from the last checkpoint written before the kill (step 80):
    # the kill came before the next one, so less than one loop was lost.
    step = int(last_before_kill.rsplit("-", 1)[1])
    self.assertEqual(phase["start_step"], step)
    self.assertEqual(_read(model_dir, "result.json")["optimizer_steps"],
                     240)
    _assert_conserved(self, phase["gba"])
    # Every tensor the resumed job held after its restore (model, Adam's
    # slots, the step) equals that checkpoint's, read from disk.
    saved = tf.train.load_checkpoint(last_before_kill)
    restored = tf.train.load_checkpoint(
        os.path.join(model_dir, "restored", f"ckpt-{step}"))
    keys = [k for k in saved.get_variable_to_shape_map()
            if "save_counter" not in k and "_CHECKPOINTABLE_OBJECT_GRAPH" != k]
    self.assertCountEqual(
        keys, [k for k in restored.get_variable_to_shape_map()
               if "save_counter" not in k
               and "_CHECKPOINTABLE_OBJECT_GRAPH" != k])
    # tf_keras keeps Adam's m and v per model variable as optimizer
    # variables: two each.
    weights = [k for k in keys if k.startswith("model/")]
    slots = [k for k in keys if k.startswith("optimizer/_variables/")]
    self.assertNotEmpty(weights)
    self.assertLen(slots, 2 * len(weights))
    for key in keys:
      self.assertAllEqual(restored.get_tensor(key), saved.get_tensor(key),
                          msg=key)
    # The slots hold trained values, not the zeros of a fresh optimizer.
    self.assertGreater(
        max(float(abs(saved.get_tensor(k)).max()) for k in slots), 0.0)

  def test_chief_killed_resumes_from_last_checkpoint(self):
    model_dir = testing_utils.temp_dir(self, "gba_kill_chief_")
    job = _job(self, model_dir)
    job.wait_for("[chief:0] Epoch 3/")
    job.kill("chief:0")
    # The launcher restarts the phase, as Kubernetes restarts a TFJob chief
    # (configs/k8s/tfjob_gba.yaml: restartPolicy ExitCode).
    self.assertEqual(job.finish(), 0, job.excerpt())
    self.assertIn("[launcher] the chief was killed by signal 9; restarting "
                  "the phase from the last checkpoint", job.output)
    launch = _read(model_dir, "launch.json")
    self.assertEqual([p["exit_code"] for p in launch["phases"]], [-9, 0])
    phase = _read(model_dir, "phases.jsonl")[-1]
    # Killed in loop 3: the checkpoint of loop 2 (step 80) was written.
    self.assertGreaterEqual(phase["start_step"], 80)
    self.assertEqual(_read(model_dir, "result.json")["optimizer_steps"],
                     240)
    _assert_conserved(self, phase["gba"])

  def test_chief_killed_without_restart_then_rerun_resumes(self):
    model_dir = testing_utils.temp_dir(self, "gba_kill_chief_")
    job = _job(self, model_dir, "--norestart_tasks")
    job.wait_for("[chief:0] Epoch 3/")
    job.kill("chief:0")
    self.assertNotEqual(job.finish(), 0)
    self.assertNotIn("restarting the phase", job.output)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "result.json")))
    rerun = _job(self, model_dir)
    self.assertEqual(rerun.finish(), 0, rerun.excerpt())
    phase = _read(model_dir, "phases.jsonl")[-1]
    self.assertGreaterEqual(phase["start_step"], 80)
    self.assertEqual(_read(model_dir, "result.json")["optimizer_steps"],
                     240)

  def test_nonfinite_gradients_from_one_worker_are_rejected(self):
    model_dir = testing_utils.temp_dir(self, "gba_nan_")
    job = _job(self, model_dir, "--inject_nonfinite_worker=1", "--train_steps=60")
    self.assertEqual(job.finish(), 0, job.excerpt())
    gba = _read(model_dir, "phases.jsonl")[-1]["gba"]
    # Every gradient of worker 1 is rejected and counted, none applied.
    self.assertGreater(gba["worker_pushed"][1], 0)
    self.assertEqual(gba["nonfinite"], gba["worker_pushed"][1])
    self.assertEqual(gba["worker_dropped"][1], gba["worker_pushed"][1])
    _assert_conserved(self, gba)
    # The model trained on worker 0's gradients and is finite.
    result = _read(model_dir, "result.json")
    self.assertGreater(result["test_auc"], 0.55)
    self.assertTrue(all(p == p for p in [result["test_logloss"]]))


if __name__ == "__main__":
  tf.test.main()
