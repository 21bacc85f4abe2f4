"""Soak test (opt-in, not CI): long GBA training with a straggler that moves.

Runs the benchmark job (`configs/benchmark.cfg`: 4 workers + 2 PS, DCN-v2)
in GBA mode for `--minutes`, with the slow worker (1/4 speed) re-drawn every
`--straggler_period` seconds, and samples every task's resident memory
(VmRSS) every `--sample_seconds`. Every loop's log line also gives the
GBA counters: `accumulator_bytes` (the gradient buffers on the PS) and
`pending` (gradients waiting in them). GBA's accumulators are fixed-shape
variables allocated once per shard, so the PS memory must stay flat; the
report says whether it did: growth per task, and the slope (MiB/min) of a
least-squares line over the second half of the run.

  python scripts/soak.py --minutes=30

Writes `results/soak.json` (samples, growth and slope per task, accumulator
curve, training progress) and `results/soak_memory.png`.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
from gba_tf.launch import local_cluster  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_float("minutes", 30.0, "How long to train.")
  flags.DEFINE_enum("mode", "gba", ("gba", "async"),
                    "gba, or plain ParameterServerStrategy for comparison.")
  flags.DEFINE_string("name", "soak", "Output file stem in --out_dir.")
  flags.DEFINE_bool("backup", True, "Checkpoint every loop (200 steps), "
                    "as a production job would.")
  flags.DEFINE_integer("straggler_period", 60,
                       "Seconds between two draws of the slow workers.")
  flags.DEFINE_string("straggler", "0:4",
                      "Slowdowns of the moving stragglers, INDEX:SLOWDOWN "
                      "[,...] (e.g. 0:3,1:6: two, at 1/3 and 1/6 speed); "
                      "each period they fall on consecutive workers from "
                      "one drawn from the clock.")
  flags.DEFINE_float("sample_seconds", 10.0, "Memory sampling interval.")
  flags.DEFINE_string("out_dir", os.path.join(_ROOT, "results"),
                      "Where soak.json and soak_memory.png go.")


def _slope(points):
  """Least-squares MiB per minute through (minutes, MiB) points."""
  if len(points) < 2:
    return 0.0
  n = len(points)
  mx = sum(x for x, _ in points) / n
  my = sum(y for _, y in points) / n
  sxx = sum((x - mx) ** 2 for x, _ in points)
  return (sum((x - mx) * (y - my) for x, y in points) / sxx) if sxx else 0.0


def main(argv):
  del argv
  model_dir = tempfile.mkdtemp(prefix="gba_soak_")
  cmd = [sys.executable, os.path.join(_ROOT, "scripts", "launch_local.py"),
         f"--flagfile={os.path.join(_ROOT, 'configs', 'benchmark.cfg')}",
         f"--mode={FLAGS.mode}", f"--straggler={FLAGS.straggler}",
         f"--straggler_period={FLAGS.straggler_period}",
         "--train_steps=100000000", "--steps_per_loop=200",
         "--eval_examples=0", f"--model_dir={model_dir}",
         "--checkpoint_every_loop" if FLAGS.backup
         else "--nocheckpoint_every_loop"]
  print("soak:", " ".join(cmd[1:]), flush=True)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  log_path = os.path.join(FLAGS.out_dir, f"{FLAGS.name}.log")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  epochs = []
  accumulator = []  # per loop: minutes, accumulator_bytes, pending

  def read():
    with open(log_path, "w") as log:
      for line in proc.stdout:
        log.write(line)
        match = re.search(r"\[chief:0\] Epoch (\d+)/", line)
        if match:
          epochs.append((time.monotonic(), int(match.group(1))))
        counters = dict(re.findall(r"gba/(\w+): ([0-9.e+-]+)", line))
        if line.startswith("[chief:0]") and "accumulator_bytes" in counters:
          accumulator.append({
              "minutes": (time.monotonic() - start) / 60.0,
              "accumulator_bytes": float(counters["accumulator_bytes"]),
              "pending": float(counters["pending"])})

  start = time.monotonic()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  samples = []
  deadline = start + FLAGS.minutes * 60
  while time.monotonic() < deadline and proc.poll() is None:
    time.sleep(FLAGS.sample_seconds)
    try:
      with open(os.path.join(model_dir, "tasks.json")) as f:
        tasks = json.load(f)
    except (OSError, ValueError):
      continue
    row = {"minutes": (time.monotonic() - start) / 60.0}
    row.update({name: local_cluster.resident_mib(pid)
                for name, pid in tasks.items()})
    samples.append(row)
    loops = epochs[-1][1] if epochs else 0
    print(f"[soak] {row['minutes']:5.1f} min, loop {loops}: " + ", ".join(
        f"{k} {v:.0f} MiB" for k, v in row.items()
        if k != "minutes" and v is not None), flush=True)
  alive = proc.poll() is None
  if alive:
    os.killpg(proc.pid, signal.SIGTERM)
  proc.wait(timeout=60)
  reader.join(timeout=10)
  shutil.rmtree(model_dir, ignore_errors=True)  # checkpoints only

  # Growth: last tenth of the samples against the tenth after warm-up
  # (the first minute is TF start-up and tracing).
  steady = [s for s in samples if s["minutes"] >= 1.0] or samples
  tenth = max(1, len(steady) // 10)
  growth = {}
  for name in sorted({k for s in steady for k in s if k != "minutes"}):
    values = [s[name] for s in steady if s.get(name) is not None]
    if len(values) >= 2:
      first = sorted(values[:tenth])[len(values[:tenth]) // 2]
      last = sorted(values[-tenth:])[len(values[-tenth:]) // 2]
      half = [(s["minutes"], s[name]) for s in steady
              if s.get(name) is not None
              and s["minutes"] >= steady[len(steady) // 2]["minutes"]]
      growth[name] = {"first_mib": first, "last_mib": last,
                      "growth_mib": last - first, "max_mib": max(values),
                      "second_half_mib_per_min": _slope(half)}
  loops = epochs[-1][1] - 1 if epochs else 0
  report = {"mode": FLAGS.mode, "minutes": FLAGS.minutes, "straggler": FLAGS.straggler, "straggler_period": FLAGS.straggler_period,
            "ran_to_the_end": alive, "loops_completed": loops,
            "optimizer_steps": loops * 200, "samples": samples,
            "growth": growth, "accumulator": accumulator,
            "accumulator_bytes": sorted({a["accumulator_bytes"]
                                         for a in accumulator}),
            "max_pending": max((a["pending"] for a in accumulator),
                               default=None),
            "log": log_path}
  with open(os.path.join(FLAGS.out_dir, f"{FLAGS.name}.json"), "w") as f:
    json.dump(report, f, indent=2)
  print("\ntask      first MiB  last MiB  growth  max  MiB/min (2nd half)")
  for name, g in growth.items():
    print(f"{name:9} {g['first_mib']:9.0f} {g['last_mib']:9.0f} "
          f"{g['growth_mib']:+7.1f} {g['max_mib']:5.0f} "
          f"{g['second_half_mib_per_min']:+8.2f}")
  if accumulator:
    print(f"accumulator bytes over {len(accumulator)} loops: "
          f"{report['accumulator_bytes']}; most gradients pending: "
          f"{report['max_pending']:.0f}")
  print(f"ran to the end: {alive}; about {loops * 200} optimizer steps")

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, acc_ax) = plt.subplots(
      2, 1, figsize=(8, 6), sharex=True,
      gridspec_kw={"height_ratios": (3, 1)})
  for name in growth:
    ax.plot([s["minutes"] for s in samples if s.get(name) is not None],
            [s[name] for s in samples if s.get(name) is not None],
            label=name)
  ax.set_ylabel("resident memory (MiB)")
  ax.set_title(f"{FLAGS.mode} soak: moving stragglers {FLAGS.straggler}, "
               "4 workers + 2 PS")
  ax.legend(fontsize=8, ncol=2)
  ax.grid(alpha=0.3)
  if accumulator:
    acc_ax.plot([a["minutes"] for a in accumulator],
                [a["accumulator_bytes"] / 2**20 for a in accumulator],
                label="accumulator buffers (MiB)")
    acc_ax.plot([a["minutes"] for a in accumulator],
                [a["pending"] for a in accumulator], ".",
                label="gradients pending at loop end")
    acc_ax.legend(fontsize=8)
  acc_ax.set_xlabel("minutes")
  acc_ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out_dir, f"{FLAGS.name}_memory.png"),
              dpi=100)
  return 0 if alive else 1


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
