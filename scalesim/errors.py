"""Errors that are part of ScaleSim's interface.

Every error a caller can cause is an `InvalidRequestError` (the server maps it to a 4xx); a model
that cannot be found or loaded is a `ModelLoadError`. Anything else is a bug.
"""


class ScaleSimError(Exception):
    """Base class of every error ScaleSim raises on purpose."""


class InvalidRequestError(ScaleSimError, ValueError):
    """The request itself is wrong: bad parameter, too long, unknown name."""


class RequestTooLargeError(InvalidRequestError):
    """The request can never fit: longer than the context or larger than the whole KV pool."""


class ModelLoadError(ScaleSimError):
    """A model name is unknown, or its files are missing or corrupt."""
