"""How an error becomes a gRPC status's details, and how a peer string becomes a client address."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2

from cellnode.exceptions import CellExecutionError, CellFailedError, InvalidArgument, TooManyRequests
from cellnode.grpc import protos
from cellnode.grpc.rpc import client_of, status_of


def test_a_cell_error_carries_error_info_and_its_execution_details() -> None:
    status = status_of(CellExecutionError.from_cell("KeyError", "'k'", ["Traceback", "KeyError: 'k'"]))
    assert status.code == 2 and status.message == "The cell raised KeyError: 'k'"
    info, execution = error_details_pb2.ErrorInfo(), protos.NodeExecutionErrorDetails()
    assert status.details[0].Unpack(info) and (info.reason, info.domain) == ("CELL_EXECUTION_ERROR", "cellnode")
    assert status.details[1].Unpack(execution)
    assert (execution.error_name, execution.error_message) == ("KeyError", "'k'")
    assert list(execution.traceback) == ["Traceback", "KeyError: 'k'"]
    assert len(status.details) == 2


def test_a_full_queue_says_when_to_retry() -> None:
    status = status_of(TooManyRequests("busy", retry_after=3))
    retry = error_details_pb2.RetryInfo()
    assert status.code == 8 and status.details[1].Unpack(retry) and retry.retry_delay.seconds == 3


def test_details_of_the_rest_body_only_are_left_out() -> None:
    error = CellFailedError("cell 2 raised", details=[{"@type": "type.googleapis.com/cellnode.CaptureFailure"}])
    status = status_of(error)
    assert [d.type_url for d in status.details] == ["type.googleapis.com/google.rpc.ErrorInfo"]
    assert status_of(InvalidArgument("bad")).code == 3


@pytest.mark.parametrize(
    ("peer", "client"),
    [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("unix:/tmp/s", ""), ("", ""), (None, "")],
)
def test_client_of(peer: str | None, client: str) -> None:
    assert client_of(peer) == client
