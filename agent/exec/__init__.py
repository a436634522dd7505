"""Running function code: the pipe, the worker (the child), one worker process, the pool.

The only package that spawns, signals and reaps processes. It must never touch MQTT, the store
or the config file: the edge daemon and the local runtime both drive it with plain values.
``agent.exec.worker`` runs in a fresh interpreter per function, so this ``__init__`` imports
nothing.
"""
