"""Function specs on the wire: :class:`FunctionSpec` and its code, encode / decode / validate.

Owns the JSON of a spec (``<p>/fleet/functions/<fid>``, ``<p>/nodes/<node>/functions/<fid>``)
and everything computed from it: the wire form (:func:`spec_to_dict`), what a signature
covers (:func:`signing_bytes`), the no-op test (:func:`spec_fingerprint`), the raw bytes a
``code.sha256`` covers (:func:`code_bytes`). Decoders raise ``DeploymentRejected`` naming the
spec, the field and the value; encoders raise ``ValueError`` for a spec they would refuse.

Must never: do I/O (code by reference is fetched by :mod:`agent.edge.fetch`, signatures are
checked by :mod:`agent.trust`), or import anything beyond the stdlib, ``agent.errors``,
``agent.models`` and ``agent.contract``'s pure modules.
"""

from __future__ import annotations

import hashlib
import json
import re
from base64 import b64decode
from binascii import Error as BinasciiError
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agent.contract.fields import (
    ErrorType,
    Fields,
    dumps,
    load_object,
    merge_extra,
    show,
    string_list,
)
from agent.contract.ids import KEY_ID_RE, VERSION_RE, is_valid_id
from agent.errors import DeploymentRejected
from agent.models import canonical_json

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

CODE_FORMATS: Final = ("source", "zip")


@dataclass(frozen=True)
class CodeSpec:
    """A function's code: source text or base64 of a zip, with the SHA-256 of the raw bytes.

    Or code by reference (``url`` set, ``data`` empty): ``size`` bytes at ``url`` (https),
    fetched to disk and checked by :mod:`agent.edge.fetch`, for code too big for a spec.
    """

    format: Literal["source", "zip"]
    data: str = field(repr=False)  # may be megabytes: keep it out of logs
    sha256: str
    url: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        if self.url:
            return {
                "format": self.format,
                "url": self.url,
                "sha256": self.sha256,
                "size": self.size,
            }
        return {"format": self.format, "data": self.data, "sha256": self.sha256}


@dataclass(frozen=True)
class SpecSignature:
    """An ed25519 signature over :func:`signing_bytes` of the spec that carries it."""

    key_id: str
    sig: str  # base64 of the 64-byte signature

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "sig": self.sig}


@dataclass(frozen=True)
class FunctionSpec:
    """A function spec as the cloud publishes it; ``extra`` keeps fields this version ignores."""

    id: str
    name: str
    version: str
    entrypoint: str
    code: CodeSpec
    memory_mb: int
    timeout_seconds: float
    environment: dict[str, str] = field(default_factory=dict, hash=False)
    requires: list[str] = field(default_factory=list, hash=False)
    concurrency: int = 1
    #: ``SpecSignature`` on a signed spec; a string is carried for old senders, never trusted.
    signature: SpecSignature | str | None = None
    #: Signed deployments: only goes up per function and scope (replay and downgrade guard).
    sequence: int | None = None
    #: Signed deployments: ``"fleet"`` or the node id the spec was signed for.
    target: str | None = None
    #: Most processes and threads of the function at once (its uid's RLIMIT_NPROC);
    #: None: the node's ``runtime.max_processes``.
    max_processes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


_SPEC_FIELDS: Final = frozenset(FunctionSpec.__dataclass_fields__) - {"extra"}
#: Written only when set, so an older spec's JSON (and fingerprint) is what it always was.
_OPTIONAL_SIGNING_FIELDS: Final = ("sequence", "target", "max_processes")
FLEET_TARGET: Final = "fleet"
_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
#: ``code.url``: https (``file`` too, for tests and local mirrors: agent.edge.fetch decides).
_URL_RE = re.compile(r"^(https|file)://[^\s]{1,2048}$")


def _spec_from_obj(obj: Mapping[str, Any], err: ErrorType) -> FunctionSpec:
    """Validate in field order, so the first error reported is the first bad field."""
    fid = Fields(obj, "function spec", err).id("id")
    f = Fields(obj, f'function spec "{fid}"', err)
    concurrency = obj.get("concurrency")
    return FunctionSpec(
        id=fid,
        name=f.text("name"),
        version=f.text("version", f"a version matching {VERSION_RE.pattern}", VERSION_RE),
        entrypoint=_entrypoint(f),
        code=_code(f),
        memory_mb=f.integer("memory_mb", minimum=1),
        timeout_seconds=f.number("timeout_seconds", positive=True),
        environment=_environment(f),
        requires=list(string_list(f, "requires", f.array("requires", optional=True))),
        concurrency=1 if concurrency is None else f.integer("concurrency", minimum=1),
        signature=_signature(f, obj.get("signature")),
        sequence=None if obj.get("sequence") is None else f.integer("sequence", minimum=0),
        target=_target(f, obj.get("target")),
        max_processes=(
            None if obj.get("max_processes") is None else f.integer("max_processes", minimum=1)
        ),
        extra={k: v for k, v in obj.items() if k not in _SPEC_FIELDS},
    )


def _signature(f: Fields, value: Any) -> SpecSignature | str | None:
    """An object ``{key_id, sig}``; a string or null is tolerated here (the trust policy
    refuses it when signatures are required)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict):
        f.bad("signature", "a string or null", value)  # the old message, kept for old tests
    s = f.child("signature", value)
    for key in value:
        if key not in ("key_id", "sig"):
            s.fail(key, "unknown field (a signature is {key_id, sig})")
    return SpecSignature(
        key_id=s.text("key_id", "16 lowercase hex digits", KEY_ID_RE),
        sig=s.text("sig", "base64 of an ed25519 signature", _B64_RE),
    )


def _target(f: Fields, value: Any) -> str | None:
    if value is None:
        return None
    if value != FLEET_TARGET and not is_valid_id(value):
        f.bad("target", f'"{FLEET_TARGET}" or a node id', value)
    return str(value)


def _entrypoint(f: Fields) -> str:
    value = f.text("entrypoint", '"module:attr"')
    module, sep, attr = value.partition(":")
    if not (sep and attr.isidentifier() and all(p.isidentifier() for p in module.split("."))):
        f.bad("entrypoint", '"module:attr" (dotted module of identifiers, an identifier)', value)
    return value


def _code(f: Fields) -> CodeSpec:
    code = f.obj("code")
    c = f.child("code", code)
    fmt = c.choice("format", CODE_FORMATS)
    if "url" in code:  # code by reference: {format, url, sha256, size}, no data
        if "data" in code:
            c.fail("data", "not allowed next to url (code is either inline or by reference)")
        url = c.text("url", "an https URL", _URL_RE)
        return CodeSpec(
            format="zip" if fmt == "zip" else "source",
            data="",
            sha256=c.hex64("sha256"),
            url=url,
            size=c.integer("size", minimum=1),
        )
    data = c.text("data")
    return CodeSpec(format="zip" if fmt == "zip" else "source", data=data, sha256=c.hex64("sha256"))


def _environment(f: Fields) -> dict[str, str]:
    environment = f.obj("environment", optional=True)
    e = f.child("environment", environment)
    for key, value in environment.items():
        if not ENV_NAME_RE.fullmatch(key):
            e.fail(key, f"not an environment variable name (expected {ENV_NAME_RE.pattern})")
        if not isinstance(value, str) or "\0" in value or not _is_utf8(value):
            e.bad(key, "a UTF-8 string without NUL", value)
    return dict(environment)


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_spec(payload: bytes, *, expected_id: str | None = None) -> FunctionSpec:
    """Parse and validate a spec; ``expected_id`` is the id in its topic, which must match."""
    spec = _spec_from_obj(
        load_object(payload, "function spec", DeploymentRejected), DeploymentRejected
    )
    if expected_id is not None and spec.id != expected_id:
        raise DeploymentRejected(
            f'function spec "{spec.id}": id: does not match the topic\'s id "{expected_id}"'
        )
    return spec


def spec_to_dict(spec: FunctionSpec) -> dict[str, Any]:
    """The wire form of a spec: every contract field (defaults included), then ``extra``."""
    data: dict[str, Any] = {
        "id": spec.id,
        "name": spec.name,
        "version": spec.version,
        "entrypoint": spec.entrypoint,
        "code": spec.code.to_dict(),
        "memory_mb": spec.memory_mb,
        "timeout_seconds": float(spec.timeout_seconds),  # 5 and 5.0: one fingerprint
        "environment": dict(spec.environment),
        "requires": list(spec.requires),
        "concurrency": spec.concurrency,
        "signature": (
            spec.signature.to_dict()
            if isinstance(spec.signature, SpecSignature)
            else spec.signature
        ),
    }
    for key in _OPTIONAL_SIGNING_FIELDS:
        if getattr(spec, key) is not None:
            data[key] = getattr(spec, key)
    return merge_extra(data, spec.extra)


def signing_bytes(spec: FunctionSpec) -> bytes:
    """What a spec's signature covers: the canonical JSON (``agent.models.canonical_json``:
    sorted keys, compact, UTF-8) of its wire form without ``signature``, extra fields
    included. Computed from the decoded spec, so ``5`` and ``5.0`` sign alike."""
    data = spec_to_dict(spec)
    del data["signature"]
    try:
        return canonical_json(data)
    except UnicodeEncodeError:  # a lone surrogate: sign the escaped form
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def encode_spec(spec: FunctionSpec) -> bytes:
    """The JSON of a spec; ValueError when a field breaks the rules decode_spec enforces."""
    data = spec_to_dict(spec)
    _spec_from_obj(data, ValueError)
    return dumps(data)


def spec_fingerprint(spec: FunctionSpec) -> str:
    """Hex SHA-256 of the canonical spec without ``extra``: equal means a no-op re-delivery."""
    data = {k: v for k, v in spec_to_dict(spec).items() if k in _SPEC_FIELDS}
    try:
        canonical = canonical_json(data)
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, no UTF-8): hash the escapes
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def code_bytes(code: CodeSpec) -> bytes:
    """The raw bytes the ``sha256`` covers: UTF-8 of the source, or the base64-decoded zip."""
    if code.url:
        raise DeploymentRejected(
            "function spec: code.url: code by reference must be fetched (agent.edge.fetch), "
            "not decoded"
        )
    if code.format == "source":
        try:
            return code.data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DeploymentRejected(
                f"function spec: code.data: source is not UTF-8 ({exc})"
            ) from exc
    try:
        return b64decode(code.data, validate=True)
    except (BinasciiError, ValueError) as exc:
        raise DeploymentRejected(
            f"function spec: code.data: expected base64 of a zip, got {show(code.data)} ({exc})"
        ) from exc


def is_removal(payload: bytes) -> bool:
    """An empty retained payload on a spec topic removes the function."""
    return len(payload) == 0


def requires_met(spec: FunctionSpec, capabilities: Iterable[str]) -> bool:
    """True when the node's capabilities cover ``spec.requires`` (else the node skips the spec)."""
    return set(spec.requires) <= set(capabilities)
