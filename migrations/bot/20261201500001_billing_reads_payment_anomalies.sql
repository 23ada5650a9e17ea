-- `billing-worker payment-anomalies` lists the Stars payments that credited
-- nothing and `refund-stars` marks one refunded: the billing role needs to
-- read that table and set `refunded_at`, and nothing more (a newcomer found
-- both commands refused with "permission denied" as the documented role).
GRANT SELECT ON payment_anomalies TO fleet_billing;
GRANT UPDATE (refunded_at) ON payment_anomalies TO fleet_billing;
