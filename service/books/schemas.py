"""The books API's request and response schemas, and the bounds they enforce on a page."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import DateTime, Integer, List, Nested, String

from service.models import AUTHOR_MAX, MAX_ID, TITLE_MAX
from service.schemas import CanonicalInt, text

PAGE_MAX = 100  # the largest page a client may ask for (BOOKS_PAGE_SIZE is capped to it too)


class BookIn(Schema):
    title = text(min_length=1, max_length=TITLE_MAX, required=True, metadata={"example": "Dune"})
    author = text(
        min_length=1, max_length=AUTHOR_MAX, allow_none=True, load_default=None, metadata={"example": "Frank Herbert"}
    )


class BookPatch(Schema):
    title = text(min_length=1, max_length=TITLE_MAX)
    author = text(min_length=1, max_length=AUTHOR_MAX, allow_none=True)


class BookOut(Schema):
    id = Integer(required=True)
    title = String(required=True)
    author = String(allow_none=True)
    owner_id = Integer(required=True)
    created_at = DateTime(required=True)
    updated_at = DateTime(required=True)


class PageQuery(Schema):
    limit = CanonicalInt(
        maximum=PAGE_MAX,
        metadata={"description": f"page size, 1..{PAGE_MAX} (default from BOOKS_PAGE_SIZE), in ASCII digits"},
    )
    cursor = CanonicalInt(
        maximum=MAX_ID, metadata={"description": "the next_cursor of the previous page, in ASCII digits"}
    )


class PagedBook(BookOut):
    """BookOut inside a page (its own class so the OpenAPI generator names it only once)."""


class BookPage(Schema):
    items = List(Nested(PagedBook), required=True)
    next_cursor = Integer(
        allow_none=True, required=True, metadata={"description": "pass as ?cursor= for the next page; null on the last"}
    )
