"""What went wrong, classified by what the caller should do about it.

`PermanentError`: the same input will fail the same way; do not retry, report it.
`RetryableError`: the input is fine, the world was not; try again later.
Every error carries a stable machine-readable `code` that ends up in result events.
"""

from __future__ import annotations


class SmscWorkerError(Exception):
    """Base of every error this package raises on purpose."""

    code = "internal"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class PermanentError(SmscWorkerError):
    """Retrying will not help: fix the input or the configuration."""


class InvalidRequest(PermanentError):
    """A request (or one of its fields) cannot be sent as it is."""

    code = "invalid_request"


class ConfigurationError(PermanentError):
    """A setting is missing or wrong; the service cannot start."""

    code = "configuration"


class RetryableError(SmscWorkerError):
    """A passing condition: the same request may succeed later."""

    retryable = True
    code = "transient"
