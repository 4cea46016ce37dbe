"""Connections to a PostgreSQL store: one small pool, failures mapped to ``StoreUnavailable``.

Guarantees of ``run`` (every call of ``PostgresDatabase`` goes through it):

* It gives up within about ``POOL_TIMEOUT_S`` (plus one ``CONNECT_TIMEOUT_S`` when a retry has
  to connect) when the database is down, raising ``StoreUnavailable``; it never hangs on a dead
  server (TCP keepalives and ``tcp_user_timeout`` bound a silent network too).
* After the database restarts, pooled connections are dead: a call that fails on one has the
  pool check its idle connections and runs once more on a fresh one, so the first request after
  a restart succeeds and nobody restarts the process.
* A write (``write=True``, one explicit transaction) is retried only if it failed before COMMIT
  was sent, when nothing can have committed; a failure during COMMIT raises ``StoreUnavailable``
  (the write may or may not have happened: the caller reports it, never repeats it blindly).
* ``durable=False`` commits with ``synchronous_commit = off``: the commit may be lost if the
  database server crashes, but only together with every later commit (WAL order).
* Messages name the database without its password (``describe``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from adapters_store.errors import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
POOL_TIMEOUT_S = 2.0  # longest wait for a pooled connection
CONNECT_TIMEOUT_S = 2  # libpq's minimum effective value
POOL_MIN, POOL_MAX = 1, 8
# libpq parameters used unless the DSN sets them itself
_DEFAULTS = {
    "connect_timeout": str(CONNECT_TIMEOUT_S),
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",  # ms: sent data unacknowledged this long -> connection dead
    "application_name": "vera-serve",
}
# SQLSTATEs meaning "the connection or server went away" (worth a retry on a fresh connection)
_GONE = ("08", "57P01", "57P02", "57P03")
# ... or "the server cannot serve now" (53: disk full, out of memory, too many connections)
_UNAVAILABLE = (*_GONE, "53")


def describe(dsn: str) -> str:
    """``postgresql://user@host:port/dbname`` of ``dsn``: no password, no other options."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable DSN)"
    user = f"{quote(str(p['user']))}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"postgresql://{user}{p.get('host') or 'localhost'}{port}/{p.get('dbname') or ''}"


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """Our libpq defaults for the parameters ``dsn`` leaves unset."""
    given = conninfo_to_dict(dsn)
    return {k: v for k, v in _DEFAULTS.items() if k not in given}


def is_gone(error: psycopg.Error) -> bool:
    """True when ``error`` means the connection or the server is gone (worth a retry)."""
    return error.sqlstate is None or error.sqlstate.startswith(_GONE)


def is_unavailable(error: psycopg.Error) -> bool:
    """True when ``error`` is the database's state, not the statement's fault."""
    return error.sqlstate is None or error.sqlstate.startswith(_UNAVAILABLE)


def unavailable(dsn: str, error: BaseException) -> StoreUnavailable:
    """The StoreUnavailable for ``error``: which database (no password) and a one-line cause."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    password = conninfo_to_dict(dsn).get("password")
    if password:
        reason = reason.replace(str(password), "***")
    return StoreUnavailable(f"the store database {describe(dsn)} is unreachable: {reason}")


def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection:
    """One connection outside the pool (the change feed); StoreUnavailable if down."""
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **connect_kwargs(dsn))
    except psycopg.OperationalError as e:
        raise unavailable(dsn, e) from None


def open_pool(dsn: str) -> ConnectionPool:
    """Open the pool once a first connection succeeded (its error, if any, is the precise one).

    The pool holds autocommit connections: a read is one round trip, a write opens its own
    transaction. Raises StoreUnavailable if the database cannot be reached.
    """
    connect(dsn).close()
    pool = ConnectionPool(
        dsn,
        kwargs={"autocommit": True, **connect_kwargs(dsn)},
        min_size=POOL_MIN,
        max_size=POOL_MAX,
        timeout=POOL_TIMEOUT_S,
        reconnect_timeout=POOL_TIMEOUT_S,  # give up soon; the next request starts a fresh try
        name=describe(dsn),
        open=False,
    )
    try:
        pool.open(wait=True, timeout=POOL_TIMEOUT_S + CONNECT_TIMEOUT_S)
    except PoolTimeout as e:
        pool.close()
        raise unavailable(dsn, e) from None
    return pool


def run(
    pool: ConnectionPool,
    fn: Callable[[psycopg.Connection], T],
    *,
    write: bool = False,
    durable: bool = True,
) -> T:
    """``fn(conn)`` on a pooled connection (``write``: inside one transaction), retried once if
    the connection turned out dead and nothing can have committed; see the module docstring."""
    for attempt in (1, 2):
        committing = False
        try:
            with pool.connection() as conn:
                if not write:
                    return fn(conn)
                with conn.transaction():
                    if not durable:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    result = fn(conn)
                    committing = True  # the block's exit sends COMMIT
                return result
        except PoolTimeout as e:  # the pool already waited for a connection: no retry
            raise unavailable(str(pool.conninfo), e) from None
        except psycopg.OperationalError as e:
            if not is_unavailable(e):
                raise
            if attempt == 2 or committing or not is_gone(e):
                raise unavailable(str(pool.conninfo), e) from None
            log.info("store database connection lost (%s); retrying once", e.sqlstate)
            pool.check()  # drop the other dead idle connections before the retry
    raise AssertionError("unreachable")
