"""What credentials look like; a light module, so that the SDK and CLI need not import the store."""

from __future__ import annotations

API_KEY_PREFIX = "cnk_"
IAM_TOKEN_PREFIX = "t1."


def authorization(token: str) -> str:
    """The Authorization header for an API key (`Api-Key`) or an IAM token (`Bearer`)."""
    return f"Api-Key {token}" if token.startswith(API_KEY_PREFIX) else f"Bearer {token}"
