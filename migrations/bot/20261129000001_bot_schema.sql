-- Bot database: users, chats, conversation history, dedup of updates, jobs
-- with leases, per-call usage, tool calls and the billing outbox (DESIGN §4).

CREATE TABLE users (
    user_id        BIGINT PRIMARY KEY,
    first_name     TEXT NOT NULL DEFAULT '',
    username       TEXT,
    language_code  TEXT,
    model          TEXT,
    blocked_at     TIMESTAMPTZ,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE chats (
    chat_id             BIGINT PRIMARY KEY,
    kind                TEXT NOT NULL,
    -- /new starts a new conversation: messages of older epochs are not sent to Claude.
    conversation_epoch  INT NOT NULL DEFAULT 1,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Telegram may deliver an update more than once; the first delivery wins.
CREATE TABLE processed_updates (
    update_id    BIGINT PRIMARY KEY,
    kind         TEXT NOT NULL,
    chat_id      BIGINT,
    deliveries   INT NOT NULL DEFAULT 1,
    outcome      TEXT NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    job_id            UUID PRIMARY KEY,
    chat_id           BIGINT NOT NULL REFERENCES chats(chat_id),
    user_id           BIGINT NOT NULL REFERENCES users(user_id),
    update_id         BIGINT NOT NULL UNIQUE,
    -- 'chat' (a Claude answer) or 'command' (/start, /help, /new, /balance).
    kind              TEXT NOT NULL CHECK (kind IN ('chat', 'command')),
    -- The user's turn: Messages API content blocks, or the command name.
    user_content      JSONB NOT NULL,
    telegram_message_id BIGINT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts          INT NOT NULL DEFAULT 0,
    lease_owner       TEXT,
    lease_epoch       BIGINT NOT NULL DEFAULT 0,
    lease_expires_at  TIMESTAMPTZ,
    answer_stored_at  TIMESTAMPTZ,
    -- /stop was requested for this job (the holder also checks at each heartbeat).
    cancel_requested_at TIMESTAMPTZ,
    -- Last time a reaper republished this job.
    reaped_at         TIMESTAMPTZ,
    -- Telegram message ids of the final answer (drill-down: update → job → messages).
    reply_message_ids BIGINT[] NOT NULL DEFAULT '{}',
    outcome           TEXT,
    last_error        TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at        TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ
);
-- At most one generation per chat (P2).
CREATE UNIQUE INDEX jobs_one_running_per_chat ON jobs (chat_id) WHERE status = 'running';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_chat_queued ON jobs (chat_id, update_id) WHERE status = 'queued';

CREATE TABLE messages (
    id                   BIGSERIAL PRIMARY KEY,
    chat_id              BIGINT NOT NULL REFERENCES chats(chat_id),
    conversation_epoch   INT NOT NULL,
    job_id               UUID REFERENCES jobs(job_id),
    role                 TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    -- Messages API content blocks, validated before use.
    content              JSONB NOT NULL,
    -- The answer was cut short (cancel, timeout, error) and is marked so.
    partial              BOOLEAN NOT NULL DEFAULT false,
    telegram_message_id  BIGINT,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation ON messages (chat_id, conversation_epoch, id);

-- One row per Messages API call: each call's usage is billed exactly once.
CREATE TABLE api_calls (
    job_id               UUID NOT NULL REFERENCES jobs(job_id),
    seq                  INT NOT NULL,
    lease_epoch          BIGINT NOT NULL,
    request_id           TEXT,
    anthropic_message_id TEXT,
    model                TEXT NOT NULL,
    stop_reason          TEXT,
    input_tokens         BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    cache_write_5m       BIGINT NOT NULL,
    cache_write_1h       BIGINT NOT NULL,
    cache_read           BIGINT NOT NULL,
    web_search_requests  BIGINT NOT NULL,
    provider_cost        NUMERIC NOT NULL,
    user_charge          NUMERIC NOT NULL,
    estimated            BOOLEAN NOT NULL DEFAULT false,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE tool_calls (
    job_id       UUID NOT NULL REFERENCES jobs(job_id),
    tool_use_id  TEXT NOT NULL,
    name         TEXT NOT NULL,
    input        JSONB NOT NULL,
    output       JSONB,
    is_error     BOOLEAN NOT NULL DEFAULT false,
    duration_ms  INT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, tool_use_id)
);

-- Written in the same transaction as what it charges for; relayed to the broker.
CREATE TABLE billing_outbox (
    event_id      UUID PRIMARY KEY,
    job_id        UUID,
    payload       JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ
);
CREATE INDEX billing_outbox_unpublished ON billing_outbox (created_at) WHERE published_at IS NULL;
