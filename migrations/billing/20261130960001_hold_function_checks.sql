-- fleet_place_hold, tightened (a second attack pass, issue 13): a hold is
-- re-placed only for the user it belongs to (a job id of another user's
-- hold no longer rewrites that hold), its lifetime must be a positive,
-- finite number of seconds (a negative one made an active hold that the
-- next sweep would free mid-job), and `placed` is true only when a row was
-- written (a settled job's hold is not revived, and is not reported held).
CREATE OR REPLACE FUNCTION fleet_place_hold(p_job_id UUID, p_user_id BIGINT, p_amount NUMERIC,
                                            p_lifetime_s DOUBLE PRECISION,
                                            OUT placed BOOLEAN, OUT available NUMERIC)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    v_balance NUMERIC;
    v_held NUMERIC;
    v_written INT;
BEGIN
    IF p_amount IS NULL OR p_amount < 0 OR p_amount = 'NaN' THEN
        RAISE EXCEPTION 'hold amount must be a non-negative number' USING ERRCODE = '22023';
    END IF;
    IF p_lifetime_s IS NULL OR NOT (p_lifetime_s > 0 AND p_lifetime_s < 'Infinity'::float8) THEN
        RAISE EXCEPTION 'hold lifetime must be a positive number of seconds' USING ERRCODE = '22023';
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
    WHERE holds.status <> 'settled' AND holds.user_id = EXCLUDED.user_id;
    GET DIAGNOSTICS v_written = ROW_COUNT;
    placed := v_written = 1;
END $$;
REVOKE ALL ON FUNCTION fleet_place_hold(UUID, BIGINT, NUMERIC, DOUBLE PRECISION) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fleet_place_hold(UUID, BIGINT, NUMERIC, DOUBLE PRECISION) TO fleet_worker;
