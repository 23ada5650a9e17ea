#!/bin/bash
# First start of the postgres container only (docker-entrypoint-initdb.d):
# the billing database, and the two login roles of the fleet with their
# passwords from the environment (docs/operations.md, "Database roles").
# The migrations (run by `worker migrate` as the owner) grant the roles what
# they may do; they create a role only if it is missing, so the passwords set
# here stay. On an existing volume this script does not run: set passwords
# with ALTER ROLE (docs/operations.md).
set -euo pipefail
: "${FLEET_WORKER_DB_PASSWORD:?FLEET_WORKER_DB_PASSWORD must be set}"
: "${FLEET_BILLING_DB_PASSWORD:?FLEET_BILLING_DB_PASSWORD must be set}"
# Passwords go in as psql variables (:'name' quotes them as literals), never
# spliced into SQL text by the shell.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner="$POSTGRES_USER" -v worker_pw="$FLEET_WORKER_DB_PASSWORD" -v billing_pw="$FLEET_BILLING_DB_PASSWORD" <<'SQL'
CREATE DATABASE fleet_billing OWNER :"owner";
SELECT 'CREATE ROLE fleet_worker LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fleet_worker') \gexec
SELECT 'CREATE ROLE fleet_billing LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fleet_billing') \gexec
ALTER ROLE fleet_worker WITH LOGIN PASSWORD :'worker_pw';
ALTER ROLE fleet_billing WITH LOGIN PASSWORD :'billing_pw';
SQL
