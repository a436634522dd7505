"""The gateway's ed25519 verification (OpenSSL's libcrypto through ctypes) and its PEM
key parsing, checked against ``cryptography`` (what signs), with hostile inputs.

The agent never imports ``cryptography``: it costs ~7.4 MB of USS, against ~0.25 MB for the
few EVP calls on the libcrypto the ssl module has loaded already.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import trust
from agent.contract import protocol
from agent.errors import ConfigError, DeploymentRejected
from agent.trust import (
    Signer,
    TrustPolicy,
    ed25519_verify,
    generate_keypair,
    is_small_order,
    key_id,
    libcrypto,
    load_public_key,
    parse_public_key_pem,
)
from testing.specs import source_spec

REPO = Path(__file__).resolve().parent.parent


def _raw(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _pem(public: object) -> bytes:
    return public.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_verify_agrees_with_cryptography_on_valid_and_tampered_signatures() -> None:
    """For random keys and messages (empty to 64 KiB): a signature verifies; any flipped bit
    of signature, message or key, or another key, does not; cryptography says the same."""
    rng = random.Random(15)
    for i in range(60):
        private = Ed25519PrivateKey.generate()
        public = _raw(private)
        message = rng.randbytes(rng.choice([0, 1, 31, 64, 1000, 65536]))
        signature = private.sign(message)
        assert ed25519_verify(public, signature, message), f"case {i}: a valid signature failed"
        tampered = [
            (public, _flip(signature, rng.randrange(512)), message),
            (_flip(public, rng.randrange(256)), signature, message),
            (_raw(Ed25519PrivateKey.generate()), signature, message),
        ]
        if message:
            tampered.append((public, signature, _flip(message, rng.randrange(len(message) * 8))))
        for key, sig, msg in tampered:
            theirs = True
            try:
                private.public_key().from_public_bytes(key).verify(sig, msg)
            except Exception:  # InvalidSignature, or a key that is no point
                theirs = False
            assert ed25519_verify(key, sig, msg) is theirs is False, f"case {i}: accepted"


def test_verify_refuses_wrong_lengths_garbage_and_degenerate_keys() -> None:
    private = Ed25519PrivateKey.generate()
    public, message = _raw(private), b"spec"
    signature = private.sign(message)
    assert ed25519_verify(public, signature, message)
    for key, sig in [
        (public, signature[:63]),
        (public, signature + b"\0"),
        (public, b""),
        (public[:31], signature),
        (public + b"\0", signature),
        (b"", signature),
        (b"\0" * 32, signature),
        (b"\xff" * 32, signature),
        (public, b"\0" * 64),
        (public, b"\xff" * 64),
    ]:
        assert not ed25519_verify(key, sig, message), (key.hex(), sig.hex())
    rng = random.Random(7)
    for _ in range(500):
        assert not ed25519_verify(rng.randbytes(32), rng.randbytes(64), message)


def test_a_failed_verify_leaves_no_error_on_the_openssl_queue() -> None:
    """The ssl module reads this thread's OpenSSL error queue: a rejected key or signature
    must not leave an error there for the next TLS call to trip on."""
    lib = ctypes.CDLL("libcrypto.so.3")
    lib.ERR_peek_error.restype = ctypes.c_ulong
    lib.ERR_clear_error()
    assert not ed25519_verify(b"\xff" * 32, b"\x01" * 64, b"x")
    assert not ed25519_verify(_raw(Ed25519PrivateKey.generate()), b"\x01" * 64, b"x")
    assert not libcrypto().verify(b"\0" * 31, b"\x01" * 64, b"x")  # OpenSSL refuses the key
    assert lib.ERR_peek_error() == 0


def test_verify_from_many_threads_at_once() -> None:
    """The deployer and the loop may verify at the same time: 4 threads, 300 verdicts each,
    half of them forgeries, every verdict right."""
    keys = [Ed25519PrivateKey.generate() for _ in range(4)]
    wrong: list[str] = []

    def worker(index: int) -> None:
        private = keys[index]
        public = _raw(private)
        for n in range(300):
            message = f"{index}-{n}".encode()
            signature = private.sign(message)
            if n % 2:
                signature = _flip(signature, n % 512)
            if ed25519_verify(public, signature, message) is not (n % 2 == 0):
                wrong.append(f"thread {index} call {n}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a verifying thread hung"
    assert wrong == []


def test_pem_parsing_gives_the_raw_key_cryptography_gives() -> None:
    for _ in range(20):
        private = Ed25519PrivateKey.generate()
        pem = _pem(private.public_key())
        assert parse_public_key_pem(pem) == _raw(private)
        assert parse_public_key_pem(pem.replace(b"\n", b"\r\n")) == _raw(private)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (_pem(rsa.generate_private_key(65537, 2048).public_key()), "not an ed25519 public key"),
        (_pem(ec.generate_private_key(ec.SECP256R1()).public_key()), "not an ed25519 public key"),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "holds a PRIVATE key",
        ),
        (b"", "not exactly one PEM block"),
        (b"\xff\xfe not ascii", "not ASCII"),
        (b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n", "not an ed25519 public key"),
        (b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", "not base64"),
        (
            b"-----BEGIN PUBLIC KEY-----\n"
            + base64.b64encode(bytes.fromhex("302a300506032b6570032100") + b"\0" * 31)
            + b"\n-----END PUBLIC KEY-----\n",
            "not an ed25519 public key",
        ),
        (
            b"-----BEGIN PUBLIC KEY-----\n"
            + base64.b64encode(bytes.fromhex("302a300506032b6570032100") + b"\0" * 33)
            + b"\n-----END PUBLIC KEY-----\n",
            "not an ed25519 public key",
        ),
        (
            _pem(Ed25519PrivateKey.generate().public_key()) * 2,  # two blocks
            "not exactly one PEM block",
        ),
    ],
)
def test_pem_parsing_refuses_what_is_not_one_ed25519_public_key(data: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_public_key_pem(data)


# -- edwards25519 by hand, to check the small-order list independently -------------------------

P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P
#: libsodium's blocklist spells the two ys of the order-8 points so (ge25519_has_small_order).
ORDER8_Y = [
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
]


def _sqrt(a: int) -> int | None:
    a %= P
    root = pow(a, (P + 3) // 8, P)
    if root * root % P != a:
        root = root * pow(2, (P - 1) // 4, P) % P
    return root if root * root % P == a else None


def _points(y: int) -> set[tuple[int, int]]:
    """The points with this y: x^2 = (y^2 - 1) / (d y^2 + 1), both signs of x."""
    x = _sqrt((y * y - 1) * pow(D * y * y + 1, P - 2, P))
    return set() if x is None else {(x, y), ((P - x) % P, y)}


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The twisted Edwards addition law (a = -1)."""
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return (x3, y3)


def _encodings(y: int) -> list[bytes]:
    """Every 32-byte spelling of this y: both sign bits, and y + p when it fits in 255 bits."""
    out = []
    for value in (y, y + P):
        if value < 2**255:
            out += [value.to_bytes(32, "little"), (value | 1 << 255).to_bytes(32, "little")]
    return out


def test_small_order_keys_are_refused_everywhere_and_they_are_exactly_the_eight() -> None:
    """The ys refused are those of the 8 points P with 8P = identity (checked with the
    addition law: 8 distinct points, the whole 8-torsion), in all their encodings; the key
    parser and verify refuse them, while OpenSSL itself lets one signature (R = identity,
    S = 0) verify every message under the identity key."""
    ys = [1, P - 1, 0, *(int.from_bytes(bytes.fromhex(h), "little") for h in ORDER8_Y)]
    assert set(ys) == trust._SMALL_ORDER_YS
    points = set().union(*(_points(y) for y in ys))
    assert len(points) == 8, points
    for point in points:
        eight = point
        for _ in range(3):
            eight = _add(eight, eight)
        assert eight == (0, 1), f"{point} is not of small order"
    for y in ys:
        for raw in _encodings(y):
            assert is_small_order(raw), raw.hex()
            pem = (
                b"-----BEGIN PUBLIC KEY-----\n"
                + base64.b64encode(bytes.fromhex("302a300506032b6570032100") + raw)
                + b"\n-----END PUBLIC KEY-----\n"
            )
            with pytest.raises(ValueError, match="small order"):
                parse_public_key_pem(pem)
    identity = (1).to_bytes(32, "little")
    anything = identity + bytes(32)  # R = the identity, S = 0
    assert libcrypto().verify(identity, anything, b"any spec at all")  # why the check exists
    assert not ed25519_verify(identity, anything, b"any spec at all")
    for _ in range(200):
        assert not is_small_order(_raw(Ed25519PrivateKey.generate()))


def test_pem_parsing_ignores_text_around_the_block_and_whitespace_in_it() -> None:
    """What OpenSSL's PEM reader (and so the agent before) took: comments around the block,
    `openssl pkey -text` output, a re-wrapped body, a certificate next to it."""
    private = Ed25519PrivateKey.generate()
    pem = _pem(private.public_key())
    lines = pem.decode().splitlines()
    body = "".join(lines[1:-1])
    variants = [
        b"# the cloud's key, 2026\n" + pem + b"\nrotated yearly\n",
        b"ED25519 Public-Key:\npub:\n    aa:bb\n" + pem,
        f"{lines[0]}\n{body[:10]}\n {body[10:30]}\t\n{body[30:]}\n{lines[-1]}\n".encode(),
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" + pem,
    ]
    for data in variants:
        assert parse_public_key_pem(data) == _raw(private), data


def test_a_signature_spelled_another_way_is_refused(tmp_path: Path) -> None:
    """Base64 of 64 bytes leaves 4 unused bits in its last character: a spec whose signature
    string differs only there is another spec on the wire; it does not verify."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    os.chmod(keys, 0o755)
    generate_keypair(keys / "k")
    signer = Signer.from_file(keys / "k")
    policy = TrustPolicy.from_files([str(keys / "k.pub")], node_id="gw")
    spec = source_spec("f", "def handler(e):\n    return e\n")
    unsigned = protocol.decode_spec(json.dumps(spec).encode())
    signed = json.loads(protocol.encode_spec(signer.sign(unsigned, target="fleet", sequence=1)))
    assert policy.check(protocol.decode_spec(json.dumps(signed).encode()), "fleet") == 1
    sig = signed["signature"]["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = sig.rstrip("=")[-1]
    other = alphabet[alphabet.index(last) ^ 1]  # a low, unused bit
    data = sig.rstrip("=")
    respelled = data[:-1] + other + sig[len(data) :]
    assert base64.b64decode(respelled) == base64.b64decode(sig)
    signed["signature"]["sig"] = respelled
    with pytest.raises(DeploymentRejected, match="does not verify"):
        policy.check(protocol.decode_spec(json.dumps(signed).encode()), "fleet")


def test_load_public_key_says_which_file_and_why(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    os.chmod(keys, 0o755)
    kid = generate_keypair(keys / "k")
    assert key_id(load_public_key(keys / "k.pub")) == kid
    private_given = keys / "k"
    os.chmod(private_given, 0o600)
    with pytest.raises(ConfigError, match=r"trust.keys\[0\]: .*/k is not an ed25519 public "
                       r"key: it holds a PRIVATE key"):  # fmt: skip
        load_public_key(private_given, "trust.keys[0]")


def test_the_agent_with_keys_verifies_without_importing_cryptography(tmp_path: Path) -> None:
    """A fresh interpreter with the daemon's modules: without keys not even ctypes is loaded;
    with a trust key a spec signed by edgectl's Signer passes, a tampered one is refused, and
    cryptography was never loaded."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    os.chmod(keys, 0o755)
    generate_keypair(keys / "k")
    signer = Signer.from_file(keys / "k")
    spec = protocol.decode_spec(
        json.dumps(source_spec("f", "def handler(e):\n    return e\n")).encode()
    )
    signed = protocol.encode_spec(signer.sign(spec, target="fleet", sequence=3))
    tampered = json.loads(signed)
    tampered["timeout_seconds"] = 999
    (tmp_path / "signed.json").write_bytes(signed)
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    script = (
        "import sys\n"
        "import agent, agent.edge.cli, agent.edge.loop, agent.edge.reload\n"
        "from agent.contract import protocol\n"
        "from agent.errors import DeploymentRejected\n"
        "from agent.trust import TrustPolicy\n"
        "TrustPolicy.from_files([], node_id='gw')\n"
        "print('ctypes' in sys.modules)\n"
        "policy = TrustPolicy.from_files([sys.argv[1]], node_id='gw')\n"
        "print(policy.mode)\n"
        "print(policy.check(protocol.decode_spec(open(sys.argv[2], 'rb').read()), 'fleet'))\n"
        "try:\n"
        "    policy.check(protocol.decode_spec(open(sys.argv[3], 'rb').read()), 'fleet')\n"
        "except DeploymentRejected as exc:\n"
        "    print('rejected' if 'does not verify' in str(exc) else exc)\n"
        "print('cryptography' in sys.modules)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(keys / "k.pub"),
            str(tmp_path / "signed.json"),
            str(tmp_path / "tampered.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "signed", "3", "rejected", "False"], done.stdout
    assert TrustPolicy.from_files([str(keys / "k.pub")], node_id="gw").keys[signer.key_id]
