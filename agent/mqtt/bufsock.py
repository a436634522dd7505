"""paho's socket, read through a buffer (:class:`BufferedSocket`).

paho reads every packet with several ``recv`` calls: the fixed header's first byte, each
byte of the remaining length, then the rest. Under load that is about seven system calls
per invocation (the request's PUBLISH and the reply's PUBACK), and each one releases the
GIL, which the daemon's loop thread then has to win back. Here one ``recv`` of up to
:data:`READ_SIZE` bytes serves the packets that arrived together, and ``pending`` says how
many bytes are buffered: paho does not wait in ``select`` while there are some (it asks
``pending`` of every socket, for TLS's own buffer), so nothing read waits for more data.

Only paho's network thread reads; every other call goes to the socket as it is (a TLS
socket's ``pending`` is added to ours). Installed by :mod:`agent.mqtt.client` on every
socket paho creates.

Must never: reorder, drop or hold back a byte, or swallow an exception of the socket.
"""

from __future__ import annotations

from typing import Any

#: Bytes asked of the socket per read when the buffer is empty.
READ_SIZE = 65536


class BufferedSocket:
    """A connected socket whose reads go through a buffer (see the module docstring)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from the buffer, or one read of the socket (whose
        exceptions, BlockingIOError above all, pass as they are; b"" at EOF)."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            data: bytes = self.sock.recv(max(bufsize, READ_SIZE))
            if len(data) <= bufsize:
                return data
            buf, pos = data, 0
        end = pos + bufsize
        if end >= len(buf):
            self._buf, self._pos = b"", 0  # all handed out: keep no copy
        else:
            self._buf, self._pos = buf, end
        return buf[pos:end]

    def pending(self) -> int:
        """Bytes readable without waiting: ours, and a TLS socket's own."""
        inner = getattr(self.sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:  # send, fileno, close, shutdown, setblocking...
        return getattr(self.sock, name)
