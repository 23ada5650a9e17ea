-- Events of one transaction share created_at: relay them in insertion order
-- (a job's hold_release comes after its charges).
ALTER TABLE billing_outbox ADD COLUMN seq BIGSERIAL;
CREATE INDEX billing_outbox_unpublished_seq ON billing_outbox (seq) WHERE published_at IS NULL;
