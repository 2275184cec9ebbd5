-- Several nodes on one database.
--
-- attempt_counters: the failure counters of everything guessable (client secrets, logins,
-- emailed codes, reset requests), shared by every node, so a limit is a limit across nodes.
-- A key's fixed window ends at `window_end`; keys are digests, never the raw identifier.
CREATE TABLE attempt_counters (
    key        TEXT PRIMARY KEY,
    events     BIGINT NOT NULL,
    window_end BIGINT NOT NULL
);
CREATE INDEX attempt_counters_window_end ON attempt_counters (window_end);

-- leases: named jobs one node does at a time (key and CA rotation, purges, expiry notices).
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Every transaction that commits a successful audit event notifies `portcullis_changes`
-- (delivered at commit; one notification per transaction), so other nodes drop what they
-- cached at once instead of at their next poll.
CREATE FUNCTION portcullis_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('portcullis_changes', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_events_notify AFTER INSERT ON audit_events
    FOR EACH ROW WHEN (NEW.outcome <> 'failure') EXECUTE FUNCTION portcullis_notify_change();
