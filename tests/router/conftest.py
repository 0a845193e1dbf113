"""The upstream instance of the HTTP proxy tests (`tests.router.proxy_helpers`), served once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.router.proxy_helpers import UPSTREAM, serve


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve(UPSTREAM) as address:
        yield address
