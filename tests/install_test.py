"""A non-editable install runs a local GBA job from any directory.

The wheel is built from this checkout and installed (`pip install --target`,
no dependencies: they are this environment's) into a directory outside the
source tree; the job runs through the `gba-launch` console script from a
directory with no `gba_tf` or `scripts/` in it, and every task must import
the installed copy.
"""

import glob
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tests import testing_utils

_TINY = ["--mode=gba", "--workers=2", "--ps=1", "--local_batch_size=32",
         "--train_steps=6", "--steps_per_loop=3", "--train_examples=2000",
         "--test_examples=500", "--eval_examples=0"]


@pytest.mark.cluster
class InstalledWheelTest(tf.test.TestCase):

  def test_gba_launch_from_an_installed_wheel(self):
    tmp = testing_utils.temp_dir(self, "gba_wheel_")
    dist, site, work = (os.path.join(tmp, d) for d in ("dist", "site", "work"))
    os.makedirs(work)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                    "--no-deps", "--no-build-isolation", "-w", dist,
                    testing_utils.ROOT], check=True, cwd=tmp,
                   capture_output=True)
    wheels = glob.glob(os.path.join(dist, "gba_tf-*.whl"))
    self.assertLen(wheels, 1)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "--no-deps", "--target", site, wheels[0]], check=True,
                   cwd=tmp, capture_output=True)
    env = dict(os.environ, PYTHONPATH=site)
    where = subprocess.run(
        [sys.executable, "-c",
         "import os, gba_tf; print(os.path.dirname(gba_tf.__file__))"],
        cwd=work, env=env, capture_output=True, text=True, check=True)
    self.assertEqual(where.stdout.split()[-1], os.path.join(site, "gba_tf"))

    model_dir = os.path.join(tmp, "job")
    job = testing_utils.LaunchedJob(
        self, model_dir, *_TINY, command=[os.path.join(site, "bin",
                                                       "gba-launch")],
        cwd=work, env=env)
    self.assertEqual(job.finish(), 0, job.excerpt())
    result = testing_utils.read_job_file(model_dir, "result.json")
    self.assertEqual(result["optimizer_steps"], 6)
    launch = testing_utils.read_job_file(model_dir, "launch.json")
    self.assertEqual(launch["gba_tf"], os.path.join(site, "gba_tf"))
    # The tasks ran the installed module, not a script of this checkout.
    self.assertIn("[chief:0] [job] mode=gba", job.output)
    self.assertNotIn("scripts/train.py", job.output)
    # The loopback shim's source travels in the wheel (package data of
    # gba_tf.launch): without it the servers would listen on every interface.
    self.assertTrue(os.path.isfile(
        os.path.join(site, "gba_tf", "launch", "loopback.c")))

    # gba-benchmark: away from a checkout its default flagfile is missing,
    # which it says in one line; given one, it runs a GBA job end to end.
    benchmark = os.path.join(site, "bin", "gba-benchmark")
    missing = subprocess.run([benchmark, "--tiny"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=300)
    self.assertEqual(missing.returncode, 2, missing.stderr[-2000:])
    line = missing.stderr.strip().splitlines()[-1]
    self.assertEqual(line, "gba-benchmark: error: Received: --base_flagfile="
                     "configs/benchmark.cfg, which does not exist here or "
                     "in a source checkout of gba_tf.")
    out = os.path.join(tmp, "bench")
    ran = subprocess.run(
        [benchmark, "--tiny", "--modes=gba", f"--out_dir={out}",
         "--base_flagfile=" + os.path.join(testing_utils.ROOT, "configs",
                                           "benchmark.cfg")],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(ran.returncode, 0, ran.stdout[-3000:])
    summary = testing_utils.read_job_file(out, "benchmark_tiny.json")
    self.assertEqual([r["mode"] for r in summary["runs"]], ["gba"])
    self.assertGreater(summary["runs"][0]["samples"], 0)


if __name__ == "__main__":
  tf.test.main()
