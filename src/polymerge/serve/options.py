"""What ``polymerge serve`` is started with: limits, batching and security settings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from polymerge.errors import PolymergeError


@dataclass(frozen=True)
class ServeOptions:
    """The server's settings (see ``polymerge serve --help``).

    ``max_batch`` rows run in one forward pass or one generation; a batch starts when it is
    full or ``max_wait_ms`` after its first row arrived. ``max_queue`` rows may wait; beyond
    that a request gets 503 with ``Retry-After``. ``timeout`` seconds after it arrived a request
    is cancelled (504). ``max_tokens`` bounds a request's ``max_tokens`` and is its default up to
    ``default_max_tokens``; ``max_input_tokens`` bounds a prompt (and is the runtime's
    tokenizing limit, so nothing is cut silently); ``max_body_bytes`` a request body;
    ``max_prompts`` the prompts or inputs of one request. ``api_key``: when set, every request
    but ``/health`` needs ``Authorization: Bearer <api_key>``. ``name``: the model name of the
    store (or checkpoint) in ``/v1/models`` (default: its folder's name).
    """

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    timeout: float = 60.0
    max_tokens: int = 512
    default_max_tokens: int = 16
    max_input_tokens: int = 512
    max_body_bytes: int = 1 << 20
    max_prompts: int = 64
    api_key: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_queue", "max_tokens", "default_max_tokens",
                    "max_input_tokens", "max_body_bytes", "max_prompts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolymergeError(f"serve: {key} must be an integer >= 1, got {value!r}")
        for key in ("max_wait_ms", "timeout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (key == "timeout" and value == 0):
                raise PolymergeError(f"serve: {key} must be a number > 0, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise PolymergeError("serve: the API key is empty")
