"""The wire contract: every name, topic and message that crosses MQTT, and nothing else.

::

    protocol.py    the one namespace callers use (``protocol.X``): re-exports only
    ids.py         the rule table for ids, versions, request ids, topic prefixes
    topics.py      Topics, FleetTopics, where a reply may go
    fields.py      JSON plumbing the messages share (typed field reads, ts)
    spec.py        function specs: encode / decode / validate, code bytes, fingerprint
    invoke.py      invocation requests and replies
    telemetry.py   status, heartbeat, function state, roll call
    sync.py        sync delta / snapshot / desired / request, compute_delta / apply_delta
    indexes.py     the retained spec indexes and the node catalog
    specindex.py   IndexFollower: indexes to exact spec subscriptions (agent side)
    statecheck.py  the optimistic check on handler write sets
    fence.py       ReplayFence: has the broker replayed everything retained?

Pure: stdlib only, no I/O, no threads, no sockets, no SQLite. Every other package may import
it; it imports only :mod:`agent.errors` and :mod:`agent.models` (tests/test_protocol.py
checks every module). The worker never needs it.
"""
