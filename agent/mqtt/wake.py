"""The wake-up of paho's network thread, held back while the daemon's loop handles a batch.

paho's network thread sleeps in ``select``; every publish or ack made from another thread
writes one byte to paho's wake-up socket (``_sockpairW``) to wake it. ``socket.send``
releases the GIL and the woken network thread takes it, so each publish or ack of the
daemon's loop cost a whole turn of paho's thread on the loop's own path (hundreds of
microseconds on a busy 2-core box). :class:`HeldWake` stands in for that socket: while
``held`` the bytes are not sent, and one is sent at :meth:`HeldWake.release` if any was
wanted. What is queued to paho meanwhile is the same, in the same order; only the wake-up
is shared (paho's thread, when it runs anyway, writes whatever is queued). On a plain TCP
connection the loop writes the batch itself at ``release`` (``PahoClient.write_now``,
under the client's write lock) and paho's thread is woken only for what is left.

Owns only that socket wrapper; :meth:`agent.mqtt.client.MqttClient.corked` installs it.
Must never: import paho, drop a wake-up that was wanted, or hold one past ``release``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("agent.mqtt")


class HeldWake:
    """paho's wake-up socket, whose wake-ups can be held back (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held = False
        self.wanted = False

    def send(self, data: bytes) -> int:
        """paho's call: the byte goes out now, or once at :meth:`release` while held."""
        if self.held:
            self.wanted = True
            if self.held:
                return len(data)
            # Released between the check and the note (another thread than the loop's):
            # that release may have missed the note, so this wake-up goes out now.
        return self.sock.send(data)

    def release(self, write: Callable[[], bool] | None = None) -> None:
        """Stop holding; if any wake-up was wanted meanwhile, ``write`` (the caller writes
        what is queued itself; True when nothing is left for paho's thread), else or when
        something is left, one wake-up now."""
        self.held = False
        if self.wanted:
            self.wanted = False
            try:
                if write is not None and write():
                    return
            except Exception:  # paho's thread writes it then: never lost
                log.exception("writing paho's queued packets from the loop")
            with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending
                self.sock.send(b"0")

    def __getattr__(self, name: str) -> Any:  # close(), fileno(), recv(): the socket's own
        return getattr(self.sock, name)
