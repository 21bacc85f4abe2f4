"""Listening TCP sockets read from /proc (Linux): what a test checks that
launched servers bind to loopback only (README "Security")."""

import os


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
