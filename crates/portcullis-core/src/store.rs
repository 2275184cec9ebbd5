//! The [`Store`] port. Every mutating method is one transaction and takes the audit event that
//! records it, so a change and its audit row are written together or not at all.

use async_trait::async_trait;

use crate::audit_chain::{AuditChainKey, AuditChainVisitor};
use crate::clock::UnixTime;
use crate::crypto::secrets::SecretHash;
use crate::crypto::signing::Algorithm;
use crate::error::StoreError;
use crate::ids::{PermissionName, RoleName};
use crate::model::*;

pub type StoreResult<T> = Result<T, StoreError>;

/// One signing-key rotation for one algorithm, applied atomically: `current` becomes retired
/// (published until `retired_until`), `next` becomes current, `new_next` is inserted.
#[derive(Debug, Clone)]
pub struct KeyRotation {
    pub alg: Algorithm,
    pub current_kid: String,
    pub next_kid: String,
    pub retired_until: UnixTime,
    pub new_next: StoredSigningKey,
    pub now: UnixTime,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for readiness.
    async fn ping(&self) -> StoreResult<()>;

    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    /// Inserts unless present; returns whether it inserted.
    async fn insert_setting(&self, key: &str, value: &str) -> StoreResult<bool>;

    async fn create_organisation(&self, org: &Organisation, audit: &AuditEvent) -> StoreResult<()>;
    async fn organisation(&self, slug: &str) -> StoreResult<Option<Organisation>>;
    async fn organisation_by_id(&self, id: &str) -> StoreResult<Option<Organisation>>;
    async fn organisations(&self, page: Page) -> StoreResult<Vec<Organisation>>;
    /// Organisations whose slug or name contains `query` (case-insensitive), by slug.
    async fn search_organisations(&self, query: &str, page: Page) -> StoreResult<Vec<Organisation>>;
    /// Replaces the organisation's allowed DNS domains; `false` if there is no such organisation.
    async fn set_organisation_domains(
        &self,
        org_id: &str,
        domains: &[String],
        now: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;

    async fn create_service(&self, service: &Service, grants: &[RoleGrant], audit: &AuditEvent) -> StoreResult<()>;
    async fn service(&self, org_id: &str, slug: &str) -> StoreResult<Option<Service>>;
    async fn services(&self, org_id: &str) -> StoreResult<Vec<Service>>;
    async fn service_by_audience(&self, audience: &str) -> StoreResult<Option<Service>>;
    /// Deletes the service and its role grants.
    async fn delete_service(&self, org_id: &str, slug: &str, audit: &AuditEvent) -> StoreResult<bool>;

    async fn role_grants(&self, org_id: &str) -> StoreResult<Vec<RoleGrant>>;
    /// Replaces the permissions granted to `role`.
    async fn set_role_permissions(
        &self,
        org_id: &str,
        role: &RoleName,
        permissions: &[PermissionName],
        audit: &AuditEvent,
    ) -> StoreResult<()>;

    async fn create_application(&self, app: &Application, audit: &AuditEvent) -> StoreResult<()>;
    async fn application(&self, client_id: &str) -> StoreResult<Option<Application>>;
    async fn applications(&self, org_id: &str, page: Page) -> StoreResult<Vec<Application>>;
    /// The organisation's applications whose slug or name contains `query`
    /// (case-insensitive), by slug.
    async fn search_applications(&self, org_id: &str, query: &str, page: Page) -> StoreResult<Vec<Application>>;
    /// Replaces the row with `app.id` if its `updated_at` still equals `expected_updated_at`
    /// (optimistic concurrency); `Conflict` otherwise.
    async fn update_application(
        &self,
        app: &Application,
        expected_updated_at: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    async fn delete_application(&self, client_id: &str, audit: &AuditEvent) -> StoreResult<bool>;

    /// Inserts the user and its primary address (a [`UserEmail`] whose id is the user's id,
    /// unverified).
    async fn create_user(&self, user: &User, audit: &AuditEvent) -> StoreResult<()>;
    async fn user(&self, org_id: &str, id: &str) -> StoreResult<Option<User>>;
    async fn user_by_email(&self, org_id: &str, email: &str) -> StoreResult<Option<User>>;
    async fn users(&self, org_id: &str, page: Page) -> StoreResult<Vec<User>>;
    /// Users whose email or name contains `query` (case-insensitive), ordered by email.
    async fn search_users(&self, org_id: &str, query: &str, page: Page) -> StoreResult<Vec<User>>;
    /// Enabled users of the organisation holding `role` (at most `max`), e.g. its admins.
    async fn users_with_role(&self, org_id: &str, role: &str, max: u32) -> StoreResult<Vec<User>>;
    /// Users of the organisation holding `role` (enabled or not), by email: who holds what.
    async fn role_users(&self, org_id: &str, role: &str, page: Page) -> StoreResult<Vec<User>>;
    /// Applications of the organisation holding `role`, by slug.
    async fn role_applications(&self, org_id: &str, role: &str, page: Page) -> StoreResult<Vec<Application>>;
    /// Every user, in any organisation, whose primary email is `email` (at most `max`).
    async fn users_with_email(&self, email: &str, max: u32) -> StoreResult<Vec<User>>;
    /// Replaces the row if its `updated_at` still equals `expected_updated_at` (`Conflict`
    /// otherwise). With `end_sessions`, every session of the user is revoked in the same
    /// transaction. The user's `email` must be one of its addresses.
    async fn update_user(
        &self,
        user: &User,
        expected_updated_at: UnixTime,
        end_sessions: bool,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    /// Sets the lockout counter (without touching `updated_at`) and records the login attempt
    /// in `audit`, in one transaction.
    async fn set_login_failures(
        &self,
        user_id: &str,
        failed_logins: u32,
        locked_until: Option<UnixTime>,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    /// Counts one failed login atomically (parallel failures are all counted): a lock that has
    /// ended starts a new count at 1; reaching `threshold` locks until `lock_until`; a running
    /// lock is kept. Records `audit` in the same transaction. Returns the new count and lock
    /// (`None`: no such user).
    async fn record_login_failure(
        &self,
        user_id: &str,
        now: UnixTime,
        threshold: u32,
        lock_until: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<Option<(u32, Option<UnixTime>)>>;
    /// Deletes the user with its addresses, sessions, API keys, pending verifications, and
    /// its authorization codes, refresh tokens, consents and TOTP enrolment.
    async fn delete_user(&self, org_id: &str, id: &str, audit: &AuditEvent) -> StoreResult<bool>;

    async fn user_emails(&self, user_id: &str) -> StoreResult<Vec<UserEmail>>;
    /// Inserts an address with its verification and the mail carrying the code.
    /// `Conflict` if the organisation already has that address.
    async fn add_user_email(
        &self,
        email: &UserEmail,
        verification: &Verification,
        mail: &QueuedMail,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    /// Makes a verified address the user's primary one.
    async fn set_primary_email(
        &self,
        user_id: &str,
        email_id: &str,
        now: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// Removes an address that is not the primary one.
    async fn remove_user_email(&self, user_id: &str, email_id: &str, audit: &AuditEvent) -> StoreResult<bool>;

    /// The pending session, its verification and (unless the second factor is an
    /// authenticator app) the mail carrying the code.
    async fn create_session(
        &self,
        session: &Session,
        verification: &Verification,
        mail: Option<&QueuedMail>,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    async fn session(&self, id: &str) -> StoreResult<Option<Session>>;
    async fn session_by_token(&self, token_hash: &SecretHash) -> StoreResult<Option<Session>>;
    /// Newest first, revoked ones included.
    async fn user_sessions(&self, user_id: &str, page: Page) -> StoreResult<Vec<Session>>;
    async fn touch_session(&self, id: &str, now: UnixTime) -> StoreResult<()>;
    /// Replaces the token hash if the session is active and still has `old`: `false` when
    /// another refresh (or a revocation) got there first.
    async fn rotate_session_token(
        &self,
        id: &str,
        old: &SecretHash,
        new: &SecretHash,
        now: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// `false` if it was not pending or active.
    async fn revoke_session(&self, id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool>;
    async fn revoke_user_sessions(&self, user_id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<u64>;
    /// Deletes sessions that ended (expired or revoked) before `before`.
    async fn purge_sessions(&self, before: UnixTime) -> StoreResult<u64>;

    async fn create_api_key(
        &self,
        key: &ApiKey,
        verification: &Verification,
        mail: &QueuedMail,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    async fn api_key(&self, org_id: &str, id: &str) -> StoreResult<Option<ApiKey>>;
    async fn api_key_by_key(&self, key: &str) -> StoreResult<Option<ApiKey>>;
    /// Newest first; all of the organisation's, or one user's.
    async fn api_keys(&self, org_id: &str, user_id: Option<&str>, page: Page) -> StoreResult<Vec<ApiKey>>;
    /// A user's API keys whose name contains `query` (any case) or whose key starts with it,
    /// newest first.
    async fn search_user_api_keys(
        &self,
        org_id: &str,
        user_id: &str,
        query: &str,
        page: Page,
    ) -> StoreResult<Vec<ApiKey>>;
    async fn touch_api_key(&self, id: &str, now: UnixTime) -> StoreResult<()>;
    async fn revoke_api_key(&self, id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool>;

    /// A verification (with its mail) not tied to a new row, e.g. a password reset.
    async fn create_verification(
        &self,
        verification: &Verification,
        mail: &QueuedMail,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    async fn verification(&self, id: &str) -> StoreResult<Option<Verification>>;
    /// Counts one more try on an unconsumed verification and returns the new count (`None`
    /// if it does not exist or was consumed). Atomic, so parallel guesses are all counted.
    async fn count_verification_attempt(&self, id: &str) -> StoreResult<Option<u32>>;
    /// Marks the verification consumed — only if it was not — and applies `effect`, in one
    /// transaction. `false` (nothing changed) when it was already consumed. Erases any
    /// sealed token.
    async fn consume_verification(
        &self,
        id: &str,
        now: UnixTime,
        effect: &VerificationEffect,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// Marks every unconsumed verification of `user_id` for `purpose` consumed (a newer one
    /// replaces them, or the address they went to changed). Returns how many.
    async fn cancel_verifications(
        &self,
        user_id: &str,
        purpose: VerificationPurpose,
        now: UnixTime,
    ) -> StoreResult<u64>;
    async fn purge_verifications(&self, before: UnixTime) -> StoreResult<u64>;
    /// Deletes API keys revoked, expired or left pending before `before`.
    async fn purge_api_keys(&self, before: UnixTime) -> StoreResult<u64>;
    /// Deletes the records of mail delivered before `before` (unsent mail is never deleted).
    async fn purge_sent_mail(&self, before: UnixTime) -> StoreResult<u64>;

    async fn enqueue_mail(&self, mail: &QueuedMail) -> StoreResult<()>;
    /// Unsent mail whose next attempt is due, oldest first.
    async fn due_mail(&self, now: UnixTime, max: u32) -> StoreResult<Vec<QueuedMail>>;
    /// Marks it sent and erases its body.
    async fn mail_sent(&self, id: &str, now: UnixTime) -> StoreResult<()>;
    async fn mail_failed(&self, id: &str, attempts: u32, next_attempt_at: UnixTime, error: &str) -> StoreResult<()>;
    /// Unsent mail (what is still to be delivered).
    async fn pending_mail_count(&self) -> StoreResult<u64>;

    async fn signing_keys(&self) -> StoreResult<Vec<StoredSigningKey>>;
    /// Inserts keys; `Conflict` if one for the same algorithm and state (next/current) exists.
    async fn insert_signing_keys(&self, keys: &[StoredSigningKey], audit: &AuditEvent) -> StoreResult<()>;
    /// `Conflict` when another rotation got there first.
    async fn rotate_signing_key(&self, rotation: &KeyRotation, audit: &AuditEvent) -> StoreResult<()>;
    async fn delete_expired_signing_keys(&self, now: UnixTime) -> StoreResult<u64>;

    async fn ca_certificates(&self) -> StoreResult<Vec<CaCertificate>>;
    async fn insert_ca_certificates(&self, certs: &[CaCertificate], audit: &AuditEvent) -> StoreResult<()>;
    /// Inserts `certs` (each `active`) and marks every previously active CA certificate of the
    /// same kinds inactive, in one transaction: a rotation or an import. Inactive issuing CAs
    /// stay (their certificates remain valid and their CRLs are still signed).
    async fn activate_ca_certificates(&self, certs: &[CaCertificate], audit: &AuditEvent) -> StoreResult<()>;
    /// Makes the inactive issuing CA `id` the active one and the active one inactive, in one
    /// transaction (a staged successor's promotion). `Conflict` if `id` is not an inactive
    /// issuing CA any more (another node promoted it).
    async fn promote_issuing_ca(&self, id: &str, audit: &AuditEvent) -> StoreResult<()>;

    /// `Conflict` if the serial (or id) exists: serials are unique by constraint.
    async fn insert_certificate(&self, cert: &IssuedCertificate, audit: &AuditEvent) -> StoreResult<()>;
    async fn certificate(&self, org_id: &str, id: &str) -> StoreResult<Option<IssuedCertificate>>;
    /// Any organisation's certificate with this SHA-256 fingerprint (lowercase hex).
    async fn certificate_by_fingerprint(&self, fingerprint: &str) -> StoreResult<Option<IssuedCertificate>>;
    /// The organisation's certificates matching `filter`, newest first.
    async fn certificates(
        &self,
        org_id: &str,
        filter: &CertificateFilter,
        page: Page,
    ) -> StoreResult<Vec<IssuedCertificate>>;
    /// The application's signing certificates that are neither revoked nor expired at `now`.
    async fn active_signing_certificates(&self, app_id: &str, now: UnixTime) -> StoreResult<Vec<IssuedCertificate>>;
    /// Revokes it (expired ones too) and queues `mails`, in one transaction. `false` when it
    /// does not exist or was already revoked (nothing is written then).
    async fn revoke_certificate(
        &self,
        id: &str,
        reason: RevocationReason,
        at: UnixTime,
        mails: &[QueuedMail],
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// Every revoked certificate the issuing CA `issuer_id` signed, by serial.
    async fn revoked_certificates(&self, issuer_id: &str) -> StoreResult<Vec<RevokedEntry>>;
    /// Atomically takes the next CRL number of `issuer_id` (1, 2, 3, … across nodes).
    async fn next_crl_number(&self, issuer_id: &str) -> StoreResult<u64>;
    /// Keeps `crl` unless a CRL with a higher number is already stored.
    async fn save_crl(&self, crl: &StoredCrl) -> StoreResult<()>;
    async fn crls(&self) -> StoreResult<Vec<StoredCrl>>;
    /// `(issuer_id, number)` of every stored CRL, without the (possibly large) DER: enough for a
    /// node to see whether another one signed a newer CRL.
    async fn crl_numbers(&self) -> StoreResult<Vec<(String, u64)>>;
    /// Active certificates whose `not_after` is before `before` and that were not yet warned
    /// about, soonest first.
    async fn certificates_expiring(
        &self,
        now: UnixTime,
        before: UnixTime,
        max: u32,
    ) -> StoreResult<Vec<IssuedCertificate>>;
    /// Marks the certificate warned and queues `mails`, in one transaction.
    async fn mark_expiry_notified(&self, id: &str, now: UnixTime, mails: &[QueuedMail]) -> StoreResult<()>;

    /// Records a client assertion's `jti` until `expires_at`: `false` if it was seen before
    /// (a replay). Survives restarts and is shared by every node.
    async fn record_assertion_jti(&self, client_id: &str, jti: &str, expires_at: UnixTime) -> StoreResult<bool>;
    async fn purge_assertion_jtis(&self, now: UnixTime) -> StoreResult<u64>;

    /// Idempotent: revoking a revoked token changes nothing.
    async fn revoke_token(&self, revoked: &RevokedToken, audit: &AuditEvent) -> StoreResult<()>;
    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool>;
    async fn purge_expired_revocations(&self, now: UnixTime) -> StoreResult<u64>;

    async fn append_audit(&self, event: &AuditEvent) -> StoreResult<()>;
    /// Newest first.
    async fn audit_events(&self, org_id: Option<&str>, page: Page) -> StoreResult<Vec<AuditEvent>>;
    /// An organisation's events matching every given criterion, newest first.
    async fn search_audit_events(&self, org_id: &str, filter: &AuditFilter, page: Page)
    -> StoreResult<Vec<AuditEvent>>;

    // ---- gateway control plane ---------------------------------------------------------

    /// The position (`seq`) of the newest audit row; 0 when the log is empty.
    async fn latest_audit_seq(&self) -> StoreResult<i64>;
    /// The audit rows after position `after`, in position order, at most `max` of them; plus
    /// the rows at those positions listed in `also` that are at or before `after` (positions
    /// the caller saw skipped, whose transactions may commit late), whatever `max`. Ordered
    /// by position, each row once.
    async fn audit_marks(&self, after: i64, also: &[i64], max: u32) -> StoreResult<Vec<AuditMark>>;
    /// Revoked access tokens with `revoked_at` at or after `since` whose `expires_at` is at or
    /// after `unexpired_at`, ordered by `revoked_at` then `jti`, at most `max`.
    async fn revoked_tokens_since(
        &self,
        since: UnixTime,
        unexpired_at: UnixTime,
        max: u32,
    ) -> StoreResult<Vec<RevokedToken>>;
    /// Every organisation's role → permission grants, sorted (organisation slug, role,
    /// permission).
    async fn all_role_grants(&self) -> StoreResult<Vec<OrgRoleGrant>>;

    // ---- OpenID Connect ----------------------------------------------------------------

    /// Sets whether people may sign themselves up; `false` if there is no such organisation.
    async fn set_organisation_self_registration(
        &self,
        org_id: &str,
        enabled: bool,
        now: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;

    /// Creates a user (no password yet), its primary address row, the invitation verification
    /// and the mail carrying the link, in one transaction. `Conflict` if the organisation
    /// already has the address.
    async fn create_invited_user(
        &self,
        user: &User,
        email: &UserEmail,
        verification: &Verification,
        mail: &QueuedMail,
        audit: &AuditEvent,
    ) -> StoreResult<()>;

    async fn insert_authorization_code(&self, code: &AuthorizationCode, audit: &AuditEvent) -> StoreResult<()>;
    async fn authorization_code(&self, code_hash: &SecretHash) -> StoreResult<Option<AuthorizationCode>>;
    /// Marks the code consumed — only if it was not — records what was issued, inserts the
    /// first refresh token if any, and records that the code's session signed in to its
    /// client; one transaction. `false` (nothing written) when it was already consumed or its
    /// SSO session was revoked (a sign-out racing the redemption).
    async fn redeem_authorization_code(
        &self,
        code_hash: &SecretHash,
        now: UnixTime,
        issue: &CodeIssue,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// A gateway redeeming a code for a browser session: marks the code consumed — only if it
    /// was not — with the session's id, inserts `session` (active, its `parent_id` the code's
    /// SSO session) and records that the SSO session signed in to the code's client; one
    /// transaction. `false` (nothing written) as for [`Self::redeem_authorization_code`].
    async fn redeem_code_for_session(
        &self,
        code_hash: &SecretHash,
        now: UnixTime,
        session: &Session,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// A replayed code: puts the access token its redemption issued on the revocation list,
    /// revokes its refresh-token family and the browser session it was redeemed for; one
    /// transaction. Returns whether anything was revoked (nothing when it was never redeemed
    /// or already revoked).
    async fn revoke_code_grant(&self, code_hash: &SecretHash, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool>;

    async fn refresh_token_by_hash(&self, token_hash: &SecretHash) -> StoreResult<Option<RefreshToken>>;
    /// Marks `old_id` used — only if it is unused and not revoked — and inserts `new`; one
    /// transaction. `false` (nothing written) when it was used or revoked already, or when
    /// `new`'s SSO session was revoked.
    async fn rotate_refresh_token(
        &self,
        old_id: &str,
        now: UnixTime,
        new: &RefreshToken,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// Revokes every unrevoked token of the family; returns how many.
    async fn revoke_refresh_family(&self, family_id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<u64>;

    /// Ends an SSO session: revokes the session and every refresh token issued in it, and
    /// queues the back-channel logout deliveries; one transaction. `false` when the session
    /// was neither active nor pending (then nothing is written).
    async fn end_sso_session(
        &self,
        session_id: &str,
        now: UnixTime,
        deliveries: &[LogoutDelivery],
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// The client ids the session signed in to (codes redeemed in it), oldest first.
    async fn session_clients(&self, session_id: &str) -> StoreResult<Vec<String>>;

    async fn consent(&self, user_id: &str, client_id: &str) -> StoreResult<Option<Consent>>;
    /// Inserts or replaces the user's consent to the client.
    async fn save_consent(&self, consent: &Consent, audit: &AuditEvent) -> StoreResult<()>;
    /// Newest first.
    async fn user_consents(&self, user_id: &str) -> StoreResult<Vec<Consent>>;
    /// Forgets the consent and revokes the refresh tokens the user holds for that client.
    async fn revoke_consent(
        &self,
        user_id: &str,
        client_id: &str,
        now: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;

    /// Deliveries not yet delivered nor given up whose `next_attempt_at` has come, oldest first.
    async fn due_logout_deliveries(&self, now: UnixTime, max: u32) -> StoreResult<Vec<LogoutDelivery>>;
    /// Marks it delivered and erases the logout token (it is not needed any more).
    async fn logout_delivered(&self, id: &str, now: UnixTime) -> StoreResult<()>;
    /// Counts a failed attempt; `next_attempt_at` `None` gives up (sets `failed_at`).
    async fn logout_delivery_failed(
        &self,
        id: &str,
        attempts: u32,
        next_attempt_at: Option<UnixTime>,
        now: UnixTime,
    ) -> StoreResult<()>;

    async fn user_totp(&self, user_id: &str) -> StoreResult<Option<UserTotp>>;
    /// Inserts the user's TOTP enrolment, or replaces it while it is unconfirmed. `Conflict`
    /// (nothing written) when a confirmed one exists: only `delete_user_totp` removes it.
    async fn save_user_totp(&self, totp: &UserTotp, audit: &AuditEvent) -> StoreResult<()>;
    /// Accepts time step `step` once: sets `last_step` (and `confirmed_at` when `confirm`)
    /// only if no step ≥ `step` was accepted before. `false` (nothing written) otherwise.
    async fn use_totp_step(
        &self,
        user_id: &str,
        step: i64,
        confirm: bool,
        now: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<bool>;
    /// Removes the user's second factor (an admin reset); `false` if there was none.
    async fn delete_user_totp(&self, user_id: &str, audit: &AuditEvent) -> StoreResult<bool>;

    /// Deletes codes expired before `before`, refresh tokens expired before `before`, and
    /// logout deliveries delivered or given up before `before`. Returns how many rows.
    async fn purge_oidc(&self, before: UnixTime) -> StoreResult<u64>;

    // ---- the portal -------------------------------------------------------------------------

    /// The dashboard's counts for one organisation: its applications and users; its active
    /// certificates (not revoked, `not_after > now`) with `not_after < expiring_before`; and
    /// its audit events with outcome `failure` and action `session.login` or `session.verify`
    /// at or after `failures_since`.
    async fn organisation_counts(
        &self,
        org_id: &str,
        now: UnixTime,
        expiring_before: UnixTime,
        failures_since: UnixTime,
    ) -> StoreResult<OrganisationCounts>;

    // ---- audit chain, backup and restore -----------------------------------------------------

    /// Hands the store the key that chains every audit row it writes from now on (see
    /// [`crate::audit_chain`]), and seals a chain head that no start has sealed yet. Audited
    /// writes fail until this has been called.
    async fn start_audit_chain(&self, key: AuditChainKey) -> StoreResult<()>;
    /// Reads the chain head, then every audit row in `seq` order, from one consistent snapshot
    /// (read-only; streamed, not loaded whole), until the visitor breaks.
    async fn scan_audit_chain(&self, visitor: &mut (dyn AuditChainVisitor + Send)) -> StoreResult<()>;
    /// Writes every table (sealed keys stay sealed, secrets stay hashed) from one consistent
    /// snapshot to `out` in the portable backup format; safe while servers are running.
    async fn backup(&self, out: &mut (dyn std::io::Write + Send)) -> StoreResult<BackupSummary>;
    /// Loads a backup in one transaction: all of it or nothing. Refuses (`Conflict`) a database
    /// that holds data unless `replace`, which deletes everything first.
    async fn restore(&self, input: &mut (dyn std::io::BufRead + Send), replace: bool) -> StoreResult<BackupSummary>;

    // ---- several nodes on one database ----------------------------------------------------------

    /// Counts one event for each of `keys` in its fixed window, shared by every node: a key's
    /// window opens at its first event and lasts `window_secs`; an event after it ended opens a
    /// new one. Returns each key's count in its window and when the window ends, in `keys`
    /// order. Atomic per key, so events counted at once on several nodes all count.
    async fn count_attempts(
        &self,
        keys: &[String],
        window_secs: i64,
        now: UnixTime,
    ) -> StoreResult<Vec<(u32, UnixTime)>>;
    /// A key's count and window end, if its window has not ended at `now`.
    async fn attempt_count(&self, key: &str, now: UnixTime) -> StoreResult<Option<(u32, UnixTime)>>;
    /// Takes back one counted event of a live window (an attempt that turned out right).
    async fn forgive_attempt(&self, key: &str, now: UnixTime) -> StoreResult<()>;
    /// Deletes counters whose window ended before `now`.
    async fn purge_attempt_counters(&self, now: UnixTime) -> StoreResult<u64>;

    /// Takes or renews the lease `name` for `holder` until `now + ttl_secs`: `true` if `holder`
    /// has it now (it was free, expired, or already `holder`'s). One holder at a time across
    /// every node sharing the database.
    async fn take_lease(&self, name: &str, holder: &str, now: UnixTime, ttl_secs: i64) -> StoreResult<bool>;
    /// Gives the lease up if `holder` has it (a clean shutdown), so another node need not wait.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()>;

    /// A signal that wakes (`notify_one`) whenever a transaction on any node committed audit
    /// events — PostgreSQL `LISTEN/NOTIFY`; `None` where the backend has no such signal (one
    /// SQLite node). It may miss a notification (a lost connection): readers also poll.
    async fn change_signal(&self) -> StoreResult<Option<std::sync::Arc<tokio::sync::Notify>>>;
}

/// What a backup holds (or a restore loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The latest migration applied to the database the backup was taken from.
    pub schema_version: i64,
    /// Every table and its row count, in restore order.
    pub tables: Vec<(String, u64)>,
}
