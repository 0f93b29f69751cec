"""Request dependencies: the API context and the authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tidepool_api.auth import Principal
from tidepool_api.context import ApiContext


def get_context(request: Request) -> ApiContext:
    return request.app.state.context


async def get_principal(request: Request) -> Principal:
    context: ApiContext = request.app.state.context
    return await context.authenticator.authenticate(request)


Context = Annotated[ApiContext, Depends(get_context)]
Caller = Annotated[Principal, Depends(get_principal)]
