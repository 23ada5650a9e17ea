-- Every call the provider served is on the books, even when its worker
-- dies (issue 15, part 6). A call's row is written when its stream starts
-- (`message_start`: request id, model, input usage), fenced by the job's
-- lease, in state `open`; the attempt's own finalize (or its abandoned
-- record) completes it with the final usage (`recorded`). A row still
-- `open` once its attempt is over (a newer claim, or the job left
-- `running`) is booked by the next attempt or the reaper as provider cost
-- charged to nobody, with estimated tokens (`orphaned`, `estimated`,
-- `abandoned`). The worker's enum `store::calls::CallState` lists the same
-- values, in this order (a unit test compares them).
ALTER TABLE api_calls ADD COLUMN state TEXT NOT NULL DEFAULT 'recorded'
    CHECK (state IN ('open', 'recorded', 'orphaned'));
-- The request's limits, for the estimate of an orphaned call: its
-- `max_tokens` and the `max_uses` of its web search tool (NULL: none).
ALTER TABLE api_calls ADD COLUMN max_tokens BIGINT;
ALTER TABLE api_calls ADD COLUMN max_web_searches BIGINT;
CREATE INDEX api_calls_open ON api_calls (created_at) WHERE state = 'open';
