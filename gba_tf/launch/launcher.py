"""Runs a whole training job on this machine: one process per task.

`LocalLauncher` is what `gba-launch` (`gba_tf/bin/launch_local.py`) runs
and what Kubernetes (a TFJob) does in a real cluster: give every task its
own TF_CONFIG on loopback ports, start `python -m gba_tf.bin.train` in each,
prefix and forward their logs, and stop them all when the job ends or
fails. In `--mode=auto` it also performs the restarts that a switch asks
for: when the chief exits with `switching.EXIT_SWITCH`, it starts the next
phase in the mode that `switching.current_mode` reads from the model
directory. In gba and async phases it restarts a dead worker, and restarts
the phase from the last checkpoint when the chief loses a PS or is killed
by a signal.

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
from typing import Dict, List, Optional, TextIO, Tuple

from gba_tf import switching
from gba_tf.launch import loopback
from gba_tf.launch import tasks

# Every task runs the training entry point as a module of the same gba_tf
# as this launcher: an installed wheel has no scripts/ directory to run.
_TRAIN_MODULE = "gba_tf.bin.train"
# The directory that holds this launcher's gba_tf package, put first on the
# tasks' PYTHONPATH so that they import the same code from any directory.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# After the chief exits, the other sync workers finish their last step and
# exit on their own; past this they are presumed stuck in a collective.
_PEER_EXIT_GRACE_S = 30.0
# How often the launcher looks at its children.
_POLL_S = 0.1
# More phases than this means the job is flapping between modes.
_MAX_PHASES = 20
# A dead worker server is restarted, as Kubernetes would (restartPolicy
# OnFailure), after this back-off; ClusterCoordinator re-admits it.
_WORKER_RESTART_DELAY_S = 1.0
# Per worker and phase; past it the worker stays down.
_MAX_TASK_RESTARTS = 5
# A dead PS is not restarted within its phase: the chief must see it gone
# (UnavailableError), exit with EXIT_RESUME, and the next phase starts a
# fresh PS. Restarting it in place, after any fixed delay, races the chief:
# a fresh, empty PS answering on the same port turns the chief's error
# into one it does not recognize as a lost PS. Past this grace after a PS
# died, a chief that has not exited fails the phase.
_PS_LOSS_GRACE_S = 180.0
# Phases restarted from the last checkpoint after a PS failure or a chief
# killed by a signal, per job.
_MAX_RESUMES = 3


@dataclasses.dataclass
class PhaseResult:
  mode: str
  exit_code: int
  seconds: float
  failed_task: Optional[str] = None


class LocalLauncher:
  """Launches, watches and restarts the tasks of one job. Not thread-safe.

  Args:
    train_args: arguments for every task's `gba-train` (flagfile and
      overrides; `--mode` and `--model_dir` are appended).
    workers: worker tasks.
    ps: parameter server tasks (gba and async phases).
    mode: "gba", "sync", "async" or "auto".
    model_dir: shared by every phase (checkpoints, switch state).
    straggler_until: Unix time passed to every task; 0 = never recover.
    out: where the prefixed task logs go.
    env: extra environment variables for the tasks.
    script: a training script every task runs by path, instead of the
      `gba_tf.bin.train` module (None, the default).
    restart_tasks: in gba / async phases, restart a worker server that
      dies, and restart the phase from the last checkpoint when the chief
      is killed by a signal (as Kubernetes restarts a TFJob chief under
      `restartPolicy: ExitCode`, which retries exit codes 128-255). False
      leaves dead workers down and ends the job with a killed chief. A dead
      PS makes the chief resume from the last checkpoint in a new phase,
      either way.
  """

  def __init__(self, train_args: List[str], workers: int, ps: int,
               mode: str, model_dir: str, straggler_until: float = 0.0,
               out: TextIO = sys.stdout,
               env: Optional[Dict[str, str]] = None,
               script: Optional[str] = None, restart_tasks: bool = True):
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
    self.restart_tasks = restart_tasks
    self.phases: List[PhaseResult] = []
    self.task_restarts: Dict[str, int] = {}
    self._procs: Dict[str, subprocess.Popen] = {}
    self._spec: Dict[str, List[str]] = {}
    self._args: List[str] = []
    self._due: Dict[str, float] = {}
    self._ps_lost: Optional[Tuple[str, float]] = None
    self._threads: List[threading.Thread] = []
    self._lock = threading.Lock()

  # -- one phase ------------------------------------------------------------

  def spec_for(self, mode: str) -> Dict[str, List[str]]:
    """The cluster spec of a `mode` phase, on free loopback ports."""
    if mode == "sync":
      return tasks.make_cluster_spec(self.workers, 0)
    return tasks.make_cluster_spec(self.workers, self.ps, num_chief=1)

  def _say(self, line: str) -> None:
    with self._lock:
      self.out.write(line)
      self.out.flush()

  def _forward(self, name: str, stream) -> None:
    for raw in iter(stream.readline, b""):
      self._say(f"[{name}] {raw.decode(errors='replace')}")
    stream.close()

  def _spawn(self, job: str, index: int) -> None:
    name = f"{job}:{index}"
    env = tasks.task_environment(self._spec, job, index, self.env)
    env["PYTHONUNBUFFERED"] = "1"
    # The task exits with this process however it dies (`gba-train` calls
    # tasks.die_with_parent first): a launcher SIGKILLed by a test's timeout
    # used to leave its job's four servers running, holding their ports.
    env[tasks.PARENT_PID_ENV] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(
        [_PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    entry = ([self.script] if self.script
             else ["-m", _TRAIN_MODULE])
    proc = subprocess.Popen([sys.executable] + entry + self._args,
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    self._procs[name] = proc
    thread = threading.Thread(target=self._forward, args=(name, proc.stdout),
                              daemon=True)
    thread.start()
    self._threads.append(thread)
    self._write_tasks()

  def _write_tasks(self) -> None:
    """`<model_dir>/tasks.json`: each running task's PID (for operators)."""
    path = os.path.join(self.model_dir, "tasks.json")
    with open(path + ".tmp", "w") as f:
      json.dump({name: proc.pid for name, proc in self._procs.items()}, f)
    os.replace(path + ".tmp", path)

  def _start(self, mode: str) -> str:
    self._spec = self.spec_for(mode)
    # A free port for the chief's tf.data service (used by --input=shared):
    # every task of the phase must know it before the chief starts.
    service_port = tasks.pick_unused_ports(1)[0]
    self._args = self.train_args + [f"--mode={self.mode}",
                                    f"--model_dir={self.model_dir}",
                                    f"--data_service_port={service_port}"]
    if self.straggler_until:
      self._args.append(f"--straggler_until={self.straggler_until}")
    self._due = {}
    self._ps_lost = None
    # Servers first, so the coordinator finds them listening.
    for job in ("ps", "worker", "chief"):
      for index in range(len(self._spec.get(job, []))):
        self._spawn(job, index)
    return "worker:0" if mode == "sync" else "chief:0"

  def _handle_exit(self, mode: str, name: str, code: int) -> Optional[str]:
    """A non-chief task ended; returns why the phase must stop, or None."""
    job = name.split(":")[0]
    if mode == "sync":
      # A sync worker may finish (0) or stop to switch just before worker 0
      # does; any other exit breaks the all-reduce for everyone.
      if code in (0, switching.EXIT_SWITCH):
        return None
      return f"{name} exited with code {code}"
    if job == "ps":
      self._say(f"[launcher] {name} exited with code {code}; waiting for "
                "the chief to resume from the last checkpoint\n")
      self._ps_lost = (name, time.monotonic())
      return None
    restarts = self.task_restarts.get(name, 0)
    if self.restart_tasks and restarts < _MAX_TASK_RESTARTS:
      self._say(f"[launcher] {name} exited with code {code}; restarting it "
                f"in {_WORKER_RESTART_DELAY_S:.0f} s\n")
      self._due[name] = time.monotonic() + _WORKER_RESTART_DELAY_S
      return None
    self._say(f"[launcher] {name} exited with code {code}; training "
              "goes on without it\n")
    return None

  def _wait(self, mode: str, chief: str) -> PhaseResult:
    start = time.monotonic()
    handled = set()
    while True:
      code = self._procs[chief].poll()
      if code is not None:
        break
      for name, proc in list(self._procs.items()):
        if name == chief or name in handled or proc.poll() is None:
          continue
        handled.add(name)
        failure = self._handle_exit(mode, name, proc.returncode)
        if failure:
          self._say(f"[launcher] {failure}; stopping the job.\n")
          self.stop()
          return PhaseResult(mode, proc.returncode or 1,
                             time.monotonic() - start, failed_task=name)
      if (self._ps_lost is not None and
          time.monotonic() - self._ps_lost[1] > _PS_LOSS_GRACE_S):
        name = self._ps_lost[0]
        self._say(f"[launcher] the chief did not exit within "
                  f"{_PS_LOSS_GRACE_S:.0f} s of losing {name}; stopping the "
                  "job.\n")
        self.stop()
        return PhaseResult(mode, 1, time.monotonic() - start,
                           failed_task=name)
      for name, due in list(self._due.items()):
        if time.monotonic() >= due:
          del self._due[name]
          handled.discard(name)
          self.task_restarts[name] = self.task_restarts.get(name, 0) + 1
          job, index = name.split(":")
          self._spawn(job, int(index))
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

  def _resume_reason(self, mode: str, code: int) -> Optional[str]:
    """Why a phase whose chief exited with `code` resumes from the last
    checkpoint, or None if the job ends with it."""
    if code == tasks.EXIT_RESUME:
      return "lost a parameter server"
    # A chief killed by a signal (an OOM kill, a crash: TensorFlow's
    # recovery of a restarted worker has been seen to segfault the chief)
    # takes its ClusterCoordinator with it, but the variables are
    # checkpointed every loop (--checkpoint_every_loop, the default): a new
    # phase resumes from the last one. A sync phase has no coordinator to
    # lose; its worker 0 dying is one of its workers failing, which ends
    # the job.
    if code < 0 and mode != "sync" and self.restart_tasks:
      return f"was killed by signal {-code}"
    return None

  def stop(self) -> None:
    """Stops every task of the current phase (SIGTERM, then SIGKILL)."""
    tasks.terminate(self._procs.values())
    for thread in self._threads:
      thread.join(timeout=1.0)
    self._procs, self._threads = {}, []

  # -- the job ------------------------------------------------------------------

  def run(self) -> int:
    """Runs phases until the job ends; returns the chief's exit code."""
    os.makedirs(self.model_dir, exist_ok=True)
    if not loopback.environment():
      self._say("[launcher] warning: no C compiler to build the loopback "
                "shim; TensorFlow servers will listen on all interfaces.\n")
    previous = signal.getsignal(signal.SIGTERM)
    # A SIGTERM to the launcher (Ctrl-C arrives as KeyboardInterrupt) must
    # not leave orphaned servers holding ports.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
      resumes = 0
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
        why = self._resume_reason(mode, result.exit_code)
        if why and resumes < _MAX_RESUMES:
          resumes += 1
          self._say(f"[launcher] the chief {why}; restarting the phase from "
                    "the last checkpoint\n")
          continue
        return result.exit_code
      self._say(f"[launcher] more than {_MAX_PHASES} phases; stopping.\n")
      return 1
    finally:
      self.stop()
      signal.signal(signal.SIGTERM, previous)
