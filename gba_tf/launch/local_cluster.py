"""Local clusters on loopback ports, for tests, demos and benchmarks.

Two shapes, both cleaned up on exit:

* `InProcessCluster`: worker and PS servers inside the calling process (fast;
  used by the unit tests).
* `LocalCluster`: one OS process per worker / PS task, each with its own
  TF_CONFIG, as a real job would run (used by the cluster tests, the demo
  and the benchmarks).

Example:

```python
from gba_tf.launch import local_cluster

with local_cluster.LocalCluster(num_workers=2, num_ps=1) as cluster:
  strategy = gba_tf.GBAStrategy(cluster.resolver(), config)
  ...
```
"""

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import tensorflow as tf

from gba_tf import accumulator
from gba_tf.launch import tasks

# How long a child task may take to start its server before we give up.
_STARTUP_TIMEOUT_S = 60.0


class InProcessCluster:
  """Worker and PS servers in this process; the caller is the coordinator.

  Servers cannot be stopped in TF 2.21 (`Server.stop` is unimplemented for
  gRPC); they live until the process exits, so build one per test class.
  """

  def __init__(self, num_workers: int = 2, num_ps: int = 1):
    self.spec = tasks.make_cluster_spec(num_workers, num_ps)
    # A worker server on a 2-core machine needs more inter-op threads than
    # concurrent closures, else `model.fit` hangs (docs/design.md, section 4).
    worker_config = tf.compat.v1.ConfigProto()
    worker_config.inter_op_parallelism_threads = num_workers + 1
    self.servers = []
    for job in ("worker", "ps"):
      for index in range(len(self.spec.get(job, []))):
        self.servers.append(tf.distribute.Server(
            tf.train.ClusterSpec(self.spec), job_name=job, task_index=index,
            protocol="grpc", config=worker_config, start=True))

  def resolver(self):
    return tasks.resolver(self.spec)


def _child_command(task_type: str, task_index: int) -> List[str]:
  return [sys.executable, "-m", "gba_tf.launch.local_cluster", task_type, str(task_index)]


class LocalCluster:
  """One process per worker / PS task on loopback; the caller coordinates.

  Use as a context manager, or call `stop()`; children are also killed at
  interpreter exit, and (Linux) when this process dies any other way: a
  segfault or SIGKILL of a test process leaves no server behind.

  Args:
    num_workers: worker tasks.
    num_ps: parameter server tasks.
    env: extra environment variables for the children.
    log_dir: where each task writes `<type>-<index>.log`; None discards.
  """

  def __init__(self, num_workers: int = 2, num_ps: int = 1,
               env: Optional[Dict[str, str]] = None,
               log_dir: Optional[str] = None):
    self.spec = tasks.make_cluster_spec(num_workers, num_ps, num_chief=1)
    self._env = dict(env or {})
    self._log_dir = log_dir
    self.processes: Dict[str, subprocess.Popen] = {}
    self._logs = []
    atexit.register(self.stop)
    try:
      for job in ("ps", "worker"):
        for index in range(len(self.spec[job])):
          self.start_task(job, index)
      self._wait_until_listening()
    except BaseException:
      self.stop()
      raise

  def tf_config(self, task_type: str, task_index: int) -> str:
    return tasks.tf_config_json(self.spec, task_type, task_index)

  def start_task(self, task_type: str, task_index: int) -> subprocess.Popen:
    """(Re)starts one task's server process."""
    env = tasks.task_environment(self.spec, task_type, task_index, self._env)
    env[tasks.PARENT_PID_ENV] = str(os.getpid())
    if self._log_dir:
      os.makedirs(self._log_dir, exist_ok=True)
      out = open(os.path.join(self._log_dir,
                              f"{task_type}-{task_index}.log"), "ab")
      self._logs.append(out)
    else:
      out = subprocess.DEVNULL
    proc = subprocess.Popen(_child_command(task_type, task_index), env=env,
                            stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    self.processes[f"{task_type}:{task_index}"] = proc
    return proc

  def kill_task(self, task_type: str, task_index: int,
                sig: int = signal.SIGKILL) -> None:
    proc = self.processes[f"{task_type}:{task_index}"]
    if proc.poll() is None:
      proc.send_signal(sig)
      proc.wait()

  def _wait_until_listening(self) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    for job in ("ps", "worker"):
      for index, address in enumerate(self.spec[job]):
        port = int(address.rsplit(":", 1)[1])
        while True:
          proc = self.processes[f"{job}:{index}"]
          if proc.poll() is not None:
            raise RuntimeError(f"Task {job}:{index} exited with code "
                               f"{proc.returncode} before listening.")
          with contextlib.closing(socket.socket()) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
              break
          if time.monotonic() > deadline:
            raise TimeoutError(f"Task {job}:{index} did not listen on port "
                               f"{port} within {_STARTUP_TIMEOUT_S}s.")
          time.sleep(0.1)

  def resolver(self):
    """Resolver for the chief (this process)."""
    return tasks.resolver(self.spec, task_type="chief", task_id=0)

  def stop(self) -> None:
    # A GBA stall watchdog polling these servers, or an applier waiting on
    # them, would outlive them.
    accumulator.stop_all_threads()
    tasks.terminate(self.processes.values())
    for f in self._logs:
      f.close()
    self._logs = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def resident_mib(pid: int) -> Optional[float]:
  """Resident memory (VmRSS) of process `pid` in MiB; None once it is gone.

  What the soak (`scripts/soak.py`) and the checkpoint memory test watch on
  a local cluster's parameter servers.
  """
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


if __name__ == "__main__":
  tasks.die_with_parent()
  tasks.run_server(sys.argv[1], int(sys.argv[2]))
