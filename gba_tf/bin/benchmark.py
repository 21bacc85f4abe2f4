"""Benchmark: sync vs async vs GBA (and PS baselines), healthy and straggling.

Every run is a whole job on the local multi-process cluster, launched from
the same flagfile (`configs/benchmark.cfg`): the same model, data, global
batch, learning rate and number of samples; only `--mode` / `--preset` and
the straggler change. Runs are interleaved (repeat-major) so that drift in
the machine's speed spreads over all modes.

  gba-benchmark --quick      # make demo: ~3 min
  gba-benchmark              # the full table, <= 20 min (make bench)
  gba-benchmark --ablation   # decay / threshold ablation
  gba-benchmark --tiny       # CI: every mode, 2 workers
  gba-benchmark --converge   # final accuracy at convergence, paired by seed
  gba-benchmark --converge --ablation   # GBA's decay variants, the same way
  gba-benchmark --switching  # sync -> GBA / async / sync -> sync, and auto
  python scripts/benchmark.py ...   # a source checkout; the same

Run from a source checkout (or pass `--base_flagfile`): the job's settings
are the flagfile `configs/benchmark.cfg`, which a wheel does not carry.

Writes `results/<name>.json` (every run and the summary), and
`results/<name>_auc.png` (test AUC vs samples seen) and
`results/<name>_throughput.png` (samples/s per mode and condition).

Throughput is training samples per second in the steady state: the first
loop (tracing, warm-up) and the held-out evaluations at the end of each loop
are left out. "ideal" is the sum of the workers'
emulated speeds, sum_i local_batch / (step_ms * slowdown_i): what a
perfectly asynchronous system would reach.
"""

import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import gba_tf  # pylint: disable=unused-import  (TF_USE_LEGACY_KERAS first)
from gba_tf import stragglers
from gba_tf.launch import convergence
from gba_tf.launch import flags as gba_flags
from gba_tf.launch import launcher as launcher_lib
from gba_tf.launch import switch_paths
from gba_tf.sim import calibration

FLAGS = flags.FLAGS
# The source checkout this package sits in, if it is one: where the default
# --base_flagfile is found when the command runs from another directory.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_BASE_FLAGFILE = os.path.join("configs", "benchmark.cfg")

# Mode name -> train.py arguments.
MODES = {
    "sync": ["--mode=sync"],
    "async": ["--mode=async"],
    "gba": ["--mode=gba"],
    "backup_workers": ["--mode=gba", "--preset=backup_workers"],
    "bounded_staleness": ["--mode=gba", "--preset=bounded_staleness"],
}
# Condition -> (straggler spec, description).
CONDITIONS = {
    "healthy": ("", "all workers at full speed"),
    "straggler": ("1:4", "worker 1 at 1/4 speed"),
    "mild": ("1:2", "worker 1 at 1/2 speed"),
    "two_stragglers": ("1:3,3:6", "workers 1 and 3 at 1/3 and 1/6 speed"),
}
# The full table's conditions (`--conditions` picks any of CONDITIONS).
DEFAULT_CONDITIONS = ("healthy", "straggler", "mild")
# Decay variants of the ablation (GBA, straggler condition).
ABLATION = {
    "no_decay": ["--decay=none", "--max_staleness=1000"],
    "exp0.5_t1": ["--decay=exponential", "--decay_rate=0.5",
                  "--staleness_threshold=1"],
    "exp0.5_t2": ["--decay=exponential", "--decay_rate=0.5",
                  "--staleness_threshold=2"],
    "exp0.5_t4": ["--decay=exponential", "--decay_rate=0.5",
                  "--staleness_threshold=4"],
    "inverse_t2": ["--decay=inverse", "--decay_rate=1.0",
                   "--staleness_threshold=2"],
    "drop_t2": ["--decay=none", "--staleness_threshold=2",
                "--max_staleness=2"],
    # The default decay, the weighted sum divided by the sum of the
    # weights instead of M (decayed gradients then shrink no step).
    "exp0.5_t2_weights": ["--decay=exponential", "--decay_rate=0.5",
                          "--staleness_threshold=2", "--normalize=weights"],
    # One-step-stale gradients (tau = 1, about 45% of them with a 1/4
    # straggler) at half weight, the step's scale kept: whether what GBA
    # pays on synthetic data is the weight it gives them.
    "exp0.5_t0_weights": ["--decay=exponential", "--decay_rate=0.5",
                          "--staleness_threshold=0", "--normalize=weights"],
}
# --converge: per dataset, the job each seed runs in every mode and
# condition (on top of the benchmark flagfile). Every run draws from one
# shared stream (--input=shared), so a straggler takes fewer batches instead
# of leaving a shard of its own under-sampled; an evaluation after every
# loop (20 per job) gives the curve whose last 20% decides the plateau
# (gba_tf.launch.convergence).
CONVERGE = {
    # DCN-v2 on 8 fields x 100 ids (best AUC 0.865), 1M distinct examples
    # so that 2.6 passes do not overfit (the first job, 12,500 ids and
    # 50,000 examples, overfit while AUC still rose, at 0.73 of 0.87).
    # One process on the same global batch: test AUC 0.8539 / 0.8558 /
    # 0.8562, logloss 0.4700 / 0.4683 / 0.4711 with Adagrad 0.5 / 1.0 /
    # 2.0 at 2,500 steps, so the benchmark's 1.0 stays sync's tuning.
    # At 2,500 steps healthy sync on 4 workers still gained 0.0009-0.0057
    # over the last 20% (converge_synthetic.json). Healthy sync (seed 0)
    # trained for 7,500 steps, evaluated every 250: 0.8563 at 2,500, 0.8632
    # at 4,000 and at 5,000, 0.8640 at 7,500 (the rate is constant, so its
    # first 5,000 steps stand for a 5,000-step run). Cut there, its gain
    # over the last 20% is under 0.001 at every budget from 4,500 to 5,500
    # (also at 3,250-3,500, then 0.0044 at 4,000: the curve moves by
    # +-0.002 between evaluations) (converge_synthetic_sync_7500_steps.json).
    # So 5,000 steps (5.1 passes; 7.7 passes had not overfit), evaluated
    # every 250: healthy sync then plateaued in 4 of 5 seeds
    # (converge_synthetic_plateau.json).
    # Its stragglers lag less than their specs: the workers' real steps
    # take longer than these 20 ms on 2 cores, so a 1:4 straggler ran
    # 2.2x slower (docs/results/straggler_speeds_4w.json); --step_ms=50
    # gives 3.8x (straggler_speeds_synthetic_step_ms_50.json), and 3.0x and
    # 5.9x for 1:3,3:6
    # (converge_synthetic_plateau_two_stragglers_step_ms_50.json). Kept at
    # 20 so that the stored runs' commands stay this job's.
    "synthetic": ["--dataset=synthetic", "--model=dcn",
                  "--vocab_per_field=100", "--train_examples=1000000",
                  "--train_steps=5000", "--steps_per_loop=250",
                  "--step_ms=20"],
    # Sync's held-out AUC plateaus here. At 1,000 steps (12.8 passes over
    # the 80,000 ratings; one process on the same global batch had shown
    # 0.780 at 800 and at 1,000) healthy sync on 4 workers still gained
    # 0.0011-0.0063 over the last 20% in 33 of its 35 stored runs.
    # Healthy sync (seed 0) trained for 4,000 steps, evaluated every 100:
    # 0.7811 at 1,000, its peak 0.7855 at 1,700, 0.7788 at 2,000, then
    # overfitting down to 0.7620 at 4,000; at 2,000 it gained -0.0038
    # over the last 20% (docs/results/converge_movielens_sync_4000_steps.json).
    # So 2,000 steps (25.6 passes), evaluated every 100: healthy sync then
    # plateaued in 5 of 5 seeds (converge_movielens_plateau.json).
    # Emulated compute as in the mode comparison (50 ms), so that a 1/4
    # straggler also slows sync (at 20 ms it did not: the CPU bound first).
    "movielens": ["--dataset=movielens", "--model=embedding_mlp",
                  "--train_steps=2000", "--steps_per_loop=100"],
}
CONVERGE_COMMON = ["--input=shared", "--eval_examples=5000"]
CONVERGE_MODES = ("sync", "gba", "async")
CONVERGE_CONDITIONS = ("healthy", "straggler", "two_stragglers")
CONVERGE_TINY = ["--workers=2", "--ps=1", "--local_batch_size=128",
                 "--global_batch_size=256", "--train_steps=8",
                 "--steps_per_loop=4", "--step_ms=10",
                 "--eval_examples=2000", "--test_examples=4000",
                 "--train_examples=20000", "--model=embedding_mlp",
                 "--learning_rate=0.1"]
# --switching --tiny: three legs of 4 steps (leg_steps needs >= 3 loops).
SWITCHING_TINY = CONVERGE_TINY + ["--train_steps=12"]
SCHEMA_VERSION = 1


def define_flags():
  gba_flags.define_flags()
  flags.DEFINE_bool("quick", False, "sync / async / gba, healthy and "
                    "straggler, one repeat (make demo).")
  flags.DEFINE_bool("tiny", False, "CI: every mode, straggler only, 2 "
                    "workers, a few steps.")
  flags.DEFINE_bool("ablation", False, "Decay ablation instead of the mode "
                    "comparison.")
  flags.DEFINE_bool("converge", False, "Final accuracy at convergence: "
                    "--datasets x conditions x modes, --repeats seeds, "
                    "each mode paired by seed against healthy sync (always "
                    "run; sync under stragglers only if --modes names it).")
  flags.DEFINE_bool("switching", False, "The switching experiment at "
                    "convergence (gba_tf.launch.switch_paths): --paths "
                    "over --repeats seeds, paired by seed against the "
                    "all-sync path.")
  flags.DEFINE_list("paths", list(switch_paths.PATHS),
                    "--switching: paths.")
  flags.DEFINE_list("datasets", list(CONVERGE),
                    "--converge / --switching: datasets.")
  flags.DEFINE_integer("repeats", 3, "Repeats per case (interleaved); "
                       "--converge: seeds (default 5).")
  flags.DEFINE_list("modes", None, "Subset of modes; default all. With "
                    "--converge --ablation: of the ablation's variants.")
  flags.DEFINE_list("conditions", None, "Subset of conditions; default all.")
  flags.DEFINE_string("out_dir", "results",
                      "Where JSON, PNG and per-run logs go.")
  flags.DEFINE_string(
      "base_flagfile", _BASE_FLAGFILE,
      "The job settings every run starts from (relative: to the current "
      "directory, else to the source checkout of this package).")
  flags.DEFINE_string("name", None, "Output file stem; default by preset.")
  flags.DEFINE_bool(
      "resume", False, "--converge / --switching: keep the runs of "
      "<out_dir>/<name>.json, written with the same job arguments, and run "
      "only what it lacks (a long run stopped for time or by a failure goes "
      "on where it stopped, losing only the job it was in). It keeps every "
      "stored run of a case or path this command runs, so that more modes, "
      "paths or seeds can be added to a finished run.")
  flags.DEFINE_string(
      "replot", None, "Redraw the two PNGs of this stored --converge or "
      "--switching JSON beside it with this version's plots (e.g. "
      "docs/results/switching_movielens_plateau.json); runs nothing.")
  flags.DEFINE_string(
      "reference", None, "--converge: take healthy sync's runs from this "
      "--converge JSON (e.g. docs/results/converge_synthetic_plateau.json) "
      "instead of running them, seed by seed, so that new modes pair with "
      "stored runs; their job arguments must be this command's. Their wall "
      "seconds count in the new JSON's seconds; each is marked with its "
      "`reference`.")


def _plan():
  """(name, cases, repeats, extra args); a case is (condition, mode, args)."""
  if FLAGS.tiny:
    name, repeats = "benchmark_tiny", 1
    modes, conditions = list(MODES), ["straggler"]
    extra = ["--workers=2", "--ps=1", "--local_batch_size=128",
             "--global_batch_size=256", "--train_steps=12",
             "--steps_per_loop=6", "--step_ms=10", "--eval_examples=2000",
             "--test_examples=4000", "--train_examples=20000",
             "--model=embedding_mlp",
             # 12 steps of 256 samples: a rate that shows learning that
             # soon (the tuned 1.0 first overshoots the held-out loss).
             "--learning_rate=0.1"]
  elif FLAGS.quick:
    name, repeats = "benchmark_quick", 1
    modes, conditions = ["sync", "async", "gba"], ["healthy", "straggler"]
    extra = ["--train_steps=60", "--steps_per_loop=20"]
  else:
    name, repeats = "benchmark", FLAGS.repeats
    modes, conditions = list(MODES), list(DEFAULT_CONDITIONS)
    extra = []
  modes, conditions = _modes_and_conditions(modes, conditions)
  cases = [(c, m, MODES[m]) for c in conditions for m in modes]
  if FLAGS.ablation:
    name = "ablation" + ("_tiny" if FLAGS.tiny else "")
    cases = [("straggler", variant, ["--mode=gba"] + args)
             for variant, args in ABLATION.items()]
  return FLAGS.name or name, cases, repeats, extra


def _modes_and_conditions(modes, conditions, known_modes=MODES):
  """--modes / --conditions, else these defaults; raises ValueError naming
  a value that is not one of `known_modes` or a condition."""
  modes = FLAGS.modes or modes
  conditions = FLAGS.conditions or conditions
  for m in modes:
    if m not in known_modes:
      raise ValueError(f"Received: --modes={m}, which is not one of "
                       f"{list(known_modes)}.")
  for c in conditions:
    if c not in CONDITIONS:
      raise ValueError(f"Received: --conditions={c}, which is not one of "
                       f"{list(CONDITIONS)}.")
  return modes, conditions


def _datasets():
  """--datasets of --converge / --switching; raises ValueError naming one
  that has no job in CONVERGE."""
  for d in FLAGS.datasets:
    if d not in CONVERGE:
      raise ValueError(f"Received: --datasets={d}, which is not one of "
                       f"{list(CONVERGE)}.")
  return FLAGS.datasets


def _log_dir(name):
  """`<out_dir>/<name>_logs`, created (with out_dir)."""
  log_dir = os.path.join(FLAGS.out_dir, f"{name}_logs")
  os.makedirs(log_dir, exist_ok=True)
  return log_dir


def _write_json(name, start, summary, rows, **extra):
  """`<out_dir>/<name>.json`: the command, every run and the summary.
  Returns the path stem the plots share."""
  stem = os.path.join(FLAGS.out_dir, name)
  with open(f"{stem}.json", "w") as f:
    json.dump({"schema_version": SCHEMA_VERSION, "name": name,
               "command": " ".join([os.path.basename(sys.argv[0])] +
                                   sys.argv[1:]),
               "seconds": time.perf_counter() - start, **extra,
               "summary": summary, "runs": rows}, f, indent=2)
  # Traced runs' raw push traces beside it, where the simulator's
  # calibration reads them (`calibration.load_traces`).
  traces = {calibration.trace_key(r): np.load(r["push_trace"])
            for r in rows if r.get("push_trace")}
  if traces:
    np.savez_compressed(f"{stem}_traces.npz", **traces)
  return stem


def _user_args():
  """This command's own flags, forwarded to every run (flagfile first)."""
  own = {"quick", "tiny", "ablation", "repeats", "modes", "conditions",
         "out_dir", "name", "base_flagfile", "converge", "datasets",
         "switching", "paths", "resume", "reference",
         "replot"}
  return [a for a in sys.argv[1:]
          if a.lstrip("-").split("=")[0].removeprefix("no") not in own]


def _arg_value(args, name):
  """The last value `args` give --name, flagfiles expanded in place."""
  value = None
  for arg in args:
    if arg.startswith("--flagfile="):
      with open(arg.split("=", 1)[1]) as f:
        lines = [l.strip() for l in f if l.strip().startswith("--")]
      inner = _arg_value(lines, name)
      value = inner if inner is not None else value
    elif arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
  return value


def _read(path):
  with open(path) as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f]
    return json.load(f)


def base_flagfile() -> str:
  """--base_flagfile as a path that exists; raises ValueError naming it."""
  path = FLAGS.base_flagfile
  candidates = [path] if os.path.isabs(path) else [
      path, os.path.join(_CHECKOUT, path)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise ValueError(f"Received: --base_flagfile={path}, which does not exist "
                   "here or in a source checkout of gba_tf.")


def _launch(train_args, mode, model_dir, log_path, label,
            straggler_until=0.0):
  """One `gba-launch` job, its task logs appended to `log_path`; returns its
  wall seconds. Raises RuntimeError naming `label` and the log if it
  fails."""
  start = time.perf_counter()
  with open(log_path, "a") as log:
    launcher = launcher_lib.LocalLauncher(
        train_args, workers=int(_arg_value(train_args, "workers")),
        ps=int(_arg_value(train_args, "ps")), mode=mode,
        model_dir=model_dir, straggler_until=straggler_until, out=log)
    code = launcher.run()
  if code:
    raise RuntimeError(f"{label} exited with {code}; see {log_path}")
  return time.perf_counter() - start


def case_args(condition, args, extra, repeat, flagfile):
  """The job arguments of one case and repeat (seed)."""
  straggler, _ = CONDITIONS[condition]
  return ([f"--flagfile={flagfile}"] + extra + _user_args() + args +
          [f"--straggler={straggler}", "--nocheckpoint_every_loop",
           f"--seed={repeat}"])


def _job(args):
  """Job arguments as --resume compares them: the flagfile by its name, not
  where it was (a run resumed from another checkout reads the same
  configs/benchmark.cfg there)."""
  return [f"--flagfile={os.path.basename(a.split('=', 1)[1])}"
          if a.startswith("--flagfile=") else a for a in args]


def resumed_rows(report, seeds, expected_args, flag="--resume"):
  """The rows of `report` (a --converge / --switching JSON) to keep: every
  stored run of a seed below `seeds`. The command then runs only the
  (case, seed) runs the JSON lacks, so that a stopped command loses only the
  job it was in, and a mode, path or seed can be added to a finished run.
  Raises ValueError naming the first kept run whose job arguments differ
  from `expected_args(row)`, this command's for the same case and seed
  (None: a case this command does not run), since pairing seeds of two
  different jobs would mean nothing; the message names `flag`, the option
  that read `report`.

  Example:

  >>> row = {"mode": "sync", "repeat": 0, "args": ["--seed=0"]}
  >>> later = dict(row, repeat=1, args=["--seed=1"])
  >>> report = {"runs": [row, later]}
  >>> [r["repeat"] for r in resumed_rows(report, 5, lambda r: r["args"])]
  [0, 1]
  >>> [r["repeat"] for r in resumed_rows(report, 1, lambda r: r["args"])]
  [0]
  """
  rows = [r for r in report["runs"] if r["repeat"] < seeds]
  for row in rows:
    expected = expected_args(row)
    if expected is None:
      case = " ".join(str(row[k]) for k in ("dataset", "condition", "mode",
                                            "path") if row.get(k))
      raise ValueError(
          f"Received: {flag} with {report['name']}.json, which holds a "
          f"run ({case}, seed {row['repeat']}) this command does not run; "
          f"name its mode and condition too, or run without {flag}. "
          f"Its command: {report['command']}")
    stored, expected = _job(row["args"]), _job(expected)
    if stored != expected:
      diff = sorted(set(stored) ^ set(expected))
      raise ValueError(
          f"Received: {flag} with {report['name']}.json, whose seed "
          f"{row['repeat']} ran other job arguments (differing: "
          f"{' '.join(diff)}); run it without {flag}, or with its command: "
          f"{report['command']}")
  return rows


def _resume(name, seeds, expected_args):
  """(rows, seconds already spent) of --resume; nothing to keep without it.
  Raises ValueError naming a missing JSON or another job's."""
  if not FLAGS.resume:
    return [], 0.0
  path = os.path.join(FLAGS.out_dir, f"{name}.json")
  kind = "--converge" if FLAGS.converge else "--switching"
  try:
    report = convergence.read_report_json(path, kind)
  except ValueError as e:
    raise ValueError(f"Received: --resume, and {path} {e}.") from e
  rows = resumed_rows(report, seeds, expected_args)
  print(f"resuming {path}: {len(rows)} runs kept", flush=True)
  # The time those runs took, so that the JSON's seconds stay the whole
  # run's.
  return rows, report["seconds"] * len(rows) / max(len(report["runs"]), 1)


def _run_key(row):
  """A --converge run's (dataset, condition, mode, seed): what --resume and
  --reference match stored runs by."""
  return row["dataset"], row["condition"], row["mode"], row["repeat"]


def reference_rows(report, seeds, expected_args, kept=(), source=""):
  """Healthy sync's runs of `report` (a --converge JSON) for --reference:
  those of a dataset this command runs (`expected_args(row)` is not None)
  and a seed below `seeds`, less those whose (dataset, condition, mode,
  seed) is in `kept` (runs --resume kept), each a copy marked with its
  `reference`, `source`. Raises ValueError naming `report` if it holds none
  such or one ran other job arguments (`resumed_rows`).

  Example:

  >>> sync = {"dataset": "d", "condition": "healthy", "mode": "sync",
  ...         "repeat": 0, "args": ["--seed=0"]}
  >>> gba = dict(sync, condition="straggler", mode="gba")
  >>> report = {"name": "converge", "command": "benchmark.py --converge",
  ...           "runs": [sync, gba, dict(sync, repeat=1, args=["--seed=1"])]}
  >>> rows = reference_rows(report, 5, lambda r: r["args"],
  ...                       source="converge.json")
  >>> [(r["mode"], r["repeat"], r["reference"]) for r in rows]
  [('sync', 0, 'converge.json'), ('sync', 1, 'converge.json')]
  >>> [r["repeat"] for r in reference_rows(
  ...     report, 5, lambda r: r["args"], kept={("d", "healthy", "sync", 0)})]
  [1]
  """
  runs = [r for r in report["runs"]
          if (r["condition"], r["mode"]) == ("healthy", "sync")
          and r["repeat"] < seeds and expected_args(r) is not None]
  if not runs:
    raise ValueError(
        f"Received: --reference with {report['name']}.json, which holds no "
        f"healthy sync run of this command's datasets and seeds 0-{seeds - 1}"
        f". Its command: {report['command']}")
  rows = resumed_rows(dict(report, runs=runs), seeds, expected_args,
                      flag="--reference")
  kept = set(kept)
  return [dict(r, reference=source) for r in rows if _run_key(r) not in kept]


def _reference(resume, seeds, expected_args):
  """`resume` ((rows, seconds spent)) with --reference's rows
  added and their wall seconds counted; `resume` itself without it. Raises
  ValueError naming a missing JSON or another job's."""
  if not FLAGS.reference:
    return resume
  path = FLAGS.reference
  try:
    report = convergence.read_report_json(path)
  except ValueError as e:
    raise ValueError(f"Received: --reference={path}, which {e}.") from e
  rows, spent = resume
  added = reference_rows(report, seeds, expected_args,
                         {_run_key(r) for r in rows},
                         source=os.path.basename(path))
  print(f"reference {path}: {len(added)} healthy sync runs taken",
        flush=True)
  return rows + added, spent + sum(r["wall_seconds"] for r in added)


def run_case(condition, mode, args, extra, repeat, log_dir, flagfile,
             tag=""):
  """One job; returns its row for the JSON."""
  model_dir = tempfile.mkdtemp(prefix=f"gba_bench_{condition}_{mode}_")
  train_args = case_args(condition, args, extra, repeat, flagfile)
  log_path = os.path.join(log_dir,
                          f"{tag}{condition}-{mode}-r{repeat}.log")
  wall = _launch(train_args, args[0].split("=")[1], model_dir, log_path,
                 f"{condition}/{mode} run {repeat}")
  result = _read(os.path.join(model_dir, "result.json"))
  phase = _read(os.path.join(model_dir, "phases.jsonl"))[-1]
  config = _read(os.path.join(model_dir, f"config-{phase['mode']}.json"))
  # A traced run's raw push trace (rows in `gba_tf.push_trace.COLUMNS`) is
  # kept beside its log, for analysis beyond the row's `push_phases`.
  traces = glob.glob(os.path.join(model_dir, "push_trace-*.npy"))
  trace_path = None
  if len(traces) == 1:
    trace_path = os.path.join(
        log_dir, f"{tag}{condition}-{mode}-r{repeat}-push_trace.npy")
    shutil.copyfile(traces[0], trace_path)
  # Everything the row needs is read; the checkpoints are not (a failed
  # run keeps its directory for the post-mortem).
  shutil.rmtree(model_dir, ignore_errors=True)
  gba = phase.get("gba")
  return {
      "condition": condition, "mode": mode, "repeat": repeat,
      "wall_seconds": wall, "train_seconds": phase["seconds"],
      "eval_seconds": phase["eval_seconds"],
      "release_seconds": phase.get("release_seconds"),
      "samples": result["samples"],
      # Steady state: the first loop (tracing, warm-up) left out when there
      # are several.
      "samples_per_s": (phase.get("steady_samples_per_s") or
                        result["samples"] / phase["seconds"]),
      "optimizer_steps": result["optimizer_steps"],
      "test_auc": result["test_auc"], "test_logloss": result["test_logloss"],
      "best_auc": result["best_auc"], "curve": result["curve"],
      "staleness_histogram": gba["staleness_histogram"] if gba else None,
      # Seconds from token read to push, per worker: what the simulator's
      # calibration (gba_tf.sim.calibration) reads as each worker's compute.
      "worker_mean_step_seconds": (gba["worker_mean_step_seconds"] if gba
                                   else None),
      # Pushes per worker: how much slower each straggler really ran
      # (`stragglers.measured_slowdowns`).
      "worker_pushed": gba["worker_pushed"] if gba else None,
      # Where the pushes' time went (with --trace_pushes): the calibration's
      # measured phases.
      "push_phases": gba.get("push_phases") if gba else None,
      "push_trace": trace_path,
      "gba_counters": {k: v for k, v in gba.items()
                       if not isinstance(v, (list, dict))} if gba else None,
      "args": train_args, "config": config, "log": log_path,
  }


def _condition_stragglers(condition):
  """`condition`'s straggler spec, parsed: worker index -> slowdown."""
  return stragglers.parse(CONDITIONS[condition][0])


def ideal_samples_per_s(config, condition):
  """Sum of the workers' emulated speeds (samples/s)."""
  factors = stragglers.speed_factors(_condition_stragglers(condition),
                                     config["num_workers"])
  step_s = config["step_ms"] / 1000.0
  if step_s <= 0:
    return None
  return sum(config["gba"]["local_batch_size"] / (step_s * f)
             for f in factors)


def measured_slowdowns(runs, condition):
  """Per run, straggler index (a string, as JSON keeps it) -> how much
  slower it ran than the others (`stragglers.measured_slowdowns`); None
  for a run without stragglers or without pushes per worker (sync, or
  stored before they were kept)."""
  spec = _condition_stragglers(condition)
  return [{str(i): v for i, v in stragglers.measured_slowdowns(
      r["worker_pushed"], spec).items()}
          if spec and r.get("worker_pushed") else None for r in runs]


def slowdown_line(label, condition, repeats, slowdowns, noun="seed"):
  """One line giving each straggler's measured slowdown over the runs
  beside its spec, naming the runs (`noun` and repeat) where it is under
  `stragglers.SPEC_SHARE` of the spec; None when no run measured one."""
  by_run = {r: {int(i): v for i, v in s.items()}
            for r, s in zip(repeats, slowdowns or ()) if s}
  if not by_run:
    return None
  spec = _condition_stragglers(condition)
  ranges = []
  for i in sorted(spec):
    ran = [s[i] for s in by_run.values() if s[i] is not None]
    shown = f"{min(ran):.1f}-{max(ran):.1f}" if ran else "no push"
    ranges.append(f"worker {i} {shown} (spec {spec[i]:g})")
  milder = [r for r, s in by_run.items()
            if stragglers.milder_than_spec(s, spec)]
  return (f"slowdown measured by pushes: {label}: {', '.join(ranges)}" + (
      f"; under {stragglers.SPEC_SHARE:.0%} of the spec in {noun}"
      f"{'' if len(milder) == 1 else 's'} {', '.join(map(str, milder))}: "
      "the healthy workers' steps took longer than --step_ms, so raise it"
      if milder else ""))


def summarize(rows):
  """Per (condition, mode): medians, means, ratios to sync and ideal."""
  groups = {}
  for row in rows:
    groups.setdefault((row["condition"], row["mode"]), []).append(row)
  summary = []
  for (condition, mode), runs in groups.items():
    speeds = [r["samples_per_s"] for r in runs]
    aucs = [r["test_auc"] for r in runs]
    entry = {
        "condition": condition, "mode": mode, "runs": len(runs),
        "samples_per_s": statistics.median(speeds),
        "samples_per_s_runs": speeds,
        "test_auc": statistics.mean(aucs),
        "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
        "test_logloss": statistics.mean(r["test_logloss"] for r in runs),
        "ideal_samples_per_s": ideal_samples_per_s(runs[0]["config"],
                                                   condition),
        "repeats": [r["repeat"] for r in runs],
        "measured_slowdowns": measured_slowdowns(runs, condition),
    }
    hists = [r["staleness_histogram"] for r in runs
             if r["staleness_histogram"]]
    entry["staleness_histogram"] = ([sum(h) for h in zip(*hists)]
                                    if hists else None)
    summary.append(entry)
  for entry in summary:
    sync = next((e for e in summary if e["mode"] == "sync" and
                 e["condition"] == entry["condition"]), None)
    sync_healthy = next((e for e in summary if e["mode"] == "sync" and
                         e["condition"] == "healthy"), None)
    entry["speed_vs_sync"] = (entry["samples_per_s"] / sync["samples_per_s"]
                              if sync else None)
    entry["speed_vs_ideal"] = (
        entry["samples_per_s"] / entry["ideal_samples_per_s"]
        if entry["ideal_samples_per_s"] else None)
    entry["auc_vs_sync_healthy"] = (
        entry["test_auc"] - sync_healthy["test_auc"] if sync_healthy
        else None)
  return summary


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def table(summary) -> str:
  lines = [f"{'condition':10} {'mode':18} {'samples/s':>10} {'x sync':>7} "
           f"{'x ideal':>8} {'test AUC':>15} {'dAUC':>8} {'logloss':>8}"]
  for e in summary:
    auc = f"{e['test_auc']:.4f}"
    if e["runs"] > 1:
      auc += f"±{e['test_auc_std']:.4f}"
    lines.append(
        f"{e['condition']:10} {e['mode']:18} {e['samples_per_s']:10.0f} "
        f"{_fmt(e['speed_vs_sync'], '7.2f')} "
        f"{_fmt(e['speed_vs_ideal'], '8.2f')} {auc:>15} "
        f"{_fmt(e['auc_vs_sync_healthy'], '+8.4f')} "
        f"{e['test_logloss']:8.4f}")
  lines.append("")
  lines.append("staleness histograms (tau:count, summed over repeats):")
  for e in summary:
    hist = e["staleness_histogram"]
    if hist:
      last = max(t for t, n in enumerate(hist) if n) if any(hist) else 0
      lines.append(f"  {e['condition']:10} {e['mode']:18} " + " ".join(
          f"{t}:{n}" for t, n in enumerate(hist[:last + 1])))
  for e in summary:
    line = slowdown_line(f"{e['condition']} {e['mode']}", e["condition"],
                         e["repeats"], e["measured_slowdowns"], "repeat")
    if line:
      lines.append(line)
  return "\n".join(lines)


def plot(rows, summary, stem):
  """AUC-vs-samples curves and throughput bars, as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  conditions = list(dict.fromkeys(r["condition"] for r in rows))
  fig, axes = plt.subplots(1, len(conditions),
                           figsize=(5 * len(conditions), 4), squeeze=False)
  for ax, condition in zip(axes[0], conditions):
    for mode in dict.fromkeys(r["mode"] for r in rows):
      runs = [r for r in rows if r["condition"] == condition and
              r["mode"] == mode and r["curve"]]
      if not runs:
        continue
      # Mean curve over repeats, at the same samples.
      band = convergence.seed_band([r["curve"] for r in runs])
      if band is None:
        continue
      ax.plot(band["x"], band["mean"], marker="o", label=mode)
    ax.set_title(f"{condition}: {CONDITIONS[condition][1]}")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("held-out AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(f"{stem}_auc.png", dpi=100)
  plt.close(fig)

  modes = list(dict.fromkeys(e["mode"] for e in summary))
  fig, ax = plt.subplots(figsize=(1.8 * len(modes) * len(conditions) / 2 + 4,
                                  4))
  width = 0.8 / len(conditions)
  for j, condition in enumerate(conditions):
    values = [next((e["samples_per_s"] for e in summary
                    if e["mode"] == m and e["condition"] == condition), 0)
              for m in modes]
    ax.bar([i + j * width for i in range(len(modes))], values, width,
           label=condition)
  ax.set_xticks([i + width * (len(conditions) - 1) / 2
                 for i in range(len(modes))])
  ax.set_xticklabels(modes, rotation=15)
  ax.set_ylabel("training samples / s")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(f"{stem}_throughput.png", dpi=100)
  plt.close(fig)


def _converge_plan():
  """(name, [(dataset, condition, mode, mode args, job args)], seeds) of
  --converge."""
  if FLAGS.tiny:
    # CI: the whole path (shared stream, curves, plateau, pairing) on the
    # smallest job: healthy sync against GBA with a straggler, 2 seeds.
    cases = [("synthetic", "healthy", "sync"), ("synthetic", "straggler",
                                                "gba")]
    return ("converge_tiny", [(d, c, m, MODES[m], CONVERGE_COMMON +
                               CONVERGE_TINY) for d, c, m in cases],
            FLAGS.repeats if FLAGS["repeats"].present else 2)
  datasets = _datasets()
  args = dict(MODES)
  if not FLAGS.ablation:
    modes, conditions = _modes_and_conditions(list(CONVERGE_MODES),
                                              list(CONVERGE_CONDITIONS))
    # Healthy sync is what every case is paired against: always run. Sync
    # under stragglers only when --modes names sync: its arithmetic does
    # not depend on the workers' speeds (the same global batches, in
    # stream order), so its accuracy is healthy sync's (the first run
    # measured +0.0004 [-0.0092, +0.0100]) and its time is what the mode
    # comparison measures.
    slow_sync = FLAGS["modes"].present and "sync" in modes
    pairs = [("healthy", "sync")] + [
        (c, m) for c in conditions for m in modes
        if (c, m) != ("healthy", "sync") and
        (m != "sync" or c == "healthy" or slow_sync)]
  else:
    # GBA's decay and normalization variants under the stragglers (default
    # condition: one 1/4 straggler), each paired with healthy sync.
    # --modes, if given, picks variants (each run is one job per seed).
    variants, conditions = _modes_and_conditions(list(ABLATION),
                                                 ["straggler"], ABLATION)
    args.update({v: ["--mode=gba"] + a for v, a in ABLATION.items()})
    pairs = [("healthy", "sync")] + [(c, v) for c in conditions
                                     if c != "healthy" for v in variants]
  cases = [(d, c, m, args[m], CONVERGE_COMMON + CONVERGE[d])
           for d in datasets for c, m in pairs]
  seeds = FLAGS.repeats if FLAGS["repeats"].present else 5
  name = "converge_ablation" if FLAGS.ablation else "converge"
  return FLAGS.name or name, cases, seeds


def _paired(runs, reference):
  """Final AUC and logloss of `runs` minus `reference`'s, paired by seed
  (`convergence.paired_difference`)."""
  def by_seed(rs, key):
    return {r["repeat"]: r[key] for r in rs}
  return tuple(convergence.paired_difference(by_seed(runs, key),
                                             by_seed(reference, key))
               for key in ("test_auc", "test_logloss"))


def summarize_converge(rows):
  """Per (dataset, condition, mode): final AUC / logloss and plateau per
  seed, the share of pushes decayed or dropped per seed
  (`convergence.reweighted_share`) and the seeds where it is unlike the
  others' (`convergence.unlike_seeds`), and the differences from healthy
  sync paired by seed."""
  groups = {}
  for row in rows:
    groups.setdefault((row["dataset"], row["condition"], row["mode"]),
                      []).append(row)
  summary = []
  for (dataset, condition, mode), runs in groups.items():
    auc, logloss = _paired(runs, groups.get((dataset, "healthy", "sync"),
                                            []))
    gains = [convergence.plateau_gain(r["curve"]) for r in runs]
    repeats = [r["repeat"] for r in runs]
    shares = [convergence.reweighted_share(r) for r in runs]
    summary.append({
        "dataset": dataset, "condition": condition, "mode": mode,
        "seeds": len(runs),
        "repeats": repeats,
        "test_auc": statistics.fmean(r["test_auc"] for r in runs),
        "test_logloss": statistics.fmean(r["test_logloss"] for r in runs),
        "best_auc": runs[0]["best_auc"],
        "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "plateau_gain": gains,
        "plateaued": sum(g < convergence.PLATEAU_MIN_GAIN for g in gains),
        "decayed_or_dropped": shares,
        "unlike_seeds": convergence.unlike_seeds(dict(zip(repeats, shares))),
        # Per seed, straggler index -> how much slower it ran than the
        # others (None: no straggler, or no GBA counters, or a stored run
        # from before they were kept).
        "measured_slowdowns": measured_slowdowns(runs, condition),
        "auc_vs_healthy_sync": auc,
        "logloss_vs_healthy_sync": logloss,
        "meets_target": (convergence.meets_target(auc)
                         if (condition, mode) != ("healthy", "sync")
                         else None),
    })
  return summary


def converge_table(summary) -> str:
  lines = [f"{'dataset':10} {'condition':15} {'mode':18} {'AUC':>7} "
           f"{'logloss':>8} {'dAUC vs healthy sync [95% CI]':>34} "
           f"{'plateaued':>9} {'samples/s':>9} {'decayed/dropped':>15}"]
  for e in summary:
    d = e["auc_vs_healthy_sync"]
    shares = [s for s in e["decayed_or_dropped"] if s is not None]
    spread = (f"{min(shares):.1%}-{max(shares):.1%}" if shares else "-")
    lines.append(
        f"{e['dataset']:10} {e['condition']:15} {e['mode']:18} "
        f"{e['test_auc']:7.4f} {e['test_logloss']:8.4f} "
        f"{d['mean']:+10.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (n={d['n']})"
        f" {e['plateaued']:>5}/{e['seeds']} {e['samples_per_s']:9.0f}"
        f" {spread:>15}")
  lines.append(f"plateaued: AUC gain < {convergence.PLATEAU_MIN_GAIN} over "
               f"the last {convergence.PLATEAU_FRACTION:.0%} of the samples; "
               "decayed/dropped: the seeds' range of pushes the staleness "
               "policy decayed or dropped")
  for e in summary:
    line = slowdown_line(f"{e['dataset']} {e['condition']} {e['mode']}",
                         e["condition"], e["repeats"],
                         e.get("measured_slowdowns"))
    if line:
      lines.append(line)
  for e in summary:
    if e["unlike_seeds"]:
      lines.append(convergence.unlike_note(
          f"{e['dataset']} {e['condition']} {e['mode']}",
          dict(zip(e["repeats"], e["decayed_or_dropped"])),
          e["unlike_seeds"]))
  return "\n".join(lines)


def plot_converge(rows, stem):
  """AUC against samples and against training seconds: the seeds' mean and
  min-max band (`convergence.seed_band`: a curve whose samples go back, made
  before the per-batch count, is left out and the legend says so)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  conditions = list(dict.fromkeys(r["condition"] for r in rows))
  for x_key, suffix, label in (("samples", "auc", "samples seen"),
                               ("train_seconds", "auc_wallclock",
                                "training seconds")):
    fig, axes = plt.subplots(len(datasets), len(conditions),
                             figsize=(5 * len(conditions),
                                      4 * len(datasets)), squeeze=False)
    for i, dataset in enumerate(datasets):
      for j, condition in enumerate(conditions):
        ax = axes[i][j]
        panels = [(mode, condition, mode) for mode in
                  dict.fromkeys(r["mode"] for r in rows)]
        if condition != "healthy":
          # Every mode is judged against healthy sync: drawn in each panel.
          panels.append(("sync", "healthy", "healthy sync (reference)"))
        for mode, cond, name in panels:
          runs = [r for r in rows if (r["dataset"], r["condition"],
                                      r["mode"]) == (dataset, cond, mode)]
          # Seeds averaged at the same x (samples or seconds), over the
          # range every seed covers.
          band = convergence.seed_band([r["curve"] for r in runs], x_key)
          left_out = band["skipped"] if band else len(runs)
          if left_out:
            print(f"{stem}_{suffix}.png: {dataset} {cond} {mode}: "
                  f"{left_out} of {len(runs)} seeds left out (their "
                  f"{x_key} go back)", flush=True)
            name += f" ({left_out} of {len(runs)} seeds left out)"
          if band is None:
            if runs:  # every curve left out: the legend still says so
              ax.plot([], [], label=name)
            continue
          reference = cond != condition
          line, = ax.plot(band["x"], band["mean"],
                          label=name, color="black" if reference else None,
                          linestyle="--" if reference else "-")
          if not reference:
            ax.fill_between(band["x"], band["low"], band["high"], alpha=0.2,
                            color=line.get_color())
        ax.set_title(f"{dataset}, {condition}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out AUC (band: seeds' min-max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_{suffix}.png", dpi=100)
    plt.close(fig)


def converge_args(cases, row, flagfile):
  """The job arguments `cases` give `row`'s case and seed (None if none of
  them is its case): what --resume compares a stored run with."""
  for dataset, condition, mode, args, job in cases:
    if (dataset, condition, mode) == (row["dataset"], row["condition"],
                                      row["mode"]):
      return case_args(condition, args, job, row["repeat"], flagfile)
  return None


def converge_main(name, cases, seeds, flagfile, resume) -> int:
  log_dir = _log_dir(name)
  rows, spent = resume
  # Runs the JSON holds (kept by --resume, or run here): their (case, seed)
  # is not run again, and a seed whose cases all are is whole.
  stored = {_run_key(r) for r in rows}
  total = len(cases) * seeds
  print(f"{name}: {len(cases)} cases x {seeds} seeds = {total} jobs "
        f"({len(rows)} kept); logs in {log_dir}", flush=True)
  start = time.perf_counter() - spent
  # Where healthy sync's runs came from, if another JSON (--reference).
  reference = {"reference": FLAGS.reference} if FLAGS.reference else {}
  # Seed-major: drift in the machine's speed spreads over every case.
  for seed in range(seeds):
    for dataset, condition, mode, args, job in cases:
      if (dataset, condition, mode, seed) in stored:
        continue
      # The dataset's job before this command's own flags, which can change
      # it (e.g. --train_steps); the mode's flags last.
      row = run_case(condition, mode, args, job, seed, log_dir, flagfile,
                     tag=f"{dataset}-")
      row["dataset"] = dataset
      rows.append(row)
      stored.add(_run_key(row))
      whole = all((d, c, m, seed) in stored for d, c, m, _, _ in cases)
      # Saved as each job ends, before it is reported: a command stopped
      # for time or by a failure keeps every job it finished (--resume
      # runs only the jobs its JSON lacks), not only its whole seeds; a
      # seed of the 8-worker job at --step_ms=200 takes about an hour.
      _write_json(name, start, summarize_converge(rows), rows,
                  partial_seeds=seed + whole, **reference)
      print(f"[{len(rows)}/{total}] {dataset:9} {condition:14} {mode:17} "
            f"seed {seed}: test AUC {row['test_auc']:.4f}, plateau gain "
            f"{convergence.plateau_gain(row['curve']):+.4f}, "
            f"{row['wall_seconds']:5.1f} s wall "
            f"({time.perf_counter() - start:5.0f} s elapsed)", flush=True)
  summary = summarize_converge(rows)
  print()
  print(converge_table(summary))
  stem = _write_json(name, start, summary, rows, **reference,
                     plateau={"fraction": convergence.PLATEAU_FRACTION,
                              "min_gain": convergence.PLATEAU_MIN_GAIN})
  plot_converge(rows, stem)
  print(f"\nwrote {stem}.json, {stem}_auc.png, {stem}_auc_wallclock.png")
  return 0


def _switching_plan():
  """(name, [(dataset, path, args)], seeds) of --switching; every seed runs
  its paths in this order (gba before auto, whose straggler lasts as long as
  gba's first two legs took)."""
  if FLAGS.tiny:
    # CI: the forced paths and their reference on the smallest job, one
    # seed (async's leg resumes a sync checkpoint counting local batches).
    cases = [("synthetic", p, CONVERGE_COMMON + SWITCHING_TINY)
             for p in ("sync", "gba", "async")]
    return ("switching_tiny", cases,
            FLAGS.repeats if FLAGS["repeats"].present else 1)
  datasets = _datasets()
  for p in FLAGS.paths:
    if p not in switch_paths.PATHS:
      raise ValueError(f"Received: --paths={p}, which is not one of "
                       f"{list(switch_paths.PATHS)}.")
  if switch_paths.REFERENCE not in FLAGS.paths:
    raise ValueError(f"Received: --paths={','.join(FLAGS.paths)}, without "
                     f"{switch_paths.REFERENCE}, which every path is paired "
                     "against.")
  if "auto" in FLAGS.paths and "gba" not in FLAGS.paths:
    raise ValueError(f"Received: --paths={','.join(FLAGS.paths)}: auto needs "
                     "gba, whose first two legs time auto's straggler.")
  paths = [p for p in switch_paths.PATHS if p in FLAGS.paths]
  cases = [(d, p, CONVERGE_COMMON + CONVERGE[d])
           for d in datasets for p in paths]
  seeds = FLAGS.repeats if FLAGS["repeats"].present else 5
  return FLAGS.name or "switching", cases, seeds


def path_base_args(args, flagfile):
  """The arguments every leg of a switching path shares (each leg adds its
  mode, steps, straggler and seed)."""
  # The user's flags after the dataset's, so that they can change the
  # budget (--train_steps) the legs are cut from.
  return [f"--flagfile={flagfile}"] + args + _user_args()


def run_path(dataset, path, args, seed, log_dir, flagfile,
             straggler_seconds=0.0):
  """One seed of one switching path: its legs, each a launch resuming the
  last one's checkpoint in one model directory. Returns its row."""
  model_dir = tempfile.mkdtemp(prefix=f"gba_switch_{path}_")
  base = path_base_args(args, flagfile)
  legs = switch_paths.PATHS[path]
  total = int(_arg_value(base, "train_steps"))
  bounds = (switch_paths.leg_steps(total,
                                   int(_arg_value(base, "steps_per_loop")))
            if len(legs) > 1 else [total])
  log_path = os.path.join(log_dir, f"{dataset}-{path}-r{seed}.log")
  walls = []
  for (mode, condition), steps in zip(legs, bounds):
    straggler, _ = CONDITIONS[condition]
    train_args = base + [f"--mode={mode}", f"--train_steps={steps}",
                         f"--straggler={straggler}",
                         "--nocheckpoint_every_loop", f"--seed={seed}"]
    until = (time.time() + straggler_seconds
             if mode == "auto" and straggler_seconds else 0.0)
    walls.append(_launch(train_args, mode, model_dir, log_path,
                         f"{dataset}/{path} seed {seed} leg {len(walls)}",
                         straggler_until=until))
  result = _read(os.path.join(model_dir, "result.json"))
  phases = _read(os.path.join(model_dir, "phases.jsonl"))
  shutil.rmtree(model_dir, ignore_errors=True)
  return {
      "dataset": dataset, "path": path, "repeat": seed,
      "legs": [{"mode": m, "condition": c, "until_step": b}
               for (m, c), b in zip(legs, bounds)],
      "straggler_seconds": straggler_seconds if path == "auto" else None,
      "leg_wall_seconds": walls, "wall_seconds": sum(walls),
      "train_seconds": sum(p["seconds"] for p in phases),
      "phases": [{k: p.get(k) for k in (
          "mode", "start_step", "start_samples", "optimizer_steps", "samples",
          "seconds", "release_seconds")} for p in phases],
      "switches": result["switches"],
      "optimizer_steps": result["optimizer_steps"],
      "test_auc": result["test_auc"], "test_logloss": result["test_logloss"],
      "best_auc": result["best_auc"],
      "curve": switch_paths.join_phases(phases),
      "args": base, "log": log_path,
  }


def summarize_switching(rows):
  """Per (dataset, path): final AUC / logloss, wall-clock, and both paired
  by seed against the all-sync path."""
  groups = {}
  for row in rows:
    groups.setdefault((row["dataset"], row["path"]), []).append(row)
  summary = []
  for (dataset, path), runs in groups.items():
    ref = groups.get((dataset, switch_paths.REFERENCE), [])
    ref_wall = {r["repeat"]: r["wall_seconds"] for r in ref}
    auc, logloss = _paired(runs, ref)
    summary.append({
        "dataset": dataset, "path": path, "seeds": len(runs),
        "legs": [leg["mode"] for leg in runs[0]["legs"]],
        "test_auc": statistics.fmean(r["test_auc"] for r in runs),
        "test_logloss": statistics.fmean(r["test_logloss"] for r in runs),
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "train_seconds": statistics.median(r["train_seconds"] for r in runs),
        "wall_vs_sync": statistics.median(
            r["wall_seconds"] / ref_wall[r["repeat"]] for r in runs
            if r["repeat"] in ref_wall) if ref_wall else None,
        "switches": [len(r["switches"]) for r in runs],
        "auc_vs_sync": auc,
        "logloss_vs_sync": logloss,
        "meets_target": (convergence.meets_target(auc)
                         if path != switch_paths.REFERENCE else None),
    })
  return summary


def switching_table(summary) -> str:
  lines = [f"{'dataset':10} {'path':6} {'legs':16} {'AUC':>7} "
           f"{'logloss':>8} {'dAUC vs sync path [95% CI]':>34} "
           f"{'wall s':>7} {'vs sync':>7} switches"]
  for e in summary:
    d = e["auc_vs_sync"]
    ratio = e["wall_vs_sync"]
    lines.append(
        f"{e['dataset']:10} {e['path']:6} {'>'.join(e['legs']):16} "
        f"{e['test_auc']:7.4f} {e['test_logloss']:8.4f} "
        f"{d['mean']:+10.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (n={d['n']})"
        f" {e['wall_seconds']:7.0f} "
        + (f"{ratio:7.2f}" if ratio is not None else f"{'-':>7}")
        + f" {e['switches']}")
  return "\n".join(lines)


def path_args(cases, row, flagfile):
  """The base arguments `cases` give `row`'s path (None if none is its
  path): what --resume compares a stored run with."""
  for dataset, path, args in cases:
    if (dataset, path) == (row["dataset"], row["path"]):
      return path_base_args(args, flagfile)
  return None


def _path_key(row):
  """A --switching run's (dataset, path, seed): what --resume matches stored
  runs by (`_run_key`'s twin)."""
  return row["dataset"], row["path"], row["repeat"]


def _gba_first_two(rows, dataset, seed):
  """Seconds the gba path of `dataset` and `seed` in `rows` took for its
  first two legs (sync, then GBA with the straggler): how long the auto
  path's straggler lasts. 0.0 (none) if it has not run.

  Example:

  >>> gba = {"dataset": "d", "path": "gba", "repeat": 1,
  ...        "leg_wall_seconds": [30.0, 45.0, 20.0]}
  >>> _gba_first_two([gba], "d", 1), _gba_first_two([gba], "d", 0)
  (75.0, 0.0)
  """
  for r in rows:
    if _path_key(r) == (dataset, "gba", seed):
      return sum(r["leg_wall_seconds"][:2])
  return 0.0


def switching_main(name, cases, seeds, flagfile, resume) -> int:
  log_dir = _log_dir(name)
  rows, spent = resume
  # Paths the JSON holds (kept by --resume, or run here) are not run again.
  stored = {_path_key(r) for r in rows}
  total = len(cases) * seeds
  print(f"{name}: {len(cases)} paths x {seeds} seeds = {total} jobs "
        f"({len(rows)} kept); logs in {log_dir}", flush=True)
  start = time.perf_counter() - spent
  for seed in range(seeds):
    for dataset, path, args in cases:
      if (dataset, path, seed) in stored:
        continue
      # gba runs before auto in every seed (_switching_plan), stored or
      # here, so auto's straggler always has its seed's gba timing.
      row = run_path(dataset, path, args, seed, log_dir, flagfile,
                     straggler_seconds=_gba_first_two(rows, dataset, seed))
      rows.append(row)
      stored.add(_path_key(row))
      whole = all((d, p, seed) in stored for d, p, _ in cases)
      # Saved as each path ends, as --converge saves each job: a command
      # stopped for time or by a failure loses only the path it was in.
      _write_json(name, start, summarize_switching(rows), rows,
                  partial_seeds=seed + whole)
      print(f"[{len(rows)}/{total}] {dataset:9} {path:6} seed {seed}: test "
            f"AUC {row['test_auc']:.4f}, {row['wall_seconds']:5.1f} s wall, "
            f"{len(row['switches'])} switches "
            f"({time.perf_counter() - start:5.0f} s elapsed)", flush=True)
  summary = summarize_switching(rows)
  print()
  print(switching_table(summary))
  stem = _write_json(name, start, summary, rows)
  plot_converge(_paths_as_modes(rows), stem)
  print(f"\nwrote {stem}.json, {stem}_auc.png, {stem}_auc_wallclock.png")
  return 0


def _paths_as_modes(rows):
  """A switching run's rows for `plot_converge`: one line per path."""
  return [dict(r, condition="switching", mode=r["path"]) for r in rows]


def replot(path) -> int:
  """--replot: `path`'s PNGs drawn again from its runs (a switching run's
  paths as modes, as `switching_main` draws them)."""
  for other in ("converge", "switching", "resume", "reference"):
    if FLAGS[other].present:
      raise ValueError(f"Received: --replot={path} with --{other}; "
                       "--replot runs nothing.")
  if not path.endswith(".json"):
    raise ValueError(f"Received: --replot={path}, which is not a .json "
                     "file.")
  try:
    rows = convergence.read_report_json(path, "--converge or --switching")[
        "runs"]
    if not rows or not all("curve" in r for r in rows):
      raise ValueError("is not a --converge or --switching JSON (a run "
                       "without a curve, or no runs)")
  except ValueError as e:
    raise ValueError(f"Received: --replot={path}, which {e}.") from e
  if "path" in rows[0]:
    rows = _paths_as_modes(rows)
  stem = path[:-len(".json")]
  plot_converge(rows, stem)
  print(f"wrote {stem}_auc.png, {stem}_auc_wallclock.png")
  return 0


def main(argv):
  del argv
  try:
    if FLAGS.replot is not None:
      return replot(FLAGS.replot)
    if FLAGS.converge and FLAGS.switching:
      raise ValueError("Received: --converge and --switching; run one.")
    if FLAGS.resume and not (FLAGS.converge or FLAGS.switching):
      raise ValueError("Received: --resume without --converge or "
                       "--switching; only their seeds can be resumed.")
    if FLAGS.reference is not None and not FLAGS.converge:
      raise ValueError(f"Received: --reference={FLAGS.reference} without "
                       "--converge; only its runs pair with healthy sync.")
    plan = (_converge_plan() if FLAGS.converge else
            _switching_plan() if FLAGS.switching else _plan())
    flagfile = base_flagfile()
    if FLAGS.converge or FLAGS.switching:
      name, cases, seeds = plan
      expected = converge_args if FLAGS.converge else path_args
      def expected_args(row):
        return expected(cases, row, flagfile)
      resume = _resume(name, seeds, expected_args)
      if FLAGS.converge:
        resume = _reference(resume, seeds, expected_args)
  except ValueError as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    return 2
  if FLAGS.converge:
    return converge_main(*plan, flagfile, resume)
  if FLAGS.switching:
    return switching_main(*plan, flagfile, resume)
  name, cases, repeats, extra = plan
  log_dir = _log_dir(name)
  total = len(cases) * repeats
  print(f"{name}: {len(cases)} cases x {repeats} repeats = {total} jobs on "
        f"a local multi-process cluster; logs in {log_dir}", flush=True)
  rows, start = [], time.perf_counter()
  for repeat in range(repeats):
    for condition, mode, args in cases:
      row = run_case(condition, mode, args, extra, repeat, log_dir,
                     flagfile)
      rows.append(row)
      print(f"[{len(rows)}/{total}] {condition:9} {mode:18} repeat {repeat}: "
            f"{row['samples_per_s']:8.0f} samples/s, test AUC "
            f"{row['test_auc']:.4f}, {row['wall_seconds']:5.1f} s wall "
            f"({time.perf_counter() - start:5.0f} s elapsed)", flush=True)
  summary = summarize(rows)
  print()
  print(table(summary))
  stem = _write_json(name, start, summary, rows)
  plot(rows, summary, stem)
  print(f"\nwrote {stem}.json, {stem}_auc.png, {stem}_throughput.png")
  return 0


def run() -> None:
  """The `gba-benchmark` console entry point."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
