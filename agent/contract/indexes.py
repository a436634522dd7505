"""The retained spec indexes: which function ids (and versions) a scope's specs list.

Owns the JSON of ``<p>/fleet/index`` and ``<p>/nodes/<node>/index`` (function id ->
version) and of the controllers' node catalog ``<p>/fleet/node-index`` (node id -> its
index), with the limits that keep a hostile retained index cheap to follow. What an agent
does with an index is :mod:`agent.contract.specindex`'s.

Must never: do I/O, or import anything beyond the stdlib, ``agent.errors`` and
``agent.contract``'s pure modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from agent.contract.fields import ErrorType, Fields, dumps, load_object, now_ts
from agent.contract.ids import ID_RE, VERSION_RE, is_valid_id
from agent.errors import BadRequest

#: Most function ids one spec index may list, and most bytes of an index message: an agent
#: subscribes to one exact topic per id, so a hostile retained index must stay cheap to
#: follow (90,000 listed ids once blocked an agent's loop for a minute).
MAX_INDEX_FUNCTIONS: Final = 1000
MAX_INDEX_BYTES: Final = 128 * 1024


def encode_spec_index(functions: Mapping[str, str]) -> bytes:
    """A retained spec index: ``{"functions": {fid: version}, "ts"}`` (sorted by id)."""
    msg: dict[str, Any] = {"functions": dict(sorted(functions.items())), "ts": now_ts()}
    _check_spec_index(msg, ValueError)
    return dumps(msg)


def decode_spec_index(payload: bytes) -> dict[str, str]:
    """The ``functions`` of a spec index (fid -> version); empty for a cleared topic."""
    if not payload:
        return {}
    if len(payload) > MAX_INDEX_BYTES:
        raise BadRequest(
            f"spec index: {len(payload)} bytes, over the {MAX_INDEX_BYTES} an index may have"
        )
    msg = load_object(payload, "spec index", BadRequest)
    _check_spec_index(msg, BadRequest)
    return dict(msg["functions"])


def _check_spec_index(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "spec index", err)
    functions = f.obj("functions")
    if len(functions) > MAX_INDEX_FUNCTIONS:
        raise err(
            f"spec index: {len(functions)} functions, over the {MAX_INDEX_FUNCTIONS} an index "
            "may list"
        )
    _check_functions(f, "functions", functions)
    f.ts()


def _check_functions(f: Fields, key: str, functions: Mapping[str, Any]) -> None:
    """``{fid: version}``: valid function ids and versions."""
    g = f.child(key, functions)
    for fid in functions:
        if not is_valid_id(fid):
            g.bad(fid, f"a function id matching {ID_RE.pattern}", fid)
        g.text(fid, f"a version matching {VERSION_RE.pattern}", VERSION_RE)


def encode_node_catalog(nodes: Mapping[str, Mapping[str, str]]) -> bytes:
    """The controllers' catalog of per-node specs: ``{"nodes": {node: {fid: version}}, "ts"}``."""
    msg: dict[str, Any] = {
        "nodes": {n: dict(sorted(fns.items())) for n, fns in sorted(nodes.items()) if fns},
        "ts": now_ts(),
    }
    _check_node_catalog(msg, ValueError)
    return dumps(msg)


def decode_node_catalog(payload: bytes) -> dict[str, dict[str, str]]:
    """node id -> (fid -> version) of a node catalog; empty for a cleared topic."""
    if not payload:
        return {}
    msg = load_object(payload, "node index", BadRequest)
    _check_node_catalog(msg, BadRequest)
    return {n: dict(fns) for n, fns in msg["nodes"].items()}


def _check_node_catalog(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "node index", err)
    nodes = f.obj("nodes")
    g = f.child("nodes", nodes)
    for node_id in nodes:
        if not is_valid_id(node_id):
            g.bad(node_id, f"a node id matching {ID_RE.pattern}", node_id)
        _check_functions(g, node_id, g.obj(node_id))
    f.ts()
