"""`gba-simulate`: throughput, staleness and accuracy from 8 to 10,000 workers.

  gba-simulate                              # the README's sweep, ~3 minutes
  gba-simulate --workers=1000 --modes=gba   # one point, seconds
  gba-simulate --calibrate=docs/results/calibration_runs.json
  python scripts/simulate.py ...            # a source checkout; the same

For every N in --workers and every mode in --modes it simulates
`min(N * --local_steps_per_worker, --max_local_steps)` local steps on a
cluster of N workers and `max(2, N / --workers_per_ps)` parameter servers
(`gba_tf.sim.engine`), and, for N <= --accuracy_max_workers, trains the
numpy model along each schedule (`gba_tf.sim.accuracy`). Writes
`<out_dir>/<name>.json` and `<out_dir>/<name>.png`.

Default costs are this machine's, as calibrated (`gba_tf.sim.calibration`);
every one is a flag. With --calibrate it instead fits the simulator to the
measured runs in the given `gba-benchmark` JSON files and writes the
comparison (`<name>_calibration.json`).
"""

import json
import math
import os
import sys
import time

from absl import app
from absl import flags

import gba_tf  # pylint: disable=unused-import  (TF_USE_LEGACY_KERAS first)
from gba_tf.sim import accuracy
from gba_tf.sim import calibration
from gba_tf.sim import engine
from gba_tf.sim import timing

FLAGS = flags.FLAGS
SCHEMA_VERSION = 1
# --calibrate: simulator seeds pooled per case (see calibrate()).
_CALIBRATION_SEEDS = 5


def define_flags() -> None:
  flags.DEFINE_list("workers", ["8", "64", "256", "1000", "10000"],
                    "Cluster sizes N to simulate.")
  flags.DEFINE_list("modes", ["sync", "async", "gba", "gba_lock",
                              "backup_workers", "bounded_staleness"],
                    f"Modes, of {engine.MODES}.")
  flags.DEFINE_integer("workers_per_ps", 4, "Workers per parameter server "
                       "(at least 2 PS).")
  flags.DEFINE_integer("local_batch_size", 256, "Samples per local step.")
  flags.DEFINE_integer("local_steps_per_worker", 40, "Local steps simulated "
                       "per worker.")
  flags.DEFINE_integer("max_local_steps", 200000, "Cap on local steps per "
                       "run (large N).")
  # Compute.
  # Defaults: as calibrated on this machine (docs/results/calibration.json,
  # 4 workers + 2 PS; async's fitted unexplained time, 28.5 ms, split as
  # fitted: 70% before the token read, 30% on the push).
  flags.DEFINE_float("compute_ms", 34.4, "Median compute per local step of "
                     "a healthy worker, token read to gradient.")
  flags.DEFINE_enum("distribution", "lognormal", list(timing.DISTRIBUTIONS),
                    "Compute time distribution.")
  flags.DEFINE_float("sigma", calibration.DEFAULT_SIGMA, "Lognormal shape.")
  flags.DEFINE_float("straggler_fraction", 0.0, "Fraction of the workers "
                     "permanently slow (at least one when > 0).")
  flags.DEFINE_float("straggler_slowdown", 4.0, "Their slowdown factor.")
  flags.DEFINE_float("episode_rate_per_hour", 0.0, "Straggler episodes per "
                     "worker-hour (each 30 s to 1 h long, 2-10x slower).")
  # Costs.
  flags.DEFINE_float("overhead_ms", 20.0, "Per local step, before the "
                     "token read (dispatch).")
  flags.DEFINE_float("push_ms", 8.6, "Per local step, from the gradient to "
                     "its ticket (staging on the shards).")
  flags.DEFINE_float("rpc_ms", calibration.LOCAL_COSTS["rpc_s"] * 1e3,
                     "One-way push / reply latency.")
  flags.DEFINE_float("serial_us", calibration.LOCAL_COSTS["serial_s"] * 1e6,
                     "Hold time of one visit to the scalar section.")
  flags.DEFINE_float("add_ms", calibration.LOCAL_COSTS["add_s"] * 1e3,
                     "One gradient add, summed over shards.")
  flags.DEFINE_float("apply_ms", calibration.LOCAL_COSTS["apply_s"] * 1e3,
                     "One optimizer apply, summed over shards.")
  flags.DEFINE_float("async_apply_ms",
                     calibration.LOCAL_COSTS["async_apply_s"] * 1e3,
                     "Plain async's apply per push, summed over shards.")
  flags.DEFINE_float("allreduce_ms", 21.0, "Sync all-reduce per step and "
                     "tree level: x log2(N) (fitted: 4 workers' sync).")
  # Accuracy.
  flags.DEFINE_integer("accuracy_max_workers", 1000, "Train the numpy model "
                       "for N up to this (0: never).")
  flags.DEFINE_float("learning_rate", 1.0, "SGD rate, tuned for sync and "
                     "used by every mode.")
  flags.DEFINE_integer("accuracy_batch", 16, "Samples per local step of the "
                       "numpy model.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_string("calibrate", None, "Comma-separated gba-benchmark JSON "
                      "files: fit and compare instead of the sweep.")
  flags.DEFINE_string("out_dir", "results", "Where JSON and PNG go.")
  flags.DEFINE_string("name", None, "Output stem (default simulation or "
                      "calibration).")


def _positive_ints(name, values):
  out = []
  for v in values:
    try:
      n = int(v)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f"Received: --{name}={','.join(values)}, which must "
                       "be positive integers.")
    out.append(n)
  return out


def cluster_of(n: int) -> engine.ClusterModel:
  """The cluster of N workers the flags describe."""
  stragglers = 0
  if FLAGS.straggler_fraction > 0:
    stragglers = max(1, round(FLAGS.straggler_fraction * n))
  compute = timing.ComputeModel(
      FLAGS.compute_ms / 1e3, distribution=FLAGS.distribution,
      sigma=FLAGS.sigma,
      # Spread over the index range: worker i * N / k for i < k.
      fixed={i * n // stragglers: FLAGS.straggler_slowdown
             for i in range(stragglers)},
      episode_rate_per_hour=FLAGS.episode_rate_per_hour)
  return engine.ClusterModel(
      num_workers=n, compute=compute,
      num_ps=max(2, n // FLAGS.workers_per_ps),
      local_batch_size=FLAGS.local_batch_size,
      overhead_s=FLAGS.overhead_ms / 1e3, rpc_s=FLAGS.rpc_ms / 1e3,
      push_s=FLAGS.push_ms / 1e3,
      serial_s=FLAGS.serial_us / 1e6, add_s=FLAGS.add_ms / 1e3,
      apply_s=FLAGS.apply_ms / 1e3, async_apply_s=FLAGS.async_apply_ms / 1e3,
      allreduce_s=FLAGS.allreduce_ms / 1e3 * max(1.0, math.log2(n)))


def serial_bottleneck_workers(cluster: engine.ClusterModel) -> float:
  """N at which GBA's scalar section is busy all the time.

  Each local step visits it once to land, and every M-th once more to
  finish its step: about `serial_s` per push. A healthy worker pushes once
  per `overhead + compute + 2 rpc + add/P + serial` seconds; N workers
  saturate the section when N times that rate reaches 1 / serial_s.
  """
  c = cluster
  cycle = (c.overhead_s + c.compute.base_s + 2 * c.rpc_s + c.push_s +
           c.add_s / c.num_ps + c.serial_s)
  return cycle / c.serial_s


def sweep():
  workers = _positive_ints("workers", FLAGS.workers)
  for mode in FLAGS.modes:
    if mode not in engine.MODES:
      raise ValueError(f"Received: --modes={mode}, which is not one of "
                       f"{engine.MODES}.")
  problem = accuracy.Problem(seed=FLAGS.seed)
  rows, bottleneck = [], {}
  for n in workers:
    cluster = cluster_of(n)
    bottleneck[n] = serial_bottleneck_workers(cluster)
    steps = min(n * FLAGS.local_steps_per_worker, FLAGS.max_local_steps)
    for mode in FLAGS.modes:
      start = time.perf_counter()
      result = engine.simulate(mode, cluster, steps, seed=FLAGS.seed)
      row = dict(result.summary(), num_ps=cluster.num_ps, local_steps=steps,
                 staleness_histogram=result.staleness_histogram().tolist())
      row["sim_seconds"] = time.perf_counter() - start
      if n <= FLAGS.accuracy_max_workers:
        trained = accuracy.train(result, problem, FLAGS.learning_rate,
                                 batch_size=FLAGS.accuracy_batch)
        row.update(test_auc=trained["auc"], test_logloss=trained["logloss"],
                   best_auc=trained["best_auc"],
                   optimizer_steps=trained["global_steps"])
      row["seconds"] = time.perf_counter() - start
      rows.append(row)
      print(f"N={n:6d} {mode:18s} {row['vs_ideal']:6.3f} of ideal, "
            f"tau p50/p99/max {row['staleness_p50']:.0f}/"
            f"{row['staleness_p99']:.0f}/{row['staleness_max']}, dropped "
            f"{row['dropped_fraction']:.3f}, decayed "
            f"{row['decayed_fraction']:.3f}"
            + (f", AUC {row['test_auc']:.4f}" if "test_auc" in row else "")
            + f" ({row['seconds']:.1f} s)", flush=True)
  return {"rows": rows, "serial_bottleneck_workers": bottleneck}


def calibrate(paths):
  """Takes each cluster shape's costs from its healthy runs; predicts the
  rest.

  A run on GBA's runtime traced with `--trace_pushes` gives every cost of
  its mode directly (`calibration.traced_costs`): nothing is fitted, and
  its healthy throughput and staleness are predictions as well. Modes
  without a trace (sync, plain async) get their unexplained time per step
  fitted to their healthy throughput, with the compute and the loop pause
  of the shape's healthy GBA run. Repeats of a case (`gba-benchmark
  --repeats`) are pooled: median throughput, summed histograms, each cost
  the median of the repeats' own. Where the runs' raw push traces were
  kept (`<name>_traces.npz` beside `<name>.json`), the phases are read from
  them.
  """
  measured = []
  for path in paths:
    with open(path) as f:
      rows = json.load(f)["runs"]
    traces = calibration.load_traces(path)
    measured += [calibration.Measured.from_row(
        r, traces.get(calibration.trace_key(r)) if traces else None)
                 for r in rows]
  cases = {}  # (workers, condition, mode) -> repeats, in file order
  for m in measured:
    cases.setdefault((m.num_workers, m.condition, m.mode), []).append(m)
  shapes = sorted({m.num_workers for m in measured})
  out = []
  for workers in shapes:
    references = [m for m in cases.get((workers, "healthy", "gba"), [])
                  if m.push_phases]
    if not references:
      raise ValueError(f"Received: no healthy GBA run traced with "
                       f"--trace_pushes for {workers} workers in "
                       "--calibrate.")
    gba_costs = calibration.median_costs(
        [calibration.traced_costs(r) for r in references])
    # The prediction is the model's, not one draw of it: at 200 pushes per
    # worker one seed's TV moved by up to 0.05, at 2,000 still by 0.016
    # (0.086-0.102 over 5 seeds, 4 workers, bounded staleness); 5 seeds of
    # 2,000 pushes per worker are pooled.
    steps = 2000 * workers
    shape = {(c, mode): runs for (w, c, mode), runs in cases.items()
             if w == workers}
    costs = {}  # mode -> (costs, "measured" or "fitted")
    for (condition, mode), runs in shape.items():
      if condition != "healthy":
        continue
      traced = [r for r in runs if r.push_phases]
      if traced:
        costs[mode] = (calibration.median_costs(
            [calibration.traced_costs(r) for r in traced]), "measured")
      else:
        base_s, sigma = gba_costs["base_s"], gba_costs["sigma"]
        pause = gba_costs["loop_pause_s"]
        costs[mode] = (dict(base_s=base_s, sigma=sigma, loop_pause_s=pause,
                            overhead_s=calibration.fit_overhead(
                                calibration.pool(runs), base_s, steps,
                                sigma, loop_pause_s=pause)), "fitted")
    for (condition, mode), runs in shape.items():
      if mode not in costs:
        raise ValueError(f"Received: {condition} {mode} runs for {workers} "
                         "workers but no healthy run of that mode to "
                         "calibrate it.")
      run = calibration.pool(runs)
      mode_costs, source = costs[mode]
      cluster = (calibration.traced_cluster(run, mode_costs)
                 if source == "measured" else calibration.cluster_for(
                     run, mode_costs["base_s"], mode_costs["overhead_s"],
                     mode_costs["sigma"],
                     loop_pause_s=mode_costs["loop_pause_s"]))
      row = calibration.compare(run, cluster, steps, seeds=_CALIBRATION_SEEDS)
      row.update(costs=mode_costs, costs_from=source,
                 fitted_throughput=(source == "fitted"
                                    and condition == "healthy"),
                 repeats=len(runs),
                 measured_runs_local_steps_per_s=[
                     r.samples_per_s / r.local_batch_size for r in runs])
      out.append(row)
      print(f"{workers}w+{references[0].num_ps}ps {condition:9s} "
            f"{mode:18s} throughput error "
            f"{row['throughput_error']:+.3f}"
            + (" (fitted)" if row["fitted_throughput"] else "")
            + (f", TV {row['tv_distance']:.3f}" if "tv_distance" in row
               else "") + f" ({len(runs)} runs)", flush=True)
  return {"rows": out, "costs": calibration.LOCAL_COSTS}


def plot(result, stem):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result["rows"]
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  panels = [("vs_ideal", "throughput / ideal async", axes[0][0]),
            ("staleness_p99", "staleness p99 (global steps)", axes[0][1]),
            ("dropped_fraction", "dropped fraction", axes[1][0])]
  for key, label, ax in panels:
    for mode in modes:
      points = [(r["num_workers"], r[key]) for r in rows if r["mode"] == mode]
      ax.plot(*zip(*points), marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  ax = axes[1][1]
  for mode in modes:
    points = [(r["num_workers"], r["test_auc"]) for r in rows
              if r["mode"] == mode and "test_auc" in r]
    if points:
      ax.plot(*zip(*points), marker="o", label=mode)
  ax.set_xscale("log")
  ax.set_xlabel("workers")
  ax.set_ylabel("held-out AUC (numpy model, same samples)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(f"{stem}.png", dpi=100)
  plt.close(fig)


def main(argv) -> int:
  del argv
  start = time.perf_counter()
  try:
    if FLAGS.calibrate:
      paths = FLAGS.calibrate.split(",")
      for path in paths:
        if not os.path.isfile(path):
          raise ValueError(f"Received: --calibrate={FLAGS.calibrate}, but "
                           f"{path} does not exist.")
      name = FLAGS.name or "calibration"
      result = calibrate(paths)
    else:
      name = FLAGS.name or "simulation"
      result = sweep()
  except ValueError as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    return 2
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stem = os.path.join(FLAGS.out_dir, name)
  result.update(schema_version=SCHEMA_VERSION,
                command=" ".join([os.path.basename(sys.argv[0])] +
                                 sys.argv[1:]),
                seconds=time.perf_counter() - start)
  with open(f"{stem}.json", "w") as f:
    json.dump(result, f, indent=2, default=float)
  if not FLAGS.calibrate:
    plot(result, stem)
    print(f"wrote {stem}.json, {stem}.png")
  else:
    print(f"wrote {stem}.json")
  return 0


def run() -> None:
  """The `gba-simulate` console entry point."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
