"""systemd's readiness protocol (sd_notify) and socket activation (LISTEN_FDS), without libsystemd.

Both are tiny, stable protocols: a datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``, and
inherited descriptors from 3 on, announced by ``$LISTEN_PID`` / ``$LISTEN_FDS`` /
``$LISTEN_FDNAMES``. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``.

    False when not under systemd or the socket is gone; never raises.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True


def listen_fds(unset: bool = True) -> list[tuple[int, str]]:
    """Descriptors passed by socket activation, with their names ('' when unnamed)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    fds = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append((fd, names[i] if i < len(names) else ""))
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    return fds


def watchdog_interval() -> float | None:
    """Half the watchdog timeout in seconds, when systemd asked for pings; else None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2_000_000
