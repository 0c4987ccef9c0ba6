-- The role the Postgres exporter connects as, on the database host (deploy/install.sh --role
-- db-host runs it as the postgres superuser; idempotent):
--   sudo -u postgres psql < deploy/postgres/exporter_role.sql
-- It logs in over the local socket as the system user `prometheus` (peer authentication, Debian's
-- default `local all all peer` line: no password anywhere) to the `postgres` database, and holds
-- pg_monitor: the built-in role that may read every statistics view and setting the exporter and
-- its queries read (every session's row of pg_stat_activity included). It owns nothing, may
-- change nothing, and cannot connect to the app's database (create_db.sql gives that to the app's
-- role only).

\set ON_ERROR_STOP on
\set QUIET on

SELECT 'CREATE ROLE prometheus LOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'prometheus') \gexec
ALTER ROLE prometheus NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION CONNECTION LIMIT 3;
GRANT pg_monitor TO prometheus;
-- create_db.sql took CONNECT on the maintenance database from PUBLIC.
GRANT CONNECT ON DATABASE postgres TO prometheus;

\echo exporter_role.sql: role prometheus is ready
