"""flaskapi-observability: a books API that shows how it behaves under load and faults.

`create_app` is the only entry point (`gunicorn "service:create_app()"`, `flask --app service`);
it builds the app in named steps and nothing runs at import time.
"""

from __future__ import annotations

from collections.abc import Mapping

from apiflask import APIFlask

from service.settings import PROJECT_ROOT, Settings, SettingsError


def create_app(config: Mapping[str, object] | None = None) -> APIFlask:
    """Build the app. `config` overrides environment variables by name (tests use it).

    A configuration that must not run (say, production without a strong JWT_SECRET_KEY) exits
    with one line naming the setting, for the flask CLI and gunicorn alike."""
    try:
        settings = Settings.from_env(config)
    except SettingsError as exc:
        raise SystemExit(f"flaskapi-observability: configuration error: {exc}") from None
    app = APIFlask(
        __name__,
        title="flaskapi-observability",
        version=settings.version,
        spec_path="/openapi.json",
        docs_path="/docs",
        enable_openapi=settings.docs_enabled,  # off in production unless DOCS_ENABLED (service/docs.py)
    )
    configure_logging(settings)
    # One spelling per URL: werkzeug would answer `/books//1` with a 308 to `/books/1`, an HTML
    # page whose Location is built from the client's Host header. Unmerged, it is a JSON 404.
    app.url_map.merge_slashes = False
    configure(app, settings)
    register_request_context(app)
    register_extensions(app, settings)
    register_throttle(app, settings)
    register_observability(app, settings)
    register_blueprints(app, settings)
    register_hashing_bulkhead(app)
    register_json(app)
    register_request_guards(app)
    register_errorhandlers(app)
    register_openapi(app)
    register_docs(app, settings)
    register_commands(app)
    register_wsgi_guards(app, settings)
    register_security_headers(app)
    trust_proxies(app, settings)
    return app


def configure_logging(settings: Settings) -> None:
    """Before the app exists, as Flask's docs advise; a no-op under gunicorn, which already
    applied the same configuration (deploy/gunicorn.conf.py)."""
    import logging_conf

    logging_conf.configure(settings.logging_config())


def register_request_context(app: APIFlask) -> None:
    """First request hooks: the request id exists before any other hook can answer or fail."""
    from service.observability import request_log

    request_log.init_app(app)


def configure(app: APIFlask, settings: Settings) -> None:
    from service.auth import tokens
    from service.books.schemas import PAGE_MAX
    from service.database import Deadlines, engine_options
    from service.errors import ERROR_SCHEMA

    database_uri = settings.database_uri
    if database_uri is None:
        from service import devdb

        database_uri = devdb.ensure_database(devdb.pgdata_for(settings.data_dir))
    # The client-side deadlines of every round trip to the database (service/database.py).
    deadlines = app.extensions["db_deadlines"] = Deadlines.from_settings(settings)
    app.config.update(
        APP_SETTINGS=settings,
        TESTING=settings.env == "testing",
        MAX_CONTENT_LENGTH=settings.max_content_length,
        BOOKS_PAGE_SIZE=min(settings.page_size_default, PAGE_MAX),  # both bounds checked once here
        SQLALCHEMY_DATABASE_URI=database_uri,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(settings, deadlines),
        **tokens.flask_config(settings),
        HTTP_ERROR_SCHEMA=ERROR_SCHEMA,
        VALIDATION_ERROR_SCHEMA=ERROR_SCHEMA,
        SECURITY_SCHEMES={"BearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        INFO={
            "description": "Books API with JWT auth. Every error has the shape "
            '{"error": {"status", "code", "message", "details", "request_id"}}.'
        },
    )


def register_extensions(app: APIFlask, settings: Settings) -> None:
    from service.auth import tokens
    from service.auth.passwords import Passwords
    from service.database import handle_timeouts, ping_idle_connections
    from service.extensions import db, jwt, migrate

    db.init_app(app)
    with app.app_context():
        ping_idle_connections(db.engine, idle_seconds=settings.db_ping_idle_seconds)
        handle_timeouts(db.engine)
    migrate.init_app(app, db, directory=str(PROJECT_ROOT / "migrations"))
    tokens.init_app(app, jwt)  # the one token policy: what a token must carry, checked before any view
    app.extensions["passwords"] = Passwords(
        time_cost=settings.password_time_cost,
        memory_cost=settings.password_memory_cost,
        parallelism=settings.password_parallelism,
    )


def register_throttle(app: APIFlask, settings: Settings) -> None:
    """Brute-force and abuse limits on login and registration, counted in Postgres so that every
    worker and host shares them (service/auth/throttle.py); the views ask it before any argon2
    work. Off with THROTTLE_ENABLED=0."""
    from service.auth import throttle

    throttle.init_app(app, settings)


def register_blueprints(app: APIFlask, settings: Settings) -> None:
    from service import health
    from service.auth import views as auth_views
    from service.books import views as books_views

    app.register_blueprint(health.bp)
    app.register_blueprint(auth_views.bp)
    app.register_blueprint(books_views.bp)
    if settings.crash_route_enabled:
        from service.auth.crash import crash

        app.add_url_rule("/auth/crash", "auth_crash", crash, methods=["GET"])
    if settings.env == "testing":
        from service import testing_routes

        testing_routes.init_app(app)

    documented = {"docs": "/docs", "openapi": "/openapi.json"} if settings.docs_enabled else {}

    @app.get("/")
    @app.doc(summary="Service index")
    def index():
        return {"service": "flaskapi-observability", "version": settings.version, **documented}


def register_hashing_bulkhead(app: APIFlask) -> None:
    """The 503 auth_busy of a hashing request the gunicorn worker sheds, answered before any
    view, after the request id and the metrics' hooks (service/hashing_bulkhead.py). After the
    blueprints, whose routes it reads."""
    from service import hashing_bulkhead

    hashing_bulkhead.init_app(app)


def register_json(app: APIFlask) -> None:
    """Request bodies are read as standard JSON only: a duplicate key, NaN or Infinity is
    refused (400 from the request guards), so no two readers of a body disagree on it."""
    from service.strict_json import StrictJSONProvider

    app.json = StrictJSONProvider(app)


def register_request_guards(app: APIFlask) -> None:
    """Checks that refuse a request before any view runs (a body the WSGI guards refused, a body
    that is not JSON). After the observability hooks (register_observability), which must see
    every request."""
    from service.guards import refuse_unread_body, require_json_body

    app.before_request(refuse_unread_body)
    app.before_request(require_json_body)


def register_wsgi_guards(app: APIFlask, settings: Settings) -> None:
    """Around the Flask app, before it reads anything: a method the API does not serve is
    answered 405 (so no metric label is ever a client's invention), and a body is whole and
    within MAX_CONTENT_LENGTH or refused, drained so a direct client reads the 413 (guards.py).
    Inside ProxyFix (trust_proxies, next), so its access line has the client's address."""
    from service.guards import InputBounds

    app.wsgi_app = InputBounds(
        app.wsgi_app,
        url_map=app.url_map,
        max_content_length=settings.max_content_length,
        max_drain_bytes=settings.max_drain_bytes,
    )


def register_security_headers(app: APIFlask) -> None:
    """Around the WSGI guards, so their answers get them too: nosniff on every response,
    no-store on every /auth/ response and every response to a request with a token
    (service/security_headers.py)."""
    from service.security_headers import SecurityHeaders

    app.wsgi_app = SecurityHeaders(app.wsgi_app)


def register_errorhandlers(app: APIFlask) -> None:
    from service.errors import register_error_handlers

    register_error_handlers(app)


def register_openapi(app: APIFlask) -> None:
    """Corrections to the generated OpenAPI document (service/openapi.py)."""
    from service.models import MAX_ID
    from service.openapi import register_spec_processor

    register_spec_processor(app, max_id=MAX_ID)


def register_docs(app: APIFlask, settings: Settings) -> None:
    """/docs with Swagger UI's files served from the pinned package, never a CDN, and the
    document's `servers` from PUBLIC_URL, never from a request's Host (service/docs.py)."""
    from service import docs

    docs.init_app(app, settings)


def register_commands(app: APIFlask) -> None:
    from service.commands import db_custom

    app.cli.add_command(db_custom)


def register_observability(app: APIFlask, settings: Settings) -> None:
    """HTTP and pool metrics (when a multiprocess metrics dir is set) and Sentry (when a DSN is).
    Before the request guards' hooks: a request they refuse (a body that is not JSON) is still
    timed by the exporter's before_request."""
    from service.observability import metrics, sentry

    metrics.init_app(app, settings)
    sentry.init_app(app, settings)


def trust_proxies(app: APIFlask, settings: Settings) -> None:
    """Behind nginx (TRUSTED_PROXIES=1): the client's address and scheme come from the proxy's
    X-Forwarded-* headers, trusted for exactly that many hops and never from a client directly."""
    if settings.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
