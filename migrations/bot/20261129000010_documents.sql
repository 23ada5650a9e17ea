-- Documents users sent (Bot API `Document`), for the `list_files` and
-- `read_file` tools: the extracted text only, never the raw bytes. One row
-- per user and file (`file_unique_id` is the same every time a file is sent).
CREATE TABLE documents (
    id              BIGSERIAL PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users(user_id),
    -- The chat it was sent in (no foreign key: chats move when a group becomes a supergroup).
    chat_id         BIGINT NOT NULL,
    file_unique_id  TEXT NOT NULL,
    file_name       TEXT NOT NULL,
    mime_type       TEXT,
    -- Size of the downloaded file, bytes (at most DOCUMENT_MAX_BYTES).
    size_bytes      BIGINT NOT NULL CHECK (size_bytes >= 0),
    -- How `text` was obtained: 'text' (UTF-8, invalid bytes replaced) or 'pdf'.
    extraction      TEXT NOT NULL CHECK (extraction IN ('text', 'pdf')),
    text            TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (user_id, file_unique_id)
);
CREATE INDEX documents_user ON documents (user_id, id);
