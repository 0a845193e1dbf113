from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def keep_main() -> Iterator[None]:
    """Put back the test process's `__main__` module, which `load()` replaces with the notebook's."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main
