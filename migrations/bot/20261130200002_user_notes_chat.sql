-- Notes belong to a user *in a chat* (issue 13): `recall` in a group sees
-- only what the asker remembered in that group, in a private chat only what
-- was remembered there. Notes written before this migration carry no chat;
-- they go to the user's private chat (its id is the user id, Bot API
-- "Chat"), the only place they stay visible. No foreign key: chats move
-- when a group becomes a supergroup (`chats::migrate` moves the notes too).
ALTER TABLE user_notes ADD COLUMN chat_id BIGINT;
UPDATE user_notes SET chat_id = user_id;
ALTER TABLE user_notes ALTER COLUMN chat_id SET NOT NULL;
DROP INDEX user_notes_user;
CREATE INDEX user_notes_user_chat ON user_notes (user_id, chat_id, id);
