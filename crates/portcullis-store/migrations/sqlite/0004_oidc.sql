-- Portcullis schema v4 (sqlite): OpenID Connect. Organisations' self-registration switch,
-- applications' OIDC settings, invitation codes, authorization codes, refresh tokens, the
-- applications each SSO session signed in to, consents, back-channel logout deliveries and
-- TOTP second factors. Codes and refresh tokens appear only as keyed hashes, TOTP secrets only
-- sealed.

ALTER TABLE organisations ADD COLUMN self_registration BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE applications ADD COLUMN id_token_signing_alg TEXT NOT NULL DEFAULT 'RS256';
ALTER TABLE applications ADD COLUMN first_party BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE applications ADD COLUMN post_logout_redirect_uris TEXT NOT NULL DEFAULT '[]';
ALTER TABLE applications ADD COLUMN backchannel_logout_uri TEXT;
ALTER TABLE applications ADD COLUMN always_issue_refresh_token BOOLEAN NOT NULL DEFAULT FALSE;

-- Invitations are verifications too: SQLite cannot change a CHECK constraint, so the table is
-- rebuilt (nothing references it) with 'invite' among the purposes.
CREATE TABLE verifications_v4 (
    id           TEXT PRIMARY KEY,
    purpose      TEXT NOT NULL CHECK (purpose IN ('session', 'api_key', 'email', 'password_reset', 'invite')),
    org_id       TEXT NOT NULL REFERENCES organisations(id),
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    subject_id   TEXT NOT NULL,
    code_hash    BLOB NOT NULL,
    attempts     INTEGER NOT NULL,
    expires_at   BIGINT NOT NULL,
    consumed_at  BIGINT,
    created_at   BIGINT NOT NULL,
    sealed_token BLOB
);
INSERT INTO verifications_v4 (id, purpose, org_id, user_id, subject_id, code_hash, attempts, expires_at, consumed_at, created_at, sealed_token)
    SELECT id, purpose, org_id, user_id, subject_id, code_hash, attempts, expires_at, consumed_at, created_at, sealed_token FROM verifications;
DROP TABLE verifications;
ALTER TABLE verifications_v4 RENAME TO verifications;
CREATE INDEX verifications_expiry ON verifications (expires_at);

-- Grants die with their user and their application. `session_id` is kept, not referenced: a
-- refresh token may outlive the purged SSO session it was issued in. `grant_revoked_at` is set
-- once when a replayed code revoked what its redemption issued.
CREATE TABLE authorization_codes (
    code_hash             BLOB PRIMARY KEY,
    client_id             TEXT NOT NULL REFERENCES applications(client_id) ON DELETE CASCADE,
    org_id                TEXT NOT NULL REFERENCES organisations(id),
    user_id               TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_id            TEXT NOT NULL,
    redirect_uri          TEXT NOT NULL,
    scope                 TEXT NOT NULL,
    nonce                 TEXT,
    code_challenge        TEXT,
    auth_time             BIGINT NOT NULL,
    amr                   TEXT NOT NULL,
    created_at            BIGINT NOT NULL,
    expires_at            BIGINT NOT NULL,
    consumed_at           BIGINT,
    issued_jti            TEXT,
    issued_jti_expires_at BIGINT,
    issued_family         TEXT,
    grant_revoked_at      BIGINT
);
CREATE INDEX authorization_codes_user ON authorization_codes (user_id);
CREATE INDEX authorization_codes_expiry ON authorization_codes (expires_at);

CREATE TABLE refresh_tokens (
    id         TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL UNIQUE,
    family_id  TEXT NOT NULL,
    client_id  TEXT NOT NULL REFERENCES applications(client_id) ON DELETE CASCADE,
    org_id     TEXT NOT NULL REFERENCES organisations(id),
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_id TEXT NOT NULL,
    scope      TEXT NOT NULL,
    auth_time  BIGINT NOT NULL,
    amr        TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    revoked_at BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
CREATE INDEX refresh_tokens_user_client ON refresh_tokens (user_id, client_id);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);

-- The applications an SSO session signed in to (for logout); gone with the session.
CREATE TABLE session_clients (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    client_id  TEXT NOT NULL REFERENCES applications(client_id) ON DELETE CASCADE,
    first_at   BIGINT NOT NULL,
    PRIMARY KEY (session_id, client_id)
);

CREATE TABLE consents (
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    client_id  TEXT NOT NULL REFERENCES applications(client_id) ON DELETE CASCADE,
    org_id     TEXT NOT NULL REFERENCES organisations(id),
    scopes     TEXT NOT NULL,
    granted_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, client_id)
);

-- Signed logout tokens on their way to applications; kept (like mail) until purged.
CREATE TABLE logout_deliveries (
    id              TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL,
    uri             TEXT NOT NULL,
    logout_token    TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT,
    failed_at       BIGINT
);
CREATE INDEX logout_deliveries_due ON logout_deliveries (next_attempt_at) WHERE delivered_at IS NULL AND failed_at IS NULL;

CREATE TABLE user_totp (
    user_id       TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    sealed_secret BLOB NOT NULL,
    confirmed_at  BIGINT,
    last_step     BIGINT,
    created_at    BIGINT NOT NULL
);
