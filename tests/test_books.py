"""Books CRUD, keyset pagination and input limits against the real database."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import text

from service.extensions import db


def count_books(app) -> int:
    with app.app_context(), db.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM books")).scalar_one()


def book_row(app, book_id: int) -> dict | None:
    with app.app_context(), db.engine.connect() as conn:
        row = (
            conn.execute(
                text("SELECT id, title, author, owner_id, updated_at FROM books WHERE id = :id"), {"id": book_id}
            )
            .mappings()
            .first()
        )
    return dict(row) if row else None


@pytest.fixture
def owner(login):
    return login("owner@example.com", "owner-password")


@pytest.fixture
def stranger(login):
    return login("stranger@example.com", "stranger-password")


@pytest.fixture
def book(client, owner):
    response = client.post("/books", json={"title": "Dune", "author": "Frank Herbert"}, headers=owner)
    assert response.status_code == 201
    return response.get_json()


def create_books(client, headers, n: int) -> list[int]:
    ids = []
    for i in range(n):
        response = client.post("/books", json={"title": f"Book {i:02d}", "author": f"Author {i}"}, headers=headers)
        assert response.status_code == 201
        ids.append(response.get_json()["id"])
    return ids


# --- list / read / create ------------------------------------------------------------------


def test_list_empty(client):
    response = client.get("/books")
    assert response.status_code == 200
    assert response.get_json() == {"items": [], "next_cursor": None}
    assert "Link" not in response.headers


@pytest.mark.parametrize("path", ["/books", "/books/"])
def test_list_with_and_without_slash_no_redirect(client, book, path):
    response = client.get(path)
    assert response.status_code == 200
    assert "Location" not in response.headers
    assert [item["id"] for item in response.get_json()["items"]] == [book["id"]]


def test_create_returns_201_with_id_and_owner(app, client, login):
    email = "creator@example.com"
    headers = login(email, "creator-password")
    with app.app_context(), db.engine.connect() as conn:
        user_id = conn.execute(text("SELECT id FROM users WHERE email = :e"), {"e": email}).scalar_one()
    response = client.post("/books", json={"title": "Dune", "author": "Frank Herbert"}, headers=headers)
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"id", "title", "author", "owner_id", "created_at", "updated_at"}
    assert isinstance(body["id"], int) and body["id"] >= 1
    assert body["owner_id"] == user_id
    assert body["title"] == "Dune"
    assert body["author"] == "Frank Herbert"
    assert book_row(app, body["id"])["title"] == "Dune"


def test_create_without_author_stores_null(app, client, owner):
    response = client.post("/books", json={"title": "Anonymous"}, headers=owner)
    assert response.status_code == 201
    assert response.get_json()["author"] is None
    assert book_row(app, response.get_json()["id"])["author"] is None


def test_create_also_on_trailing_slash(client, owner):
    response = client.post("/books/", json={"title": "Slash"}, headers=owner)
    assert response.status_code == 201


def test_get_one(client, book):
    response = client.get(f"/books/{book['id']}")
    assert response.status_code == 200
    assert response.get_json() == book


def test_get_missing_is_404(client, book):
    response = client.get(f"/books/{book['id'] + 1000}")
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["status"] == 404
    assert error["code"] == "not_found"


@pytest.mark.parametrize("book_id", ["0", "-1", "abc", "99999999999999999999", "1.5", str(2**63), "9" * 5000])
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_invalid_ids_are_404_json(client, owner, method, book_id):
    response = client.open(f"/books/{book_id}", method=method, json={"title": "x"}, headers=owner)
    assert response.status_code == 404
    assert response.content_type == "application/json"
    assert response.get_json()["error"]["code"] == "not_found"


def test_largest_bigint_id_is_a_plain_404(client, owner):
    response = client.get(f"/books/{2**63 - 1}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


# --- pagination ----------------------------------------------------------------------------


def test_default_page_size_is_20(client, owner):
    ids = create_books(client, owner, 25)
    response = client.get("/books")
    body = response.get_json()
    assert [item["id"] for item in body["items"]] == sorted(ids, reverse=True)[:20]
    assert body["next_cursor"] == body["items"][-1]["id"]
    assert "Link" in response.headers


def test_page_size_setting(make_app):
    app = make_app(BOOKS_PAGE_SIZE="7")
    client = app.test_client()
    client.post("/auth/register", json={"email": "p@example.com", "password": "secret"})
    token = client.post("/auth/login", json={"email": "p@example.com", "password": "secret"}).get_json()["token"]
    create_books(client, {"Authorization": f"Bearer {token}"}, 9)
    assert len(client.get("/books").get_json()["items"]) == 7


def test_limit_walks_all_pages_newest_first(client, owner):
    ids = create_books(client, owner, 25)
    seen: list[int] = []
    pages = []
    url = "/books?limit=10"
    while url:
        response = client.get(url)
        assert response.status_code == 200
        body = response.get_json()
        pages.append(body)
        seen.extend(item["id"] for item in body["items"])
        if body["next_cursor"] is None:
            assert "Link" not in response.headers
            url = None
        else:
            link = response.headers["Link"]
            assert link.endswith('>; rel="next"')
            target = urlsplit(link[1 : link.index(">")])
            assert target.path in ("/books", "/books/")
            assert parse_qs(target.query) == {"cursor": [str(body["next_cursor"])], "limit": ["10"]}
            url = f"/books?limit=10&cursor={body['next_cursor']}"
            # following the Link header gives the same page as the cursor
            assert client.get(link[1 : link.index(">")]).get_json() == client.get(url).get_json()
    assert [len(p["items"]) for p in pages] == [10, 10, 5]
    assert pages[-1]["next_cursor"] is None
    assert seen == sorted(ids, reverse=True)  # newest first, no duplicates, no gaps
    assert len(set(seen)) == 25


def test_exact_multiple_has_no_empty_last_page(client, owner):
    create_books(client, owner, 20)
    first = client.get("/books?limit=10").get_json()
    assert first["next_cursor"] is not None
    second = client.get(f"/books?limit=10&cursor={first['next_cursor']}")
    assert len(second.get_json()["items"]) == 10
    assert second.get_json()["next_cursor"] is None
    assert "Link" not in second.headers


def test_cursor_excludes_books_created_after_it(client, owner):
    create_books(client, owner, 5)
    first = client.get("/books?limit=2").get_json()
    create_books(client, owner, 3)  # newer books do not shift the following pages
    rest = client.get(f"/books?limit=10&cursor={first['next_cursor']}").get_json()
    assert [i["id"] for i in rest["items"]] == [3, 2, 1]


@pytest.mark.parametrize(
    "query, field",
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-5", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("cursor=0", "cursor"),
        ("cursor=-1", "cursor"),
        ("cursor=abc", "cursor"),
        (f"cursor={10**30}", "cursor"),
        (f"cursor={2**63}", "cursor"),
        ("page=2", "page"),
        ("offset=10", "offset"),
    ],
)
def test_bad_query_is_422(client, query, field):
    response = client.get(f"/books?{query}")
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]["query"]


def test_limit_bounds_are_inclusive(client, owner):
    create_books(client, owner, 2)
    assert len(client.get("/books?limit=1").get_json()["items"]) == 1
    assert len(client.get("/books?limit=100").get_json()["items"]) == 2
    assert client.get(f"/books?cursor={2**63 - 1}").status_code == 200


# --- update / delete -----------------------------------------------------------------------


def test_put_by_owner_replaces_fields(app, client, owner, book):
    response = client.put(f"/books/{book['id']}", json={"title": "Dune Messiah"}, headers=owner)
    assert response.status_code == 200
    body = response.get_json()
    assert body["title"] == "Dune Messiah"
    assert body["author"] is None  # omitted in a PUT means null
    assert body["id"] == book["id"] and body["owner_id"] == book["owner_id"]
    assert body["updated_at"] > book["updated_at"]  # the column's onupdate, in its own transaction
    assert body["created_at"] == book["created_at"]
    row = book_row(app, book["id"])
    assert (row["title"], row["author"]) == ("Dune Messiah", None)


def test_put_requires_title(app, client, owner, book):
    response = client.put(f"/books/{book['id']}", json={"author": "Someone"}, headers=owner)
    assert response.status_code == 422
    assert book_row(app, book["id"])["author"] == "Frank Herbert"


def test_patch_changes_only_given_field(app, client, owner, book):
    response = client.patch(f"/books/{book['id']}", json={"title": "Children of Dune"}, headers=owner)
    assert response.status_code == 200
    assert response.get_json()["title"] == "Children of Dune"
    assert response.get_json()["author"] == "Frank Herbert"
    response = client.patch(f"/books/{book['id']}", json={"author": "F. Herbert"}, headers=owner)
    assert response.get_json()["title"] == "Children of Dune"
    assert response.get_json()["author"] == "F. Herbert"
    row = book_row(app, book["id"])
    assert (row["title"], row["author"]) == ("Children of Dune", "F. Herbert")


def test_patch_author_null_clears_it(app, client, owner, book):
    response = client.patch(f"/books/{book['id']}", json={"author": None}, headers=owner)
    assert response.status_code == 200
    assert book_row(app, book["id"])["author"] is None


def test_patch_title_null_is_422(app, client, owner, book):
    response = client.patch(f"/books/{book['id']}", json={"title": None}, headers=owner)
    assert response.status_code == 422
    assert book_row(app, book["id"])["title"] == "Dune"


def test_patch_empty_is_422(app, client, owner, book):
    before = book_row(app, book["id"])
    response = client.patch(f"/books/{book['id']}", json={}, headers=owner)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_error"
    assert book_row(app, book["id"]) == before


@pytest.mark.parametrize(
    "method, payload",
    [
        ("PUT", {"title": "Hijacked", "author": "Mallory"}),
        ("PATCH", {"title": "Hijacked"}),
        ("DELETE", None),
    ],
)
def test_other_user_cannot_change_book(app, client, book, stranger, method, payload):
    before = book_row(app, book["id"])
    response = client.open(f"/books/{book['id']}", method=method, json=payload, headers=stranger)
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "not_owner"
    assert book_row(app, book["id"]) == before


@pytest.mark.parametrize(
    "method, payload",
    [
        ("PUT", {"title": "Ghost"}),
        ("PATCH", {"title": "Ghost"}),
        ("DELETE", None),
    ],
)
def test_change_missing_book_is_404(app, client, owner, method, payload):
    response = client.open("/books/424242", method=method, json=payload, headers=owner)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    assert count_books(app) == 0


@pytest.mark.parametrize(
    "method, payload",
    [
        ("POST", {"title": "Anonymous"}),
        ("PUT", {"title": "Anonymous"}),
        ("PATCH", {"title": "Anonymous"}),
        ("DELETE", None),
    ],
)
def test_writes_need_a_token(app, client, book, method, payload):
    path = "/books" if method == "POST" else f"/books/{book['id']}"
    before = book_row(app, book["id"])
    response = client.open(path, method=method, json=payload)
    assert response.status_code == 401
    assert book_row(app, book["id"]) == before
    assert count_books(app) == 1


def test_delete_then_404(app, client, owner, book):
    response = client.delete(f"/books/{book['id']}", headers=owner)
    assert response.status_code == 204
    assert response.get_data() == b""
    assert book_row(app, book["id"]) is None
    assert client.get(f"/books/{book['id']}").status_code == 404
    assert client.delete(f"/books/{book['id']}", headers=owner).status_code == 404


# --- field limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"title": ""},
        {"title": "x" * 201},
        {"title": "ok", "author": ""},
        {"title": "ok", "author": "a" * 201},
        {"title": None},
        {"title": 42},
        {"author": "No title"},
        {"title": "ok", "owner_id": 99},
        {"title": "ok", "id": 7},
        {"title": "a\x00b"},
        {"title": "ok", "author": "\x00"},
    ],
)
def test_create_invalid_is_422_and_writes_nothing(app, client, owner, payload):
    response = client.post("/books", json=payload, headers=owner)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_error"
    assert count_books(app) == 0


def test_title_of_200_characters_is_accepted(app, client, owner):
    title = "é" * 200  # characters, not bytes
    response = client.post("/books", json={"title": title, "author": "a" * 200}, headers=owner)
    assert response.status_code == 201
    assert book_row(app, response.get_json()["id"])["title"] == title


def test_unicode_round_trips(app, client, owner):
    title = "Война и мир 📚 — 戦争と平和"
    response = client.post("/books", json={"title": title}, headers=owner)
    assert response.status_code == 201
    assert client.get(f"/books/{response.get_json()['id']}").get_json()["title"] == title


@pytest.mark.parametrize(
    "raw",
    [
        '{"title": "\\ud800"}',
        '{"title": "ok", "author": "\\udfff"}',
        '{"title": "a\\u0000b"}',
    ],
)
def test_unstorable_text_in_raw_json_is_422(app, client, owner, raw):
    response = client.post("/books", data=raw, content_type="application/json", headers=owner)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_error"
    assert count_books(app) == 0


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_unstorable_text_in_update_is_422_and_row_unchanged(app, client, owner, book, method):
    before = book_row(app, book["id"])
    response = client.open(
        f"/books/{book['id']}",
        method=method,
        data='{"title": "\\ud800"}',
        content_type="application/json",
        headers=owner,
    )
    assert response.status_code == 422
    assert book_row(app, book["id"]) == before
