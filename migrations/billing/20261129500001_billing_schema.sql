-- Billing database: a double-entry ledger (DESIGN §4, §7a).
-- Balances are credit-normal: balance = credits − debits. The sum of all
-- balances is zero after every commit.

CREATE TABLE accounts (
    account_id  TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('user', 'revenue', 'provider_cost', 'provider_payable', 'payments')),
    user_id     BIGINT UNIQUE,
    balance     NUMERIC NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'user') = (user_id IS NOT NULL))
);

INSERT INTO accounts (account_id, kind) VALUES
    ('system:revenue', 'revenue'),
    ('system:provider_cost', 'provider_cost'),
    ('system:provider_payable', 'provider_payable'),
    ('system:payments', 'payments');

-- Every applied event, once: the idempotency record.
CREATE TABLE applied_events (
    event_id    UUID PRIMARY KEY,
    kind        TEXT NOT NULL,
    payload     JSONB NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE ledger_entries (
    entry_id             BIGSERIAL PRIMARY KEY,
    event_id             UUID NOT NULL REFERENCES applied_events(event_id),
    leg                  SMALLINT NOT NULL,
    debit_account        TEXT NOT NULL REFERENCES accounts(account_id),
    credit_account       TEXT NOT NULL REFERENCES accounts(account_id),
    amount               NUMERIC NOT NULL CHECK (amount >= 0),
    kind                 TEXT NOT NULL,
    user_id              BIGINT,
    job_id               UUID,
    provider_request_id  TEXT,
    estimated            BOOLEAN NOT NULL DEFAULT false,
    memo                 TEXT,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (event_id, leg),
    CHECK (debit_account <> credit_account)
);
CREATE INDEX ledger_entries_user ON ledger_entries (user_id, entry_id);
CREATE INDEX ledger_entries_job ON ledger_entries (job_id);

-- Append-only: history is corrected by new entries, never edited.
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only';
END $$;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

-- What finance must look at: events that failed, with their last error.
CREATE TABLE billing_failures (
    event_id          UUID PRIMARY KEY,
    attempts          INT NOT NULL DEFAULT 0,
    last_error        TEXT NOT NULL,
    payload           JSONB,
    dead_lettered_at  TIMESTAMPTZ,
    resolved_at       TIMESTAMPTZ,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
