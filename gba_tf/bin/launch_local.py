"""Runs a training job on this machine, one process per task, and waits.

Every task runs `python -m gba_tf.bin.train` (the same gba_tf as this
launcher) with its own TF_CONFIG on loopback ports and the same flags as
this command; logs come back prefixed with the task (`[worker:1] ...`); every child is stopped when the job ends, fails or this
launcher is interrupted. The exit code is the chief's.

  gba-launch --flagfile=configs/local_gba.cfg
  python -m gba_tf.bin.launch_local --flagfile=configs/local_gba.cfg --mode=sync
  python scripts/launch_local.py ...   # a source checkout; the same
  # Worker 1 at 1/4 speed for the first 40 s; auto switches sync -> gba ->
  # sync:
  python scripts/launch_local.py --flagfile=configs/local_gba.cfg \\
      --mode=auto --straggler=1:4 --straggler_seconds=40

Writes `<model_dir>/launch.json`: the phases with their modes, exit codes
and wall-clock seconds.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

import gba_tf

from gba_tf.launch import flags as gba_flags
from gba_tf.launch import job_config
from gba_tf.launch import launcher as launcher_lib
from gba_tf.launch import tasks

FLAGS = flags.FLAGS


def _check_job_flags(launcher, model_dir: str) -> None:
  """Resolves the job config of every mode this job can run, as its tasks
  will (`job_config.config_from_flags`), before any task starts: a bad flag
  is one line from the launcher, not one per task after their start-up."""
  # The tasks get --model_dir; resolving without it would make a temp dir.
  FLAGS.model_dir = model_dir
  # ... and the port of the chief's tf.data service, picked per phase.
  FLAGS.data_service_port = 1
  modes = ("sync", "gba") if FLAGS.mode == "auto" else (FLAGS.mode,)
  for mode in modes:
    spec = launcher.spec_for(mode)
    chief = "worker" if mode == "sync" else "chief"
    job_config.config_from_flags(tasks.TaskConfig(spec, chief, 0), mode)


def main(argv):
  del argv
  start = time.time()
  model_dir = None
  try:
    gba_flags.parse_straggler(FLAGS.straggler)
    if FLAGS.straggler_seconds < 0:
      raise ValueError(f"Received: --straggler_seconds="
                       f"{FLAGS.straggler_seconds}, which must be >= 0.")
    model_dir = FLAGS.model_dir or tempfile.mkdtemp(prefix="gba_job_")
    until = start + FLAGS.straggler_seconds if FLAGS.straggler_seconds else 0
    # Every task gets this command's own arguments (flagfile, overrides).
    launcher = launcher_lib.LocalLauncher(
        [a for a in sys.argv[1:] if "restart_tasks" not in a],
        workers=FLAGS.workers, ps=FLAGS.ps, mode=FLAGS.mode,
        model_dir=model_dir, straggler_until=until,
        restart_tasks=FLAGS.restart_tasks)
    _check_job_flags(launcher, model_dir)
  except ValueError as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    if model_dir is not None:
      os.makedirs(model_dir, exist_ok=True)
      with open(os.path.join(model_dir, "launch.json"), "w") as f:
        json.dump({"exit_code": 2, "seconds": time.time() - start,
                   "phases": [], "error": str(e)}, f, indent=2)
    return 2
  code = launcher.run()
  seconds = time.time() - start
  with open(os.path.join(model_dir, "launch.json"), "w") as f:
    json.dump({"exit_code": code, "seconds": seconds,
               "phases": [vars(p) for p in launcher.phases],
               "gba_tf": os.path.dirname(gba_tf.__file__)}, f, indent=2)
  print(f"[launcher] job ended with code {code} after {seconds:.1f} s; "
        f"model_dir={model_dir}", flush=True)
  return code


def define_flags():
  gba_flags.define_flags()
  flags.DEFINE_bool(
      "restart_tasks", True,
      "In gba / async phases, restart a worker that dies, and restart the "
      "phase from the last checkpoint when the chief is killed by a signal, "
      "as Kubernetes would. --norestart_tasks leaves dead workers down and "
      "ends the job with a killed chief. Either way a lost PS makes the "
      "chief resume from the last checkpoint in a new phase.")


def run() -> None:
  """The `gba-launch` console entry point."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
