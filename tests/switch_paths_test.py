"""The switching experiment's paths (`gba_tf.launch.switch_paths`) by hand,
and `gba-benchmark --switching --tiny` end to end."""

import json
import os
import subprocess
import sys

import tensorflow as tf

from gba_tf.launch import switch_paths
from tests import testing_utils


class LegsTest(tf.test.TestCase):

  def test_thirds_rounded_to_whole_loops(self):
    # 300 / 3 = 100 -> 3.33 loops of 30 -> 3 loops = 90; 200 -> 6.67 -> 7
    # loops = 210; the last leg ends at the budget itself.
    self.assertEqual(switch_paths.leg_steps(300, 30), [90, 210, 300])
    # 12 / 3 = 4 = one loop of 4: 4, 8, 12.
    self.assertEqual(switch_paths.leg_steps(12, 4), [4, 8, 12])

  def test_too_small_a_budget_is_one_line(self):
    with self.assertRaisesRegex(ValueError, r"Received: train_steps=8, "
                                r"steps_per_loop=4;"):
      switch_paths.leg_steps(8, 4)

  def test_every_forced_path_meets_the_straggler_in_its_middle_leg(self):
    for name, legs in switch_paths.PATHS.items():
      if name == "auto":
        continue
      self.assertEqual([c for _, c in legs],
                       ["healthy", "straggler", "healthy"], name)
      self.assertEqual([legs[0][0], legs[2][0]], ["sync", "sync"], name)


class JoinPhasesTest(tf.test.TestCase):

  def test_restored_points_kept_once_and_seconds_add_up(self):
    # Phase 2 starts with an evaluation of the step phase 1 ended on
    # (samples 200): kept once. Its training seconds start again at 0, so
    # they are offset by phase 1's 10 s: 0 + 10, 4 + 10.
    phases = [
        {"seconds": 10.0, "curve": [
            {"samples": 0, "train_seconds": 0.0, "auc": 0.5},
            {"samples": 200, "train_seconds": 9.0, "auc": 0.6}]},
        {"seconds": 5.0, "curve": [
            {"samples": 200, "train_seconds": 0.0, "auc": 0.6},
            {"samples": 400, "train_seconds": 4.0, "auc": 0.7}]},
    ]
    curve = switch_paths.join_phases(phases)
    self.assertEqual([p["samples"] for p in curve], [0, 200, 400])
    self.assertEqual([p["train_seconds"] for p in curve], [0.0, 9.0, 14.0])
    self.assertEqual(curve[-1]["auc"], 0.7)

  def test_a_switch_with_pending_gradients_keeps_one_point(self):
    # A GBA phase cut by a switch at global step 15 of M = 4 local batches
    # of 256 ran 63 local batches (16,128 samples): 60 applied (15 steps),
    # 3 pending. The next phase restored step 15, whose checkpoint counts
    # 15 x 1,024 = 15,360 samples, and evaluated it again: the same
    # weights, kept once, so the samples never go backwards.
    phases = [
        {"seconds": 2.0, "curve": [
            {"optimizer_steps": 0, "samples": 0, "train_seconds": 0.0,
             "auc": 0.5},
            {"optimizer_steps": 15, "samples": 16128, "train_seconds": 2.0,
             "auc": 0.6}]},
        {"seconds": 3.0, "curve": [
            {"optimizer_steps": 15, "samples": 15360, "train_seconds": 0.0,
             "auc": 0.6},
            {"optimizer_steps": 115, "samples": 117760,
             "train_seconds": 3.0, "auc": 0.7}]},
    ]
    curve = switch_paths.join_phases(phases)
    self.assertEqual([p["samples"] for p in curve], [0, 16128, 117760])
    self.assertEqual([p["train_seconds"] for p in curve], [0.0, 2.0, 5.0])

  def test_a_phase_without_evaluations_still_counts_its_seconds(self):
    phases = [{"seconds": 3.0, "curve": []},
              {"seconds": 2.0, "curve": [
                  {"samples": 50, "train_seconds": 1.0, "auc": 0.6}]}]
    self.assertEqual(switch_paths.join_phases(phases),
                     [{"samples": 50, "train_seconds": 4.0, "auc": 0.6}])


class SwitchingBenchmarkTest(tf.test.TestCase):

  def test_switching_tiny_resumes_every_leg_and_pairs_with_sync(self):
    out = testing_utils.temp_dir(self, "gba_switching_test_")
    proc = subprocess.run(_command(out), cwd=testing_utils.ROOT,
                          capture_output=True, text=True, timeout=600,
                          check=False)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] +
                     proc.stderr[-3000:])
    with open(os.path.join(out, "switching_tiny.json")) as f:
      report = json.load(f)
    runs = {r["path"]: r for r in report["runs"]}
    self.assertCountEqual(runs, ["sync", "gba", "async"])
    for path, run in runs.items():
      # Three launches on one model directory, each resuming the last
      # one's checkpoint: a third of the 12 x 256 samples each.
      self.assertEqual([p["mode"] for p in run["phases"]],
                       [m for m, _ in switch_paths.PATHS[path]])
      self.assertEqual([p["start_samples"] for p in run["phases"]],
                       [0, 1024, 2048])
      self.assertEqual([p["samples"] for p in run["phases"]],
                       [1024, 1024, 1024])
    for path in ("sync", "gba"):
      # Sync and GBA count global batches: 4 optimizer steps per leg.
      self.assertEqual([p["start_step"] for p in runs[path]["phases"]],
                       [0, 4, 8])
      self.assertEqual(runs[path]["optimizer_steps"], 12)
    # Plain async counts local batches (128): its leg is 8 of them, from
    # the 4 the sync checkpoint held, and the last sync leg resumes at 12
    # iterations that are 2,048 samples, not 12 global batches.
    self.assertEqual([p["start_step"] for p in runs["async"]["phases"]],
                     [0, 4, 12])
    self.assertEqual([p["optimizer_steps"] for p in runs["async"]["phases"]],
                     [4, 8, 4])
    for path, run in runs.items():
      self.assertIn("--input=shared", run["args"])
      self.assertLen(run["leg_wall_seconds"], 3)
      # One curve over the three legs: every loop's evaluation once (local
      # batch 128 x 2 workers = 256 samples per step), seconds rising.
      self.assertEqual([p["samples"] for p in run["curve"]],
                       [0, 1024, 2048, 3072])
      seconds = [p["train_seconds"] for p in run["curve"]]
      self.assertEqual(seconds, sorted(seconds))
    # The middle leg met the straggler in GBA. (The first legs are both
    # sync on the same stream, but not equal: which worker takes which
    # batch, and so which step a batch lands in, varies from run to run.)
    self.assertEqual(runs["gba"]["legs"][1],
                     {"mode": "gba", "condition": "straggler",
                      "until_step": 8})
    gba = next(e for e in report["summary"] if e["path"] == "gba")
    self.assertAlmostEqual(gba["auc_vs_sync"]["mean"],
                           runs["gba"]["test_auc"] - runs["sync"]["test_auc"])
    self.assertAlmostEqual(
        gba["wall_vs_sync"],
        runs["gba"]["wall_seconds"] / runs["sync"]["wall_seconds"])
    for name in ("switching_tiny_auc.png", "switching_tiny_auc_wallclock.png"):
      with open(os.path.join(out, name), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", name)

  def test_a_stopped_command_keeps_each_path_it_finished(self):
    # A --switching command stopped (SIGTERM) while its gba path trains
    # keeps the sync path it finished; --resume runs only the gba and async
    # paths. Without the save after each path there is no JSON at all.
    out = testing_utils.temp_dir(self, "gba_switching_stop_")
    stdout, runs = testing_utils.stop_then_resume(
        self, _command(out),
        os.path.join(out, "switching_tiny_logs", "synthetic-gba-r0.log"),
        os.path.join(out, "switching_tiny.json"), key="path")
    # --resume ran gba and async only, gba's three legs whole.
    self.assertEqual(stdout.count("test AUC"), 2, stdout)
    self.assertEqual([(r["path"], r["repeat"]) for r in runs],
                     [("sync", 0), ("gba", 0), ("async", 0)])
    self.assertEqual([p["mode"] for p in runs[1]["phases"]],
                     ["sync", "gba", "sync"])

  def test_bad_paths_are_one_line(self):
    out = testing_utils.temp_dir(self, "gba_switching_bad_")
    cases = [
        (["--paths=sync,zigzag"], r"Received: --paths=zigzag, which is not"),
        (["--paths=gba"], r"Received: --paths=gba, without sync"),
        (["--paths=sync,auto"], r"Received: --paths=sync,auto: auto needs "
                                r"gba"),
        (["--converge"], r"Received: --converge and --switching")]
    # One process runs the benchmark's main on each command line in turn.
    script = (
        "import json, sys\n"
        "from absl import flags\n"
        "from gba_tf.bin import benchmark\n"
        "benchmark.define_flags()\n"
        "for args in json.loads(sys.argv[1]):\n"
        "  flags.FLAGS.unparse_flags()\n"
        "  flags.FLAGS(['benchmark'] + args)\n"
        "  print('exit', benchmark.main([]), file=sys.stderr, flush=True)\n")
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(
            [["--switching", f"--out_dir={out}"] + a for a, _ in cases])],
        cwd=testing_utils.ROOT, capture_output=True, text=True, timeout=120,
        check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines()
             if l.startswith(("-c: error:", "exit "))]
    self.assertLen(lines, 2 * len(cases), proc.stderr[-2000:])
    for k, (_, pattern) in enumerate(cases):
      self.assertRegex(lines[2 * k], "error: " + pattern)
      self.assertEqual(lines[2 * k + 1], "exit 2")
    self.assertEqual(os.listdir(out), [], "no run was started")


def _command(out, *args):
  """The command line of `gba-benchmark --switching --tiny` writing to
  `out`."""
  return [sys.executable, os.path.join(testing_utils.ROOT, "scripts",
                                       "benchmark.py"),
          "--switching", "--tiny", f"--out_dir={out}", *args]


if __name__ == "__main__":
  tf.test.main()
