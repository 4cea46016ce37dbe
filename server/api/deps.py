"""What a route may depend on besides its body: the process's ``Runtime``, typed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    """The runtime ``create_app`` was given."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
