"""The one test harness, for ``tests/`` and ``scripts/`` alike (never shipped in the wheel).

Starts real brokers, agents and cloud helpers, waits with deadlines, and provides the fakes
(clock, MQTT client, spawner) that the in-process tests of the state machines use. Nothing
under ``agent/`` may import it.
"""
