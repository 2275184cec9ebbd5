-- The audit log becomes append-only and hash-chained (crates/portcullis-core/src/audit_chain.rs).
-- Each new row carries its MAC; the one-row head records where the chain starts (rows already
-- present stay unchained and are counted in pre_rows), its last seq and MAC, and its own MAC,
-- which the first start with the master key seals.

ALTER TABLE audit_events ADD COLUMN mac BLOB;

CREATE TABLE audit_chain (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    first_seq BIGINT NOT NULL,
    pre_rows  BIGINT NOT NULL,
    seq       BIGINT NOT NULL,
    mac       BLOB,
    head_mac  BLOB
);
INSERT INTO audit_chain (id, first_seq, pre_rows, seq, mac, head_mac)
    SELECT 1, COALESCE(MAX(seq), 0) + 1, COUNT(*), COALESCE(MAX(seq), 0), NULL, NULL FROM audit_events;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
