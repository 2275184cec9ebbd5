-- The audit log becomes append-only and hash-chained (crates/portcullis-core/src/audit_chain.rs).
-- Each new row carries its MAC; the one-row head records where the chain starts (rows already
-- present stay unchained and are counted in pre_rows), its last seq and MAC, and its own MAC,
-- which the first start with the master key seals. Appends take seq from the head (under its
-- row lock), not from the sequence: a node still running an older version fails its audited
-- writes instead of adding rows outside the chain.

ALTER TABLE audit_events ADD COLUMN mac BYTEA;
ALTER TABLE audit_events ALTER COLUMN seq DROP DEFAULT;

CREATE TABLE audit_chain (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    first_seq BIGINT NOT NULL,
    pre_rows  BIGINT NOT NULL,
    seq       BIGINT NOT NULL,
    mac       BYTEA,
    head_mac  BYTEA
);
INSERT INTO audit_chain (id, first_seq, pre_rows, seq, mac, head_mac)
    SELECT 1, COALESCE(MAX(seq), 0) + 1, COUNT(*), COALESCE(MAX(seq), 0), NULL, NULL FROM audit_events;

CREATE FUNCTION portcullis_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION portcullis_audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION portcullis_audit_append_only();
