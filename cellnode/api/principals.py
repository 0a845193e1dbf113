"""Principals and their credentials: users, service accounts, API keys."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/cellnode/v1/iam", tags=["iam"])
