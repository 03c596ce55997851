"""Errors a client gets: an HTTP status and an OpenAI-style JSON body.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx or 5xx status,
as the OpenAI API answers, so clients (the official ``openai`` package included) raise their
usual exceptions. Nothing about the server's files or internals is in a message.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A refusal: ``status``, a one-line ``message`` and OpenAI's ``type``/``param``/``code``;
    ``headers`` go with the response (``Retry-After`` on 503)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None
                ) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found_model(name: str, available: list[str]) -> APIError:
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
    return APIError(404, f"The model {name!r} does not exist; models: {shown}",
                    param="model", code="model_not_found")


def queue_full(retry_after: int) -> APIError:
    return APIError(503, "The server's queue is full; retry later", type="server_overloaded",
                    code="queue_full", headers={"Retry-After": str(retry_after)})


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down", type="server_unavailable",
                    code="shutting_down", headers={"Retry-After": "1"})


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within {seconds:g} s and was cancelled",
                    type="timeout", code="timeout")


def unauthorized() -> APIError:
    return APIError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def internal() -> APIError:
    return APIError(500, "The model failed on this request", type="server_error",
                    code="internal_error")
