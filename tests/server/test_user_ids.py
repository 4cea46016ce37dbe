"""User ids are validated once, at the edge (request bodies, path parameters, OpenAI model
names, fine-tuning suffixes); the stores behind the API trust them."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from adapters_store import InvalidUserId
from server.api import adapters, errors, fine_tuning
from server.api.auth import Principal, principal
from server.api.openai_routes import _user_for_model
from server.api.schemas import CreateUserRequest, GenerateRequest
from server.finetune.service import _job_user

BAD = ["../x", "", "a/b", "a\\b", "x" * 129, ".", "..", "a b", "ü", "a\x00b"]
# as a path segment: only what still routes to /users/{user_id}/... once the URL is parsed
BAD_SEGMENTS = ["x" * 129, "%2E%2E", "a%20b", "%C3%BC", "a%00b"]


@pytest.mark.parametrize("bad", BAD)
def test_request_bodies_refuse_bad_user_ids(bad: str) -> None:
    with pytest.raises(ValidationError, match="user_id"):
        GenerateRequest(user_id=bad, prompt="hi")
    with pytest.raises(ValidationError, match="user_id"):
        CreateUserRequest(user_id=bad)


@pytest.fixture
def client() -> TestClient:
    """The adapter and training routes, called as admin, with no runtime behind them: a
    request that got past validation would fail on it (500), not answer 422."""
    app = FastAPI()
    errors.install(app)
    app.include_router(adapters.router)
    app.include_router(fine_tuning.router)
    app.dependency_overrides[principal] = lambda: Principal("admin")
    app.state.runtime = None
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("segment", BAD_SEGMENTS)
def test_adapter_routes_refuse_bad_user_ids(client: TestClient, segment: str) -> None:
    octet = {"Content-Type": "application/octet-stream"}
    for method, path in [
        ("PUT", "adapter"),
        ("GET", "adapter"),
        ("DELETE", "adapter"),
        ("POST", "adapter/train"),
    ]:
        r = client.request(method, f"/users/{segment}/{path}", content=b"x", headers=octet)
        assert r.status_code == 422 and "user_id" in r.json()["error"]["message"], (method, r)
    assert client.get("/users/alice/adapter").status_code == 500  # a valid id gets through


class _Runtime:
    model_name = "base-model"


@pytest.mark.parametrize("bad", ["../x", "..", "a b", "x" * 129])
def test_model_names_and_fine_tuning_suffixes_refuse_bad_user_ids(bad: str) -> None:
    with pytest.raises(InvalidUserId):
        _user_for_model(_Runtime(), bad, Principal("admin"))  # type: ignore[arg-type]
    with pytest.raises(InvalidUserId):
        _job_user(None, bad)  # the admin names the user to train in the suffix
    assert _user_for_model(_Runtime(), "base", Principal("admin")) is None
    assert _job_user(None, "alice") == "alice"
