"""One typed settings object, read once from the environment (and `.flaskenv` / `.env`).

Every knob has a default that is safe in production, or no default where one would be a risk
(`JWT_SECRET_KEY` and `DB_URI` must be given in production). `Settings.from_env` is the only
place that reads configuration; the rest of the service receives a `Settings`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import secrets
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = ("development", "production", "testing")
MIN_SECRET_BYTES = 32
MIN_SECRET_BITS = 128  # estimated by secret_entropy_bits
# How to make a good key, quoted by the refusals (a command, not a secret).
GENERATE_SECRET = "JWT_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"  # noqa: S105


class SettingsError(RuntimeError):
    """A configuration that must not start; the message says what to set."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def _number(env: Mapping[str, str], name: str, default, minimum, parse, kind: str, maximum=None):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value):  # float("nan") compares false with every bound, float("inf") passes them
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be <= {maximum}, got {value}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    return _number(env, name, default, minimum, int, "an integer", maximum)


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum, float, "a number")


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...], *, upper: bool = True) -> str:
    value = env.get(name) or default
    value = value.upper() if upper else value
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def normalise_database_uri(uri: str) -> str:
    """Accept the `postgres://` spelling many hosts hand out; SQLAlchemy wants `postgresql`."""
    if uri.startswith("postgres://"):
        uri = "postgresql://" + uri[len("postgres://") :]
    if uri.startswith("postgresql://"):
        uri = "postgresql+psycopg2://" + uri[len("postgresql://") :]
    return uri


def read_environment(overrides: Mapping[str, object] | None = None) -> dict[str, str]:
    """The process environment over `.env` over `.flaskenv` (Flask's CLI order), then overrides."""
    merged: dict[str, str] = {}
    for name in (".flaskenv", ".env"):
        path = PROJECT_ROOT / name
        if path.is_file():
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ)
    for key, value in (overrides or {}).items():
        merged[key] = "" if value is None else str(value)
    return merged


@dataclasses.dataclass(frozen=True)
class Settings:
    env: str
    database_uri: str | None  # None: use the embedded development Postgres in data_dir
    jwt_secret_key: str
    jwt_access_token_expires: int
    jwt_issuer: str
    jwt_audience: str
    data_dir: Path
    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_recycle: int
    db_connect_timeout: int
    db_ping_idle_seconds: float
    db_statement_timeout_ms: int
    db_client_timeout_ms: int  # 0: statements have no client-side deadline
    db_ping_timeout_ms: int
    max_content_length: int
    max_drain_bytes: int
    page_size_default: int
    password_time_cost: int
    password_memory_cost: int
    password_parallelism: int
    crash_route_enabled: bool
    version: str
    log_level: str
    log_dir: Path | None  # None: no log file, stderr only
    log_file: str
    log_rotate_when: str
    log_rotate_interval: int
    log_backup_count: int
    log_gzip: bool
    log_console: bool
    metrics_enabled: bool
    metrics_bind: str
    sentry_dsn: str | None
    sentry_environment: str | None
    sentry_traces_sample_rate: float
    gunicorn_threads: int
    hash_threads: int
    hash_queue_max: int
    hash_queue_timeout: float
    hash_nice: int
    trusted_proxies: int
    throttle_enabled: bool
    throttle_register_limit: int
    throttle_register_window: int
    throttle_login_limit: int
    throttle_login_window: int
    throttle_address_failures_limit: int
    throttle_address_failures_window: int
    throttle_account_free_failures: int
    throttle_account_delay: int
    throttle_account_delay_max: int
    throttle_account_reset: int
    throttle_store_timeout_ms: int
    docs_enabled: bool
    public_url: str | None  # None: the OpenAPI document names no server

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    def logging_config(self) -> dict:
        import logging_conf

        return logging_conf.build(
            level=self.log_level,
            log_dir=self.log_dir,
            filename=self.log_file,
            when=self.log_rotate_when,
            interval=self.log_rotate_interval,
            backup_count=self.log_backup_count,
            gzip=self.log_gzip,
            console=self.log_console,
        )

    @classmethod
    def from_env(cls, overrides: Mapping[str, object] | None = None) -> Settings:
        env = read_environment(overrides)
        flask_env = (env.get("FLASK_ENV") or "production").strip().lower()
        if flask_env not in ENVIRONMENTS:
            raise SettingsError(f"FLASK_ENV must be one of {', '.join(ENVIRONMENTS)}, got {flask_env!r}")
        production = flask_env == "production"
        data_dir = Path(env.get("DATA_DIR") or PROJECT_ROOT / ".data")
        threads = _int(env, "GUNICORN_THREADS", 4, minimum=1)
        # The hashing bulkhead's threads (service/hashing_bulkhead.py): gthread workers only.
        hash_threads = _int(env, "HASH_THREADS", 1, minimum=1)

        database_uri = env.get("DB_URI") or env.get("DATABASE_URL") or None
        if database_uri:
            database_uri = normalise_database_uri(database_uri)
        elif production:
            raise SettingsError(
                "DB_URI is not set: set DB_URI=postgresql+psycopg2://USER:PASSWORD@HOST/DBNAME "
                "(production never starts the embedded development database)"
            )

        secret = env.get("JWT_SECRET_KEY") or ""
        if production:
            _check_secret(secret)
        if not secret:
            secret = _development_secret(data_dir)

        settings = cls(
            env=flask_env,
            database_uri=database_uri,
            jwt_secret_key=secret,
            jwt_access_token_expires=_int(env, "JWT_ACCESS_TOKEN_EXPIRES", 3600, minimum=1),
            # Set in every token and required of every token (service/auth/tokens.py): a token
            # another service signed with a shared key is not one of ours.
            jwt_issuer=env.get("JWT_ISSUER") or "flaskapi-observability",
            jwt_audience=env.get("JWT_AUDIENCE") or "flaskapi-observability-api",
            data_dir=data_dir,
            # A request holds at most one connection at a time and never while hashing, so one
            # connection per thread that serves requests (the request threads, and with gthread
            # the hashing threads) is enough; a pool that size cannot run dry.
            pool_size=_int(env, "DB_POOL_SIZE", threads + (hash_threads if threads > 1 else 0), minimum=1),
            max_overflow=_int(env, "DB_MAX_OVERFLOW", 0, minimum=0),
            pool_timeout=_float(env, "DB_POOL_TIMEOUT", 3.0, minimum=0.1),
            pool_recycle=_int(env, "DB_POOL_RECYCLE", 1800, minimum=0),
            db_connect_timeout=_int(env, "DB_CONNECT_TIMEOUT", 3, minimum=1),
            db_ping_idle_seconds=_float(env, "DB_PING_IDLE_SECONDS", 1.0, minimum=0.0),
            db_statement_timeout_ms=_int(env, "DB_STATEMENT_TIMEOUT_MS", 10000, minimum=0),
            # Client-side deadlines (service/database.py): a frozen or unreachable database never
            # fires the server's statement_timeout. One second above it, so that on a live
            # database the server's timeout fires first and the connection is kept.
            db_client_timeout_ms=_client_timeout_ms(env),
            db_ping_timeout_ms=_int(env, "DB_PING_TIMEOUT_MS", 2000, minimum=100),
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 64 * 1024, minimum=1024),
            # An oversized body is read and discarded up to this many bytes, so a client sending
            # it straight to gunicorn reads the 413; beyond, the connection closes under it.
            max_drain_bytes=_int(env, "MAX_DRAIN_BYTES", 10 * 1024 * 1024, minimum=0),
            page_size_default=_int(env, "BOOKS_PAGE_SIZE", 20, minimum=1),
            # OWASP's argon2id baseline: m=19 MiB, t=2, p=1.
            password_time_cost=_int(env, "PASSWORD_HASH_TIME_COST", 2, minimum=1),
            password_memory_cost=_int(env, "PASSWORD_HASH_MEMORY_KIB", 19 * 1024, minimum=8),
            password_parallelism=_int(env, "PASSWORD_HASH_PARALLELISM", 1, minimum=1),
            crash_route_enabled=_bool(env, "CRASH_ROUTE_ENABLED", False),
            version=env.get("APP_VERSION") or _package_version(),
            log_level=_choice(env, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            # Files by default (the lesson wrote logs/ in production); in-process tests keep to
            # stderr unless they name a LOG_DIR.
            log_dir=(
                Path(env.get("LOG_DIR") or PROJECT_ROOT / "logs")
                if _bool(env, "LOG_TO_FILE", flask_env != "testing" or bool(env.get("LOG_DIR")))
                else None
            ),
            log_file=env.get("LOG_FILE") or "app.log",
            log_rotate_when=_choice(env, "LOG_ROTATE_WHEN", "midnight", ("midnight", "S", "M", "H", "D"), upper=False),
            log_rotate_interval=_int(env, "LOG_ROTATE_INTERVAL", 1, minimum=1),
            log_backup_count=_int(env, "LOG_BACKUP_COUNT", 14, minimum=0),
            log_gzip=_bool(env, "LOG_GZIP", False),
            log_console=_bool(env, "LOG_CONSOLE", True),
            metrics_enabled=_bool(env, "METRICS_ENABLED", True),
            metrics_bind=env.get("METRICS_BIND") or "127.0.0.1:9200",
            sentry_dsn=env.get("SENTRY_DSN") or None,
            sentry_environment=env.get("SENTRY_ENVIRONMENT") or None,
            # Off by default: tracing even 5 % of requests cost ~8 % throughput here (bench/).
            sentry_traces_sample_rate=_float(env, "SENTRY_TRACES_SAMPLE_RATE", 0.0, minimum=0.0),
            gunicorn_threads=threads,
            # The hashing bulkhead (service/hashing_bulkhead.py, docs/settings.md): per worker, the
            # hashing threads, how many hashing requests may wait for them and for how long (below
            # nginx's proxy_read_timeout of 35 s, so the client reads our 503, not nginx's 504), and
            # how much lower their CPU priority is than the request threads'.
            hash_threads=hash_threads,
            hash_queue_max=_int(env, "HASH_QUEUE_MAX", 256, minimum=1),
            hash_queue_timeout=_positive_float(env, "HASH_QUEUE_TIMEOUT", 30.0),
            hash_nice=_int(env, "HASH_NICE", 10, minimum=0, maximum=19),
            trusted_proxies=_int(env, "TRUSTED_PROXIES", 0, minimum=0),
            # Brute-force and abuse limits (service/auth/throttle.py, docs/api.md). The address
            # caps leave the lesson's load test (1,000 users registering and logging in from one
            # address at ~10/s each) twice its rate; the per-account delays stop password guessing.
            throttle_enabled=_bool(env, "THROTTLE_ENABLED", True),
            throttle_register_limit=_int(env, "THROTTLE_REGISTER_LIMIT", 1200, minimum=1),
            throttle_register_window=_int(env, "THROTTLE_REGISTER_WINDOW_SECONDS", 60, minimum=1),
            throttle_login_limit=_int(env, "THROTTLE_LOGIN_LIMIT", 1200, minimum=1),
            throttle_login_window=_int(env, "THROTTLE_LOGIN_WINDOW_SECONDS", 60, minimum=1),
            throttle_address_failures_limit=_int(env, "THROTTLE_ADDRESS_FAILURES_LIMIT", 100, minimum=1),
            throttle_address_failures_window=_int(env, "THROTTLE_ADDRESS_FAILURES_WINDOW_SECONDS", 300, minimum=1),
            throttle_account_free_failures=_int(env, "THROTTLE_ACCOUNT_FREE_FAILURES", 5, minimum=1),
            throttle_account_delay=_int(env, "THROTTLE_ACCOUNT_DELAY_SECONDS", 1, minimum=1),
            throttle_account_delay_max=_int(env, "THROTTLE_ACCOUNT_DELAY_MAX_SECONDS", 900, minimum=1),
            throttle_account_reset=_int(env, "THROTTLE_ACCOUNT_RESET_SECONDS", 86400, minimum=1),
            throttle_store_timeout_ms=_int(env, "THROTTLE_STORE_TIMEOUT_MS", 250, minimum=1),
            # /docs and /openapi.json: a map of the API for anyone who asks, so off in production
            # unless asked for.
            docs_enabled=_bool(env, "DOCS_ENABLED", not production),
            public_url=_public_url(env, "PUBLIC_URL"),
        )
        if settings.throttle_account_delay_max < settings.throttle_account_delay:
            raise SettingsError(
                "THROTTLE_ACCOUNT_DELAY_MAX_SECONDS must be >= THROTTLE_ACCOUNT_DELAY_SECONDS, got "
                f"{settings.throttle_account_delay_max} < {settings.throttle_account_delay}"
            )
        if settings.throttle_account_reset < settings.throttle_account_delay_max:
            raise SettingsError(
                "THROTTLE_ACCOUNT_RESET_SECONDS must be >= THROTTLE_ACCOUNT_DELAY_MAX_SECONDS (failures are "
                f"remembered at least as long as the longest delay), got {settings.throttle_account_reset} < "
                f"{settings.throttle_account_delay_max}"
            )
        return settings


CLIENT_TIMEOUT_MARGIN_MS = 1000


def _client_timeout_ms(env: Mapping[str, str]) -> int:
    statement = _int(env, "DB_STATEMENT_TIMEOUT_MS", 10000, minimum=0)
    default = statement + CLIENT_TIMEOUT_MARGIN_MS if statement else 0
    client = _int(env, "DB_CLIENT_TIMEOUT_MS", default, minimum=0)
    if client and statement and client <= statement:
        raise SettingsError(
            f"DB_CLIENT_TIMEOUT_MS must be above DB_STATEMENT_TIMEOUT_MS (the server's timeout fires first on a "
            f"live database; the client's only when it does not answer), got {client} <= {statement}"
        )
    return client


def _public_url(env: Mapping[str, str], name: str) -> str | None:
    """An absolute http(s) URL with a host and nothing after the path (no credentials, query or
    fragment), without its trailing slash; None when unset."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(raw)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if (
        parts is None
        or not port_ok
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in raw)
    ):
        raise SettingsError(
            f"{name} must be an absolute http(s) URL without credentials, query or fragment "
            f"(e.g. https://api.example.com), got {raw!r}"
        )
    return raw.rstrip("/")


def _check_secret(secret: str) -> None:
    """Production's key must be long and look random: a key of few or patterned characters is
    as easy to guess as a short one, and whoever guesses it signs tokens for any user."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise SettingsError(
            f"JWT_SECRET_KEY is missing or shorter than {MIN_SECRET_BYTES} bytes: set it to a random "
            f"value, e.g. {GENERATE_SECRET}"
        )
    bits = secret_entropy_bits(secret)
    if bits < MIN_SECRET_BITS:
        raise SettingsError(
            f"JWT_SECRET_KEY looks guessable (repeated or patterned characters: about {bits:.0f} bits of "
            f"entropy estimated, {MIN_SECRET_BITS} needed): set it to a random value, e.g. {GENERATE_SECRET}"
        )


def _shannon_bits(symbols) -> float:
    """Shannon entropy of the symbols' frequencies, times their number."""
    counts = Counter(symbols)
    total = sum(counts.values())
    return -sum(n * math.log2(n / total) for n in counts.values())


def secret_entropy_bits(secret: str) -> float:
    """A conservative estimate of a secret's entropy, in bits: the least of the Shannon entropy
    of its characters and of the steps between neighbouring characters (which sees runs such as
    `abcdef` or `0123456789`), over its shortest repeating unit (`xyz` of `xyzxyzxy`).

    Random keys pass with room to spare (least of 100,000 draws each: `token_urlsafe(32)` 181,
    `token_hex(32)` 219, `token_urlsafe(48)` 300); `'a' * 32`, `'ab' * 16`, `'0123456789' * 4`
    and a random 10 characters repeated come out at 0 to 30."""
    unit = secret
    for period in range(1, len(secret) // 2 + 1):
        if secret[period:] == secret[:-period]:
            unit = secret[:period]
            break
    steps = [ord(b) - ord(a) for a, b in itertools.pairwise(unit)]
    return max(0.0, min(_shannon_bits(unit), _shannon_bits(steps)))


def _development_secret(data_dir: Path) -> str:
    """Outside production, a random secret kept in the data dir: no secret is ever hard-coded,
    and every worker and CLI call of one checkout signs tokens with the same key."""
    path = data_dir / "dev-jwt-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Write a private temp file, then hard-link it into place: the link either wins whole or
    # fails, so a racing worker never reads a half-written secret.
    tmp = data_dir / f".dev-jwt-secret.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flaskapi-observability")
    except PackageNotFoundError:
        return "0+unknown"
