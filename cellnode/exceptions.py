"""The one exception hierarchy of cellnode.

```
CellnodeError
 ├ ConfigError                  # a bad or missing setting; names the key and the environment variable
 ├ TransportError               # the SDK could not reach the server (wraps httpx)
 ├ CorruptBlobError             # a checkpoint blob does not match its sha256
 ├ ResponseAborted              # a proxied instance failed after its response had started
 ├ TypedServiceError(ValueError)  # a node's variables cannot be typed gRPC fields (it still serves by NodeService)
 └ APIError(message, details)   # an error the API returns; rebuilt by the SDK from the JSON body
    ├ InvalidArgument           # 400  INVALID_ARGUMENT
    │  └ CellFailedError        # 400  a notebook cell raised while a checkpoint was captured
    ├ Unauthenticated           # 401  UNAUTHENTICATED
    ├ PermissionDenied          # 403  PERMISSION_DENIED
    ├ NotFound(LookupError)     # 404  NOT_FOUND
    ├ MethodNotAllowed          # 405  UNIMPLEMENTED
    ├ AlreadyExists             # 409  ALREADY_EXISTS
    ├ FailedPrecondition        # 409  FAILED_PRECONDITION (the resource is in use)
    ├ PayloadTooLarge           # 413  RESOURCE_EXHAUSTED
    ├ TooManyRequests           # 429  RESOURCE_EXHAUSTED (the node's queue is full; Retry-After says when to retry)
    │ └ TooManyFailures         # 429  too many failed authentications from one client address
    ├ CellExecutionError        # 500  the deployed cell raised; carries NodeExecutionErrorDetails
    ├ OutputError               # 500  an output variable is missing or of the wrong type
    ├ InternalError             # 500  INTERNAL
    ├ Unavailable               # 503  UNAVAILABLE (no ready instance)
    └ DeadlineExceeded(TimeoutError)  # 504  DEADLINE_EXCEEDED
```

Every API error renders as a `google.rpc.Status` body: `{"code": <gRPC code>, "message": ..., "details": [...]}`.
The first details entry of our own errors is a `google.rpc.ErrorInfo` whose `reason` names the class, so that the
SDK raises the same class the server raised.
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
EXECUTION_ERROR_TYPE = "type.googleapis.com/yandex.cloud.datasphere.v1.NodeExecutionErrorDetails"
ERROR_DOMAIN = "cellnode"


class CellnodeError(Exception):
    """Base class of every error cellnode raises on purpose."""


class ConfigError(CellnodeError):
    """A setting is missing or has a value that cannot be used."""


class TransportError(CellnodeError):
    """The SDK could not talk to the server (connection refused, timed out, broken)."""


class TypedServiceError(CellnodeError, ValueError):
    """A node's variables cannot be fields of a typed gRPC service; the node still serves through NodeService."""


class ResponseAborted(CellnodeError):
    """The instance failed after its response had started: the front can only drop the client's connection.

    `status_code` is the status the client was already sent.
    """

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class CorruptBlobError(CellnodeError):
    """A checkpoint blob on disk does not match the sha256 it was stored under."""


class APIError(CellnodeError):
    """An error with an HTTP status, a gRPC code and a `google.rpc.Status` body."""

    status_code: ClassVar[int] = 500
    grpc_code: ClassVar[int] = 13
    reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def to_status(self) -> dict[str, Any]:
        """The `google.rpc.Status` body of this error."""
        info = {"@type": ERROR_INFO_TYPE, "reason": self.reason, "domain": ERROR_DOMAIN}
        return {"code": self.grpc_code, "message": self.message, "details": [info, *self.details]}

    @classmethod
    def from_status(cls, status_code: int, body: Any) -> APIError:
        """Rebuild the most specific error class from a response body; the SDK's half of `to_status`."""
        if not isinstance(body, dict) or not isinstance(body.get("message"), str):
            return _BY_STATUS.get(status_code, APIError)(f"HTTP {status_code}: {body!r}")
        details = [d for d in body.get("details") or [] if isinstance(d, dict)]
        reason = next((d.get("reason") for d in details if d.get("@type") == ERROR_INFO_TYPE), None)
        error_class = _BY_REASON.get(str(reason)) or _BY_STATUS.get(status_code, APIError)
        rest = [d for d in details if d.get("@type") != ERROR_INFO_TYPE]
        return error_class._rebuild(body["message"], rest)

    @classmethod
    def _rebuild(cls, message: str, details: list[dict[str, Any]]) -> APIError:
        return cls(message, details=details)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__._rebuild, (self.message, self.details))


class InvalidArgument(APIError):
    """The request is malformed or names a value that is not allowed."""

    status_code = 400
    grpc_code = 3
    reason = "INVALID_ARGUMENT"


class CellFailedError(InvalidArgument):
    """A notebook cell raised while its checkpoint was being captured."""

    reason = "CELL_FAILED"


class Unauthenticated(APIError):
    """The request carries no credential, or one that is malformed, expired or revoked."""

    status_code = 401
    grpc_code = 16
    reason = "UNAUTHENTICATED"


class PermissionDenied(APIError):
    """The caller is known but may not do this."""

    status_code = 403
    grpc_code = 7
    reason = "PERMISSION_DENIED"


class NotFound(APIError, LookupError):
    """The named resource does not exist (or the caller may not know that it does)."""

    status_code = 404
    grpc_code = 5
    reason = "NOT_FOUND"


class MethodNotAllowed(APIError):
    """The path exists, but not with this HTTP method."""

    status_code = 405
    grpc_code = 12
    reason = "UNIMPLEMENTED"


class AlreadyExists(APIError):
    """A resource with that name already exists."""

    status_code = 409
    grpc_code = 6
    reason = "ALREADY_EXISTS"


class FailedPrecondition(APIError):
    """The resource is in a state that forbids the change (for example, it is in use)."""

    status_code = 409
    grpc_code = 9
    reason = "FAILED_PRECONDITION"


class PayloadTooLarge(APIError):
    """The request or response body is over the size limit."""

    status_code = 413
    grpc_code = 8
    reason = "RESOURCE_EXHAUSTED"


class TooManyRequests(APIError):
    """The node's queue is full; `retry_after` seconds is a good time to wait before trying again."""

    status_code = 429
    grpc_code = 8
    reason = "QUEUE_FULL"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None, retry_after: int = 1) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class TooManyFailures(TooManyRequests):
    """Too many failed authentications from one client address; `retry_after` says when it may try again."""

    reason = "TOO_MANY_FAILED_AUTHENTICATIONS"


class CellExecutionError(APIError):
    """The deployed cell raised an exception; `error_name`, `error_message` and `traceback` say which."""

    status_code = 500
    grpc_code = 2
    reason = "CELL_EXECUTION_ERROR"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, details=details)
        execution = next((d for d in self.details if d.get("@type") == EXECUTION_ERROR_TYPE), {})
        self.error_name: str = execution.get("error_name", "")
        self.error_message: str = execution.get("error_message", "")
        self.traceback: list[str] = list(execution.get("traceback", []))

    @classmethod
    def from_cell(cls, error_name: str, error_message: str, traceback: list[str]) -> CellExecutionError:
        """The error for an exception raised by the cell, with its NodeExecutionErrorDetails."""
        details = {
            "@type": EXECUTION_ERROR_TYPE,
            "error_name": error_name,
            "error_message": error_message,
            "traceback": traceback,
        }
        return cls(f"The cell raised {error_name}: {error_message}", details=[details])


class OutputError(APIError):
    """An output variable is missing after the cell ran, or its value does not match the declared type."""

    status_code = 500
    grpc_code = 13
    reason = "OUTPUT_ERROR"


class InternalError(APIError):
    """Something failed inside cellnode; the message says what, never a secret."""

    status_code = 500
    grpc_code = 13
    reason = "INTERNAL"


class Unavailable(APIError):
    """No instance of the node can take the request now."""

    status_code = 503
    grpc_code = 14
    reason = "UNAVAILABLE"


class DeadlineExceeded(APIError, TimeoutError):
    """The request ran past its deadline (the node's timeout)."""

    status_code = 504
    grpc_code = 4
    reason = "DEADLINE_EXCEEDED"


def _subclasses(cls: type[APIError]) -> list[type[APIError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


_BY_REASON: dict[str, type[APIError]] = {c.reason: c for c in _subclasses(APIError)}
# For a body without our ErrorInfo (a proxy's answer, say), the plain class of each status.
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    405: MethodNotAllowed,
    409: FailedPrecondition,
    413: PayloadTooLarge,
    429: TooManyRequests,
    500: InternalError,
    503: Unavailable,
    504: DeadlineExceeded,
}
