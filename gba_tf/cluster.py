"""Local clusters on loopback ports, for tests and demos.

Two shapes, both cleaned up on exit:

* `InProcessCluster`: worker and PS servers inside the calling process (fast;
  used by the unit tests).
* `LocalCluster`: one OS process per worker / PS task, each with its own
  TF_CONFIG, as a real job would run (used by the cluster tests, the demo
  and the benchmarks).

Example:

```python
with gba_tf.cluster.LocalCluster(num_workers=2, num_ps=1) as cluster:
  strategy = gba_tf.GBAStrategy(cluster.resolver(), config)
  ...
```
"""

import atexit
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import tensorflow as tf

from gba_tf import loopback
from gba_tf import stall

# Tasks address each other on loopback, and `LocalCluster` children only
# listen there (gba_tf.loopback): these clusters are for one machine.
# 127.0.0.1 rather than "localhost": the latter may resolve to ::1 first,
# where nothing listens.
_HOST = "127.0.0.1"
# How long a child task may take to start its server before we give up.
_STARTUP_TIMEOUT_S = 60.0
# Grace period between SIGTERM and SIGKILL when tearing a cluster down.
_TERMINATE_GRACE_S = 5.0


TASK_TYPES = ("chief", "worker", "ps")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """A validated TF_CONFIG: the cluster and this process's task.

  Attributes:
    cluster: job name -> list of "host:port".
    task_type: "chief", "worker" or "ps"; None without TF_CONFIG.
    task_index: index of this task within its job.
  """
  cluster: Dict[str, List[str]]
  task_type: Optional[str]
  task_index: int

  @property
  def num_workers(self) -> int:
    return len(self.cluster.get("worker", []))

  @property
  def is_chief(self) -> bool:
    """The chief, or worker 0 of a cluster without one (sync mode)."""
    if "chief" in self.cluster:
      return self.task_type == "chief"
    return self.task_type in (None, "worker") and self.task_index == 0


def parse_tf_config(text: Optional[str], mode: str) -> TaskConfig:
  """Parses and validates TF_CONFIG for a training mode.

  Args:
    text: the TF_CONFIG JSON, or None / "" when unset.
    mode: "sync" (MultiWorkerMirroredStrategy: worker tasks, optionally one
      chief, no ps) or "gba" / "async" (one chief, >= 1 worker, >= 1 ps).

  Returns:
    A `TaskConfig`; without TF_CONFIG in sync mode, a single local worker.

  Raises:
    ValueError: naming the bad value.
  """
  if not text:
    if mode == "sync":
      return TaskConfig({}, None, 0)
    raise ValueError(f"Received: TF_CONFIG unset; --mode={mode} needs a "
                     "cluster with chief, worker and ps tasks.")
  try:
    parsed = json.loads(text)
  except json.JSONDecodeError as e:
    shown = text if len(text) <= 60 else text[:57] + "..."
    raise ValueError(f"Received: TF_CONFIG={shown!r}, which is not valid "
                     f"JSON ({e.msg} at char {e.pos}).") from None
  if not isinstance(parsed, dict) or not isinstance(
      parsed.get("cluster"), dict) or not isinstance(parsed.get("task"),
                                                      dict):
    raise ValueError("Received: TF_CONFIG without a 'cluster' object and a "
                     "'task' object.")
  cluster = parsed["cluster"]
  for job, addresses in cluster.items():
    if job not in TASK_TYPES:
      raise ValueError(f"Received: TF_CONFIG cluster job {job!r}, which is "
                       f"not one of {TASK_TYPES}.")
    if not isinstance(addresses, list) or not addresses or not all(
        isinstance(a, str) and a.rpartition(":")[2].isdigit()
        for a in addresses):
      raise ValueError(f"Received: TF_CONFIG cluster[{job!r}]={addresses!r}"
                       ", which is not a non-empty list of 'host:port'.")
  task_type = parsed["task"].get("type")
  task_index = parsed["task"].get("index", 0)
  if task_type not in TASK_TYPES:
    raise ValueError(f"Received: TF_CONFIG task type {task_type!r}, which "
                     f"is not one of {TASK_TYPES}.")
  if task_type not in cluster:
    raise ValueError(f"Received: TF_CONFIG task type {task_type!r}, which "
                     "has no entry in the cluster.")
  if isinstance(task_index, bool) or not isinstance(task_index, int) or not (
      0 <= task_index < len(cluster[task_type])):
    raise ValueError(f"Received: TF_CONFIG task index {task_index!r} for "
                     f"{task_type!r}, but the cluster has "
                     f"{len(cluster[task_type])} {task_type} task(s).")
  if "worker" not in cluster and "chief" not in cluster:
    raise ValueError("Received: TF_CONFIG cluster with no 'worker' tasks.")
  if mode == "sync":
    if "ps" in cluster:
      raise ValueError(
          f"Received: TF_CONFIG cluster with {len(cluster['ps'])} 'ps' "
          "task(s); --mode=sync runs MultiWorkerMirroredStrategy, which "
          "takes none.")
    if len(cluster.get("chief", [])) > 1:
      raise ValueError("Received: TF_CONFIG with more than one 'chief'.")
  else:
    if "ps" not in cluster:
      raise ValueError(f"Received: TF_CONFIG cluster with no 'ps' tasks; "
                       f"--mode={mode} needs at least one.")
    if len(cluster.get("chief", [])) != 1:
      raise ValueError(f"Received: TF_CONFIG cluster with "
                       f"{len(cluster.get('chief', []))} 'chief' tasks; "
                       f"--mode={mode} needs exactly one coordinator.")
    if "worker" not in cluster:
      raise ValueError("Received: TF_CONFIG cluster with no 'worker' tasks.")
  return TaskConfig(cluster, task_type, task_index)


def pick_unused_ports(count: int) -> List[int]:
  """Ports that were free a moment ago (bound to port 0, then released)."""
  sockets, ports = [], []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
      ports.append(s.getsockname()[1])
  finally:
    for s in sockets:
      s.close()
  return ports


def make_cluster_spec(num_workers: int, num_ps: int,
                      num_chief: int = 0) -> Dict[str, List[str]]:
  if num_workers < 1:
    raise ValueError(f"Received: num_workers={num_workers}, which must be "
                     ">= 1.")
  if num_ps < 0:
    raise ValueError(f"Received: num_ps={num_ps}, which must be >= 0.")
  ports = iter(pick_unused_ports(num_workers + num_ps + num_chief))
  spec = {}
  for job, count in (("chief", num_chief), ("worker", num_workers),
                     ("ps", num_ps)):
    if count:
      spec[job] = [f"{_HOST}:{next(ports)}" for _ in range(count)]
  return spec


def tf_config_json(spec: Dict[str, List[str]], task_type: str,
                   task_index: int) -> str:
  return json.dumps({"cluster": spec,
                     "task": {"type": task_type, "index": task_index}})


def task_environment(spec: Dict[str, List[str]], task_type: str,
                     task_index: int,
                     extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """Environment of one task process of a local cluster.

  This process's environment, the loopback shim (`gba_tf.loopback`),
  `extra`, the task's TF_CONFIG, and TF's C++ INFO logs off unless set.
  """
  env = dict(os.environ)
  env.update(loopback.environment())
  env.update(extra or {})
  env["TF_CONFIG"] = tf_config_json(spec, task_type, task_index)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _resolver(spec: Dict[str, List[str]], task_type=None, task_id=None):
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(spec), task_type=task_type, task_id=task_id,
      rpc_layer="grpc")


class InProcessCluster:
  """Worker and PS servers in this process; the caller is the coordinator.

  Servers cannot be stopped in TF 2.21 (`Server.stop` is unimplemented for
  gRPC); they live until the process exits, so build one per test class.
  """

  def __init__(self, num_workers: int = 2, num_ps: int = 1):
    self.spec = make_cluster_spec(num_workers, num_ps)
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
    return _resolver(self.spec)


# A LocalCluster task exits when the process that started it dies, however it
# dies (a segfault or SIGKILL skips `atexit`): it reads its parent's PID here.
_PARENT_PID_ENV = "GBA_LOCAL_CLUSTER_PARENT"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
  """Asks Linux to SIGKILL this process when the parent named in the
  environment exits (prctl PR_SET_PDEATHSIG), then closes the race of a
  parent that died before the request. Set in the child, not with
  `preexec_fn`, which is unsafe in a parent running TF's threads."""
  parent = os.environ.get(_PARENT_PID_ENV)
  if not parent:
    return
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  except (OSError, AttributeError):
    return  # not Linux: atexit in the parent still stops the children.
  if os.getppid() != int(parent):
    os._exit(0)  # pylint: disable=protected-access


def _child_command(task_type: str, task_index: int) -> List[str]:
  return [sys.executable, "-m", "gba_tf.cluster", task_type, str(task_index)]


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
    self.spec = make_cluster_spec(num_workers, num_ps, num_chief=1)
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
    return tf_config_json(self.spec, task_type, task_index)

  def start_task(self, task_type: str, task_index: int) -> subprocess.Popen:
    """(Re)starts one task's server process."""
    env = task_environment(self.spec, task_type, task_index, self._env)
    env[_PARENT_PID_ENV] = str(os.getpid())
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
    return _resolver(self.spec, task_type="chief", task_id=0)

  def stop(self) -> None:
    # A GBA stall watchdog polling these servers would outlive them.
    stall.stop_all()
    terminate(self.processes.values())
    for f in self._logs:
      f.close()
    self._logs = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def resident_mib(pid: int) -> Optional[float]:
  """Resident memory (VmRSS) of process `pid` in MiB; None once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


def terminate(processes) -> None:
  """SIGTERM every live process, then SIGKILL what outlives the grace."""
  processes = list(processes)
  for proc in processes:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + _TERMINATE_GRACE_S
  for proc in processes:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def exit_now(code: int = 0) -> None:
  """Exits a coordinator process whose cluster is already stopped.

  At interpreter exit TF's eager context releases every remote function and
  logs one gRPC error per function when the servers are gone; the work is
  done and flushed by then, so skip that teardown.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def run_server(task_type: str, task_index: int) -> None:
  """Body of a worker / PS process: serve until killed."""
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  server = tf.distribute.Server(resolver.cluster_spec(), job_name=task_type,
                                task_index=task_index, protocol="grpc",
                                start=True)
  server.join()


if __name__ == "__main__":
  _die_with_parent()
  run_server(sys.argv[1], int(sys.argv[2]))
