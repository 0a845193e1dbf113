"""Error responses: every error is a `google.rpc.Status` JSON body, mapped in this one place."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from cellnode.exceptions import (
    APIError,
    InternalError,
    InvalidArgument,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
)

logger = logging.getLogger("cellnode.api")

_HTTP_CLASSES: dict[int, type[APIError]] = {404: NotFound, 413: PayloadTooLarge}


def error_response(error: APIError) -> Response:
    """cellnode's own error: its `google.rpc.Status` body, and `x-cellnode-error: <reason>`, which tells it apart from
    a docker node's answer passed through (the proxy drops that header from those)."""
    headers = {"x-cellnode-error": error.reason}
    if isinstance(error, TooManyRequests):
        headers["Retry-After"] = str(error.retry_after)
    return Response(
        orjson.dumps(error.to_status()), status_code=error.status_code, media_type="application/json", headers=headers
    )


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


SENSITIVE_FIELDS = frozenset({"value", "password", "secret", "token", "master_key"})
ECHO_LIMIT = 200


def _shorten(text: str) -> str:
    return text if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        if error["type"] == "json_invalid":
            position = error.get("ctx", {}).get("error", "")
            return error_response(
                InvalidArgument(f"The request body is not valid JSON ({position or 'malformed'}); send a JSON object.")
            )
        location = ".".join(str(part) for part in error["loc"] if part != "body")
        message = error["msg"]
        if error["type"] == "value_error":
            # Our own validators' messages name the values they refuse; pydantic's prefix adds nothing.
            message = message.removeprefix("Value error, ")
        # A check of a whole object (fields that must agree, in the body or nested) would echo all of it, secret
        # values included; its message names the values it refuses.
        echo = "input" in error and error["type"] != "missing" and location and not isinstance(error["input"], dict)
        if echo and str(error["loc"][-1]) in SENSITIVE_FIELDS:
            echo = False  # a secret's value, say: never repeated back, not even in an error
        value = f" (got {_shorten(repr(error['input']))})" if echo else ""
        problems.append(f"{location or 'body'}: {message}{value}")
    return error_response(InvalidArgument("Invalid request: " + "; ".join(problems) + "."))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: APIError = NotFound(f"No route {request.method} {request.url.path}. See /docs for the API.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}. See /docs.")
    else:
        error = _HTTP_CLASSES.get(exc.status_code, InternalError)(str(exc.detail))
    return error_response(error)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("Unexpected error on %s %s", request.method, request.url.path)
    return error_response(InternalError("Internal error; the server log has the details."))


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
