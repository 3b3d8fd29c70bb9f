"""The error every bad job file or resource becomes: each entry is "field.path: message"."""

from __future__ import annotations


class SpecError(Exception):
    """A job file or resource that does not validate; `errors` names each bad field."""

    def __init__(self, errors: list[str], source: str = "job"):
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: " + "; ".join(errors))


class FieldError(ValueError):
    """Raised by a cross-field rule to blame one field below the model that checks it.

    `field` is relative to that model, in wire spelling (`algorithm.miniBatchSize`); the
    error then reads `spec.algorithm.miniBatchSize: <message>` instead of `spec: ...`.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(message)
