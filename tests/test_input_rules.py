"""What a client may put in a body, a path or a query (service/schemas.py, service/strict_json.py,
service/guards.py), in-process against the real database. Every refusal is in the one error
shape, names the field, and writes nothing. The same on a real gunicorn with the exact bytes:
test_hostile_input_stack.py."""

from __future__ import annotations

import json
import re
import sys
import unicodedata

import jsonschema_rs
import pytest
from flask_migrate import upgrade
from marshmallow import ValidationError
from sqlalchemy import text

from service import devdb
from service.extensions import db
from service.schemas import REFUSED_RANGES, TEXT_PATTERN, check_text
from tests.test_errors import assert_error, counts

# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def owner(login):
    return login("owner@example.com", "owner-password")


@pytest.fixture
def book(client, owner):
    """Book 1 (tables restart their ids after every test): a lenient id parser would find it."""
    response = client.post("/books/", json={"title": "Dune", "author": "Frank Herbert"}, headers=owner)
    assert response.status_code == 201 and response.get_json()["id"] == 1
    return response.get_json()


def emails(app) -> list[str]:
    with app.app_context(), db.engine.connect() as conn:
        return list(conn.execute(text("SELECT email FROM users ORDER BY id")).scalars())


def book_rows(app) -> list[tuple]:
    with app.app_context(), db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, title, author, updated_at FROM books ORDER BY id"))]


def post_raw(client, path: str, raw: str | bytes, headers: dict | None = None, method: str = "POST"):
    """A body sent exactly as written: JSON escapes such as \\ud800 reach the parser as sent."""
    return client.open(path, method=method, data=raw, content_type="application/json", headers=headers or {})


# --- text: titles, authors, emails --------------------------------------------------------------

HOSTILE_TEXT = {
    "ansi escape": "\u001b[31mred",
    "bell": "ring\u0007",
    "C1 next line": "one\u0085two",
    "DEL": "a\u007fb",
    "tab": "a\tb",
    "line feed": "first\nsecond",
    "carriage return": "a\rb",
    "right-to-left override": "abc\u202etxt.exe",
    "left-to-right isolate": "a\u2066b\u2069",
    "arabic letter mark": "a\u061cb",
    "left-to-right mark": "a\u200eb",
    "zero width space": "Du\u200bne",
    "zero width joiner": "a\u200db",
    "zero width no-break space (BOM)": "\ufeffDune",
    "word joiner": "Du\u2060ne",
    "soft hyphen": "Du\u00adne",
    "tag characters": "Dune\U000e0069\U000e0067\U000e006e",
    "line separator": "a\u2028b",
    "paragraph separator": "a\u2029b",
    "only spaces": "   ",
    "only ideographic space": "\u3000",
    "only no-break spaces": "\u00a0\u00a0",
}
FINE_TEXT = [
    "Dune",
    "Война и мир 📚 — 戦争と平和",
    "كتاب الأغاني",
    "e\u0301te\u0301",  # combining accents
    "❤\ufe0f",  # variation selector (a mark, not a format character)
    "  padded  ",
    "a\u00a0b",  # a no-break space between words
    "\ue000 private use",
]


@pytest.mark.parametrize("value", list(HOSTILE_TEXT.values()), ids=list(HOSTILE_TEXT))
@pytest.mark.parametrize("field", ["title", "author"])
def test_hostile_text_in_a_new_book_is_422_naming_the_field(app, client, owner, field, value):
    body = {"title": "ok", field: value}
    response = client.post("/books/", json=body, headers=owner)
    error = assert_error(response, 422, "validation_error")
    assert list(error["details"]["json"]) == [field]
    assert counts(app)[1] == 0


@pytest.mark.parametrize("value", list(HOSTILE_TEXT.values()), ids=list(HOSTILE_TEXT))
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_hostile_text_in_an_update_is_422_and_the_row_unchanged(app, client, owner, book, method, value):
    before = book_rows(app)
    response = client.open(f"/books/{book['id']}", method=method, json={"title": value}, headers=owner)
    error = assert_error(response, 422, "validation_error")
    assert list(error["details"]["json"]) == ["title"]
    assert book_rows(app) == before


@pytest.mark.parametrize("value", FINE_TEXT)
def test_ordinary_text_of_any_script_is_stored_as_sent(app, client, owner, value):
    response = client.post("/books/", json={"title": value, "author": value}, headers=owner)
    assert response.status_code == 201, response.get_json()
    assert book_rows(app)[0][1:3] == (value, value)


def test_the_message_says_which_character_and_where(client, owner):
    response = client.post("/books/", json={"title": "abc\u202etxt"}, headers=owner)
    (message,) = assert_error(response, 422)["details"]["json"]["title"]
    assert "U+202E" in message and "position 3" in message, message
    response = client.post("/books/", json={"title": " \t "}, headers=owner)
    (message,) = assert_error(response, 422)["details"]["json"]["title"]
    assert "U+0009" in message, message  # the tab is named before the blankness


# marshmallow's Email accepted most of these in the domain (its IDNA encoding drops or maps
# zero-width and format characters), so they were stored as sent.
@pytest.mark.parametrize("where", ["a{}b@example.com", "a@exa{}mple.com"], ids=["local part", "domain"])
@pytest.mark.parametrize("value", [v for v in HOSTILE_TEXT.values() if v.strip()])
def test_hostile_text_in_an_email_is_422_on_register_and_login(app, client, where, value):
    email = where.format(value)
    for path in ("/auth/register", "/auth/login"):
        response = client.post(path, json={"email": email, "password": "secret"})
        error = assert_error(response, 422, "validation_error")
        assert list(error["details"]["json"]) == ["email"], path
    assert emails(app) == []


@pytest.mark.parametrize(
    "raw",
    [
        '{"email": "a@ex\\ud800ample.com", "password": "secret"}',
        '{"email": "a@ex\\udfffample.com", "password": "secret"}',
        '{"email": "a\\ud800@example.com", "password": "secret"}',
        '{"email": "\\udfff", "password": "secret"}',
    ],
)
@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
def test_a_lone_surrogate_in_an_email_is_422_not_500(app, client, path, raw):
    error = assert_error(post_raw(client, path, raw), 422, "validation_error")
    assert list(error["details"]["json"]) == ["email"]
    assert emails(app) == []


@pytest.mark.parametrize(
    "first, second",
    [
        ("\uff21@example.com", "a@example.com"),  # full-width
        ("a@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", "A@example.COM"),
        ("STRASSE@example.com", "straße@example.com"),  # case-folded, not just lower-cased
        ("\ufb01le@example.com", "FILE@example.com"),  # a ligature
    ],
)
def test_emails_are_one_account_after_nfkc_and_case_folding(app, client, first, second):
    created = client.post("/auth/register", json={"email": first, "password": "secret"})
    assert created.status_code == 201, created.get_json()
    assert_error(client.post("/auth/register", json={"email": second, "password": "secret"}), 409, "email_taken")
    assert client.post("/auth/login", json={"email": second, "password": "secret"}).status_code == 200
    (stored,) = emails(app)
    assert stored == unicodedata.normalize("NFKC", first).casefold() == created.get_json()["email"]


def test_an_unknown_but_valid_email_still_gets_401(client):
    response = client.post("/auth/login", json={"email": "\uff2eobody@example.com", "password": "secret"})
    assert_error(response, 401, "bad_credentials")


@pytest.mark.parametrize("password", ["secret", "pass\tword", " \u202e spaces and bidi ", "📚" * 6, "\uff21" * 6])
def test_a_password_may_hold_any_text_and_is_not_normalised(client, password):
    assert client.post("/auth/register", json={"email": "p@example.com", "password": password}).status_code == 201
    assert client.post("/auth/login", json={"email": "p@example.com", "password": password}).status_code == 200
    if unicodedata.normalize("NFKC", password) != password:  # the hash is of the password as sent
        wrong = unicodedata.normalize("NFKC", password)
        assert client.post("/auth/login", json={"email": "p@example.com", "password": wrong}).status_code == 401


@pytest.mark.parametrize("raw", ['"secret\\ud800"', '"secret\\u0000"'])
def test_a_password_must_be_storable_text(app, client, raw):
    body = '{"email": "p@example.com", "password": ' + raw + "}"
    error = assert_error(post_raw(client, "/auth/register", body), 422, "validation_error")
    assert list(error["details"]["json"]) == ["password"]
    assert emails(app) == []


def test_the_pattern_is_exactly_the_rule_for_every_character():
    """The OpenAPI `pattern` and check_text agree on every Unicode scalar value, alone and next
    to a letter (lone surrogates are not scalar values: refused by check_text, and no JSON
    Schema string can hold one)."""
    pattern = re.compile(TEXT_PATTERN)
    disagree = []
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue
        for value in (chr(code), "a" + chr(code)):
            try:
                check_text(value)
                accepted = True
            except ValidationError:
                accepted = False
            if accepted != bool(pattern.fullmatch(value)):
                disagree.append((f"U+{code:04X}", value))
    assert disagree == []
    with pytest.raises(ValidationError):
        check_text("\ud800")


def test_the_refused_ranges_are_every_control_and_format_character_of_this_python():
    """REFUSED_RANGES are written out (no 0.2 s scan at import): they must hold every Cc, Cf, Zl
    and Zp character of the running Python's Unicode, and nothing else that is assigned."""
    listed = {code for start, end in REFUSED_RANGES for code in range(start, end + 1)}
    wanted = {
        code
        for code in range(sys.maxunicode + 1)
        if not 0xD800 <= code <= 0xDFFF and unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp")
    }
    assert sorted(f"U+{c:04X}" for c in wanted - listed) == [], f"Unicode {unicodedata.unidata_version}"
    assert [f"U+{c:04X}" for c in sorted(listed - wanted) if unicodedata.category(chr(c)) != "Cn"] == []


# --- duplicate keys -----------------------------------------------------------------------------

DUPLICATES = {
    "top level": '{"title": "first", "title": "second"}',
    "nested object": '{"title": "ok", "author": {"a": 1, "a": 2}}',
    "object in an array": '{"title": "ok", "author": [{"x": 1}, {"y": 1, "y": 1}]}',
    "same key after escapes": '{"title": "first", "\\u0074itle": "second"}',
}


@pytest.mark.parametrize("raw", list(DUPLICATES.values()), ids=list(DUPLICATES))
def test_a_duplicate_key_is_400_and_writes_nothing(app, client, owner, raw):
    error = assert_error(post_raw(client, "/books/", raw, owner), 400, "bad_request")
    assert "duplicate" in error["message"].lower()
    assert error["details"]["json"]["duplicate_key"] in {"title", "a", "y"}
    assert counts(app)[1] == 0


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_duplicate_key_in_an_update_is_400_and_the_row_unchanged(app, client, owner, book, method):
    before = book_rows(app)
    raw = '{"title": "first", "title": "second"}'
    assert_error(post_raw(client, f"/books/{book['id']}", raw, owner, method=method), 400, "bad_request")
    assert book_rows(app) == before


def test_a_duplicate_key_in_credentials_is_400(app, client):
    raw = '{"email": "a@example.com", "password": "secret", "email": "b@example.com"}'
    for path in ("/auth/register", "/auth/login"):
        assert_error(post_raw(client, path, raw), 400, "bad_request")
    assert emails(app) == []


@pytest.mark.parametrize("raw", ['{"title": NaN}', '{"title": "ok", "author": Infinity}', '{"title": -Infinity}'])
def test_non_json_constants_are_400(app, client, owner, raw):
    assert_error(post_raw(client, "/books/", raw, owner), 400, "bad_request")
    assert counts(app)[1] == 0


def test_the_strict_decoder_still_reads_ordinary_json(client, owner):
    raw = json.dumps({"title": "Dune", "author": None})
    assert post_raw(client, "/books/", raw, owner).status_code == 201


# --- integers in paths and queries --------------------------------------------------------------

NOT_CANONICAL = {
    "arabic-indic one": "%D9%A1",
    "full-width one": "%EF%BC%91",
    "leading zeros": "0001",
    "leading zero": "01",
    "plus sign": "%2B1",
    "leading space": "%201",
    "trailing space": "1%20",
    "exponent": "1e0",
    "hex": "0x1",
    "decimal point": "1.0",
    "underscore": "1_0",
    "zero": "0",
    "negative": "-1",
    "superscript one": "%C2%B9",
}


@pytest.mark.parametrize("book_id", list(NOT_CANONICAL.values()), ids=list(NOT_CANONICAL))
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_a_book_id_is_canonical_ascii_or_404(app, client, owner, book, method, book_id):
    before = book_rows(app)
    response = client.open(f"/books/{book_id}", method=method, json={"title": "changed"}, headers=owner)
    assert_error(response, 404, "not_found")
    assert book_rows(app) == before


@pytest.mark.parametrize("path", ["/books//1", "/books///1", "/books/1//"])  # a leading // is a host here
def test_a_doubled_slash_is_404_not_a_redirect_built_from_the_host(client, owner, book, path):
    response = client.get(path, headers={**owner, "Host": "attacker.example"})
    assert_error(response, 404, "not_found")
    assert "Location" not in response.headers


def test_the_canonical_id_still_finds_the_book(client, book):
    assert client.get("/books/1").status_code == 200
    assert client.get("/books/%31").status_code == 200  # the same URL: %31 is "1" itself


QUERY_NOT_CANONICAL = [
    *("%D9%A5", "%EF%BC%95", "%C2%B9"),  # Arabic-Indic, full-width, superscript digits
    *("%205", "+5", "%2B5", "5%20", "5+"),  # spaces and signs ("+" is a space in a query)
    *("1e1", "0x10", "5.0", "5_0", "05", "007", "-0"),
]


@pytest.mark.parametrize("value", QUERY_NOT_CANONICAL)
@pytest.mark.parametrize("name", ["limit", "cursor"])
def test_a_query_integer_is_canonical_ascii_or_422(client, book, name, value):
    error = assert_error(client.get(f"/books/?{name}={value}"), 422, "validation_error")
    assert list(error["details"]["query"]) == [name]


def test_canonical_query_integers_still_work(client, owner):
    for i in range(3):
        client.post("/books/", json={"title": f"Book {i}"}, headers=owner)
    page = client.get("/books/?limit=2&cursor=3").get_json()
    assert [b["id"] for b in page["items"]] == [2, 1]
    assert client.get("/books/?limit=100").status_code == 200
    assert client.get(f"/books/?cursor={2**63 - 1}").status_code == 200
    assert_error(client.get(f"/books/?cursor={2**63}"), 422)
    assert_error(client.get(f"/books/?cursor={'9' * 5000}"), 422)


# --- stored emails ------------------------------------------------------------------------------


@pytest.fixture
def legacy_database(postgres):
    name = "test_email_normal_form"
    postgres.psql(f'DROP DATABASE IF EXISTS "{name}";')
    return devdb.create_database(postgres, name)


def test_the_migration_rewrites_stored_emails_to_their_normal_form(make_app, legacy_database, caplog):
    """Emails stored by the lower-casing rule (migration 0002's schema) still log in."""
    app = make_app(DB_URI=legacy_database)
    stored = [  # as strip().lower() stored them
        "reader@example.com",
        "straße@example.com",
        "\uff41@example.com",
        "strasse@other.com",
        "straße@other.com",  # its normal form is the account above's: kept as it is
    ]
    with app.app_context():
        upgrade(revision="0002")
        password_hash = app.extensions["passwords"].hash("secret")
        with db.engine.begin() as conn:
            for email in stored:
                conn.execute(
                    text("INSERT INTO users (email, password_hash) VALUES (:e, :h)"), {"e": email, "h": password_hash}
                )
        with caplog.at_level("WARNING", logger="alembic.runtime.migration"):
            upgrade()
        db.engine.dispose()
    assert emails(app) == [
        "reader@example.com",
        "strasse@example.com",
        "a@example.com",
        "strasse@other.com",
        "straße@other.com",
    ]
    assert "users.id 5 keeps its email" in caplog.text and "straße" not in caplog.text
    client = app.test_client()
    for email in ("STRASSE@example.com", "straße@example.com", "A@example.com", "\uff41@EXAMPLE.com"):
        assert client.post("/auth/login", json={"email": email, "password": "secret"}).status_code == 200, email


# --- the OpenAPI document -----------------------------------------------------------------------


def test_the_openapi_document_states_the_rules(client):
    spec = client.get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    for schema, field in [("BookIn", "title"), ("BookIn", "author"), ("BookPatch", "title"), ("Credentials", "email")]:
        prop = schemas[schema]["properties"][field]
        assert prop["pattern"] == TEXT_PATTERN, (schema, field)
        assert "control characters" in prop["description"], (schema, field)
    assert "NFKC" in schemas["Credentials"]["properties"]["email"]["description"]
    assert schemas["Credentials"]["properties"]["password"]["pattern"] == "^[^\x00]*$"
    query = {p["name"]: p["schema"] for p in spec["paths"]["/books/"]["get"]["parameters"]}
    assert query == {
        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "cursor": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    }
    (book_id,) = spec["paths"]["/books/{book_id}"]["get"]["parameters"]
    assert book_id["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
    assert "duplicate key" in spec["paths"]["/books/"]["post"]["responses"]["400"]["description"]


@pytest.mark.parametrize(
    "value", [*HOSTILE_TEXT.values(), *FINE_TEXT], ids=[*HOSTILE_TEXT, *(f"fine {i}" for i in range(len(FINE_TEXT)))]
)
def test_the_document_admits_a_title_exactly_when_the_service_does(app, client, owner, value):
    """Read by another regex engine (jsonschema_rs: Rust), the pattern still says what the
    service does, astral characters included."""
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    for body in ({"title": value}, {"title": "ok", "author": value}):
        admitted = jsonschema_rs.validator_for(schemas["BookIn"]).is_valid(body)
        response = client.post("/books/", json=body, headers=owner)
        assert admitted == (response.status_code == 201), (body, response.status_code)
