"""Keeps the servers of local clusters on loopback (127.0.0.1) only.

TensorFlow's gRPC servers have no authentication and no encryption, and
TF 2.21 listens on every interface (`*:port`) even when the cluster spec
says `localhost`. `LocalCluster` and `LocalLauncher` therefore start their
tasks with `LD_PRELOAD` set to a tiny shared library (`loopback.c`) whose
`bind()` turns wildcard listens into 127.0.0.1. It is compiled once into a
cache directory with the system C compiler; without one, `environment()`
returns nothing and the launcher says so (the servers then listen on all
interfaces, as TensorFlow does by itself).

Example:

```python
from gba_tf.launch import loopback

env = dict(os.environ, **loopback.environment())
subprocess.Popen([...], env=env)
```
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Optional

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "loopback.c")
# A compile takes well under a second; more means something is wrong.
_COMPILE_TIMEOUT_S = 60


def _cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(root, "gba_tf")


@functools.lru_cache(maxsize=None)
def library() -> Optional[str]:
  """Path of the compiled shim, building it on first use; None if unable."""
  if not sys.platform.startswith("linux"):
    return None
  with open(_SOURCE, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
  target = os.path.join(_cache_dir(), f"libgba_loopback-{digest}.so")
  if os.path.exists(target):
    return target
  compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which(
      "gcc")
  if not compiler:
    return None
  os.makedirs(_cache_dir(), exist_ok=True)
  # Built beside the target and renamed: concurrent first uses never load a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
  os.close(fd)
  proc = subprocess.run(
      [compiler, "-shared", "-fPIC", "-O2", "-o", tmp, _SOURCE, "-ldl"],
      capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S,
      check=False)
  if proc.returncode:
    os.unlink(tmp)
    return None
  os.replace(tmp, target)
  return target


def environment() -> Dict[str, str]:
  """Environment variables that keep a child's servers on loopback."""
  path = library()
  if path is None:
    return {}
  preload = os.environ.get("LD_PRELOAD")
  return {"LD_PRELOAD": f"{path} {preload}" if preload else path}
