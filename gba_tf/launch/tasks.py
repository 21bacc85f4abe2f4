"""TF_CONFIG and task start-up: what every task of a job does first.

* `parse_tf_config` validates TF_CONFIG for a training mode and names the
  bad value;
* `make_cluster_spec`, `tf_config_json` and `task_environment` give each task
  of a job on this machine its address and environment (loopback ports, the
  loopback shim);
* `run_server` is the body of a worker / PS task under ParameterServerStrategy;
* `terminate` and `exit_now` end tasks and coordinators cleanly.

`local_cluster.py` builds test and demo clusters on these; `job.py` and
`launcher.py` build the training job.
"""

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from gba_tf.launch import loopback

# Tasks address each other on loopback, and launched tasks only listen
# there (`loopback`): these clusters are for one machine.
# 127.0.0.1 rather than "localhost": the latter may resolve to ::1 first,
# where nothing listens.
_HOST = "127.0.0.1"
# Grace period between SIGTERM and SIGKILL when tearing a cluster down.
_TERMINATE_GRACE_S = 5.0
# Ports for local clusters (`pick_unused_ports`): above the registered
# services most machines run, outside the kernel's ephemeral range.
_MIN_PORT = 10000
# How long a picked port stays reserved for its tasks to bind it. Start-up
# takes seconds; a launcher restarting a task later reuses a port its
# cluster already owns.
_PORT_RESERVATION_S = 600.0


TASK_TYPES = ("chief", "worker", "ps")

# Exit status of a chief that lost a parameter server: the launcher restarts
# the phase, which resumes from the last checkpoint (EX_PROTOCOL + 0 = 76).
EXIT_RESUME = 76


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


# A task started by LocalCluster or LocalLauncher exits when the process that
# started it dies, however it dies (a segfault or SIGKILL skips `atexit`,
# and a test's timeout SIGKILLs the benchmark that launched a job): the
# starter puts its PID here, and the task calls `die_with_parent` first.
PARENT_PID_ENV = "GBA_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
  """Asks Linux to SIGKILL this process when the parent named in
  `PARENT_PID_ENV` exits (prctl PR_SET_PDEATHSIG), then closes the race of
  a parent that died before the request. A no-op without the variable (a
  task started by Kubernetes or by hand). Set in the child, not with
  `preexec_fn`, which is unsafe in a parent running TF's threads."""
  parent = os.environ.get(PARENT_PID_ENV)
  if not parent:
    return
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  except (OSError, AttributeError):
    return  # not Linux: the starter's own cleanup still stops its children.
  if os.getppid() != int(parent):
    os._exit(0)  # pylint: disable=protected-access


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


def _ephemeral_range() -> Tuple[int, int]:
  """The kernel's range for the local ports of outgoing connections."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      low, high = (int(x) for x in f.read().split())
    return low, high
  except (OSError, ValueError):
    return 32768, 60999  # Linux's default.


def _reservation_dir() -> str:
  path = os.path.join(tempfile.gettempdir(), f"gba_tf_ports-{os.getuid()}")
  os.makedirs(path, exist_ok=True)
  return path


def _reserve(port: int, directory: str) -> bool:
  """Claims `port` for this machine's pickers for `_PORT_RESERVATION_S`."""
  path = os.path.join(directory, str(port))
  try:
    if time.time() - os.path.getmtime(path) > _PORT_RESERVATION_S:
      os.unlink(path)  # Stale: its tasks bound it long ago, or never will.
  except OSError:
    pass
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  return True


def _is_free(port: int) -> bool:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind((_HOST, port))
    except OSError:
      return False
  return True


def pick_unused_ports(count: int, rng: Optional[random.Random] = None
                      ) -> List[int]:
  """`count` distinct ports for tasks that will listen on them shortly.

  The tasks bind their ports seconds after this returns (TF needs every
  address in the cluster spec before any server starts), so a port must
  stay free in between. Two things could take it, and both are ruled out:
  * an outgoing connection of any process on this machine: the kernel gives
    those a local port from its ephemeral range, and the ports here come
    from outside that range (so not from binding port 0, which would draw
    from it);
  * another cluster started at the same time, by a test or a second job:
    each port is reserved with a file created exclusively (`O_EXCL`) in a
    per-user directory, which every picker honours for
    `_PORT_RESERVATION_S`.
  What remains is a server of another program binding the same fixed port
  in that window.

  Args:
    count: how many ports.
    rng: the random source; tests pass a seeded one.
  """
  rng = rng or random.SystemRandom()
  low, high = _ephemeral_range()
  candidates = [(_MIN_PORT, low - 1), (high + 1, 65535)]
  candidates = [(a, b) for a, b in candidates if a <= b]
  total = sum(b - a + 1 for a, b in candidates)
  directory = _reservation_dir()
  ports: List[int] = []
  for _ in range(100 * count + 1000):
    if len(ports) == count:
      return ports
    k = rng.randrange(total)
    for a, b in candidates:
      if k <= b - a:
        port = a + k
        break
      k -= b - a + 1
    if port in ports or not _is_free(port) or not _reserve(port, directory):
      continue
    ports.append(port)
  raise RuntimeError(f"Found only {len(ports)} free ports of the {count} "
                     "asked for outside the ephemeral range.")


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

  This process's environment, the loopback shim (`loopback`),
  `extra`, the task's TF_CONFIG, and TF's C++ INFO logs off unless set.
  """
  env = dict(os.environ)
  env.update(loopback.environment())
  env.update(extra or {})
  env["TF_CONFIG"] = tf_config_json(spec, task_type, task_index)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def resolver(spec: Dict[str, List[str]], task_type=None, task_id=None):
  """A cluster resolver for `spec` over gRPC."""
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(spec), task_type=task_type, task_id=task_id,
      rpc_layer="grpc")


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
  spec = tf.distribute.cluster_resolver.TFConfigClusterResolver(
  ).cluster_spec()
  server = tf.distribute.Server(spec, job_name=task_type,
                                task_index=task_index, protocol="grpc",
                                start=True)
  server.join()
