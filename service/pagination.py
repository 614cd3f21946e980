"""One way to page every list (OpenAI's): ask with `after`, the `id` of the last item of the previous
page, and `limit`; the answer (`schemas.Page`) carries `data`, `has_more`, `first_id`, `last_id`."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from service.errors import NotFoundError
from service.schemas import Page

P = TypeVar("P", bound=Page)
T = TypeVar("T")


def paged(cls: type[P], data: Sequence[Any], has_more: bool) -> P:
    """A page of `cls` over `data` (objects with an `id`, or dicts with one), with its first and last ids."""
    ids = [d["id"] if isinstance(d, dict) else d.id for d in data]
    return cls(
        data=list(data), has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
    )


def anchor_of(after: str | None, find: Callable[[str], T], what: str) -> T | None:
    """The item whose id is `after` (None without one), found by `find` (which raises NotFoundError for
    an id it does not know, e.g. one of another tenant): a 404 naming `after` otherwise."""
    if not after:
        return None
    try:
        return find(after)
    except NotFoundError:
        raise _unknown(after, what) from None


def _unknown(after: Any, what: str) -> NotFoundError:
    return NotFoundError(
        f"after: no {what} {after}; pass the id of the last item of the previous page", param="after"
    )


def newest_first(
    session: Session,
    q: Select[Any],
    model: Any,
    *,
    after: str | None,
    find: Callable[[str], Any],
    what: str,
    limit: int,
    oldest_first: bool = False,
) -> tuple[list[Any], bool]:
    """(rows after the one whose id is `after`, has_more) of `q` ordered newest first by (created_at, id)
    (or oldest first): keyset paging, for tables whose rows carry both (jobs, files). `find` and `what`:
    see `anchor_of`."""
    anchor = anchor_of(after, find, what)
    past = operator.gt if oldest_first else operator.lt
    first = (model.created_at, model.id) if oldest_first else (model.created_at.desc(), model.id.desc())
    q = q.order_by(*first)
    if anchor is not None:
        q = q.where(
            past(model.created_at, anchor.created_at)
            | ((model.created_at == anchor.created_at) & past(model.id, anchor.id))
        )
    rows = list(session.scalars(q.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cut(
    items: Sequence[T], *, after: Any, limit: int, id_of: Callable[[T], Any], what: str
) -> tuple[list[T], bool]:
    """(the page after the item whose id is `after`, has_more), of a list already in memory."""
    if after is not None:
        ids = [id_of(x) for x in items]
        if after not in ids:
            raise _unknown(after, what)
        items = items[ids.index(after) + 1 :]
    return list(items[:limit]), len(items) > limit
