"""Signed deployments: ed25519 keys, signing specs (cloud side), verifying them (gateway side).

Owns the only use of ``cryptography`` in the project and the trust rules the agent applies to
a function spec before anything else touches it:

- a spec's ``signature{key_id, sig}`` is an ed25519 signature over
  :func:`agent.contract.protocol.signing_bytes` (canonical JSON of every other field);
- the key must be one of the agent's ``[trust] keys`` (public keys in PEM files the agent
  cannot write), looked up by ``key_id`` (first 16 hex digits of the SHA-256 of the raw
  32-byte public key);
- ``target`` must be ``"fleet"`` on the fleet topic and this node's id on its own topic, so
  a spec signed for one node cannot be replayed elsewhere;
- ``sequence`` must be present; that it only goes up is checked by the caller, which owns
  the store (:mod:`agent.edge.deploy_reconcile`).

With no keys configured the policy is ``unsigned``: every spec is accepted as before, and
the agent says so in its status. ``require_signed = false`` with keys is a migration mode:
signed specs are checked in full, unsigned ones are accepted.

Also here: key generation and loading for ``edgectl keygen`` / ``--sign-key`` (a private
key others can read is refused, as OpenSSH does).

Must never: log key material, accept a key file the agent itself (or its group, or anyone)
could write, or be imported by the worker.

``cryptography`` is imported where a key is first loaded, made or used, not with this module:
it costs the agent process ~6.7 MB of USS, which an agent without ``[trust] keys`` (and
``edge-agent status``) does not need. An agent with keys pays it when it reads them at start.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.config import Config
from agent.contract import protocol
from agent.errors import ConfigError, DeploymentRejected

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger(__name__)

TrustMode = Literal["signed", "unsigned"]

#: A PEM public key is ~113 bytes; anything much bigger is not one.
_MAX_KEY_FILE_BYTES = 16 * 1024


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- keys on disk ------------------------------------------------------------------------------


def _writable_by(st: os.stat_result, uid: int, gids: Iterable[int]) -> str | None:
    """Why a file with ``st`` is writable by someone other than root, or None."""
    if st.st_mode & stat.S_IWOTH:
        return "world-writable"
    if st.st_mode & stat.S_IWGRP:
        return "group-writable"
    if uid != 0:
        if st.st_uid == uid:
            return f"owned by the agent's own uid {uid}"
        if st.st_gid in set(gids) and st.st_mode & stat.S_IWGRP:
            return "writable by the agent's group"
    return None


def check_key_file_permissions(path: Path, key: str = "trust.keys") -> None:
    """Refuse a trust key file (and its directory) that the agent could rewrite.

    Running as root, the file and its directory must not be group- or world-writable;
    otherwise they must also not belong to the agent's uid. ConfigError says which.
    """
    uid = os.geteuid()
    gids = {os.getegid(), *os.getgroups()}
    for what, target in (("key file", path), ("its directory", path.parent)):
        try:
            st = os.stat(target)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
        problem = _writable_by(st, uid, gids)
        if problem:
            raise ConfigError(
                f"{key}: {what} {target} is {problem} (mode {stat.S_IMODE(st.st_mode):o}): "
                "the agent must not be able to change the keys it trusts; "
                "chown root and chmod go-w"
            )


def load_public_key(path: str | Path, key: str = "trust.keys") -> Ed25519PublicKey:
    """One ed25519 public key from a PEM file, its permissions checked; ConfigError if not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    file = Path(path)
    check_key_file_permissions(file, key)
    try:
        with file.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {file}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{key}: {file} is over {_MAX_KEY_FILE_BYTES} bytes: not a public key")
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{key}: {file} is not a PEM public key ({exc})") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise ConfigError(f"{key}: {file} is a {type(public).__name__}, not an ed25519 key")
    return public


def generate_keypair(path: str | Path) -> str:
    """Write a new private key to ``path`` (PEM, 0600) and its public key to ``path.pub``
    (PEM, 0644); refuse to overwrite either. Returns the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_path.exists() or public_path.is_symlink():
        raise FileExistsError(f"{public_path} exists: not overwriting a key")
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return key_id(private.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, mode)  # whatever the umask
        out.write(data)
        out.flush()
        os.fsync(fd)


# -- signing (the cloud side) ------------------------------------------------------------------


class Signer:
    """Signs specs with one private key; ``Signer.from_file`` for a key made by ``keygen``."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        """Load a PEM private key; ConfigError when others can read it or it is no ed25519."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        file = Path(path)
        try:
            st = os.stat(file)
            data = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"sign key: cannot read {file}: {exc.strerror or exc}") from exc
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"sign key: {file} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                "chmod 600 it"
            )
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"sign key: {file} is not an unencrypted PEM private key") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"sign key: {file} is a {type(private).__name__}, not ed25519")
        return cls(private)

    def sign(
        self, spec: protocol.FunctionSpec, *, target: str, sequence: int
    ) -> protocol.FunctionSpec:
        """``spec`` for ``target`` ("fleet" or a node id) at ``sequence``, signed."""
        unsigned = replace(spec, target=target, sequence=sequence, signature=None)
        sig = self._key.sign(protocol.signing_bytes(unsigned))
        signature = protocol.SpecSignature(self.key_id, base64.b64encode(sig).decode("ascii"))
        return replace(unsigned, signature=signature)


# -- verifying (the gateway side) --------------------------------------------------------------


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    path: str
    public_key: Ed25519PublicKey


class TrustPolicy:
    """What the agent accepts: the trusted keys, whether signatures are required, who it is.

    Build it with :meth:`from_files` (reads and checks the key files: ConfigError on any
    problem, so the agent refuses to start, or SIGHUP keeps the running policy).
    """

    def __init__(self, keys: Iterable[TrustedKey], *, require_signed: bool, node_id: str) -> None:
        self.keys: Mapping[str, TrustedKey] = {k.key_id: k for k in keys}
        self.require_signed = require_signed
        self.node_id = node_id

    @classmethod
    def from_files(
        cls, paths: Iterable[str], *, require_signed: bool = True, node_id: str
    ) -> TrustPolicy:
        """Signatures are required when ``require_signed`` and there is at least one key."""
        keys = []
        for index, path in enumerate(paths):
            public = load_public_key(path, f"trust.keys[{index}]")
            keys.append(TrustedKey(key_id(public), str(path), public))
        required = require_signed and bool(keys)
        policy = cls(keys, require_signed=required, node_id=node_id)
        if not keys:
            log.warning(
                "no [trust] keys: accepting UNSIGNED function specs from anyone who can "
                "publish to the broker (status says trust: unsigned)"
            )
        elif not required:
            log.warning("trust.require_signed = false: unsigned function specs are accepted")
        else:
            log.info("trusting spec signing keys %s", ", ".join(sorted(policy.keys)))
        return policy

    @classmethod
    def from_config(cls, config: Config) -> TrustPolicy:
        """The policy of a loaded config: reads and checks ``trust.keys`` (ConfigError)."""
        trust = config.trust
        return cls.from_files(
            trust.keys, require_signed=trust.require_signed, node_id=config.node.id
        )

    @property
    def mode(self) -> TrustMode:
        """``signed`` when unsigned specs are refused; what status and heartbeats report."""
        return "signed" if self.require_signed else "unsigned"

    def expected_target(self, scope: str) -> str:
        return protocol.FLEET_TARGET if scope == "fleet" else self.node_id

    def check(self, spec: protocol.FunctionSpec, scope: str) -> int | None:
        """Verify a spec that arrived on ``scope``'s topic ("fleet" or "node").

        Returns the sequence the caller must hold above the last accepted one, or None for
        an unsigned spec accepted in unsigned mode. DeploymentRejected says why not.
        """
        where = f'function spec "{spec.id}"'
        if not self.require_signed and not self._known(spec):
            return None  # unsigned mode: what cannot be verified is taken as unsigned
        if spec.signature is None or isinstance(spec.signature, str):
            shown = "none" if spec.signature is None else "a string, not {key_id, sig}"
            raise DeploymentRejected(
                f"{where}: signature: this node requires signed specs, got {shown}"
            )
        self.verify_signature(spec)
        expected = self.expected_target(scope)
        if spec.target != expected:
            raise DeploymentRejected(
                f"{where}: target: signed for {spec.target!r} but published on the "
                f"{scope} topic of {expected!r} (replayed from elsewhere?)"
            )
        if spec.sequence is None:
            raise DeploymentRejected(f"{where}: sequence: required in a signed spec")
        return spec.sequence

    def _known(self, spec: protocol.FunctionSpec) -> bool:
        signature = spec.signature
        return isinstance(signature, protocol.SpecSignature) and signature.key_id in self.keys

    def verify_signature(self, spec: protocol.FunctionSpec) -> None:
        """The signature is a trusted key's over this spec; DeploymentRejected if not."""
        from cryptography.exceptions import InvalidSignature

        where = f'function spec "{spec.id}"'
        signature = spec.signature
        if not isinstance(signature, protocol.SpecSignature):
            raise DeploymentRejected(f"{where}: signature: not signed")
        trusted = self.keys.get(signature.key_id)
        if trusted is None:
            raise DeploymentRejected(
                f"{where}: signature: key {signature.key_id} is not trusted by this node"
            )
        try:
            raw = base64.b64decode(signature.sig, validate=True)
            trusted.public_key.verify(raw, protocol.signing_bytes(spec))
        except (ValueError, InvalidSignature):
            raise DeploymentRejected(
                f"{where}: signature: does not verify with key {signature.key_id}"
            ) from None

    def still_trusted(self, spec: protocol.FunctionSpec) -> str | None:
        """Why a spec accepted earlier may no longer run (revoked key, now unsigned), or None.

        Used when code is restored at start, on SIGHUP and when a stored spec is
        reconciled: code runs only while its signing key is trusted.
        """
        if not self.require_signed and not self._known(spec):
            return None
        try:
            self.verify_signature(spec)
        except DeploymentRejected as exc:
            return f"{exc} (no longer trusted: its key was removed from [trust] keys?)"
        return None
