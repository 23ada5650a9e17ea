-- One pacer for every Bot API call of the fleet (DESIGN §7, P9): a row per
-- chat ('chat:<id>') and one for the bot ('bot'). A call takes the next
-- free slot; a 429 moves `paused_until` for every host at once.
CREATE TABLE telegram_pacing (
    scope         TEXT PRIMARY KEY,
    next_free     TIMESTAMPTZ NOT NULL DEFAULT now(),
    paused_until  TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
