"""Function specs from code on disk: what a deployment publishes.

Owns turning a user's code (a module file, a zip, or a directory) and its settings into a
:class:`~agent.contract.protocol.FunctionSpec` that the agents' decoder accepts, and turning the
seed's
:class:`~agent.models.EdgeFunction` (with a :class:`~agent.models.PackagedHandler`) into one.
Directories are zipped with :func:`agent.exec.bundles.make_zip_bundle` (deterministic: the same
tree gives the same bytes, so the same sha256 and a no-op re-delivery on the nodes).

Must never: import or run the user's code, touch the network, or write files.
"""

from __future__ import annotations

import base64
import zipfile
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path

from agent.contract import protocol
from agent.errors import DeploymentRejected
from agent.exec.bundles import make_zip_bundle, sha256_hex
from agent.models import EdgeFunction, PackagedHandler

__all__ = ["function_spec", "spec_from_function"]


def function_spec(
    path: str | Path,
    *,
    id: str,
    entrypoint: str | None = None,
    name: str | None = None,
    version: str | None = None,
    memory_mb: int = 128,
    timeout_seconds: float = 30.0,
    environment: Mapping[str, str] | None = None,
    requires: Iterable[str] = (),
    concurrency: int = 1,
) -> protocol.FunctionSpec:
    """A spec for the code at ``path``: a ``.py`` module, a ``.zip``, or a directory.

    ``entrypoint`` is ``"module:attr"``; for a single module it defaults to
    ``"<file stem>:handler"``. ``version`` defaults to the first 12 hex digits of the
    code's sha256, so unchanged code is the same version. Raises ``DeploymentRejected``
    when the code or a field is unusable (the message names it), ``OSError`` when the path
    cannot be read.
    """
    source = Path(path)
    if source.is_dir():
        fmt, raw = "zip", make_zip_bundle(source)
    elif source.suffix == ".zip":
        fmt, raw = "zip", source.read_bytes()
    elif source.suffix == ".py":
        fmt, raw = "source", source.read_bytes()
        if entrypoint is None and source.stem.isidentifier():
            entrypoint = f"{source.stem}:handler"
    else:
        raise DeploymentRejected(f"{path}: expected a .py file, a .zip file or a directory")
    if entrypoint is None:
        raise DeploymentRejected(f'{path}: an entrypoint ("module:attr") is needed for a bundle')
    digest = sha256_hex(raw)
    if fmt == "zip":
        _check_zip_has_module(path, raw, entrypoint)
        data = base64.b64encode(raw).decode("ascii")
    else:
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DeploymentRejected(f"{path}: source is not UTF-8 ({exc})") from exc
    spec = protocol.FunctionSpec(
        id=id,
        name=name or id,
        version=version or digest[:12],
        entrypoint=entrypoint,
        code=protocol.CodeSpec(
            format="zip" if fmt == "zip" else "source", data=data, sha256=digest
        ),
        memory_mb=memory_mb,
        timeout_seconds=float(timeout_seconds),
        environment=dict(environment or {}),
        requires=list(requires),
        concurrency=concurrency,
    )
    try:
        protocol.encode_spec(spec)  # the agents' own rules, so no node rejects it for a field
    except (ValueError, TypeError) as exc:
        raise DeploymentRejected(str(exc)) from exc
    return spec


def spec_from_function(fn: EdgeFunction | protocol.FunctionSpec) -> protocol.FunctionSpec:
    """A spec for an ``EdgeFunction`` whose handler is code on disk (a ``PackagedHandler``).

    A callable handler cannot be sent: the wire carries source or a zip, never a pickle,
    and shipping the module a callable came from would run that module's top level (often
    the very script that is deploying) on every gateway.
    """
    if isinstance(fn, protocol.FunctionSpec):
        return fn
    if not isinstance(fn.handler, PackagedHandler):
        raise DeploymentRejected(
            f"{fn.id}: a remote deployment needs code on disk: use "
            "EdgeFunction.from_package(id, name, path, 'module:attr') or agent.cloud.function_spec"
        )
    return function_spec(
        fn.handler.path,
        id=fn.id,
        entrypoint=fn.handler.entrypoint,
        name=fn.name,
        version=fn.version,
        memory_mb=fn.memory_mb,
        timeout_seconds=fn.timeout_seconds,
        environment=fn.environment,
        requires=fn.requires,
        concurrency=fn.concurrency,
    )


def _check_zip_has_module(path: str | Path, raw: bytes, entrypoint: str) -> None:
    """Refuse here, not on a thousand gateways, a bundle without the entrypoint's module."""
    module = entrypoint.partition(":")[0].replace(".", "/")
    try:
        with zipfile.ZipFile(BytesIO(raw)) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as exc:
        raise DeploymentRejected(f"{path}: not a zip file ({exc})") from exc
    if f"{module}.py" not in names and f"{module}/__init__.py" not in names:
        raise DeploymentRejected(
            f"{path}: the bundle has neither {module}.py nor {module}/__init__.py "
            f"for entrypoint {entrypoint!r}"
        )
