#!/usr/bin/env bash
# docker compose: the postgres container's first start runs this (/docker-entrypoint-initdb.d),
# creating the app's role and database with deploy/postgres/create_db.sql, as on the DB host:
# the app connects as the unprivileged `flaskapi` role, not as the container's superuser.
set -eo pipefail   # no -u: the image may source this file into its entrypoint
FLASKAPI_DB_PASSWORD=${FLASKAPI_DB_PASSWORD:?set FLASKAPI_DB_PASSWORD}
export FLASKAPI_DB_PASSWORD
psql --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  --file /flaskapi/create_db.sql
