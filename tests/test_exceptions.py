from __future__ import annotations

import pickle

import pytest

from cellnode.exceptions import (
    EXECUTION_ERROR_TYPE,
    APIError,
    CellExecutionError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
)


@pytest.mark.parametrize(
    ("error_class", "status", "code"),
    [
        (InvalidArgument, 400, 3),
        (Unauthenticated, 401, 16),
        (NotFound, 404, 5),
        (FailedPrecondition, 409, 9),
        (PayloadTooLarge, 413, 8),
        (InternalError, 500, 13),
        (DeadlineExceeded, 504, 4),
    ],
)
def test_status_round_trip(error_class: type[APIError], status: int, code: int) -> None:
    error = error_class("Node 'x' not here.")
    body = error.to_status()
    assert error.status_code == status
    assert body["code"] == code
    assert body["message"] == "Node 'x' not here."
    rebuilt = APIError.from_status(status, body)
    assert type(rebuilt) is error_class
    assert rebuilt.message == error.message


def test_cell_execution_error_carries_details() -> None:
    error = CellExecutionError.from_cell("ZeroDivisionError", "division by zero", ["line 1", "line 2"])
    body = error.to_status()
    assert body["details"][1] == {
        "@type": EXECUTION_ERROR_TYPE,
        "error_name": "ZeroDivisionError",
        "error_message": "division by zero",
        "traceback": ["line 1", "line 2"],
    }
    rebuilt = APIError.from_status(500, body)
    assert isinstance(rebuilt, CellExecutionError)
    assert rebuilt.error_name == "ZeroDivisionError"
    assert rebuilt.traceback == ["line 1", "line 2"]
    assert pickle.loads(pickle.dumps(rebuilt)).error_message == "division by zero"


def test_foreign_body_maps_by_status() -> None:
    assert type(APIError.from_status(404, {"detail": "nope"})) is NotFound
    assert type(APIError.from_status(418, "teapot")) is APIError
    assert isinstance(APIError.from_status(504, {"message": "slow"}), TimeoutError)
