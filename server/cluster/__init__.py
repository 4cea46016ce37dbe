"""``vera-serve cluster``: N engine replicas on Ray Serve behind one HTTP port.

Request path: client -> Ray Serve proxy -> ``gateway.Gateway`` (routing key, relay) ->
``replica.EngineReplica`` (``Runtime`` + the single server's FastAPI app, replayed in-process)
-> back as a stream. Replicas share one adapter store (and API-key registry), so any replica
can serve any user; ``routing.UserAffinityRouter`` keeps a user on a replica where its adapter
is warm unless that replica is busier than a power-of-two pick. ``stats_board.StatsBoard``
collects each replica's stats and metrics for ``/health``, ``/admin/stats`` and ``/metrics``.

Needs the ``cluster`` extra (``ray[serve]``). Only ``server/cli.py`` imports this package, and
at startup only ``config`` (which needs no Ray), so ``vera-serve serve`` runs without Ray.
"""
