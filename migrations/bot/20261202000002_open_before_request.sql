-- The `open` row of a call is written before its HTTP request leaves (issue
-- 15, part 6 tail), so a worker killed after the request reached the
-- provider but before it read `message_start` still leaves the call on the
-- books. Such a row has no request id, message id or reported usage yet:
-- `started` is false and `input_tokens` holds an upper bound of the input
-- computed from the request's size (`holds::input_token_bound`). At
-- `message_start` the row is updated with the request id, message id,
-- model and the reported input usage, and `started` becomes true. Rows
-- written before this column existed were all written at `message_start`.
ALTER TABLE api_calls ADD COLUMN started BOOLEAN NOT NULL DEFAULT true;
