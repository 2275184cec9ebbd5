-- Portcullis schema v2 (postgres): the Auth API. Users' addresses and lockout,
-- login sessions, API keys, emailed verification codes and the mail queue. Session tokens, API
-- secrets and codes appear only as keyed hashes; mail bodies and pending tokens only sealed.

ALTER TABLE users ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until BIGINT;
CREATE INDEX users_email ON users (email);

CREATE TABLE user_emails (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    org_id      TEXT NOT NULL REFERENCES organisations(id),
    email       TEXT COLLATE "C" NOT NULL,
    verified_at BIGINT,
    created_at  BIGINT NOT NULL,
    UNIQUE (org_id, email)
);
CREATE INDEX user_emails_user ON user_emails (user_id);
-- Every existing user's primary address.
INSERT INTO user_emails (id, user_id, org_id, email, verified_at, created_at)
    SELECT id, id, org_id, email, NULL, created_at FROM users;

CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    org_id       TEXT NOT NULL REFERENCES organisations(id),
    token_hash   BYTEA NOT NULL UNIQUE,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
    created_at   BIGINT NOT NULL,
    verified_at  BIGINT,
    last_used_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    ip           TEXT,
    user_agent   TEXT,
    revoked_at   BIGINT
);
CREATE INDEX sessions_user ON sessions (user_id, created_at);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL REFERENCES organisations(id),
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    api_key      TEXT COLLATE "C" NOT NULL UNIQUE,
    secret_hash  BYTEA NOT NULL,
    roles        TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
    expires_at   BIGINT,
    last_used_at BIGINT,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_org ON api_keys (org_id, created_at);

CREATE TABLE verifications (
    id           TEXT PRIMARY KEY,
    purpose      TEXT NOT NULL CHECK (purpose IN ('session', 'api_key', 'email', 'password_reset')),
    org_id       TEXT NOT NULL REFERENCES organisations(id),
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    subject_id   TEXT NOT NULL,
    code_hash    BYTEA NOT NULL,
    attempts     INTEGER NOT NULL,
    expires_at   BIGINT NOT NULL,
    consumed_at  BIGINT,
    created_at   BIGINT NOT NULL,
    sealed_token BYTEA
);
CREATE INDEX verifications_expiry ON verifications (expires_at);

CREATE TABLE mail_queue (
    id              TEXT PRIMARY KEY,
    to_addr         TEXT NOT NULL,
    subject         TEXT NOT NULL,
    sealed_body     BYTEA NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT
);
CREATE INDEX mail_queue_due ON mail_queue (sent_at, next_attempt_at);
