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
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import tensorflow as tf

from gba_tf.launch import loopback

# Tasks address each other on loopback, and launched tasks only listen
# there (`loopback`): these clusters are for one machine.
# 127.0.0.1 rather than "localhost": the latter may resolve to ::1 first,
# where nothing listens.
_HOST = "127.0.0.1"
# Grace period between SIGTERM and SIGKILL when tearing a cluster down.
_TERMINATE_GRACE_S = 5.0


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
