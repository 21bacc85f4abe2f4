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
env = dict(os.environ, **gba_tf.loopback.environment())
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


def _listening(predicate):
  """(address, port, inode) of LISTEN sockets in /proc/net/tcp{,6}."""
  found = []
  for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
    try:
      with open(name) as f:
        lines = f.readlines()[1:]
    except OSError:
      continue
    for line in lines:
      fields = line.split()
      address, hex_port = fields[1].split(":")
      entry = (_decode(address, width), int(hex_port, 16), int(fields[9]))
      if fields[3] == "0A" and predicate(entry):  # 0A = LISTEN
        found.append(entry)
  return found


def listening_addresses(port: int):
  """Local addresses listening on TCP `port`."""
  return [a for a, _, _ in _listening(lambda e: e[1] == port)]


def listening_sockets_of(pid: int):
  """(address, port) of every TCP socket process `pid` listens on."""
  inodes = set()
  fd_dir = f"/proc/{pid}/fd"
  for fd in os.listdir(fd_dir):
    try:
      target = os.readlink(os.path.join(fd_dir, fd))
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(int(target[8:-1]))
  return [(a, p) for a, p, _ in _listening(lambda e: e[2] in inodes)]


def _decode(address: str, width: int) -> str:
  raw = bytes.fromhex(address)
  if width == 8:
    return ".".join(str(b) for b in raw[::-1])
  # IPv6: four little-endian 32-bit words.
  words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
  return ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
