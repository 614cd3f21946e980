"""One way to page every list (OpenAI's): ask with `after`, the `id` of the last item of the previous
page, and `limit`; the answer (`schemas.Page`) carries `data`, `has_more`, `first_id`, `last_id`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from service.errors import NotFound
from service.schemas import Page

P = TypeVar("P", bound=Page)
T = TypeVar("T")


def paged(cls: type[P], data: Sequence[Any], has_more: bool) -> P:
    """A page of `cls` over `data` (objects with an `id`, or dicts with one), with its first and last ids."""
    ids = [d["id"] if isinstance(d, dict) else d.id for d in data]
    return cls(
        data=list(data), has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
    )


def cut(
    items: Sequence[T], *, after: Any, limit: int, id_of: Callable[[T], Any], what: str
) -> tuple[list[T], bool]:
    """(the page after the item whose id is `after`, has_more), of a list already in memory."""
    if after is not None:
        ids = [id_of(x) for x in items]
        if after not in ids:
            raise NotFound(
                f"after: no {what} {after}; pass the id of the last item of the previous page", param="after"
            )
        items = items[ids.index(after) + 1 :]
    return list(items[:limit]), len(items) > limit
