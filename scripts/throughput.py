"""Benchmark: local steps/s of GBA vs plain ParameterServerStrategy.

Same local multi-process cluster (one OS process per task, gRPC on
loopback), same model, data and optimizer; only the strategy differs. Modes
are interleaved across repeats so that drift of the machine hits both.

  python scripts/throughput.py --workers=2 --ps=1 --steps=400 --repeats=3

Prints a table and writes results/throughput.json. Each run also measures
the CPU each local step costs, per role (parameter servers, workers, chief),
from /proc over the timed part of the run only (after the warm-up, so TF
start-up and tracing are not counted, and after a garbage collection, so
that the warm-up's released iterators are not either). The timed part ends
when training does, not when `fit` returns (`gba_tf/launch/fit_clock.py`);
each row's `release_seconds` is the rest.
"""

import gc
import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gba_tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from gba_tf import compat  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import cpu_cost  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import fit_clock  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import flags as gba_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import job_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import local_cluster  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  gba_flags.define_flags()
  flags.DEFINE_integer("steps", 400, "Timed local steps per run.")
  flags.DEFINE_integer("warmup_steps", 40, "Untimed local steps per run.")
  flags.DEFINE_integer("repeats", 3, "Runs per mode, interleaved.")
  flags.DEFINE_list("modes", ["pss", "gba"], "Modes to compare.")
  flags.DEFINE_string("out", "results/throughput.json", "JSON output.")
  flags.DEFINE_list(
      "sweep_step_ms", [],
      "CPU per push at equal load: run every mode at each of these emulated "
      "compute times (ms per local step; 0 = none), interleaved, and compare "
      "the CPU per local step of the modes at each, and its slope against "
      "the step rate. Each run times about --sweep_seconds.")
  flags.DEFINE_float("sweep_seconds", 30.0,
                     "Target length of one timed run of --sweep_step_ms "
                     "(its steps: this times the ideal step rate).")
  FLAGS.set_default("workers", 2)
  FLAGS.set_default("ps", 1)


def _strategy(mode, resolver, config, num_ps):
  partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(
      num_ps)
  if mode == "pss":
    return tf.distribute.experimental.ParameterServerStrategy(
        resolver, partitioner)
  if mode == "gba":
    return gba_tf.GBAStrategy(resolver, config, partitioner)
  raise ValueError(f"Received: mode={mode!r}, which is not 'pss' or 'gba'.")


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process so far (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  # Fields 14 and 15 of /proc/PID/stat (utime, stime), after the name.
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_jiffies():
  """(stolen, all) CPU time of the whole machine so far, from /proc/stat.

  "Steal" is time a virtual machine's CPUs were runnable but the host ran
  something else: on a shared host it slows a run without any process of
  it using more CPU, which is worth seeing next to a run's speed.
  """
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  # user nice system idle iowait irq softirq steal ...
  return fields[7], sum(fields[:8])


def _cpu_by_role(cluster) -> dict:
  roles = {"ps": 0.0, "worker": 0.0, "chief": _cpu_seconds(os.getpid())}
  for name, proc in cluster.processes.items():
    roles[name.split(":")[0]] += _cpu_seconds(proc.pid)
  return roles


def run_once(mode, cluster, data, ids, labels, config, steps=None,
             step_ms=None):
  steps = FLAGS.steps if steps is None else steps
  step_ms = FLAGS.step_ms if step_ms is None else step_ms
  strategy = _strategy(mode, cluster.resolver(), config, FLAGS.ps)
  with strategy.scope():
    model = models.MODELS[FLAGS.model](data.num_fields, data.vocab_size)
    model.compile(tf.keras.optimizers.Adagrad(0.05),
                  tf.keras.losses.BinaryCrossentropy(from_logits=True))

  dataset_fn = synthetic.dataset_fn(ids, labels, FLAGS.local_batch_size,
                                    step_ms,
                                    gba_flags.parse_straggler(
                                        FLAGS.straggler))
  creator = tf.keras.utils.experimental.DatasetCreator(dataset_fn)
  model.fit(creator, epochs=1, steps_per_epoch=FLAGS.warmup_steps, verbose=0)
  # What the warm-up (and the previous run) left behind is freed here, not
  # inside the timed part: releasing a per-worker iterator removes its
  # functions from the remote context, which holds the chief's GIL for
  # seconds (README, "Results") and dispatches no closure meanwhile.
  gc.collect()
  cpu_before = _cpu_by_role(cluster)
  steal_before, total_before = _machine_jiffies()
  # Timed to the end of training, not to fit's return: the functions fit
  # releases on return can stall the idle cluster for seconds
  # (gba_tf/launch/fit_clock.py). The CPU read after the return adds only
  # that idle time.
  history, seconds, release_seconds = fit_clock.timed_fit(
      model, creator, epochs=1, steps_per_epoch=steps, verbose=0)
  cpu_after = _cpu_by_role(cluster)
  steal_after, total_after = _machine_jiffies()
  row = {"mode": mode, "local_steps": steps, "step_ms": step_ms,
         "seconds": seconds, "release_seconds": release_seconds,
         "local_steps_per_s": steps / seconds,
         "samples_per_s": steps * FLAGS.local_batch_size / seconds,
         "loss": float(history.history["loss"][-1]),
         "optimizer_steps": int(model.optimizer.iterations.numpy()),
         "host_steal_fraction": ((steal_after - steal_before)
                                 / max(total_after - total_before, 1)),
         "cpu_ms_per_local_step": {
             role: 1e3 * (cpu_after[role] - cpu_before[role]) / steps
             for role in cpu_before}}
  if mode == "gba":
    m = strategy.gba_metrics()
    row.update({k: m[k] for k in ("pushed", "applied", "dropped", "pending",
                                  "global_steps", "decayed")})
    row["staleness_histogram"] = m["staleness_histogram"]
  return row


def sweep(cluster, data, ids, labels, config):
  """--sweep_step_ms: every mode at each compute time, modes side by side."""
  rows = []
  for repeat in range(FLAGS.repeats):
    for step_ms in [float(x) for x in FLAGS.sweep_step_ms]:
      # About --sweep_seconds at the ideal rate; --steps without a sleep.
      steps = (FLAGS.steps if step_ms == 0 else max(
          100, int(FLAGS.sweep_seconds * FLAGS.workers * 1000.0 / step_ms)))
      for mode in FLAGS.modes:
        row = run_once(mode, cluster, data, ids, labels, config, steps,
                       step_ms)
        row["repeat"] = repeat
        rows.append(row)
        print(f"[{repeat}] step_ms {step_ms:g} {mode:4s} "
              f"{row['local_steps_per_s']:8.1f} local steps/s  CPU ms per "
              "local step " + " / ".join(
                  f"{row['cpu_ms_per_local_step'][r]:.2f}"
                  for r in cpu_cost.ROLES)
              + f"  host steal {row['host_steal_fraction']:.1%}", flush=True)
  return rows


def main(argv):
  del argv
  config = job_config.gba_config_from_flags()
  # As the job does: without it `fit`'s return, after the timed part,
  # stalled for up to a minute (README "`fit` can return late").
  compat.disable_device_autotune()
  data = synthetic.SyntheticCTR()
  ids, labels = data.sample(65_536)
  if FLAGS.sweep_step_ms:
    with local_cluster.LocalCluster(FLAGS.workers, FLAGS.ps) as cluster:
      rows = sweep(cluster, data, ids, labels, config)
    summary = cpu_cost.summarize(rows)
    print("\n" + "\n".join(cpu_cost.table(summary)))
    _write(config, summary, rows)
    tasks.exit_now(0)
  rows = []
  with local_cluster.LocalCluster(FLAGS.workers, FLAGS.ps) as cluster:
    for repeat in range(FLAGS.repeats):
      for mode in FLAGS.modes:
        row = run_once(mode, cluster, data, ids, labels, config)
        row["repeat"] = repeat
        rows.append(row)
        print(f"[{repeat}] {mode:4s} {row['local_steps_per_s']:8.1f} local "
              f"steps/s  host steal {row['host_steal_fraction']:.1%}  "
              f"loss {row['loss']:.4f}", flush=True)
  summary = {}
  for mode in FLAGS.modes:
    rates = [r["local_steps_per_s"] for r in rows if r["mode"] == mode]
    summary[mode] = {"median_local_steps_per_s": float(np.median(rates)),
                     "runs": rates}
  if {"pss", "gba"} <= set(summary):
    summary["gba_over_pss"] = (summary["gba"]["median_local_steps_per_s"] /
                               summary["pss"]["median_local_steps_per_s"])
  print("\nmode   median local steps/s   runs")
  for mode in FLAGS.modes:
    runs = ", ".join(f"{r:.1f}" for r in summary[mode]["runs"])
    print(f"{mode:6s} {summary[mode]['median_local_steps_per_s']:20.1f}   "
          f"{runs}")
  for mode in FLAGS.modes:
    summary[mode]["median_cpu_ms_per_local_step"] = {
        role: float(np.median([r["cpu_ms_per_local_step"][role] for r in rows
                               if r["mode"] == mode]))
        for role in ("ps", "worker", "chief")}
  print("\nCPU ms per local step (median)   ps   workers   chief")
  for mode in FLAGS.modes:
    cpu = summary[mode]["median_cpu_ms_per_local_step"]
    print(f"{mode:6s} {cpu['ps']:27.2f} {cpu['worker']:9.2f} "
          f"{cpu['chief']:7.2f}")
  if "gba_over_pss" in summary:
    print(f"GBA / PSS = {summary['gba_over_pss']:.3f}")
    summary["gba_over_pss_cpu"] = {
        role: (summary["gba"]["median_cpu_ms_per_local_step"][role]
               / summary["pss"]["median_cpu_ms_per_local_step"][role])
        for role in ("ps", "worker", "chief")}
    print("GBA / PSS CPU per local step: " + ", ".join(
        f"{role} {ratio:.2f}"
        for role, ratio in summary["gba_over_pss_cpu"].items()))
  _write(config, summary, rows)
  tasks.exit_now(0)


def _write(config, summary, rows):
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"flags": {k: FLAGS[k].value for k in (
        "workers", "ps", "model", "local_batch_size", "steps", "warmup_steps",
        "repeats", "step_ms", "straggler", "sweep_step_ms", "sweep_seconds")},
               "global_batch_size": config.global_batch_size, "summary": summary,
               "runs": rows}, f, indent=2)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
