"""Nest-style error envelope, as Daytona's API emits it: the SDK picks its exception class by status code."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.status import HTTP_400_BAD_REQUEST, HTTP_500_INTERNAL_SERVER_ERROR

from tidepool_api.responses import JsonResponse

log = structlog.get_logger("tidepool.api.errors")

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class ApiError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, message)


def error_response(request: Request, status_code: int, message: str) -> JsonResponse:
    return JsonResponse(
        status_code=status_code,
        content={
            "statusCode": status_code,
            "message": message,
            "error": REASONS.get(status_code, "Error"),
            "path": request.url.path,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "source": "DAYTONA_API",
        },
    )


# Where FastAPI says a value came from; the message names the field itself (`env`, `states.0`, ...).
SOURCES = {"body", "query", "path", "header", "cookie"}
NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def describe_validation_error(error: RequestValidationError) -> str:
    """One line naming each bad field by its wire name, e.g. `autoDeleteInterval: Input should be ...`."""
    parts: list[str] = []
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        kind = item.get("type")
        if kind == "json_invalid":
            parts.append("request body is not valid JSON")
            continue
        if loc == ("body",) and kind in NOT_AN_OBJECT:
            parts.append("request body must be a JSON object")
            continue
        if loc == ("body",) and kind == "missing":
            parts.append("request body is required")
            continue
        location = ".".join(str(part) for part in (loc[1:] if loc and loc[0] in SOURCES else loc))
        parts.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
    return "; ".join(parts) or "invalid request"


HEAD_TOO_LARGE = {
    "description": "Request line and headers too large (TIDEPOOL_API_MAX_HEADER_BYTES)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


def document_400_not_422(app: FastAPI) -> None:
    """The OpenAPI document says what the API answers: invalid input is a 400 envelope, never a 422."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    responses = operation.get("responses", {})
                    # Any request's head may be over TIDEPOOL_API_MAX_HEADER_BYTES (http_limits.py).
                    responses.setdefault("431", HEAD_TOO_LARGE)
                    validation = responses.pop("422", None)
                    if validation is not None and "400" not in responses:
                        responses["400"] = {
                            "description": "Invalid input: the message names the field",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                            },
                        }
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


CANDIDATE_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """`Allow` of a 405: every method some route answers at this path, e.g. `DELETE, GET` for
    `/api/sandbox/{id}` (Starlette's own names the methods of the first route whose path matched, while a
    path here often has one route per method). Each method is tried against the router, as a request
    with it would be routed."""
    allowed = [
        method
        for method in CANDIDATE_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    document_400_not_422(app)

    @app.exception_handler(ApiError)
    async def handle_api_error(request: Request, error: ApiError) -> JsonResponse:
        response = error_response(request, error.status_code, error.message)
        response.headers.update(getattr(error, "headers", None) or {})  # e.g. Retry-After of a 429
        return response

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, error: StarletteHTTPException) -> JsonResponse:
        response = error_response(request, error.status_code, str(error.detail))
        response.headers.update(error.headers or {})  # e.g. Connection: close after a refused body
        if error.status_code == 405:
            response.headers["Allow"] = allowed_methods(request)
        return response

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, error: RequestValidationError) -> JsonResponse:
        return error_response(request, HTTP_400_BAD_REQUEST, describe_validation_error(error))

    @app.exception_handler(Exception)
    async def handle_unexpected(request: Request, error: Exception) -> JsonResponse:
        log.exception("api.unhandled", path=request.url.path, error=str(error))
        return error_response(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")
