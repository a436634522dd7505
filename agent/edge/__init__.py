"""The gateway daemon (``edge-agent``): the event loop and everything it composes.

Owns the loop (:mod:`agent.edge.loop`), admission of invocations, deployments (prepare off the
loop, reconcile on it), state sync, the outbox pump, systemd integration and the command line.
It uses :mod:`agent.contract`, :mod:`agent.exec`, :mod:`agent.store` and :mod:`agent.mqtt`;
nothing outside ``edge`` imports it (the cloud and the local API must never depend on the
daemon).
"""
