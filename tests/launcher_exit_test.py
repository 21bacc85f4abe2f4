"""The launcher's exit paths, driven by stand-in tasks that exit on cue.

`LocalLauncher(script=...)` runs a small script in place of `gba-train` in
every task: real processes with real TF_CONFIGs, no TensorFlow, so each path
takes well under a second per phase. The script exits with the code the
test names for its task (`GBA_TEST_EXIT_CODES`, {"chief:0": 76}; -11 kills
it with signal 11) and otherwise serves until terminated, as a PS or worker
server does.
"""

import io
import json
import os

import tensorflow as tf

from gba_tf import switching
from gba_tf.launch import launcher as launcher_lib
from gba_tf.launch import tasks
from tests import testing_utils

_TASK = """\
import json, os, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = "%s:%d" % (task["type"], task["index"])
codes = json.loads(os.environ["GBA_TEST_EXIT_CODES"])
if name in codes and codes[name] < 0:
  os.kill(os.getpid(), -codes[name])  # killed by that signal
if name in codes:
  sys.exit(codes[name])
time.sleep(600)
"""


class LauncherExitTest(tf.test.TestCase):

  def _launch(self, mode, codes, workers=2, restart_tasks=True):
    work = testing_utils.temp_dir(self, "gba_exit_")
    script = os.path.join(work, "task.py")
    with open(script, "w") as f:
      f.write(_TASK)
    out = io.StringIO()
    launcher = launcher_lib.LocalLauncher(
        [], workers=workers, ps=1, mode=mode,
        model_dir=os.path.join(work, "model"), out=out,
        env={"GBA_TEST_EXIT_CODES": json.dumps(codes)}, script=script,
        restart_tasks=restart_tasks)
    code = launcher.run()
    # Whatever the path, no task outlives the launcher.
    self.assertEqual(launcher._procs, {})  # pylint: disable=protected-access
    return code, launcher, out.getvalue()

  def test_switch_exit_outside_auto_mode_ends_the_job(self):
    # EXIT_SWITCH asks for the other topology only in auto mode; a gba job
    # has no other, so the code is the job's.
    code, launcher, _ = self._launch(
        "gba", {"chief:0": switching.EXIT_SWITCH})
    self.assertEqual(code, switching.EXIT_SWITCH)
    self.assertLen(launcher.phases, 1)

  def test_resumes_are_bounded(self):
    # A chief that loses a PS every time: the phase is restarted three
    # times, then its code ends the job.
    code, launcher, out = self._launch("gba", {"chief:0": tasks.EXIT_RESUME})
    self.assertEqual(code, tasks.EXIT_RESUME)
    self.assertEqual([p.exit_code for p in launcher.phases],
                     [tasks.EXIT_RESUME] * 4)
    self.assertEqual(out.count("restarting the phase from the last "
                               "checkpoint"), 3)

  def test_a_chief_killed_by_a_signal_resumes_boundedly(self):
    # A chief that segfaults every time: restarted from the last checkpoint
    # three times, as after a lost PS, then its code ends the job.
    code, launcher, out = self._launch("gba", {"chief:0": -11})
    self.assertEqual(code, -11)
    self.assertEqual([p.exit_code for p in launcher.phases], [-11] * 4)
    self.assertEqual(out.count("the chief was killed by signal 11; "
                               "restarting the phase from the last "
                               "checkpoint"), 3)

  def test_a_chief_exiting_with_an_error_ends_the_job(self):
    # An exit code, unlike a signal, is the chief's own verdict (bad input,
    # a failed restore): running it again would fail the same way.
    code, launcher, out = self._launch("async", {"chief:0": 1})
    self.assertEqual(code, 1)
    self.assertLen(launcher.phases, 1)
    self.assertNotIn("restarting the phase", out)

  def test_a_killed_chief_ends_the_job_without_task_restarts(self):
    code, launcher, out = self._launch("gba", {"chief:0": -9},
                                       restart_tasks=False)
    self.assertEqual(code, -9)
    self.assertLen(launcher.phases, 1)
    self.assertNotIn("restarting the phase", out)

  def test_a_killed_sync_worker_0_ends_the_job(self):
    # Sync has no coordinator: its worker 0 dying is a worker failing.
    # (Worker 1 exits at once, as it would after the all-reduce broke,
    # sparing the launcher's wait for it.)
    code, launcher, out = self._launch("sync", {"worker:0": -9,
                                                "worker:1": 0})
    self.assertEqual(code, -9)
    self.assertLen(launcher.phases, 1)
    self.assertNotIn("restarting the phase", out)

  def test_too_many_phases_end_the_job(self):
    # An auto job whose chief (sync: worker 0) asks to switch every phase,
    # without ever writing a new mode: the launcher gives up after its
    # phase limit instead of cycling forever.
    code, launcher, out = self._launch(
        "auto", {"worker:0": switching.EXIT_SWITCH, "worker:1": 0})
    self.assertEqual(code, 1)
    self.assertLen(launcher.phases, launcher_lib._MAX_PHASES)  # pylint: disable=protected-access
    self.assertIn(f"more than {launcher_lib._MAX_PHASES} phases; stopping",  # pylint: disable=protected-access
                  out)

  def test_a_crashed_sync_worker_stops_the_job(self):
    # Any exit of a sync worker other than 0 or a switch breaks the
    # all-reduce for every worker: the phase stops with that worker's code.
    code, launcher, out = self._launch("sync", {"worker:1": 3}, workers=3)
    self.assertEqual(code, 3)
    self.assertEqual(launcher.phases[0].failed_task, "worker:1")
    self.assertIn("worker:1 exited with code 3; stopping the job", out)

  def test_a_sync_worker_finishing_first_is_not_a_failure(self):
    # Worker 1 finishes (0) before worker 0 does: the job goes on and ends
    # with the chief's code.
    code, launcher, _ = self._launch("sync", {"worker:1": 0, "worker:0": 0})
    self.assertEqual(code, 0)
    self.assertIsNone(launcher.phases[0].failed_task)


if __name__ == "__main__":
  tf.test.main()
