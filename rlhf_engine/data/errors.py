"""The one error every data problem raises: it names the file, the line and the field."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. `str()` reads `FILE, line N, field 'F': what is wrong and how to fix it`."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        where = [
            p for p in (path, f"line {line}" if line else None, f"field '{field}'" if field else None) if p
        ]
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
