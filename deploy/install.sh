#!/usr/bin/env bash
# Install or update flaskapi-observability on a Debian/Ubuntu app host, as root. Idempotent: run
# it for the first install and again for every deploy.
#
#   sudo deploy/install.sh                      # from this checkout
#   sudo deploy/install.sh --repo URL [--ref REF]   # from a git clone of URL
#   deploy/install.sh --root /tmp/x             # everything under /tmp/x, no apt/useradd/systemctl
#   deploy/install.sh --dry-run                 # print each command instead of running it
#
# Steps: apt packages -> user/group flaskapi -> code to /opt/flaskapi/app -> venv
# /opt/flaskapi/venv (pip install of the app, not editable) -> /etc/flaskapi/flaskapi.env from
# deploy/env.example if missing (0640 root:flaskapi, never overwritten) -> units to
# /etc/systemd/system + daemon-reload -> nginx site -> if JWT_SECRET_KEY and DB_URI are set:
# migrations (flaskapi-migrate.service), enable + restart flaskapi.service. Otherwise it stops
# before migrating and starting, and says what to set; run it again afterwards.
set -euo pipefail

PREFIX=/opt/flaskapi
CONF_DIR=/etc/flaskapi
ENV_FILE=$CONF_DIR/flaskapi.env
UNIT_DIR=/etc/systemd/system
APP_USER=flaskapi
MIN_SECRET_BYTES=32

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(cd "$SCRIPT_DIR/.." && pwd)

ROOT=""
DRY_RUN=0
WITH_NGINX=1
WITH_VENV=1
REPO_URL=""
REPO_REF=""

usage() {
  cat <<'EOF'
Usage: install.sh [--root DIR] [--dry-run] [--repo URL [--ref REF]] [--no-nginx] [--no-venv]

  --root DIR    install under DIR (a throwaway tree): apt, useradd, chown, systemctl and the
                migrations are skipped, with a message
  --dry-run     print every command that would change something instead of running it
  --repo URL    deploy a git clone of URL (--ref: branch or tag) instead of this checkout
  --no-nginx    do not install nginx nor its site (when your own buffering proxy fronts BIND:
                gunicorn must never face clients)
  --no-venv     do not create or update /opt/flaskapi/venv (you manage it; tests)
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }
note() { echo "    $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --repo) [ $# -ge 2 ] || die "--repo needs a URL"; REPO_URL=$2; shift 2 ;;
    --ref) [ $# -ge 2 ] || die "--ref needs a branch or tag"; REPO_REF=$2; shift 2 ;;
    --no-nginx) WITH_NGINX=0; shift ;;
    --no-venv) WITH_VENV=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

umask 022
if [ -n "$ROOT" ]; then
  if [ "$DRY_RUN" -eq 0 ]; then mkdir -p "$ROOT"; fi
  if [ -d "$ROOT" ]; then ROOT=$(cd "$ROOT" && pwd); fi
  if [ "$ROOT" = "/" ]; then ROOT=""; fi
fi
if [ -z "$ROOT" ] && [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo), or use --root DIR / --dry-run"
fi

# Every command that changes the system goes through run: printed instead under --dry-run.
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
# Steps that need the real system (apt, users, systemd) are skipped under --root.
real_system() {
  if [ -n "$ROOT" ]; then
    note "skipped (--root): $*"
    return 1
  fi
  return 0
}

APP=$ROOT$PREFIX/app
VENV=$ROOT$PREFIX/venv
ENV_PATH=$ROOT$ENV_FILE

# ---------------------------------------------------------------------------------------------
say "packages"
PACKAGES=(python3 python3-venv ca-certificates)
[ "$WITH_NGINX" -eq 0 ] || PACKAGES+=(nginx)
[ -z "$REPO_URL" ] || PACKAGES+=(git)
if real_system "apt-get install ${PACKAGES[*]}"; then
  export DEBIAN_FRONTEND=noninteractive
  run apt-get update -q
  run apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
fi

say "user and group $APP_USER"
if real_system "groupadd/useradd $APP_USER"; then
  getent group "$APP_USER" >/dev/null || run groupadd --system "$APP_USER"
  id -u "$APP_USER" >/dev/null 2>&1 || run useradd --system --gid "$APP_USER" --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin --comment "flaskapi-observability" "$APP_USER"
fi

# ---------------------------------------------------------------------------------------------
say "code -> $APP"
run install -d -m 0755 "$ROOT$PREFIX"
STAGE=$APP.new
run rm -rf "$STAGE"
run install -d -m 0755 "$STAGE"
CLONE=""
if [ -n "$REPO_URL" ]; then
  CLONE=$(mktemp -d)
  trap 'rm -rf "$CLONE"' EXIT
  if [ -n "$REPO_REF" ]; then
    run git clone --quiet --depth 1 --branch "$REPO_REF" "$REPO_URL" "$CLONE/src"
  else
    run git clone --quiet --depth 1 "$REPO_URL" "$CLONE/src"
  fi
  FROM=$CLONE/src
else
  FROM=$SOURCE
fi
# env.example, the units and the nginx site come from the tree being deployed.
DEPLOY=$FROM/deploy
[ -d "$DEPLOY" ] || DEPLOY=$SOURCE/deploy   # --dry-run --repo: nothing was cloned
# What a checkout has that a server must not get: VCS data, the dev venv and database, logs,
# caches, and .env (a developer's secrets).
EXCLUDES=(--exclude=./.git --exclude=./.venv --exclude=./.data --exclude=./logs --exclude=./reports
          --exclude=./bench/results --exclude=./build --exclude=./.env --exclude=./.ci
          --exclude=.pytest_cache --exclude=.hypothesis --exclude=__pycache__ --exclude='*.pyc'
          --exclude='*.egg-info' --exclude='*.log' --exclude='*.log.gz')
if [ "$DRY_RUN" -eq 1 ]; then
  printf '+ tar -C %q' "$FROM"; printf ' %q' "${EXCLUDES[@]}"
  printf ' -cf - . | tar -C %q --no-same-owner -xf -\n' "$STAGE"
else
  tar -C "$FROM" "${EXCLUDES[@]}" -cf - . | tar -C "$STAGE" --no-same-owner -xf -
fi
run chmod -R u+rwX,go+rX,go-w "$STAGE"

# ---------------------------------------------------------------------------------------------
if [ "$WITH_VENV" -eq 1 ]; then
  say "virtualenv $VENV"
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    die "python3 is $(python3 -V 2>&1); the app needs 3.11+ (Debian 12, Ubuntu 24.04)"
  fi
  [ -x "$VENV/bin/python" ] || run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install --quiet --upgrade pip
  # Not editable: the venv holds the dependencies and the package metadata; gunicorn and the
  # flask CLI run from $APP (their working directory), where migrations/ and deploy/ live.
  run "$VENV/bin/pip" install --quiet --no-cache-dir "$STAGE"
  run rm -rf "$STAGE/build"
  for info in "$STAGE"/*.egg-info; do
    [ ! -e "$info" ] || run rm -rf "$info"
  done
else
  say "virtualenv: skipped (--no-venv)"
fi

# The new tree replaces the old one in two renames; the running service keeps its preloaded
# code until the restart below.
if [ -d "$APP" ]; then
  run rm -rf "$APP.old"
  run mv "$APP" "$APP.old"
fi
run mv "$STAGE" "$APP"
run rm -rf "$APP.old"

# ---------------------------------------------------------------------------------------------
say "settings $ENV_PATH"
run install -d -m 0750 "$ROOT$CONF_DIR"
if [ -e "$ENV_PATH" ]; then
  note "kept (never overwritten); settings in env.example it does not mention:"
  missing=$(comm -23 \
    <(sed -n 's/^#\{0,1\}\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$DEPLOY/env.example" | sort -u) \
    <(sed -n 's/^#\{0,1\}\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$ENV_PATH" | sort -u) | tr '\n' ' ')
  note "  ${missing:-none}"
else
  run install -m 0640 "$DEPLOY/env.example" "$ENV_PATH"
fi
run chmod 0640 "$ENV_PATH"
if real_system "chown root:$APP_USER $ROOT$CONF_DIR $ENV_PATH"; then
  run chown root:"$APP_USER" "$ROOT$CONF_DIR" "$ENV_PATH"
fi

say "systemd units -> $ROOT$UNIT_DIR"
run install -d -m 0755 "$ROOT$UNIT_DIR"
for unit in flaskapi.service flaskapi-migrate.service; do
  run install -m 0644 "$DEPLOY/systemd/$unit" "$ROOT$UNIT_DIR/$unit"
done
if real_system "systemctl daemon-reload"; then
  run systemctl daemon-reload
fi

if [ "$WITH_NGINX" -eq 1 ]; then
  say "nginx site"
  run install -d -m 0755 "$ROOT/etc/nginx/sites-available" "$ROOT/etc/nginx/sites-enabled"
  run install -m 0644 "$DEPLOY/nginx/flaskapi.conf" "$ROOT/etc/nginx/sites-available/flaskapi.conf"
  run ln -sfn ../sites-available/flaskapi.conf "$ROOT/etc/nginx/sites-enabled/flaskapi.conf"
  if [ -L "$ROOT/etc/nginx/sites-enabled/default" ]; then
    note "disabling Debian's default site (flaskapi is the default_server on port 80)"
    run rm -f "$ROOT/etc/nginx/sites-enabled/default"
  fi
  if real_system "nginx -t, systemctl enable/reload nginx"; then
    run nginx -t -q
    run systemctl enable --quiet nginx
    run systemctl reload-or-restart nginx
  fi
fi

# ---------------------------------------------------------------------------------------------
# The two settings production cannot start without (service/settings.py says the same).
setting() {
  local file=$1 name=$2
  [ -e "$file" ] || file=$DEPLOY/env.example
  sed -n "s/^$name=//p" "$file" | tail -n 1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"
}
problems=()
secret=$(setting "$ENV_PATH" JWT_SECRET_KEY)
if [ -z "$secret" ]; then
  problems+=("JWT_SECRET_KEY is empty: set JWT_SECRET_KEY=\$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')")
elif [ "$(printf '%s' "$secret" | wc -c)" -lt "$MIN_SECRET_BYTES" ]; then
  problems+=("JWT_SECRET_KEY is shorter than $MIN_SECRET_BYTES bytes: generate a longer one")
fi
if [ -z "$(setting "$ENV_PATH" DB_URI)" ] && [ -z "$(setting "$ENV_PATH" DATABASE_URL)" ]; then
  problems+=("DB_URI is empty: set DB_URI=postgresql+psycopg2://flaskapi:PASSWORD@DB-HOST:5432/flaskapi?sslmode=require")
fi

if [ "${#problems[@]}" -gt 0 ]; then
  {
    echo
    echo "install.sh: NOT STARTED: $ENV_FILE is incomplete:"
    for problem in "${problems[@]}"; do echo "  - $problem"; done
    echo "Edit it (sudoedit $ENV_FILE), then run install.sh again: it migrates and starts."
  } >&2
  exit 0
fi

say "migrations and start"
if real_system "systemctl start flaskapi-migrate (flask db upgrade), enable + restart flaskapi"; then
  run systemctl start flaskapi-migrate.service \
    || die "migrations failed: journalctl -u flaskapi-migrate -n 50 (the service was not restarted)"
  run systemctl enable --quiet flaskapi.service
  run systemctl restart flaskapi.service
  if [ "$DRY_RUN" -eq 0 ]; then
    systemctl is-active --quiet flaskapi.service \
      || die "flaskapi did not start: journalctl -u flaskapi -n 50"
  fi
  note "running: systemctl status flaskapi; logs: journalctl -u flaskapi, /var/log/flaskapi/app.log"
fi
say "done"
