from __future__ import annotations

import cellnode


def test_all_is_sorted_and_complete() -> None:
    assert cellnode.__all__ == sorted(cellnode.__all__)
    for name in cellnode.__all__:
        assert getattr(cellnode, name) is not None
