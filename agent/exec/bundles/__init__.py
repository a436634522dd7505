"""Function code on disk: verify, safely unpack, atomically activate, prune; and packing a
directory into a bundle.

Owns everything under ``<functions_dir>``::

    <functions_dir>/<function_id>/<version>-<sha12>/     one installed version (immutable)
    <functions_dir>/<function_id>/.staging-<random>/     an install in progress
    <functions_dir>/<function_id>/.trash-<random>/       a version being removed
    <functions_dir>/.trash-<function_id>-<random>/       a function being removed

A version directory only ever appears by ``os.rename`` of a fully written and fsynced
staging directory, and only ever disappears by a rename to ``.trash-*`` before it is
deleted, so a crash can leave dot-named leftovers (removed by :func:`cleanup_staging`)
but never a half-written or half-deleted version under a real version name.

This module must never import or execute bundle code (the worker does that), never follow
a symlink or create one, never write outside ``<functions_dir>``, never call
``ZipFile.extractall``, and never touch the bundle bytes before their sha256 matched.

Errors: a bad bundle or spec value raises :class:`~agent.errors.DeploymentRejected` (the
caller reports it and keeps the old version). Local disk trouble (disk full, permissions)
is not the bundle's fault and propagates as :class:`OSError`.

The package, by concern (every public name is importable from here, as before the split):

    checks   plain values: ids, version, sha256, entrypoint, zip member names
    unpack   safe unpacking of a verified bundle into a staging directory
    install  install_bundle (verify, unpack, activate by rename), verify_installed
    layout   the directory layout, removal, pruning, leftovers, disk usage
    pack     make_zip_bundle (the cloud and operator side)
"""

from agent.exec.bundles.checks import resolves_outside_bundle, sha256_hex
from agent.exec.bundles.install import (
    CODE_FORMATS,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_FILES,
    expected_files,
    install_bundle,
    installed_files,
    verify_installed,
)
from agent.exec.bundles.layout import (
    STAGING_PREFIX,
    TRASH_PREFIX,
    cleanup_staging,
    disk_bytes,
    estimated_disk_bytes,
    installed_versions,
    prune_versions,
    remove_function,
    version_dir,
)
from agent.exec.bundles.pack import make_zip_bundle

__all__ = [
    "CODE_FORMATS",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_FILES",
    "STAGING_PREFIX",
    "TRASH_PREFIX",
    "cleanup_staging",
    "disk_bytes",
    "estimated_disk_bytes",
    "expected_files",
    "install_bundle",
    "installed_files",
    "installed_versions",
    "make_zip_bundle",
    "prune_versions",
    "remove_function",
    "resolves_outside_bundle",
    "sha256_hex",
    "verify_installed",
    "version_dir",
]
