"""Multi-process cluster tests: real OS processes, real gRPC on loopback.

Each test runs a job the way a user does, as a subprocess, so the chief of
the job is a fresh process (a process can only coordinate the cluster it
first connected to), and asserts on what the job wrote.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

import gba_tf
from gba_tf.launch import local_cluster
import tensorflow as tf

from tests import sockets
from tests import testing_utils

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.cluster
class LocalClusterTest(tf.test.TestCase):

  def test_demo_job_with_straggler(self):
    # 2 workers + 1 PS processes; worker 1 at 1/6 speed (120 ms vs 20 ms of
    # emulated compute per local step). 2 epochs x 40 local steps, M = 2.
    # (At 1/4 speed an idle machine gave pushes [62, 18] and [63, 17], but
    # a loaded one [50, 30]: the fast worker is no longer input-bound there,
    # and the 2x margin below was lost.)
    out = os.path.join(testing_utils.temp_dir(self, "gba_demo_"), "demo.json")
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "scripts", "demo.py"),
         "--workers=2", "--ps=1", "--epochs=2", "--steps_per_epoch=40",
         "--step_ms=20", "--straggler=1:6", f"--out={out}"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(out) as f:
      summary = json.load(f)
    m = summary["gba"]
    self.assertEqual(m["pushed"], 80)
    self.assertEqual(m["pushed"], m["applied"] + m["dropped"] + m["pending"])
    self.assertEqual(summary["optimizer_iterations"], m["global_steps"])
    self.assertEqual(m["applied"], 2 * m["global_steps"])
    # The fast worker delivers more gradients than the straggler (what the
    # health monitor reads in GBA), and the straggler's gradients are the
    # stale ones. (Not its token-to-push seconds: the emulated slowdown sits
    # in the input pipeline, which TF may run before or after the token
    # read, so that time shows the slowdown in some runs and not others.)
    fast, slow = m["worker_pushed"]
    self.assertGreater(fast, 2 * slow)
    self.assertGreater(sum(m["staleness_histogram"][1:]), 0)
    self.assertGreater(summary["test_auc"], 0.5)

  def test_local_cluster_processes_are_cleaned_up(self):
    testing_utils.collect_before_switching_cluster()
    with local_cluster.LocalCluster(num_workers=1, num_ps=1) as cluster:
      procs = list(cluster.processes.values())
      self.assertLen(procs, 2)
      self.assertTrue(all(p.poll() is None for p in procs))
      for address in cluster.spec["worker"] + cluster.spec["ps"]:
        self.assertTrue(address.startswith("127.0.0.1:"))
        # The servers listen on loopback only, not on every interface.
        self.assertEqual(sockets.listening_addresses(
            int(address.rsplit(":", 1)[1])), ["127.0.0.1"])
      cluster.kill_task("worker", 0)
      self.assertIsNotNone(cluster.processes["worker:0"].poll())
    self.assertTrue(all(p.poll() is not None for p in procs))

  def test_local_cluster_servers_die_with_a_killed_parent(self):
    # A test process that segfaults or is SIGKILLed runs no atexit; its
    # LocalCluster's servers must still go (they used to stay, holding
    # ports and memory, until someone killed them by hand).
    code = ("import os, signal, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from gba_tf.launch import local_cluster\n"
            "cluster = local_cluster.LocalCluster(num_workers=1, num_ps=1)\n"
            "print(' '.join(str(p.pid) for p in cluster.processes.values()),"
            " flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, testing_utils.ROOT],
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr[-2000:])
    pids = [int(p) for p in proc.stdout.split()]
    self.assertLen(pids, 2)

    def alive():
      return [pid for pid in pids
              if testing_utils.is_live_process(pid, "gba_tf.launch.local_cluster")]

    def kill_leftovers():
      for pid in alive():
        os.kill(pid, signal.SIGKILL)

    self.addCleanup(kill_leftovers)
    testing_utils.wait_while(alive)
    self.assertEqual(alive(), [])


if __name__ == "__main__":
  tf.test.main()
