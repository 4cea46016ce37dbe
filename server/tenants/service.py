"""A process's tenant policy: limits, rate limiter and usage meter on the store's database."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from adapters_store import Database, StoreUnavailable
from server.tenants.limits import LimitRegistry, Limits
from server.tenants.rate_limits import DbLedger, LocalLedger, RateLimiter
from server.tenants.usage import UsageMeter

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # how often a replica rewrites its in-flight counts and rereads the limits


@dataclass
class Tenants:
    limits: LimitRegistry
    limiter: RateLimiter
    usage: UsageMeter
    _ledger: DbLedger | None = None
    _stop: threading.Event | None = None

    @classmethod
    def open(cls, db: Database, default: Limits, base_model: str, replica: str) -> Tenants:
        """On a directory store (one server) rate limits count in memory; on a shared database
        they count there, so every replica applies the same limits."""
        limits = LimitRegistry(db, default)
        ledger = None if db.exclusive else DbLedger(db, replica)
        limiter = RateLimiter(limits, ledger or LocalLedger())
        return cls(limits, limiter, UsageMeter(db, base_model), ledger)

    def start(self) -> None:
        self.usage.start()
        if self._ledger is not None:
            self._stop = threading.Event()
            threading.Thread(target=self._beat, name="vera-rate-limits", daemon=True).start()

    def stop(self) -> None:
        """Flush the usage left (nothing is lost on a clean stop)."""
        if self._stop is not None:
            self._stop.set()
        self.usage.stop()

    def _beat(self) -> None:
        """Shared database: reread other replicas' limit changes and rewrite this replica's
        in-flight counts, off the request path (requests never wait for the database here)."""
        assert self._ledger is not None and self._stop is not None
        reachable = True
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.limits.refresh(force=True)
                self._ledger.heartbeat()
            except StoreUnavailable as e:  # said once per outage; the next beat tries again
                if reachable:
                    log.warning("tenants: %s; limits kept, in-flight counts rewritten later", e)
                reachable = False
                continue
            except Exception:
                log.exception("tenants: maintenance failed")
                continue
            if not reachable:
                log.info("tenants: the store is reachable again")
            reachable = True
