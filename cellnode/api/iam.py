"""IAM tokens: `cellnode iam create-token`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from cellnode.api.deps import CallerDep, ServicesDep
from cellnode.api.schemas import TokenOut
from cellnode.iam.credentials import mint_iam_token

router = APIRouter(prefix="/cellnode/v1/iam", tags=["iam"])


@router.post("/tokens", response_model=TokenOut)
async def create_token(svc: ServicesDep, caller: CallerDep) -> TokenOut:
    """A new IAM token for the caller, valid 12 hours; send it as `Authorization: Bearer <token>`."""
    token, expires_at = await asyncio.to_thread(mint_iam_token, svc.db, caller)
    return TokenOut(iam_token=token, expires_at=expires_at)
