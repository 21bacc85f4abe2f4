"""Convergence statistics (`gba_tf.launch.convergence`) by hand, and
`gba-benchmark --converge --tiny` end to end."""

import json
import os
import subprocess
import sys

import tensorflow as tf

from gba_tf.bin import benchmark
from gba_tf.launch import convergence
from tests import testing_utils


def _curve(points):
  return [{"samples": s, "auc": a} for s, a in points]


class PlateauTest(tf.test.TestCase):

  def test_gain_over_the_last_fifth_by_hand(self):
    # Budget 1,000 samples: the window starts at the first evaluation at or
    # past 800. Evaluations at 0, 500, 800, 1000: 0.7230 - 0.7215 = 0.0015.
    curve = _curve([(0, 0.5), (500, 0.70), (800, 0.7215), (1000, 0.7230)])
    self.assertAlmostEqual(convergence.plateau_gain(curve), 0.0015)
    self.assertFalse(convergence.plateaued(curve))
    # ... 0.7220 - 0.7215 = 0.0005 < 0.001: plateaued.
    curve[-1]["auc"] = 0.7220
    self.assertTrue(convergence.plateaued(curve))
    # No evaluation inside the window (0, 500, 1000): from the one before
    # it, 0.7220 - 0.70.
    sparse = _curve([(0, 0.5), (500, 0.70), (1000, 0.7220)])
    self.assertAlmostEqual(convergence.plateau_gain(sparse), 0.022)
    # A falling curve has plateaued (gain < 0).
    self.assertTrue(convergence.plateaued(
        _curve([(0, 0.5), (800, 0.73), (1000, 0.72)])))

  def test_bad_curve_is_one_line(self):
    with self.assertRaisesRegex(ValueError, "Received: a curve of 1 point"):
      convergence.plateau_gain(_curve([(0, 0.5)]))


class SeedBandTest(tf.test.TestCase):

  def test_seeds_meet_at_the_same_samples_by_hand(self):
    # Seed a evaluates at 0, 100, 200; seed b (an auto run: a switch at 50)
    # at 0, 50, 150, 250. The grid is every x both cover, [0, 200]:
    # 0, 50, 100, 150, 200.
    a = _curve([(0, 0.50), (100, 0.70), (200, 0.80)])
    b = _curve([(0, 0.50), (50, 0.60), (150, 0.76), (250, 0.90)])
    band = convergence.seed_band([a, b])
    self.assertEqual(band["x"], [0, 50, 100, 150, 200])
    # a at 50: 0.60 (halfway 0.50 -> 0.70); at 150: 0.75.
    # b at 100: 0.68 (halfway 0.60 -> 0.76); at 200: 0.83 (halfway 0.76 ->
    # 0.90).
    # Means: 0.50, (0.60+0.60)/2, (0.70+0.68)/2, (0.75+0.76)/2,
    # (0.80+0.83)/2.
    self.assertAllClose(band["mean"], [0.50, 0.60, 0.69, 0.755, 0.815])
    self.assertAllClose(band["low"], [0.50, 0.60, 0.68, 0.75, 0.80])
    self.assertAllClose(band["high"], [0.50, 0.60, 0.70, 0.76, 0.83])
    self.assertEqual((band["seeds"], band["skipped"]), (2, 0))
    # By evaluation index the second point would mix 100 and 50 samples:
    # (0.70 + 0.60) / 2 = 0.65, not a's and b's AUC at any one x.
    self.assertNotAlmostEqual(band["mean"][1], 0.65)

  def test_same_schedule_is_the_per_index_mean_and_seconds_work(self):
    a = [{"samples": s, "train_seconds": t, "auc": v}
         for s, t, v in [(0, 0.0, 0.5), (10, 2.0, 0.6), (20, 4.0, 0.7)]]
    b = [{"samples": s, "train_seconds": t, "auc": v}
         for s, t, v in [(0, 0.0, 0.5), (10, 1.0, 0.8), (20, 3.0, 0.9)]]
    band = convergence.seed_band([a, b])
    self.assertEqual(band["x"], [0, 10, 20])
    self.assertAllClose(band["mean"], [0.5, 0.7, 0.8])
    # Against seconds: up to 3.0 (b's end); grid 0, 1, 2, 3. a at 1: 0.55,
    # at 3: 0.65; b at 2: 0.85. Means 0.5, 0.675, 0.725, 0.775.
    band = convergence.seed_band([a, b], "train_seconds")
    self.assertEqual(band["x"], [0.0, 1.0, 2.0, 3.0])
    self.assertAllClose(band["mean"], [0.5, 0.675, 0.725, 0.775])

  def test_a_curve_going_back_in_samples_is_left_out(self):
    # The pre-fix auto curve: the switch's evaluation labelled a loop
    # ahead (102,400) before the next phase's first (15,360).
    bad = _curve([(0, 0.5), (102400, 0.70), (15360, 0.70), (204800, 0.8)])
    good = _curve([(0, 0.5), (204800, 0.9)])
    band = convergence.seed_band([bad, good])
    self.assertEqual((band["seeds"], band["skipped"]), (1, 1))
    self.assertEqual(band["x"], [0, 204800])
    self.assertAllClose(band["mean"], [0.5, 0.9])
    self.assertIsNone(convergence.seed_band([bad]))
    self.assertIsNone(convergence.seed_band([]))


class ReplotTest(tf.test.TestCase):
  """`gba-benchmark --replot`: a stored JSON's PNGs drawn again."""

  def _replot(self, *args):
    return subprocess.run(
        [sys.executable, os.path.join(testing_utils.ROOT, "scripts",
                                      "benchmark.py"), *args],
        cwd=testing_utils.ROOT, capture_output=True, text=True, timeout=300,
        check=False)

  def test_redraws_a_switching_json_leaving_out_curves_going_back(self):
    out = testing_utils.temp_dir(self, "gba_replot_test_")
    def run(path, seed, points):
      return {"dataset": "movielens", "path": path, "repeat": seed,
              "curve": [{"samples": s, "train_seconds": t, "auc": a}
                        for s, t, a in points]}
    ok = [(0, 0.0, 0.5), (100, 1.0, 0.7), (200, 2.0, 0.8)]
    # An auto run of the old count: its switch labelled a loop ahead.
    back = [(0, 0.0, 0.5), (300, 1.0, 0.7), (100, 1.5, 0.7), (200, 2.0, 0.8)]
    path = os.path.join(out, "switching_x.json")
    with open(path, "w") as f:
      json.dump({"runs": [run("sync", 0, ok), run("sync", 1, ok),
                          run("auto", 0, back), run("auto", 1, ok)]}, f)
    proc = self._replot(f"--replot={path}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    for suffix in ("auc", "auc_wallclock"):
      self.assertTrue(os.path.getsize(
          os.path.join(out, f"switching_x_{suffix}.png")) > 0)
    # Only the samples plot leaves the auto seed out: its seconds go on.
    self.assertIn("switching_x_auc.png: movielens switching auto: 1 of 2 "
                  "seeds left out (their samples go back)", proc.stdout)
    self.assertNotIn("switching_x_auc_wallclock.png: ", proc.stdout)
    self.assertNotIn("sync: ", proc.stdout)

  def test_bad_file_or_flags_are_one_line(self):
    out = testing_utils.temp_dir(self, "gba_replot_bad_")
    broken = os.path.join(out, "broken.json")
    with open(broken, "w") as f:
      f.write("{")
    no_curve = os.path.join(out, "no_curve.json")
    with open(no_curve, "w") as f:
      json.dump({"runs": [{"mode": "sync"}]}, f)
    for args, line in [
        ([f"--replot={broken}"], f"Received: --replot={broken}, which is "
         "not a --converge or --switching JSON (JSONDecodeError: "),
        ([f"--replot={no_curve}"], f"Received: --replot={no_curve}, which "
         "is not a --converge or --switching JSON (a run without a curve"),
        ([f"--replot={out}/none.json"], f"Received: --replot={out}/none.json"
         ", which does not exist."),
        ([f"--replot={broken}", "--converge"], f"Received: --replot="
         f"{broken} with --converge; --replot runs nothing.")]:
      proc = self._replot(*args)
      self.assertEqual(proc.returncode, 2, args)
      self.assertIn(line, proc.stderr.strip().splitlines()[-1])
    # Nothing drawn for a bad file.
    self.assertCountEqual(os.listdir(out), ["broken.json", "no_curve.json"])


class ReadReportJsonTest(tf.test.TestCase):

  def test_a_report_and_each_bad_file(self):
    tmp = self.get_temp_dir()
    good, no_runs, broken = (os.path.join(tmp, n) for n in
                             ("good.json", "no_runs.json", "broken.json"))
    with open(good, "w") as f:
      json.dump({"runs": [{"seed": 0}]}, f)
    with open(no_runs, "w") as f:
      json.dump({"cases": []}, f)
    with open(broken, "w") as f:
      f.write("{")
    self.assertEqual(convergence.read_report_json(good)["runs"],
                     [{"seed": 0}])
    # Each reason completes a caller's "Received: ..." line.
    for path, reason in [(os.path.join(tmp, "none.json"), "does not exist"),
                         (no_runs, "is not a --converge JSON (KeyError: "
                                   "'runs')"),
                         (broken, "is not a --converge JSON "
                                  "(JSONDecodeError: ")]:
      with self.assertRaises(ValueError) as raised:
        convergence.read_report_json(path)
      self.assertTrue(str(raised.exception).startswith(reason),
                      str(raised.exception))
    # --resume of a --switching run reads its JSON the same way.
    with self.assertRaisesRegex(ValueError,
                                r"^is not a --switching JSON \(KeyError"):
      convergence.read_report_json(no_runs, "--switching")


def _stored_summary(stem, dataset="movielens"):
  """mode -> `summarize_converge` entry of the stored
  docs/results/converge_<dataset>_plateau_<stem>.json."""
  with open(os.path.join(testing_utils.ROOT, "docs", "results",
                         f"converge_{dataset}_plateau_{stem}.json")) as f:
    rows = json.load(f)["runs"]
  return {e["mode"]: e for e in benchmark.summarize_converge(rows)}


def _row(mode, seed, **fields):
  """A --converge run of `mode` (sync: healthy; else with the 1:4
  straggler) and seed, the same curve in every run, no GBA counters
  unless `fields` give them."""
  return {"dataset": "movielens", "mode": mode, "repeat": seed,
          "condition": "healthy" if mode == "sync" else "straggler",
          "test_auc": 0.78, "test_logloss": 0.57, "best_auc": None,
          "samples_per_s": 1000.0, "wall_seconds": 10.0,
          "curve": _curve([(0, 0.5), (800, 0.77), (1000, 0.78)]),
          "gba_counters": None, **fields}


class DecayedShareTest(tf.test.TestCase):

  def test_share_decayed_or_dropped_per_seed_by_hand(self):
    # Seed 0 of GBA: 9 decayed + 1 dropped of 200 pushes = 0.05; seed 1:
    # none of 100 = 0.0. Sync keeps no GBA counters: None, and "-" in the
    # table. The range GBA's row prints: 0.0%-5.0%.
    rows = [_row("sync", 0), _row("sync", 1),
            _row("gba", 0, gba_counters={"pushed": 200, "decayed": 9,
                                         "dropped": 1}),
            _row("gba", 1, gba_counters={"pushed": 100, "decayed": 0,
                                         "dropped": 0})]
    summary = {e["mode"]: e for e in benchmark.summarize_converge(rows)}
    self.assertEqual(summary["gba"]["decayed_or_dropped"], [0.05, 0.0])
    self.assertEqual(summary["sync"]["decayed_or_dropped"], [None, None])
    table = benchmark.converge_table(list(summary.values())).splitlines()
    self.assertTrue(table[1].endswith(" -"), table[1])
    self.assertTrue(table[2].endswith(" 0.0%-5.0%"), table[2])

  def test_slowdown_measured_by_pushes_per_seed_by_hand(self):
    # "straggler" is 1:4 on worker 1. Seed 0: workers 0, 2, 3 pushed 150,
    # 160, 170 (mean 160) and worker 1 40: 160 / 40 = 4.0. Seed 1: worker
    # 1 pushed 64 of the others' 160: 2.5, a straggler that lagged less
    # than its spec. Seed 2, stored before pushes were kept: None. Sync
    # has no straggler: None. GBA's line gives the range 2.5-4.0 and names
    # seed 1, under 0.8 x 4 = 3.2.
    rows = [_row("sync", s, worker_pushed=None) for s in range(3)] + [
        _row("gba", 0, worker_pushed=[150, 40, 160, 170]),
        _row("gba", 1, worker_pushed=[160, 64, 160, 160]), _row("gba", 2)]
    summary = {e["mode"]: e for e in benchmark.summarize_converge(rows)}
    self.assertEqual(summary["gba"]["measured_slowdowns"],
                     [{"1": 4.0}, {"1": 2.5}, None])
    self.assertEqual(summary["sync"]["measured_slowdowns"],
                     [None, None, None])
    table = benchmark.converge_table(list(summary.values())).splitlines()
    self.assertIn("slowdown measured by pushes: movielens straggler gba: "
                  "worker 1 2.5-4.0 (spec 4); under 80% of the spec in seed "
                  "1: the healthy workers' steps took longer than "
                  "--step_ms, so raise it", table)
    self.assertLen([l for l in table if l.startswith("slowdown")], 1)

  def _assert_named(self, entry, seeds, note):
    """`entry` names `seeds` unlike, and the table's last line starts with
    `note`."""
    self.assertEqual(entry["unlike_seeds"], seeds)
    last = benchmark.converge_table([entry]).splitlines()[-1]
    self.assertTrue(last.startswith(note), last)

  def test_the_twenty_seed_run_shows_its_milder_seeds(self):
    # README "Twenty seeds": seeds 11-15 ran a milder straggler; the
    # stored counters give 105 / 8,000 = 1.3% (seed 11) and 402 / 8,000 =
    # 5.0% (seed 18), against 493-528 of 8,000 (6.2-6.6%) in seeds 0-9.
    gba = _stored_summary("20_seeds")["gba"]
    shares = gba["decayed_or_dropped"]
    self.assertAlmostEqual(shares[11], 105 / 8000)
    self.assertAlmostEqual(shares[18], 402 / 8000)
    self.assertAlmostEqual(min(shares[:10]), 493 / 8000)
    self.assertAlmostEqual(max(shares[:10]), 528 / 8000)
    # The median of the twenty, (402 + 493) / 2 / 8,000 = 5.59%: a seed is
    # named off it by more than half of it, 2.8 points. Seeds 11-15 (105,
    # 164, 206, 156, 211 of 8,000: 1.3-2.6%) are; seed 10's 301 (3.76%,
    # 1.8 off) is not. The table says so under the figures.
    self._assert_named(
        gba, [11, 12, 13, 14, 15],
        "note: movielens straggler gba: seeds 11, 12, 13, 14, 15 decayed or "
        "dropped 1.3%, 2.1%, 2.6%, 1.9%, 2.6% of their pushes, the seeds' "
        "median 5.6%")

  def test_the_8_worker_fifteen_seeds_show_their_harsher_seeds(self):
    # README "Fifteen seeds": seeds 10-14 ran on a host twice as fast, and
    # the two stragglers (sleeps, not sped up) lagged more. Of 16,000 pushes
    # GBA decayed or dropped 499, 497, 536, 511, 535 there; 10-59 in seeds
    # 0-9. The median of the fifteen is the 8th smallest, 47 (0.29%); half
    # of it is under the one-point floor, so a seed is named off it by more
    # than 0.01: seeds 10-14 (2.8-3.1 points off) are, seed 6's 59 (0.08
    # off) is not.
    gba = _stored_summary("8w_two_stragglers_15_seeds")["gba"]
    self.assertEqual([round(s * 16000) for s in gba["decayed_or_dropped"]],
                     [49, 10, 38, 20, 44, 47, 59, 20, 18, 30,
                      499, 497, 536, 511, 535])
    self._assert_named(
        gba, [10, 11, 12, 13, 14],
        "note: movielens two_stragglers gba: seeds 10, 11, 12, 13, 14 "
        "decayed or dropped 3.1%, 3.1%, 3.4%, 3.2%, 3.3% of their pushes, "
        "the seeds' median 0.3%")

  def test_the_synthetic_ten_seeds_split_by_host(self):
    # README "Ten seeds" (synthetic, two stragglers on 4 workers): seeds
    # 5-9 ran on a faster host. Of 20,000 pushes GBA decayed 74, 42, 26,
    # 97, 48 in seeds 0-4 and 496, 372, 578, 635, 852 in 5-9; nothing
    # dropped. The median of the ten falls between the groups, (97 + 372)
    # / 2 / 20,000 = 1.17%; half of it is under the one-point floor, so a
    # seed is named off it by more than 0.01: seed 2 (0.13%, 1.04 off)
    # and 5, 7, 8, 9 (1.3-3.1 off) are; seed 1 (0.21%, 0.96 off) and seed
    # 6 (1.86%, 0.69 off) are not.
    summary = _stored_summary("two_stragglers_10_seeds", "synthetic")
    gba = summary["gba"]
    self.assertEqual([round(s * 20000) for s in gba["decayed_or_dropped"]],
                     [74, 42, 26, 97, 48, 496, 372, 578, 635, 852])
    self._assert_named(
        gba, [2, 5, 7, 8, 9],
        "note: synthetic two_stragglers gba: seeds 2, 5, 7, 8, 9 decayed "
        "or dropped 0.1%, 2.5%, 2.9%, 3.2%, 4.3% of their pushes, the "
        "seeds' median 1.2%")
    # The README's figures: GBA - healthy sync -0.0002 [-0.0006, +0.0001]
    # (it meets the target); async - healthy sync -0.0008 [-0.0015,
    # -0.0001], ten seeds each.
    for mode, low, mean, high in [("gba", -0.0006, -0.0002, 0.0001),
                                  ("async", -0.0015, -0.0008, -0.0001)]:
      d = summary[mode]["auc_vs_healthy_sync"]
      self.assertEqual(d["n"], 10)
      self.assertEqual([round(d[k], 4) for k in ("low", "mean", "high")],
                       [low, mean, high])
    self.assertTrue(summary["gba"]["meets_target"])

  def test_the_synthetic_straggler_at_its_spec(self):
    # README "A straggler at its spec" (--step_ms=50): worker 1 pushed
    # 1,558-1,561 of each run's 20,000, the others about 6,147, e.g. seed
    # 0: (6,145 + 6,151 + 6,146) / 3 / 1,558 = 3.95 and seed 1: (6,147 +
    # 6,150 + 6,142) / 3 / 1,561 = 3.94, over 0.8 x 4 = 3.2: no seed
    # milder than the spec. GBA decayed 1,389, 1,364, 1,346, 1,332, 1,305
    # (6.5-6.9%: one job, no unlike seed). The README's figures: GBA -
    # healthy sync -0.0002 [-0.0010, +0.0006] (meets the target); async -
    # healthy sync -0.0012 [-0.0022, -0.0001] (below its lower bound).
    self._assert_synthetic_job_at_spec(
        "step_ms_50", [(3.95,), (3.94,), (3.95,), (3.94,), (3.94,)],
        decayed=[1389, 1364, 1346, 1332, 1305], of=20000,
        slowdown_line="synthetic straggler gba: worker 1 3.9-3.9 (spec 4)",
        expected=[("gba", -0.0010, -0.0002, 0.0006, True),
                  ("async", -0.0022, -0.0012, -0.0001, False)])

  def test_two_synthetic_stragglers_at_their_spec(self):
    # README "Two stragglers at their spec" (--step_ms=50): workers 0 and
    # 2 pushed about 7,980 each, workers 1 and 3 2,683-2,694 and
    # 1,346-1,353, e.g. seed 0: (7,979 + 7,992) / 2 / 2,683 = 2.98 and
    # / 1,346 = 5.93, over 0.8 x 3 = 2.4 and 0.8 x 6 = 4.8: no seed
    # milder than the spec. GBA decayed 1,329, 1,331, 1,330, 1,331, 1,335
    # of 20,000 (6.6-6.7%). Healthy sync is the step_ms_50 job's, by
    # --reference: GBA - healthy sync per seed -0.0004, -0.0007, -0.0015,
    # -0.0004, +0.0007, mean -0.0005, sd 0.0008, t(4) = 2.776: [-0.0014,
    # +0.0005], meets the target; async -0.0009, -0.0004, -0.0021,
    # -0.0012, -0.0005: -0.0010 [-0.0019, -0.0002], below in all 5.
    self._assert_synthetic_job_at_spec(
        "two_stragglers_step_ms_50",
        [(2.98, 5.93), (2.97, 5.9), (2.97, 5.92), (2.97, 5.92), (2.96, 5.9)],
        decayed=[1329, 1331, 1330, 1331, 1335], of=20000,
        slowdown_line="synthetic two_stragglers gba: worker 1 3.0-3.0 "
                      "(spec 3), worker 3 5.9-5.9 (spec 6)",
        expected=[("gba", -0.0014, -0.0005, 0.0005, True),
                  ("async", -0.0019, -0.0010, -0.0002, False)])

  def test_two_synthetic_stragglers_among_8_at_their_spec(self):
    # README "Two stragglers among 8 workers at their spec"
    # (--step_ms=200): the six healthy workers pushed 36,909-36,913 in all,
    # about 6,152 each; worker 1 2,057-2,061 and worker 3 1,030-1,031, e.g.
    # seed 0: 36,911 / 6 / 2,059 = 2.99 and / 1,030 = 5.97, over 0.8 x 3 =
    # 2.4 and 0.8 x 6 = 4.8: no seed milder than the spec. GBA decayed
    # 1,624, 1,624, 1,619, 1,625, 1,634 of 40,000 (4.05-4.09%) and dropped
    # none. GBA - healthy sync per seed -0.0002, +0.0009, -0.0015,
    # -0.0009, +0.0003: mean -0.0003, sd 0.00094, t(4) = 2.776, half-width
    # 2.776 x 0.00094 / sqrt(5) = 0.0012: [-0.0014, +0.0009], meets the
    # target. Async -0.3602, -0.3611, -0.0038, -0.3682, -0.0047 (it
    # collapsed to AUC 0.50 in seeds 0, 1 and 3): -0.2196 [-0.4637,
    # +0.0245].
    self._assert_synthetic_job_at_spec(
        "8w_two_stragglers_step_ms_200",
        [(2.99, 5.97)] * 3 + [(2.98, 5.97), (2.99, 5.97)],
        decayed=[1624, 1624, 1619, 1625, 1634], of=40000,
        slowdown_line="synthetic two_stragglers gba: worker 1 3.0-3.0 "
                      "(spec 3), worker 3 6.0-6.0 (spec 6)",
        expected=[("gba", -0.0014, -0.0003, 0.0009, True),
                  ("async", -0.4637, -0.2196, 0.0245, False)])

  def _assert_synthetic_job_at_spec(self, stem, slowdowns, decayed, of,
                                    slowdown_line, expected):
    """The stored synthetic job `stem`: GBA's per-seed slowdowns measured
    by pushes (one tuple a seed, by straggler worker, 2 places), the
    gradients it decayed or dropped of `of` per run, no unlike seed, the
    table's `slowdown_line`, and `expected` for
    `_assert_against_healthy_sync`."""
    summary = _stored_summary(stem, "synthetic")
    gba = summary["gba"]
    self.assertEqual([tuple(round(s[w], 2) for w in sorted(s))
                      for s in gba["measured_slowdowns"]], slowdowns)
    self.assertEqual([round(s * of) for s in gba["decayed_or_dropped"]],
                     decayed)
    self.assertEqual(gba["unlike_seeds"], [])
    table = benchmark.converge_table(list(summary.values())).splitlines()
    self.assertIn("slowdown measured by pushes: " + slowdown_line, table)
    self._assert_against_healthy_sync(summary, expected)

  def _assert_against_healthy_sync(self, summary, expected):
    """`expected`: (mode, low, mean, high, meets_target) per mode, the
    paired AUC difference over 5 seeds rounded to 4 places."""
    for mode, low, mean, high, meets in expected:
      d = summary[mode]["auc_vs_healthy_sync"]
      self.assertEqual(d["n"], 5)
      self.assertEqual([round(d[k], 4) for k in ("low", "mean", "high")],
                       [low, mean, high])
      self.assertEqual(summary[mode]["meets_target"], meets)

  def test_runs_at_one_staleness_have_no_unlike_seed(self):
    # Two stragglers, GBA's twenty seeds: 375 (seed 5, 4.7%) to 532 of
    # 8,000 (6.6%), median 6.4%; seed 5 is 1.7 points off it, under the
    # 3.2 (half the median) that names a seed. Backup workers drop
    # 37.6-39.7%: none named either. The one-straggler twenty with seeds
    # 11-15 rerun (478-520 of 8,000): seed 10's 301 (3.8%) is 2.6 points
    # off the median (508 + 511) / 2 / 8,000 = 6.4%, under 3.2. Two
    # stragglers among 8 workers, seeds 0-9: 10-59 of 16,000, all within
    # the one-point floor of each other.
    for stem, mode in [("two_stragglers_20_seeds", "gba"),
                       ("8w_two_stragglers_10_seeds", "gba"),
                       ("two_stragglers_backup_workers_20_seeds",
                        "backup_workers"),
                       ("20_seeds_rerun_11_15", "gba")]:
      summary = list(_stored_summary(stem).values())
      self.assertEqual({e["mode"]: e["unlike_seeds"] for e in summary},
                       {"sync": [], mode: []})
      self.assertFalse(any(line.startswith("note:") for line in
                           benchmark.converge_table(summary).splitlines()))

  def test_unlike_seeds_by_hand(self):
    # Median of 0.10, 0.10, 0.10, 0.04, 0.16, 0.05 is 0.10: a seed is
    # named when off it by more than max(0.5 * 0.10, 0.01) = 0.05. Seed 3
    # (0.06 off) and seed 4 (0.06 off, above) are; seed 5 (exactly 0.05
    # off) is not. None (a sync run) is skipped.
    shares = {0: 0.10, 1: 0.10, 2: 0.10, 3: 0.04, 4: 0.16, 5: 0.05, 6: None}
    self.assertEqual(convergence.unlike_seeds(shares), [3, 4])
    # The one-point floor: median 0.004, so half of it is 0.002, but 0.012
    # (0.008 off) is not named, and 0.0151 (0.0111 off) is.
    self.assertEqual(convergence.unlike_seeds(
        {0: 0.004, 1: 0.004, 2: 0.012, 3: 0.0}), [])
    self.assertEqual(convergence.unlike_seeds(
        {0: 0.004, 1: 0.004, 2: 0.0151, 3: 0.0}), [2])
    # Two shares: no "others"; none named however far apart.
    self.assertEqual(convergence.unlike_seeds({0: 0.06, 1: 0.001}), [])


class PairedDifferenceTest(tf.test.TestCase):

  def test_mean_and_interval_by_hand(self):
    # Differences by seed: 0.002, -0.001, 0.001, 0.000, -0.002 (seed 5 has
    # no reference and is left out). Mean 0; sd = sqrt(0.00001 / 4)
    # = 0.0015811; t(0.975, 4) = 2.776; half width 2.776 * 0.0015811 /
    # sqrt(5) = 0.0019629.
    values = {0: 0.702, 1: 0.699, 2: 0.711, 3: 0.690, 4: 0.698, 5: 0.9}
    reference = {0: 0.700, 1: 0.700, 2: 0.710, 3: 0.690, 4: 0.700}
    d = convergence.paired_difference(values, reference)
    self.assertEqual(d["n"], 5)
    self.assertEqual(d["seeds"], [0, 1, 2, 3, 4])
    self.assertAlmostEqual(d["mean"], 0.0, places=12)
    self.assertAlmostEqual(d["sd"], 0.0015811, places=6)
    self.assertAlmostEqual(d["high"], 0.0019629, places=6)
    self.assertAlmostEqual(d["low"], -0.0019629, places=6)
    # Mean 0 >= -0.001 and low -0.00196 > -0.002: meets the target.
    self.assertTrue(convergence.meets_target(d))
    # Shift every value down by 0.0005: mean -0.0005, low -0.00246.
    shifted = {s: v - 0.0005 for s, v in values.items()}
    self.assertFalse(convergence.meets_target(
        convergence.paired_difference(shifted, reference)))

  def test_t_quantiles_and_bad_input(self):
    self.assertEqual(convergence.t975(1), 12.706)
    self.assertEqual(convergence.t975(4), 2.776)
    self.assertEqual(convergence.t975(30), 2.042)
    self.assertEqual(convergence.t975(31), 1.96)
    with self.assertRaisesRegex(ValueError, "Received: df=0"):
      convergence.t975(0)
    with self.assertRaisesRegex(ValueError, "none in common"):
      convergence.paired_difference({0: 1.0}, {1: 1.0})
    one = convergence.paired_difference({0: 0.71}, {0: 0.70})
    self.assertIsNone(convergence.meets_target(one))


_PLAN = """
import json, sys
from absl import flags
from gba_tf.bin import benchmark
benchmark.define_flags()
flags.FLAGS(["benchmark"] + sys.argv[1:])
name, cases, seeds = benchmark._converge_plan()
print(json.dumps([name, seeds, [c[:3] + (c[3][0], c[4]) for c in cases]]))
"""


def _plan(*args):
  proc = subprocess.run([sys.executable, "-c", _PLAN, *args],
                        cwd=testing_utils.ROOT, capture_output=True,
                        text=True, timeout=120, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


class ConvergePlanTest(tf.test.TestCase):

  def test_cases_pair_with_healthy_sync_which_always_runs(self):
    name, seeds, cases = _plan("--converge", "--datasets=movielens",
                               "--conditions=straggler", "--modes=gba,async")
    self.assertEqual((name, seeds), ("converge", 5))
    self.assertEqual([c[1:3] for c in cases],
                     [["healthy", "sync"], ["straggler", "gba"],
                      ["straggler", "async"]])
    # Defaults: sync under stragglers is left out (its arithmetic is
    # healthy sync's), unless --modes names sync.
    _, _, cases = _plan("--converge", "--datasets=synthetic")
    self.assertNotIn(["straggler", "sync"], [c[1:3] for c in cases])
    self.assertIn(["two_stragglers", "gba"], [c[1:3] for c in cases])
    _, _, cases = _plan("--converge", "--datasets=synthetic",
                        "--modes=sync,gba")
    self.assertIn(["straggler", "sync"], [c[1:3] for c in cases])

  def test_ablation_runs_every_variant_as_gba_under_the_straggler(self):
    name, _, cases = _plan("--converge", "--ablation",
                           "--datasets=movielens")
    self.assertEqual(name, "converge_ablation")
    self.assertEqual(cases[0][1:4], ["healthy", "sync", "--mode=sync"])
    # Every case runs the dataset's job on the shared stream.
    for case in cases:
      self.assertContainsSubset(["--input=shared", "--dataset=movielens"],
                                case[4])
    variants = [c[2] for c in cases[1:]]
    self.assertIn("exp0.5_t2_weights", variants)
    self.assertIn("no_decay", variants)
    for case in cases[1:]:
      self.assertEqual([case[1], case[3]], ["straggler", "--mode=gba"])

  def test_ablation_modes_pick_variants(self):
    _, _, cases = _plan("--converge", "--ablation", "--datasets=movielens",
                        "--modes=no_decay,exp0.5_t2_weights")
    self.assertEqual([c[2] for c in cases],
                     ["sync", "no_decay", "exp0.5_t2_weights"])
    proc = subprocess.run(
        [sys.executable, "-c", _PLAN, "--converge", "--ablation",
         "--datasets=movielens", "--modes=gba"],
        cwd=testing_utils.ROOT, capture_output=True, text=True, timeout=120)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("Received: --modes=gba", proc.stderr)


class ConvergeBenchmarkTest(tf.test.TestCase):

  def test_converge_tiny_pairs_gba_with_healthy_sync_by_seed(self):
    out = testing_utils.temp_dir(self, "gba_converge_test_")
    proc = subprocess.run(
        [sys.executable, os.path.join(testing_utils.ROOT, "scripts",
                                      "benchmark.py"),
         "--converge", "--tiny", f"--out_dir={out}"],
        cwd=testing_utils.ROOT, capture_output=True, text=True, timeout=600,
        check=False)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] +
                     proc.stderr[-3000:])
    with open(os.path.join(out, "converge_tiny.json")) as f:
      report = json.load(f)
    runs = report["runs"]
    self.assertCountEqual(
        [(r["condition"], r["mode"], r["repeat"]) for r in runs],
        [("healthy", "sync", 0), ("straggler", "gba", 0),
         ("healthy", "sync", 1), ("straggler", "gba", 1)])
    for run in runs:
      # Every run trained from the shared stream, with a curve to judge
      # the plateau on (points at 0, 4 and 8 steps) and wall-clock times.
      self.assertIn("--input=shared", run["args"])
      self.assertLen(run["curve"], 3)
      self.assertEqual(run["curve"][-1]["train_seconds"],
                       max(p["train_seconds"] for p in run["curve"]))
    gba = next(e for e in report["summary"] if e["mode"] == "gba")
    # The pairing is computed from the runs, seed by seed.
    auc = {(r["mode"], r["repeat"]): r["test_auc"] for r in runs}
    expected = [auc[("gba", s)] - auc[("sync", s)] for s in (0, 1)]
    self.assertAlmostEqual(gba["auc_vs_healthy_sync"]["mean"],
                           sum(expected) / 2)
    self.assertEqual(gba["auc_vs_healthy_sync"]["n"], 2)
    self.assertEqual(gba["plateau_gain"],
                     [convergence.plateau_gain(r["curve"]) for r in runs
                      if r["mode"] == "gba"])
    # Each GBA run kept its pushes per worker, and the summary's measured
    # slowdown of worker 1 (the "straggler" condition's) is computed from
    # them: worker 0's pushes over worker 1's.
    gba_runs = [r for r in runs if r["mode"] == "gba"]
    for run in gba_runs:
      self.assertEqual(sum(run["worker_pushed"]),
                       run["gba_counters"]["pushed"])
    self.assertEqual(gba["measured_slowdowns"],
                     [{"1": r["worker_pushed"][0] / r["worker_pushed"][1]}
                      for r in gba_runs])
    for name in ("converge_tiny_auc.png", "converge_tiny_auc_wallclock.png"):
      with open(os.path.join(out, name), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", name)

    # --resume with the same command keeps all four runs and runs no
    # job: the runs come back as they were (a rerun would measure other
    # wall seconds) and the summary is recomputed from them.
    proc = _benchmark(out, "--resume")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("4 runs kept", proc.stdout)
    with open(os.path.join(out, "converge_tiny.json")) as f:
      resumed = json.load(f)
    self.assertEqual(resumed["runs"], runs)
    self.assertEqual(resumed["summary"], report["summary"])
    # A JSON that lacks one run (here: GBA's seed 1, as if --modes had not
    # named it): --resume runs that one job only and keeps the other three.
    missing = [r for r in runs if (r["mode"], r["repeat"]) != ("gba", 1)]
    with open(os.path.join(out, "converge_tiny.json"), "w") as f:
      json.dump(dict(report, runs=missing), f)
    proc = _benchmark(out, "--resume")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("3 runs kept", proc.stdout)
    self.assertEqual(proc.stdout.count("test AUC"), 1, proc.stdout)
    with open(os.path.join(out, "converge_tiny.json")) as f:
      added = json.load(f)["runs"]
    self.assertEqual(added[:3], missing)
    self.assertEqual((added[3]["mode"], added[3]["repeat"]), ("gba", 1))
    self.assertEqual(added[3]["args"],
                     next(r["args"] for r in runs
                          if (r["mode"], r["repeat"]) == ("gba", 1)))
    runs = added
    # Another job's arguments: one line naming them, the JSON untouched.
    proc = _benchmark(out, "--resume", "--learning_rate=0.5")
    self.assertEqual(proc.returncode, 2, proc.stdout[-2000:])
    error = proc.stderr.strip().splitlines()[-1]
    self.assertIn("Received: --resume", error)
    self.assertIn("--learning_rate=0.5", error)
    with open(os.path.join(out, "converge_tiny.json")) as f:
      self.assertEqual(json.load(f)["runs"], runs)

    # --reference: a JSON holding GBA's runs only, resumed with healthy
    # sync's runs taken from the first JSON, runs no job and pairs as the
    # first did; the taken runs' wall seconds count in its seconds.
    reference = os.path.join(out, "converge_tiny.json")
    other = os.path.join(out, "other")
    os.makedirs(other)
    gba_runs = [r for r in runs if r["mode"] == "gba"]
    with open(os.path.join(other, "converge_tiny.json"), "w") as f:
      json.dump(dict(report, runs=gba_runs, seconds=100.0), f)
    proc = _benchmark(other, "--resume", f"--reference={reference}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("2 healthy sync runs taken", proc.stdout)
    self.assertNotIn("test AUC", proc.stdout)
    with open(os.path.join(other, "converge_tiny.json")) as f:
      paired = json.load(f)
    self.assertEqual(paired["reference"], reference)
    sync_runs = [r for r in runs if r["mode"] == "sync"]
    self.assertEqual(paired["runs"], gba_runs + [
        dict(r, reference="converge_tiny.json") for r in sync_runs])
    # The same pairing (the summary lists cases in the runs' order).
    def by_case(summary):
      return {(e["dataset"], e["condition"], e["mode"]): e for e in summary}
    with open(reference) as f:
      self.assertEqual(by_case(paired["summary"]),
                       by_case(json.load(f)["summary"]))
    # 100 s of GBA's plus sync's wall seconds, plus this command's own.
    copied = 100.0 + sum(r["wall_seconds"] for r in sync_runs)
    self.assertBetween(paired["seconds"], copied, copied + 120)
    # A reference of another job's arguments, a missing one, or one without
    # --converge: one line naming it, nothing written.
    for args, named in (
        ([f"--reference={reference}", "--learning_rate=0.5"],
         "--learning_rate=0.5"),
        ([f"--reference={other}/missing.json"], "missing.json"),
        ([f"--reference={os.path.join(out, 'converge_tiny_auc.png')}"],
         "converge_tiny_auc.png")):
      proc = _benchmark(os.path.join(out, "none"), *args)
      self.assertEqual(proc.returncode, 2, proc.stdout[-2000:])
      error = proc.stderr.strip().splitlines()[-1]
      self.assertIn("Received: --reference", error)
      self.assertIn(named, error)
      self.assertFalse(os.path.exists(os.path.join(out, "none",
                                                   "converge_tiny.json")))
    proc = _benchmark(os.path.join(out, "none"), f"--reference={reference}",
                      converge=False)
    self.assertEqual(proc.returncode, 2, proc.stdout[-2000:])
    self.assertIn(f"Received: --reference={reference} without --converge",
                  proc.stderr.strip().splitlines()[-1])
    # A broken --resume JSON: one line naming it, the file untouched.
    broken = os.path.join(out, "broken")
    os.makedirs(broken)
    with open(os.path.join(broken, "converge_tiny.json"), "w") as f:
      f.write("{")
    proc = _benchmark(broken, "--resume")
    self.assertEqual(proc.returncode, 2, proc.stdout[-2000:])
    self.assertIn(
        f"Received: --resume, and {broken}/converge_tiny.json is not a "
        "--converge JSON (JSONDecodeError: ",
        proc.stderr.strip().splitlines()[-1])
    with open(os.path.join(broken, "converge_tiny.json")) as f:
      self.assertEqual(f.read(), "{")

  def test_a_stopped_command_keeps_each_job_it_finished(self):
    # A long --converge command stopped for time (SIGTERM) in the middle of
    # a seed keeps every job it finished, not only whole seeds: here the
    # only seed's healthy sync ran, GBA was training when the command was
    # stopped. Without the save after each job there is no JSON at all.
    out = testing_utils.temp_dir(self, "gba_converge_stop_")
    stdout, runs = testing_utils.stop_then_resume(
        self, _command(out, "--repeats=1"),
        os.path.join(out, "converge_tiny_logs",
                     "synthetic-straggler-gba-r0.log"),
        os.path.join(out, "converge_tiny.json"), key="mode")
    # --resume ran GBA only.
    self.assertEqual(stdout.count("test AUC"), 1, stdout)
    self.assertEqual([(r["mode"], r["repeat"]) for r in runs],
                     [("sync", 0), ("gba", 0)])


def _command(out, *args, converge=True):
  """The command line of `gba-benchmark --converge --tiny` (without
  --converge: `--tiny`) writing to `out`."""
  return [sys.executable, os.path.join(testing_utils.ROOT, "scripts",
                                       "benchmark.py"),
          *(["--converge"] if converge else []), "--tiny", f"--out_dir={out}",
          *args]


def _benchmark(out, *args, converge=True):
  """`_command(out, *args, converge=converge)` run to its end."""
  return subprocess.run(
      _command(out, *args, converge=converge), cwd=testing_utils.ROOT,
      capture_output=True, text=True, timeout=600, check=False)


class ResumedRowsTest(tf.test.TestCase):
  """`benchmark.resumed_rows`: which stored runs --resume keeps."""

  def _report(self, seeds, partial=None, flagfile="/a/configs/b.cfg"):
    runs = [{"mode": m, "repeat": r,
             "args": [f"--flagfile={flagfile}", f"--mode={m}", f"--seed={r}"]}
            for r in range(seeds) for m in ("sync", "gba")]
    report = {"name": "converge", "command": "benchmark.py --converge",
              "runs": runs}
    if partial is not None:
      report["partial_seeds"] = partial
    return report

  @staticmethod
  def _expected(row):
    return ["--flagfile=/b/configs/b.cfg", f"--mode={row['mode']}",
            f"--seed={row['repeat']}"]

  def test_keeps_every_stored_run(self):
    # A run stopped in its third seed after its sync run (partial_seeds 2)
    # keeps all 5 runs it stored, the unfinished seed's sync too: the
    # command runs only the (case, seed) runs the JSON lacks.
    report = self._report(3, partial=2)
    report["runs"].pop()
    rows = benchmark.resumed_rows(report, 5, self._expected)
    self.assertEqual([(r["mode"], r["repeat"]) for r in rows],
                     [("sync", 0), ("gba", 0), ("sync", 1), ("gba", 1),
                      ("sync", 2)])
    # Resumed to 2 seeds: the runs of seed 2 are not this command's.
    rows = benchmark.resumed_rows(report, 2, self._expected)
    self.assertEqual(sorted((r["mode"], r["repeat"]) for r in rows),
                     [("gba", 0), ("gba", 1), ("sync", 0), ("sync", 1)])
    # Another checkout's flagfile of the same name is the same job.
    self.assertLen(benchmark.resumed_rows(self._report(3), 5,
                                          self._expected), 6)
    # A stored case this command does not run: one line naming it.
    def without_gba(row):
      return None if row["mode"] == "gba" else self._expected(row)
    with self.assertRaisesRegex(
        ValueError, r"Received: --resume with converge.json, which holds a "
        r"run \(gba, seed 0\) this command does not run"):
      benchmark.resumed_rows(report, 5, without_gba)

  def test_other_job_arguments_are_one_line(self):
    def expected(row):
      return self._expected(row) + ["--learning_rate=0.5"]
    with self.assertRaisesRegex(ValueError, r"Received: --resume .* seed 0 "
                                r"ran other job arguments \(differing: "
                                r"--learning_rate=0.5\)"):
      benchmark.resumed_rows(self._report(2), 5, expected)
    # A stored case this command does not run at all.
    with self.assertRaisesRegex(ValueError, "Received: --resume"):
      benchmark.resumed_rows(self._report(2), 5, lambda row: None)


class ReferenceRowsTest(tf.test.TestCase):
  """`benchmark.reference_rows`: which runs --reference takes."""

  def _report(self):
    runs = [{"dataset": d, "condition": c, "mode": m, "repeat": r,
             "args": [f"--dataset={d}", f"--mode={m}", f"--seed={r}"]}
            for d in ("movielens", "synthetic") for r in range(3)
            for c, m in (("healthy", "sync"), ("straggler", "gba"),
                         ("straggler", "sync"))]
    return {"name": "converge", "command": "benchmark.py --converge",
            "runs": runs}

  @staticmethod
  def _synthetic(row):
    # A command running synthetic data only.
    if row["dataset"] != "synthetic":
      return None
    return [f"--dataset={row['dataset']}", f"--mode={row['mode']}",
            f"--seed={row['repeat']}"]

  def test_takes_healthy_sync_of_this_commands_datasets_and_seeds(self):
    # 18 runs: of them, healthy sync on synthetic data, seeds 0 and 1 (2
    # seeds asked); seed 1 is already kept by --resume, so only seed 0.
    rows = benchmark.reference_rows(
        self._report(), 2, self._synthetic,
        kept={("synthetic", "healthy", "sync", 1)}, source="c.json")
    self.assertEqual([(r["dataset"], r["condition"], r["mode"], r["repeat"],
                       r["reference"]) for r in rows],
                     [("synthetic", "healthy", "sync", 0, "c.json")])
    # Copies: the report's runs are not marked.
    self.assertNotIn("reference", self._report()["runs"][0])

  def test_none_or_other_arguments_is_one_line(self):
    with self.assertRaisesRegex(
        ValueError, r"Received: --reference with converge.json, which "
        r"holds no healthy sync run of this command's datasets and seeds "
        r"0-1\. Its command: benchmark.py --converge"):
      benchmark.reference_rows(self._report(), 2, lambda row: None)
    def other_rate(row):
      args = self._synthetic(row)
      return None if args is None else args + ["--learning_rate=0.5"]
    with self.assertRaisesRegex(
        ValueError, r"Received: --reference with converge.json, whose seed "
        r"0 ran other job arguments \(differing: --learning_rate=0.5\); "
        r"run it without --reference"):
      benchmark.reference_rows(self._report(), 2, other_rate)


if __name__ == "__main__":
  tf.test.main()
