"""The upstream instance of the HTTP proxy tests (`tests.router.proxy_helpers`), served once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import serve_asgi
from tests.router.proxy_helpers import UPSTREAM


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_asgi(UPSTREAM) as address:
        yield address
