-- A call made under a lease that was then lost (a paused or partitioned
-- worker) or handed back is recorded too, under its own lease epoch, so
-- finance sees every call the provider served: `abandoned` marks it, and
-- its user charge is zero (the user pays for the attempt that answered).
ALTER TABLE api_calls ADD COLUMN abandoned BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE api_calls DROP CONSTRAINT api_calls_pkey;
ALTER TABLE api_calls ADD PRIMARY KEY (job_id, lease_epoch, seq);
