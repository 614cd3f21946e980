"""The one shape of an error a user can act on, for the library and the service alike: a message that
says what to change, the request field at fault (`param`, or None) and a machine-readable `code`.
The chat generator's errors (`rlhf_engine.chat.errors`) and the service's (`service.errors`, which adds
the HTTP/gRPC status by its table and `Retry-After`) both derive from it."""

from __future__ import annotations


class FieldError(Exception):
    code: str | None = None  # a class's own code, unless one is given

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
