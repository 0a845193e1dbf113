"""How a shadow's answer is compared with the primary's (`cellnode.api.shadows.compare`), branch by branch."""

from __future__ import annotations

import pytest

from cellnode.api.shadows import compare as _compare
from cellnode.exceptions import APIError, CellExecutionError, DeadlineExceeded, InternalError, OutputError, Unavailable


def raised(name: str) -> CellExecutionError:
    return CellExecutionError.from_cell(name, "message", ["Traceback ..."])


@pytest.mark.parametrize(
    ("primary", "primary_code", "shadow", "shadow_code", "result"),
    [
        (b'{"y":1}', 200, b'{"y":1}', 200, "agree"),
        (b'{"y":1,"z":2}', 200, b'{"z":2, "y":1}', 200, "agree"),  # the same JSON value, other bytes
        (b'{"y":1}', 200, b'{"y":1.5}', 200, "differ"),
        (raised("ValueError"), 500, raised("ValueError"), 500, "agree"),
        (raised("ValueError"), 500, raised("KeyError"), 500, "differ"),
        (b'{"y":1}', 200, raised("ValueError"), 500, "differ"),
        (raised("ValueError"), 500, b'{"y":1}', 200, "differ"),
        (b'{"y":1}', 200, Unavailable("no instance"), 503, "error"),
        (b'{"y":1}', 200, DeadlineExceeded("too slow"), 504, "error"),
        (None, 503, b'{"y":1}', 200, "error"),
        (Unavailable("gone"), 503, b'{"y":1}', 200, "error"),
        (InternalError("x"), 500, InternalError("y"), 500, "agree"),
        (raised("ValueError"), 500, OutputError("not JSON"), 500, "differ"),
        (InternalError("x"), 500, OutputError("not JSON"), 500, "differ"),
    ],
)
def test_compare(
    primary: bytes | APIError | None, primary_code: int, shadow: bytes | APIError, shadow_code: int, result: str
) -> None:
    assert _compare(primary, primary_code, shadow, shadow_code)[0] == result
