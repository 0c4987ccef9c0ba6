"""Fuzz the API from its own OpenAPI document (schemathesis 4.x, in-process over WSGI).

Every operation in /openapi.json is exercised with generated valid and invalid requests, once
anonymously and once with a real bearer token. Each response must:

* never be a 5xx;
* match the documented status codes, content types and response schemas (schemathesis's
  built-in checks: the spec is a promise to clients, so it must be honest);
* for every 4xx, be the one JSON error shape with `error.status` equal to the HTTP status.

Every request goes to an app from `make_app()` (tables emptied after each test). The schema
itself is loaded once at import from an app that never touches a database (pytest collects the
operations before any fixture exists); `test_spec_is_the_served_spec` proves the two documents
are the same. (`schemathesis.pytest.from_fixture` would avoid that, but schemathesis 4.32.5's lazy
schemas write `request.node._nodeid`, which pytest 9.2 no longer has: AttributeError.)
"""

from __future__ import annotations

import tempfile

import jsonschema_rs
import pytest
import schemathesis
from conftest import TEST_SECRET
from hypothesis import HealthCheck, settings

from service import create_app

FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,  # no example database: a run does not depend on earlier runs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
    derandomize=True,  # a failure found once is found again on the next run
)

OWNER = {"email": "fuzz-owner@example.com", "password": "fuzz-password"}
OTHER = {"email": "fuzz-other@example.com", "password": "other-password"}


@pytest.fixture
def fuzz_app(make_app):
    return make_app()


def _spec_app():
    """Same code and settings as `make_app()`, but a database URI that is never connected to:
    building the app and serving /openapi.json open no connection."""
    return create_app(
        {
            "FLASK_ENV": "testing",
            "JWT_SECRET_KEY": TEST_SECRET,
            "DB_URI": "postgresql+psycopg2://spec-only@127.0.0.1:9/unused",
            "DATA_DIR": tempfile.gettempdir(),
        }
    )


SPEC_APP = _spec_app()
schema = schemathesis.openapi.from_wsgi("/openapi.json", SPEC_APP)


def _token(client, credentials: dict) -> str:
    registered = client.post("/auth/register", json=credentials)
    assert registered.status_code == 201, registered.get_json()
    response = client.post("/auth/login", json=credentials)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["token"]


@pytest.fixture
def books(fuzz_app):
    """Two users, one book each: the token's own book and a book the token may not change."""
    client = fuzz_app.test_client()
    owner = {"Authorization": f"Bearer {_token(client, OWNER)}"}
    other = {"Authorization": f"Bearer {_token(client, OTHER)}"}
    own = client.post("/books/", json={"title": "Own book", "author": "Me"}, headers=owner)
    foreign = client.post("/books/", json={"title": "Someone else's"}, headers=other)
    assert own.status_code == 201 and foreign.status_code == 201
    return {"headers": owner, "own": own.get_json()["id"], "foreign": foreign.get_json()["id"]}


class ClientResponse:
    """A Flask test response seen through the interface `assert_error_shape` reads."""

    def __init__(self, response) -> None:
        self.status_code = response.status_code
        self.headers = {k.lower(): [v] for k, v in response.headers.items()}
        self.text = response.get_data(as_text=True)
        self._json = response.get_json(silent=True)

    def json(self):
        return self._json


def assert_error_shape(response) -> None:
    status = response.status_code
    assert status < 500, f"server error {status}: {response.text[:500]}"
    if 400 <= status < 500:
        content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: lists
        assert content_type.startswith("application/json"), response.headers
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error, dict), body
        assert type(error.get("status")) is int and error["status"] == status, body
        assert isinstance(error.get("code"), str) and error["code"], body
        assert isinstance(error.get("message"), str) and error["message"], body
        assert isinstance(error.get("details"), dict), body


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_anonymous(case, books, fuzz_app):
    response = case.call_and_validate(app=fuzz_app)
    assert_error_shape(response)
    secured = bool(case.operation.definition.raw.get("security"))
    same_method = case.method.upper() == case.operation.method.upper()  # not an OPTIONS probe
    if secured and same_method and response.status_code < 400:
        pytest.fail(
            f"{case.method} {case.formatted_path} succeeded without a token: "
            f"{response.status_code} {response.text[:200]!r}"
        )


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_authenticated(case, books, fuzz_app):
    response = case.call_and_validate(headers=books["headers"], app=fuzz_app)
    assert_error_shape(response)


# Generated `book_id`s almost never name a book that exists, so the found / not-the-owner paths
# of every /books/{book_id} operation are called explicitly, through the same checks.
BOOK_BODIES = {"GET": None, "DELETE": None, "PUT": {"title": "Replaced", "author": None}, "PATCH": {"title": "Patched"}}


@pytest.mark.parametrize("method", list(BOOK_BODIES))
@pytest.mark.parametrize("whose", ["own", "foreign"])
@pytest.mark.parametrize("token", [True, False], ids=["token", "anonymous"])
def test_existing_books_match_the_spec(method, whose, token, books, fuzz_app):
    operation = schema["/books/{book_id}"][method]
    kwargs = {"path_parameters": {"book_id": str(books[whose])}}
    if BOOK_BODIES[method] is not None:
        kwargs.update(body=BOOK_BODIES[method], media_type="application/json")
    case = operation.Case(**kwargs)
    headers = books["headers"] if token else None
    response = case.call_and_validate(headers=headers, app=fuzz_app)
    assert_error_shape(response)
    expected = {
        ("GET", "own"): 200,
        ("GET", "foreign"): 200,
        ("PUT", "own"): 200,
        ("PATCH", "own"): 200,
        ("DELETE", "own"): 204,
        ("PUT", "foreign"): 403,
        ("PATCH", "foreign"): 403,
        ("DELETE", "foreign"): 403,
    }[(method, whose)]
    if not token and method != "GET":
        expected = 401
    assert response.status_code == expected, response.text


# Ids no book can have: the generated string ids rarely hit these exact edges.
IMPOSSIBLE_IDS = ["0", str(2**63), "9" * 40]


@pytest.mark.parametrize("book_id", IMPOSSIBLE_IDS)
@pytest.mark.parametrize("method", list(BOOK_BODIES))
def test_impossible_book_ids_are_404_for_every_method(method, book_id, books, fuzz_app):
    body = BOOK_BODIES[method]
    response = fuzz_app.test_client().open(f"/books/{book_id}", method=method, json=body, headers=books["headers"])
    assert response.status_code == 404, (response.status_code, dict(response.headers), response.get_json())
    assert response.get_json()["error"]["code"] == "not_found"


def test_book_id_is_documented_as_the_integer_it_is():
    """Clients and fuzzers read the parameter's type from the spec; the route takes 1..2**63-1."""
    for method, operation in (
        SPEC_APP.test_client().get("/openapi.json").get_json()["paths"]["/books/{book_id}"].items()
    ):
        (parameter,) = [p for p in operation["parameters"] if p["name"] == "book_id"]
        assert parameter["in"] == "path" and parameter["required"] is True
        assert parameter["schema"].get("type") == "integer", (method, parameter)
        assert parameter["schema"].get("minimum") == 1, (method, parameter)


# Bodies with a NUL character: the service refuses them (Postgres text cannot hold NUL), so the
# spec must not admit them either, or every generated client and fuzzer sends them as valid.
# (Random generation finds this too; these cases find it on every run.)
NUL_BODIES = [
    ("POST", "/auth/register", {"email": "nul@example.com", "password": "pass\x00word"}),
    ("POST", "/books/", {"title": "Du\x00ne"}),
    ("PUT", "/books/{book_id}", {"title": "Dune", "author": "Frank\x00Herbert"}),
    ("PATCH", "/books/{book_id}", {"title": "Du\x00ne"}),
]


@pytest.mark.parametrize("method, path, body", NUL_BODIES, ids=[f"{m} {p}" for m, p, _ in NUL_BODIES])
def test_spec_admits_a_body_exactly_when_the_service_does(method, path, body, books, fuzz_app):
    client = fuzz_app.test_client()
    document = client.get("/openapi.json").get_json()
    request_body = document["paths"][path][method.lower()]["requestBody"]
    ref = request_body["content"]["application/json"]["schema"]["$ref"]
    body_schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    admitted = jsonschema_rs.validator_for(body_schema).is_valid(body)
    response = client.open(
        path.replace("{book_id}", str(books["own"])), method=method, json=body, headers=books["headers"]
    )
    assert_error_shape(ClientResponse(response))
    assert admitted == (response.status_code != 422), (
        f"spec {'admits' if admitted else 'rejects'} {body!r}; service answered "
        f"{response.status_code} {response.get_json()}"
    )


def test_spec_is_the_served_spec(fuzz_app):
    """The fuzzed document is exactly what the app under test serves."""
    served = fuzz_app.test_client().get("/openapi.json")
    assert served.status_code == 200
    assert served.get_json() == SPEC_APP.test_client().get("/openapi.json").get_json()
