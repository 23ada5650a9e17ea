-- Forum topics (Bot API, "Forum topics"): a message in a topic of a forum
-- supergroup (`is_topic_message`) is answered inside that topic, so every
-- Bot API call for its job carries `message_thread_id`.
ALTER TABLE jobs ADD COLUMN message_thread_id BIGINT;
