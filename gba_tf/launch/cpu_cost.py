"""The CPU a local step costs, per role, compared between modes at equal load.

`scripts/throughput.py` measures each role's CPU (parameter servers,
workers, chief) from /proc over a timed run. Divided by the run's local
steps, that is the CPU per local step, but on a machine that hosts the whole
cluster (here 2 cores for seven TensorFlow processes) it is not a property
of the mode alone: the slower a run, the more of its processes' waiting
(thread wake-ups, spinning, a descheduled lock holder) each step carries.
Two modes compared at their own top speeds are then compared at different
loads. `--sweep_step_ms` runs every mode at several emulated compute times
(a sleep in the input pipeline, no CPU), interleaved; `summarize` gives:

* per compute time, each mode's median local steps/s and median CPU per
  local step per role, and the GBA / PSS ratio of the CPU medians. Where
  both modes reach the same step rate (the compute time, not the
  framework, sets it) the ratio compares the work a push costs, at the
  same load;
* per mode and role, a least-squares line through every run: CPU
  milliseconds per second against local steps per second. Its slope is
  the marginal CPU of one more local step; its intercept, the CPU a second
  costs whatever the step rate.

Pure numpy: the script measures, this module reads.

Example:

>>> rows = [
...     {"mode": "pss", "step_ms": 100, "local_steps_per_s": 10.0,
...      "cpu_ms_per_local_step": {"ps": 6.0}},
...     {"mode": "pss", "step_ms": 0, "local_steps_per_s": 30.0,
...      "cpu_ms_per_local_step": {"ps": 4.0}},
...     {"mode": "gba", "step_ms": 100, "local_steps_per_s": 10.0,
...      "cpu_ms_per_local_step": {"ps": 7.2}},
...     {"mode": "gba", "step_ms": 0, "local_steps_per_s": 20.0,
...      "cpu_ms_per_local_step": {"ps": 6.0}}]
>>> s = summarize(rows, roles=("ps",))
>>> round(s["by_step_ms"]["100"]["gba_over_pss"]["ps"], 2)  # 7.2 / 6.0
1.2
>>> # PSS: 60 ms/s at 10 steps/s, 120 at 30: 3 ms per step, 30 ms per s.
>>> [round(x, 6) for x in (s["fit"]["pss"]["ps"]["marginal_ms_per_step"],
...                        s["fit"]["pss"]["ps"]["background_ms_per_s"])]
[3.0, 30.0]
"""

from typing import Dict, List, Sequence

import numpy as np

ROLES = ("ps", "worker", "chief")


def summarize(rows: Sequence[Dict], roles: Sequence[str] = ROLES) -> Dict:
  """Per compute time medians and ratios, and per mode and role the line
  CPU ms per second = background + marginal * local steps per second.

  Args:
    rows: runs, each with "mode", "step_ms", "local_steps_per_s" and
      "cpu_ms_per_local_step" (a dict by role).
    roles: the roles to summarize.

  Returns:
    {"by_step_ms": {step_ms (str): {mode: {...}, "gba_over_pss": {...}}},
     "fit": {mode: {role: {"marginal_ms_per_step", "background_ms_per_s",
     "runs"}}}, "gba_over_pss_marginal": {role: ratio}} (the ratios where
    both "gba" and "pss" ran).
  """
  modes = sorted({r["mode"] for r in rows})
  out = {"by_step_ms": {}, "fit": {}}
  for step_ms in sorted({float(r["step_ms"]) for r in rows}):
    at = [r for r in rows if float(r["step_ms"]) == step_ms]
    entry = {}
    for mode in modes:
      mine = [r for r in at if r["mode"] == mode]
      if not mine:
        continue
      entry[mode] = {
          "runs": len(mine),
          "median_local_steps_per_s": float(np.median(
              [r["local_steps_per_s"] for r in mine])),
          "median_cpu_ms_per_local_step": {
              role: float(np.median([r["cpu_ms_per_local_step"][role]
                                     for r in mine])) for role in roles}}
    if "gba" in entry and "pss" in entry:
      entry["gba_over_pss"] = {
          role: (entry["gba"]["median_cpu_ms_per_local_step"][role]
                 / entry["pss"]["median_cpu_ms_per_local_step"][role])
          for role in roles}
    out["by_step_ms"][f"{step_ms:g}"] = entry
  for mode in modes:
    mine = [r for r in rows if r["mode"] == mode]
    rate = np.array([r["local_steps_per_s"] for r in mine])
    out["fit"][mode] = {}
    for role in roles:
      per_s = rate * np.array([r["cpu_ms_per_local_step"][role]
                               for r in mine])
      out["fit"][mode][role] = dict(_line(rate, per_s), runs=len(mine))
  if {"gba", "pss"} <= set(out["fit"]):
    out["gba_over_pss_marginal"] = {
        role: (out["fit"]["gba"][role]["marginal_ms_per_step"]
               / out["fit"]["pss"][role]["marginal_ms_per_step"])
        for role in roles}
  return out


def _line(x: np.ndarray, y: np.ndarray) -> Dict[str, float]:
  """Least-squares y = background + marginal * x (NaN without two rates)."""
  if len(set(np.round(x, 9).tolist())) < 2:
    return {"marginal_ms_per_step": float("nan"),
            "background_ms_per_s": float("nan")}
  marginal, background = np.polyfit(x, y, 1)
  return {"marginal_ms_per_step": float(marginal),
          "background_ms_per_s": float(background)}


def table(summary: Dict, roles: Sequence[str] = ROLES) -> List[str]:
  """The summary as printable lines."""
  lines = ["step_ms  mode  local steps/s  CPU ms per local step ("
           + " / ".join(roles) + ")"]
  for step_ms, entry in summary["by_step_ms"].items():
    for mode in ("pss", "gba"):
      if mode in entry:
        e = entry[mode]
        lines.append(f"{step_ms:>7}  {mode:4}  "
                     f"{e['median_local_steps_per_s']:13.1f}  " + " / ".join(
                         f"{e['median_cpu_ms_per_local_step'][r]:.2f}"
                         for r in roles))
    if "gba_over_pss" in entry:
      lines.append(f"{step_ms:>7}  GBA / PSS           " + " / ".join(
          f"{entry['gba_over_pss'][r]:.2f}" for r in roles))
  for mode, fit in summary["fit"].items():
    lines.append(f"fit {mode}: marginal ms per step " + " / ".join(
        f"{fit[r]['marginal_ms_per_step']:.2f}" for r in roles)
                 + ", background ms per s " + " / ".join(
                     f"{fit[r]['background_ms_per_s']:.0f}" for r in roles))
  if "gba_over_pss_marginal" in summary:
    lines.append("GBA / PSS marginal CPU per step: " + ", ".join(
        f"{r} {summary['gba_over_pss_marginal'][r]:.2f}" for r in roles))
  return lines
