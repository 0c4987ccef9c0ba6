#!/usr/bin/env bash
# The system tools the test suite runs for real, from Debian's packages, installed when missing:
# prometheus + promtool (alert rules, the end-to-end monitoring test), prometheus-alertmanager +
# amtool (routes, inhibitions, notifications end to end), nginx (nginx -t and a live
# proxy), shellcheck (install.sh), docker-compose (compose file validation), wrk (the benchmarks'
# saturation load, and its harness test), chromium-headless-shell (/docs rendered with no network),
# jq (the log recipes of docs/logging.md, run as written), rsyslog + rsyslog-relp (log shipping:
# our own rsyslogd processes, never the system's), logrotate (the log host's rotation), lnav (its
# format for the JSON stream), openssl (certificates for the RELP TLS test),
# prometheus-node-exporter + prometheus-postgres-exporter (the dashboard's Hosts and Database
# server rows on real exporters).
# Used by `make test` and `make bench`.
set -euo pipefail
missing=()
for tool in prometheus:prometheus promtool:prometheus prometheus-alertmanager:prometheus-alertmanager \
            amtool:prometheus-alertmanager nginx:nginx shellcheck:shellcheck \
            docker-compose:docker-compose systemd-analyze:systemd wrk:wrk \
            chromium-headless-shell:chromium-headless-shell jq:jq rsyslogd:rsyslog logrotate:logrotate \
            lnav:lnav openssl:openssl prometheus-node-exporter:prometheus-node-exporter \
            prometheus-postgres-exporter:prometheus-postgres-exporter; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "${tool%%:*}" >/dev/null 2>&1 \
    || missing+=("${tool##*:}")
done
# RELP is a module of rsyslog's, not a command.
compgen -G "/usr/lib/*/rsyslog/omrelp.so" >/dev/null || compgen -G "/usr/lib/rsyslog/omrelp.so" >/dev/null \
  || missing+=(rsyslog-relp)
[ ${#missing[@]} -eq 0 ] && exit 0
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing test tools and no apt-get: install $packages yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "run as root or install: $packages" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing Debian packages the tests use: $packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086  # the package list is meant to split
$SUDO apt-get install -y -qq --no-install-recommends $packages >/dev/null
