"""/docs and /openapi.json: the page loads only the service's own files, the routes are off in
production unless DOCS_ENABLED says otherwise, and the document's `servers` never comes from a
request. The page rendered in a real browser with no network: tests/test_docs_browser.py."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

from service.settings import Settings, SettingsError
from tests.conftest import TEST_SECRET

CONTENT_TYPES = {".css": ("text/css",), ".js": ("text/javascript", "application/javascript"), ".png": ("image/png",)}
EVIL_HOST = "attacker.example"


class AssetLinks(HTMLParser):
    """Every URL the page makes the browser load by itself: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and tag in ("script", "link", "img", "iframe", "source"):
                self.urls.append(attrs[name])


def asset_urls(html: str) -> list[str]:
    parser = AssetLinks()
    parser.feed(html)
    return parser.urls


def assert_not_found(response) -> None:
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"status", "code", "message", "details", "request_id", "trace_id"}
    assert error["status"] == 404 and error["code"] == "not_found"


def production(make_app, **extra):
    return make_app(FLASK_ENV="production", LOG_TO_FILE="0", **extra)


def test_the_docs_page_loads_only_same_origin_assets_and_each_answers(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    urls = asset_urls(html)
    # The stylesheet, the two scripts and the icon; nothing from a CDN or apiflask.com.
    assert len(urls) == 4, urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/docs/assets/"), url
    assert "cdn." not in html and "apiflask.com" not in html and "//" not in "".join(urls)
    assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io

    for url in urls:
        with client.get(url) as response:
            suffix = url[url.rindex(".") :]
            assert response.status_code == 200, url
            assert response.mimetype in CONTENT_TYPES[suffix], (url, response.content_type)
            assert len(response.get_data()) > 500, url
            if url.endswith("swagger-ui-bundle.js"):
                assert "SwaggerUIBundle" in response.get_data(as_text=True)

    # A file the package does not have, or a path out of its folder: the one 404.
    assert_not_found(client.get("/docs/assets/no-such-file.js"))
    assert_not_found(client.get("/docs/assets/../__init__.py"))
    # The assets are not API operations.
    assert not [path for path in client.get("/openapi.json").get_json()["paths"] if path.startswith("/docs")]


def test_docs_and_spec_are_off_in_production(make_app):
    client = production(make_app).test_client()
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui.css", "/docs/oauth2-redirect"):
        assert_not_found(client.get(path))
    assert set(client.get("/").get_json()) == {"service", "version"}


def test_docs_enabled_turns_them_on_in_production_and_off_elsewhere(make_app):
    client = production(make_app, DOCS_ENABLED="1").test_client()
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").get_json()["openapi"].startswith("3.")
    with client.get("/docs/assets/swagger-ui.css") as response:
        assert response.status_code == 200
    assert client.get("/").get_json()["docs"] == "/docs"

    off = make_app(DOCS_ENABLED="0").test_client()
    assert_not_found(off.get("/docs"))
    assert_not_found(off.get("/openapi.json"))


def test_servers_never_come_from_the_request(make_app):
    """A fresh app (a restarted worker) whose first caller sends a forged Host: the document
    names no server, and a later caller with another Host gets the same bytes."""
    client = make_app().test_client()
    first = client.get("/openapi.json", headers={"Host": EVIL_HOST})
    second = client.get("/openapi.json", headers={"Host": "api.example.com"})
    assert first.status_code == second.status_code == 200
    assert first.get_data() == second.get_data()
    assert "servers" not in first.get_json()
    assert EVIL_HOST not in first.get_data(as_text=True)
    forwarded = client.get("/openapi.json", headers={"X-Forwarded-Host": EVIL_HOST, "Host": EVIL_HOST})
    assert forwarded.get_data() == first.get_data()


def test_servers_come_from_public_url(make_app):
    client = make_app(PUBLIC_URL="https://api.example.com/").test_client()
    first = client.get("/openapi.json", headers={"Host": EVIL_HOST})
    second = client.get("/openapi.json", headers={"Host": "other.example"})
    assert first.get_json()["servers"] == [{"url": "https://api.example.com"}]
    assert first.get_data() == second.get_data() and EVIL_HOST not in first.get_data(as_text=True)


@pytest.mark.parametrize(
    "value",
    [
        "api.example.com",
        "ftp://api.example.com",
        "https://",
        "https://user:pw@api.example.com",
        "https://api.example.com/?x=1",
        "https://api.example.com/#top",
        "https://api.example.com:99999",
        "https://api example.com",
        "javascript:alert(1)",
    ],
)
def test_public_url_must_be_an_http_url(value, tmp_path):
    with pytest.raises(SettingsError, match="PUBLIC_URL must be an absolute http"):
        Settings.from_env({"FLASK_ENV": "testing", "DATA_DIR": str(tmp_path), "PUBLIC_URL": value})


def test_public_url_defaults(tmp_path):
    base = {"DATA_DIR": str(tmp_path), "JWT_SECRET_KEY": TEST_SECRET, "DB_URI": "postgresql://u@h/d"}
    assert Settings.from_env({**base, "FLASK_ENV": "production"}).docs_enabled is False
    assert Settings.from_env({**base, "FLASK_ENV": "development"}).docs_enabled is True
    settings = Settings.from_env({**base, "FLASK_ENV": "testing", "PUBLIC_URL": "http://127.0.0.1:8080/api/"})
    assert settings.public_url == "http://127.0.0.1:8080/api"
    assert json.dumps(settings.public_url)  # a plain string
