-- The billing ledger lives in its own database (BILLING_DATABASE_URL).
CREATE DATABASE fleet_billing OWNER fleet;
