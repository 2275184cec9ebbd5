-- Portcullis schema v3 (sqlite): the certificate authority. Organisations' allowed DNS domains,
-- applications' JWKS URLs, the inventory of issued certificates, the latest CRL of every issuing
-- CA with its number counter, and the client assertion `jti`s seen (replay protection).

ALTER TABLE organisations ADD COLUMN allowed_domains TEXT NOT NULL DEFAULT '[]';
ALTER TABLE applications ADD COLUMN jwks_uri TEXT;

-- The inventory outlives applications: `app_id` and `client_id` are kept, not referenced, so
-- deleting an application leaves its certificates (and their revocation state) in place.
CREATE TABLE certificates (
    id                 TEXT PRIMARY KEY,
    org_id             TEXT NOT NULL REFERENCES organisations(id),
    app_id             TEXT NOT NULL,
    client_id          TEXT NOT NULL,
    cert_type          TEXT NOT NULL CHECK (cert_type IN ('transport', 'server-transport', 'signing')),
    serial             TEXT NOT NULL UNIQUE,
    issuer_id          TEXT NOT NULL REFERENCES ca_certificates(id),
    subject            TEXT NOT NULL,
    sans               TEXT NOT NULL,
    key_type           TEXT NOT NULL,
    spki_sha256        TEXT NOT NULL,
    fingerprint        TEXT NOT NULL UNIQUE,
    certificate_pem    TEXT NOT NULL,
    not_before         BIGINT NOT NULL,
    not_after          BIGINT NOT NULL,
    revoked_at         BIGINT,
    revocation_reason  TEXT,
    renewed_from       TEXT,
    expiry_notified_at BIGINT,
    created_by         TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    CHECK ((revoked_at IS NULL) = (revocation_reason IS NULL))
);
CREATE INDEX certificates_org ON certificates (org_id, created_at, id);
CREATE INDEX certificates_app ON certificates (app_id, cert_type, created_at);
CREATE INDEX certificates_spki ON certificates (spki_sha256);
-- A CRL lists its issuer's revoked certificates by serial.
CREATE INDEX certificates_revoked ON certificates (issuer_id, serial) WHERE revoked_at IS NOT NULL;
-- The expiry warning scan: live certificates not yet warned about.
CREATE INDEX certificates_expiring ON certificates (not_after) WHERE revoked_at IS NULL AND expiry_notified_at IS NULL;

-- The latest CRL of each issuing CA (a lower number never replaces a higher one).
CREATE TABLE crls (
    issuer_id   TEXT PRIMARY KEY REFERENCES ca_certificates(id),
    number      BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    der         BLOB NOT NULL
);

-- The last CRL number taken per issuing CA, incremented atomically by every node.
CREATE TABLE crl_numbers (
    issuer_id   TEXT PRIMARY KEY REFERENCES ca_certificates(id),
    last_number BIGINT NOT NULL
);

-- Client assertion ids seen, kept until the assertion expires.
CREATE TABLE assertion_jtis (
    client_id  TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX assertion_jtis_expiry ON assertion_jtis (expires_at);
