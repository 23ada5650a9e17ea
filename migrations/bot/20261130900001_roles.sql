-- Least privilege (issue 13, part 6). Two login roles, cluster-wide, made
-- here if the operator has not made them already (docker/postgres-init.sh
-- makes them with passwords; without a password a role can log in only
-- where pg_hba.conf trusts it):
--   fleet_worker   the worker: writes the bot database; in the billing
--                  database it may only call the hold and balance functions.
--   fleet_billing  the billing-worker: writes the ledger; here it reads
--                  billing_outbox and api_calls (reconcile) and nothing else.
-- Migrations keep running as the owner. CREATE ROLE races with a migration
-- of another database on the same cluster: the loser's duplicate is ignored.
DO $$
DECLARE
    r TEXT;
BEGIN
    FOREACH r IN ARRAY ARRAY['fleet_worker', 'fleet_billing'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I LOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END $$;

-- The worker writes every bot table, those of later migrations included
-- (default privileges of the role running migrations). The billing tables are
-- skipped by name, in case both sets share one database (the billing set's
-- roles migration revokes them as well).
DO $$
DECLARE
    t TEXT;
BEGIN
    FOR t IN SELECT tablename FROM pg_catalog.pg_tables
              WHERE schemaname = current_schema()
                AND tablename NOT IN ('_sqlx_migrations', 'accounts', 'applied_events', 'ledger_entries',
                                      'billing_failures', 'holds')
    LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO fleet_worker', t);
    END LOOP;
    FOR t IN SELECT sequencename FROM pg_catalog.pg_sequences
              WHERE schemaname = current_schema() AND sequencename <> 'ledger_entries_entry_id_seq'
    LOOP
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %I TO fleet_worker', t);
    END LOOP;
END $$;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO fleet_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO fleet_worker;

-- Reconcile compares what workers meant to charge with the ledger.
GRANT SELECT ON billing_outbox, api_calls TO fleet_billing;
