-- Least privilege in the billing database (issue 13, part 6). Roles as in
-- the bot set's roles migration (repeated: either set may run first).
-- fleet_billing applies events: it reads and writes the ledger tables but
-- cannot TRUNCATE, DELETE, or disable triggers (only the owner can).
-- fleet_worker gets no table privilege at all: it places, voids and reads
-- holds and balances through the SECURITY DEFINER functions below, which
-- run as the owner with a fixed search_path.
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

-- History is corrected by new entries, never erased: TRUNCATE does not fire
-- row triggers, so it gets its own guard.
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

-- If the bot set shares this database, its default privileges granted the
-- worker these tables: take them back.
REVOKE ALL ON accounts, applied_events, ledger_entries, billing_failures, holds FROM fleet_worker, PUBLIC;
REVOKE ALL ON SEQUENCE ledger_entries_entry_id_seq FROM fleet_worker, PUBLIC;

GRANT SELECT, INSERT, UPDATE ON accounts, applied_events, billing_failures, holds TO fleet_billing;
GRANT SELECT, INSERT ON ledger_entries TO fleet_billing;
GRANT USAGE, SELECT ON SEQUENCE ledger_entries_entry_id_seq TO fleet_billing;
-- Tables of later billing migrations: the billing-worker reads and writes
-- them. (When both sets share one database, a later billing table is also
-- granted to fleet_worker by the bot set's default privileges: such a
-- migration must revoke it, as above.)
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE ON TABLES TO fleet_billing;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO fleet_billing;

-- Places (or re-activates) a job's hold when the user's available balance
-- (balance − other active holds) covers it; returns whether it did, and the
-- available balance it saw. The account row lock serialises one user's holds.
CREATE FUNCTION fleet_place_hold(p_job_id UUID, p_user_id BIGINT, p_amount NUMERIC, p_lifetime_s DOUBLE PRECISION,
                                 OUT placed BOOLEAN, OUT available NUMERIC)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    v_balance NUMERIC;
    v_held NUMERIC;
BEGIN
    IF p_amount IS NULL OR p_amount < 0 OR p_amount = 'NaN' THEN
        RAISE EXCEPTION 'hold amount must be a non-negative number' USING ERRCODE = '22023';
    END IF;
    SELECT a.balance INTO v_balance FROM accounts a WHERE a.user_id = p_user_id FOR UPDATE;
    SELECT COALESCE(sum(h.amount), 0) INTO v_held FROM holds h
     WHERE h.user_id = p_user_id AND h.status = 'active' AND h.job_id <> p_job_id;
    available := COALESCE(v_balance, 0) - v_held;
    IF v_balance IS NULL OR available <= 0 OR available < p_amount THEN
        placed := false;
        RETURN;
    END IF;
    INSERT INTO holds (job_id, user_id, amount, status, expires_at)
    VALUES (p_job_id, p_user_id, p_amount, 'active', now() + make_interval(secs => p_lifetime_s))
    ON CONFLICT (job_id) DO UPDATE SET amount = EXCLUDED.amount, status = 'active',
        expires_at = EXCLUDED.expires_at, updated_at = now()
    WHERE holds.status <> 'settled';
    placed := true;
END $$;

-- Voids a job's active hold (the job failed or was handed back).
CREATE FUNCTION fleet_void_hold(p_job_id UUID) RETURNS VOID
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
    UPDATE holds SET status = 'voided', updated_at = now() WHERE job_id = p_job_id AND status = 'active';
$$;

-- A user's available balance, USD: ledger balance − active holds.
CREATE FUNCTION fleet_available_balance(p_user_id BIGINT) RETURNS NUMERIC
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT COALESCE((SELECT balance FROM accounts WHERE user_id = p_user_id), 0)
         - COALESCE((SELECT sum(amount) FROM holds WHERE user_id = p_user_id AND status = 'active'), 0);
$$;

-- A user's last ledger movements (charges, top-ups, grants, refunds),
-- newest first, for /usage.
CREATE FUNCTION fleet_user_entries(p_user_id BIGINT, p_limit INT)
RETURNS TABLE (created_at TIMESTAMPTZ, kind TEXT, amount NUMERIC, estimated BOOLEAN, memo TEXT, tokens JSONB,
               credit_account TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT e.created_at, e.kind, e.amount, e.estimated, e.memo, a.payload->'tokens', e.credit_account
      FROM ledger_entries e JOIN applied_events a USING (event_id)
     WHERE e.user_id = p_user_id AND e.kind IN ('usage_charge', 'tool_charge', 'top_up', 'grant', 'refund')
     ORDER BY e.entry_id DESC LIMIT LEAST(GREATEST(p_limit, 0), 100);
$$;

REVOKE ALL ON FUNCTION fleet_place_hold(UUID, BIGINT, NUMERIC, DOUBLE PRECISION), fleet_void_hold(UUID),
    fleet_available_balance(BIGINT), fleet_user_entries(BIGINT, INT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fleet_place_hold(UUID, BIGINT, NUMERIC, DOUBLE PRECISION), fleet_void_hold(UUID),
    fleet_available_balance(BIGINT), fleet_user_entries(BIGINT, INT) TO fleet_worker;
