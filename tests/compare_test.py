"""`gba-compare`: stored --converge runs paired by seed across JSONs.

Pure Python on small hand-made JSONs (no training job runs); the last test
runs the command as a user would, through `scripts/compare.py`.
"""

import json
import os
import subprocess
import sys
import tempfile

import tensorflow as tf

from gba_tf.bin import compare

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(condition, mode, seed, auc, logloss=0.5, peak=None,
         dataset="movielens", decayed=None):
  curve = [{"samples": 100, "auc": auc if peak is None else peak},
           {"samples": 200, "auc": auc}]
  counters = (None if decayed is None else
              {"pushed": 1000, "decayed": decayed, "dropped": 0})
  return {"dataset": dataset, "condition": condition, "mode": mode,
          "repeat": seed, "test_auc": auc, "test_logloss": logloss,
          "curve": curve, "gba_counters": counters}


class ParseSideTest(tf.test.TestCase):

  def test_path_condition_mode(self):
    self.assertEqual(compare.parse_side("runs", "a/b:c.json:healthy/sync"),
                     ("a/b:c.json", "healthy", "sync"))

  def test_bad_forms_name_the_value(self):
    for value in ("x.json", "x.json:healthy", ":healthy/sync",
                  "x.json:/sync", "x.json:healthy/", ""):
      with self.assertRaisesRegex(ValueError,
                                  rf"Received: --runs={value}, which must "
                                  "be PATH:CONDITION/MODE"):
        compare.parse_side("runs", value)


class SelectTest(tf.test.TestCase):

  def test_selects_condition_mode_and_dataset(self):
    report = {"runs": [_run("healthy", "sync", 0, 0.7),
                       _run("healthy", "sync", 1, 0.71),
                       _run("straggler", "sync", 2, 0.72),
                       _run("healthy", "gba", 3, 0.73),
                       _run("healthy", "sync", 4, 0.74, dataset="synthetic")]}
    self.assertEqual(sorted(compare.select(report, "healthy", "sync",
                                           "movielens")), [0, 1])
    self.assertEqual(sorted(compare.select(report, "healthy", "sync",
                                           "synthetic")), [4])

  def test_two_datasets_need_dataset(self):
    report = {"runs": [_run("healthy", "sync", 0, 0.7),
                       _run("healthy", "sync", 0, 0.7, dataset="synthetic")]}
    with self.assertRaisesRegex(
        ValueError, r"Received: a\.json, whose healthy/sync runs are of "
        r"datasets \['movielens', 'synthetic'\]; pick one with --dataset"):
      compare.select(report, "healthy", "sync", source="a.json")

  def test_no_such_runs_lists_what_is_held(self):
    report = {"runs": [_run("healthy", "sync", 0, 0.7)]}
    with self.assertRaisesRegex(
        ValueError, r"Received: a\.json, which holds no straggler/gba run\. "
        r"It holds: movielens:healthy/sync\."):
      compare.select(report, "straggler", "gba", source="a.json")

  def test_a_seed_twice_is_refused(self):
    report = {"runs": [_run("healthy", "sync", 0, 0.7),
                       _run("healthy", "sync", 0, 0.8)]}
    with self.assertRaisesRegex(ValueError, "two healthy/sync runs of seed "
                                "0"):
      compare.select(report, "healthy", "sync")


class CompareTest(tf.test.TestCase):

  def test_differences_by_hand(self):
    # Seeds 0-2 on both sides; seed 3 only in `runs` and is left out.
    # test_auc:  0.780 - 0.781 = -0.001, 0.784 - 0.782 = +0.002,
    #            0.783 - 0.783 = 0: mean +0.000333, above in 1 seed.
    #   sd = sqrt(((-0.001333)^2 + 0.001667^2 + 0.000333^2) / 2)
    #      = sqrt((1.7778 + 2.7778 + 0.1111)e-6 / 2) = 0.0015275;
    #   half width t(0.975, 2) * sd / sqrt(3) = 4.303 * 0.0008819 = 0.0037947.
    # peak_auc: 0.79 - 0.785 = +0.005 on every seed: sd 0, above in 3.
    # test_logloss: 0.55 - 0.5 = +0.05 on every seed.
    runs = {s: _run("straggler", "gba", s, auc, logloss=0.55, peak=0.79)
            for s, auc in [(0, 0.780), (1, 0.784), (2, 0.783), (3, 0.9)]}
    against = {s: _run("healthy", "sync", s, auc, peak=0.785)
               for s, auc in [(0, 0.781), (1, 0.782), (2, 0.783)]}
    result = compare.compare(runs, against)
    auc = result["test_auc"]
    self.assertEqual(auc["seeds"], [0, 1, 2])
    self.assertAllClose(auc["per_seed"], [-0.001, 0.002, 0.0])
    self.assertAllClose(auc["mean"], 0.000333333, atol=1e-9)
    self.assertAllClose(auc["sd"], 0.0015275, atol=1e-7)
    self.assertAllClose(auc["low"], 0.000333333 - 0.0037947, atol=1e-6)
    self.assertEqual(auc["above"], 1)
    self.assertAllClose(result["peak_auc"]["mean"], 0.005)
    self.assertEqual(result["peak_auc"]["above"], 3)
    self.assertAllClose(result["test_logloss"]["per_seed"], [0.05] * 3)

  def test_no_common_seed_is_refused(self):
    with self.assertRaisesRegex(ValueError, "none in common"):
      compare.compare({0: _run("h", "s", 0, 0.7)}, {1: _run("h", "s", 1, 0.7)})


class CompareCommandTest(tf.test.TestCase):

  def _command(self, *args):
    return subprocess.run(
        [sys.executable, os.path.join(_ROOT, "scripts", "compare.py"),
         *args], capture_output=True, text=True, timeout=120, check=False)

  def test_end_to_end(self):
    out = tempfile.mkdtemp(dir=self.get_temp_dir())
    a, b = os.path.join(out, "a.json"), os.path.join(out, "b.json")
    with open(a, "w") as f:
      json.dump({"runs": [_run("healthy", "sync", 0, 0.780),
                          _run("healthy", "sync", 1, 0.784)]}, f)
    with open(b, "w") as f:
      json.dump({"runs": [_run("healthy", "sync", 0, 0.781),
                          _run("healthy", "sync", 1, 0.782),
                          _run("straggler", "gba", 0, 0.7)]}, f)
    written = os.path.join(out, "cmp.json")
    done = self._command(f"--runs={a}:healthy/sync",
                         f"--against={b}:healthy/sync", f"--json={written}")
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    # -0.001 and +0.002: mean +0.0005.
    self.assertIn("test_auc      +0.0005", done.stdout)
    self.assertIn("0: -0.0010, 1: +0.0020", done.stdout)
    with open(written) as f:
      stored = json.load(f)
    self.assertEqual(stored["test_auc"]["n"], 2)
    self.assertAllClose(stored["test_auc"]["per_seed"], [-0.001, 0.002])

    self.assertEqual(stored["unlike_seeds"], {"runs": [], "against": []})
    self.assertNotIn("note:", done.stdout)

    # A compared seed that ran another straggler is named: GBA's shares
    # 6.0%, 6.2%, 1.5%, 6.4% (median 6.1%; seed 2 is 4.6 points off it,
    # more than half of it); sync has no counters.
    gba = os.path.join(out, "gba.json")
    with open(gba, "w") as f:
      json.dump({"runs": [_run("straggler", "gba", s, 0.78, decayed=d)
                          for s, d in enumerate([60, 62, 15, 64])]}, f)
    sync = os.path.join(out, "sync.json")
    with open(sync, "w") as f:
      json.dump({"runs": [_run("healthy", "sync", s, 0.78)
                          for s in range(4)]}, f)
    done = self._command(f"--runs={gba}:straggler/gba",
                         f"--against={sync}:healthy/sync",
                         f"--json={written}")
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    self.assertIn("note: --runs: seed 2 decayed or dropped 1.5% of its "
                  "pushes, the seeds' median 6.1%", done.stdout)
    with open(written) as f:
      self.assertEqual(json.load(f)["unlike_seeds"],
                       {"runs": [2], "against": []})
    # Compared on seeds 0-1 only (a has no seed 2): seed 2 is not named.
    done = self._command(f"--runs={gba}:straggler/gba",
                         f"--against={a}:healthy/sync")
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    self.assertNotIn("note:", done.stdout)

    # Bad input: exit 2, one line naming the value, nothing written.
    os.remove(written)
    missing = os.path.join(out, "missing.json")
    for args, line in [
        ([f"--runs={missing}:healthy/sync", f"--against={b}:healthy/sync"],
         f"Received: --runs={missing}:healthy/sync, but {missing} does not "
         "exist."),
        ([f"--runs={a}:straggler/gba", f"--against={b}:healthy/sync"],
         f"Received: --runs={a}:straggler/gba, which holds no straggler/gba "
         "run. It holds: movielens:healthy/sync."),
        ([f"--against={b}:healthy/sync"],
         "Received: --runs=None; it is required (PATH:CONDITION/MODE)."),
    ]:
      done = self._command(*args, f"--json={written}")
      self.assertEqual(done.returncode, 2, done.stderr[-2000:])
      self.assertEqual(done.stderr.strip().splitlines()[-1], line)
      self.assertEqual(done.stdout, "")
      self.assertFalse(os.path.exists(written))


if __name__ == "__main__":
  tf.test.main()
