-- Two-phase spending (DESIGN §5.4, as in TigerBeetle's pending transfers):
-- a hold reserves part of a user's balance for a running job; available =
-- balance − active holds. The job's charges settle it (a hold_release event
-- applied after them); a failed job voids it; expired holds are swept.
CREATE TABLE holds (
    job_id      UUID PRIMARY KEY,
    user_id     BIGINT NOT NULL,
    amount      NUMERIC NOT NULL CHECK (amount >= 0),
    status      TEXT NOT NULL CHECK (status IN ('active', 'settled', 'voided')),
    expires_at  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX holds_active_user ON holds (user_id) WHERE status = 'active';
