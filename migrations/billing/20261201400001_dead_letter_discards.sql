-- Finance can discard a dead-lettered billing event with a reason (issue
-- 15, part 8: `billing-worker dead-letters discard --id … --reason …`): the
-- failure is resolved without applying the event, and the decision is kept
-- beside it. A discarded failure is no longer listed as pending and is not
-- redriven.
--
-- Roles: fleet_billing already holds SELECT, INSERT, UPDATE on
-- billing_failures (20261130950001_roles.sql); table privileges cover the
-- new columns. fleet_worker has none on this table and gets none.
ALTER TABLE billing_failures
    ADD COLUMN discarded_at TIMESTAMPTZ,
    ADD COLUMN discard_reason TEXT,
    ADD CONSTRAINT billing_failures_discard_reason
        CHECK ((discarded_at IS NULL) = (discard_reason IS NULL)
               AND (discard_reason IS NULL OR length(btrim(discard_reason)) > 0));
