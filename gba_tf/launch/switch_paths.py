"""The paper's switching experiment: one job whose cluster's health changes.

Used by `gba-benchmark --switching`. A *path* is what a job does while a
straggler comes and goes in the middle third of its step budget (the GBA
paper's Sec. 5.4 setting: a job that trained in sync meets stragglers and
either switches or stays, then the cluster is healthy again):

* `sync`: sync throughout; the straggler slows the middle third.
* `gba` / `async`: sync, then the middle third in GBA (or plain async with
  the same hyper-parameters) with the straggler, then sync again: forced
  switches, each a new launch resuming the previous leg's checkpoint.
* `auto`: one `--mode=auto` launch with the straggler from the start until
  it recovers; the health monitor decides when to switch to GBA and back.
  The straggler lasts as long as the same seed's forced `gba` path took to
  finish its first two legs, so both paths meet it for about as long.

Every leg of a seed draws from the same shared stream (`--input=shared`)
at the position its restored step gives, so the paths see the same
examples in the same order of passes. Which worker takes which batch, and
so which step a batch lands in, depends on timing: two runs of one sync
path are not bit-identical (on the synthetic job this order moved the final
AUC by about +-0.01 at 300 steps).

Example:

>>> leg_steps(300, 30)
[90, 210, 300]
>>> [mode for mode, _ in PATHS["gba"]]
['sync', 'gba', 'sync']
"""

from typing import Dict, List, Mapping, Sequence, Tuple

# Path -> legs, each (mode, condition); conditions as in gba-benchmark.
PATHS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "sync": (("sync", "healthy"), ("sync", "straggler"),
             ("sync", "healthy")),
    "gba": (("sync", "healthy"), ("gba", "straggler"), ("sync", "healthy")),
    "async": (("sync", "healthy"), ("async", "straggler"),
              ("sync", "healthy")),
    "auto": (("auto", "straggler"),),
}
# Every path is paired by seed against this one: the accuracy sync gives.
REFERENCE = "sync"


def leg_steps(train_steps: int, steps_per_loop: int) -> List[int]:
  """Cumulative optimizer steps at the end of each of the three legs.

  Thirds of `train_steps`, each boundary rounded to a whole loop (so every
  leg ends on an evaluation), the last exactly `train_steps`.
  """
  if not (isinstance(train_steps, int) and isinstance(steps_per_loop, int)
          and 0 < steps_per_loop and 3 * steps_per_loop <= train_steps):
    raise ValueError(f"Received: train_steps={train_steps!r}, steps_per_loop"
                     f"={steps_per_loop!r}; three legs need train_steps >= "
                     "3 x steps_per_loop > 0.")
  bounds = [max(1, round(train_steps * k / 3 / steps_per_loop)) *
            steps_per_loop for k in (1, 2)]
  return bounds + [train_steps]


def _same_evaluation(a: Mapping[str, object],
                     b: Mapping[str, object]) -> bool:
  """Whether two curve points evaluated the same weights: the same samples,
  or the same optimizer step."""
  step = a.get("optimizer_steps")
  return (a["samples"] == b["samples"] or
          (step is not None and step == b.get("optimizer_steps")))


def join_phases(phases: Sequence[Mapping[str, object]]) -> List[dict]:
  """One held-out curve from the phases of a path, in order.

  Each phase's curve (`phases.jsonl`) starts with an evaluation of the step
  it restored, the point the phase before ended on: kept once, as the phase
  before recorded it. The two can differ in samples: a GBA phase that a
  switch ends has trained local batches no global step applied (its pending
  gradients), which the checkpoint does not count; they share the optimizer
  step. Training seconds add up across phases (start-up and evaluation left
  out).
  """
  curve: List[dict] = []
  offset = 0.0
  for phase in phases:
    points = list(phase.get("curve") or [])
    if curve and points and _same_evaluation(points[0], curve[-1]):
      points = points[1:]
    curve += [dict(p, train_seconds=p["train_seconds"] + offset)
              for p in points]
    offset += float(phase["seconds"])
  return curve
