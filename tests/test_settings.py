"""Settings.from_env and create_app: production refuses to start without what it needs."""

from __future__ import annotations

import secrets

import pytest

from service import create_app
from service.extensions import db
from service.settings import (
    MIN_SECRET_BITS,
    MIN_SECRET_BYTES,
    Settings,
    SettingsError,
    normalise_database_uri,
    secret_entropy_bits,
)
from tests.conftest import TEST_SECRET, empty_tables

STRONG_KEY = TEST_SECRET
PREFIX = "flaskapi-observability: configuration error: "

# Every variable these tests depend on: none may leak in from the real environment.
VARIABLES = (
    "FLASK_ENV",
    "DB_URI",
    "DATABASE_URL",
    "JWT_SECRET_KEY",
    "JWT_ACCESS_TOKEN_EXPIRES",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "DATA_DIR",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_POOL_TIMEOUT",
    "DB_POOL_RECYCLE",
    "DB_CONNECT_TIMEOUT",
    "DB_PING_IDLE_SECONDS",
    "DB_STATEMENT_TIMEOUT_MS",
    "MAX_CONTENT_LENGTH",
    "MAX_DRAIN_BYTES",
    "BOOKS_PAGE_SIZE",
    "TRUSTED_PROXIES",
    "PASSWORD_HASH_TIME_COST",
    "PASSWORD_HASH_MEMORY_KIB",
    "PASSWORD_HASH_PARALLELISM",
    "CRASH_ROUTE_ENABLED",
    "APP_VERSION",
    "LOG_LEVEL",
    "LOG_DIR",
    "LOG_FILE",
    "LOG_TO_FILE",
    "LOG_ROTATE_WHEN",
    "LOG_ROTATE_INTERVAL",
    "LOG_BACKUP_COUNT",
    "LOG_GZIP",
    "LOG_CONSOLE",
    "GUNICORN_THREADS",
    "HASH_THREADS",
    "HASH_QUEUE_MAX",
    "HASH_QUEUE_TIMEOUT",
    "HASH_NICE",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def production(tmp_path, database_uri):
    """Overrides for a production app that can start; tests remove or change one thing.
    Logs stay on stderr (no logs/ directory written into the checkout)."""
    return {
        "FLASK_ENV": "production",
        "DB_URI": database_uri,
        "JWT_SECRET_KEY": STRONG_KEY,
        "DATA_DIR": str(tmp_path),
        "LOG_TO_FILE": "0",
        "PASSWORD_HASH_TIME_COST": "1",
        "PASSWORD_HASH_MEMORY_KIB": "1024",
    }


@pytest.fixture
def started():
    """Apps built directly with create_app: like make_app's, their tables are emptied and their
    pools closed after the test."""
    apps = []
    yield apps
    for app in apps:
        empty_tables(app)


def refused(config) -> str:
    with pytest.raises(SystemExit) as excinfo:
        create_app(config)
    message = excinfo.value.code
    assert isinstance(message, str)
    assert "\n" not in message
    assert message.startswith(PREFIX)
    return message[len(PREFIX) :]


# --- production guards ---------------------------------------------------------------------


def test_production_without_jwt_secret_exits(production):
    del production["JWT_SECRET_KEY"]
    message = refused(production)
    assert message.startswith("JWT_SECRET_KEY")
    assert f"{MIN_SECRET_BYTES} bytes" in message


def test_production_with_empty_jwt_secret_exits(production):
    production["JWT_SECRET_KEY"] = ""
    assert refused(production).startswith("JWT_SECRET_KEY")


def test_production_with_31_byte_secret_exits(production):
    production["JWT_SECRET_KEY"] = "k" * (MIN_SECRET_BYTES - 1)
    assert refused(production).startswith("JWT_SECRET_KEY")


# 30 distinct characters, two of them two bytes long: 32 bytes, random-looking enough.
THIRTY_CHARACTERS = "é7Qk2wZ9pXr4Lm8Ny1Vb5Tc3Hd6Jfü"


def test_secret_length_is_counted_in_bytes(production, started):
    production["JWT_SECRET_KEY"] = "é" * 15 + "x"  # 16 characters, 31 bytes
    assert "shorter than" in refused(production)
    assert (len(THIRTY_CHARACTERS), len(THIRTY_CHARACTERS.encode())) == (30, MIN_SECRET_BYTES)
    production["JWT_SECRET_KEY"] = THIRTY_CHARACTERS
    started.append(create_app(production))


@pytest.mark.parametrize(
    "secret",
    [
        "a" * 32,  # long enough, one character
        "t" * 48,
        "ab" * 16,
        "0123456789" * 4,  # ten distinct characters, 133 bits by character frequency alone
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",  # a run
        "k3J9xQ2mZp" * 4,  # random characters, repeated
        pytest.param(secrets.token_urlsafe(16) * 2, id="token_urlsafe(16)*2"),  # a stable id: same in every process
        "passwordpasswordpasswordpassword1",
        "qwertyuiopasdfghjklzxcvbnm123456",
    ],
)
def test_production_refuses_a_low_entropy_secret(production, secret):
    """A key of few or patterned characters is as guessable as a short one."""
    assert len(secret.encode()) >= MIN_SECRET_BYTES
    message = refused(production | {"JWT_SECRET_KEY": secret})
    assert message.startswith("JWT_SECRET_KEY looks guessable")
    assert f"{MIN_SECRET_BITS} needed" in message and "token_urlsafe(48)" in message
    assert secret not in message  # the one line names the setting, never its value


@pytest.mark.parametrize(
    "generate",
    [lambda: secrets.token_urlsafe(32), lambda: secrets.token_hex(32), lambda: secrets.token_urlsafe(48)],
    ids=["token_urlsafe(32)", "token_hex(32)", "token_urlsafe(48)"],
)
def test_random_secrets_always_pass_the_entropy_estimate(production, started, generate):
    """Fresh draws every run (the least of 100,000 draws is far above the bar: see
    secret_entropy_bits), and one of them starts a production app."""
    assert min(secret_entropy_bits(generate()) for _ in range(2000)) >= MIN_SECRET_BITS + 40
    started.append(create_app(production | {"JWT_SECRET_KEY": generate()}))


def test_only_production_refuses_a_low_entropy_secret(tmp_path, database_uri):
    for env in ("development", "testing"):
        settings = Settings.from_env(
            {"FLASK_ENV": env, "DB_URI": database_uri, "DATA_DIR": str(tmp_path), "JWT_SECRET_KEY": "a" * 32}
        )
        assert settings.jwt_secret_key == "a" * 32


def test_production_without_db_uri_exits(production):
    del production["DB_URI"]
    message = refused(production)
    assert message.startswith("DB_URI")
    assert "set DB_URI=" in message


def test_production_with_neither_names_db_uri_first(production):
    del production["DB_URI"], production["JWT_SECRET_KEY"]
    assert refused(production).startswith("DB_URI")


def test_production_exits_even_when_real_environment_is_development(production, monkeypatch):
    monkeypatch.setenv("FLASK_ENV", "development")
    monkeypatch.setenv("JWT_SECRET_KEY", STRONG_KEY)
    production["JWT_SECRET_KEY"] = "short"  # the override wins over the environment
    assert refused(production).startswith("JWT_SECRET_KEY")


def test_production_with_strong_key_and_db_uri_starts_and_serves(production, started):
    key = secrets.token_urlsafe(48)
    production["JWT_SECRET_KEY"] = key
    app = create_app(production)
    started.append(app)
    settings = app.config["APP_SETTINGS"]
    assert settings.is_production
    assert app.config["TESTING"] is False
    assert app.config["JWT_SECRET_KEY"] == key
    assert app.config["SQLALCHEMY_DATABASE_URI"] == production["DB_URI"]
    client = app.test_client()
    assert client.get("/readyz").get_json() == {"status": "ready", "database": "ok"}
    credentials = {"email": "prod@example.com", "password": "prod-password"}
    assert client.post("/auth/register", json=credentials).status_code == 201
    assert client.post("/auth/login", json=credentials).status_code == 200


def test_production_is_the_default_environment(tmp_path):
    # .flaskenv says development; without it (an empty FLASK_ENV override falls through to the
    # default) the service assumes production and applies its guards.
    with pytest.raises(SettingsError, match=r"^DB_URI"):
        Settings.from_env({"FLASK_ENV": "", "DATA_DIR": str(tmp_path)})


def test_flaskenv_file_is_read_but_overrides_win(tmp_path):
    assert Settings.from_env({"DB_URI": "postgresql://u@h/d", "DATA_DIR": str(tmp_path)}).env == "development"
    assert (
        Settings.from_env({"FLASK_ENV": "testing", "DB_URI": "postgresql://u@h/d", "DATA_DIR": str(tmp_path)}).env
        == "testing"
    )


def test_unknown_environment_is_refused(production):
    production["FLASK_ENV"] = "staging"
    assert refused(production).startswith("FLASK_ENV must be one of")


# --- database URI --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("postgres://u:p@db.example:5432/books", "postgresql+psycopg2://u:p@db.example:5432/books"),
        ("postgresql://u:p@db.example/books", "postgresql+psycopg2://u:p@db.example/books"),
        ("postgresql+psycopg2://u:p@db.example/books", "postgresql+psycopg2://u:p@db.example/books"),
    ],
)
def test_database_uri_is_normalised(given, expected, tmp_path):
    assert normalise_database_uri(given) == expected
    settings = Settings.from_env(
        {"FLASK_ENV": "production", "DATABASE_URL": given, "JWT_SECRET_KEY": STRONG_KEY, "DATA_DIR": str(tmp_path)}
    )
    assert settings.database_uri == expected


def test_db_uri_wins_over_database_url(tmp_path):
    settings = Settings.from_env(
        {
            "FLASK_ENV": "production",
            "DB_URI": "postgresql://a@h/one",
            "DATABASE_URL": "postgres://b@h/two",
            "JWT_SECRET_KEY": STRONG_KEY,
            "DATA_DIR": str(tmp_path),
        }
    )
    assert settings.database_uri == "postgresql+psycopg2://a@h/one"


def test_database_url_alias_starts_production_app(production, database_uri, started):
    del production["DB_URI"]
    assert database_uri.startswith("postgresql+psycopg2://")
    production["DATABASE_URL"] = "postgres://" + database_uri[len("postgresql+psycopg2://") :]
    app = create_app(production)
    started.append(app)
    assert app.config["SQLALCHEMY_DATABASE_URI"] == database_uri
    assert app.test_client().get("/readyz").status_code == 200


def test_database_url_from_real_environment(production, database_uri, monkeypatch, started):
    del production["DB_URI"]
    monkeypatch.setenv("DATABASE_URL", "postgres://" + database_uri[len("postgresql+psycopg2://") :])
    app = create_app(production)
    started.append(app)
    assert app.config["SQLALCHEMY_DATABASE_URI"] == database_uri


# --- numbers and flags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("DB_POOL_SIZE", "abc", "DB_POOL_SIZE must be an integer, got 'abc'"),
        ("DB_POOL_SIZE", "1.5", "DB_POOL_SIZE must be an integer, got '1.5'"),
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE must be >= 1, got 0"),
        ("DB_MAX_OVERFLOW", "-1", "DB_MAX_OVERFLOW must be >= 0, got -1"),
        ("JWT_ACCESS_TOKEN_EXPIRES", "soon", "JWT_ACCESS_TOKEN_EXPIRES must be an integer, got 'soon'"),
        ("MAX_CONTENT_LENGTH", "10", "MAX_CONTENT_LENGTH must be >= 1024, got 10"),
        ("MAX_DRAIN_BYTES", "-1", "MAX_DRAIN_BYTES must be >= 0, got -1"),
        ("DB_POOL_TIMEOUT", "fast", "DB_POOL_TIMEOUT must be a number, got 'fast'"),
        ("CRASH_ROUTE_ENABLED", "maybe", "CRASH_ROUTE_ENABLED must be a boolean"),
        ("DB_POOL_TIMEOUT", "nan", "DB_POOL_TIMEOUT must be a finite number, got 'nan'"),
        ("HASH_THREADS", "0", "HASH_THREADS must be >= 1, got 0"),
        ("HASH_QUEUE_MAX", "0", "HASH_QUEUE_MAX must be >= 1, got 0"),
        ("HASH_QUEUE_TIMEOUT", "0", "HASH_QUEUE_TIMEOUT must be > 0, got 0.0"),
        ("HASH_QUEUE_TIMEOUT", "-1", "HASH_QUEUE_TIMEOUT must be >= 0.0, got -1.0"),
        ("HASH_QUEUE_TIMEOUT", "inf", "HASH_QUEUE_TIMEOUT must be a finite number, got 'inf'"),
        ("HASH_QUEUE_TIMEOUT", "soon", "HASH_QUEUE_TIMEOUT must be a number, got 'soon'"),
        ("HASH_NICE", "20", "HASH_NICE must be <= 19, got 20"),
        ("HASH_NICE", "-1", "HASH_NICE must be >= 0, got -1"),
    ],
)
def test_invalid_values_exit_naming_the_variable(production, name, value, expected):
    production[name] = value
    assert refused(production).startswith(expected)


def test_settings_error_from_from_env(tmp_path):
    with pytest.raises(SettingsError, match=r"^DB_POOL_SIZE must be an integer, got 'abc'$"):
        Settings.from_env(
            {"FLASK_ENV": "testing", "DB_URI": "postgresql://u@h/d", "DATA_DIR": str(tmp_path), "DB_POOL_SIZE": "abc"}
        )


def test_invalid_value_in_real_environment_exits(production, monkeypatch):
    monkeypatch.setenv("DB_POOL_SIZE", "abc")
    assert refused(production).startswith("DB_POOL_SIZE must be an integer")


def test_override_wins_over_invalid_environment(production, monkeypatch, started):
    monkeypatch.setenv("DB_POOL_SIZE", "abc")
    production["DB_POOL_SIZE"] = "3"
    app = create_app(production)
    started.append(app)
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_size"] == 3


def test_settings_reach_the_app(make_app):
    app = make_app(
        DB_POOL_SIZE="2",
        DB_MAX_OVERFLOW="1",
        DB_POOL_TIMEOUT="1.5",
        JWT_ACCESS_TOKEN_EXPIRES="90",
        MAX_CONTENT_LENGTH="4096",
        BOOKS_PAGE_SIZE="7",
    )
    options = app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert (options["pool_size"], options["max_overflow"], options["pool_timeout"]) == (2, 1, 1.5)
    assert app.config["JWT_ACCESS_TOKEN_EXPIRES"].total_seconds() == 90
    assert app.config["MAX_CONTENT_LENGTH"] == 4096
    assert app.config["BOOKS_PAGE_SIZE"] == 7
    with app.app_context():
        assert db.engine.pool.size() == 2


def test_defaults(tmp_path):
    settings = Settings.from_env(
        {
            "FLASK_ENV": "production",
            "DB_URI": "postgresql://u@h/d",
            "JWT_SECRET_KEY": STRONG_KEY,
            "DATA_DIR": str(tmp_path),
        }
    )
    assert settings.crash_route_enabled is False
    assert settings.page_size_default == 20
    assert settings.jwt_access_token_expires == 3600
    assert (settings.jwt_issuer, settings.jwt_audience) == ("flaskapi-observability", "flaskapi-observability-api")
    assert settings.max_content_length == 64 * 1024
    assert settings.max_drain_bytes == 10 * 1024 * 1024
    assert (settings.password_time_cost, settings.password_memory_cost, settings.password_parallelism) == (
        2,
        19 * 1024,
        1,
    )
    assert (settings.hash_threads, settings.hash_queue_max, settings.hash_queue_timeout, settings.hash_nice) == (
        1,
        256,
        30.0,
        10,
    )
    # a connection per thread that serves requests: the request threads and the hashing thread
    assert (settings.gunicorn_threads, settings.pool_size) == (4, 5)


def test_sync_workers_have_no_hashing_threads_to_pool_for(tmp_path):
    config = {"FLASK_ENV": "testing", "DB_URI": "postgresql://u@h/d", "DATA_DIR": str(tmp_path)}
    assert Settings.from_env({**config, "GUNICORN_THREADS": "1", "HASH_THREADS": "3"}).pool_size == 1
    assert Settings.from_env({**config, "GUNICORN_THREADS": "2", "HASH_THREADS": "3"}).pool_size == 5


def test_development_secret_is_generated_once_and_kept(tmp_path):
    config = {"FLASK_ENV": "development", "DB_URI": "postgresql://u@h/d", "DATA_DIR": str(tmp_path)}
    first = Settings.from_env(config).jwt_secret_key
    second = Settings.from_env(config).jwt_secret_key
    assert first == second
    assert len(first.encode()) >= MIN_SECRET_BYTES
    secret_file = tmp_path / "dev-jwt-secret"
    assert secret_file.read_text().strip() == first
    assert secret_file.stat().st_mode & 0o777 == 0o600
    other = Settings.from_env({**config, "DATA_DIR": str(tmp_path / "elsewhere")}).jwt_secret_key
    assert other != first


# --- crash route ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "on", "yes"])
def test_crash_route_flag_parses(tmp_path, value):
    # Parsed only: an app with the route enabled is never built in-process (it calls os._exit).
    settings = Settings.from_env(
        {
            "FLASK_ENV": "testing",
            "DB_URI": "postgresql://u@h/d",
            "DATA_DIR": str(tmp_path),
            "CRASH_ROUTE_ENABLED": value,
        }
    )
    assert settings.crash_route_enabled is True


def test_crash_route_is_off_by_default(client, app):
    assert app.config["APP_SETTINGS"].crash_route_enabled is False
    assert "/auth/crash" not in {rule.rule for rule in app.url_map.iter_rules()}
    response = client.get("/auth/crash")
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]["code"] == "not_found"


def test_crash_route_is_off_by_default_in_production(production, started):
    app = create_app(production)
    started.append(app)
    response = app.test_client().get("/auth/crash")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_trusted_proxy_supplies_the_client_address(make_app):
    """Behind nginx (TRUSTED_PROXIES=1) the access line's remote_addr is the client's, taken
    from X-Forwarded-For; without it, a client cannot spoof its address with that header."""
    headers = {"X-Forwarded-For": "203.0.113.7"}
    behind = make_app(TRUSTED_PROXIES="1").test_client()
    direct = make_app().test_client()
    seen = {}
    for name, client in (("behind", behind), ("direct", direct)):

        @client.application.get("/__addr")
        def addr():
            from flask import request

            return {"remote_addr": request.remote_addr}

        seen[name] = client.get("/__addr", headers=headers).get_json()["remote_addr"]
    assert seen == {"behind": "203.0.113.7", "direct": "127.0.0.1"}
