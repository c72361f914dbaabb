"""Errors that are part of ScaleSim's interface.

Every error a caller can cause is an `InvalidRequestError` (the server maps it to a 4xx); a model
that cannot be found or loaded is a `ModelLoadError`; one request whose generation failed (its
logits were not finite, its weights could not be loaded) gets a `GenerationError` while the
others go on. Anything else is a bug.
"""


class ScaleSimError(Exception):
    """Base class of every error ScaleSim raises on purpose."""


class InvalidRequestError(ScaleSimError, ValueError):
    """The request itself is wrong: bad parameter, too long, unknown name."""


class RequestTooLargeError(InvalidRequestError):
    """The request can never fit: longer than the context or larger than the whole KV pool."""


class ModelLoadError(ScaleSimError):
    """A model name is unknown, or its files are missing or corrupt."""


class GenerationError(ScaleSimError, RuntimeError):
    """Generating this request failed; the engine and every other request go on."""


RETRY_AFTER_S = 1  # a step takes well under a second; by then the queue has moved


class OverloadedError(ScaleSimError):
    """The engine holds as many waiting sequences as it admits; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
