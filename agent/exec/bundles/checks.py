"""Checking the plain values of a bundle before anything touches the disk: function id,
version and digest (the wire contract's rules, :mod:`agent.contract.ids`, raised as
DeploymentRejected), the entrypoint, the sha256 of the bytes, and zip member names.

Pure: never reads or writes the disk, never imports or executes bundle code (it only asks
the import system where a top-level name would resolve).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.machinery
import re
import struct
import sys
import zipfile
import zlib

from agent.contract import ids
from agent.errors import DeploymentRejected

# Path limits well inside NAME_MAX (255) and PATH_MAX (4096) with the staging prefix.
_MAX_COMPONENT_BYTES = 255
_MAX_MEMBER_NAME_BYTES = 1024


# Function ids, versions and digests follow the wire contract's rules (agent.contract.ids).
_DRIVE_RE = re.compile(r"[A-Za-z]:")


# What reading untrusted zip bytes from memory can raise. The archive lives in a BytesIO,
# so an OSError here comes from a decoder, never from the disk.
_CORRUPT_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OSError,
)


def _check_function_id(function_id: str) -> None:
    try:
        ids.check_function_id(function_id)
    except ValueError as exc:
        raise DeploymentRejected(str(exc)) from None


def _check_version(version: str) -> None:
    """Versions become part of a path: the contract's rule keeps them inside the function dir
    (no separator, NUL or leading ".", so never "." or "..")."""
    try:
        ids.check_version(version)
    except ValueError as exc:
        raise DeploymentRejected(str(exc)) from None


def _normalise_sha256(sha256: str) -> str:
    if not ids.is_valid_sha256(sha256):
        raise DeploymentRejected(f"invalid sha256 {sha256!r}: expected 64 hex digits")
    return sha256.lower()


def _parse_entrypoint(entrypoint: str, code_format: str) -> list[str]:
    """The module path of ``module:attr`` as a list of identifiers."""
    module, sep, attr = entrypoint.partition(":")
    parts = module.split(".")
    if (
        not sep
        or not all(_is_identifier(p) for p in parts)
        or not all(_is_identifier(a) for a in attr.split("."))
    ):
        raise DeploymentRejected(f'invalid entrypoint {entrypoint!r}: expected "module:attr"')
    if code_format == "source" and len(parts) != 1:
        raise DeploymentRejected(
            f"invalid entrypoint {entrypoint!r}: a source bundle is one module, "
            "so the module must be a single name without dots"
        )
    return parts


def _is_identifier(name: str) -> bool:
    # ASCII only: import normalises non-ASCII identifiers (NFKC), file names are not.
    return name.isascii() and name.isidentifier()


def _check_sha256(raw: bytes, expected: str) -> None:
    actual = hashlib.sha256(raw).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise DeploymentRejected(f"sha256 mismatch: expected {expected}, got {actual}")


def _member_parts(name: str) -> list[str]:
    """The path components of a zip member name; raises ValueError saying what is unsafe."""
    if "\x00" in name:
        raise ValueError("name contains NUL")
    if not name or name == "/":
        raise ValueError("empty name")
    if "\\" in name:
        raise ValueError("name contains a backslash")
    if name.startswith("/"):
        raise ValueError("absolute path")
    if _DRIVE_RE.match(name):
        raise ValueError("drive letter")
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_MEMBER_NAME_BYTES:
        raise ValueError(f"name longer than {_MAX_MEMBER_NAME_BYTES} bytes")
    parts = name.removesuffix("/").split("/")
    for part in parts:
        if part == "..":
            raise ValueError('".." component')
        if part in ("", "."):
            raise ValueError("empty or '.' component")
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT_BYTES:
            raise ValueError(f"component longer than {_MAX_COMPONENT_BYTES} bytes")
    return parts


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``, as function specs carry it."""
    return hashlib.sha256(data).hexdigest()


def _check_module_is_bundled(module_parts: list[str], entrypoint: str) -> None:
    """The worker puts the bundle first on ``sys.path`` and imports the entrypoint's module,
    but a name the interpreter already knows (``os``, ``json``, an installed package) comes
    from ``sys.modules`` or the standard library instead: ``os:system`` would run a shell.
    Refuse any top-level name that resolves without the bundle."""
    top = module_parts[0]
    where = resolves_outside_bundle(top)
    if where is not None:
        raise DeploymentRejected(
            f"entrypoint {entrypoint!r}: module {top!r} is {where}, so the worker would "
            "import that instead of the bundle's code; give the bundle's module another name"
        )


def resolves_outside_bundle(name: str) -> str | None:
    """What an importable top-level module ``name`` is outside any bundle, or None.

    Namespace packages (a bare directory on ``sys.path``) do not count: a bundle's regular
    module or package comes first on the worker's path and wins over them.
    """
    if name in sys.builtin_module_names:
        return "a built-in module"
    if name in sys.stdlib_module_names:
        return "a standard library module"
    if name in sys.modules:
        return "a module the agent has loaded"
    try:
        spec = importlib.machinery.PathFinder.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is not None and spec.origin is not None and spec.origin != "namespace":
        return f"installed at {spec.origin}"
    return None
