"""Signed deployments: ed25519 keys, signing specs (cloud side), verifying them (gateway side).

Owns the only use of ``cryptography`` (and of libcrypto) in the project and the trust rules
the agent applies to a function spec before anything else touches it:

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

The gateway side needs no ``cryptography``: a trusted key file is parsed here (one PEM
SubjectPublicKeyInfo of an ed25519 key, RFC 8410), and a signature is verified with the EVP
calls of OpenSSL's libcrypto, the library Python's ``ssl`` module (so paho) has loaded
already. ``cryptography`` (7.4 MB of the agent's USS measured, against 0.25 MB for ``ctypes``
and those calls) is imported only by what signs or makes keys (``edgectl``, the controller).
``tests/test_trust_verify.py`` checks the two against each other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.config import Config
from agent.contract import protocol
from agent.errors import ConfigError, DeploymentRejected

if TYPE_CHECKING:
    import ctypes

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

TrustMode = Literal["signed", "unsigned"]

#: A PEM public key is ~113 bytes; anything much bigger is not one.
_MAX_KEY_FILE_BYTES = 16 * 1024

#: The DER of an ed25519 SubjectPublicKeyInfo (RFC 8410) before its raw 32-byte key:
#: SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) }.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
_PEM_BEGIN, _PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"

#: edwards25519's field prime, and the y of its 8 points of small order (order 1, 2, 4, 8):
#: 1 (the identity), -1, 0, and the +-y of the four of order 8, as libsodium's blocklist
#: spells them. ``tests/test_trust_verify.py`` checks with the curve's addition law that
#: these are exactly the 8 points P with 8P = identity.
_P = 2**255 - 19
_SMALL_ORDER_YS = frozenset(
    {
        1,
        _P - 1,
        0,
        *(
            int.from_bytes(bytes.fromhex(y), "little")
            for y in (
                "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
                "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
            )
        ),
    }
)


def is_small_order(raw_public_key: bytes) -> bool:
    """Whether a 32-byte ed25519 key encodes a point of small order (in any of its encodings,
    y >= p included). Under such a key one signature verifies for every message (R = the
    identity, S = 0): it must never be trusted, whoever put it in a key file."""
    y = int.from_bytes(raw_public_key, "little") & ((1 << 255) - 1)
    return y % _P in _SMALL_ORDER_YS


def key_id(raw_public_key: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def _raw_public_key(private: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    public = private.public_key()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- verifying with the system's libcrypto -----------------------------------------------------

#: sonames of OpenSSL's libcrypto with raw ed25519 keys and one-shot EVP_DigestVerify
#: (>= 1.1.1); the first is what Debian 12's python3 and its ssl module load.
_LIBCRYPTO_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1")
_EVP_PKEY_ED25519 = 1087  # NID_ED25519, the same in every OpenSSL since 1.1.1


class _LibCrypto:
    """The five EVP calls of an ed25519 verification, bound once with their C types."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        import ctypes

        ptr, size, buf = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        self._new_key = lib.EVP_PKEY_new_raw_public_key
        self._new_key.argtypes = [ctypes.c_int, ptr, buf, size]
        self._new_key.restype = ptr
        self._free_key = lib.EVP_PKEY_free
        self._free_key.argtypes = [ptr]
        self._free_key.restype = None
        self._new_ctx = lib.EVP_MD_CTX_new
        self._new_ctx.argtypes = []
        self._new_ctx.restype = ptr
        self._free_ctx = lib.EVP_MD_CTX_free
        self._free_ctx.argtypes = [ptr]
        self._free_ctx.restype = None
        self._init = lib.EVP_DigestVerifyInit
        self._init.argtypes = [ptr, ptr, ptr, ptr, ptr]
        self._init.restype = ctypes.c_int
        self._verify = lib.EVP_DigestVerify
        self._verify.argtypes = [ptr, buf, size, buf, size]
        self._verify.restype = ctypes.c_int
        self._clear_errors = lib.ERR_clear_error
        self._clear_errors.argtypes = []
        self._clear_errors.restype = None

    def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        """True only when EVP_DigestVerify says 1 (valid); 0 (invalid) and every error
        (a point that is no key, a failed allocation) are False. Leaves no error on this
        thread's OpenSSL error queue (the ssl module reads that queue)."""
        key = self._new_key(_EVP_PKEY_ED25519, None, public_key, len(public_key))
        ctx = self._new_ctx() if key else None
        try:
            if not key or not ctx or self._init(ctx, None, None, None, key) != 1:
                return False
            verdict: int = self._verify(ctx, signature, len(signature), message, len(message))
            return verdict == 1
        finally:
            if ctx:
                self._free_ctx(ctx)
            if key:
                self._free_key(key)
            self._clear_errors()


_libcrypto: _LibCrypto | None = None
_libcrypto_lock = threading.Lock()


def _mapped_libcrypto() -> list[str]:
    """The paths of the libcrypto this process has mapped already (the ssl module's)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/libcrypto.so" in line}
    except OSError:
        return []
    return sorted(path for path in paths if path.startswith("/"))


def libcrypto() -> _LibCrypto:
    """OpenSSL's libcrypto, bound on first use; ConfigError when there is none to bind.

    The one the ssl module loaded comes first (no second copy in memory); then the sonames.
    A Python whose ``_ssl`` has OpenSSL built in maps none, and the soname loads a copy."""
    global _libcrypto
    with _libcrypto_lock:
        if _libcrypto is None:
            import ctypes  # here: an agent without keys never loads it (~0.2 MB)
            import ssl  # noqa: F401 (maps its libcrypto, if it has one: paho loaded it anyway)

            problems = []
            for name in (*_mapped_libcrypto(), *_LIBCRYPTO_NAMES):
                try:
                    _libcrypto = _LibCrypto(ctypes.CDLL(name))
                    break
                except (OSError, AttributeError) as exc:  # not there, or too old
                    problems.append(f"{name}: {exc}")
            else:
                raise ConfigError(
                    "trust.keys: cannot verify signatures without OpenSSL's libcrypto "
                    f"(>= 1.1.1): {'; '.join(problems)}"
                )
        return _libcrypto


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s ed25519 signature of ``message`` (raw
    32-byte key, 64-byte signature: any other length is False; so is a small-order key)."""
    if len(public_key) != ED25519_KEY_BYTES or len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    if is_small_order(public_key):
        return False
    return libcrypto().verify(public_key, signature, message)


def parse_public_key_pem(data: bytes) -> bytes:
    """The raw 32-byte key of the one PEM ``PUBLIC KEY`` block in ``data``, which must hold
    an ed25519 SubjectPublicKeyInfo of a key that is not of small order; ValueError saying
    what it is instead. Text around the block (comments, ``openssl pkey -text``) and
    whitespace inside it are ignored, as OpenSSL's PEM reader does; a private key anywhere
    in the file is refused."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not a PEM file (it is not ASCII)") from None
    if "PRIVATE KEY-----" in text:
        raise ValueError("it holds a PRIVATE key: give the agent the .pub file")
    start, end = text.find(_PEM_BEGIN), text.find(_PEM_END)
    if text.count(_PEM_BEGIN) != 1 or text.count(_PEM_END) != 1 or not 0 <= start < end:
        raise ValueError(f"not exactly one PEM block from {_PEM_BEGIN} to {_PEM_END}")
    body = "".join(text[start + len(_PEM_BEGIN) : end].split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("its PEM body is not base64") from None
    prefix = _ED25519_SPKI_PREFIX
    if len(der) != len(prefix) + ED25519_KEY_BYTES or not der.startswith(prefix):
        raise ValueError("not an ed25519 public key (another key type?)")
    raw = der[len(prefix) :]
    if is_small_order(raw):
        raise ValueError("a degenerate ed25519 key (small order): it would verify anything")
    return raw


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


def load_public_key(path: str | Path, key: str = "trust.keys") -> bytes:
    """One ed25519 public key (raw, 32 bytes) from a PEM file, its permissions checked;
    ConfigError if not."""
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
        return parse_public_key_pem(data)
    except ValueError as exc:
        raise ConfigError(f"{key}: {file} is not an ed25519 public key: {exc}") from None


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
    return key_id(_raw_public_key(private))


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
        self.key_id = key_id(_raw_public_key(private_key))

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
    #: The raw 32-byte ed25519 public key.
    public_key: bytes


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
        if keys:
            libcrypto()  # no libcrypto to verify with: refuse to start now, not at a deploy
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
        except (binascii.Error, ValueError):
            raw = b""
        if base64.b64encode(raw).decode("ascii") != signature.sig:
            raw = b""  # one signature, one spelling (unused low bits of the last char set)
        if not ed25519_verify(trusted.public_key, raw, protocol.signing_bytes(spec)):
            raise DeploymentRejected(
                f"{where}: signature: does not verify with key {signature.key_id}"
            )

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
