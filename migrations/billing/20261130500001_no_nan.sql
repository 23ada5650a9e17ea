-- NaN compares greater than every number in PostgreSQL, so `amount >= 0`
-- let it through: forbid it explicitly (ledger entries are append-only and
-- checked on insert; balances move only by entries).
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_amount_not_nan CHECK (amount <> 'NaN');
ALTER TABLE holds ADD CONSTRAINT holds_amount_not_nan CHECK (amount <> 'NaN');
ALTER TABLE accounts ADD CONSTRAINT accounts_balance_not_nan CHECK (balance <> 'NaN');
