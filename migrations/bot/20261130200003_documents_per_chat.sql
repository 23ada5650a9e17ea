-- Documents are scoped to (user, chat) (issue 13): the same file sent
-- privately and in a group is two rows, so sending it in a group never
-- takes it out of the private chat's view (or the other way round).
ALTER TABLE documents DROP CONSTRAINT documents_user_id_file_unique_id_key;
ALTER TABLE documents ADD CONSTRAINT documents_user_chat_file_key UNIQUE (user_id, chat_id, file_unique_id);
