"""Sharing one server between tenants (users): per-user limits and tiers (``limits``), request
and token rate limits (``rate_limits``), usage metering (``usage``), put together for a process
by ``service.Tenants``. Who runs next on the engine is its fair scheduler's business
(``server/engine/fair_queue.py``), which reads each user's weight from ``limits``."""

from server.tenants.limits import LimitRegistry, Limits
from server.tenants.rate_limits import Permit, RateLimited, RateLimiter
from server.tenants.service import Tenants
from server.tenants.usage import UsageMeter

__all__ = [
    "LimitRegistry",
    "Limits",
    "Permit",
    "RateLimited",
    "RateLimiter",
    "Tenants",
    "UsageMeter",
]
