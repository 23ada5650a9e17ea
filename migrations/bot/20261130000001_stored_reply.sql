-- The reply `finalize` stored with the answer (the text to deliver, notices
-- included). An attempt that finds `answer_stored_at` set delivers this
-- instead of generating again, so a crash between storing and delivering
-- never stores the user's turn twice or calls Claude again.
ALTER TABLE jobs ADD COLUMN stored_reply TEXT;
