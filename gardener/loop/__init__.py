"""The worker loop (``gardener run``): tick, apply, reconcile, pause, leadership, HTTP.

``daemon.serve`` runs it all in one anyio task group; see docs/loop.md.
"""
