"""`gba-compare`: two sets of stored `--converge` runs, paired by seed.

`gba-benchmark --converge` pairs every mode with healthy sync of the same
JSON. Some questions pair other runs: healthy sync rerun against itself
(how far one run of one seed moves), GBA with a straggler against healthy
GBA (what the straggler costs), or runs stored in two JSONs. This command
answers them from the stored JSONs, without running anything:

  gba-compare \\
      --runs=docs/results/converge_movielens_plateau_healthy.json:healthy/sync \\
      --against=docs/results/converge_movielens_plateau_10_seeds.json:healthy/sync
  python scripts/compare.py ...   # a source checkout; the same

Each side is `PATH:CONDITION/MODE` (a run's `condition` and `mode` in the
JSON, e.g. `straggler/gba`, `healthy/sync`); `--dataset` picks the dataset
where a JSON holds more than one. For the seeds both sides ran it prints,
for the final held-out AUC, the final logloss and the peak AUC (the highest
evaluation of the curve: what early stopping would keep), the mean of
`runs - against` over seeds with its 95% confidence interval
(`gba_tf.launch.convergence.paired_difference`), the per-seed differences,
and in how many seeds `runs` is above; with --json=PATH it also writes them.
A compared seed whose share of pushes decayed or dropped is unlike the rest
of its side's (`gba_tf.launch.convergence.unlike_seeds`: its stragglers
lagged otherwise, e.g. on a slower host) is named in a note under them.
"""

import json
import sys

from absl import app
from absl import flags

from gba_tf.launch import convergence

FLAGS = flags.FLAGS
# What is compared: name -> the value of one run.
METRICS = {
    "test_auc": lambda run: run["test_auc"],
    "test_logloss": lambda run: run["test_logloss"],
    "peak_auc": lambda run: max(p["auc"] for p in run["curve"]),
}


def define_flags() -> None:
  flags.DEFINE_string("runs", None, "PATH:CONDITION/MODE: the runs "
                      "compared, from a --converge JSON.")
  flags.DEFINE_string("against", None, "PATH:CONDITION/MODE: the runs "
                      "they are paired with, seed by seed.")
  flags.DEFINE_string("dataset", None, "The dataset, where a JSON holds "
                      "more than one.")
  flags.DEFINE_string("json", None, "Also write the comparison here.")


def parse_side(flag: str, value: str):
  """`PATH:CONDITION/MODE` -> (path, condition, mode); ValueError naming
  `value` (from `--flag`) if it is not of that form."""
  path, sep, case = (value or "").rpartition(":")
  condition, slash, mode = case.partition("/")
  if not (sep and path and slash and condition and mode):
    raise ValueError(f"Received: --{flag}={value}, which must be "
                     "PATH:CONDITION/MODE, e.g. "
                     "docs/results/converge_movielens.json:healthy/sync.")
  return path, condition, mode


def select(report, condition, mode, dataset=None, source="the JSON"):
  """The runs of `report` (a --converge JSON) with this condition and mode
  (and dataset: needed where it holds several), by seed. Raises ValueError
  naming `source` if there are none, or the dataset is ambiguous.

  Example:

  >>> run = {"dataset": "d", "condition": "healthy", "mode": "sync",
  ...        "repeat": 0}
  >>> report = {"runs": [run, dict(run, repeat=1), dict(run, mode="gba")]}
  >>> sorted(select(report, "healthy", "sync"))
  [0, 1]
  """
  runs = [r for r in report["runs"]
          if (r["condition"], r["mode"]) == (condition, mode)
          and dataset in (None, r["dataset"])]
  datasets = sorted({r["dataset"] for r in runs})
  if len(datasets) > 1:
    raise ValueError(f"Received: {source}, whose {condition}/{mode} runs "
                     f"are of datasets {datasets}; pick one with --dataset.")
  if not runs:
    held = sorted({f"{r['dataset']}:{r['condition']}/{r['mode']}"
                   for r in report["runs"]})
    raise ValueError(f"Received: {source}, which holds no "
                     f"{condition}/{mode} run"
                     f"{f' of dataset {dataset}' if dataset else ''}. It "
                     f"holds: {', '.join(held) or 'no runs'}.")
  by_seed = {}
  for r in runs:
    if r["repeat"] in by_seed:
      raise ValueError(f"Received: {source}, which holds two {condition}/"
                       f"{mode} runs of seed {r['repeat']}.")
    by_seed[r["repeat"]] = r
  return by_seed


def compare(runs, against):
  """Per metric of METRICS: `convergence.paired_difference` of `runs` minus
  `against` (dicts seed -> run), with the per-seed differences and the
  number of seeds where `runs` is above.

  Example (differences derived by hand: seed 0, 0.71 - 0.70 = +0.01; seed
  1, 0.70 - 0.72 = -0.02; mean -0.005):

  >>> def run(auc):
  ...   return {"test_auc": auc, "test_logloss": 0.5,
  ...           "curve": [{"samples": 1, "auc": auc}]}
  >>> d = compare({0: run(0.71), 1: run(0.70)},
  ...             {0: run(0.70), 1: run(0.72), 2: run(0.9)})["test_auc"]
  >>> round(d["mean"], 4), d["seeds"], d["above"]
  (-0.005, [0, 1], 1)
  """
  result = {}
  for name, value in METRICS.items():
    mine = {s: value(r) for s, r in runs.items()}
    theirs = {s: value(r) for s, r in against.items()}
    d = convergence.paired_difference(mine, theirs)
    d["per_seed"] = [mine[s] - theirs[s] for s in d["seeds"]]
    d["above"] = sum(x > 0 for x in d["per_seed"])
    result[name] = d
  return result


def unlike(side, seeds):
  """The shares of pushes decayed or dropped of `side` (dict seed -> run)
  by seed, and those of `seeds` (the compared ones) that
  `convergence.unlike_seeds` finds unlike all of the side's runs.

  Example (median 0.06; seed 2's 0.02 is unlike it, and seed 3's 0.01 too,
  but seed 3 is not compared):

  >>> def run(decayed):
  ...   return {"gba_counters": {"pushed": 100, "decayed": decayed,
  ...                            "dropped": 0}}
  >>> side = {0: run(6), 1: run(6), 2: run(2), 3: run(1), 4: run(7)}
  >>> unlike(side, [0, 1, 2])[1]
  [2]
  """
  shares = {s: convergence.reweighted_share(r) for s, r in side.items()}
  return shares, [s for s in convergence.unlike_seeds(shares) if s in seeds]


def _load(flag):
  path, condition, mode = parse_side(flag, FLAGS[flag].value)
  try:
    report = convergence.read_report_json(path)
  except ValueError as e:
    raise ValueError(f"Received: --{flag}={FLAGS[flag].value}, but {path} "
                     f"{e}.") from e
  return select(report, condition, mode, FLAGS.dataset,
                source=f"--{flag}={FLAGS[flag].value}")


def table(result) -> str:
  lines = []
  for name, d in result.items():
    lines.append(
        f"{name:13} {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] "
        f"(n={d['n']}, above in {d['above']}); per seed "
        + ", ".join(f"{s}: {x:+.4f}" for s, x in zip(d["seeds"],
                                                      d["per_seed"])))
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  try:
    for flag in ("runs", "against"):
      if not FLAGS[flag].value:
        raise ValueError(f"Received: --{flag}={FLAGS[flag].value}; it is "
                         "required (PATH:CONDITION/MODE).")
    sides = {"runs": _load("runs"), "against": _load("against")}
    result = compare(sides["runs"], sides["against"])
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2
  print(f"{FLAGS.runs} minus {FLAGS.against}, paired by seed "
        "(mean [95% CI]):")
  print(table(result))
  unlike_seeds = {}
  for flag, side in sides.items():
    shares, unlike_seeds[flag] = unlike(side, result["test_auc"]["seeds"])
    if unlike_seeds[flag]:
      print(convergence.unlike_note(f"--{flag}", shares, unlike_seeds[flag]))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"runs": FLAGS.runs, "against": FLAGS.against,
                 "dataset": FLAGS.dataset, **result,
                 "unlike_seeds": unlike_seeds}, f, indent=1)
  return 0


def run() -> None:
  """The `gba-compare` console entry point."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
