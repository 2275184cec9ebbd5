-- Browser sessions of the gateway's `session` routes. Each one is minted when a gateway redeems
-- an authorization code, and belongs to the SSO session the person signed in with: it is
-- refused once that session has ended (`parent_id`). The code records the session it was
-- redeemed for (`issued_session`), so a replayed code revokes it.
ALTER TABLE sessions ADD COLUMN parent_id TEXT;
CREATE INDEX sessions_parent ON sessions (parent_id);
ALTER TABLE authorization_codes ADD COLUMN issued_session TEXT;
