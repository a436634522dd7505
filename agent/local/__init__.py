"""The seed's in-process API: ``EdgeRuntime``, ``EdgeSynchronizer``, ``EdgeCluster``.

Kept name for name (the public imports are re-exported from :mod:`agent`). It runs functions
through :mod:`agent.exec` on this machine; ``EdgeCluster.connect`` hands a fleet to
:mod:`agent.cloud`. It must never import :mod:`agent.edge`.
"""
