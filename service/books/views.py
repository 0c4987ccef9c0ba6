"""`/books`: list (keyset pages), read, create, replace/patch and delete (owner only)."""

from __future__ import annotations

from apiflask import APIBlueprint
from flask import Response, current_app, jsonify, url_for
from flask_jwt_extended import jwt_required
from marshmallow import RAISE
from sqlalchemy.exc import IntegrityError
from werkzeug.routing import BaseConverter

from service.auth.tokens import current_user_id
from service.books import queries
from service.books.schemas import BookIn, BookOut, BookPage, BookPatch, PageQuery
from service.errors import APIError
from service.models import MAX_ID
from service.schemas import CANONICAL_INT, canonical_int

bp = APIBlueprint("books", __name__, url_prefix="/books", tag="Books")


class BookIdConverter(BaseConverter):
    """A book id in the path, spelt canonically (service/schemas.py CANONICAL_INT): "0001", "+1"
    or an Arabic-Indic one (U+0661) match no route and are 404, not book 1. An id no book can
    have (beyond bigint) becomes 0, which matches no row, so every method answers 404. (A range
    on werkzeug's `int` converter fails the match instead, and werkzeug then answers
    PUT/PATCH/DELETE /books/0 with 405 "Allow: GET".)"""

    regex = CANONICAL_INT
    weight = 50

    def to_python(self, value: str) -> int:
        return canonical_int(value, MAX_ID) or 0

    def to_url(self, value) -> str:
        return str(int(value))


# Runs before the routes below are added to an app (deferred functions run in order).
bp.record_once(lambda state: state.app.url_map.converters.setdefault("book_id", BookIdConverter))
BOOK_ID = "<book_id:book_id>"
AUTH_DOC = {"security": "BearerAuth"}
OWNER_ONLY = {403: "Not the book's owner", 404: "No such book"}


def _json(data: dict, status: int = 200, headers: dict | None = None) -> Response:
    """The queries return JSON-ready dicts (checked against the @output schemas by the OpenAPI
    fuzz test), so they skip a second marshmallow pass: a page of 20 books cost more to dump
    than to fetch."""
    response = jsonify(data)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _not_found() -> APIError:
    return APIError(404, "No book with this id")


def _forbidden() -> APIError:
    return APIError(403, "Only the book's owner may change it", code="not_owner")


@bp.get("/", strict_slashes=False)
@bp.input(PageQuery, location="query", arg_name="query", unknown=RAISE)  # a typo is not ignored
@bp.output(BookPage)
@bp.doc(summary="List books, newest first, one keyset page at a time")
def list_books(query):
    limit = query.get("limit") or current_app.config["BOOKS_PAGE_SIZE"]
    items, next_cursor = queries.list_page(before_id=query.get("cursor"), limit=limit)
    headers = {}
    if next_cursor is not None:
        link = url_for("books.list_books", cursor=next_cursor, limit=limit)
        headers["Link"] = f'<{link}>; rel="next"'
    return _json({"items": items, "next_cursor": next_cursor}, headers=headers)


@bp.post("/", strict_slashes=False)
@jwt_required()  # before validation: an anonymous caller learns nothing about the body
@bp.input(BookIn, arg_name="body")
@bp.output(BookOut, status_code=201)
@bp.doc(summary="Create a book", **AUTH_DOC)
def create_book(body):
    try:
        return _json(queries.create(owner_id=current_user_id(), **body), 201)
    except IntegrityError:  # the token's user was deleted since it was issued
        raise APIError(401, "The token's user no longer exists", code="token_invalid") from None


@bp.get(f"/{BOOK_ID}")
@bp.output(BookOut)
@bp.doc(summary="Get one book")
def get_book(book_id):
    book = queries.get(book_id=book_id)
    if book is None:
        raise _not_found()
    return _json(book)


def _update(book_id: int, values: dict):
    book, exists = queries.update_owned(book_id=book_id, owner_id=current_user_id(), values=values)
    if book is None:
        raise _forbidden() if exists else _not_found()
    return _json(book)


@bp.put(f"/{BOOK_ID}")
@jwt_required()
@bp.input(BookIn, arg_name="body")
@bp.output(BookOut)
@bp.doc(summary="Replace a book's fields (owner only)", responses=OWNER_ONLY, **AUTH_DOC)
def replace_book(book_id, body):
    return _update(book_id, body)


@bp.patch(f"/{BOOK_ID}")
@jwt_required()
@bp.input(BookPatch, arg_name="body")
@bp.output(BookOut)
@bp.doc(summary="Change some of a book's fields (owner only)", responses=OWNER_ONLY, **AUTH_DOC)
def patch_book(book_id, body):
    if not body:
        raise APIError(422, "Send at least one of: title, author", details={"json": {"_schema": ["empty"]}})
    return _update(book_id, body)


@bp.delete(f"/{BOOK_ID}")
@jwt_required()
@bp.output({}, status_code=204)
@bp.doc(summary="Delete a book (owner only)", responses=OWNER_ONLY, **AUTH_DOC)
def delete_book(book_id):
    deleted, exists = queries.delete_owned(book_id=book_id, owner_id=current_user_id())
    if not deleted:
        raise _forbidden() if exists else _not_found()
    return "", 204
