-- The application's role and database, on the DB host (the lesson's "create a user and a
-- database for the app"). Run it as the postgres superuser with psql >= 15:
--
--   export FLASKAPI_DB_PASSWORD="$(openssl rand -base64 32)"   # keep it for DB_URI on the app host
--   sudo -u postgres --preserve-env=FLASKAPI_DB_PASSWORD psql < deploy/postgres/create_db.sql
--
-- (stdin: the postgres user need not be able to read the checkout), or `psql -v
-- db_password=...` (visible in `ps`; the environment is better). Optional:
-- -v db_name=... -v db_user=... (both default to flaskapi, as pg_hba.conf.snippet and
-- deploy/env.example assume). Idempotent: a second run sets the password again and re-applies
-- the attributes and privileges; nothing is dropped.
--
-- What the role may do: log in, own and use its database (the migrations create the tables).
-- What it may not: superuser, create databases or roles, replication, bypass row security,
-- connect to the postgres/template1 databases. pg_hba.conf.snippet additionally lets it in
-- only from the app host, over TLS, to this database.

\set ON_ERROR_STOP on
\set QUIET on

\if :{?db_name}
\else
  \set db_name flaskapi
\endif
\if :{?db_user}
\else
  \set db_user flaskapi
\endif
\if :{?db_password}
\else
  \getenv db_password FLASKAPI_DB_PASSWORD
\endif
\if :{?db_password}
\else
  \set db_password ''
\endif

SELECT length(:'db_password') < 16 AS password_too_short \gset
\if :password_too_short
  DO $$ BEGIN RAISE EXCEPTION 'create_db.sql: no password, or shorter than 16 characters: set FLASKAPI_DB_PASSWORD (or psql -v db_password=...)'; END $$;
\endif

-- Keep the password out of the server log even with log_statement = ddl/all, and store it as a
-- SCRAM verifier whatever the server default (md5 is weaker and deprecated).
SET log_statement = 'none';
SET password_encryption = 'scram-sha-256';

SELECT format('CREATE ROLE %I', :'db_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'db_user') \gexec
ALTER ROLE :"db_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  INHERIT PASSWORD :'db_password';
RESET log_statement;

SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', :'db_name', :'db_user', 'UTF8')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db_name') \gexec
ALTER DATABASE :"db_name" OWNER TO :"db_user";

-- Only the owner (and superusers) may connect to the app's database or create temp tables in it.
REVOKE ALL ON DATABASE :"db_name" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db_name" TO :"db_user";
-- The maintenance databases are no business of an application role (a monitoring role that
-- needs them gets an explicit GRANT CONNECT).
REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;
REVOKE CONNECT ON DATABASE template1 FROM PUBLIC;

\connect :"db_name"
-- PostgreSQL 15+ already keeps PUBLIC from creating in schema public; older versions did not.
-- The app's role owns the schema its migrations write to.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO :"db_user";

\echo create_db.sql: role :"db_user" and database :"db_name" are ready
