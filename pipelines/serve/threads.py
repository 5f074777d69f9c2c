"""OS-visible names for the server's own threads.

A replica serving a hundred streams runs a hundred source reader threads and a model thread beside
Ray's; Python 3.11 names threads only for itself, so ``top -H``, ``/proc/<pid>/task/*/comm`` and
profilers would show them all as the process. FFmpeg names its own threads (``av:h264:df0``,
``udp-rx``); these names follow the same style: ``src:<stream>`` and ``model``.
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Name the calling thread for the OS as well. Linux keeps 15 bytes; elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(errors="replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
