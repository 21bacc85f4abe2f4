"""MovieLens-100K as a CTR task: real ratings with user and item features.

The data (GroupLens; its license forbids redistribution) is never committed.
On first use it is fetched into a cache directory from the one place this
machine can reach it: the `recbole` wheel on PyPI ships the dataset as atomic
files under `recbole/dataset_example/ml-100k/`. The wheel is downloaded with
`pip download --no-deps` (recbole itself is *not* installed: it pulls in
torch) and only the three data files are extracted.

Task: rating >= 4 is a click (positive). Eight categorical fields share one
global id space (field f owns ids [offsets[f], offsets[f+1])): user, item,
age bucket, gender, occupation, zip-code prefix, release decade, first genre.
Unknown or missing values map to each field's id 0.

Example:

```python
data = gba_tf.data.movielens.load()           # fetched once, then cached
data.train_ids.shape, data.vocab_size         # ((80000, 8), ~2,700)
```
"""

import dataclasses
import fcntl
import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

_RECBOLE = "recbole==1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
_FILES = ("inter", "user", "item")
# pip on a slow mirror; the wheel is ~2 MB.
_DOWNLOAD_TIMEOUT_S = 300
FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "decade",
          "genre")
POSITIVE_RATING = 4.0


def default_cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(root, "gba_tf", "ml-100k")


def _download_wheel(dest: str) -> str:
  """The recbole wheel, downloaded by pip into `dest`; returns its path."""
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
       "--dest", dest, _RECBOLE], capture_output=True, text=True,
      timeout=_DOWNLOAD_TIMEOUT_S, check=False)
  wheels = glob.glob(os.path.join(dest, "*.whl"))
  if proc.returncode or not wheels:
    raise RuntimeError(
        f"Could not fetch MovieLens-100K ({_RECBOLE} from PyPI): "
        f"{proc.stderr.strip()[-500:]}")
  return wheels[0]


def _cached(cache_dir: str) -> bool:
  return all(os.path.exists(os.path.join(cache_dir, f"ml-100k.{f}"))
             for f in _FILES)


def fetch(cache_dir: Optional[str] = None) -> str:
  """Makes sure ml-100k.{inter,user,item} are in `cache_dir`; returns it.

  Safe to call from every task of a job at once: one process downloads
  while the others wait for it.
  """
  cache_dir = cache_dir or default_cache_dir()
  if _cached(cache_dir):
    return cache_dir
  os.makedirs(cache_dir, exist_ok=True)
  # On a fresh machine every task of a launched job gets here together.
  # Without the lock each downloaded the wheel and they wrote one .tmp name:
  # a worker whose rename found the file already moved died, and its job
  # with it. The lock is released when the file closes, also when a process
  # dies holding it; the next one then finds no files and downloads.
  with open(os.path.join(cache_dir, ".lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _cached(cache_dir):
      return cache_dir
    with tempfile.TemporaryDirectory(prefix="gba_ml100k_") as tmp:
      with zipfile.ZipFile(_download_wheel(tmp)) as wheel:
        for name in _FILES:
          data = wheel.read(_MEMBER.format(name))
          # Written whole then renamed: a cache never holds half a file.
          target = os.path.join(cache_dir, f"ml-100k.{name}")
          with open(target + ".tmp", "wb") as f:
            f.write(data)
          os.replace(target + ".tmp", target)
  return cache_dir


def _read_atomic(path: str) -> Tuple[List[str], List[List[str]]]:
  """RecBole atomic file: a `name:type` tab-separated header, then rows."""
  with open(path, encoding="utf-8", errors="replace") as f:
    header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise ValueError(f"Received: {len(row)} columns on line {i + 2} of "
                       f"{path}, expected {len(header)} ({header}).")
  return header, rows


def _vocab(values) -> Dict[str, int]:
  """Value -> id in 1..n (0 is reserved for unknown), in sorted order."""
  return {v: i + 1 for i, v in enumerate(sorted(set(values)))}


def _age_bucket(age: str) -> str:
  try:
    return str(min(int(age) // 10, 6))
  except ValueError:
    return ""


def _decade(year: str) -> str:
  return year[:3] if len(year) == 4 and year.isdigit() else ""


@dataclasses.dataclass(frozen=True)
class MovieLens:
  """Train / test split of MovieLens-100K as ids + click labels.

  Attributes:
    train_ids, test_ids: int64 [n, 8], global ids (see `offsets`).
    train_labels, test_labels: float32 [n], 1.0 when rating >= 4.
    offsets: first id of each field in `FIELDS` order, plus the total.
  """
  train_ids: np.ndarray
  train_labels: np.ndarray
  test_ids: np.ndarray
  test_labels: np.ndarray
  offsets: Tuple[int, ...]

  @property
  def num_fields(self) -> int:
    return len(FIELDS)

  @property
  def vocab_size(self) -> int:
    return self.offsets[-1]


def load(data_dir: Optional[str] = None, test_fraction: float = 0.2,
         seed: int = 0) -> MovieLens:
  """Loads (fetching on first use) and splits MovieLens-100K.

  Args:
    data_dir: directory with ml-100k.{inter,user,item}; default the cache,
      fetched if missing.
    test_fraction: share of ratings held out, by a seeded permutation.
    seed: fixes the split.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"Received: test_fraction={test_fraction!r}, which "
                     "must be in (0, 1).")
  data_dir = data_dir or fetch()
  _, inter = _read_atomic(os.path.join(data_dir, "ml-100k.inter"))
  user_header, users = _read_atomic(os.path.join(data_dir, "ml-100k.user"))
  item_header, items = _read_atomic(os.path.join(data_dir, "ml-100k.item"))
  user_rows = {r[0]: dict(zip(user_header, r)) for r in users}
  item_rows = {r[0]: dict(zip(item_header, r)) for r in items}

  def user_features(uid):
    u = user_rows.get(uid, {})
    return (_age_bucket(u.get("age", "")), u.get("gender", ""),
            u.get("occupation", ""), u.get("zip_code", "")[:2])

  def item_features(iid):
    i = item_rows.get(iid, {})
    genres = i.get("class", "").split()
    return (_decade(i.get("release_year", "")), genres[0] if genres else "")

  columns = [[] for _ in FIELDS]
  labels = []
  for uid, iid, rating, *_ in inter:
    values = (uid, iid) + user_features(uid) + item_features(iid)
    for column, value in zip(columns, values):
      column.append(value)
    labels.append(float(rating) >= POSITIVE_RATING)
  vocabs = [_vocab(v for v in column if v) for column in columns]
  offsets = [0]
  for vocab in vocabs:
    offsets.append(offsets[-1] + len(vocab) + 1)  # + the unknown id
  ids = np.stack([
      np.array([offsets[f] + vocabs[f].get(v, 0) for v in columns[f]],
               np.int64) for f in range(len(FIELDS))], axis=1)
  labels = np.asarray(labels, np.float32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_test = max(1, int(round(len(labels) * test_fraction)))
  test, train = order[:n_test], order[n_test:]
  return MovieLens(ids[train], labels[train], ids[test], labels[test],
                   tuple(offsets))
