-- Notes written by the `remember` tool and read by `recall`.
CREATE TABLE user_notes (
    id          BIGSERIAL PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users(user_id),
    note        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX user_notes_user ON user_notes (user_id, id);
