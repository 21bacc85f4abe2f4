"""Whole jobs through `scripts/launch_local.py`: real processes, real gRPC.

Every test launches the job as a user does, from the flagfile in `configs/`,
and asserts on what the job wrote into its model directory: the resolved
config, `result.json`, `phases.jsonl`, `switch_state.json`, `launch.json`.
"""

import os
import subprocess
import types

import numpy as np
import pytest
import tensorflow as tf

from gba_tf.launch import switch_paths
from tests import export_test
from tests import testing_utils


def _launch(test, model_dir, *args, timeout=300):
  """Runs a job to its end; (exit code, output). Ends it if the test fails."""
  job = testing_utils.LaunchedJob(test, model_dir, *args)
  code = job.finish(timeout)
  return types.SimpleNamespace(returncode=code, stdout=job.output)


_read = testing_utils.read_job_file


def _training_job(test, prefix):
  """A GBA job far from its end, its four tasks up and training."""
  model_dir = testing_utils.temp_dir(test, prefix)
  job = testing_utils.LaunchedJob(test, model_dir, "--mode=gba",
                                  "--train_steps=100000")
  job.wait_for("[chief:0] Epoch 1/")
  test.assertLen(job.live_tasks(), 4)
  return job


@pytest.mark.cluster
class LaunchLocalTest(tf.test.TestCase):

  def test_sync_and_gba_from_the_same_flagfile(self):
    results = {}
    for mode in ("sync", "gba"):
      model_dir = testing_utils.temp_dir(self, f"gba_{mode}_")
      export_dir = os.path.join(model_dir, "export")
      proc = _launch(self, model_dir, f"--mode={mode}", "--train_steps=40",
                     "--step_ms=5", f"--export_dir={export_dir}")
      self.assertEqual(proc.returncode, 0, proc.stdout[-3000:])
      # Logs come back prefixed with the task that wrote them.
      chief = "worker:0" if mode == "sync" else "chief:0"
      self.assertIn(f"[{chief}] [job] mode={mode} workers=2", proc.stdout)
      config = _read(model_dir, f"config-{mode}.json")
      self.assertEqual(config["gba"]["global_batch_size"], 512)
      results[mode] = _read(model_dir, "result.json")
      self.assertEqual(_read(model_dir, "launch.json")["exit_code"], 0)
      # The chief exported the trained model; TF alone serves it.
      self.assertIn(f"[{chief}] [job] exported a SavedModel", proc.stdout)
      logits = export_test.serve_in_fresh_process(self, export_dir)
      self.assertEqual(logits.shape, (4, 1))
      self.assertTrue(np.isfinite(logits).all())
      self.assertGreater(np.ptp(logits), 0.0)
    # Same flagfile, same optimization: 40 steps of 512 samples each.
    for mode in ("sync", "gba"):
      self.assertEqual(results[mode]["optimizer_steps"], 40)
      self.assertEqual(results[mode]["samples"], 40 * 512)
      self.assertGreater(results[mode]["test_auc"], 0.55)
    # Same hyper-parameters, no stragglers: nearly the same model.
    self.assertAllClose(results["sync"]["test_auc"],
                        results["gba"]["test_auc"], atol=0.01)

  def test_two_stragglers_each_at_its_own_speed(self):
    # --straggler takes a list: 3 workers at 40 ms of emulated compute per
    # local step, worker 1 at 1/3 speed (120 ms) and worker 2 at 1/6
    # (240 ms). GBA takes gradients as they come, so the shares of the 120
    # pushes follow the speeds, about 80 : 27 : 13.
    model_dir = testing_utils.temp_dir(self, "gba_two_stragglers_")
    proc = _launch(self, model_dir, "--mode=gba", "--workers=3",
                   "--global_batch_size=768", "--train_steps=40",
                   "--steps_per_loop=20", "--step_ms=40",
                   "--straggler=1:3,2:6", "--eval_examples=0")
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:])
    self.assertEqual(_read(model_dir, "config-gba.json")["stragglers"],
                     {"1": 3.0, "2": 6.0})
    fast, third, sixth = _read(model_dir, "phases.jsonl")[0]["gba"][
        "worker_pushed"]
    self.assertGreater(fast, 1.5 * third)
    self.assertGreater(third, sixth)

  def test_auto_switches_to_gba_under_a_straggler_and_back(self):
    model_dir = testing_utils.temp_dir(self, "gba_auto_")
    # Worker 1 at 1/6 speed until the job has switched to GBA: the test
    # ends the straggler on that event (a file the workers check per
    # batch), not on the clock, which a loaded machine could outrun.
    # At 1/4 speed (80 ms per step against 20 ms) a loaded 2-core machine
    # measured worker 0 at 37-47 ms per step, so worker 1 was 2.0-2.1x its
    # peers: on the 2x threshold, and the switch a coin flip (it failed 3
    # of 5 runs). At 1/6 (120 ms) it is clear of the threshold.
    stop_file = os.path.join(model_dir, "straggler_done")
    job = testing_utils.LaunchedJob(
        self, model_dir, "--mode=auto", "--straggler=1:6",
        f"--straggler_stop_file={stop_file}", "--train_steps=400")
    job.wait_for("[switch] sync -> gba", timeout=300)
    with open(stop_file, "w"):
      pass
    proc = types.SimpleNamespace(returncode=job.finish(), stdout=job.output)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:])
    switches = _read(model_dir, "switch_state.json")["switches"]
    self.assertEqual([(s["from_mode"], s["to_mode"]) for s in switches],
                     [("sync", "gba"), ("gba", "sync")], proc.stdout[-3000:])
    self.assertIn("worker 1 at", switches[0]["reason"])
    slow, fast = switches[0]["step_seconds"][1], switches[0]["step_seconds"][0]
    self.assertGreater(slow, 2 * fast)
    self.assertIn("healthy", switches[1]["reason"])
    self.assertIn("[switch] sync -> gba: stragglers for 3 checks: worker 1",
                  proc.stdout)
    # Each phase resumed from the previous phase's checkpoint: the phases'
    # optimizer steps add up to the job's, and nothing was trained twice.
    phases = _read(model_dir, "phases.jsonl")
    self.assertEqual([p["mode"] for p in phases], ["sync", "gba", "sync"])
    self.assertEqual(sum(p["optimizer_steps"] for p in phases), 400)
    self.assertEqual(phases[0]["optimizer_steps"], switches[0]["global_step"])
    self.assertEqual(phases[0]["optimizer_steps"] +
                     phases[1]["optimizer_steps"], switches[1]["global_step"])
    gba = phases[1]["gba"]
    self.assertEqual(gba["pushed"], gba["applied"] + gba["dropped"]
                     + gba["pending"] + gba["lost"])
    self.assertEqual(gba["lost"], 0)
    # Each phase's held-out curve ends on the samples it trained, though
    # the switch cut its last loop short: the sync phase on its global
    # steps x 512, where the next phase's curve starts; the GBA phase on
    # every local batch of 256 its workers ran, one push each (no task
    # failed, so no step was retried), its pending gradients included,
    # which the next phase does not count.
    self.assertEqual(phases[0]["curve"][-1]["samples"],
                     switches[0]["global_step"] * 512)
    self.assertEqual(phases[1]["curve"][0]["samples"],
                     switches[0]["global_step"] * 512)
    self.assertEqual(phases[2]["start_samples"],
                     switches[1]["global_step"] * 512)
    self.assertEqual(phases[1]["curve"][-1]["samples"] -
                     phases[1]["start_samples"], gba["pushed"] * 256)
    # Joined, the path's curve never goes back in samples.
    samples = [p["samples"] for p in switch_paths.join_phases(phases)]
    self.assertEqual(samples, sorted(samples))
    self.assertEqual(samples[-1], 400 * 512)
    result = _read(model_dir, "result.json")
    self.assertEqual((result["mode"], result["optimizer_steps"]),
                     ("sync", 400))
    launch = _read(model_dir, "launch.json")
    self.assertEqual([p["mode"] for p in launch["phases"]],
                     ["sync", "gba", "sync"])
    self.assertEqual([p["exit_code"] for p in launch["phases"]], [75, 75, 0])
    # A phase's training, evaluation and `fit`'s return after training
    # (release) are apart, and all within the phase's process lifetime.
    for phase, launched in zip(phases, launch["phases"]):
      self.assertGreater(phase["seconds"], 0.0)
      self.assertGreaterEqual(phase["release_seconds"], 0.0)
      self.assertLess(phase["seconds"] + phase["eval_seconds"]
                      + phase["release_seconds"], launched["seconds"])

  def test_auto_stays_in_sync_when_healthy(self):
    model_dir = testing_utils.temp_dir(self, "gba_healthy_")
    proc = _launch(self, model_dir, "--mode=auto", "--train_steps=100")
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:])
    self.assertFalse(os.path.exists(os.path.join(model_dir,
                                                 "switch_state.json")))
    self.assertEqual([p["mode"] for p in _read(model_dir, "launch.json")[
        "phases"]], ["sync"])
    self.assertEqual(_read(model_dir, "result.json")["optimizer_steps"], 100)

  def test_bad_flag_is_refused_before_any_task_starts(self):
    model_dir = testing_utils.temp_dir(self, "gba_fail_")
    # The launcher resolves the job config as its tasks would, and refuses
    # it in one line before starting any process.
    proc = _launch(self, model_dir, "--mode=auto", "--straggler=5:4")
    self.assertEqual(proc.returncode, 2, proc.stdout[-3000:])
    self.assertIn("launch_local.py: error: Received: --straggler=5:4, but "
                  "there are only 2 workers", proc.stdout)
    self.assertNotIn("[worker:0]", proc.stdout)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "tasks.json")))
    launch = _read(model_dir, "launch.json")
    self.assertEqual((launch["exit_code"], launch["phases"]), (2, []))

  def test_failing_job_returns_the_chief_code_and_leaves_no_process(self):
    model_dir = testing_utils.temp_dir(self, "gba_fail_")
    # Valid flags, but the chief fails at start-up (a file where the model
    # directory's checkpoint folder must go); the launcher must still reap
    # every task and return the chief's code.
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "ckpt"), "w") as f:
      f.write("not a directory")
    proc = _launch(self, model_dir, "--mode=gba")
    self.assertNotEqual(proc.returncode, 0, proc.stdout[-3000:])
    launch = _read(model_dir, "launch.json")
    self.assertEqual(launch["exit_code"], proc.returncode)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True,
                        text=True, check=True).stdout
    self.assertNotIn(f"--model_dir={model_dir}", ps)

  def test_sigterm_stops_the_job_with_143_and_every_task(self):
    # What Kubernetes or Ctrl-C does to the launcher: SIGTERM. It exits
    # with 128 + 15 and takes every task down with it.
    job = _training_job(self, "gba_term_")
    job.proc.terminate()
    self.assertEqual(job.finish(timeout=120), 143, job.excerpt())
    self.assertEqual(job.live_tasks(), {})

  def test_sigkill_of_the_launcher_takes_every_task_with_it(self):
    # A launcher SIGKILLed (a test's subprocess timeout, the OOM killer)
    # runs no handler; its tasks, each in a session of its own, used to
    # stay up, holding their ports, until killed by hand. Each task now
    # asks Linux to SIGKILL it when the launcher dies.
    job = _training_job(self, "gba_kill_")
    job.proc.kill()
    job.proc.wait(timeout=60)
    testing_utils.wait_while(job.live_tasks)
    self.assertEqual(job.live_tasks(), {})

  def test_a_failed_test_leaves_no_process(self):
    # A test that fails mid-job (here: `finish` times out) must not leave
    # the job behind. The job's cleanup is what a failing test runs; it is
    # called here directly, then every task PID of the job must be gone.
    job = _training_job(self, "gba_leak_")
    model_dir = job.model_dir
    tasks = job.task_pids()
    self.assertCountEqual(tasks, ["chief:0", "worker:0", "worker:1", "ps:0"])
    with self.assertRaisesRegex(AssertionError, "job still running"):
      job.finish(timeout=1)
    job.stop()
    self.assertIsNotNone(job.proc.poll())
    self.assertEqual(job.live_tasks(), {})
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True,
                        text=True, check=True).stdout
    self.assertNotIn(f"--model_dir={model_dir}", ps)


if __name__ == "__main__":
  tf.test.main()
