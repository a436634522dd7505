"""Code by reference: fetch a spec's ``code {url, sha256, size}`` to disk, checked on the fly.

Code too big for a spec (``agent.max_spec_bytes``) is published elsewhere and named by URL
with its SHA-256 and exact size. :func:`fetch_code` streams it into ``dest_dir`` in 64 KiB
chunks, hashing as it goes: it stops at the first byte past ``size`` and never holds more
than one chunk, and the file gets its final name only once the size and the digest match.

Schemes: ``https`` (certificate and host name checked against the system store or
``ca_file``; a redirect may only lead to another ``https`` URL) and ``file`` only with
``allow_file`` (tests, a local mirror). Nothing else: no plain ``http``.

Errors, by what the deployer should do:

- :class:`~agent.errors.DeploymentRejected`: the reference itself is wrong (scheme, a size
  over ``max_bytes``, a body longer or shorter than ``size``, another digest). Fetching
  again cannot help: the spec is ``rejected``.
- :class:`FetchFailed` (an ``OSError``): the source could not be read now (DNS, refused,
  reset, timeout, HTTP 5xx). The deployment ``failed`` and a redelivery may succeed.

Never leaves a partial file behind; never reads the body of a refused reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.errors import DeploymentRejected

CHUNK = 64 * 1024
SCHEMES = ("https", "file")


class FetchFailed(OSError):
    """The code could not be fetched now; another try may work (not the reference's fault)."""


@dataclass(frozen=True)
class CodeRef:
    """``code {url, sha256, size}`` of a spec."""

    url: str
    sha256: str
    size: int


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:  # fmt: skip
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise DeploymentRejected(f"code.url: redirected to {newurl!r}, which is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_ref(ref: CodeRef, *, max_bytes: int, allow_file: bool = False) -> None:
    """Refuse a reference before fetching a byte: scheme, size, digest syntax."""
    scheme = urllib.parse.urlsplit(ref.url).scheme
    allowed = SCHEMES if allow_file else ("https",)
    if scheme not in allowed:
        raise DeploymentRejected(
            f"code.url: scheme {scheme or 'none'!r} not allowed (expected {' or '.join(allowed)})"
        )
    if not 0 < ref.size <= max_bytes:
        raise DeploymentRejected(
            f"code.size: {ref.size} bytes, expected 1 to {max_bytes} (runtime.max_bundle_bytes)"
        )
    if len(ref.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in ref.sha256):
        raise DeploymentRejected(f"code.sha256: expected 64 hex digits, got {ref.sha256!r}")


def fetch_code(
    ref: CodeRef,
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout_s: float = 60.0,
    ca_file: str | None = None,
    allow_file: bool = False,
) -> Path:
    """Fetch ``ref`` to ``dest_dir/<sha256>``; the path, its size and digest checked.

    An existing file of that name is trusted only after its digest is checked again (a
    redelivered spec does not fetch twice). ``timeout_s`` bounds the whole transfer, on the
    monotonic clock.
    """
    check_ref(ref, max_bytes=max_bytes, allow_file=allow_file)
    expected = ref.sha256.lower()
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = dest_dir / expected
    if final.exists() and _digest_of(final) == (expected, ref.size):
        return final
    deadline = time.monotonic() + timeout_s
    partial = dest_dir / f".{expected}.{os.getpid()}.part"
    try:
        with _open(ref.url, ref.size, timeout_s, ca_file) as body, _create(partial) as out:
            digest = hashlib.sha256()
            received = 0
            while True:
                if time.monotonic() > deadline:
                    raise FetchFailed(f"code.url: not fetched within {timeout_s:g}s")
                try:
                    chunk = body.read(CHUNK)
                except (OSError, TimeoutError) as exc:
                    raise FetchFailed(f"code.url: reading {ref.url}: {exc}") from exc
                if not chunk:
                    break
                received += len(chunk)
                if received > ref.size:  # stop at once: never read what was not announced
                    raise DeploymentRejected(
                        f"code.url: more than code.size ({ref.size}) bytes; stopped reading"
                    )
                digest.update(chunk)
                out.write(chunk)
            if received != ref.size:
                raise DeploymentRejected(
                    f"code.url: {received} bytes, but code.size says {ref.size}"
                )
            if digest.hexdigest() != expected:
                raise DeploymentRejected(
                    f"code.sha256: the fetched code's SHA-256 is {digest.hexdigest()}, "
                    f"expected {expected}"
                )
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
        return final
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _digest_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _create(path: Path) -> IO[bytes]:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover of a killed fetch
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


def _open(url: str, size: int, timeout_s: float, ca_file: str | None) -> IO[bytes]:
    """The response body, or FetchFailed / DeploymentRejected as the module docstring says."""
    if urllib.parse.urlsplit(url).scheme == "file":
        try:
            path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
            return open(path, "rb")  # closed by the caller's with
        except FileNotFoundError as exc:
            raise DeploymentRejected(f"code.url: {url}: no such file") from exc
        except OSError as exc:
            raise FetchFailed(f"code.url: {url}: {exc}") from exc
    context = ssl.create_default_context(cafile=ca_file)
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects()
    )
    try:
        response: IO[bytes] = opener.open(url, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            raise DeploymentRejected(f"code.url: {url}: HTTP {exc.code} {exc.reason}") from exc
        raise FetchFailed(f"code.url: {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, DeploymentRejected):
            raise exc.reason from exc
        raise FetchFailed(f"code.url: {url}: {exc.reason}") from exc
    except (OSError, TimeoutError) as exc:
        raise FetchFailed(f"code.url: {url}: {exc}") from exc
    length = response.headers.get("Content-Length")  # type: ignore[attr-defined]
    if length is not None and length.isdigit() and int(length) != size:
        response.close()
        raise DeploymentRejected(
            f"code.url: {url} announces {length} bytes, but code.size says {size}"
        )
    return response
