-- Documents leave intake (issue 13): intake records a document as a job of
-- kind 'document' holding the Bot API `Document`; the job downloads and
-- extracts it (PDFs in a sandboxed child process) under its lease, then
-- becomes a 'chat' job. `document_started_epoch` is the poison marker: the
-- lease epoch of the attempt that began reading the document, written
-- before it starts; a later attempt that finds an older epoch knows the
-- reading never came back (the worker died) and refuses the document
-- instead of trying again.
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('chat', 'command', 'document'));
ALTER TABLE jobs ADD COLUMN document_started_epoch BIGINT;
