"""Which replica serves a request: a routing key from the request, then a Ray Serve request
router that prefers a replica already warm for that key without letting one key pin a replica.

The key travels as Ray Serve's ``multiplexed_model_id``; each replica advertises the keys it
served recently (``@serve.multiplexed`` in ``replica.py``), and ``RunningReplica``
carries that set to the router.

Why not Ray's default multiplexed routing: its ``PowerOfTwoChoicesRequestRouter`` sends a
key to the replicas advertising it for as long as one of them accepts, i.e. until one holds
``max_ongoing_requests`` requests (here the engine's whole queue). A hot user then lands on
one replica while the others idle. ``UserAffinityRouter`` bounds that: the warm replica wins
only while its queue is within ``slack`` of the less loaded of two random replicas (power of
two choices, which is what every request without a key gets).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from server.cluster.forwarding import HttpRequest

_USER_PATH = re.compile(r"^/users/([^/]+)/")
_BASE = "base"  # the OpenAI routes' alias for the base model


def routing_key(request: HttpRequest) -> str:
    """The user a request is for, or a stand-in; "" when nothing identifies one.

    ``/users/{id}/...`` -> id; ``POST /generate`` -> the body's ``user_id``; ``/v1/*`` -> the
    body's ``model`` (a user id); otherwise a digest of the bearer key (never the key).
    """
    match = _USER_PATH.match(request.path)
    if match:
        return match.group(1)
    if request.method == "POST" and request.path in (
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
    ):
        field = "user_id" if request.path == "/generate" else "model"
        value = _json_field(request.body, field)
        if value and value != _BASE:
            return value
    auth = request.header(b"authorization") or b""
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        # ':' cannot occur in a user id, so a key digest never collides with a user.
        return "key:" + hashlib.sha256(token.strip()).hexdigest()[:16]
    return ""


def _json_field(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None  # not a JSON object: the replica answers it with its 4xx
    return value if isinstance(value, str) else None


def rank_replicas(
    candidates: list[RunningReplica], key: str, load: Callable[[RunningReplica], int], slack: int
) -> list[list[RunningReplica]]:
    """Replicas to try, one per rank, best first: the least loaded replica warm for ``key``
    (one advertising it) if its load is within ``slack`` of the lighter of two random replicas;
    then those two, lighter first (power of two choices)."""
    if not candidates:
        return []
    pair = sorted(random.sample(candidates, min(2, len(candidates))), key=load)
    warm = [r for r in candidates if key and key in r.multiplexed_model_ids]
    order = pair
    if warm:
        best = min(warm, key=load)
        if load(best) <= load(pair[0]) + slack:
            order = [best, *(r for r in pair if r is not best)]
    return [[r] for r in order]


class PlacementLedger:
    """Requests this router placed and that have not finished, per replica.

    Ray's queue-length cache learns of a placement only after the request is sent, so a
    burst routed in one turn of the event loop would all see the same stale loads and pile on
    one replica. The ledger counts a request from the moment it is ranked: ``place`` (the first
    rank), ``confirm`` (the replica that accepted it), ``done``. A placement never confirmed
    (the request was cancelled while routing) stops counting after ``ttl_s``.
    """

    def __init__(self, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._placed: dict[str, tuple[object, bool, float]] = {}  # id -> replica, confirmed, t

    def place(self, request_id: str, replica_id: object) -> None:
        self._placed[request_id] = (replica_id, False, self.clock())

    def confirm(self, request_id: str, replica_id: object) -> None:
        self._placed[request_id] = (replica_id, True, self.clock())

    def done(self, request_id: str, replica_id: object) -> None:
        # A rejected try also ends here; a retry may already have placed the request elsewhere.
        entry = self._placed.get(request_id)
        if entry is not None and entry[0] == replica_id:
            del self._placed[request_id]

    def count(self, replica_id: object) -> int:
        stale = self.clock() - self.ttl_s
        for rid in [k for k, (_, ok, t) in self._placed.items() if not ok and t < stale]:
            del self._placed[rid]
        return sum(1 for r, _, _ in self._placed.values() if r == replica_id)


class UserAffinityRouter(FIFOMixin, RequestRouter):
    """``rank_replicas`` with the loads this router knows: the larger of Ray's queue-length
    cache and its own ``PlacementLedger``."""

    def initialize_state(self, **kwargs: Any) -> None:
        """``request_router_kwargs``: ``slack`` (see ``ClusterConfig.affinity_slack``)."""
        self.slack = int(kwargs.get("slack", 4))
        self.ledger = PlacementLedger()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = ""
        if pending_request is not None:
            key = pending_request.metadata.multiplexed_model_id
            # The ranks are a full answer: if none accepts, back off before asking again.
            pending_request.routing_context.should_backoff = True
        ranks = rank_replicas(candidate_replicas, key, self._load, self.slack)
        if ranks and pending_request is not None:
            self.ledger.place(pending_request.metadata.internal_request_id, ranks[0][0].replica_id)
        return ranks

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        self.ledger.confirm(pending_request.metadata.internal_request_id, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.ledger.done(internal_request_id, replica_id)

    def _load(self, replica: RunningReplica) -> int:
        """Requests in flight on ``replica`` as far as this router knows."""
        cached = self.replica_queue_len_cache.get(replica.replica_id) or 0
        return max(cached, self.ledger.count(replica.replica_id))
