"""Tests for agent.exec.bundles: verified, safe, atomic installation of function code."""

from __future__ import annotations

import io
import os
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import DeploymentRejected
from agent.exec.bundles import (
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_FILES,
    cleanup_staging,
    install_bundle,
    make_zip_bundle,
    prune_versions,
    remove_function,
    sha256_hex,
    unpack,
    version_dir,
)

HANDLER = b"def main(event):\n    return event\n"
MiB = 1024 * 1024

# -- helpers ----------------------------------------------------------------------------------


def member(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    """A ZipInfo whose name and mode are exactly as given (NUL included)."""
    info = zipfile.ZipInfo("placeholder", date_time=(1980, 1, 1, 0, 0, 0))
    info.filename = name  # the constructor would cut the name at a NUL
    info.orig_filename = name
    info.create_system = 3
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def build_zip(*members: tuple[zipfile.ZipInfo | str, bytes]) -> bytes:
    """Zip bytes with the given members in order, duplicates allowed."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for info, data in members:
                archive.writestr(info, data)
    return buffer.getvalue()


def patch_single_member(
    raw: bytes,
    *,
    flags_or: int = 0,
    method: int | None = None,
    file_size: int | None = None,
    crc: int | None = None,
) -> bytes:
    """Rewrite header fields of a one-member zip in both its local and central headers."""
    data = bytearray(raw)
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    assert local == 0 and central > 0
    # Local header: flags at 6, method at 8, crc at 14, uncompressed size at 22.
    # Central header: flags at 8, method at 10, crc at 16, uncompressed size at 24.
    for base, flags_at, method_at, crc_at, size_at in (
        (local, 6, 8, 14, 22),
        (central, 8, 10, 16, 24),
    ):
        (flags,) = struct.unpack_from("<H", data, base + flags_at)
        struct.pack_into("<H", data, base + flags_at, flags | flags_or)
        if method is not None:
            struct.pack_into("<H", data, base + method_at, method)
        if crc is not None:
            struct.pack_into("<I", data, base + crc_at, crc)
        if file_size is not None:
            struct.pack_into("<I", data, base + size_at, file_size)
    return bytes(data)


def install(
    functions_dir: Path,
    raw: bytes,
    *,
    code_format: str = "zip",
    entrypoint: str = "handler:main",
    version: str = "1.0.0",
    function_id: str = "fn",
    sha256: str | None = None,
    max_bytes: int = MAX_BUNDLE_BYTES,
    max_files: int = MAX_BUNDLE_FILES,
) -> Path:
    return install_bundle(
        functions_dir,
        function_id,
        version,
        code_format,
        raw,
        sha256 if sha256 is not None else sha256_hex(raw),
        entrypoint,
        max_bytes=max_bytes,
        max_files=max_files,
    )


def assert_clean(functions_dir: Path, function_id: str = "fn") -> None:
    """No staging or trash left, and no version dir appeared."""
    function_dir = functions_dir / function_id
    if function_dir.exists():
        assert list(function_dir.iterdir()) == []
    if functions_dir.exists():
        assert list(functions_dir.rglob(".*")) == []


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories)."""
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def rejected(functions_dir: Path, raw: bytes, match: str, **kwargs: object) -> None:
    with pytest.raises(DeploymentRejected, match=match):
        install(functions_dir, raw, **kwargs)  # type: ignore[arg-type]
    assert_clean(functions_dir)


# -- happy paths ------------------------------------------------------------------------------


def test_install_source_writes_one_module(tmp_path: Path) -> None:
    functions = tmp_path / "functions"
    path = install(functions, HANDLER, code_format="source", entrypoint="handler:main")
    assert path == functions / "fn" / f"1.0.0-{sha256_hex(HANDLER)[:12]}"
    assert tree(path) == {"handler.py": HANDLER}
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "handler.py").stat().st_mode) == 0o644
    assert [p.name for p in (functions / "fn").iterdir()] == [path.name]


def test_install_zip_package_with_nested_modules(tmp_path: Path) -> None:
    raw = build_zip(
        ("pkg/", b""),
        ("pkg/__init__.py", b""),
        ("pkg/sub/__init__.py", b"X = 1\n"),
        ("pkg/sub/mod.py", HANDLER),
        ("pkg/data/table.csv", b"a,b\n"),
    )
    path = install(tmp_path, raw, entrypoint="pkg.sub.mod:main")
    assert tree(path) == {
        "pkg": None,
        "pkg/__init__.py": b"",
        "pkg/data": None,
        "pkg/data/table.csv": b"a,b\n",
        "pkg/sub": None,
        "pkg/sub/__init__.py": b"X = 1\n",
        "pkg/sub/mod.py": HANDLER,
    }
    for p in [path, *path.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_entrypoint_may_be_a_package_init(tmp_path: Path) -> None:
    raw = build_zip(("pkg/__init__.py", b""), ("pkg/sub/__init__.py", HANDLER))
    assert (install(tmp_path, raw, entrypoint="pkg.sub:main") / "pkg/sub/__init__.py").is_file()


def test_member_modes_from_the_zip_are_not_trusted(tmp_path: Path) -> None:
    """A setuid, world-writable member is written 0644 like any other."""
    raw = build_zip((member("handler.py", stat.S_IFREG | 0o4777), HANDLER))
    path = install(tmp_path, raw)
    assert stat.S_IMODE((path / "handler.py").stat().st_mode) == 0o644


def test_uppercase_sha256_is_accepted(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER))
    path = install(tmp_path, raw, sha256=sha256_hex(raw).upper())
    assert path == version_dir(tmp_path, "fn", "1.0.0", sha256_hex(raw))


def test_reinstall_same_version_returns_existing_dir_untouched(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER))
    first = install(tmp_path, raw)
    before = {p: p.stat().st_ino for p in [first, *first.rglob("*")]}
    (first / "handler.py").chmod(0o600)  # a marker: a rewrite would reset it
    assert install(tmp_path, raw) == first
    assert {p: p.stat().st_ino for p in [first, *first.rglob("*")]} == before
    assert stat.S_IMODE((first / "handler.py").stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "fn").iterdir()] == [first.name]


def test_reinstall_with_an_entrypoint_missing_from_the_bundle_is_rejected(tmp_path: Path) -> None:
    """Same version and digest but a new entrypoint module cannot reuse the old dir silently."""
    first = install(tmp_path, HANDLER, code_format="source", entrypoint="handler:main")
    with pytest.raises(DeploymentRejected, match=r"entrypoint module 'main' .* not found"):
        install(tmp_path, HANDLER, code_format="source", entrypoint="main:main")
    assert first.is_dir()


def test_versions_live_side_by_side(tmp_path: Path) -> None:
    one = install(tmp_path, HANDLER, code_format="source", version="1")
    two = install(tmp_path, HANDLER + b"# 2\n", code_format="source", version="2")
    same_version_new_code = install(tmp_path, HANDLER + b"# 3\n", code_format="source", version="2")
    assert len({one, two, same_version_new_code}) == 3
    assert all(p.is_dir() for p in (one, two, same_version_new_code))


# -- rejected specs ---------------------------------------------------------------------------


def test_sha256_mismatch_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    functions = tmp_path / "functions"
    wrong = sha256_hex(b"something else")
    with pytest.raises(
        DeploymentRejected,
        match=f"sha256 mismatch: expected {wrong}, got {sha256_hex(HANDLER)}",
    ):
        install(functions, HANDLER, code_format="source", sha256=wrong)
    assert not functions.exists()


def test_sha256_is_checked_before_the_zip_is_parsed(tmp_path: Path) -> None:
    """Garbage with a wrong digest reports the digest, proving the bytes were not parsed."""
    with pytest.raises(DeploymentRejected, match="sha256 mismatch"):
        install(tmp_path, b"not a zip", sha256="0" * 64)


@pytest.mark.parametrize("sha256", ["", "abc", "g" * 64, "0" * 63, "0" * 65, "é" * 64])
def test_malformed_sha256_is_rejected(tmp_path: Path, sha256: str) -> None:
    rejected(tmp_path, HANDLER, "invalid sha256", code_format="source", sha256=sha256)


@pytest.mark.parametrize(
    "version",
    ["", "../x", "..", "a/b", "a\\b", "a\x00b", ".hidden", "x" * 65, "1 0", "1\n", "1~2"],
)
def test_unsafe_version_is_rejected(tmp_path: Path, version: str) -> None:
    """The contract's version rule (contract.ids): "~" is refused as decode_spec refuses it."""
    rejected(tmp_path, HANDLER, "invalid version", code_format="source", version=version)


@pytest.mark.parametrize(
    "version", ["1", "1.0.0", "2024-01-01", "1.0.0-rc.1+build.5", "x" * 64, "1..2"]
)
def test_ordinary_versions_are_accepted(tmp_path: Path, version: str) -> None:
    path = install(tmp_path, HANDLER, code_format="source", version=version)
    assert path.name.startswith(f"{version}-")


@pytest.mark.parametrize("function_id", ["", "a.b", "a/b", "-a", "_a", "a" * 65, "a\n", ".."])
def test_invalid_function_id_is_rejected(tmp_path: Path, function_id: str) -> None:
    with pytest.raises(DeploymentRejected, match="invalid function id"):
        install(tmp_path, HANDLER, code_format="source", function_id=function_id)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code_format", "entrypoint"),
    [
        ("source", "handler"),
        ("source", "handler:"),
        ("source", ":main"),
        ("source", "pkg.handler:main"),
        ("source", "../handler:main"),
        ("zip", "my-mod:main"),
        ("zip", "pkg..mod:main"),
        ("zip", "pkg/mod:main"),
        ("zip", "modé:main"),
    ],
)
def test_invalid_entrypoint_is_rejected(tmp_path: Path, code_format: str, entrypoint: str) -> None:
    rejected(
        tmp_path,
        HANDLER if code_format == "source" else build_zip(("handler.py", HANDLER)),
        "invalid entrypoint",
        code_format=code_format,
        entrypoint=entrypoint,
    )


def test_unknown_code_format_is_rejected(tmp_path: Path) -> None:
    rejected(tmp_path, HANDLER, "unknown code format", code_format="tar")


def test_source_must_be_utf8(tmp_path: Path) -> None:
    rejected(tmp_path, b"x = '\xff'\n", "not valid UTF-8", code_format="source")


def test_source_over_max_bytes_is_rejected(tmp_path: Path) -> None:
    rejected(tmp_path, HANDLER, "over the limit", code_format="source", max_bytes=10)


# -- rejected zips ----------------------------------------------------------------------------

MALICIOUS_MEMBERS = [
    pytest.param(member("../evil.py"), '".." component', id="dotdot"),
    pytest.param(member("pkg/../../evil.py"), '".." component', id="nested-dotdot"),
    pytest.param(member("pkg/.."), '".." component', id="trailing-dotdot"),
    pytest.param(member("/etc/cron.d/evil"), "absolute path", id="absolute"),
    pytest.param(member("C:/evil.py"), "drive letter", id="drive"),
    pytest.param(member("c:evil.py"), "drive letter", id="drive-relative"),
    pytest.param(member("pkg\\..\\..\\evil.py"), "backslash", id="backslash"),
    pytest.param(member("evil.py\x00.txt"), "NUL", id="nul"),
    pytest.param(member("pkg//evil.py"), "empty or '.' component", id="empty-component"),
    pytest.param(member("./evil.py"), "empty or '.' component", id="dot-component"),
    pytest.param(member("a" * 256), "component longer", id="long-component"),
    pytest.param(member("/".join(["a"] * 600)), "name longer", id="long-name"),
    pytest.param(member("link", stat.S_IFLNK | 0o777), "symlink", id="symlink"),
    pytest.param(member("fifo", stat.S_IFIFO | 0o644), "not a regular file", id="fifo"),
    pytest.param(member("dev", stat.S_IFCHR | 0o644), "not a regular file", id="chardev"),
    pytest.param(member("sock", stat.S_IFSOCK | 0o644), "not a regular file", id="socket"),
    pytest.param(member("dir/", stat.S_IFREG | 0o644), "not a directory", id="dir-as-file"),
    pytest.param(member("dir/", stat.S_IFLNK | 0o777), "symlink", id="dir-symlink"),
]


@pytest.mark.parametrize(("info", "why"), MALICIOUS_MEMBERS)
def test_malicious_member_is_rejected_by_name(
    tmp_path: Path, info: zipfile.ZipInfo, why: str
) -> None:
    functions = tmp_path / "functions"
    raw = build_zip(("handler.py", HANDLER), (info, b"pwned"))
    with pytest.raises(DeploymentRejected) as excinfo:
        install(functions, raw)
    message = str(excinfo.value)
    assert why in message
    assert repr(info.orig_filename) in message
    assert_clean(functions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["functions"]


def test_symlink_member_with_target_outside_is_never_created(tmp_path: Path) -> None:
    """A symlink member pointing at /etc must not become a link, even under a safe name."""
    raw = build_zip((member("handler.py", stat.S_IFLNK | 0o777), b"/etc/passwd"))
    rejected(tmp_path, raw, "symlink")


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER), ("handler.py", b"evil = 1\n"))
    rejected(tmp_path, raw, "'handler.py' rejected: duplicate name")


def test_file_and_dir_entry_of_the_same_name_are_duplicates(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER), ("pkg", b"x"), ("pkg/", b""))
    rejected(tmp_path, raw, "'pkg/' rejected: duplicate name")


def test_file_that_is_also_a_parent_dir_is_rejected(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER), ("pkg", b"x"), ("pkg/mod.py", b""))
    rejected(tmp_path, raw, "'pkg' rejected: both a file and a directory")


def test_more_members_than_max_files_is_rejected(tmp_path: Path) -> None:
    raw = build_zip(*[(f"m{i}.py", b"") for i in range(4)], ("handler.py", HANDLER))
    rejected(tmp_path, raw, "5 members, over the limit of 4", max_files=4)


def test_declared_size_over_max_bytes_is_rejected(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER), ("data.bin", os.urandom(2000)))
    rejected(tmp_path, raw, "more than 1000 bytes uncompressed .*'data.bin'", max_bytes=1000)


def test_encrypted_member_is_rejected(tmp_path: Path) -> None:
    raw = patch_single_member(build_zip(("handler.py", HANDLER)), flags_or=0x1)
    rejected(tmp_path, raw, "'handler.py' rejected: encrypted")


def test_bzip2_member_is_rejected(tmp_path: Path) -> None:
    """bzip2 and lzma decompress a whole chunk at once, so they are not allowed at all."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("handler.py", HANDLER)
    rejected(tmp_path, buffer.getvalue(), "'handler.py' rejected: compression method 12")


def test_compression_ratio_bomb_is_rejected(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER), ("zeros.bin", bytes(4 * MiB)))
    rejected(tmp_path, raw, r"'zeros.bin' rejected: compression ratio over 200:1")


def test_small_highly_compressible_member_is_fine(tmp_path: Path) -> None:
    raw = build_zip(("handler.py", HANDLER), ("zeros.bin", bytes(MiB)))
    assert (install(tmp_path, raw) / "zeros.bin").stat().st_size == MiB


def test_zip_bomb_with_a_lying_size_header_is_rejected(tmp_path: Path) -> None:
    """A 16 MiB stream of zeros declared as 1000 bytes fails; at most 1000 bytes are written."""
    raw = patch_single_member(build_zip(("handler.py", bytes(16 * MiB))), file_size=1000)
    rejected(tmp_path, raw, "'handler.py' rejected: corrupt zip")


def test_zip_bomb_with_lying_size_and_crc_writes_only_the_declared_bytes(tmp_path: Path) -> None:
    """Even with a CRC forged for the truncated prefix, output stops at the declared size."""
    raw = patch_single_member(
        build_zip(("handler.py", bytes(16 * MiB))), file_size=1000, crc=zlib.crc32(bytes(1000))
    )
    path = install(tmp_path, raw)
    assert (path / "handler.py").stat().st_size == 1000


def test_member_longer_than_its_header_declares_is_rejected() -> None:
    """Counting actual bytes catches a stream longer than its declared size."""
    info = member("handler.py")
    info.file_size, info.compress_size = 10, 10
    chunks = unpack._read_limited(io.BytesIO(bytes(100)), info, unpack._Budget(10**9))
    with pytest.raises(DeploymentRejected, match="more data than the declared 10 bytes"):
        list(chunks)


def test_actual_bytes_count_against_the_bundle_limit() -> None:
    """The running total, not only the declared one, is held to max_bytes."""
    info = member("handler.py")
    info.file_size, info.compress_size = 100, 100
    chunks = unpack._read_limited(io.BytesIO(bytes(100)), info, unpack._Budget(50))
    with pytest.raises(DeploymentRejected, match="exceeds the uncompressed size limit"):
        list(chunks)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x05\x06" + bytes(10), id="truncated-end-record"),
        pytest.param(os.urandom(256), id="random"),
        pytest.param(build_zip(("handler.py", HANDLER * 50))[:-30], id="truncated"),
    ],
)
def test_corrupt_zip_is_rejected(tmp_path: Path, raw: bytes) -> None:
    rejected(tmp_path, raw, "corrupt zip")


def test_flipped_byte_in_compressed_data_is_rejected(tmp_path: Path) -> None:
    raw = bytearray(build_zip(("handler.py", HANDLER * 50)))
    raw[60] ^= 0xFF  # inside the deflate stream, after the 30-byte header and name
    rejected(tmp_path, bytes(raw), "corrupt zip")


def test_failure_midway_leaves_no_staging_dir(tmp_path: Path) -> None:
    """Members already written when a later one fails are removed with the staging dir."""
    good = build_zip(("a.py", b"a = 1\n" * 100), ("handler.py", HANDLER * 100))
    raw = bytearray(good)
    second = raw.find(b"PK\x03\x04", 4)
    raw[second + 45] ^= 0xFF  # corrupt the second member's data
    rejected(tmp_path, bytes(raw), "'handler.py' rejected: corrupt zip")


@pytest.mark.parametrize(
    ("members", "entrypoint"),
    [
        pytest.param([("other.py", HANDLER)], "handler:main", id="missing-module"),
        pytest.param([("mod.py", HANDLER)], "pkg.mod:main", id="missing-parent-package"),
        pytest.param([("pkg", b""), ("mod.py", HANDLER)], "pkg.mod:main", id="parent-is-a-file"),
        pytest.param([("pkg/mod/x.py", HANDLER)], "pkg.mod:main", id="package-without-init"),
        pytest.param([("pkg/mod.txt", HANDLER)], "pkg.mod:main", id="wrong-suffix"),
        pytest.param([("handler.py/", b"")], "handler:main", id="module-is-a-dir"),
        pytest.param([], "handler:main", id="empty-zip"),
    ],
)
def test_entrypoint_module_not_found_is_rejected(
    tmp_path: Path, members: list[tuple[str, bytes]], entrypoint: str
) -> None:
    module = entrypoint.partition(":")[0]
    rejected(
        tmp_path,
        build_zip(*members),
        f"entrypoint module '{module}' .* not found in bundle",
        entrypoint=entrypoint,
    )


# -- cleanup, prune, remove -------------------------------------------------------------------


def test_cleanup_staging_removes_crash_leftovers_only(tmp_path: Path) -> None:
    kept = install(tmp_path, HANDLER, code_format="source")
    leftovers = [
        tmp_path / "fn" / ".staging-0123abcd",
        tmp_path / "fn" / ".trash-4567",
        tmp_path / ".trash-fn-89ab",
    ]
    for path in leftovers:
        (path / "pkg").mkdir(parents=True)
        (path / "pkg" / "half.py").write_bytes(b"x =")
    (tmp_path / "fn" / ".staging-file").write_bytes(b"")
    assert sorted(cleanup_staging(tmp_path)) == sorted([*leftovers, tmp_path / "fn/.staging-file"])
    assert tree(tmp_path) == {
        "fn": None,
        f"fn/{kept.name}": None,
        f"fn/{kept.name}/handler.py": HANDLER,
    }
    assert cleanup_staging(tmp_path) == []
    assert cleanup_staging(tmp_path / "missing") == []


def test_prune_versions_keeps_only_the_given_dirs(tmp_path: Path) -> None:
    v1, v2, v3 = (
        install(tmp_path, HANDLER + f"# {v}\n".encode(), code_format="source", version=v)
        for v in ("1", "2", "3")
    )
    stranger = tmp_path / "fn" / "notes.txt"
    stranger.write_text("not a version")
    assert prune_versions(tmp_path, "fn", {v2, v3}) == [v1]
    assert sorted(p.name for p in (tmp_path / "fn").iterdir()) == sorted(
        [v2.name, v3.name, "notes.txt"]
    )
    assert prune_versions(tmp_path, "fn", {v2, v3}) == []
    assert prune_versions(tmp_path, "other", set()) == []


def test_prune_versions_matches_keep_paths_by_location_not_spelling(tmp_path: Path) -> None:
    v1 = install(tmp_path, HANDLER, code_format="source", version="1")
    spelled_differently = tmp_path / "fn" / ".." / "fn" / v1.name
    assert prune_versions(tmp_path, "fn", {spelled_differently}) == []
    assert v1.is_dir()


def test_remove_function_removes_everything(tmp_path: Path) -> None:
    install(tmp_path, HANDLER, code_format="source", version="1")
    install(tmp_path, HANDLER, code_format="source", version="2")
    install(tmp_path, HANDLER, code_format="source", function_id="other")
    assert remove_function(tmp_path, "fn") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    assert remove_function(tmp_path, "fn") is False
    with pytest.raises(DeploymentRejected, match="invalid function id"):
        remove_function(tmp_path, "..")


# -- make_zip_bundle --------------------------------------------------------------------------


def make_project(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_bytes(b"")
    (root / "pkg" / "sub" / "__init__.py").write_bytes(b"")
    (root / "pkg" / "sub" / "mod.py").write_bytes(HANDLER)
    (root / "handler.py").write_bytes(HANDLER)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00")
    (root / "stale.pyc").write_bytes(b"\x00")


def test_make_zip_bundle_is_deterministic(tmp_path: Path) -> None:
    make_project(tmp_path / "a")
    first = make_zip_bundle(tmp_path / "a")
    for path in (tmp_path / "a").rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (tmp_path / "a" / "handler.py").chmod(0o755)
    assert make_zip_bundle(tmp_path / "a") == first
    make_project(tmp_path / "b")  # created in another order, at another time
    assert make_zip_bundle(tmp_path / "b") == first
    assert sha256_hex(first) == sha256_hex(make_zip_bundle(tmp_path / "b"))


def test_make_zip_bundle_skips_caches_and_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_project(source)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not ship")
    (source / "linked.txt").symlink_to(secret)
    (source / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    with zipfile.ZipFile(io.BytesIO(make_zip_bundle(source))) as archive:
        names = archive.namelist()
        assert all(stat.S_IMODE(i.external_attr >> 16) == 0o644 for i in archive.infolist())
    assert names == [
        "handler.py",
        "pkg/__init__.py",
        "pkg/sub/__init__.py",
        "pkg/sub/mod.py",
    ]


def test_make_zip_bundle_round_trips_through_install(tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_project(source)
    path = install(tmp_path / "functions", make_zip_bundle(source), entrypoint="pkg.sub.mod:main")
    assert (path / "pkg" / "sub" / "mod.py").read_bytes() == HANDLER
    assert not list(path.rglob("*.pyc"))


def test_make_zip_bundle_refuses_names_install_would_reject(tmp_path: Path) -> None:
    (tmp_path / "a\\b.py").write_bytes(b"")
    with pytest.raises(ValueError, match="backslash"):
        make_zip_bundle(tmp_path)


# -- properties -------------------------------------------------------------------------------

NAME_PARTS = st.sampled_from(
    ["a", "b.py", "..", ".", "", "C:", "\\", "..\\x", "x\x00y", "/", "~", "__init__.py", "é"]
)
MEMBER_NAMES = st.one_of(
    st.lists(NAME_PARTS, min_size=1, max_size=6).map("/".join),
    st.text(min_size=1, max_size=40),
)
MODES = st.sampled_from(
    [0, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o644]
)


def _all_paths(root: Path) -> list[Path]:
    return [Path(d) / n for d, dirs, files in os.walk(root) for n in [*dirs, *files]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(st.tuples(MEMBER_NAMES, MODES), max_size=8))
def test_no_file_is_ever_written_outside_the_version_dir(names: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        functions = root / "functions"
        outside = root / "outside"
        outside.mkdir()
        raw = build_zip(
            ("handler.py", HANDLER), *[(member(name, mode), b"payload") for name, mode in names]
        )
        try:
            target: Path | None = install(functions, raw)
        except DeploymentRejected:
            target = None
        assert list(outside.iterdir()) == []
        allowed = {root / "outside", functions, functions / "fn"}
        for path in _all_paths(root):
            assert not path.is_symlink(), path
            if path not in allowed:
                assert target is not None and path.is_relative_to(target), path
        assert not [p for p in _all_paths(functions) if p.name.startswith(".")]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_zip_is_installed_or_rejected_never_crashes(data: st.DataObject) -> None:
    """Any corruption of a valid bundle ends in a DeploymentRejected or a clean install."""
    raw = bytearray(build_zip(("pkg/__init__.py", b""), ("handler.py", HANDLER * 20)))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as tmp:
        functions = Path(tmp)
        try:
            install(functions, bytes(raw))
        except DeploymentRejected:
            assert_clean(functions)
