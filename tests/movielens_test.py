"""MovieLens-100K loader on a small fixture written by the test."""

import os
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

import numpy as np
import tensorflow as tf

from gba_tf.data import movielens

_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t10\t5\t881250949
1\t20\t3\t881250950
2\t10\t4\t881250951
2\t30\t1\t881250952
3\t20\t4\t881250953
3\t99\t2\t881250954
"""
_USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
1\t24\tM\ttechnician\t85711
2\t53\tF\tother\t94043
3\t33\tM\twriter\t32067
"""
_ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tToy Story\t1995\tAnimation Children's Comedy
20\tGoldenEye\t1995\tAction Adventure Thriller
30\tFour Rooms\t1995\tThriller
"""
_TEXTS = {"inter": _INTER, "user": _USER, "item": _ITEM}


class MovieLensTest(tf.test.TestCase):

  def _fixture(self, inter=_INTER):
    d = tempfile.mkdtemp()
    for name, text in dict(_TEXTS, inter=inter).items():
      with open(os.path.join(d, f"ml-100k.{name}"), "w") as f:
        f.write(text)
    return d

  def test_features_labels_and_vocabulary(self):
    data = movielens.load(self._fixture(), test_fraction=0.5, seed=0)
    ids = np.concatenate([data.train_ids, data.test_ids])
    labels = np.concatenate([data.train_labels, data.test_labels])
    self.assertEqual(ids.shape, (6, 8))
    self.assertEqual((len(data.train_ids), len(data.test_ids)), (3, 3))
    # Vocabulary sizes (+1 unknown id each): users 3+1, items 4+1 (99 has no
    # item row but is a rated item), age buckets {2,3,5}+1, gender 2+1,
    # occupation 3+1, zip prefixes {85,94,32}+1, decades {199}+1, first
    # genres {Animation, Action, Thriller}+1 (item 99: unknown).
    self.assertEqual(data.offsets, (0, 4, 9, 13, 16, 20, 24, 26, 30))
    self.assertEqual(data.vocab_size, 30)
    for f in range(8):
      self.assertAllInRange(ids[:, f], data.offsets[f],
                            data.offsets[f + 1] - 1)
    # Ratings 5,3,4,1,4,2 -> clicks where rating >= 4: 3 positives.
    self.assertEqual(sorted(labels.tolist()), [0, 0, 0, 1, 1, 1])
    # Item 99 has no item row: its decade and genre are the unknown ids.
    row = [i for i in range(6) if ids[i, 1] == data.offsets[1] + 4][0]
    self.assertEqual(ids[row, 6], data.offsets[6])
    self.assertEqual(ids[row, 7], data.offsets[7])

  def test_split_is_seeded_and_disjoint(self):
    d = self._fixture()
    a = movielens.load(d, test_fraction=0.5, seed=1)
    b = movielens.load(d, test_fraction=0.5, seed=1)
    c = movielens.load(d, test_fraction=0.5, seed=2)
    self.assertAllEqual(a.train_ids, b.train_ids)
    self.assertFalse(np.array_equal(a.train_ids, c.train_ids) and
                     np.array_equal(a.test_ids, c.test_ids))
    rows = {tuple(r) for r in a.train_ids} & {tuple(r) for r in a.test_ids}
    self.assertEmpty(rows)

  def test_a_job_fetching_at_once_downloads_once(self):
    # Eight processes (a launched job's workers on a fresh machine) fetch
    # into one empty cache at the same moment. pip is replaced by a copy of
    # a local wheel holding the fixture, which takes 0.5 s, so that every
    # process is inside fetch while the first downloads. Each process loads
    # the module by its path (numpy only), not through gba_tf (TF).
    root = self.get_temp_dir()
    wheel = os.path.join(root, "recbole.whl")
    with zipfile.ZipFile(wheel, "w") as z:
      for name, text in _TEXTS.items():
        z.writestr(movielens._MEMBER.format(name), text)
    cache = os.path.join(root, "cache")
    downloads = os.path.join(root, "downloads")
    script = textwrap.dedent("""
        import importlib.util, os, shutil, sys, time
        path, wheel, cache, downloads, start = sys.argv[1:]
        spec = importlib.util.spec_from_file_location("ml", path)
        ml = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ml)
        def download(dest):
          with open(downloads, "a") as f:
            f.write(f"{os.getpid()}\\n")
          time.sleep(0.5)
          return shutil.copy(wheel, dest)
        ml._download_wheel = download
        time.sleep(max(0.0, float(start) - time.time()))
        print(len(ml.load(ml.fetch(cache), test_fraction=0.5).train_ids))
        """)
    start = time.time() + 3.0
    procs = [subprocess.Popen(
        [sys.executable, "-c", script, movielens.__file__, wheel, cache,
         downloads, str(start)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
      # A fetch that hangs (a lock never released) fails the test by the
      # timeout below and leaves no process behind.
      self.addCleanup(p.kill)
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    for out, err, code in results:
      self.assertEqual((code, out.strip()), (0, "3"), err[-2000:])
    with open(downloads) as f:
      self.assertLen(f.read().split(), 1)
    for name, text in _TEXTS.items():
      with open(os.path.join(cache, f"ml-100k.{name}")) as f:
        self.assertEqual(f.read(), text)
    # The wait is for a lock, not the files: once they are there, a fetch
    # returns without it.
    os.remove(os.path.join(cache, ".lock"))
    self.assertEqual(movielens.fetch(cache), cache)
    self.assertFalse(os.path.exists(os.path.join(cache, ".lock")))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "test_fraction=1.5"):
      movielens.load(self._fixture(), test_fraction=1.5)
    bad = _INTER + "4\t10\n"
    with self.assertRaisesRegex(ValueError, "2 columns on line 8"):
      movielens.load(self._fixture(inter=bad))


if __name__ == "__main__":
  tf.test.main()
