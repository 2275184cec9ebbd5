-- Portcullis schema v1 (postgres). Ids are text (UUIDv7), timestamps integer Unix seconds,
-- lists JSON text. Sorted text columns use the C collation so both backends order by bytes. Secrets appear only as keyed hashes; private keys only sealed (AEAD).

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE organisations (
    id         TEXT PRIMARY KEY,
    slug       TEXT COLLATE "C" NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE services (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES organisations(id),
    slug        TEXT COLLATE "C" NOT NULL,
    name        TEXT NOT NULL,
    audience    TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    roles       TEXT NOT NULL,
    permissions TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (org_id, slug)
);

CREATE TABLE role_permissions (
    org_id     TEXT NOT NULL REFERENCES organisations(id),
    role       TEXT NOT NULL,
    permission TEXT NOT NULL,
    PRIMARY KEY (org_id, role, permission)
);

CREATE TABLE applications (
    id                         TEXT PRIMARY KEY,
    org_id                     TEXT NOT NULL REFERENCES organisations(id),
    slug                       TEXT COLLATE "C" NOT NULL,
    client_id                  TEXT NOT NULL UNIQUE,
    name                       TEXT NOT NULL,
    grant_types                TEXT NOT NULL,
    scopes                     TEXT NOT NULL,
    roles                      TEXT NOT NULL,
    auth_method                TEXT NOT NULL,
    redirect_uris              TEXT NOT NULL,
    access_token_lifetime      BIGINT NOT NULL,
    signing_alg                TEXT NOT NULL,
    enabled                    BOOLEAN NOT NULL,
    secret_hash                BYTEA,
    previous_secret_hash       BYTEA,
    previous_secret_expires_at BIGINT,
    created_at                 BIGINT NOT NULL,
    updated_at                 BIGINT NOT NULL,
    UNIQUE (org_id, slug)
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES organisations(id),
    email         TEXT COLLATE "C" NOT NULL,
    name          TEXT,
    password_hash TEXT,
    roles         TEXT NOT NULL,
    enabled       BOOLEAN NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    UNIQUE (org_id, email)
);

CREATE TABLE signing_keys (
    kid                TEXT PRIMARY KEY,
    alg                TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('next', 'current', 'retired')),
    sealed_private_key BYTEA NOT NULL,
    created_at         BIGINT NOT NULL,
    activated_at       BIGINT,
    expires_at         BIGINT
);
-- At most one next and one current key per algorithm, whatever the nodes do.
CREATE UNIQUE INDEX signing_keys_one_live ON signing_keys (alg, state) WHERE state IN ('next', 'current');

CREATE TABLE ca_certificates (
    id                 TEXT PRIMARY KEY,
    kind               TEXT NOT NULL CHECK (kind IN ('root', 'issuing')),
    subject            TEXT NOT NULL,
    certificate_pem    TEXT NOT NULL,
    sealed_private_key BYTEA NOT NULL,
    not_before         BIGINT NOT NULL,
    not_after          BIGINT NOT NULL,
    active             BOOLEAN NOT NULL,
    created_at         BIGINT NOT NULL
);

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    client_id  TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);

CREATE TABLE audit_events (
    seq BIGSERIAL PRIMARY KEY,
    id      TEXT NOT NULL UNIQUE,
    at      BIGINT NOT NULL,
    org_id  TEXT,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    outcome TEXT NOT NULL,
    ip      TEXT,
    details TEXT NOT NULL
);
CREATE INDEX audit_events_org ON audit_events (org_id, seq);
