"""The wire contract: every name, topic and message that crosses MQTT, and nothing else.

Pure: stdlib only, no I/O, no threads, no sockets, no SQLite. Every other package may import
it; it imports only :mod:`agent.errors` and :mod:`agent.models`. The worker never needs it.
"""
