"""Shared test helpers: one in-process cluster per pytest process."""

import functools
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import gba_tf
from gba_tf import compat
from gba_tf.launch import local_cluster
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = os.path.join(ROOT, "configs", "local_gba.cfg")
PACKAGE = os.path.join(ROOT, "gba_tf")


def package_modules():
  """(dotted name, path) of every module under gba_tf/."""
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, ROOT)[:-3]
        yield rel.replace(os.sep, ".").removesuffix(".__init__"), path


# Every unit test that needs servers shares this shape: 2 workers so that one
# can be held while the other runs, 2 PS so that sharded variables really are
# split across PS tasks.
NUM_WORKERS = 2
NUM_PS = 2


@functools.lru_cache(maxsize=None)
def shared_cluster() -> local_cluster.InProcessCluster:
  """Servers cannot be stopped in TF 2.21, so build them once per process."""
  return local_cluster.InProcessCluster(num_workers=NUM_WORKERS,
                                         num_ps=NUM_PS)


# Objects that hold remote handles on a test's own LocalCluster. Once that
# cluster is stopped and the context has moved to another cluster, TF 2.21
# segfaults when the garbage collector destroys such a variable (seen in
# `make test`, inside a later test's tracing); keeping them alive for the
# life of the pytest process avoids the remote destroy.
_KEEP_ALIVE = []


def keep_alive(*objects) -> None:
  """Never garbage-collect `objects` (remote handles of a stopped cluster).

  A strategy's threads (stall watchdog, applier) are stopped: they would
  poll, or wait on, the stopped cluster.
  """
  for obj in objects:
    if isinstance(obj, gba_tf.GBAStrategy):
      obj.extended.aggregator.stop_threads()
  _KEEP_ALIVE.append(objects)


def collect_before_switching_cluster() -> None:
  """Destroys unreachable remote objects while their cluster is current.

  A test that connects to a cluster of its own moves the eager context
  away from the shared one; a variable of the shared cluster destroyed
  after that (e.g. a Keras model in a reference cycle, freed by a later
  garbage collection) segfaults TF 2.21 the same way. Call right before
  connecting elsewhere. GBA stall watchdogs (threads that poll the current
  cluster) are stopped first: one polling across the switch segfaults too.
  """
  gba_tf.accumulator.stop_all_threads()
  gc.collect()


def unpatched_device_datasets(test) -> None:
  """TF's own per-device dataset builder for the rest of `test`, then back.

  `gba_tf.compat.disable_device_autotune` patches it for the whole process,
  and every earlier test that built a `GBAStrategy` has called it; a test
  of the patch itself must start from TF's builder to be able to fail.
  """
  module = compat._multi_device_iterator_ops  # pylint: disable=protected-access
  create = module._create_device_dataset  # pylint: disable=protected-access
  test.addCleanup(setattr, module, "_create_device_dataset", create)
  module._create_device_dataset = getattr(create, "__wrapped__", create)  # pylint: disable=protected-access


def push_twice(strategy):
  """Two local steps of a 4-float model through `strategy` (a coordinator
  of its own schedules them; with M = 2, one global step). Returns the
  step `tf.function`, traced: a test reads its graph."""
  coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
  with strategy.scope():
    v = tf.Variable(tf.zeros([4]))
    optimizer = tf.keras.optimizers.SGD(0.1)

  @tf.function
  def step():
    def replica_fn():
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(v * v + v)
      optimizer.apply_gradients([(tape.gradient(loss, v), v)])
    strategy.run(replica_fn)

  for _ in range(2):
    coordinator.schedule(step)
  coordinator.join()
  return step


def layer_weights(model):
  """A Keras model's whole (possibly sharded) weights, layer by layer."""
  return [getattr(layer, name) for layer in model.layers
          for name in ("embeddings", "kernel", "bias")
          if hasattr(layer, name)]


def two_shards():
  return tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)


def shard_devices(sharded_variable):
  return [v.device for v in sharded_variable.variables]


def read_job_file(model_dir: str, name: str):
  """A JSON file a job wrote into its model directory (.jsonl: a list)."""
  with open(os.path.join(model_dir, name)) as f:
    if name.endswith(".jsonl"):
      return [json.loads(line) for line in f]
    return json.load(f)


def temp_dir(test, prefix: str) -> str:
  """A fresh directory removed when `test` ends.

  Model directories of whole jobs hold checkpoints (~20 MB each); set
  GBA_KEEP_TEST_DIRS=1 to keep them for a post-mortem.
  """
  path = tempfile.mkdtemp(prefix=prefix)
  if not os.environ.get("GBA_KEEP_TEST_DIRS"):
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def wait_while(condition, seconds: float = 30.0) -> None:
  """Polls `condition` every 0.2 s until it is false or `seconds` pass (the
  caller asserts on it afterwards: a process killed with its parent takes
  a moment to go)."""
  deadline = time.monotonic() + seconds
  while condition() and time.monotonic() < deadline:
    time.sleep(0.2)


def stop_benchmark_in_job(test, command, log_path: str) -> str:
  """Runs the benchmark `command` and stops it (SIGTERM) once the job whose
  log is `log_path` trains: once its chief logs its model directory.
  Asserts that the command exits 143 (128 + SIGTERM: its handler ran and
  stopped the job's tasks) and that no process holds that directory, which
  it returns (removed when `test` ends; a stopped job keeps it for the
  post-mortem)."""
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  test.addCleanup(proc.kill)

  def model_dir():
    try:
      with open(log_path) as f:
        for line in f:
          if line.startswith("[chief:0] [job] mode="):
            return line.split("model_dir=")[1].split()[0]
    except OSError:
      pass
    return None

  wait_while(lambda: model_dir() is None and proc.poll() is None,
             seconds=300)
  found = model_dir()
  test.assertIsNotNone(found, f"the job never started; exit {proc.poll()}")
  test.addCleanup(shutil.rmtree, found, ignore_errors=True)
  proc.terminate()
  test.assertEqual(proc.wait(timeout=120), 143)
  ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                      check=True).stdout
  test.assertNotIn(f"--model_dir={found}", ps)
  return found


def stop_then_resume(test, command, log_path: str, json_path: str, key: str):
  """`stop_benchmark_in_job`, then `command --resume` run to its end.

  Asserts that the stopped command's JSON (`json_path`) holds only the
  (`key`, seed) run ("sync", 0), its first, with `partial_seeds` 0, and
  that the resumed command exits 0 keeping it ("1 runs kept") unchanged
  and writes a finished JSON (no `partial_seeds`). Returns (the resumed
  command's stdout, the finished JSON's runs)."""
  stop_benchmark_in_job(test, command, log_path)
  with open(json_path) as f:
    stopped = json.load(f)
  test.assertEqual([(r[key], r["repeat"]) for r in stopped["runs"]],
                   [("sync", 0)])
  test.assertEqual(stopped["partial_seeds"], 0)
  proc = subprocess.run(list(command) + ["--resume"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  test.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
  test.assertIn("1 runs kept", proc.stdout)
  with open(json_path) as f:
    finished = json.load(f)
  test.assertNotIn("partial_seeds", finished)
  test.assertEqual(finished["runs"][0], stopped["runs"][0])
  return proc.stdout, finished["runs"]


def is_live_process(pid: int, named: str) -> bool:
  """Whether `pid` is a live (not zombie) process whose command line holds
  `named` (a task's model dir, a server's module): guards against PID reuse.
  A process killed after its parent died stays a zombie until reaped."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmdline = f.read().decode(errors="replace")
  except OSError:
    return False
  return state != "Z" and named in cmdline


class LaunchedJob:
  """`scripts/launch_local.py` in the background, ended with its test.

  The launcher starts every task in a session of its own, and a GBA server
  blocks in `server.join()` forever, so a test that fails or times out must
  not just drop the launcher. `stop()`, registered as a cleanup of `test`,
  sends the launcher SIGTERM (its handler stops the tasks, SIGTERM then
  SIGKILL), then SIGKILLs any task still listed in `<model_dir>/tasks.json`.

  Args:
    test: the test case; `stop` runs at its cleanup.
    model_dir: the job's model directory.
    *args: flags after `--flagfile=configs/local_gba.cfg --model_dir=...`.
    command: the launcher command (default `python scripts/launch_local.py`).
    cwd, env: of the launcher (default the repository root, this env).
  """

  def __init__(self, test, model_dir: str, *args: str, command=None,
               cwd: str = ROOT, env=None):
    self.model_dir = model_dir
    command = command or [sys.executable,
                          os.path.join(ROOT, "scripts", "launch_local.py")]
    self.proc = subprocess.Popen(
        list(command) + [f"--flagfile={FLAGFILE}", f"--model_dir={model_dir}",
                         *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    test.addCleanup(self.stop)

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def excerpt(self, tail: int = 3000) -> str:
    """For a failure message: the output's end, after the first fatal-error
    report of any task (a crash's thread stacks, which the end alone would
    leave out)."""
    out = self.output
    start = out.find("Fatal Python error")
    fatal = "" if start < 0 else out[start:start + 8000] + "\n[...]\n"
    return fatal + out[-tail:]

  def task_pids(self):
    """`{task: pid}` of the tasks the launcher runs now ({} before any)."""
    try:
      with open(os.path.join(self.model_dir, "tasks.json")) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def wait_for(self, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in self.output:
      if self.proc.poll() is not None or time.monotonic() > deadline:
        raise AssertionError(f"never saw {text!r}:\n{self.excerpt()}")
      time.sleep(0.1)

  def kill(self, task: str) -> None:
    """SIGKILLs one task of the job (fault injection)."""
    os.kill(self.task_pids()[task], signal.SIGKILL)

  def finish(self, timeout: float = 300) -> int:
    """Waits for the launcher; its exit code. Raises past `timeout`."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
      raise AssertionError(
          f"job still running after {timeout} s:\n{self.excerpt()}"
      ) from e
    self._reader.join(timeout=5)
    return self.proc.returncode

  def stop(self) -> None:
    """Ends the launcher and every task it started that is still alive."""
    tasks = self.task_pids()
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    for pid in set(tasks.values()) | set(self.task_pids().values()):
      if is_live_process(pid, self.model_dir):
        os.kill(pid, signal.SIGKILL)
    self._reader.join(timeout=5)

  def live_tasks(self):
    """Tasks listed in tasks.json whose process still runs."""
    return {name: pid for name, pid in self.task_pids().items()
            if is_live_process(pid, self.model_dir)}
