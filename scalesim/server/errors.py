"""OpenAI-style errors: every error a client can cause is a 4xx with an `{"error": {...}}` body.

Clients such as openai-python retry 429 and 5xx but not 400, so a request that can never work
(too long, unknown model, bad field) must be a 4xx. Unexpected failures are logged and answered
with a 500 in the same shape; the process keeps serving.
"""

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalesim.errors import GenerationError, InvalidRequestError, OverloadedError, RequestTooLargeError

logger = logging.getLogger(__name__)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "requests"}


class APIError(Exception):
    """Raise anywhere in a route to answer with this status and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientLeft(Exception):
    """The client closed its connection before the answer was ready; its work was aborted."""


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# pydantic names the member of a union a value failed as a step of its location ("input.str")
_UNION_MEMBER = re.compile(r"(str|int|float|bool|list|dict)(\[.*\])?|\w+\[.*\]")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "invalid_text":
        return first["msg"], first["ctx"]["where"]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    where = ".".join(loc)
    return (f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")), where or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError):
        code = "context_length_exceeded" if isinstance(exc, RequestTooLargeError) else None
        return error_response(400, str(exc), code=code)

    @app.exception_handler(GenerationError)
    async def _generation(request: Request, exc: GenerationError):
        return error_response(500, f"generation failed: {exc}", code="generation_failed")

    @app.exception_handler(ClientLeft)
    async def _client_left(request: Request, exc: ClientLeft):
        return Response(status_code=499)  # nobody reads it; counted, as nginx does, as 499

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, exc: OverloadedError):
        return error_response(429, str(exc), code="rate_limit_exceeded",
                              headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
