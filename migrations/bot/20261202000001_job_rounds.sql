-- Resume, don't redo (issue 15, part 4). Each completed round of a job —
-- the assistant turn with its `tool_use` blocks and the tool results sent
-- back — is stored as it completes, fenced by the job's lease, in the same
-- transaction that records that round's Messages API calls (`api_calls`
-- `recorded`, their usage events in the outbox). A later attempt of the job
-- loads its rounds and continues after the last one instead of calling
-- Claude from the start: no tool runs or is charged twice, and the provider
-- is not paid twice for finished rounds. `finalize` stores the rounds in
-- the conversation (`messages`) and deletes them in its transaction.
CREATE TABLE job_rounds (
    job_id        UUID NOT NULL REFERENCES jobs(job_id),
    -- 1-based number of the tool round in the job.
    round         INT NOT NULL CHECK (round >= 1),
    -- The assistant turn's content blocks (text, thinking, tool_use, …).
    assistant     JSONB NOT NULL,
    -- The user turn of `tool_result` blocks sent back.
    tool_results  JSONB NOT NULL,
    -- The visible text the round added to the answer (separator included).
    text          TEXT NOT NULL,
    -- The round's paid tools, for the answer's notice: [[name, "USD"], …].
    tool_charges  JSONB NOT NULL,
    -- What the round's calls charge the user, USD (their usage events are
    -- in the outbox): counted as spent by the next attempt's admission.
    calls_charge  NUMERIC NOT NULL,
    -- The highest `api_calls.seq` of the round: the next call is numbered after it.
    last_call_seq INT NOT NULL,
    -- The claim that stored it.
    lease_epoch   BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, round)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON job_rounds TO fleet_worker;
