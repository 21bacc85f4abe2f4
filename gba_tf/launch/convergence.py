"""When a run has converged, and how two modes' final accuracy compare.

Used by `gba-benchmark --converge`. Two questions, each answered once here:

* **Plateau.** A run has plateaued when its held-out AUC gained less than
  `min_gain` (0.001) over the last `fraction` (20%) of its sample budget:
  the AUC at the end minus the AUC at the first evaluation at or past
  80% of the samples. The convergence benchmark gives every mode the
  budget at which healthy sync plateaus, and reports whether it did.
* **Paired difference.** Runs with the same seed share the data order, the
  initial weights and the stragglers' schedule, so a mode is compared with
  healthy sync seed by seed: the mean of the per-seed differences and its
  95% confidence interval, mean +- t(0.975, n - 1) * sd / sqrt(n)
  (Student's t; the differences are assumed roughly normal).

Example:

>>> curve = [{"samples": s, "auc": a} for s, a in
...          [(0, 0.5), (400, 0.70), (800, 0.7200), (1000, 0.7205)]]
>>> plateau_gain(curve)   # 0.7205 - 0.7200: the last 20% from 800 on
0.0005
>>> d = paired_difference({0: 0.71, 1: 0.72}, {0: 0.70, 1: 0.70})
>>> round(d["mean"], 3), d["n"]
(0.015, 2)
"""

import json
import math
import os
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

# Two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30 (any
# statistics table); past 30 the normal 1.96 (at df = 30 t is 2.042).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262,
         2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101,
         2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
         2.048, 2.045, 2.042)
PLATEAU_FRACTION = 0.2
PLATEAU_MIN_GAIN = 0.001
# Issue targets: GBA's final AUC paired against healthy sync.
TARGET_MEAN = -0.001
TARGET_LOWER = -0.002
# A seed whose share of pushes decayed or dropped is off its case's median
# by more than half that median, and by more than one point (see
# `unlike_seeds`). The seeds of one job on one host spread far less (the
# one-straggler MovieLens job's seeds 0-9: 6.2-6.6%); a slower host halved
# it (seeds 11-15 of its twenty: 1.3-2.6%, README "Twenty seeds"). The
# point keeps a healthy cluster's 0-0.2% from being told apart by noise.
UNLIKE_RATIO = 0.5
UNLIKE_FLOOR = 0.01


def t975(df: int) -> float:
  """t(0.975, df): the 95% two-sided quantile of Student's t."""
  if isinstance(df, bool) or not isinstance(df, int) or df < 1:
    raise ValueError(f"Received: df={df!r}, which must be an integer >= 1.")
  return _T975[df - 1] if df <= len(_T975) else 1.96


def plateau_gain(curve: Sequence[Mapping[str, float]],
                 fraction: float = PLATEAU_FRACTION) -> float:
  """AUC gained over the last `fraction` of the samples of `curve`.

  `curve` is a run's evaluations in order, each with "samples" and "auc"
  (`result.json`'s curve).
  """
  if len(curve) < 2:
    raise ValueError(f"Received: a curve of {len(curve)} point(s); the "
                     "plateau needs at least 2 evaluations.")
  if not 0 < fraction < 1:
    raise ValueError(f"Received: fraction={fraction!r}, which must be in "
                     "(0, 1).")
  last = curve[-1]
  cut = (1.0 - fraction) * last["samples"]
  start = next(p for p in curve if p["samples"] >= cut)
  if start is last:  # no evaluation inside the window: the one before it
    start = curve[-2]
  return round(last["auc"] - start["auc"], 12)


def plateaued(curve: Sequence[Mapping[str, float]],
              min_gain: float = PLATEAU_MIN_GAIN) -> bool:
  """Whether `curve` gained less than `min_gain` over its last 20%."""
  return plateau_gain(curve) < min_gain


def paired_difference(values: Mapping[int, float],
                      reference: Mapping[int, float]) -> Dict[str, object]:
  """Mean of `values[s] - reference[s]` over common seeds, with its 95% CI.

  Returns a dict: n, mean, sd, low, high (low = high = mean when n < 2),
  and the seeds used.
  """
  seeds = sorted(set(values) & set(reference))
  if not seeds:
    raise ValueError(f"Received: seeds {sorted(values)} and "
                     f"{sorted(reference)}, which have none in common.")
  diffs = [values[s] - reference[s] for s in seeds]
  mean = statistics.fmean(diffs)
  sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
  half = (t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
          if len(diffs) > 1 else 0.0)
  return {"n": len(diffs), "mean": mean, "sd": sd, "low": mean - half,
          "high": mean + half, "seeds": seeds}


def meets_target(difference: Mapping[str, float],
                 mean: float = TARGET_MEAN,
                 lower: float = TARGET_LOWER) -> Optional[bool]:
  """Mean difference >= `mean` and the interval's lower end above `lower`
  (None with fewer than 2 seeds: no interval)."""
  if difference["n"] < 2:
    return None
  return difference["mean"] >= mean and difference["low"] > lower


def seed_band(curves: Sequence[Sequence[Mapping[str, float]]],
              x_key: str = "samples") -> Optional[Dict[str, list]]:
  """The seeds' mean AUC curve and min-max band against `x_key`.

  Each curve is interpolated linearly onto one grid: every evaluation's x
  of every curve, between the latest first x and the earliest last x (the
  range all seeds cover). Seeds are averaged at the same x, not at the
  same evaluation index: a `--mode=auto` run evaluates at its switches,
  which fall at other samples in every seed, and wall-clock x differs
  per seed anyway. When every curve evaluates at the same x (a fixed
  schedule), this is the per-index mean.

  A curve whose x goes back (a held-out curve made before its samples were
  counted per batch ran: an evaluation at a switch was labelled a loop
  ahead) cannot be drawn against x; it is left out and counted.

  Returns None when no curve is left, else a dict of lists "x", "mean",
  "low", "high", and "seeds" (curves used) and "skipped".

  Example:

  >>> a = [{"samples": 0, "auc": 0.5}, {"samples": 100, "auc": 0.7}]
  >>> b = [{"samples": 0, "auc": 0.5}, {"samples": 50, "auc": 0.8},
  ...      {"samples": 100, "auc": 0.9}]
  >>> band = seed_band([a, b])
  >>> band["x"], [round(m, 3) for m in band["mean"]]  # a at 50: 0.6
  ([0, 50, 100], [0.5, 0.7, 0.8])
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  kept = []
  for curve in curves:
    xs = [p[x_key] for p in curve]
    if not xs or any(b < a for a, b in zip(xs, xs[1:])):
      continue
    kept.append((xs, [p["auc"] for p in curve]))
  if not kept:
    return None
  start = max(xs[0] for xs, _ in kept)
  end = min(xs[-1] for xs, _ in kept)
  grid = sorted({x for xs, _ in kept for x in xs if start <= x <= end})
  values = np.array([np.interp(grid, xs, aucs) for xs, aucs in kept])
  return {"x": grid, "mean": values.mean(axis=0).tolist(),
          "low": values.min(axis=0).tolist(),
          "high": values.max(axis=0).tolist(),
          "seeds": len(kept), "skipped": len(curves) - len(kept)}


def reweighted_share(run: Mapping[str, object]) -> Optional[float]:
  """The share of a run's pushes that the staleness policy decayed or
  dropped (None for a run without GBA counters: sync).

  How stale a straggler's gradients arrive depends on the host's speed as
  well as on the straggler's factor (a slower host shrinks the straggler's
  relative lag), so runs of one condition can differ in it; README "Twenty
  seeds" met such a case (`unlike_seeds` names them).

  Example:

  >>> reweighted_share({"gba_counters": {"pushed": 200, "decayed": 9,
  ...                                    "dropped": 1}})
  0.05
  >>> reweighted_share({"gba_counters": None}) is None
  True
  """
  counters = run.get("gba_counters")
  if not counters or not counters.get("pushed"):
    return None
  return (counters["decayed"] + counters["dropped"]) / counters["pushed"]


def unlike_seeds(shares: Mapping[int, Optional[float]],
                 ratio: float = UNLIKE_RATIO,
                 floor: float = UNLIKE_FLOOR) -> List[int]:
  """The seeds whose `reweighted_share` is unlike the rest of their case's.

  `shares` maps seed -> share (None, a run without GBA counters, is
  skipped). A seed is unlike the others when its share is off the median of
  all the seeds' shares by more than `ratio` times that median and by more
  than `floor`; with fewer than 3 shares there is no "others" to tell one
  from, and none is named. Such a run's stragglers lagged otherwise than
  its peers' (the host ran slower or faster), so its condition was in
  effect another job's, and a mean over the seeds mixes two jobs.

  Example (median 0.06; off by more than 0.03 and 0.01: seed 2's 0.02 is,
  seed 1's 0.05 and seed 3's 0.08 are not):

  >>> unlike_seeds({0: 0.06, 1: 0.05, 2: 0.02, 3: 0.08, 4: 0.065})
  [2]
  >>> unlike_seeds({0: 0.0015, 1: 0.0, 2: 0.0})  # healthy: under a point
  []
  >>> unlike_seeds({0: 0.06, 1: 0.02, 2: None})  # two: which one?
  []
  """
  known = {s: v for s, v in shares.items() if v is not None}
  if len(known) < 3:
    return []
  median = statistics.median(known.values())
  limit = max(ratio * median, floor)
  return sorted(s for s, v in known.items() if abs(v - median) > limit)


def unlike_note(case: str, shares: Mapping[int, Optional[float]],
                seeds: Sequence[int]) -> str:
  """One line naming `seeds` of `case` (`unlike_seeds` of `shares`), their
  shares and the case's median, for a table printed under the figures.

  Example:

  >>> print(unlike_note("movielens straggler gba",
  ...                   {0: 0.06, 1: 0.05, 2: 0.02}, [2]))
  note: movielens straggler gba: seed 2 decayed or dropped 2.0% of its
  pushes, the seeds' median 5.0%: its stragglers lagged otherwise (another
  host speed), so the figures above mix two jobs
  """
  known = [v for v in shares.values() if v is not None]
  one = len(seeds) == 1
  return (f"note: {case}: seed{'' if one else 's'} "
          f"{', '.join(str(s) for s in seeds)} decayed or dropped "
          f"{', '.join(f'{shares[s]:.1%}' for s in seeds)} of "
          f"{'its' if one else 'their'} pushes, the seeds' median "
          f"{statistics.median(known):.1%}: {'its' if one else 'their'} "
          "stragglers lagged otherwise (another host speed), so the figures "
          "above mix two jobs")


def read_report_json(path: str, kind: str = "--converge") -> dict:
  """A stored benchmark JSON (a dict with a list of "runs"): `--converge`'s,
  or `--switching`'s, which holds its runs the same way.

  Raises ValueError whose text completes a caller's "Received: ..." line:
  "does not exist" or "is not a <kind> JSON (<why>)", `kind` naming the one
  expected, so that every command that reads one says the same thing of a
  bad file.
  """
  if not os.path.isfile(path):
    raise ValueError("does not exist")
  try:
    with open(path) as f:
      report = json.load(f)
    if not isinstance(report.get("runs"), list):
      raise KeyError("runs")
  except (ValueError, AttributeError, KeyError) as e:
    raise ValueError(f"is not a {kind} JSON ({type(e).__name__}: {e})"
                     ) from e
  return report
