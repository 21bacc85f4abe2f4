"""Runs a whole training job on this machine: one process per task.

`LocalLauncher` is what `scripts/launch_local.py` runs and what Kubernetes
(a TFJob) does in a real cluster: give every task its own TF_CONFIG on
loopback ports, start `scripts/train.py` in each, prefix and forward their
logs, and stop them all when the job ends or fails. In `--mode=auto` it also
performs the restarts that a switch asks for: when the chief exits with
`switching.EXIT_SWITCH`, it starts the next phase in the mode that
`switching.current_mode` reads from the model directory.

Topologies per mode (N = --workers, P = --ps):

* sync: N `worker` tasks; worker 0 acts as chief.
* gba / async: one `chief` (the coordinator), N `worker`, P `ps` tasks.

Example:

```python
launcher = LocalLauncher(["--flagfile=configs/local_gba.cfg"], workers=2,
                         ps=1, mode="auto", model_dir="/tmp/job")
exit_code = launcher.run()
```
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, TextIO

from gba_tf import cluster as cluster_lib
from gba_tf import switching

_TRAIN_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
    "train.py")
# After the chief exits, the other sync workers finish their last step and
# exit on their own; past this they are presumed stuck in a collective.
_PEER_EXIT_GRACE_S = 30.0
# Between SIGTERM and SIGKILL when stopping a phase.
_TERMINATE_GRACE_S = 5.0
# How often the launcher looks at its children.
_POLL_S = 0.1
# More phases than this means the job is flapping between modes.
_MAX_PHASES = 20


@dataclasses.dataclass
class PhaseResult:
  mode: str
  exit_code: int
  seconds: float
  failed_task: Optional[str] = None


class LocalLauncher:
  """Launches, watches and restarts the tasks of one job. Not thread-safe.

  Args:
    train_args: arguments for every task's `scripts/train.py` (flagfile and
      overrides; `--mode` and `--model_dir` are appended).
    workers: worker tasks.
    ps: parameter server tasks (gba and async phases).
    mode: "gba", "sync", "async" or "auto".
    model_dir: shared by every phase (checkpoints, switch state).
    straggler_until: Unix time passed to every task; 0 = never recover.
    out: where the prefixed task logs go.
    env: extra environment variables for the tasks.
  """

  def __init__(self, train_args: List[str], workers: int, ps: int,
               mode: str, model_dir: str, straggler_until: float = 0.0,
               out: TextIO = sys.stdout,
               env: Optional[Dict[str, str]] = None,
               script: str = _TRAIN_SCRIPT):
    if workers < 1:
      raise ValueError(f"Received: workers={workers}, which must be >= 1.")
    if mode in ("gba", "async", "auto") and ps < 1:
      raise ValueError(f"Received: ps={ps}; --mode={mode} needs at least one "
                       "parameter server.")
    self.train_args = list(train_args)
    self.workers = workers
    self.ps = ps
    self.mode = mode
    self.model_dir = model_dir
    self.straggler_until = straggler_until
    self.out = out
    self.env = dict(env or {})
    self.script = script
    self.phases: List[PhaseResult] = []
    self._procs: Dict[str, subprocess.Popen] = {}
    self._threads: List[threading.Thread] = []
    self._lock = threading.Lock()

  # -- one phase ------------------------------------------------------------

  def _spec(self, mode: str) -> Dict[str, List[str]]:
    if mode == "sync":
      return cluster_lib.make_cluster_spec(self.workers, 0)
    return cluster_lib.make_cluster_spec(self.workers, self.ps, num_chief=1)

  def _say(self, line: str) -> None:
    with self._lock:
      self.out.write(line)
      self.out.flush()

  def _forward(self, name: str, stream) -> None:
    for raw in iter(stream.readline, b""):
      self._say(f"[{name}] {raw.decode(errors='replace')}")
    stream.close()

  def _start(self, mode: str) -> str:
    spec = self._spec(mode)
    chief = "worker:0" if mode == "sync" else "chief:0"
    args = self.train_args + [f"--mode={self.mode}",
                              f"--model_dir={self.model_dir}"]
    if self.straggler_until:
      args.append(f"--straggler_until={self.straggler_until}")
    # Servers first, so the coordinator finds them listening.
    for job in ("ps", "worker", "chief"):
      for index in range(len(spec.get(job, []))):
        name = f"{job}:{index}"
        env = dict(os.environ)
        env.update(self.env)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": spec, "task": {"type": job, "index": index}})
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.Popen([sys.executable, self.script] + args, env=env,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        self._procs[name] = proc
        thread = threading.Thread(target=self._forward,
                                  args=(name, proc.stdout), daemon=True)
        thread.start()
        self._threads.append(thread)
    return chief

  def _wait(self, mode: str, chief: str) -> PhaseResult:
    start = time.monotonic()
    while True:
      code = self._procs[chief].poll()
      if code is not None:
        break
      for name, proc in self._procs.items():
        finished = proc.poll() is not None
        # A sync worker may finish (0) or stop to switch just before worker
        # 0 does; PS-mode servers never exit on their own.
        if finished and mode == "sync" and proc.returncode in (
            0, switching.EXIT_SWITCH):
          continue
        if name != chief and finished:
          self._say(f"[launcher] {name} exited with code {proc.returncode}; "
                    "stopping the job.\n")
          self.stop()
          return PhaseResult(mode, proc.returncode or 1,
                             time.monotonic() - start, failed_task=name)
      time.sleep(_POLL_S)
    if mode == "sync":
      deadline = time.monotonic() + _PEER_EXIT_GRACE_S
      for proc in self._procs.values():
        try:
          proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          pass
    self.stop()
    return PhaseResult(mode, code, time.monotonic() - start)

  def stop(self) -> None:
    """Stops every task of the current phase (SIGTERM, then SIGKILL)."""
    for proc in self._procs.values():
      if proc.poll() is None:
        proc.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for proc in self._procs.values():
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for thread in self._threads:
      thread.join(timeout=1.0)
    self._procs, self._threads = {}, []

  # -- the job ------------------------------------------------------------------

  def run(self) -> int:
    """Runs phases until the job ends; returns the chief's exit code."""
    os.makedirs(self.model_dir, exist_ok=True)
    previous = signal.getsignal(signal.SIGTERM)
    # A SIGTERM to the launcher (Ctrl-C arrives as KeyboardInterrupt) must
    # not leave orphaned servers holding ports.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
      for _ in range(_MAX_PHASES):
        mode = (switching.current_mode(self.model_dir)
                if self.mode == "auto" else self.mode)
        self._say(f"[launcher] starting a {mode} phase: {self.workers} "
                  f"workers" + ("" if mode == "sync" else
                                f" + {self.ps} ps + chief") + "\n")
        chief = self._start(mode)
        result = self._wait(mode, chief)
        self.phases.append(result)
        self._say(f"[launcher] {mode} phase ended after "
                  f"{result.seconds:.1f} s with code {result.exit_code}\n")
        if result.exit_code == switching.EXIT_SWITCH and self.mode == "auto":
          continue
        return result.exit_code
      self._say(f"[launcher] more than {_MAX_PHASES} phases; stopping.\n")
      return 1
    finally:
      self.stop()
      signal.signal(signal.SIGTERM, previous)
