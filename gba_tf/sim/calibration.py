"""Calibrates the simulator on measured local runs, and says how close it
gets.

A measured run is a row of `gba-benchmark`'s JSON: its mode, cluster,
emulated compute (`--step_ms`, `--straggler`), samples/s, and for the modes
that run on GBA's runtime the PS counters' staleness histogram and, with
`--trace_pushes`, where its pushes' time went (`push_phases`,
`gba_tf.push_trace`).

What is taken from where (per cluster shape, e.g. 4 workers + 2 PS):

* the benchmark emulates compute with a sleep in each worker's input
  pipeline (`--step_ms`, one batch ahead): that is the simulator's
  `input_s`, and `--straggler=i:k` multiplies worker i's by k
  (`input_slowdown`), not fitted;
* a mode that runs on GBA's runtime (GBA, bounded staleness, ...): every
  cost from its own healthy run's trace (`traced_costs`): the compute
  after the token read and its spread, the landing after the ticket, the
  apply, the time from a push's end to the worker's next token read, and
  how much the last three vary from push to push, and the pause between
  two training loops (`fit` joins every step at an epoch's end, so the
  workers stop and restart together every `loop_steps` local steps).
  Nothing is fitted: the healthy run's throughput and staleness are
  predictions too;
* sync and plain async (no trace): the compute and the loop pause of the
  shape's healthy GBA run, and the time per step nothing else explains
  fitted to the healthy run's throughput (`fit_overhead`);
* the scalar section's hold time (`serial_s`) from the push profile
  (`scripts/profile_push.py`): a fixed input, see `LOCAL_COSTS`.

The straggler runs are predictions for every mode, compared by `compare`
(relative throughput error, and total-variation distance between
staleness distributions).

Example:

>>> tv_distance([1, 1, 0], [0, 1, 1])
0.5
"""

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from gba_tf import push_trace
from gba_tf import stragglers as stragglers_lib
from gba_tf.sim import engine
from gba_tf.sim import timing

# Costs measured on this machine (2 cores), inputs to every fit:
# serial_s: mean hold time of the scalar section per visit, from the push
#   profile (docs/results/push_profile.json: 152 us mean per section).
# add_s, apply_s, async_apply_s: PS CPU per local step, from
#   `scripts/throughput.py` (4 workers + 2 PS, a run on an earlier push
#   path: 11.9 ms per local step for plain PSS, 16.9 ms for GBA, summed over
#   2 PS; README "Micro-benchmark" has today's). Most of
#   it serves the workers' variable reads, which fall inside the measured
#   token-to-push time; what is left to a push's own PS work is taken as
#   2 ms per add, per apply and per async apply, summed over shards.
LOCAL_COSTS = {"rpc_s": 0.0005, "serial_s": 0.000152, "add_s": 0.002,
               "apply_s": 0.002, "async_apply_s": 0.002}
# Defaults of the untraced modes' model and of the sweep: the compute's
# lognormal shape, and the share of the unexplained time placed after the
# token read (as fitted by an earlier calibration, before push traces).
DEFAULT_SIGMA = 0.5
DEFAULT_PUSH_SHARE = 0.3


def tv_distance(p: Sequence[float], q: Sequence[float]) -> float:
  """Total-variation distance between two histograms (normalized here)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  n = max(len(p), len(q))
  p = np.pad(p, (0, n - len(p))) / p.sum()
  q = np.pad(q, (0, n - len(q))) / q.sum()
  return float(0.5 * np.abs(p - q).sum())


@dataclasses.dataclass(frozen=True)
class Measured:
  """One measured run, from a `gba-benchmark` JSON row."""
  condition: str
  mode: str
  num_workers: int
  num_ps: int
  local_batch_size: int
  global_batch_size: int
  step_ms: float
  stragglers: Dict[int, float]
  samples_per_s: float
  staleness_histogram: Optional[List[int]]
  push_phases: Optional[Dict[str, object]] = None
  # Local steps per training loop (`fit` epoch) of a PS mode; 0 for sync.
  loop_steps: int = 0

  @classmethod
  def from_row(cls, row, trace=None) -> "Measured":
    """`row` of `gba-benchmark`'s JSON; `trace`, the run's raw push trace
    (`gba_tf.push_trace.COLUMNS` rows), if kept: its phases are then read
    here, with the run's loops, instead of taken from the row."""
    flags = row["config"]
    straggler = ""
    for arg in row["args"]:
      if arg.startswith("--straggler="):
        straggler = arg.split("=", 1)[1]
    local = flags["gba"]["local_batch_size"]
    # The job's loop: steps_per_loop global batches of local steps.
    loop_steps = (0 if row["mode"] == "sync" else
                  flags["steps_per_loop"] * (flags["global_batch_size"]
                                             // local))
    phases = row.get("push_phases")
    if trace is not None:
      phases = push_trace.phases(trace, flags["num_workers"],
                                 loop_steps=loop_steps)
    return cls(condition=row["condition"], mode=row["mode"],
               num_workers=flags["num_workers"], num_ps=flags["num_ps"],
               local_batch_size=local,
               global_batch_size=flags["global_batch_size"],
               step_ms=flags["step_ms"],
               stragglers=stragglers_lib.parse(straggler),
               samples_per_s=row["samples_per_s"],
               staleness_histogram=row.get("staleness_histogram"),
               push_phases=phases, loop_steps=loop_steps)


def trace_key(row) -> str:
  """A run's name in a `<name>_traces.npz`: condition-mode-r<repeat>."""
  return f"{row['condition']}-{row['mode']}-r{row['repeat']}"


def load_traces(json_path: str) -> Dict[str, np.ndarray]:
  """The raw push traces kept beside a `gba-benchmark` JSON
  (`<name>_traces.npz`, by `trace_key`); empty if there are none."""
  path = json_path[:-len(".json")] + "_traces.npz"
  if not json_path.endswith(".json") or not os.path.exists(path):
    return {}
  with np.load(path) as traces:
    return {key: traces[key] for key in traces.files}


def pool(runs: Sequence[Measured]) -> Measured:
  """One measured case from its repeats (`gba-benchmark --repeats`).

  Throughput is the median over repeats (this machine is shared and noisy:
  the README reports medians); staleness histograms are summed (every
  repeat's pushes count alike); push phases are not pooled here (each
  repeat's costs are taken from its own trace, then `median_costs`).

  Example:

  >>> a = Measured("healthy", "gba", 2, 1, 8, 16, 50.0, {}, 10.0, [3, 1])
  >>> pooled = pool([a, dataclasses.replace(a, samples_per_s=30.0),
  ...                dataclasses.replace(a, samples_per_s=12.0)])
  >>> pooled.samples_per_s, pooled.staleness_histogram
  (12.0, [9, 3])
  """
  first = runs[0]
  case = lambda r: (r.condition, r.mode, r.num_workers, r.num_ps,
                    r.step_ms, r.stragglers)
  if any(case(r) != case(first) for r in runs):
    raise ValueError(f"Received: runs of different cases to pool: "
                     f"{sorted({str(case(r)) for r in runs})}.")
  histograms = [r.staleness_histogram for r in runs
                if r.staleness_histogram]
  histogram = None
  if histograms:
    size = max(len(h) for h in histograms)
    histogram = np.sum([np.pad(h, (0, size - len(h))) for h in histograms],
                       axis=0).astype(int).tolist()
  return dataclasses.replace(
      first, samples_per_s=float(np.median([r.samples_per_s for r in runs])),
      staleness_histogram=histogram, push_phases=None)


def median_costs(costs: Sequence[Dict[str, float]]) -> Dict[str, float]:
  """Each cost's median over repeats (`traced_costs` of each)."""
  return {k: float(np.median([c[k] for c in costs])) for k in costs[0]}


def cluster_for(run: Measured, base_s: float, overhead_s: float,
                sigma: float = DEFAULT_SIGMA,
                costs: Optional[Dict[str, float]] = None,
                push_share: float = DEFAULT_PUSH_SHARE,
                loop_pause_s: float = 0.0) -> engine.ClusterModel:
  """The simulated cluster of a measured run's shape and stragglers (and
  its training loops, with `loop_pause_s` between them)."""
  costs = dict(LOCAL_COSTS, **(costs or {}))
  compute = timing.ComputeModel(base_s, distribution="lognormal",
                                sigma=sigma)
  return engine.ClusterModel(
      # A sync run has no PS; the simulated sync uses none either.
      num_workers=run.num_workers, compute=compute,
      num_ps=max(run.num_ps, 1),
      local_batch_size=run.local_batch_size,
      global_batch_size=run.global_batch_size,
      overhead_s=overhead_s * (1.0 - push_share),
      push_s=overhead_s * push_share,
      # --straggler=i:k stretches the emulated step (the input sleep) only.
      input_s=run.step_ms / 1000.0, input_slowdown=dict(run.stragglers),
      loop_steps=run.loop_steps, loop_pause_s=loop_pause_s, **costs)


def traced_costs(run: Measured, rpc_s: float = LOCAL_COSTS["rpc_s"],
                 serial_s: float = LOCAL_COSTS["serial_s"]
                 ) -> Dict[str, float]:
  """The simulator's costs as a traced run measured them.

  `run.push_phases` (`gba_tf.push_trace`, from `--trace_pushes`) gives the
  mean of each phase of a push; per-worker phases are taken as the median
  over the run's healthy workers:

    arrive (token read to the gradients at the first PS)
        = compute + rpc_s, compute lognormal with median base_s and shape
          sigma (the spread of log(arrive)): base_s = (arrive - rpc_s) /
          exp(sigma^2 / 2), the lognormal's mean over its median;
    land (ticket to counted landing: the adds' round trips to the shard
          tasks, the scalar section) = land_s + serial_s, a latency;
    apply (a claiming push's landing to its end), per global step it
          applies = apply_s / P + serial_s;
    gap (a push's end to the worker's next token read, within a training
         loop) = rpc_s + overhead_s;
    loop pause (a loop's last end to the next loop's first read)
        = loop_pause_s + gap: the chief's work between two loops, then a
          step's own dispatch;

  and the spread (log standard deviation) of gap, land and apply as the
  simulator's jitter of those costs. The wait for a ticket is not an
  input: the simulator's ticket window produces it. Nothing here is
  fitted.

  Returns:
    base_s, overhead_s, land_s, apply_s, loop_pause_s (seconds); sigma (of
    the compute), overhead_sigma, land_sigma, apply_sigma (lognormal
    shapes).
  """
  p = run.push_phases
  if not p:
    raise ValueError(f"Received: a {run.condition} {run.mode} run with no "
                     "push_phases; rerun it with --trace_pushes.")
  healthy = [i for i in range(run.num_workers) if i not in run.stragglers]

  def median(key):
    values = [p[key][i] for i in healthy if p[key][i] is not None]
    return float(np.median(values))

  sigma = median("arrive_log_sd")
  m = cluster_for(run, 1.0, 0.0).gba_config(run.mode).num_aggregate
  # Global steps per claim: (pushes / M) / (pushes * claim_fraction); a
  # claim also applies the steps that completed while it applied.
  steps_per_claim = 1.0 / min(m * p["claim_fraction"], 1.0)
  return {
      "base_s": max(median("arrive_s") - rpc_s, 0.0) / np.exp(sigma ** 2 / 2),
      "sigma": sigma,
      "overhead_s": max(median("gap_s") - rpc_s, 0.0),
      "land_s": max(p["land_s"] - serial_s, 0.0),
      "apply_s": max((p["apply_s"] or 0.0) / steps_per_claim - serial_s,
                     0.0) * max(run.num_ps, 1),
      "loop_pause_s": max((p.get("loop_pause_s") or 0.0)
                          - median("gap_s"), 0.0),
      # The spread of each, as measured.
      "overhead_sigma": median("gap_log_sd"),
      "land_sigma": p["land_log_sd"] or 0.0,
      "apply_sigma": p["apply_log_sd"] or 0.0,
  }


def traced_cluster(run: Measured, costs: Dict[str, float]
                   ) -> engine.ClusterModel:
  """The simulated cluster of `run`'s shape and stragglers, with `costs`
  (`traced_costs` of a run of the same shape and mode)."""
  compute = timing.ComputeModel(costs["base_s"], distribution="lognormal",
                                sigma=costs["sigma"])
  return engine.ClusterModel(
      num_workers=run.num_workers, compute=compute, num_ps=run.num_ps,
      local_batch_size=run.local_batch_size,
      global_batch_size=run.global_batch_size,
      overhead_s=costs["overhead_s"],
      input_s=run.step_ms / 1000.0, input_slowdown=dict(run.stragglers),
      rpc_s=LOCAL_COSTS["rpc_s"], serial_s=LOCAL_COSTS["serial_s"],
      land_s=costs["land_s"], apply_s=costs["apply_s"],
      jitter={name: costs[f"{name}_sigma"] for name in engine.JITTERED},
      loop_steps=run.loop_steps, loop_pause_s=costs["loop_pause_s"])


def fit_overhead(run: Measured, base_s: float, local_steps: int,
                 sigma: float = DEFAULT_SIGMA, seed: int = 0,
                 push_share: float = DEFAULT_PUSH_SHARE,
                 loop_pause_s: float = 0.0) -> float:
  """`overhead_s` at which the simulated throughput matches `run`'s.

  Bisection: throughput falls monotonically as the overhead grows.
  """
  target = run.samples_per_s / run.local_batch_size
  low, high = 0.0, 1.0
  for _ in range(20):
    mid = (low + high) / 2.0
    result = engine.simulate(run.mode,
                             cluster_for(run, base_s, mid, sigma,
                                         push_share=push_share,
                                         loop_pause_s=loop_pause_s),
                             local_steps, seed)
    if result.local_steps_per_s > target:
      low = mid
    else:
      high = mid
  return (low + high) / 2.0


def compare(run: Measured, cluster: engine.ClusterModel, local_steps: int,
            seeds: int = 1) -> Dict[str, object]:
  """Simulates `run`'s mode on `cluster`; errors against the measurement.

  With several `seeds` (0, 1, ...), the prediction is their mean
  throughput and their summed staleness histogram: the model's expectation
  rather than one draw of it."""
  results = [engine.simulate(run.mode, cluster, local_steps, seed)
             for seed in range(seeds)]
  rate = float(np.mean([r.local_steps_per_s for r in results]))
  measured = run.samples_per_s / run.local_batch_size
  out = {"condition": run.condition, "mode": run.mode,
         "workers": run.num_workers, "ps": run.num_ps,
         "measured_local_steps_per_s": measured,
         "simulated_local_steps_per_s": rate,
         "throughput_error": rate / measured - 1.0, "seeds": seeds}
  if run.staleness_histogram:
    size = len(run.staleness_histogram)
    simulated = np.sum([r.staleness_histogram(size) for r in results],
                       axis=0)
    out["measured_histogram"] = list(run.staleness_histogram)
    out["simulated_histogram"] = simulated.tolist()
    out["tv_distance"] = tv_distance(run.staleness_histogram, simulated)
  return out
