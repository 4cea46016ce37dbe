"""``AdapterStore``: validated, versioned, persistent per-user VeRA vectors.

The store owns the contract with vera_core (validation, the on-disk format of
``vera_core.adapter_file``, checksums); a backend (``adapters_store.backend``) only keeps bytes
and the index. Every stored file was checked with ``check_values`` and ``check_fits`` before a
single byte was written, and every read is verified against the recorded sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from adapters_store.backend import DEFAULT_RETAIN_S, AdapterBackend, open_backend
from adapters_store.errors import AdapterNotFound, StoreCorruptError
from adapters_store.meta import AdapterMeta
from adapters_store.recovery import RecoveryReport
from vera_core.adapter import Adapter
from vera_core.adapter_file import adapter_from_bytes, adapter_to_bytes, load_tensors, split_vectors
from vera_core.layout import Layout

_READ_RETRIES = 3  # a version collected between meta lookup and read: look up again


class AdapterStore:
    """Per-user adapters for one server configuration (layout, projection key, base model).

    Thread-safe. ``put`` returns a new version (1, 2, ... per user, never reused even after
    ``delete``); older versions stay readable via ``load_flat(user, version)`` for the backend's
    retention period, so a running request keeps the version it started with. User ids were
    validated at the edge (the API); the store trusts them.
    """

    def __init__(
        self,
        backend: AdapterBackend | Path | str,
        layout: Layout,
        projection_prng_key: int,
        fingerprint: str,
        *,
        retain_s: float = DEFAULT_RETAIN_S,
        verify_on_open: bool = True,
    ) -> None:
        """Open the store on ``backend`` (a location, a directory or a database URL, means
        ``open_backend(location, retain_s)``; ``retain_s`` applies only then) and run crash
        recovery.

        ``verify_on_open`` checks the sha256 of every current blob during recovery (sizes are
        always checked). ``close`` closes the backend too.
        """
        if not isinstance(backend, AdapterBackend):
            backend = open_backend(backend, retain_s)
        self.layout = layout
        self.projection_prng_key = projection_prng_key
        self.fingerprint = fingerprint
        self.backend = backend
        self.recovery: RecoveryReport = self.backend.recover(self._validate_blob, verify_on_open)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, adapter: Adapter) -> None:
        """Raise AdapterValueError / AdapterMismatchError if ``adapter`` cannot serve here."""
        adapter.check_values()
        adapter.check_fits(self.layout, self.projection_prng_key, self.fingerprint)

    def put(self, user_id: str, adapter: Adapter) -> AdapterMeta:
        """Validate, then atomically store ``adapter`` as the user's new current version.

        Raises AdapterValueError or AdapterMismatchError before anything is written. The file
        is stamped with this server's base-model fingerprint.
        """
        self.check(adapter)
        header = replace(adapter.header, base_fingerprint=self.fingerprint)
        data = adapter_to_bytes(Adapter(header, adapter.vectors))
        sha = hashlib.sha256(data).hexdigest()
        return self.backend.publish(user_id, data, sha, adapter.num_params, self.fingerprint)

    def meta(self, user_id: str) -> AdapterMeta:
        """The current version's metadata; AdapterNotFound if the user has none."""
        meta = self.backend.meta(user_id)
        if meta is None:
            raise AdapterNotFound(f"no adapter stored for user {user_id!r}")
        return meta

    def delete(self, user_id: str) -> bool:
        """Retire the user's adapter (readable by version until collected); False if absent."""
        return self.backend.remove(user_id)

    def list(self) -> list[AdapterMeta]:
        """Current metadata of every user, sorted by user id."""
        return self.backend.list()

    def totals(self) -> tuple[int, int]:
        """(users with an adapter, bytes of their current versions), without listing them."""
        return self.backend.totals()

    def load_flat(self, user_id: str, version: int | None = None) -> torch.Tensor:
        """[num_params] float32 in ``layout`` order (the VeraBank row) of that version.

        ``version=None`` is the current one. AdapterNotFound if the version is unknown or was
        collected; StoreCorruptError if its bytes fail the checksum. The bytes were validated
        on ``put`` and match their checksum, so only the tensors are parsed here (fast path).
        """
        _, data = self._read(user_id, version)
        vectors = split_vectors(load_tensors(data))
        try:
            parts = [t for s in self.layout.layers for t in vectors[s.name]]
            return torch.cat([t.reshape(-1) for t in parts]).to(torch.float32)
        except KeyError as e:
            raise StoreCorruptError(f"{user_id!r}: stored adapter lacks layer {e}") from None

    def _read(self, user_id: str, version: int | None) -> tuple[AdapterMeta, bytes]:
        for _ in range(_READ_RETRIES):
            meta = self.backend.meta(user_id, version)
            if meta is None:
                break
            try:
                data = self.backend.read(meta)
            except FileNotFoundError:
                continue  # collected meanwhile; the index no longer names it either
            if hashlib.sha256(data).hexdigest() != meta.sha256:
                raise StoreCorruptError(
                    f"adapter {user_id!r} v{meta.version} fails its sha256 check: stored bytes "
                    "are damaged; re-upload it"
                )
            return meta, data
        which = "any version" if version is None else f"version {version}"
        raise AdapterNotFound(f"no adapter stored for user {user_id!r} ({which})")

    def _validate_blob(self, data: bytes) -> tuple[int, str]:
        """Recovery's check of an unindexed file: parses, values sane, fits this server."""
        adapter = adapter_from_bytes(data)
        self.check(adapter)
        return adapter.num_params, adapter.header.base_fingerprint or self.fingerprint
