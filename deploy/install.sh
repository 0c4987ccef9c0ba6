#!/usr/bin/env bash
# Install or update flaskapi-observability on a Debian/Ubuntu app host, as root. Idempotent: run
# it for the first install and again for every deploy.
#
#   sudo deploy/install.sh                      # from this checkout
#   sudo deploy/install.sh --repo URL [--ref REF]   # from a git clone of URL
#   deploy/install.sh --root /tmp/x             # everything under /tmp/x, no apt/useradd/systemctl
#   deploy/install.sh --dry-run                 # print each command instead of running it
#   sudo deploy/install.sh --log-host 10.0.0.40 # ...and ship the JSON log to the log host
#   sudo deploy/install.sh --role log-host      # the LOG host instead (see install_log_host)
#   sudo deploy/install.sh --role db-host --exporter-address 10.0.0.20   # the DATABASE host's exporters
#   sudo deploy/install.sh --app-hosts 10.0.0.11,10.0.0.12   # the nginx host: one upstream server per app host
#   sudo deploy/install.sh --role monitoring --app-hosts 10.0.0.11,10.0.0.12   # the MONITORING host's Prometheus
#
# Steps: apt packages -> user/group flaskapi -> code to /opt/flaskapi/app -> venv
# /opt/flaskapi/venv (pip install of the app, not editable) -> /etc/flaskapi/flaskapi.env from
# deploy/env.example if missing (0640 root:flaskapi, never overwritten) -> units to
# /etc/systemd/system + daemon-reload -> nginx site -> if JWT_SECRET_KEY and DB_URI are set:
# migrations (flaskapi-migrate.service), enable + restart flaskapi.service. Otherwise it stops
# before migrating and starting, and says what to set; run it again afterwards. Every host also
# gets Debian's node exporter (the database host the Postgres exporter too: install_exporters).
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
ROLE=app
LOG_HOST=""
EXPORTER_ADDRESS=""
WITH_EXPORTERS=1
PG_STAT_STATEMENTS=0
APP_HOSTS=""

usage() {
  cat <<'EOF'
Usage: install.sh [--root DIR] [--dry-run] [--repo URL [--ref REF]] [--no-nginx] [--no-venv]
                  [--log-host ADDR[:PORT]] [--role app|log-host|db-host|monitoring]
                  [--exporter-address ADDR] [--no-exporters] [--pg-stat-statements]
                  [--app-hosts ADDR[:PORT][,ADDR[:PORT]...]]

  --root DIR    install under DIR (a throwaway tree): apt, useradd, chown, systemctl and the
                migrations are skipped, with a message
  --dry-run     print every command that would change something instead of running it
  --repo URL    deploy a git clone of URL (--ref: branch or tag) instead of this checkout
  --no-nginx    do not install nginx nor its site (when your own buffering proxy fronts BIND:
                gunicorn must never face clients)
  --no-venv     do not create or update /opt/flaskapi/venv (you manage it; tests)
  --log-host ADDR[:PORT]
                also ship /var/log/flaskapi/app.log to the log host at ADDR (RELP, port 2514
                unless given): rsyslog, flaskapi-logship.service, /etc/flaskapi/logship.env
  --role log-host
                install the log host instead of an app host: rsyslog receiving RELP,
                flaskapi-loghost.service, /var/log/flaskapi-central, logrotate, lnav's format
  --role db-host
                the DATABASE host's exporters only (Postgres itself is yours: deploy/postgres/):
                node and Postgres exporters, the exporter's role (deploy/postgres/exporter_role.sql)
  --exporter-address ADDR
                the host's private address its exporters listen on (node 9100, Postgres 9187),
                where the monitoring host scrapes them; without it they stay on 127.0.0.1 (or
                keep what /etc/flaskapi-exporters/exporters.env says)
  --no-exporters
                app host: no node exporter (you run your own)
  --pg-stat-statements
                db-host: also export the slowest statements (needs pg_stat_statements preloaded:
                monitoring/postgres-exporter/statements.yml)
  --role monitoring
                the MONITORING host's Prometheus instead: the repo's config and rules in
                /etc/prometheus/flaskapi/, its drop-in, and the app instances' target file
                (targets/flaskapi.yml) from --app-hosts
  --app-hosts ADDR[:PORT],...
                N app hosts, in order (their `host` is app-1, app-2, ...). App role: the nginx
                site's upstream, one server per host on its BIND (port 5000 unless given); role
                monitoring: their metrics ports (ADDR:9200) in targets/flaskapi.yml
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
    --log-host) [ $# -ge 2 ] || die "--log-host needs an address"; LOG_HOST=$2; shift 2 ;;
    --log-host=*) LOG_HOST=${1#--log-host=}; shift ;;
    --role) [ $# -ge 2 ] || die "--role needs app or log-host"; ROLE=$2; shift 2 ;;
    --role=*) ROLE=${1#--role=}; shift ;;
    --exporter-address) [ $# -ge 2 ] || die "--exporter-address needs an address"; EXPORTER_ADDRESS=$2; shift 2 ;;
    --exporter-address=*) EXPORTER_ADDRESS=${1#--exporter-address=}; shift ;;
    --no-exporters) WITH_EXPORTERS=0; shift ;;
    --pg-stat-statements) PG_STAT_STATEMENTS=1; shift ;;
    --app-hosts) [ $# -ge 2 ] || die "--app-hosts needs addresses"; APP_HOSTS=$2; shift 2 ;;
    --app-hosts=*) APP_HOSTS=${1#--app-hosts=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

case "$ROLE" in
  app) ;;
  log-host)
    [ -z "$REPO_URL" ] || die "--repo is for the app role: run the log host's install from a checkout"
    [ -z "$LOG_HOST" ] || die "--log-host is for app hosts (where to ship); the log host receives"
    ;;
  db-host)
    [ -z "$REPO_URL" ] || die "--repo is for the app role: run the database host's install from a checkout"
    [ -z "$LOG_HOST" ] || die "--log-host is for app hosts"
    [ "$WITH_EXPORTERS" -eq 1 ] || die "--no-exporters: the database host's install is its exporters"
    ;;
  monitoring)
    [ -z "$REPO_URL" ] || die "--repo is for the app role: run the monitoring host's install from a checkout"
    [ -z "$LOG_HOST" ] || die "--log-host is for app hosts"
    [ -n "$APP_HOSTS" ] || die "--role monitoring needs --app-hosts: the app instances Prometheus scrapes"
    ;;
  *) die "--role: app, log-host, db-host or monitoring, not $ROLE" ;;
esac
[ -z "$APP_HOSTS" ] || [ "$ROLE" = app ] || [ "$ROLE" = monitoring ] || die "--app-hosts is for the app role or --role monitoring"
APP_ADDRESSES=()
if [ -n "$APP_HOSTS" ]; then
  IFS=, read -r -a APP_ADDRESSES <<< "$APP_HOSTS"
  for address in "${APP_ADDRESSES[@]}"; do
    [[ "$address" =~ ^[A-Za-z0-9._-]+(:[0-9]+)?$ ]] || die "--app-hosts: not an address or address:port: '$address'"
  done
fi
[ "$PG_STAT_STATEMENTS" -eq 0 ] || [ "$ROLE" = db-host ] || die "--pg-stat-statements is for --role db-host"

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

# A system user and its group, for a service that needs no home or shell (idempotent).
system_user() {
  local user=$1 comment=$2
  say "user and group $user"
  if real_system "groupadd/useradd $user"; then
    getent group "$user" >/dev/null || run groupadd --system "$user"
    id -u "$user" >/dev/null 2>&1 || run useradd --system --gid "$user" --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin --comment "$comment" "$user"
  fi
}

APP=$ROOT$PREFIX/app
VENV=$ROOT$PREFIX/venv
ENV_PATH=$ROOT$ENV_FILE

# ---------------------------------------------------------------------------------------------
# The log host (docs/logging.md, "Shipping off the host"): its own rsyslogd receiving RELP from
# the app hosts, writing /var/log/flaskapi-central (combined and per host), rotated by logrotate.
# From this checkout's deploy/: nothing of the app itself is installed there.
LOGHOST_CONF_DIR=/etc/flaskapi-loghost
LOGHOST_LIB=/usr/local/lib/flaskapi-loghost
LOGHOST_USER=flaskapi-logs
install_log_host() {
  local deploy=$SOURCE/deploy env_path=$ROOT$LOGHOST_CONF_DIR/loghost.env
  say "packages (log host)"
  if real_system "apt-get install rsyslog rsyslog-relp python3 logrotate lnav"; then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -q
    run apt-get install -y -q --no-install-recommends rsyslog rsyslog-relp python3 logrotate lnav
  fi
  system_user "$LOGHOST_USER" "flaskapi-observability log host"
  say "rsyslog's config, the line check, logrotate, lnav's format"
  run install -d -m 0755 "$ROOT$LOGHOST_CONF_DIR" "$ROOT$LOGHOST_LIB" "$ROOT/etc/logrotate.d" \
    "$ROOT/etc/lnav/formats/flaskapi"
  run install -m 0644 "$deploy/rsyslog/central.conf" "$ROOT$LOGHOST_CONF_DIR/central.conf"
  run install -m 0755 "$deploy/rsyslog/central_lines.py" "$ROOT$LOGHOST_LIB/central_lines.py"
  run install -m 0644 "$deploy/rsyslog/logrotate-central" "$ROOT/etc/logrotate.d/flaskapi-central"
  run install -m 0644 "$deploy/lnav/flaskapi_log.json" "$ROOT/etc/lnav/formats/flaskapi/flaskapi_log.json"
  if [ -e "$env_path" ]; then
    note "kept $env_path (never overwritten)"
  else
    run install -m 0644 "$deploy/rsyslog/loghost.env.example" "$env_path"
  fi
  say "systemd unit -> $ROOT$UNIT_DIR"
  run install -d -m 0755 "$ROOT$UNIT_DIR"
  run install -m 0644 "$deploy/systemd/flaskapi-loghost.service" "$ROOT$UNIT_DIR/flaskapi-loghost.service"
  if real_system "systemctl daemon-reload"; then
    run systemctl daemon-reload
  fi
  local listen=""
  if [ -e "$env_path" ]; then
    listen=$(sed -n 's/^CENTRAL_LISTEN=//p' "$env_path" | tail -n 1)
  fi
  if [ -z "$listen" ]; then
    {
      echo
      echo "install.sh: NOT STARTED: set CENTRAL_LISTEN (the log host's private address) in $LOGHOST_CONF_DIR/loghost.env,"
      echo "then run install.sh --role log-host again: it enables and starts flaskapi-loghost."
    } >&2
    return 0
  fi
  say "start"
  if real_system "systemctl enable + restart flaskapi-loghost"; then
    run systemctl enable --quiet flaskapi-loghost.service
    run systemctl restart flaskapi-loghost.service
    note "running: systemctl status flaskapi-loghost; files: /var/log/flaskapi-central/"
  fi
}
if [ "$ROLE" = log-host ]; then
  install_log_host
  say "done"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# The exporters (docs/deployment.md, "The exporters: hosts and database"): Debian's node exporter
# on every host, the Postgres exporter on the database host, each under its distribution unit with
# a drop-in (deploy/systemd/*.service.d/) that reads /etc/flaskapi-exporters/exporters.env: the
# private address to listen on and, for Postgres, the role to connect as.
EXPORTERS_DIR=/etc/flaskapi-exporters
install_exporters() {
  local with_postgres=$1 deploy=$SOURCE/deploy monitoring=$SOURCE/monitoring
  local env_path=$ROOT$EXPORTERS_DIR/exporters.env units=(prometheus-node-exporter)
  [ "$with_postgres" -eq 0 ] || units+=(prometheus-postgres-exporter)
  say "exporters: ${units[*]}"
  if real_system "apt-get install ${units[*]}"; then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get install -y -q --no-install-recommends "${units[@]}"
  fi
  run install -d -m 0755 "$ROOT$EXPORTERS_DIR"
  if [ -n "$EXPORTER_ADDRESS" ] || [ ! -e "$env_path" ]; then
    local address=${EXPORTER_ADDRESS:-127.0.0.1}
    [ -n "$EXPORTER_ADDRESS" ] || note "no --exporter-address: listening on 127.0.0.1 (the monitoring host cannot scrape it)"
    if [ "$DRY_RUN" -eq 1 ]; then
      printf '+ write %q: EXPORTER_ADDRESS=%s\n' "$env_path" "$address"
    else
      {
        echo "# Written by deploy/install.sh (--exporter-address): read by the exporters' drop-ins."
        echo "EXPORTER_ADDRESS=$address"
        echo "# The Postgres exporter: the role prometheus over the local socket (peer authentication)."
        echo "DATA_SOURCE_NAME='user=prometheus host=/run/postgresql dbname=postgres'"
      } > "$env_path"
    fi
  else
    note "kept $env_path (--exporter-address changes it)"
  fi
  run chmod 0644 "$env_path"
  if [ "$with_postgres" -eq 1 ]; then
    local queries=("$monitoring/postgres-exporter/queries.yml")
    [ "$PG_STAT_STATEMENTS" -eq 0 ] || queries+=("$monitoring/postgres-exporter/statements.yml")
    if [ "$DRY_RUN" -eq 1 ]; then
      printf '+ cat'; printf ' %q' "${queries[@]}"; printf ' > %q\n' "$ROOT$EXPORTERS_DIR/queries.yml"
    else
      cat "${queries[@]}" > "$ROOT$EXPORTERS_DIR/queries.yml"
    fi
    run chmod 0644 "$ROOT$EXPORTERS_DIR/queries.yml"
  fi
  local unit
  for unit in "${units[@]}"; do
    run install -d -m 0755 "$ROOT$UNIT_DIR/$unit.service.d"
    run install -m 0644 "$deploy/systemd/$unit.service.d/flaskapi.conf" "$ROOT$UNIT_DIR/$unit.service.d/flaskapi.conf"
  done
  if [ "$with_postgres" -eq 1 ] && real_system "psql: the exporter's role (exporter_role.sql)"; then
    if command -v psql >/dev/null 2>&1 && getent passwd postgres >/dev/null; then
      run runuser -u postgres -- psql -q -f - < "$deploy/postgres/exporter_role.sql"
    else
      note "no local Postgres yet: run deploy/postgres/exporter_role.sql as postgres once it is installed"
    fi
  fi
  if real_system "systemctl daemon-reload, enable + restart ${units[*]}"; then
    run systemctl daemon-reload
    for unit in "${units[@]}"; do
      run systemctl enable --quiet "$unit.service"
      run systemctl restart "$unit.service"
    done
    note "scrape them from the monitoring host: ${EXPORTER_ADDRESS:-127.0.0.1}:9100 (job node)$(
      [ "$with_postgres" -eq 0 ] || echo ", :9187 (job postgres)")"
  fi
}
if [ "$ROLE" = db-host ]; then
  install_exporters 1
  say "done"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# The monitoring host (docs/deployment.md, "Several app hosts"): Debian's Prometheus with the
# repo's config and rules, unchanged (every target is in a file), and the app instances' file.
# The exporters' files (targets/node.yml, postgres.yml) are the operator's: kept if present.
PROMETHEUS_DIR=/etc/prometheus/flaskapi
app_targets() {
  local i=0 address
  echo "# Written by deploy/install.sh --role monitoring --app-hosts: the flaskapi job's targets"
  echo "# (monitoring/targets/flaskapi.yml), each app host's metrics port and its name."
  for address in "${APP_ADDRESSES[@]}"; do
    i=$((i + 1))
    echo "- targets: [\"${address%%:*}:9200\"]"
    echo "  labels: {host: app-$i}"
  done
}
if [ "$ROLE" = monitoring ]; then
  say "Prometheus for ${#APP_ADDRESSES[@]} app hosts -> $ROOT$PROMETHEUS_DIR"
  if real_system "apt-get install prometheus"; then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get install -y -q --no-install-recommends prometheus
  fi
  run install -d -m 0755 "$ROOT$PROMETHEUS_DIR/rules" "$ROOT$PROMETHEUS_DIR/targets"
  run install -m 0644 "$SOURCE/monitoring/prometheus.yml" "$ROOT$PROMETHEUS_DIR/prometheus.yml"
  for rules in "$SOURCE"/monitoring/rules/*.rules.yml; do
    run install -m 0644 "$rules" "$ROOT$PROMETHEUS_DIR/rules/"
  done
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+ write %q: %s\n' "$ROOT$PROMETHEUS_DIR/targets/flaskapi.yml" "${APP_ADDRESSES[*]}"
  else
    app_targets > "$ROOT$PROMETHEUS_DIR/targets/flaskapi.yml"
  fi
  run chmod 0644 "$ROOT$PROMETHEUS_DIR/targets/flaskapi.yml"
  for job in node postgres; do
    [ -e "$ROOT$PROMETHEUS_DIR/targets/$job.yml" ] ||
      note "write $PROMETHEUS_DIR/targets/$job.yml: every host's exporter (docs/deployment.md)"
  done
  run install -d -m 0755 "$ROOT$UNIT_DIR/prometheus.service.d"
  run install -m 0644 "$SOURCE/deploy/systemd/prometheus.service.d/flaskapi.conf" "$ROOT$UNIT_DIR/prometheus.service.d/flaskapi.conf"
  if real_system "promtool check config, systemctl daemon-reload, restart prometheus"; then
    run promtool check config "$PROMETHEUS_DIR/prometheus.yml"
    run systemctl daemon-reload
    run systemctl enable --quiet prometheus.service
    run systemctl restart prometheus.service
  fi
  say "done"
  exit 0
fi

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

system_user "$APP_USER" "flaskapi-observability"

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

# The site with its upstream's one server line (127.0.0.1:5000) replaced by one per app host,
# with that line's parameters (the passive health check): bench/harness/nginx.py does the same.
site_for_app_hosts() {
  awk -v hosts="${APP_ADDRESSES[*]}" '
    /^[ \t]*server 127\.0\.0\.1:5000[ ;]/ {
      parameters = $0; sub(/^[ \t]*server 127\.0\.0\.1:5000/, "", parameters)
      count = split(hosts, address, " ")
      for (i = 1; i <= count; i++) print "    server " (address[i] ~ /:[0-9]+$/ ? address[i] : address[i] ":5000") parameters
      found++; next
    }
    { print }
    END { if (found != 1) { print "install.sh: the site has " found + 0 " upstream server lines, not 1" > "/dev/stderr"; exit 1 } }
  ' "$1"
}

if [ "$WITH_NGINX" -eq 1 ]; then
  say "nginx site"
  run install -d -m 0755 "$ROOT/etc/nginx/sites-available" "$ROOT/etc/nginx/sites-enabled"
  if [ "${#APP_ADDRESSES[@]}" -eq 0 ]; then
    run install -m 0644 "$DEPLOY/nginx/flaskapi.conf" "$ROOT/etc/nginx/sites-available/flaskapi.conf"
  else
    note "upstream: ${APP_ADDRESSES[*]} (port 5000 unless given), each with the site's health check"
    if [ "$DRY_RUN" -eq 1 ]; then
      printf '+ write %q: upstream %s\n' "$ROOT/etc/nginx/sites-available/flaskapi.conf" "${APP_ADDRESSES[*]}"
    else
      site_for_app_hosts "$DEPLOY/nginx/flaskapi.conf" > "$ROOT/etc/nginx/sites-available/flaskapi.conf"
    fi
    run chmod 0644 "$ROOT/etc/nginx/sites-available/flaskapi.conf"
  fi
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

if [ "$WITH_EXPORTERS" -eq 1 ]; then
  install_exporters 0
fi

if [ -n "$LOG_HOST" ]; then
  say "log shipping to $LOG_HOST"
  case "$LOG_HOST" in
    \[*\]:*) ship_addr=${LOG_HOST%:*}; ship_port=${LOG_HOST##*:} ;;
    *:*:*) ship_addr=$LOG_HOST; ship_port=2514 ;;   # a bare IPv6 address
    *:*) ship_addr=${LOG_HOST%:*}; ship_port=${LOG_HOST##*:} ;;
    *) ship_addr=$LOG_HOST; ship_port=2514 ;;
  esac
  ship_addr=${ship_addr#[}; ship_addr=${ship_addr%]}
  if real_system "apt-get install rsyslog rsyslog-relp"; then
    run apt-get install -y -q --no-install-recommends rsyslog rsyslog-relp
  fi
  run install -m 0640 "$DEPLOY/rsyslog/forward.conf" "$ROOT$CONF_DIR/logship.conf"
  # Only what this flag says: written again on every run that gives it.
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+ write %q: LOG_HOST=%s LOG_HOST_PORT=%s\n' "$ROOT$CONF_DIR/logship.env" "$ship_addr" "$ship_port"
  else
    printf '# Written by deploy/install.sh --log-host: where flaskapi-logship.service ships the log.\nLOG_HOST=%s\nLOG_HOST_PORT=%s\n' \
      "$ship_addr" "$ship_port" > "$ROOT$CONF_DIR/logship.env"
  fi
  run chmod 0640 "$ROOT$CONF_DIR/logship.env"
  run install -m 0644 "$DEPLOY/systemd/flaskapi-logship.service" "$ROOT$UNIT_DIR/flaskapi-logship.service"
  if real_system "chown root:$APP_USER the logship files, systemctl enable + restart flaskapi-logship"; then
    run chown root:"$APP_USER" "$ROOT$CONF_DIR/logship.conf" "$ROOT$CONF_DIR/logship.env"
    run systemctl daemon-reload
    run systemctl enable --quiet flaskapi-logship.service
    run systemctl restart flaskapi-logship.service
    note "running: systemctl status flaskapi-logship; it keeps up to 1 GiB on disk while $ship_addr is away"
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
