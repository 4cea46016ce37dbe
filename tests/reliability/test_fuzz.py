"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) against a live tiny server:
no 5xx, no crash, every status code, content type and body as the schema declares."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from kit import start_tiny
from live import LiveServer
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

# Schema-level properties only: "valid by the schema" is not "valid by the server" (a request
# for an unknown user's adapter is well-formed and rightly answered 404).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = int(os.environ.get("VERA_FUZZ_EXAMPLES", "200"))


def _server(tmp: Path, tiny_dir: Path, admin_token: str | None) -> LiveServer:
    # a short context keeps generation cheap; small body limit so fuzzed bodies can hit 413
    return start_tiny(
        tmp, tiny_dir, "--max-seq-len", "48", "--max-body-mb", "1", admin_token=admin_token
    )


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory, tiny_dir: Path) -> Iterator[LiveServer]:
    server = _server(tmp_path_factory.mktemp("fuzz-dev"), tiny_dir, None)
    yield server
    server.stop()
    assert "Traceback" not in server.log_text()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tiny_dir: Path) -> Iterator[LiveServer]:
    server = _server(tmp_path_factory.mktemp("fuzz-auth"), tiny_dir, "fuzz-admin-token")
    yield server
    server.stop()
    assert "Traceback" not in server.log_text()


@pytest.fixture(scope="module")
def dev_schema(dev_server: LiveServer):
    return schemathesis.openapi.from_url(f"{dev_server.url}/openapi.json")


@pytest.fixture(scope="module")
def auth_schema(auth_server: LiveServer):
    return schemathesis.openapi.from_url(f"{auth_server.url}/openapi.json")


def _fuzz(schema, mode: GenerationMode, examples: int, headers: dict | None = None) -> dict:
    """Run ``examples`` generated cases per operation; return {operation: cases sent}."""
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        sent[operation.label] = 0

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            if headers:
                case.headers = {**(case.headers or {}), **headers}
            case.call_and_validate(checks=CHECKS, timeout=60)
            sent[case.operation.label] += 1

        try:
            run()
        except Unsatisfiable:  # no parameters or body to make invalid (GET /health)
            assert mode is GenerationMode.NEGATIVE, operation.label
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_dev_mode(dev_schema, dev_server: LiveServer, mode: GenerationMode) -> None:
    """Dev mode: every request is authorized, so the handlers themselves are fuzzed."""
    sent = _fuzz(dev_schema, mode, EXAMPLES)
    assert len(sent) >= 11, sent
    print(f"fuzz {mode.value}: {sum(sent.values())} cases over {len(sent)} operations: {sent}")
    with dev_server.client() as c:  # still serving afterwards
        assert c.get("/health").status_code == 200


def test_fuzz_with_auth_bogus_key(auth_schema, auth_server: LiveServer) -> None:
    """Auth on with an unknown key: 401 everywhere but the open routes, as declared."""
    bogus = {"Authorization": "Bearer not-a-real-key"}
    sent = _fuzz(auth_schema, GenerationMode.POSITIVE, 20, bogus)
    print(f"fuzz auth: {sum(sent.values())} cases over {len(sent)} operations")
    with auth_server.client("not-a-real-key") as c:
        r = c.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
