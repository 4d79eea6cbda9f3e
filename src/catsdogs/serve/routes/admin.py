"""``/admin/*``: mounted only when an admin token is configured."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from catsdogs.serve.schemas import ErrorBody, ReloadOut
from catsdogs.serve.security import require_admin
from catsdogs.serve.service import ServiceDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post(
    "/reload",
    response_model=ReloadOut,
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
    summary="Check the registry now and swap in the model the alias points at",
)
async def reload(service: ServiceDep, force: bool = False) -> ReloadOut:
    # Loading runs off the event loop: requests keep being answered by the current model meanwhile.
    result = await asyncio.to_thread(service.store.reload, force=force)
    return ReloadOut(
        reloaded=result.reloaded, version=result.version, previous=result.previous, detail=result.detail
    )
