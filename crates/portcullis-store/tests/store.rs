//! The `Store` contract, run unchanged against both adapters.
//!
//! Every case is one `async fn(Arc<dyn Store>)`; `contract_tests!` turns each into two
//! `#[tokio::test]`s, `sqlite::<case>` (a fresh file in a temp dir) and `postgres::<case>` (a
//! fresh database on the server named by `PORTCULLIS_TEST_PG_URL`, dropped afterwards even
//! when the case fails). The PostgreSQL tests never skip: an unreachable server is a failure.
//! `upgrade::*` run a case the same way on a database first left at schema v2 with rows in it.

// clippy.toml's *-in-tests allowances cover #[test] fns only, not this file's helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis_core::StoreError;
use portcullis_core::clock::UnixTime;
use portcullis_core::crypto::secrets::SecretHash;
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::ids::{ClientId, Email, PermissionName, RoleName, ScopeName, Slug, new_id};
use portcullis_core::model::*;
use portcullis_core::store::{KeyRotation, Store, StoreResult};
use portcullis_store::{PgStore, SqliteStore};
use serde_json::json;
use sqlx::sqlite::SqliteConnection;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// The fixed "now" of every case: nothing here reads the wall clock.
const NOW: UnixTime = 1_700_000_000;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

// ------------------------------------------------------------------------------- harness --

macro_rules! contract_tests {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run_sqlite(super::$case).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run_pg(super::$case).await;
                }
            )+
        }
    };
}

contract_tests!(
    ping_and_settings,
    organisations_round_trip_order_and_audit,
    failed_create_leaves_no_half_written_state,
    every_mutation_rolls_back_with_its_audit_row,
    services_and_role_grants,
    applications_round_trip_and_optimistic_update,
    users_are_scoped_to_their_organisation,
    signing_key_states_and_rotation,
    concurrent_rotations_one_wins_the_rest_conflict,
    concurrent_application_updates_one_wins,
    ca_certificates_and_revoked_tokens,
    audit_log_is_newest_first_filtered_and_paged,
    audit_search_matches_every_criterion,
    login_failures_count_atomically_and_lock_once,
    cancelled_verifications_are_consumed_for_one_user_and_purpose,
    users_update_optimistically_and_can_end_sessions,
    user_search_escapes_wildcards_and_email_lookup_spans_organisations,
    delete_user_removes_everything_tied_to_the_user,
    user_emails_add_verify_make_primary_and_remove,
    sessions_create_activate_rotate_and_revoke,
    verifications_count_attempts_and_are_consumed_once,
    verification_effects,
    api_keys_list_lookup_and_revoke,
    mail_queue_due_failed_sent_and_counted,
    purges_remove_only_ended_rows,
    auth_api_mutations_roll_back_with_their_audit_row,
    organisation_domains_are_replaced_and_audited,
    certificates_insert_lookup_and_conflicts,
    concurrent_certificate_inserts_fail_only_their_own,
    certificate_filters_status_and_paging,
    certificate_revocation_happens_once_with_its_mail,
    crl_numbers_increase_and_the_highest_crl_is_kept,
    activating_ca_certificates_replaces_only_the_same_kind,
    expiring_certificates_are_warned_about_once,
    assertion_jtis_are_accepted_once_per_client,
    users_with_role_match_whole_roles_of_enabled_users,
    role_holders_and_searches_page_and_match_whole_roles,
    organisation_self_registration_is_switched_and_audited,
    invited_users_get_an_address_a_link_and_then_a_password,
    authorization_codes_are_redeemed_once_with_what_they_issued,
    concurrent_code_redemptions_one_wins,
    codes_are_redeemed_once_for_a_gateway_browser_session,
    replayed_codes_revoke_their_access_token_and_family,
    refresh_tokens_rotate_once_and_families_are_revoked_together,
    concurrent_refresh_rotations_one_wins,
    ending_an_sso_session_revokes_its_tokens_and_queues_logouts,
    logout_deliveries_are_due_retried_delivered_and_given_up,
    consents_are_saved_replaced_listed_and_revoked,
    deleting_an_application_removes_its_grants,
    totp_steps_are_accepted_once_and_in_order,
    concurrent_totp_uses_of_one_step_one_wins,
    oidc_mutations_roll_back_with_their_audit_row,
    purge_oidc_removes_only_what_is_due,
    audit_marks_follow_positions_and_fetch_skipped_ones,
    revoked_tokens_since_filter_by_revocation_and_expiry,
    all_role_grants_span_organisations,
    organisation_counts_count_only_what_the_dashboard_shows,
    audit_chain_verifies_after_many_mixed_writes,
    audit_rows_refuse_update_and_delete,
    audit_chain_names_the_tampered_row,
    concurrent_appends_from_several_nodes_form_one_chain,
    backup_and_restore_round_trip_on_both_backends,
    backups_cover_every_table,
    shared_attempt_counters_count_atomically_per_window,
    leases_have_one_holder_until_they_run_out,
    staged_issuing_cas_are_promoted_once,
);

/// The audit chain and backup/restore cases.
mod audit_backup;
use audit_backup::*;

/// PostgreSQL's `LISTEN/NOTIFY` change signal; one SQLite file has none.
mod change_signal {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_committed_changes_wake_listeners() {
        super::run_pg(super::committed_changes_wake_listeners).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_has_no_change_signal() {
        super::run_sqlite(|s| async move { assert!(s.change_signal().await.unwrap().is_none()) }).await;
    }
}

/// Databases left at schema v2 with rows in it, then opened (and so migrated) by the store.
mod upgrade {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_v2_rows_survive_the_pki_migration() {
        super::run_sqlite_from(
            super::v2_rows_survive_the_pki_migration,
            Some(super::schema_v2_with_rows(&super::V2_SQLITE)),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_v2_rows_survive_the_pki_migration() {
        super::run_pg_from(super::v2_rows_survive_the_pki_migration, Some(super::schema_v2_with_rows(&super::V2_PG)))
            .await;
    }
}

/// Where the case's database is, for the few checks the `Store` trait cannot make (see
/// [`raw_mail`]).
#[derive(Debug, Clone)]
enum RawDb {
    Sqlite(PathBuf),
    Pg(String),
}

tokio::task_local! {
    static RAW_DB: RawDb;
}

/// Runs `case` on its own task so that a failing assertion comes back here as a `JoinError`:
/// the caller can clean up and then resume the panic.
async fn run_case<F, Fut>(case: F, store: Arc<dyn Store>, raw: RawDb) -> Result<(), tokio::task::JoinError>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(RAW_DB.scope(raw, case(store))).await
}

fn resume(outcome: Result<(), tokio::task::JoinError>) {
    match outcome {
        Ok(()) => {}
        // The panic hook already printed the message inside the task.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("contract case did not finish: {e}"),
    }
}

async fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_sqlite_from(case, None).await;
}

/// [`run_sqlite`] on a database file that `before` (SQL) prepared, e.g. an older schema.
async fn run_sqlite_from<F, Fut>(case: F, before: Option<String>)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("create temp dir");
    let path = dir.path().join("p.db");
    if let Some(sql) = before {
        let mut c = SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display())).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut c).await.expect("prepare the SQLite database");
        c.close().await.unwrap();
    }
    let store = SqliteStore::open(&path, NOW).await.expect("open SQLite store");
    store.start_audit_chain(chain_key()).await.expect("start the audit chain");
    let outcome = run_case(case, Arc::new(store.clone()), RawDb::Sqlite(path)).await;
    store.close().await;
    drop(dir);
    resume(outcome);
}

fn pg_admin_url() -> String {
    std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// `url` with its database replaced by `db` (query parameters such as `sslmode` kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn pg_admin_connection(url: &str) -> PgConnection {
    let hint = format!(
        "the store contract tests need a reachable PostgreSQL server and never skip: set \
         PORTCULLIS_TEST_PG_URL to an admin URL allowed to CREATE/DROP DATABASE (default {DEFAULT_PG_URL}), \
         or run scripts/test.sh, which starts a throwaway server"
    );
    match tokio::time::timeout(Duration::from_secs(20), PgConnection::connect(url)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("cannot connect to PostgreSQL at {}: {e}\n{hint}", redact(url)),
        Err(_) => panic!("timed out connecting to PostgreSQL at {}\n{hint}", redact(url)),
    }
}

/// Creates `portcullis_test_<uuid>`, runs `case` on a `PgStore` connected to it, closes the
/// store and drops the database whatever the case did, then reports the case's outcome.
async fn run_pg<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_pg_from(case, None).await;
}

/// [`run_pg`] on a database that `before` (SQL) prepared, e.g. an older schema.
async fn run_pg_from<F, Fut>(case: F, before: Option<String>)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url = pg_admin_url();
    let db = format!("portcullis_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = pg_admin_connection(&admin_url).await;
    if let Err(e) = admin.execute(AssertSqlSafe(format!("CREATE DATABASE \"{db}\""))).await {
        panic!(
            "CREATE DATABASE {db} on {} failed: {e}\nset PORTCULLIS_TEST_PG_URL to a role allowed to create databases",
            redact(&admin_url)
        );
    }

    let outcome: Result<Result<(), tokio::task::JoinError>, StoreError> = async {
        let url = with_database(&admin_url, &db);
        if let Some(sql) = before {
            let prepare = async {
                let mut c = PgConnection::connect(&url).await?;
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut c).await?;
                c.close().await
            };
            prepare.await.map_err(|e| StoreError::Internal(format!("preparing the database: {e}")))?;
        }
        let store = PgStore::connect(&url, NOW).await?;
        store.start_audit_chain(chain_key()).await?;
        let outcome = run_case(case, Arc::new(store.clone()), RawDb::Pg(url)).await;
        store.close().await;
        Ok(outcome)
    }
    .await;

    let dropped = admin.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))).await;
    let _ = admin.close().await;

    match outcome {
        Err(e) => panic!("PgStore::connect to database {db} failed: {e}"),
        Ok(case_outcome) => {
            if let Err(e) = &dropped {
                eprintln!("could not drop test database {db}: {e}");
            }
            resume(case_outcome);
            if let Err(e) = dropped {
                panic!("the case passed but DROP DATABASE {db} failed: {e}");
            }
        }
    }
}

// ------------------------------------------------------------------------------- helpers --

/// The audit chain key of every case (a master key would derive it).
fn chain_key() -> portcullis_core::audit_chain::AuditChainKey {
    portcullis_core::audit_chain::AuditChainKey::new(&[5u8; 32])
}

fn slug(s: &str) -> Slug {
    Slug::parse(s).unwrap()
}
fn role(s: &str) -> RoleName {
    RoleName::parse(s).unwrap()
}
fn perm(s: &str) -> PermissionName {
    PermissionName::parse(s).unwrap()
}
fn scope(s: &str) -> ScopeName {
    ScopeName::parse(s).unwrap()
}
fn grant(r: &str, p: &str) -> RoleGrant {
    RoleGrant { role: role(r), permission: perm(p) }
}
fn page(limit: u32, offset: u64) -> Page {
    Page { limit, offset }
}
fn all() -> Page {
    page(Page::MAX_LIMIT, 0)
}

/// 32 bytes covering 0x00 and 0xff, distinct per seed: a binary-safety probe.
fn hash(seed: u8) -> SecretHash {
    let mut b = [0u8; 32];
    for (i, x) in (0u8..).zip(b.iter_mut()) {
        *x = i.wrapping_mul(37) ^ seed;
    }
    b[0] = 0x00;
    b[31] = 0xff;
    SecretHash(b)
}

fn is_conflict<T>(r: &StoreResult<T>) -> bool {
    matches!(r, Err(StoreError::Conflict(_)))
}

#[track_caller]
fn assert_conflict<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) {
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{what}: expected StoreError::Conflict, got {r:?}");
}

fn audit(org_id: Option<&str>, action: &str) -> AuditEvent {
    AuditEvent {
        id: new_id(),
        at: NOW,
        org_id: org_id.map(str::to_owned),
        actor: "system".into(),
        action: action.into(),
        target: format!("target of {action}"),
        outcome: "success".into(),
        ip: Some("2001:db8::1".into()),
        details: json!({ "action": action, "nested": { "n": 1, "list": [true, null, "é \"quoted\""] } }),
    }
}

fn organisation(s: &str) -> Organisation {
    Organisation {
        id: new_id(),
        slug: slug(s),
        name: format!("{s} Ltd — «ünïcode»"),
        allowed_domains: vec![format!("{s}.example"), "api.example.org".into()],
        self_registration: false,
        created_at: NOW,
        updated_at: NOW + 1,
    }
}

async fn seed_org(s: &dyn Store, slug: &str) -> Organisation {
    let org = organisation(slug);
    s.create_organisation(&org, &audit(Some(&org.id), "organisation.create")).await.unwrap();
    org
}

fn service(org_id: &str, s: &str, audience: &str) -> Service {
    Service {
        id: new_id(),
        org_id: org_id.to_owned(),
        slug: slug(s),
        name: format!("The {s} service"),
        audience: audience.to_owned(),
        scopes: vec![scope(&format!("{s}/read")), scope(&format!("{s}/write")), scope("openid")],
        roles: vec![role(&format!("{s}:admin")), role(&format!("{s}:viewer"))],
        permissions: vec![perm(&format!("{s}.invoice.read")), perm(&format!("{s}.invoice.write"))],
        created_at: NOW,
        updated_at: NOW + 2,
    }
}

fn full_app(org: &Organisation, app: &str) -> Application {
    let app_slug = slug(app);
    Application {
        id: new_id(),
        org_id: org.id.clone(),
        client_id: ClientId::new(&org.slug, &app_slug),
        slug: app_slug,
        name: format!("{app} app"),
        grant_types: vec![GrantType::RefreshToken, GrantType::ClientCredentials, GrantType::AuthorizationCode],
        scopes: vec![scope("payments/read"), scope("openid")],
        roles: vec![role("payments:admin")],
        auth_method: AuthMethod::ClientSecretBasic,
        redirect_uris: vec!["https://app.example/cb?x=\"q\"&y=1".into(), "http://127.0.0.1:8080/cb".into()],
        jwks_uri: Some(format!("https://{app}.example/.well-known/jwks.json?v=\"1\"")),
        access_token_lifetime: 900,
        signing_alg: Algorithm::PS256,
        id_token_signing_alg: Algorithm::ES256,
        first_party: true,
        post_logout_redirect_uris: vec![
            format!("https://{app}.example/bye?x=\"q\"&y=1"),
            "http://127.0.0.1:8080/".into(),
        ],
        backchannel_logout_uri: Some(format!("https://{app}.example/backchannel?v=\"1\"")),
        always_issue_refresh_token: true,
        enabled: true,
        secret_hash: Some(hash(1)),
        previous_secret_hash: Some(hash(2)),
        previous_secret_expires_at: Some(NOW + 3600),
        created_at: NOW,
        updated_at: NOW + 5,
    }
}

fn minimal_app(org: &Organisation, app: &str) -> Application {
    Application {
        grant_types: vec![GrantType::ClientCredentials],
        scopes: vec![],
        roles: vec![],
        auth_method: AuthMethod::PrivateKeyJwt,
        redirect_uris: vec![],
        jwks_uri: None,
        access_token_lifetime: 60,
        signing_alg: Algorithm::EdDSA,
        id_token_signing_alg: Algorithm::RS256,
        first_party: false,
        post_logout_redirect_uris: vec![],
        backchannel_logout_uri: None,
        always_issue_refresh_token: false,
        enabled: false,
        secret_hash: None,
        previous_secret_hash: None,
        previous_secret_expires_at: None,
        ..full_app(org, app)
    }
}

fn user(org_id: &str, email: &str) -> User {
    User {
        id: new_id(),
        org_id: org_id.to_owned(),
        email: Email::parse(email).unwrap(),
        name: Some(format!("Name of {email}")),
        password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into()),
        roles: vec![role("payments:admin"), role("billing:viewer")],
        enabled: true,
        failed_logins: 0,
        locked_until: None,
        created_at: NOW,
        updated_at: NOW + 3,
    }
}

fn key(kid: &str, alg: Algorithm, state: KeyState, created_at: UnixTime) -> StoredSigningKey {
    StoredSigningKey {
        kid: kid.to_owned(),
        alg,
        state,
        sealed_private_key: [&[0u8, 1, 2, 0xfe, 0xff][..], kid.as_bytes()].concat(),
        created_at,
        activated_at: (state == KeyState::Current).then_some(created_at),
        expires_at: None,
    }
}

fn by_kid(keys: &[StoredSigningKey], kid: &str) -> StoredSigningKey {
    keys.iter().find(|k| k.kid == kid).unwrap_or_else(|| panic!("key {kid} missing from {keys:?}")).clone()
}

fn slugs(orgs: &[Organisation]) -> Vec<&str> {
    orgs.iter().map(|o| o.slug.as_str()).collect()
}

// --------------------------------------------------------------------------------- cases --

async fn ping_and_settings(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
    assert_eq!(s.setting("missing").await.unwrap(), None);

    assert!(s.insert_setting("issuer", "https://auth.example").await.unwrap(), "first insert inserts");
    assert!(
        !s.insert_setting("issuer", "https://evil.example").await.unwrap(),
        "second insert reports it did not insert"
    );
    assert_eq!(s.setting("issuer").await.unwrap().as_deref(), Some("https://auth.example"), "value unchanged");

    assert!(s.insert_setting("other", "").await.unwrap(), "keys are independent; empty values are values");
    assert_eq!(s.setting("other").await.unwrap().as_deref(), Some(""));
    assert_eq!(s.setting("issuer").await.unwrap().as_deref(), Some("https://auth.example"));
    assert_eq!(s.setting("Issuer").await.unwrap(), None, "keys are case-sensitive");
}

async fn organisations_round_trip_order_and_audit(s: Arc<dyn Store>) {
    // Inserted out of order; "a-c" sorts before "ab" only in byte order ('-' < 'b'), which is
    // SQLite's order; a PostgreSQL database with a linguistic collation would disagree.
    let mut created = Vec::new();
    for slug in ["charlie", "ab", "delta", "a-c", "bravo"] {
        let org = organisation(slug);
        let ev = audit(Some(&org.id), "organisation.create");
        s.create_organisation(&org, &ev).await.unwrap();
        created.push((org, ev));
    }
    for (org, ev) in &created {
        assert_eq!(s.organisation(org.slug.as_str()).await.unwrap().as_ref(), Some(org), "read back by slug");
        assert_eq!(s.organisation_by_id(&org.id).await.unwrap().as_ref(), Some(org), "read back by id");
        assert_eq!(
            s.audit_events(Some(&org.id), all()).await.unwrap(),
            vec![ev.clone()],
            "the create's audit event is recorded with it"
        );
    }
    assert_eq!(s.organisation("zulu").await.unwrap(), None);
    assert_eq!(s.organisation_by_id(&new_id()).await.unwrap(), None);
    let (first, _) = &created[0];
    assert_eq!(s.organisation(&first.id).await.unwrap(), None, "an id is not a slug");

    // Duplicate slug, fresh id.
    let dup = Organisation { id: new_id(), name: "impostor".into(), ..first.clone() };
    let dup_ev = audit(Some(&dup.id), "organisation.create");
    assert_conflict(s.create_organisation(&dup, &dup_ev).await, "duplicate slug");
    assert_eq!(s.organisation("charlie").await.unwrap().as_ref(), Some(first), "original untouched");
    assert_eq!(s.organisation_by_id(&dup.id).await.unwrap(), None);
    assert!(s.audit_events(Some(&dup.id), all()).await.unwrap().is_empty(), "failed create left no audit row");

    // Ordered by slug, paged.
    let expected = ["a-c", "ab", "bravo", "charlie", "delta"];
    assert_eq!(
        slugs(&s.organisations(all()).await.unwrap()),
        expected,
        "byte order of slugs (is the PostgreSQL collation C?)"
    );
    assert_eq!(slugs(&s.organisations(page(2, 0)).await.unwrap()), ["a-c", "ab"]);
    assert_eq!(slugs(&s.organisations(page(2, 1)).await.unwrap()), ["ab", "bravo"]);
    assert_eq!(slugs(&s.organisations(page(2, 4)).await.unwrap()), ["delta"]);
    assert!(s.organisations(page(2, 5)).await.unwrap().is_empty());
    assert_eq!(slugs(&s.organisations(page(1, 3)).await.unwrap()), ["charlie"]);
    let full = s.organisations(all()).await.unwrap();
    let (charlie, _) = &created[0];
    assert_eq!(full.iter().find(|o| o.id == charlie.id), Some(charlie), "listing returns whole records");
}

async fn failed_create_leaves_no_half_written_state(s: Arc<dyn Store>) {
    let acme = organisation("acme");
    let first = audit(Some(&acme.id), "organisation.create");
    s.create_organisation(&acme, &first).await.unwrap();

    // audit_events.id is UNIQUE: the organisation insert succeeds inside the transaction, the
    // audit insert fails, and the whole create must roll back.
    let globex = organisation("globex");
    let reused = AuditEvent { org_id: Some(globex.id.clone()), action: "organisation.create".into(), ..first.clone() };
    let r = s.create_organisation(&globex, &reused).await;
    assert_conflict(r, "audit id reused");
    assert_eq!(s.organisation("globex").await.unwrap(), None, "no organisation without its audit row");
    assert_eq!(s.organisation_by_id(&globex.id).await.unwrap(), None);
    assert_eq!(slugs(&s.organisations(all()).await.unwrap()), ["acme"]);
    assert_eq!(s.audit_events(None, all()).await.unwrap(), vec![first.clone()], "audit log unchanged");

    // The slug is still free: a correct retry succeeds.
    s.create_organisation(&globex, &audit(Some(&globex.id), "organisation.create")).await.unwrap();
    assert_eq!(s.organisation("globex").await.unwrap(), Some(globex));
}

/// Every mutating method writes its change and its audit row in one transaction: when the
/// audit insert fails (reused id), nothing of the change may remain.
async fn every_mutation_rolls_back_with_its_audit_row(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let used = audit(Some(&acme.id), "used");
    s.append_audit(&used).await.unwrap();
    let reuse = |action: &str| AuditEvent { action: action.into(), ..used.clone() };
    let audit_before = s.audit_events(None, all()).await.unwrap();

    // create_service with grants
    let pay = service(&acme.id, "payments", "https://payments.example");
    let pay_grants = vec![grant("payments:admin", "payments.invoice.read")];
    assert_conflict(s.create_service(&pay, &pay_grants, &reuse("service.create")).await, "create_service");
    assert_eq!(s.service(&acme.id, "payments").await.unwrap(), None);
    assert_eq!(s.service_by_audience("https://payments.example").await.unwrap(), None);
    assert!(s.role_grants(&acme.id).await.unwrap().is_empty(), "no grants left behind");
    s.create_service(&pay, &pay_grants, &audit(Some(&acme.id), "service.create")).await.unwrap();

    // set_role_permissions: its DELETE must be undone too
    let r = s
        .set_role_permissions(&acme.id, &role("payments:admin"), &[perm("payments.invoice.write")], &reuse("role.set"))
        .await;
    assert_conflict(r, "set_role_permissions");
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), pay_grants);

    // delete_service
    assert_conflict(s.delete_service(&acme.id, "payments", &reuse("service.delete")).await, "delete_service");
    assert_eq!(s.service(&acme.id, "payments").await.unwrap(), Some(pay.clone()));
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), pay_grants);

    // create_application
    let app = full_app(&acme, "billing");
    assert_conflict(s.create_application(&app, &reuse("application.create")).await, "create_application");
    assert_eq!(s.application(app.client_id.as_str()).await.unwrap(), None);
    s.create_application(&app, &audit(Some(&acme.id), "application.create")).await.unwrap();

    // update_application
    let changed = Application { name: "changed".into(), updated_at: app.updated_at + 1, ..app.clone() };
    assert_conflict(
        s.update_application(&changed, app.updated_at, &reuse("application.update")).await,
        "update_application",
    );
    assert_eq!(s.application(app.client_id.as_str()).await.unwrap(), Some(app.clone()));

    // delete_application
    assert_conflict(
        s.delete_application(app.client_id.as_str(), &reuse("application.delete")).await,
        "delete_application",
    );
    assert_eq!(s.application(app.client_id.as_str()).await.unwrap(), Some(app.clone()));

    // create_user
    let ann = user(&acme.id, "ann@example.com");
    assert_conflict(s.create_user(&ann, &reuse("user.create")).await, "create_user");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap(), None);
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap(), None);
    assert!(s.user_emails(&ann.id).await.unwrap().is_empty(), "no primary address row left behind");

    // insert_signing_keys
    let cur = key("k-cur", Algorithm::ES256, KeyState::Current, NOW - 10);
    let next = key("k-next", Algorithm::ES256, KeyState::Next, NOW - 5);
    assert_conflict(
        s.insert_signing_keys(&[cur.clone(), next.clone()], &reuse("keys.insert")).await,
        "insert_signing_keys",
    );
    assert!(s.signing_keys().await.unwrap().is_empty());
    s.insert_signing_keys(&[cur.clone(), next.clone()], &audit(None, "keys.insert")).await.unwrap();

    // rotate_signing_key
    let rotation = KeyRotation {
        alg: Algorithm::ES256,
        current_kid: cur.kid.clone(),
        next_kid: next.kid.clone(),
        retired_until: NOW + 3600,
        new_next: key("k-new", Algorithm::ES256, KeyState::Next, NOW),
        now: NOW,
    };
    assert_conflict(s.rotate_signing_key(&rotation, &reuse("keys.rotate")).await, "rotate_signing_key");
    assert_eq!(s.signing_keys().await.unwrap(), vec![cur.clone(), next.clone()], "rotation fully undone");

    // insert_ca_certificates
    let ca = ca_cert("ca-root", CaKind::Root, NOW);
    assert_conflict(
        s.insert_ca_certificates(std::slice::from_ref(&ca), &reuse("ca.insert")).await,
        "insert_ca_certificates",
    );
    assert!(s.ca_certificates().await.unwrap().is_empty());

    // revoke_token
    let t =
        RevokedToken { jti: "jti-1".into(), client_id: "acme$billing".into(), expires_at: NOW + 60, revoked_at: NOW };
    assert_conflict(s.revoke_token(&t, &reuse("token.revoke")).await, "revoke_token");
    assert!(!s.is_token_revoked("jti-1").await.unwrap());

    // append_audit itself
    assert_conflict(s.append_audit(&reuse("again")).await, "append_audit with a duplicate id");

    // The log holds the successful writes only; the reused event is unchanged.
    let log = s.audit_events(None, all()).await.unwrap();
    assert_eq!(log.iter().filter(|e| e.id == used.id).collect::<Vec<_>>(), vec![&used]);
    assert_eq!(log.len(), audit_before.len() + 3, "service, application and key creates only: {log:?}");
}

fn ca_cert(id: &str, kind: CaKind, created_at: UnixTime) -> CaCertificate {
    CaCertificate {
        id: id.to_owned(),
        kind,
        subject: format!("CN=Portcullis {id}, O=Acme"),
        certificate_pem: format!("-----BEGIN CERTIFICATE-----\nMIIB{id}\n-----END CERTIFICATE-----\n"),
        sealed_private_key: vec![0, 0xff, 0x10, 0x00, 0x7f],
        not_before: created_at - 60,
        not_after: created_at + 86_400 * 365,
        active: kind == CaKind::Issuing,
        created_at,
    }
}

async fn services_and_role_grants(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;

    let pay = service(&acme.id, "payments", "https://payments.example");
    let pay_grants = vec![
        grant("payments:viewer", "payments.invoice.read"),
        grant("payments:admin", "payments.invoice.write"),
        grant("payments:admin", "payments.invoice.read"),
    ];
    let pay_ev = audit(Some(&acme.id), "service.create");
    s.create_service(&pay, &pay_grants, &pay_ev).await.unwrap();
    let bill = service(&acme.id, "billing", "https://billing.example");
    s.create_service(
        &bill,
        &[grant("billing:admin", "billing.invoice.read")],
        &audit(Some(&acme.id), "service.create"),
    )
    .await
    .unwrap();
    // "pay" is a prefix of "payments": deleting it must not touch payments:* grants.
    // Its audience sorts last, so listing by audience instead of slug would show.
    let pay_short = service(&acme.id, "pay", "urn:pay");
    s.create_service(&pay_short, &[grant("pay:admin", "pay.thing.read")], &audit(Some(&acme.id), "service.create"))
        .await
        .unwrap();
    // Same slug in another organisation, with its own grants.
    let other_pay = service(&other.id, "payments", "https://payments.other.example");
    let other_grants = vec![grant("payments:admin", "payments.invoice.read")];
    s.create_service(&other_pay, &other_grants, &audit(Some(&other.id), "service.create")).await.unwrap();

    assert_eq!(
        s.service(&acme.id, "payments").await.unwrap().as_ref(),
        Some(&pay),
        "scopes/roles/permissions round-trip"
    );
    assert_eq!(
        s.service(&other.id, "payments").await.unwrap().as_ref(),
        Some(&other_pay),
        "services are per organisation"
    );
    assert_eq!(s.service(&other.id, "billing").await.unwrap(), None);
    assert_eq!(
        s.services(&acme.id).await.unwrap(),
        vec![bill.clone(), pay_short.clone(), pay.clone()],
        "ordered by slug"
    );
    assert_eq!(s.services(&other.id).await.unwrap(), vec![other_pay.clone()]);
    assert_eq!(s.service_by_audience("https://payments.example").await.unwrap().as_ref(), Some(&pay));
    assert_eq!(s.service_by_audience("https://payments.other.example").await.unwrap().as_ref(), Some(&other_pay));
    assert_eq!(s.service_by_audience("https://nobody.example").await.unwrap(), None);
    assert_eq!(
        s.audit_events(Some(&acme.id), page(1, 2)).await.unwrap(),
        vec![pay_ev],
        "audit row written with the service"
    );

    let mut acme_grants = pay_grants.clone();
    acme_grants.extend([grant("billing:admin", "billing.invoice.read"), grant("pay:admin", "pay.thing.read")]);
    acme_grants.sort();
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), acme_grants, "ordered by role, permission");
    assert_eq!(s.role_grants(&other.id).await.unwrap(), other_grants);

    // Duplicate audience (even in another organisation), then duplicate slug in the same one.
    let ledger = Service { audience: pay.audience.clone(), ..service(&acme.id, "ledger", "x") };
    let r = s
        .create_service(
            &ledger,
            &[grant("ledger:admin", "ledger.entry.read")],
            &audit(Some(&acme.id), "service.create"),
        )
        .await;
    assert_conflict(r, "duplicate audience");
    let ledger_other = Service { audience: pay.audience.clone(), ..service(&other.id, "ledger", "x") };
    assert_conflict(
        s.create_service(&ledger_other, &[], &audit(Some(&other.id), "service.create")).await,
        "audience is global",
    );
    let pay_again = service(&acme.id, "payments", "https://payments2.example");
    assert_conflict(
        s.create_service(&pay_again, &[], &audit(Some(&acme.id), "service.create")).await,
        "duplicate slug in org",
    );
    assert_eq!(s.service(&acme.id, "ledger").await.unwrap(), None);
    assert_eq!(s.service(&acme.id, "payments").await.unwrap().as_ref(), Some(&pay));
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), acme_grants, "failed creates wrote no grants");

    // set_role_permissions replaces the role's set, and only that role's, only in that org.
    let viewer = role("payments:viewer");
    s.set_role_permissions(
        &acme.id,
        &viewer,
        &[perm("payments.refund.read"), perm("payments.invoice.write")],
        &audit(Some(&acme.id), "role.set"),
    )
    .await
    .unwrap();
    let viewer_grants = |grants: Vec<RoleGrant>| grants.into_iter().filter(|g| g.role == viewer).collect::<Vec<_>>();
    assert_eq!(
        viewer_grants(s.role_grants(&acme.id).await.unwrap()),
        vec![grant("payments:viewer", "payments.invoice.write"), grant("payments:viewer", "payments.refund.read")]
    );
    s.set_role_permissions(&acme.id, &viewer, &[], &audit(Some(&acme.id), "role.set")).await.unwrap();
    assert!(viewer_grants(s.role_grants(&acme.id).await.unwrap()).is_empty(), "empty set clears the role");
    acme_grants.retain(|g| g.role != viewer);
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), acme_grants, "other roles untouched");
    assert_eq!(s.role_grants(&other.id).await.unwrap(), other_grants, "other organisations untouched");
    // A role no service declares yet can still be granted (and is returned).
    s.set_role_permissions(
        &other.id,
        &role("payments:viewer"),
        &[perm("payments.invoice.read")],
        &audit(Some(&other.id), "role.set"),
    )
    .await
    .unwrap();
    let mut other_grants = other_grants;
    other_grants.push(grant("payments:viewer", "payments.invoice.read"));
    assert_eq!(s.role_grants(&other.id).await.unwrap(), other_grants);

    // delete_service removes the service and its roles' grants: not "pay"'s prefix-siblings, not
    // other services', not other organisations'.
    assert!(s.delete_service(&acme.id, "pay", &audit(Some(&acme.id), "service.delete")).await.unwrap());
    acme_grants.retain(|g| g.role.service() != "pay");
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), acme_grants, "deleting pay kept payments:* grants");
    let del_ev = audit(Some(&acme.id), "service.delete");
    assert!(s.delete_service(&acme.id, "payments", &del_ev).await.unwrap());
    assert_eq!(s.service(&acme.id, "payments").await.unwrap(), None);
    assert_eq!(s.service_by_audience("https://payments.example").await.unwrap(), None);
    assert_eq!(s.role_grants(&acme.id).await.unwrap(), vec![grant("billing:admin", "billing.invoice.read")]);
    assert_eq!(s.services(&acme.id).await.unwrap(), vec![bill]);
    assert_eq!(s.service(&other.id, "payments").await.unwrap(), Some(other_pay), "same slug in another org survives");
    assert_eq!(s.role_grants(&other.id).await.unwrap(), other_grants);
    assert_eq!(s.audit_events(Some(&acme.id), page(1, 0)).await.unwrap(), vec![del_ev]);
    assert!(
        !s.delete_service(&acme.id, "payments", &audit(Some(&acme.id), "service.delete")).await.unwrap(),
        "second delete"
    );
    assert!(
        !s.delete_service(&other.id, "billing", &audit(Some(&other.id), "service.delete")).await.unwrap(),
        "scoped by org"
    );

    // The audience is free again.
    s.create_service(&ledger, &[], &audit(Some(&acme.id), "service.create")).await.unwrap();
    assert_eq!(s.service_by_audience(&pay.audience).await.unwrap(), Some(ledger));
}

async fn applications_round_trip_and_optimistic_update(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;

    let full = full_app(&acme, "web");
    let min = minimal_app(&acme, "batch");
    let elsewhere = full_app(&other, "web");
    for app in [&full, &min, &elsewhere] {
        s.create_application(app, &audit(Some(&app.org_id), "application.create")).await.unwrap();
    }
    assert_eq!(s.application("acme$web").await.unwrap().as_ref(), Some(&full), "every field round-trips");
    assert_eq!(s.application("acme$batch").await.unwrap().as_ref(), Some(&min), "None/false/empty round-trip");
    assert_eq!(s.application("other$web").await.unwrap().as_ref(), Some(&elsewhere));
    assert_eq!(s.application("acme$nope").await.unwrap(), None);
    assert_eq!(s.applications(&acme.id, all()).await.unwrap(), vec![min.clone(), full.clone()], "ordered by slug");
    assert_eq!(s.applications(&acme.id, page(1, 1)).await.unwrap(), vec![full.clone()]);
    assert!(s.applications(&acme.id, page(1, 2)).await.unwrap().is_empty());
    assert_eq!(s.applications(&other.id, all()).await.unwrap(), vec![elsewhere.clone()]);

    // Duplicate client id, duplicate slug.
    let dup = Application { id: new_id(), name: "dup".into(), ..full.clone() };
    assert_conflict(
        s.create_application(&dup, &audit(Some(&acme.id), "application.create")).await,
        "duplicate client_id/slug",
    );
    assert_eq!(s.application("acme$web").await.unwrap().as_ref(), Some(&full));

    // Update with the right expected_updated_at: every mutable field changes.
    let updated = Application {
        name: "Web (renamed)".into(),
        grant_types: vec![GrantType::AuthorizationCode],
        scopes: vec![scope("profile")],
        roles: vec![],
        auth_method: AuthMethod::ClientSecretPost,
        redirect_uris: vec!["https://new.example/cb".into()],
        jwks_uri: Some("https://new.example/jwks".into()),
        access_token_lifetime: 300,
        signing_alg: Algorithm::ES256,
        id_token_signing_alg: Algorithm::PS256,
        first_party: false,
        post_logout_redirect_uris: vec!["https://new.example/bye".into()],
        backchannel_logout_uri: Some("https://new.example/backchannel".into()),
        always_issue_refresh_token: false,
        enabled: false,
        secret_hash: Some(hash(3)),
        previous_secret_hash: full.secret_hash.clone(),
        previous_secret_expires_at: Some(NOW + 60),
        updated_at: full.updated_at + 10,
        ..full.clone()
    };
    let up_ev = audit(Some(&acme.id), "application.update");
    s.update_application(&updated, full.updated_at, &up_ev).await.unwrap();
    assert_eq!(s.application("acme$web").await.unwrap().as_ref(), Some(&updated));
    assert_eq!(s.audit_events(Some(&acme.id), page(1, 0)).await.unwrap(), vec![up_ev]);

    // Clearing the optional fields is an update too.
    let cleared = Application {
        jwks_uri: None,
        backchannel_logout_uri: None,
        post_logout_redirect_uris: vec![],
        first_party: true,
        always_issue_refresh_token: true,
        secret_hash: None,
        previous_secret_hash: None,
        previous_secret_expires_at: None,
        enabled: true,
        updated_at: updated.updated_at + 1,
        ..updated.clone()
    };
    s.update_application(&cleared, updated.updated_at, &audit(Some(&acme.id), "application.update")).await.unwrap();
    assert_eq!(s.application("acme$web").await.unwrap().as_ref(), Some(&cleared));

    // Stale expected_updated_at: Conflict, nothing written (row nor audit).
    let stale = Application { name: "stale writer".into(), updated_at: cleared.updated_at + 50, ..cleared.clone() };
    let stale_ev = audit(Some(&acme.id), "application.update");
    assert_conflict(s.update_application(&stale, full.updated_at, &stale_ev).await, "stale expected_updated_at");
    assert_eq!(s.application("acme$web").await.unwrap().as_ref(), Some(&cleared));
    assert!(
        s.audit_events(None, all()).await.unwrap().iter().all(|e| e.id != stale_ev.id),
        "no audit for a refused update"
    );
    // Unknown id: nothing to replace.
    let ghost = Application { id: new_id(), ..cleared.clone() };
    assert_conflict(
        s.update_application(&ghost, cleared.updated_at, &audit(Some(&acme.id), "application.update")).await,
        "unknown id",
    );
    assert_eq!(s.application("other$web").await.unwrap().as_ref(), Some(&elsewhere), "other rows untouched");

    // Delete.
    assert!(s.delete_application("acme$web", &audit(Some(&acme.id), "application.delete")).await.unwrap());
    assert_eq!(s.application("acme$web").await.unwrap(), None);
    assert!(!s.delete_application("acme$web", &audit(Some(&acme.id), "application.delete")).await.unwrap());
    assert_eq!(s.applications(&acme.id, all()).await.unwrap(), vec![min]);
    assert_eq!(s.application("other$web").await.unwrap(), Some(elsewhere));
    // The client id is free again.
    s.create_application(&full, &audit(Some(&acme.id), "application.create")).await.unwrap();
    assert_eq!(s.application("acme$web").await.unwrap(), Some(full));
}

async fn users_are_scoped_to_their_organisation(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;

    let carol = user(&acme.id, "carol@example.com");
    let ann = user(&acme.id, "ann@example.com");
    let bob =
        User { name: None, password_hash: None, roles: vec![], enabled: false, ..user(&acme.id, "bob@example.com") };
    let ann_b = user(&acme.id, "ann.b@example.com");
    for u in [&carol, &ann, &bob, &ann_b] {
        s.create_user(u, &audit(Some(&acme.id), "user.create")).await.unwrap();
    }
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann));
    assert_eq!(s.user(&acme.id, &bob.id).await.unwrap().as_ref(), Some(&bob), "None/false/empty round-trip");
    assert_eq!(
        s.user_emails(&ann.id).await.unwrap(),
        vec![UserEmail::primary_of(&ann)],
        "create_user also records the primary address, unverified, under the user's id"
    );
    assert_eq!(s.user(&other.id, &ann.id).await.unwrap(), None, "by id is scoped to the org");
    assert_eq!(s.user(&acme.id, &new_id()).await.unwrap(), None);
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap().as_ref(), Some(&ann));
    assert_eq!(s.user_by_email(&other.id, "ann@example.com").await.unwrap(), None, "by email is scoped to the org");
    assert_eq!(s.user_by_email(&acme.id, "nobody@example.com").await.unwrap(), None);

    // Duplicate email in the same org: Conflict, nothing written.
    let dup = User { name: Some("second ann".into()), ..user(&acme.id, "ann@example.com") };
    assert_conflict(s.create_user(&dup, &audit(Some(&acme.id), "user.create")).await, "duplicate email in org");
    assert_eq!(s.user(&acme.id, &dup.id).await.unwrap(), None);
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap().as_ref(), Some(&ann));
    // Duplicate id: Conflict as well.
    let same_id = User { id: ann.id.clone(), ..user(&acme.id, "dave@example.com") };
    assert_conflict(s.create_user(&same_id, &audit(Some(&acme.id), "user.create")).await, "duplicate id");

    // Same email in another org is a different user.
    let other_ann = user(&other.id, "ann@example.com");
    s.create_user(&other_ann, &audit(Some(&other.id), "user.create")).await.unwrap();
    assert_eq!(s.user_by_email(&other.id, "ann@example.com").await.unwrap().as_ref(), Some(&other_ann));
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap().as_ref(), Some(&ann));

    // Listing: ordered by email (byte order: '.' < '@'), paged, per org.
    let emails = |us: Vec<User>| us.into_iter().map(|u| u.email.as_str().to_owned()).collect::<Vec<_>>();
    assert_eq!(
        emails(s.users(&acme.id, all()).await.unwrap()),
        ["ann.b@example.com", "ann@example.com", "bob@example.com", "carol@example.com"]
    );
    assert_eq!(s.users(&acme.id, page(2, 1)).await.unwrap(), vec![ann.clone(), bob.clone()], "whole records, paged");
    assert!(s.users(&acme.id, page(10, 4)).await.unwrap().is_empty());
    assert_eq!(s.users(&other.id, all()).await.unwrap(), vec![other_ann]);
}

async fn signing_key_states_and_rotation(s: Arc<dyn Store>) {
    let es_cur = key("es-1", Algorithm::ES256, KeyState::Current, NOW - 100);
    let es_next = key("es-2", Algorithm::ES256, KeyState::Next, NOW - 50);
    let ins_ev = audit(None, "keys.insert");
    s.insert_signing_keys(&[es_cur.clone(), es_next.clone()], &ins_ev).await.unwrap();
    assert_eq!(
        s.signing_keys().await.unwrap(),
        vec![es_cur.clone(), es_next.clone()],
        "round-trip, ordered by created_at"
    );
    assert_eq!(s.audit_events(None, page(1, 0)).await.unwrap(), vec![ins_ev]);

    // Another algorithm has its own current/next.
    let rs_cur = key("rs-1", Algorithm::RS256, KeyState::Current, NOW - 90);
    s.insert_signing_keys(std::slice::from_ref(&rs_cur), &audit(None, "keys.insert")).await.unwrap();

    // A second current (or next) for ES256 is refused, and the batch is all-or-nothing.
    let es_cur2 = key("es-x", Algorithm::ES256, KeyState::Current, NOW - 40);
    assert_conflict(
        s.insert_signing_keys(std::slice::from_ref(&es_cur2), &audit(None, "keys.insert")).await,
        "second current",
    );
    let es_next2 = key("es-y", Algorithm::ES256, KeyState::Next, NOW - 40);
    assert_conflict(
        s.insert_signing_keys(std::slice::from_ref(&es_next2), &audit(None, "keys.insert")).await,
        "second next",
    );
    let rs_next = key("rs-2", Algorithm::RS256, KeyState::Next, NOW - 30);
    assert_conflict(
        s.insert_signing_keys(&[rs_next.clone(), es_cur2], &audit(None, "keys.insert")).await,
        "batch with one bad key",
    );
    let dup_kid = key("es-1", Algorithm::EdDSA, KeyState::Next, NOW - 30);
    assert_conflict(s.insert_signing_keys(&[dup_kid], &audit(None, "keys.insert")).await, "duplicate kid");
    let before = vec![es_cur.clone(), rs_cur.clone(), es_next.clone()];
    assert_eq!(s.signing_keys().await.unwrap(), before, "no refused key was written");

    // Rotate ES256.
    let es_new = key("es-3", Algorithm::ES256, KeyState::Next, NOW);
    let rotation = KeyRotation {
        alg: Algorithm::ES256,
        current_kid: es_cur.kid.clone(),
        next_kid: es_next.kid.clone(),
        retired_until: NOW + 3600,
        new_next: es_new.clone(),
        now: NOW,
    };
    let rot_ev = audit(None, "keys.rotate");
    s.rotate_signing_key(&rotation, &rot_ev).await.unwrap();
    let keys = s.signing_keys().await.unwrap();
    let retired = StoredSigningKey { state: KeyState::Retired, expires_at: Some(NOW + 3600), ..es_cur.clone() };
    let promoted = StoredSigningKey { state: KeyState::Current, activated_at: Some(NOW), ..es_next.clone() };
    assert_eq!(by_kid(&keys, "es-1"), retired, "old current retired until retired_until, activated_at kept");
    assert_eq!(by_kid(&keys, "es-2"), promoted, "next promoted, activated now");
    assert_eq!(by_kid(&keys, "es-3"), es_new, "new next inserted as given");
    assert_eq!(by_kid(&keys, "rs-1"), rs_cur, "other algorithms untouched");
    assert_eq!(keys.len(), 4);
    assert_eq!(s.audit_events(None, page(1, 0)).await.unwrap(), vec![rot_ev]);
    let after = keys;

    // Replaying the same (now stale) rotation, with a fresh new_next so the kid is not what clashes.
    let replay = KeyRotation { new_next: key("es-4", Algorithm::ES256, KeyState::Next, NOW + 1), ..rotation.clone() };
    assert_conflict(s.rotate_signing_key(&replay, &audit(None, "keys.rotate")).await, "stale rotation");
    assert_eq!(s.signing_keys().await.unwrap(), after, "stale rotation changed nothing");
    // Half-stale: the current kid is right but the next kid is not. The retire step matches a
    // row and must be rolled back.
    let half = KeyRotation {
        current_kid: "es-2".into(),
        next_kid: "es-1".into(),
        new_next: key("es-5", Algorithm::ES256, KeyState::Next, NOW + 1),
        ..rotation.clone()
    };
    assert_conflict(s.rotate_signing_key(&half, &audit(None, "keys.rotate")).await, "half-stale rotation");
    assert_eq!(s.signing_keys().await.unwrap(), after, "half-stale rotation rolled back its first update");
    // Right kids, wrong algorithm.
    let wrong_alg = KeyRotation {
        alg: Algorithm::RS256,
        current_kid: "es-2".into(),
        next_kid: "es-3".into(),
        new_next: key("rs-9", Algorithm::RS256, KeyState::Next, NOW + 1),
        ..rotation.clone()
    };
    assert_conflict(
        s.rotate_signing_key(&wrong_alg, &audit(None, "keys.rotate")).await,
        "rotation under another algorithm",
    );
    assert_eq!(s.signing_keys().await.unwrap(), after);
    // RS256 has a current key but no next: a rotation naming a missing next must not retire the
    // current one (and leave the algorithm with no signing key) even though nothing else clashes.
    let no_next = KeyRotation {
        alg: Algorithm::RS256,
        current_kid: "rs-1".into(),
        next_kid: "rs-missing".into(),
        new_next: key("rs-2", Algorithm::RS256, KeyState::Next, NOW + 1),
        ..rotation.clone()
    };
    assert_conflict(
        s.rotate_signing_key(&no_next, &audit(None, "keys.rotate")).await,
        "rotation with a missing next key",
    );
    assert_eq!(s.signing_keys().await.unwrap(), after, "rs-1 still current, rs-2 not inserted");

    // Expiry: only retired keys whose expires_at <= now go.
    let old_retired = StoredSigningKey {
        state: KeyState::Retired,
        activated_at: Some(NOW - 9000),
        expires_at: Some(NOW - 10),
        ..key("es-0", Algorithm::ES256, KeyState::Retired, NOW - 9000)
    };
    let retired_forever = StoredSigningKey {
        state: KeyState::Retired,
        expires_at: None,
        ..key("ed-0", Algorithm::EdDSA, KeyState::Retired, NOW - 9000)
    };
    // Not retired, so never deleted whatever its expires_at says.
    let odd_next =
        StoredSigningKey { expires_at: Some(NOW - 1000), ..key("ps-1", Algorithm::PS256, KeyState::Next, NOW - 9000) };
    s.insert_signing_keys(&[old_retired, retired_forever.clone(), odd_next.clone()], &audit(None, "keys.insert"))
        .await
        .unwrap();
    assert_eq!(s.delete_expired_signing_keys(NOW).await.unwrap(), 1, "only es-0 has expired");
    let kids = |keys: Vec<StoredSigningKey>| {
        let mut k: Vec<String> = keys.into_iter().map(|k| k.kid).collect();
        k.sort();
        k
    };
    assert_eq!(kids(s.signing_keys().await.unwrap()), ["ed-0", "es-1", "es-2", "es-3", "ps-1", "rs-1"]);
    assert_eq!(s.delete_expired_signing_keys(NOW + 3599).await.unwrap(), 0, "es-1 still published");
    assert_eq!(s.delete_expired_signing_keys(NOW + 3600).await.unwrap(), 1, "expires_at == now is expired");
    assert_eq!(kids(s.signing_keys().await.unwrap()), ["ed-0", "es-2", "es-3", "ps-1", "rs-1"]);
    assert_eq!(
        s.delete_expired_signing_keys(i64::MAX).await.unwrap(),
        0,
        "current, next and undated retired keys stay"
    );
    assert_eq!(by_kid(&s.signing_keys().await.unwrap(), "ps-1"), odd_next);
    assert_eq!(by_kid(&s.signing_keys().await.unwrap(), "ed-0"), retired_forever);
}

async fn concurrent_rotations_one_wins_the_rest_conflict(s: Arc<dyn Store>) {
    let cur = key("k-cur", Algorithm::ES256, KeyState::Current, NOW - 100);
    let next = key("k-next", Algorithm::ES256, KeyState::Next, NOW - 50);
    s.insert_signing_keys(&[cur.clone(), next.clone()], &audit(None, "keys.insert")).await.unwrap();

    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let s = Arc::clone(&s);
            let rotation = KeyRotation {
                alg: Algorithm::ES256,
                current_kid: cur.kid.clone(),
                next_kid: next.kid.clone(),
                retired_until: NOW + 3600,
                new_next: key(&format!("k-new-{i}"), Algorithm::ES256, KeyState::Next, NOW),
                now: NOW,
            };
            tokio::spawn(async move { s.rotate_signing_key(&rotation, &audit(None, "keys.rotate")).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results.iter().filter(|r| matches!(r, Err(StoreError::Conflict(_)))).count();
    assert_eq!(
        (wins, conflicts),
        (1, results.len() - 1),
        "exactly one rotation wins, the others see Conflict: {results:?}"
    );

    let keys = s.signing_keys().await.unwrap();
    let states = |st: KeyState| keys.iter().filter(|k| k.state == st).map(|k| k.kid.clone()).collect::<Vec<_>>();
    assert_eq!(states(KeyState::Retired), ["k-cur"]);
    assert_eq!(states(KeyState::Current), ["k-next"]);
    assert_eq!(states(KeyState::Next).len(), 1, "one new next: {keys:?}");
    assert_eq!(keys.len(), 3);
}

async fn concurrent_application_updates_one_wins(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let app = full_app(&acme, "web");
    s.create_application(&app, &audit(Some(&acme.id), "application.create")).await.unwrap();

    let tasks: Vec<_> = (0..6i64)
        .map(|i| {
            let s = Arc::clone(&s);
            let edit = Application { name: format!("writer {i}"), updated_at: app.updated_at + 1 + i, ..app.clone() };
            let expected = app.updated_at;
            let ev = audit(Some(&acme.id), "application.update");
            tokio::spawn(async move { (s.update_application(&edit, expected, &ev).await, edit) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            (Ok(()), edit) => winners.push(edit),
            (r, _) if is_conflict(&r) => conflicts += 1,
            (r, _) => panic!("unexpected result {r:?}"),
        }
    }
    assert_eq!((winners.len(), conflicts), (1, 5), "optimistic concurrency lets exactly one writer through");
    assert_eq!(
        s.application("acme$web").await.unwrap().as_ref(),
        winners.first(),
        "the winner's write is what is stored"
    );
}

async fn ca_certificates_and_revoked_tokens(s: Arc<dyn Store>) {
    assert!(s.ca_certificates().await.unwrap().is_empty());
    let root = ca_cert("ca-root", CaKind::Root, NOW - 10);
    let issuing = ca_cert("ca-issuing", CaKind::Issuing, NOW);
    let ev = audit(None, "ca.insert");
    s.insert_ca_certificates(&[issuing.clone(), root.clone()], &ev).await.unwrap();
    assert_eq!(
        s.ca_certificates().await.unwrap(),
        vec![root.clone(), issuing.clone()],
        "round-trip, ordered by created_at"
    );
    assert_eq!(s.audit_events(None, page(1, 0)).await.unwrap(), vec![ev]);
    let again = CaCertificate { subject: "CN=impostor".into(), ..root.clone() };
    let next = ca_cert("ca-issuing-2", CaKind::Issuing, NOW + 1);
    assert_conflict(s.insert_ca_certificates(&[next, again], &audit(None, "ca.insert")).await, "duplicate CA id");
    assert_eq!(s.ca_certificates().await.unwrap(), vec![root, issuing], "refused batch wrote nothing");

    // Revocation.
    let live =
        RevokedToken { jti: "jti-live".into(), client_id: "acme$web".into(), expires_at: NOW + 60, revoked_at: NOW };
    let dead = RevokedToken {
        jti: "jti-dead".into(),
        client_id: "acme$web".into(),
        expires_at: NOW - 1,
        revoked_at: NOW - 30,
    };
    assert!(!s.is_token_revoked("jti-live").await.unwrap());
    s.revoke_token(&live, &audit(None, "token.revoke")).await.unwrap();
    s.revoke_token(&live, &audit(None, "token.revoke")).await.unwrap();
    s.revoke_token(&RevokedToken { revoked_at: NOW + 5, ..live.clone() }, &audit(None, "token.revoke"))
        .await
        .expect("revoking twice is fine");
    s.revoke_token(&dead, &audit(None, "token.revoke")).await.unwrap();
    assert!(s.is_token_revoked("jti-live").await.unwrap());
    assert!(s.is_token_revoked("jti-dead").await.unwrap(), "kept until purged");
    assert!(!s.is_token_revoked("jti-other").await.unwrap());
    assert!(!s.is_token_revoked("JTI-LIVE").await.unwrap(), "jti match is exact");

    assert_eq!(s.purge_expired_revocations(NOW).await.unwrap(), 1, "only the expired revocation goes");
    assert!(!s.is_token_revoked("jti-dead").await.unwrap());
    assert!(s.is_token_revoked("jti-live").await.unwrap());
    assert_eq!(s.purge_expired_revocations(NOW).await.unwrap(), 0);
    assert_eq!(s.purge_expired_revocations(NOW + 61).await.unwrap(), 1);
    assert!(!s.is_token_revoked("jti-live").await.unwrap());
}

async fn audit_log_is_newest_first_filtered_and_paged(s: Arc<dyn Store>) {
    assert!(s.audit_events(None, all()).await.unwrap().is_empty());
    let acme = new_id();
    let other = new_id();
    let mut written = Vec::new();
    for i in 0..12i64 {
        let org = match i % 3 {
            0 => Some(acme.as_str()),
            1 => Some(other.as_str()),
            _ => None,
        };
        let ev = AuditEvent {
            at: NOW + i,
            ip: (i % 2 == 0).then(|| "192.0.2.7".to_owned()),
            outcome: if i % 4 == 0 { "failure".into() } else { "success".into() },
            details: if i == 5 { json!({}) } else { json!({ "i": i, "s": "ünï\u{0}code\n\"" }) },
            ..audit(org, &format!("event.{i}"))
        };
        s.append_audit(&ev).await.unwrap();
        written.push(ev);
    }
    let newest_first = |org: Option<&str>| {
        written.iter().rev().filter(|e| org.is_none() || e.org_id.as_deref() == org).cloned().collect::<Vec<_>>()
    };

    assert_eq!(
        s.audit_events(None, all()).await.unwrap(),
        newest_first(None),
        "unfiltered, newest first, exact round-trip"
    );
    assert_eq!(s.audit_events(Some(&acme), all()).await.unwrap(), newest_first(Some(&acme)));
    assert_eq!(s.audit_events(Some(&other), all()).await.unwrap(), newest_first(Some(&other)));
    assert!(s.audit_events(Some(&new_id()), all()).await.unwrap().is_empty());

    assert_eq!(s.audit_events(None, page(5, 0)).await.unwrap(), newest_first(None)[..5]);
    assert_eq!(s.audit_events(None, page(5, 10)).await.unwrap(), newest_first(None)[10..]);
    assert_eq!(s.audit_events(Some(&acme), page(2, 1)).await.unwrap(), newest_first(Some(&acme))[1..3]);
    assert!(s.audit_events(Some(&acme), page(2, 4)).await.unwrap().is_empty());

    // Writes through other methods land in the same log, in order.
    let org = organisation("acme");
    let create = audit(Some(&org.id), "organisation.create");
    s.create_organisation(&org, &create).await.unwrap();
    let first = s.audit_events(None, page(2, 0)).await.unwrap();
    assert_eq!(first, vec![create, written.last().unwrap().clone()]);
}

// ------------------------------------------------------------------- Auth API: helpers --

/// A mail row as the database holds it: `(sent_at, sealed_body)`. The trait never shows sent
/// mail, so the erasure of its body is checked here, on a connection of the test's own.
async fn raw_mail(id: &str) -> (Option<UnixTime>, Vec<u8>) {
    let sql = "SELECT sent_at, sealed_body FROM mail_queue WHERE id = $1";
    match RAW_DB.with(Clone::clone) {
        RawDb::Sqlite(path) => {
            let url = format!("sqlite://{}", path.display());
            let mut c = SqliteConnection::connect(&url).await.unwrap();
            let row: (Option<i64>, Vec<u8>) = sqlx::query_as(sql).bind(id).fetch_one(&mut c).await.unwrap();
            c.close().await.unwrap();
            row
        }
        RawDb::Pg(url) => {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let row: (Option<i64>, Vec<u8>) = sqlx::query_as(sql).bind(id).fetch_one(&mut c).await.unwrap();
            c.close().await.unwrap();
            row
        }
    }
}

async fn seed_user(s: &dyn Store, org_id: &str, email: &str) -> User {
    let u = user(org_id, email);
    s.create_user(&u, &audit(Some(org_id), "user.create")).await.unwrap();
    u
}

fn address(u: &User, email: &str) -> UserEmail {
    UserEmail {
        id: new_id(),
        user_id: u.id.clone(),
        org_id: u.org_id.clone(),
        email: Email::parse(email).unwrap(),
        verified_at: None,
        created_at: NOW + 1,
    }
}

fn verification(u: &User, purpose: VerificationPurpose, subject_id: &str) -> Verification {
    Verification {
        id: new_id(),
        purpose,
        org_id: u.org_id.clone(),
        user_id: u.id.clone(),
        subject_id: subject_id.to_owned(),
        code_hash: hash(0x40),
        attempts: 0,
        expires_at: NOW + 600,
        consumed_at: None,
        created_at: NOW,
        sealed_token: None,
    }
}

fn mail(to: &str) -> QueuedMail {
    QueuedMail {
        id: new_id(),
        to: to.to_owned(),
        subject: "Your code — «ü»".into(),
        sealed_body: vec![0x00, 0x01, 0xfe, 0xff, 0x00],
        attempts: 0,
        next_attempt_at: NOW,
        last_error: None,
        created_at: NOW,
        sent_at: None,
    }
}

/// A pending session whose token hash is `hash(token)`.
fn session(u: &User, token: u8) -> Session {
    Session {
        id: new_id(),
        user_id: u.id.clone(),
        org_id: u.org_id.clone(),
        token_hash: hash(token),
        state: CredentialState::Pending,
        created_at: NOW,
        verified_at: None,
        last_used_at: NOW,
        expires_at: NOW + 86_400,
        ip: Some("2001:db8::7".into()),
        user_agent: Some("curl/8 «ü»".into()),
        revoked_at: None,
        parent_id: None,
    }
}

/// Creates `sess` with its verification (holding the sealed token) and mail.
async fn add_session(s: &dyn Store, u: &User, sess: &Session) -> Verification {
    let v = Verification {
        sealed_token: Some(vec![0x00, 0x09, 0xff]),
        ..verification(u, VerificationPurpose::Session, &sess.id)
    };
    s.create_session(sess, &v, Some(&mail(u.email.as_str())), &audit(Some(&u.org_id), "session.create")).await.unwrap();
    v
}

async fn seed_session(s: &dyn Store, u: &User, token: u8) -> (Session, Verification) {
    let sess = session(u, token);
    let v = add_session(s, u, &sess).await;
    (sess, v)
}

fn api_key(u: &User, key: &str) -> ApiKey {
    ApiKey {
        id: new_id(),
        org_id: u.org_id.clone(),
        user_id: u.id.clone(),
        name: format!("key {key} «ü»"),
        key: key.to_owned(),
        secret_hash: hash(0x50),
        roles: vec![role("payments:viewer"), role("billing:admin")],
        state: CredentialState::Pending,
        expires_at: Some(NOW + 86_400 * 30),
        last_used_at: None,
        created_at: NOW,
        revoked_at: None,
    }
}

async fn seed_api_key(s: &dyn Store, u: &User, key: &str) -> (ApiKey, Verification) {
    let k = api_key(u, key);
    let v = verification(u, VerificationPurpose::ApiKey, &k.id);
    s.create_api_key(&k, &v, &mail(u.email.as_str()), &audit(Some(&u.org_id), "api_key.create")).await.unwrap();
    (k, v)
}

async fn state_of(s: &dyn Store, session_id: &str) -> (CredentialState, Option<UnixTime>) {
    let sess = s.session(session_id).await.unwrap().unwrap();
    (sess.state, sess.revoked_at)
}

async fn audited(s: &dyn Store, ev: &AuditEvent) -> bool {
    s.audit_events(None, all()).await.unwrap().iter().any(|e| e == ev)
}

async fn audit_len(s: &dyn Store) -> usize {
    s.audit_events(None, all()).await.unwrap().len()
}

fn activate(sess: &Session) -> VerificationEffect {
    VerificationEffect::ActivateSession { session_id: sess.id.clone() }
}

// --------------------------------------------------------------------- Auth API: cases --

async fn users_update_optimistically_and_can_end_sessions(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;

    // The lockout fields round-trip.
    let locked =
        User { failed_logins: 1_000_000, locked_until: Some(NOW + 900), ..user(&acme.id, "locked@example.com") };
    s.create_user(&locked, &audit(Some(&acme.id), "user.create")).await.unwrap();
    assert_eq!(s.user(&acme.id, &locked.id).await.unwrap().as_ref(), Some(&locked));

    let (pending, _) = seed_session(&*s, &ann, 1).await;
    let (active, active_v) = seed_session(&*s, &ann, 2).await;
    assert!(
        s.consume_verification(&active_v.id, NOW + 1, &activate(&active), &audit(Some(&acme.id), "session.verify"))
            .await
            .unwrap()
    );
    let (revoked, _) = seed_session(&*s, &ann, 3).await;
    assert!(s.revoke_session(&revoked.id, NOW + 2, &audit(Some(&acme.id), "session.revoke")).await.unwrap());
    let (bobs, _) = seed_session(&*s, &bob, 4).await;

    // Every mutable field changes; sessions are kept.
    let changed = User {
        name: Some("Ann B.".into()),
        password_hash: Some("$argon2id$v=19$new".into()),
        roles: vec![role("billing:admin")],
        enabled: false,
        failed_logins: 3,
        locked_until: Some(NOW + 60),
        updated_at: ann.updated_at + 10,
        ..ann.clone()
    };
    let ev = audit(Some(&acme.id), "user.update");
    s.update_user(&changed, ann.updated_at, false, &ev).await.unwrap();
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&changed));
    assert!(audited(&*s, &ev).await, "update audited");
    assert_eq!(
        state_of(&*s, &pending.id).await,
        (CredentialState::Pending, None),
        "end_sessions = false keeps sessions"
    );
    assert_eq!(state_of(&*s, &active.id).await, (CredentialState::Active, None));

    // Stale updated_at: Conflict, nothing written, sessions kept even with end_sessions.
    let stale = User { name: Some("stale writer".into()), updated_at: changed.updated_at + 1, ..changed.clone() };
    let stale_ev = audit(Some(&acme.id), "user.update");
    assert_conflict(s.update_user(&stale, ann.updated_at, true, &stale_ev).await, "stale expected_updated_at");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&changed), "stale update wrote nothing");
    assert!(!audited(&*s, &stale_ev).await, "no audit for a refused update");
    assert_eq!(state_of(&*s, &active.id).await, (CredentialState::Active, None), "refused update ended no session");
    // Unknown id, or the right id in another organisation.
    let ghost = User { id: new_id(), ..stale.clone() };
    assert_conflict(
        s.update_user(&ghost, changed.updated_at, false, &audit(Some(&acme.id), "user.update")).await,
        "unknown id",
    );
    let moved = User { org_id: other.id.clone(), ..stale.clone() };
    assert_conflict(
        s.update_user(&moved, changed.updated_at, false, &audit(Some(&acme.id), "user.update")).await,
        "other org",
    );
    // The email must be one of the user's addresses (not someone else's, not a new one).
    for email in ["nobody@example.com", "bob@example.com"] {
        let foreign = User { email: Email::parse(email).unwrap(), ..stale.clone() };
        let r = s.update_user(&foreign, changed.updated_at, true, &audit(Some(&acme.id), "user.update")).await;
        assert_conflict(r, &format!("{email} is not one of ann's addresses"));
    }
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&changed), "refused updates wrote nothing");
    assert_eq!(state_of(&*s, &active.id).await, (CredentialState::Active, None));

    // end_sessions revokes the pending and active sessions "now" (the new updated_at); an already
    // revoked one keeps its time; other users' sessions are untouched.
    let ended = User { enabled: true, updated_at: changed.updated_at + 5, ..changed.clone() };
    let end_ev = audit(Some(&acme.id), "user.update");
    s.update_user(&ended, changed.updated_at, true, &end_ev).await.unwrap();
    assert!(audited(&*s, &end_ev).await);
    assert_eq!(state_of(&*s, &pending.id).await, (CredentialState::Revoked, Some(ended.updated_at)));
    assert_eq!(state_of(&*s, &active.id).await, (CredentialState::Revoked, Some(ended.updated_at)));
    assert_eq!(state_of(&*s, &revoked.id).await, (CredentialState::Revoked, Some(NOW + 2)));
    assert_eq!(state_of(&*s, &bobs.id).await, (CredentialState::Pending, None), "other users' sessions kept");
    assert_eq!(s.user(&acme.id, &bob.id).await.unwrap().as_ref(), Some(&bob));

    // The lockout counter: no updated_at change; the login attempt is audited with it.
    let failed = AuditEvent { outcome: "failure".into(), ..audit(Some(&acme.id), "user.login") };
    s.set_login_failures(&ann.id, 5, Some(NOW + 300), &failed).await.unwrap();
    assert!(audited(&*s, &failed).await);
    assert_eq!(
        s.user(&acme.id, &ann.id).await.unwrap(),
        Some(User { failed_logins: 5, locked_until: Some(NOW + 300), ..ended.clone() })
    );
    let success = audit(Some(&acme.id), "user.login");
    s.set_login_failures(&ann.id, 0, None, &success).await.unwrap();
    assert!(audited(&*s, &success).await);
    assert_eq!(
        s.user(&acme.id, &ann.id).await.unwrap(),
        Some(User { failed_logins: 0, locked_until: None, ..ended.clone() }),
        "counter cleared, updated_at untouched"
    );
    s.set_login_failures(&bob.id, 2, None, &audit(Some(&acme.id), "user.login")).await.unwrap();
    // updated_at was not bumped: an update expecting it still goes through.
    let renamed = User { name: Some("Bob".into()), updated_at: bob.updated_at + 1, failed_logins: 2, ..bob.clone() };
    s.update_user(&renamed, bob.updated_at, false, &audit(Some(&acme.id), "user.update")).await.unwrap();
    assert_eq!(s.user(&acme.id, &bob.id).await.unwrap(), Some(renamed));
}

async fn user_search_escapes_wildcards_and_email_lookup_spans_organisations(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let third = seed_org(&*s, "third").await;
    let named = |org: &str, email: &str, name: Option<&str>| User { name: name.map(str::to_owned), ..user(org, email) };
    let acme_users = [
        named(&acme.id, "ann@example.com", Some("Ann Smith")),
        named(&acme.id, "joanne@example.com", None),
        named(&acme.id, "bob@example.com", Some("Bobby ANNE")),
        named(&acme.id, "per_cent@example.com", Some("100% sure")),
        named(&acme.id, "perxcent@example.com", Some("a_b")),
        named(&acme.id, "backslash@example.com", Some("back\\slash")),
        named(&acme.id, "zed@example.com", Some("Zed")),
    ];
    for u in &acme_users {
        s.create_user(u, &audit(Some(&acme.id), "user.create")).await.unwrap();
    }
    let other_ann = named(&other.id, "ann@example.com", Some("Ann Other"));
    let third_ann = named(&third.id, "ann@example.com", None);
    for u in [&other_ann, &third_ann] {
        s.create_user(u, &audit(Some(&u.org_id), "user.create")).await.unwrap();
    }

    let search = |org: String, q: &'static str, p: Page| {
        let s = Arc::clone(&s);
        async move {
            s.search_users(&org, q, p)
                .await
                .unwrap()
                .into_iter()
                .map(|u| u.email.as_str().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let a = || acme.id.clone();
    assert_eq!(
        search(a(), "ANN", all()).await,
        ["ann@example.com", "bob@example.com", "joanne@example.com"],
        "case-insensitive, email or name, ordered by email"
    );
    assert_eq!(search(a(), "nne", all()).await, ["bob@example.com", "joanne@example.com"]);
    assert_eq!(search(a(), "ann", page(1, 1)).await, ["bob@example.com"], "paged");
    assert_eq!(search(a(), "%", all()).await, ["per_cent@example.com"], "% matches itself only");
    assert_eq!(search(a(), "100%", all()).await, ["per_cent@example.com"]);
    assert_eq!(
        search(a(), "_", all()).await,
        ["per_cent@example.com", "perxcent@example.com"],
        "_ matches itself only"
    );
    assert_eq!(search(a(), "per_", all()).await, ["per_cent@example.com"], "escaped _ is not any character");
    assert_eq!(search(a(), "\\", all()).await, ["backslash@example.com"], "backslash (in a name) matches itself");
    assert_eq!(search(a(), "k\\s", all()).await, ["backslash@example.com"]);
    assert!(search(a(), "other", all()).await.is_empty(), "other organisations' names are not searched");
    assert!(search(a(), "nobody", all()).await.is_empty());
    assert_eq!(search(a(), "", all()).await.len(), acme_users.len(), "the empty query matches everyone");
    assert_eq!(search(other.id.clone(), "ANN", all()).await, ["ann@example.com"]);
    let found = s.search_users(&acme.id, "smith", all()).await.unwrap();
    assert_eq!(found, vec![acme_users[0].clone()], "whole records");

    // users_with_email: the primary address, in every organisation, at most `max`.
    let mut everywhere = s.users_with_email("ann@example.com", 10).await.unwrap();
    everywhere.sort_by(|x, y| x.id.cmp(&y.id));
    let mut expected = vec![acme_users[0].clone(), other_ann.clone(), third_ann.clone()];
    expected.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(everywhere, expected);
    assert_eq!(s.users_with_email("ann@example.com", 2).await.unwrap().len(), 2, "at most max");
    assert!(s.users_with_email("nobody@example.com", 10).await.unwrap().is_empty());
    assert!(s.users_with_email("ann@example", 10).await.unwrap().is_empty(), "exact match");
    // A secondary address is not a primary email.
    let alias = address(&acme_users[0], "alias@example.com");
    let v = verification(&acme_users[0], VerificationPurpose::Email, &alias.id);
    s.add_user_email(&alias, &v, &mail("alias@example.com"), &audit(Some(&acme.id), "user.email.add")).await.unwrap();
    assert!(s.users_with_email("alias@example.com", 10).await.unwrap().is_empty());
}

async fn delete_user_removes_everything_tied_to_the_user(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;

    let app = seed_app(&*s, &acme, "web").await;

    // Everything a user can own, for ann and for bob.
    struct Owned {
        alias: UserEmail,
        session: Session,
        key: ApiKey,
        verifications: Vec<String>,
        code: AuthorizationCode,
        refresh: RefreshToken,
        consent: Consent,
        totp: UserTotp,
    }
    let mut owned = Vec::new();
    for (u, n) in [(&ann, 1u8), (&bob, 2u8)] {
        let alias = address(u, &format!("alias{n}@example.com"));
        let email_v = verification(u, VerificationPurpose::Email, &alias.id);
        s.add_user_email(&alias, &email_v, &mail(alias.email.as_str()), &audit(Some(&acme.id), "user.email.add"))
            .await
            .unwrap();
        let (session, session_v) = seed_session(&*s, u, n).await;
        let (key, key_v) = seed_api_key(&*s, u, &format!("key-{n}")).await;
        let reset_v = verification(u, VerificationPurpose::PasswordReset, &u.id);
        s.create_verification(&reset_v, &mail(u.email.as_str()), &audit(Some(&acme.id), "user.reset")).await.unwrap();
        // OIDC: an unredeemed code, a refresh token (its code redeemed in the session, which so
        // signed in to the application), a consent and a second factor.
        let code = code(&app, u, &session, 0xb0 + n);
        s.insert_authorization_code(&code, &audit(Some(&acme.id), "oauth.authorize")).await.unwrap();
        let refresh = refresh_token(&app, u, &session.id, &format!("fam-{n}"), 0x80 + n);
        issue_refresh(&*s, &refresh, 0xa0 + n).await;
        let consent = consent(u, &app, &["openid"], NOW);
        s.save_consent(&consent, &audit(Some(&acme.id), "consent.grant")).await.unwrap();
        let totp = totp(u, &[n, 0xff], NOW);
        s.save_user_totp(&totp, &audit(Some(&acme.id), "user.totp.enrol")).await.unwrap();
        owned.push(Owned {
            alias,
            session,
            key,
            verifications: vec![email_v.id, session_v.id, key_v.id, reset_v.id],
            code,
            refresh,
            consent,
            totp,
        });
    }
    let (ann_owned, bob_owned) = (&owned[0], &owned[1]);

    // Wrong organisation: nothing deleted, no audit.
    let wrong = audit(Some(&other.id), "user.delete");
    assert!(!s.delete_user(&other.id, &ann.id, &wrong).await.unwrap());
    assert!(!audited(&*s, &wrong).await);
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann));
    assert_eq!(s.user_emails(&ann.id).await.unwrap().len(), 2);
    assert!(s.session(&ann_owned.session.id).await.unwrap().is_some());
    assert!(s.api_key(&acme.id, &ann_owned.key.id).await.unwrap().is_some());
    for id in &ann_owned.verifications {
        assert!(s.verification(id).await.unwrap().is_some());
    }
    assert!(s.authorization_code(&ann_owned.code.code_hash).await.unwrap().is_some());
    assert!(refresh_of(&*s, &ann_owned.refresh).await.is_some());
    assert!(s.consent(&ann.id, "acme$web").await.unwrap().is_some());
    assert!(s.user_totp(&ann.id).await.unwrap().is_some());
    assert_eq!(s.session_clients(&ann_owned.session.id).await.unwrap(), vec!["acme$web".to_owned()]);

    let ev = audit(Some(&acme.id), "user.delete");
    assert!(s.delete_user(&acme.id, &ann.id, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap(), None);
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap(), None);
    assert!(s.user_emails(&ann.id).await.unwrap().is_empty(), "addresses deleted");
    assert_eq!(s.session(&ann_owned.session.id).await.unwrap(), None, "sessions deleted");
    assert_eq!(s.session_by_token(&ann_owned.session.token_hash).await.unwrap(), None);
    assert!(s.user_sessions(&ann.id, all()).await.unwrap().is_empty());
    assert_eq!(s.api_key(&acme.id, &ann_owned.key.id).await.unwrap(), None, "API keys deleted");
    assert_eq!(s.api_key_by_key("key-1").await.unwrap(), None);
    for id in &ann_owned.verifications {
        assert_eq!(s.verification(id).await.unwrap(), None, "verifications deleted");
    }
    assert_eq!(s.authorization_code(&ann_owned.code.code_hash).await.unwrap(), None, "codes deleted");
    assert_eq!(s.authorization_code(&hash(0xa1)).await.unwrap(), None, "redeemed codes too");
    assert_eq!(refresh_of(&*s, &ann_owned.refresh).await, None, "refresh tokens deleted");
    assert_eq!(s.consent(&ann.id, "acme$web").await.unwrap(), None, "consents deleted");
    assert!(s.user_consents(&ann.id).await.unwrap().is_empty());
    assert_eq!(s.user_totp(&ann.id).await.unwrap(), None, "second factor deleted");
    assert!(s.session_clients(&ann_owned.session.id).await.unwrap().is_empty(), "session clients deleted");

    // Bob keeps everything.
    assert_eq!(s.user(&acme.id, &bob.id).await.unwrap().as_ref(), Some(&bob));
    assert_eq!(s.user_emails(&bob.id).await.unwrap(), vec![UserEmail::primary_of(&bob), bob_owned.alias.clone()]);
    assert_eq!(s.session(&bob_owned.session.id).await.unwrap().as_ref(), Some(&bob_owned.session));
    assert_eq!(s.api_key(&acme.id, &bob_owned.key.id).await.unwrap().as_ref(), Some(&bob_owned.key));
    for id in &bob_owned.verifications {
        assert!(s.verification(id).await.unwrap().is_some());
    }
    assert_eq!(s.authorization_code(&bob_owned.code.code_hash).await.unwrap().as_ref(), Some(&bob_owned.code));
    assert_eq!(refresh_of(&*s, &bob_owned.refresh).await.as_ref(), Some(&bob_owned.refresh));
    assert_eq!(s.consent(&bob.id, "acme$web").await.unwrap().as_ref(), Some(&bob_owned.consent));
    assert_eq!(s.user_totp(&bob.id).await.unwrap().as_ref(), Some(&bob_owned.totp));
    assert_eq!(s.session_clients(&bob_owned.session.id).await.unwrap(), vec!["acme$web".to_owned()]);

    // Second delete: false, no audit.
    let again = audit(Some(&acme.id), "user.delete");
    assert!(!s.delete_user(&acme.id, &ann.id, &again).await.unwrap());
    assert!(!audited(&*s, &again).await);

    // Ann's addresses are free again in the organisation.
    let ann2 = seed_user(&*s, &acme.id, "ann@example.com").await;
    let alias = address(&ann2, "alias1@example.com");
    let v = verification(&ann2, VerificationPurpose::Email, &alias.id);
    s.add_user_email(&alias, &v, &mail("alias1@example.com"), &audit(Some(&acme.id), "user.email.add")).await.unwrap();
}

async fn user_emails_add_verify_make_primary_and_remove(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), vec![UserEmail::primary_of(&ann)]);

    // Add: the address, its verification and its mail, audited.
    let work = address(&ann, "ann@work.example");
    let work_v = verification(&ann, VerificationPurpose::Email, &work.id);
    let work_mail = mail("ann@work.example");
    let add_ev = audit(Some(&acme.id), "user.email.add");
    s.add_user_email(&work, &work_v, &work_mail, &add_ev).await.unwrap();
    assert!(audited(&*s, &add_ev).await);
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), vec![UserEmail::primary_of(&ann), work.clone()]);
    assert_eq!(s.verification(&work_v.id).await.unwrap().as_ref(), Some(&work_v));
    assert_eq!(s.due_mail(NOW, 10).await.unwrap(), vec![work_mail.clone()]);

    // Duplicates in the organisation (someone's primary, or an added address): Conflict, and
    // neither the verification nor the mail nor the audit row is written.
    for taken in ["bob@example.com", "ann@work.example"] {
        let dup = address(&bob, taken);
        let dup_v = verification(&bob, VerificationPurpose::Email, &dup.id);
        let dup_ev = audit(Some(&acme.id), "user.email.add");
        assert_conflict(s.add_user_email(&dup, &dup_v, &mail(taken), &dup_ev).await, taken);
        assert_eq!(s.verification(&dup_v.id).await.unwrap(), None);
        assert!(!audited(&*s, &dup_ev).await);
    }
    assert_eq!(s.pending_mail_count().await.unwrap(), 1, "refused adds queued no mail");
    assert_eq!(s.user_emails(&bob.id).await.unwrap(), vec![UserEmail::primary_of(&bob)]);
    // The same address in another organisation is fine.
    let elsewhere = seed_user(&*s, &other.id, "carol@example.com").await;
    let e = address(&elsewhere, "ann@work.example");
    s.add_user_email(
        &e,
        &verification(&elsewhere, VerificationPurpose::Email, &e.id),
        &mail("ann@work.example"),
        &audit(Some(&other.id), "user.email.add"),
    )
    .await
    .unwrap();

    // Only a verified address can become primary.
    let refused = audit(Some(&acme.id), "user.email.primary");
    assert!(!s.set_primary_email(&ann.id, &work.id, NOW + 50, &refused).await.unwrap(), "unverified");
    assert!(!audited(&*s, &refused).await);
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann));
    assert!(
        s.consume_verification(
            &work_v.id,
            NOW + 10,
            &VerificationEffect::VerifyEmail { email_id: work.id.clone() },
            &audit(Some(&acme.id), "user.email.verify")
        )
        .await
        .unwrap()
    );
    let verified_work = UserEmail { verified_at: Some(NOW + 10), ..work.clone() };
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), vec![UserEmail::primary_of(&ann), verified_work.clone()]);
    // Not someone else's address, nor an unknown one.
    assert!(
        !s.set_primary_email(&bob.id, &work.id, NOW + 50, &audit(Some(&acme.id), "user.email.primary")).await.unwrap()
    );
    assert!(
        !s.set_primary_email(&ann.id, &new_id(), NOW + 50, &audit(Some(&acme.id), "user.email.primary")).await.unwrap()
    );
    assert_eq!(s.user(&acme.id, &bob.id).await.unwrap().as_ref(), Some(&bob));

    let primary_ev = audit(Some(&acme.id), "user.email.primary");
    assert!(s.set_primary_email(&ann.id, &work.id, NOW + 50, &primary_ev).await.unwrap());
    assert!(audited(&*s, &primary_ev).await);
    let ann_now = User { email: Email::parse("ann@work.example").unwrap(), updated_at: NOW + 50, ..ann.clone() };
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann_now), "email and updated_at changed");
    assert_eq!(s.user_by_email(&acme.id, "ann@work.example").await.unwrap().as_ref(), Some(&ann_now));
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap(), None);
    assert_eq!(
        s.user_emails(&ann.id).await.unwrap(),
        vec![UserEmail::primary_of(&ann), verified_work.clone()],
        "address rows unchanged"
    );

    // Remove: never the primary; never another user's; the old primary can go now.
    let refused = audit(Some(&acme.id), "user.email.remove");
    assert!(!s.remove_user_email(&ann.id, &work.id, &refused).await.unwrap(), "the primary stays");
    assert!(!audited(&*s, &refused).await);
    assert!(
        !s.remove_user_email(&bob.id, &ann.id, &audit(Some(&acme.id), "user.email.remove")).await.unwrap(),
        "not bob's"
    );
    assert!(!s.remove_user_email(&ann.id, &new_id(), &audit(Some(&acme.id), "user.email.remove")).await.unwrap());
    assert_eq!(s.user_emails(&ann.id).await.unwrap().len(), 2);
    let remove_ev = audit(Some(&acme.id), "user.email.remove");
    assert!(s.remove_user_email(&ann.id, &ann.id, &remove_ev).await.unwrap(), "the old primary's row");
    assert!(audited(&*s, &remove_ev).await);
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), vec![verified_work]);
    assert!(
        !s.remove_user_email(&ann.id, &ann.id, &audit(Some(&acme.id), "user.email.remove")).await.unwrap(),
        "already gone"
    );

    // Removing an address still being verified drops its pending code with it.
    let home = address(&ann, "ann@home.example");
    let home_v = verification(&ann, VerificationPurpose::Email, &home.id);
    s.add_user_email(&home, &home_v, &mail("ann@home.example"), &audit(Some(&acme.id), "user.email.add"))
        .await
        .unwrap();
    assert!(s.remove_user_email(&ann.id, &home.id, &audit(Some(&acme.id), "user.email.remove")).await.unwrap());
    assert_eq!(s.verification(&home_v.id).await.unwrap(), None);
    // And the address is free again.
    let again = address(&bob, "ann@home.example");
    s.add_user_email(
        &again,
        &verification(&bob, VerificationPurpose::Email, &again.id),
        &mail("ann@home.example"),
        &audit(Some(&acme.id), "user.email.add"),
    )
    .await
    .unwrap();
}

async fn sessions_create_activate_rotate_and_revoke(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;

    let sess = Session { ip: None, user_agent: None, ..session(&ann, 1) };
    let v = Verification {
        sealed_token: Some(vec![0x00, 0x09, 0xff]),
        ..verification(&ann, VerificationPurpose::Session, &sess.id)
    };
    let m = mail("ann@example.com");
    let ev = audit(Some(&acme.id), "session.create");
    s.create_session(&sess, &v, Some(&m), &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.session(&sess.id).await.unwrap().as_ref(), Some(&sess), "round-trip (None ip/user agent)");
    assert_eq!(s.session_by_token(&sess.token_hash).await.unwrap().as_ref(), Some(&sess));
    assert_eq!(s.session_by_token(&hash(99)).await.unwrap(), None);
    assert_eq!(s.session(&new_id()).await.unwrap(), None);
    assert_eq!(s.verification(&v.id).await.unwrap().as_ref(), Some(&v), "verification with its sealed token");
    assert_eq!(s.due_mail(NOW, 10).await.unwrap(), vec![m]);

    // Same token hash again: Conflict, with no verification, mail or audit.
    let clash = session(&bob, 1);
    let clash_v = verification(&bob, VerificationPurpose::Session, &clash.id);
    let clash_ev = audit(Some(&acme.id), "session.create");
    assert_conflict(
        s.create_session(&clash, &clash_v, Some(&mail("bob@example.com")), &clash_ev).await,
        "duplicate token hash",
    );
    assert_eq!(s.session(&clash.id).await.unwrap(), None);
    assert_eq!(s.verification(&clash_v.id).await.unwrap(), None);
    assert!(!audited(&*s, &clash_ev).await);
    assert_eq!(s.pending_mail_count().await.unwrap(), 1);

    // Without mail (the code comes from an authenticator app): the session and its
    // verification only.
    let cat = seed_user(&*s, &acme.id, "cat@example.com").await;
    let app_code = session(&cat, 0x3c);
    let app_code_v = verification(&cat, VerificationPurpose::Session, &app_code.id);
    let ev = audit(Some(&acme.id), "session.create");
    s.create_session(&app_code, &app_code_v, None, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.session(&app_code.id).await.unwrap().as_ref(), Some(&app_code));
    assert_eq!(s.verification(&app_code_v.id).await.unwrap().as_ref(), Some(&app_code_v));
    assert_eq!(s.pending_mail_count().await.unwrap(), 1, "no mail queued");

    // A pending session cannot be refreshed.
    let not_yet = audit(Some(&acme.id), "session.refresh");
    assert!(!s.rotate_session_token(&sess.id, &hash(1), &hash(2), NOW + 5, &not_yet).await.unwrap());
    assert!(!audited(&*s, &not_yet).await);

    assert!(
        s.consume_verification(&v.id, NOW + 10, &activate(&sess), &audit(Some(&acme.id), "session.verify"))
            .await
            .unwrap()
    );
    let active =
        Session { state: CredentialState::Active, verified_at: Some(NOW + 10), last_used_at: NOW + 10, ..sess.clone() };
    assert_eq!(s.session(&sess.id).await.unwrap().as_ref(), Some(&active));

    s.touch_session(&sess.id, NOW + 70).await.unwrap();
    let touched = Session { last_used_at: NOW + 70, ..active.clone() };
    assert_eq!(s.session(&sess.id).await.unwrap().as_ref(), Some(&touched));

    // Rotate: the old hash no longer finds it; a second rotation from the old hash loses.
    let rot_ev = audit(Some(&acme.id), "session.refresh");
    assert!(s.rotate_session_token(&sess.id, &hash(1), &hash(2), NOW + 100, &rot_ev).await.unwrap());
    assert!(audited(&*s, &rot_ev).await);
    let rotated = Session { token_hash: hash(2), last_used_at: NOW + 100, ..touched.clone() };
    assert_eq!(s.session_by_token(&hash(1)).await.unwrap(), None, "old token gone");
    assert_eq!(s.session_by_token(&hash(2)).await.unwrap().as_ref(), Some(&rotated));
    let lost = audit(Some(&acme.id), "session.refresh");
    assert!(
        !s.rotate_session_token(&sess.id, &hash(1), &hash(3), NOW + 101, &lost).await.unwrap(),
        "second refresh with the old token"
    );
    assert!(!audited(&*s, &lost).await, "no audit for a lost race");
    assert_eq!(s.session(&sess.id).await.unwrap().as_ref(), Some(&rotated));
    assert!(
        !s.rotate_session_token(&new_id(), &hash(2), &hash(3), NOW + 101, &audit(Some(&acme.id), "session.refresh"))
            .await
            .unwrap()
    );
    // Another session's id with this token: no.
    let (bobs, _) = seed_session(&*s, &bob, 20).await;
    assert!(
        !s.rotate_session_token(&bobs.id, &hash(2), &hash(3), NOW + 101, &audit(Some(&acme.id), "session.refresh"))
            .await
            .unwrap()
    );

    // Newest first, revoked ones included, paged.
    let older = Session { created_at: NOW - 100, ..session(&ann, 5) };
    add_session(&*s, &ann, &older).await;
    let newer = Session { created_at: NOW + 100, ..session(&ann, 6) };
    add_session(&*s, &ann, &newer).await;
    assert!(s.revoke_session(&older.id, NOW + 200, &audit(Some(&acme.id), "session.revoke")).await.unwrap());
    let older_revoked = Session { state: CredentialState::Revoked, revoked_at: Some(NOW + 200), ..older.clone() };
    assert_eq!(
        s.user_sessions(&ann.id, all()).await.unwrap(),
        vec![newer.clone(), rotated.clone(), older_revoked.clone()]
    );
    assert_eq!(s.user_sessions(&ann.id, page(1, 1)).await.unwrap(), vec![rotated.clone()]);
    assert_eq!(s.user_sessions(&bob.id, all()).await.unwrap(), vec![bobs.clone()]);

    // Revoke: once; not twice, no audit then; a revoked session cannot be refreshed.
    let rev_ev = audit(Some(&acme.id), "session.revoke");
    assert!(s.revoke_session(&sess.id, NOW + 300, &rev_ev).await.unwrap());
    assert!(audited(&*s, &rev_ev).await);
    assert_eq!(state_of(&*s, &sess.id).await, (CredentialState::Revoked, Some(NOW + 300)));
    let twice = audit(Some(&acme.id), "session.revoke");
    assert!(!s.revoke_session(&sess.id, NOW + 400, &twice).await.unwrap());
    assert!(!audited(&*s, &twice).await);
    assert_eq!(
        state_of(&*s, &sess.id).await,
        (CredentialState::Revoked, Some(NOW + 300)),
        "first revocation time kept"
    );
    assert!(!s.revoke_session(&new_id(), NOW, &audit(Some(&acme.id), "session.revoke")).await.unwrap());
    assert!(
        !s.rotate_session_token(&sess.id, &hash(2), &hash(3), NOW + 400, &audit(Some(&acme.id), "session.refresh"))
            .await
            .unwrap()
    );

    // revoke_user_sessions: the pending and active ones, counted; always audited.
    let (active2, active2_v) = seed_session(&*s, &ann, 7).await;
    assert!(
        s.consume_verification(&active2_v.id, NOW, &activate(&active2), &audit(Some(&acme.id), "session.verify"))
            .await
            .unwrap()
    );
    let all_ev = audit(Some(&acme.id), "session.revoke_all");
    assert_eq!(s.revoke_user_sessions(&ann.id, NOW + 500, &all_ev).await.unwrap(), 2, "newer (pending) and active2");
    assert!(audited(&*s, &all_ev).await);
    for id in [&newer.id, &active2.id] {
        assert_eq!(state_of(&*s, id).await, (CredentialState::Revoked, Some(NOW + 500)));
    }
    assert_eq!(state_of(&*s, &sess.id).await, (CredentialState::Revoked, Some(NOW + 300)));
    assert_eq!(state_of(&*s, &bobs.id).await, (CredentialState::Pending, None), "other users untouched");
    let none_ev = audit(Some(&acme.id), "session.revoke_all");
    assert_eq!(s.revoke_user_sessions(&ann.id, NOW + 600, &none_ev).await.unwrap(), 0);
    assert!(audited(&*s, &none_ev).await, "audited even when nothing was left to revoke");
}

async fn verifications_count_attempts_and_are_consumed_once(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;

    let v = Verification { attempts: 2, ..verification(&ann, VerificationPurpose::PasswordReset, &ann.id) };
    let m = mail("ann@example.com");
    let ev = audit(Some(&acme.id), "user.reset.request");
    s.create_verification(&v, &m, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.verification(&v.id).await.unwrap().as_ref(), Some(&v));
    assert_eq!(s.due_mail(NOW, 10).await.unwrap(), vec![m]);
    assert_eq!(s.verification(&new_id()).await.unwrap(), None);

    assert_eq!(s.count_verification_attempt(&v.id).await.unwrap(), Some(3));
    assert_eq!(s.count_verification_attempt(&v.id).await.unwrap(), Some(4));
    assert_eq!(s.count_verification_attempt(&new_id()).await.unwrap(), None);
    // Parallel guesses are all counted, each seeing its own count.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = Arc::clone(&s);
            let id = v.id.clone();
            tokio::spawn(async move { s.count_verification_attempt(&id).await })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().unwrap().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (5..=12).collect::<Vec<u32>>());
    assert_eq!(s.verification(&v.id).await.unwrap().unwrap().attempts, 12);

    // Consumed once: the second consume changes nothing and writes no audit.
    let first = VerificationEffect::ResetPassword { user_id: ann.id.clone(), password_hash: "$argon2id$first".into() };
    let ev = audit(Some(&acme.id), "user.reset");
    assert!(s.consume_verification(&v.id, NOW + 10, &first, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(
        s.verification(&v.id).await.unwrap(),
        Some(Verification { attempts: 12, consumed_at: Some(NOW + 10), ..v.clone() })
    );
    let second =
        VerificationEffect::ResetPassword { user_id: ann.id.clone(), password_hash: "$argon2id$second".into() };
    let ev2 = audit(Some(&acme.id), "user.reset");
    assert!(!s.consume_verification(&v.id, NOW + 20, &second, &ev2).await.unwrap());
    assert!(!audited(&*s, &ev2).await);
    let stored = s.user(&acme.id, &ann.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.password_hash.as_deref(), stored.updated_at),
        (Some("$argon2id$first"), NOW + 10),
        "second effect not applied"
    );
    assert_eq!(s.verification(&v.id).await.unwrap().unwrap().consumed_at, Some(NOW + 10));
    assert_eq!(s.count_verification_attempt(&v.id).await.unwrap(), None, "a consumed code takes no more tries");
    assert!(!s.consume_verification(&new_id(), NOW, &second, &audit(Some(&acme.id), "user.reset")).await.unwrap());

    // Racing consumers: exactly one wins.
    let race = verification(&ann, VerificationPurpose::PasswordReset, &ann.id);
    s.create_verification(&race, &mail("ann@example.com"), &audit(Some(&acme.id), "user.reset.request")).await.unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let s = Arc::clone(&s);
            let id = race.id.clone();
            let effect = VerificationEffect::ResetPassword {
                user_id: ann.id.clone(),
                password_hash: format!("$argon2id$racer{i}"),
            };
            tokio::spawn(
                async move { s.consume_verification(&id, NOW + 30, &effect, &audit(None, "user.reset")).await },
            )
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "one consumer wins");
}

async fn verification_effects(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;
    let now = NOW + 1000;

    // ActivateSession: the session becomes active, the sealed token is erased, and the user's
    // primary address (only that one, only that user's) counts as verified.
    let alias = address(&ann, "alias@example.com");
    s.add_user_email(
        &alias,
        &verification(&ann, VerificationPurpose::Email, &alias.id),
        &mail("alias@example.com"),
        &audit(Some(&acme.id), "user.email.add"),
    )
    .await
    .unwrap();
    let (sess, sess_v) = seed_session(&*s, &ann, 1).await;
    let ev = audit(Some(&acme.id), "session.verify");
    assert!(s.consume_verification(&sess_v.id, now, &activate(&sess), &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(
        s.session(&sess.id).await.unwrap(),
        Some(Session { state: CredentialState::Active, verified_at: Some(now), last_used_at: now, ..sess.clone() })
    );
    assert_eq!(
        s.verification(&sess_v.id).await.unwrap(),
        Some(Verification { consumed_at: Some(now), sealed_token: None, ..sess_v.clone() }),
        "consumed, sealed token erased"
    );
    assert_eq!(
        s.user_emails(&ann.id).await.unwrap(),
        vec![UserEmail { verified_at: Some(now), ..UserEmail::primary_of(&ann) }, alias.clone()],
        "primary verified, alias not"
    );
    assert_eq!(s.user_emails(&bob.id).await.unwrap(), vec![UserEmail::primary_of(&bob)]);
    // A later session keeps the first verification time.
    let (sess2, sess2_v) = seed_session(&*s, &ann, 2).await;
    assert!(
        s.consume_verification(&sess2_v.id, now + 5, &activate(&sess2), &audit(Some(&acme.id), "session.verify"))
            .await
            .unwrap()
    );
    assert_eq!(s.user_emails(&ann.id).await.unwrap()[0].verified_at, Some(now));
    // A session revoked while pending stays revoked.
    let (gone, gone_v) = seed_session(&*s, &bob, 3).await;
    assert!(s.revoke_session(&gone.id, now, &audit(Some(&acme.id), "session.revoke")).await.unwrap());
    assert!(
        s.consume_verification(&gone_v.id, now + 1, &activate(&gone), &audit(Some(&acme.id), "session.verify"))
            .await
            .unwrap()
    );
    assert_eq!(state_of(&*s, &gone.id).await, (CredentialState::Revoked, Some(now)));

    // ActivateApiKey: pending → active; a revoked key stays revoked.
    let (key, key_v) = seed_api_key(&*s, &ann, "key-a").await;
    let ev = audit(Some(&acme.id), "api_key.verify");
    assert!(
        s.consume_verification(&key_v.id, now, &VerificationEffect::ActivateApiKey { key_id: key.id.clone() }, &ev)
            .await
            .unwrap()
    );
    assert!(audited(&*s, &ev).await);
    assert_eq!(
        s.api_key(&acme.id, &key.id).await.unwrap(),
        Some(ApiKey { state: CredentialState::Active, ..key.clone() })
    );
    let (dead, dead_v) = seed_api_key(&*s, &ann, "key-b").await;
    assert!(s.revoke_api_key(&dead.id, now, &audit(Some(&acme.id), "api_key.revoke")).await.unwrap());
    assert!(
        s.consume_verification(
            &dead_v.id,
            now,
            &VerificationEffect::ActivateApiKey { key_id: dead.id.clone() },
            &audit(Some(&acme.id), "api_key.verify")
        )
        .await
        .unwrap()
    );
    assert_eq!(s.api_key(&acme.id, &dead.id).await.unwrap().unwrap().state, CredentialState::Revoked);

    // VerifyEmail.
    let work = address(&bob, "bob@work.example");
    let work_v = verification(&bob, VerificationPurpose::Email, &work.id);
    s.add_user_email(&work, &work_v, &mail("bob@work.example"), &audit(Some(&acme.id), "user.email.add"))
        .await
        .unwrap();
    let ev = audit(Some(&acme.id), "user.email.verify");
    assert!(
        s.consume_verification(&work_v.id, now, &VerificationEffect::VerifyEmail { email_id: work.id.clone() }, &ev)
            .await
            .unwrap()
    );
    assert!(audited(&*s, &ev).await);
    let emails = s.user_emails(&bob.id).await.unwrap();
    assert_eq!(emails.iter().find(|e| e.id == work.id), Some(&UserEmail { verified_at: Some(now), ..work.clone() }));

    // ResetPassword: new hash, lockout lifted, updated_at = now, every live session of the
    // user revoked (an old revocation keeps its time); other users untouched.
    s.set_login_failures(&ann.id, 9, Some(now + 900), &audit(Some(&acme.id), "user.login")).await.unwrap();
    let (pending, _) = seed_session(&*s, &ann, 4).await;
    let (bobs, _) = seed_session(&*s, &bob, 5).await;
    let reset_v = verification(&ann, VerificationPurpose::PasswordReset, &ann.id);
    s.create_verification(&reset_v, &mail("ann@example.com"), &audit(Some(&acme.id), "user.reset.request"))
        .await
        .unwrap();
    let effect =
        VerificationEffect::ResetPassword { user_id: ann.id.clone(), password_hash: "$argon2id$v=19$reset".into() };
    let ev = audit(Some(&acme.id), "user.reset");
    assert!(s.consume_verification(&reset_v.id, now + 50, &effect, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(
        s.user(&acme.id, &ann.id).await.unwrap(),
        Some(User {
            password_hash: Some("$argon2id$v=19$reset".into()),
            failed_logins: 0,
            locked_until: None,
            updated_at: now + 50,
            ..ann.clone()
        })
    );
    for id in [&sess.id, &sess2.id, &pending.id] {
        assert_eq!(state_of(&*s, id).await, (CredentialState::Revoked, Some(now + 50)), "ann's sessions end");
    }
    assert_eq!(state_of(&*s, &bobs.id).await, (CredentialState::Pending, None));
    assert_eq!(s.user(&acme.id, &bob.id).await.unwrap().as_ref(), Some(&bob));
    assert_eq!(
        s.api_key(&acme.id, &key.id).await.unwrap().unwrap().state,
        CredentialState::Revoked,
        "a reset revokes the user's API keys too"
    );
}

async fn api_keys_list_lookup_and_revoke(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;
    let carol = seed_user(&*s, &other.id, "carol@example.com").await;

    let mut created = Vec::new();
    for (i, (u, key)) in
        [(&ann, "k-ann-1"), (&bob, "k-bob-1"), (&ann, "k-ann-2"), (&carol, "k-carol")].into_iter().enumerate()
    {
        let k = ApiKey { created_at: NOW + i64::try_from(i).unwrap(), ..api_key(u, key) };
        let v = verification(u, VerificationPurpose::ApiKey, &k.id);
        let ev = audit(Some(&u.org_id), "api_key.create");
        s.create_api_key(&k, &v, &mail(u.email.as_str()), &ev).await.unwrap();
        assert!(audited(&*s, &ev).await);
        assert_eq!(s.verification(&v.id).await.unwrap().as_ref(), Some(&v));
        created.push(k);
    }
    let [ann1, bob1, ann2, carols] = <[ApiKey; 4]>::try_from(created).unwrap();
    let bare = ApiKey { expires_at: None, roles: vec![], ..api_key(&bob, "k-bare") };
    let bare = ApiKey { created_at: NOW - 10, ..bare };
    s.create_api_key(
        &bare,
        &verification(&bob, VerificationPurpose::ApiKey, &bare.id),
        &mail("bob@example.com"),
        &audit(Some(&acme.id), "api_key.create"),
    )
    .await
    .unwrap();

    assert_eq!(s.api_key(&acme.id, &ann1.id).await.unwrap().as_ref(), Some(&ann1), "round-trip");
    assert_eq!(s.api_key(&acme.id, &bare.id).await.unwrap().as_ref(), Some(&bare), "None/empty round-trip");
    assert_eq!(s.api_key(&other.id, &ann1.id).await.unwrap(), None, "by id is scoped to the org");
    assert_eq!(s.api_key(&acme.id, &new_id()).await.unwrap(), None);
    assert_eq!(s.api_key_by_key("k-carol").await.unwrap().as_ref(), Some(&carols));
    assert_eq!(s.api_key_by_key("k-ann-2").await.unwrap().as_ref(), Some(&ann2));
    assert_eq!(s.api_key_by_key("K-ANN-2").await.unwrap(), None, "exact match");
    assert_eq!(s.api_key_by_key("k-nope").await.unwrap(), None);

    // Newest first, per organisation or per user, paged.
    assert_eq!(
        s.api_keys(&acme.id, None, all()).await.unwrap(),
        vec![ann2.clone(), bob1.clone(), ann1.clone(), bare.clone()]
    );
    assert_eq!(s.api_keys(&acme.id, Some(&ann.id), all()).await.unwrap(), vec![ann2.clone(), ann1.clone()]);
    assert_eq!(s.api_keys(&acme.id, Some(&bob.id), all()).await.unwrap(), vec![bob1.clone(), bare.clone()]);
    assert_eq!(s.api_keys(&acme.id, None, page(2, 1)).await.unwrap(), vec![bob1.clone(), ann1.clone()]);
    assert_eq!(s.api_keys(&other.id, None, all()).await.unwrap(), vec![carols.clone()]);
    assert!(s.api_keys(&other.id, Some(&ann.id), all()).await.unwrap().is_empty(), "a user of another org");

    // Searched within one user's keys: a part of the name in any case, or the start of the key;
    // LIKE's wildcards are plain characters.
    let search = |user: &User, q: &'static str, p: Page| {
        let (s, org, user) = (s.clone(), acme.id.clone(), user.id.clone());
        async move { s.search_user_api_keys(&org, &user, q, p).await.unwrap() }
    };
    assert_eq!(search(&ann, "KEY K-ANN", all()).await, vec![ann2.clone(), ann1.clone()]);
    assert_eq!(search(&ann, "ann-2", all()).await, vec![ann2.clone()]);
    assert_eq!(search(&ann, "KEY K-ANN", page(1, 1)).await, vec![ann1.clone()], "paged");
    assert!(search(&ann, "k-bob", all()).await.is_empty(), "another user's key");
    assert!(search(&ann, "k-%", all()).await.is_empty() && search(&ann, "k_ann", all()).await.is_empty());
    assert_eq!(search(&bob, "k-bare", all()).await, vec![bare.clone()]);
    assert!(s.search_user_api_keys(&other.id, &ann.id, "k", all()).await.unwrap().is_empty(), "another org");

    // Duplicate public key: Conflict, no verification, no audit.
    let dup = api_key(&bob, "k-ann-1");
    let dup_v = verification(&bob, VerificationPurpose::ApiKey, &dup.id);
    let dup_ev = audit(Some(&acme.id), "api_key.create");
    assert_conflict(s.create_api_key(&dup, &dup_v, &mail("bob@example.com"), &dup_ev).await, "duplicate api_key");
    assert_eq!(s.api_key(&acme.id, &dup.id).await.unwrap(), None);
    assert_eq!(s.verification(&dup_v.id).await.unwrap(), None);
    assert!(!audited(&*s, &dup_ev).await);
    assert_eq!(s.pending_mail_count().await.unwrap(), 5);

    s.touch_api_key(&ann1.id, NOW + 60).await.unwrap();
    let ann1 = ApiKey { last_used_at: Some(NOW + 60), ..ann1 };
    assert_eq!(s.api_key_by_key("k-ann-1").await.unwrap().as_ref(), Some(&ann1));

    // Revoke: pending or active only; once.
    let ev = audit(Some(&acme.id), "api_key.revoke");
    assert!(s.revoke_api_key(&ann1.id, NOW + 100, &ev).await.unwrap(), "a pending key can be revoked");
    assert!(audited(&*s, &ev).await);
    let revoked = ApiKey { state: CredentialState::Revoked, revoked_at: Some(NOW + 100), ..ann1.clone() };
    assert_eq!(s.api_key(&acme.id, &ann1.id).await.unwrap().as_ref(), Some(&revoked));
    let twice = audit(Some(&acme.id), "api_key.revoke");
    assert!(!s.revoke_api_key(&ann1.id, NOW + 200, &twice).await.unwrap());
    assert!(!audited(&*s, &twice).await);
    assert_eq!(s.api_key(&acme.id, &ann1.id).await.unwrap().as_ref(), Some(&revoked), "first revocation time kept");
    assert!(!s.revoke_api_key(&new_id(), NOW, &audit(Some(&acme.id), "api_key.revoke")).await.unwrap());
    assert_eq!(s.api_key(&acme.id, &ann2.id).await.unwrap().as_ref(), Some(&ann2), "other keys untouched");
}

async fn mail_queue_due_failed_sent_and_counted(s: Arc<dyn Store>) {
    assert_eq!(s.pending_mail_count().await.unwrap(), 0);
    assert!(s.due_mail(NOW, 10).await.unwrap().is_empty());
    let m = |created_at: UnixTime, next_attempt_at: UnixTime| QueuedMail {
        created_at,
        next_attempt_at,
        ..mail("ann@example.com")
    };
    let a = m(NOW - 30, NOW - 30);
    let b = m(NOW - 20, NOW);
    let c = m(NOW - 40, NOW - 10);
    let later = m(NOW - 50, NOW + 60);
    let d = QueuedMail {
        sealed_body: vec![],
        last_error: Some("earlier «failure»".into()),
        attempts: 2,
        ..m(NOW - 10, NOW - 5)
    };
    for x in [&a, &b, &c, &later, &d] {
        s.enqueue_mail(x).await.unwrap();
    }
    assert_eq!(s.pending_mail_count().await.unwrap(), 5);
    assert_eq!(
        s.due_mail(NOW, 10).await.unwrap(),
        vec![c.clone(), a.clone(), b.clone(), d.clone()],
        "due (next_attempt_at <= now), oldest first, whole records"
    );
    assert_eq!(s.due_mail(NOW, 2).await.unwrap(), vec![c.clone(), a.clone()], "at most max");
    assert_eq!(s.due_mail(NOW - 11, 10).await.unwrap(), vec![a.clone()], "c is due at NOW - 10 only");
    assert_eq!(
        s.due_mail(NOW + 60, 10).await.unwrap(),
        vec![later.clone(), c.clone(), a.clone(), b.clone(), d.clone()]
    );
    assert_conflict(s.enqueue_mail(&a).await, "duplicate mail id");

    // A failure is retried later, never dropped.
    s.mail_failed(&c.id, 1, NOW + 30, "421 try again «later»").await.unwrap();
    assert_eq!(s.due_mail(NOW, 10).await.unwrap(), vec![a.clone(), b.clone(), d.clone()]);
    let failed_c = QueuedMail {
        attempts: 1,
        next_attempt_at: NOW + 30,
        last_error: Some("421 try again «later»".into()),
        ..c.clone()
    };
    assert_eq!(s.due_mail(NOW + 30, 10).await.unwrap(), vec![failed_c, a.clone(), b.clone(), d.clone()]);
    assert_eq!(s.pending_mail_count().await.unwrap(), 5, "failed mail is still pending");

    // Sent: leaves the queue, body erased.
    s.mail_sent(&a.id, NOW + 1).await.unwrap();
    assert_eq!(s.due_mail(NOW, 10).await.unwrap(), vec![b.clone(), d.clone()]);
    assert_eq!(s.pending_mail_count().await.unwrap(), 4);
    assert_eq!(raw_mail(&a.id).await, (Some(NOW + 1), vec![]), "sent_at set and body erased");
    assert_eq!(raw_mail(&b.id).await, (None, b.sealed_body.clone()), "unsent bodies kept");
    // A late failure report for a sent mail does not put it back.
    s.mail_failed(&a.id, 5, NOW, "late").await.unwrap();
    assert_eq!(s.due_mail(NOW + 60, 10).await.unwrap().iter().filter(|x| x.id == a.id).count(), 0);
    for x in [&b, &c, &later, &d] {
        s.mail_sent(&x.id, NOW + 2).await.unwrap();
    }
    assert_eq!(s.pending_mail_count().await.unwrap(), 0);
    assert!(s.due_mail(i64::MAX, 10).await.unwrap().is_empty());
}

async fn purges_remove_only_ended_rows(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let cut = NOW + 1000;

    let mk = |token: u8, expires_at: UnixTime| Session { expires_at, ..session(&ann, token) };
    let expired = mk(1, cut - 1);
    let expires_at_cut = mk(2, cut);
    let live = mk(3, cut + 500);
    let revoked_early = mk(4, cut + 500);
    let revoked_at_cut = mk(5, cut + 500);
    let revoked_late = mk(6, cut + 500);
    let mut verifications = Vec::new();
    for x in [&expired, &expires_at_cut, &live, &revoked_early, &revoked_at_cut, &revoked_late] {
        verifications.push(add_session(&*s, &ann, x).await);
    }
    for (x, at) in [(&revoked_early, cut - 1), (&revoked_at_cut, cut), (&revoked_late, cut + 1)] {
        assert!(s.revoke_session(&x.id, at, &audit(Some(&acme.id), "session.revoke")).await.unwrap());
    }
    assert_eq!(s.purge_sessions(cut).await.unwrap(), 2, "expired before, or revoked before");
    for (x, kept) in [
        (&expired, false),
        (&expires_at_cut, true),
        (&live, true),
        (&revoked_early, false),
        (&revoked_at_cut, true),
        (&revoked_late, true),
    ] {
        assert_eq!(s.session(&x.id).await.unwrap().is_some(), kept, "session expiring {} kept: {kept}", x.expires_at);
    }
    assert_eq!(s.purge_sessions(cut).await.unwrap(), 0);

    // Verifications: by expiry only, consumed or not.
    let v_old = Verification { expires_at: cut - 1, ..verification(&ann, VerificationPurpose::PasswordReset, &ann.id) };
    let v_at = Verification { expires_at: cut, ..verification(&ann, VerificationPurpose::PasswordReset, &ann.id) };
    for v in [&v_old, &v_at] {
        s.create_verification(v, &mail("ann@example.com"), &audit(Some(&acme.id), "user.reset.request")).await.unwrap();
    }
    // The session verifications expire at NOW + 600 < cut.
    let n = s.purge_verifications(cut).await.unwrap();
    assert_eq!(n, u64::try_from(verifications.len()).unwrap() + 1, "session codes and v_old");
    assert_eq!(s.verification(&v_old.id).await.unwrap(), None);
    assert!(s.verification(&v_at.id).await.unwrap().is_some(), "expires_at == before is kept");
    for v in &verifications {
        assert_eq!(s.verification(&v.id).await.unwrap(), None);
    }
    assert_eq!(s.purge_verifications(cut).await.unwrap(), 0);

    // API keys: revoked, expired or still pending before the cut go; active ones stay.
    let mk_key = |name: &str, state: CredentialState, created_at: UnixTime, expires_at: Option<UnixTime>| ApiKey {
        state,
        created_at,
        expires_at,
        revoked_at: (state == CredentialState::Revoked).then_some(cut - 1),
        ..api_key(&ann, name)
    };
    let keys = [
        (mk_key("pck_revoked", CredentialState::Revoked, NOW, None), false),
        (mk_key("pck_expired", CredentialState::Active, NOW, Some(cut - 1)), false),
        (mk_key("pck_pending_old", CredentialState::Pending, cut - 1, None), false),
        (mk_key("pck_pending_new", CredentialState::Pending, cut, None), true),
        (mk_key("pck_active", CredentialState::Active, NOW, None), true),
        (mk_key("pck_active_later", CredentialState::Active, NOW, Some(cut)), true),
    ];
    for (k, _) in &keys {
        let v = verification(&ann, VerificationPurpose::ApiKey, &k.id);
        s.create_api_key(k, &v, &mail("ann@example.com"), &audit(Some(&acme.id), "api_key.create")).await.unwrap();
    }
    assert_eq!(s.purge_api_keys(cut).await.unwrap(), 3);
    for (k, kept) in &keys {
        assert_eq!(s.api_key(&acme.id, &k.id).await.unwrap().is_some(), *kept, "{}", k.key);
    }

    // Mail: only delivered records before the cut; unsent mail is never deleted.
    let old_sent = mail("a@example.com");
    let new_sent = mail("b@example.com");
    let unsent = QueuedMail { created_at: NOW - 86_400, ..mail("c@example.com") };
    for m in [&old_sent, &new_sent, &unsent] {
        s.enqueue_mail(m).await.unwrap();
    }
    s.mail_sent(&old_sent.id, cut - 1).await.unwrap();
    s.mail_sent(&new_sent.id, cut).await.unwrap();
    let before = s.pending_mail_count().await.unwrap();
    assert_eq!(s.purge_sent_mail(cut).await.unwrap(), 1, "only the one delivered before the cut");
    assert_eq!(s.pending_mail_count().await.unwrap(), before, "unsent mail stays");
    assert_eq!(s.purge_sent_mail(cut).await.unwrap(), 0);
}

/// Like `every_mutation_rolls_back_with_its_audit_row`, for the Auth API's audited methods:
/// when the audit insert fails (reused id), nothing of the change may remain.
async fn auth_api_mutations_roll_back_with_their_audit_row(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let used = audit(Some(&acme.id), "used");
    s.append_audit(&used).await.unwrap();
    let reuse = |action: &str| AuditEvent { action: action.into(), ..used.clone() };
    let ok = |action: &str| audit(Some(&acme.id), action);

    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let (active, active_v) = seed_session(&*s, &ann, 1).await;
    assert!(s.consume_verification(&active_v.id, NOW, &activate(&active), &ok("session.verify")).await.unwrap());
    let active = s.session(&active.id).await.unwrap().unwrap();
    let (pending, pending_v) = seed_session(&*s, &ann, 2).await;
    let (key, key_v) = seed_api_key(&*s, &ann, "k-1").await;
    let alias = address(&ann, "alias@example.com");
    let alias_v = verification(&ann, VerificationPurpose::Email, &alias.id);
    s.add_user_email(&alias, &alias_v, &mail("alias@example.com"), &ok("user.email.add")).await.unwrap();
    let ann = s.user(&acme.id, &ann.id).await.unwrap().unwrap();
    let emails = s.user_emails(&ann.id).await.unwrap();
    let mails = s.pending_mail_count().await.unwrap();
    let log_len = audit_len(&*s).await;

    // update_user (with end_sessions)
    let changed = User { name: Some("changed".into()), updated_at: ann.updated_at + 1, ..ann.clone() };
    assert_conflict(s.update_user(&changed, ann.updated_at, true, &reuse("user.update")).await, "update_user");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann));
    assert_eq!(s.session(&active.id).await.unwrap().as_ref(), Some(&active), "sessions not ended");

    // set_login_failures
    assert_conflict(s.set_login_failures(&ann.id, 4, Some(NOW + 60), &reuse("user.login")).await, "set_login_failures");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann), "counter unchanged");

    // delete_user
    assert_conflict(s.delete_user(&acme.id, &ann.id, &reuse("user.delete")).await, "delete_user");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann));
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), emails);
    assert_eq!(s.session(&pending.id).await.unwrap().as_ref(), Some(&pending));
    assert_eq!(s.api_key(&acme.id, &key.id).await.unwrap().as_ref(), Some(&key));
    assert!(s.verification(&key_v.id).await.unwrap().is_some());

    // add_user_email
    let home = address(&ann, "home@example.com");
    let home_v = verification(&ann, VerificationPurpose::Email, &home.id);
    assert_conflict(
        s.add_user_email(&home, &home_v, &mail("home@example.com"), &reuse("user.email.add")).await,
        "add_user_email",
    );
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), emails);
    assert_eq!(s.verification(&home_v.id).await.unwrap(), None);

    // consume_verification (each kind of effect)
    assert_conflict(
        s.consume_verification(
            &alias_v.id,
            NOW,
            &VerificationEffect::VerifyEmail { email_id: alias.id.clone() },
            &reuse("v"),
        )
        .await,
        "verify email",
    );
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), emails, "address not verified");
    assert_eq!(s.verification(&alias_v.id).await.unwrap().as_ref(), Some(&alias_v), "not consumed");
    assert_conflict(
        s.consume_verification(&pending_v.id, NOW, &activate(&pending), &reuse("v")).await,
        "activate session",
    );
    assert_eq!(s.session(&pending.id).await.unwrap().as_ref(), Some(&pending));
    assert_eq!(s.verification(&pending_v.id).await.unwrap().as_ref(), Some(&pending_v), "sealed token kept");
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), emails);
    assert_conflict(
        s.consume_verification(
            &key_v.id,
            NOW,
            &VerificationEffect::ActivateApiKey { key_id: key.id.clone() },
            &reuse("v"),
        )
        .await,
        "activate key",
    );
    assert_eq!(s.api_key(&acme.id, &key.id).await.unwrap().as_ref(), Some(&key));
    let reset_v = verification(&ann, VerificationPurpose::PasswordReset, &ann.id);
    assert_conflict(
        s.create_verification(&reset_v, &mail("ann@example.com"), &reuse("reset.request")).await,
        "create_verification",
    );
    assert_eq!(s.verification(&reset_v.id).await.unwrap(), None);
    s.create_verification(&reset_v, &mail("ann@example.com"), &ok("reset.request")).await.unwrap();
    let reset = VerificationEffect::ResetPassword { user_id: ann.id.clone(), password_hash: "$argon2id$x".into() };
    assert_conflict(s.consume_verification(&reset_v.id, NOW + 5, &reset, &reuse("reset")).await, "reset password");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann), "password unchanged");
    assert_eq!(s.session(&active.id).await.unwrap().as_ref(), Some(&active), "sessions not ended");
    assert_eq!(s.verification(&reset_v.id).await.unwrap().unwrap().consumed_at, None);

    // set_primary_email (the alias verified for real first), remove_user_email
    assert!(
        s.consume_verification(
            &alias_v.id,
            NOW,
            &VerificationEffect::VerifyEmail { email_id: alias.id.clone() },
            &ok("v")
        )
        .await
        .unwrap()
    );
    assert_conflict(s.set_primary_email(&ann.id, &alias.id, NOW + 5, &reuse("primary")).await, "set_primary_email");
    assert_eq!(s.user(&acme.id, &ann.id).await.unwrap().as_ref(), Some(&ann));
    let emails = s.user_emails(&ann.id).await.unwrap();
    assert_conflict(s.remove_user_email(&ann.id, &alias.id, &reuse("remove")).await, "remove_user_email");
    assert_eq!(s.user_emails(&ann.id).await.unwrap(), emails);

    // Sessions: create, rotate, revoke one, revoke all.
    let new_sess = session(&ann, 3);
    let new_v = verification(&ann, VerificationPurpose::Session, &new_sess.id);
    assert_conflict(
        s.create_session(&new_sess, &new_v, Some(&mail("ann@example.com")), &reuse("session.create")).await,
        "create_session",
    );
    assert_eq!(s.session(&new_sess.id).await.unwrap(), None);
    assert_eq!(s.verification(&new_v.id).await.unwrap(), None);
    assert_conflict(s.rotate_session_token(&active.id, &hash(1), &hash(9), NOW + 5, &reuse("refresh")).await, "rotate");
    assert_eq!(s.session_by_token(&hash(1)).await.unwrap().as_ref(), Some(&active));
    assert_conflict(s.revoke_session(&active.id, NOW + 5, &reuse("revoke")).await, "revoke_session");
    assert_conflict(s.revoke_user_sessions(&ann.id, NOW + 5, &reuse("revoke_all")).await, "revoke_user_sessions");
    assert_eq!(s.session(&active.id).await.unwrap().as_ref(), Some(&active));
    assert_eq!(s.session(&pending.id).await.unwrap().as_ref(), Some(&pending));

    // API keys.
    let k2 = api_key(&ann, "k-2");
    let k2_v = verification(&ann, VerificationPurpose::ApiKey, &k2.id);
    assert_conflict(
        s.create_api_key(&k2, &k2_v, &mail("ann@example.com"), &reuse("api_key.create")).await,
        "create_api_key",
    );
    assert_eq!(s.api_key_by_key("k-2").await.unwrap(), None);
    assert_eq!(s.verification(&k2_v.id).await.unwrap(), None);
    assert_conflict(s.revoke_api_key(&key.id, NOW + 5, &reuse("api_key.revoke")).await, "revoke_api_key");
    assert_eq!(s.api_key(&acme.id, &key.id).await.unwrap().as_ref(), Some(&key));

    // No mail was queued by a refused call; the log holds the two successful writes only.
    assert_eq!(s.pending_mail_count().await.unwrap(), mails + 1, "only the successful create_verification's mail");
    let log = s.audit_events(None, all()).await.unwrap();
    assert_eq!(log.iter().filter(|e| e.id == used.id).collect::<Vec<_>>(), vec![&used]);
    assert_eq!(log.len(), log_len + 2, "create_verification and the email verification only");
}

async fn audit_search_matches_every_criterion(s: Arc<dyn Store>) {
    let acme = new_id();
    let other = new_id();
    let mut written = Vec::new();
    for (i, (org, action, actor, outcome)) in [
        (&acme, "session.login", "u1", "success"),
        (&acme, "session.login", "u2", "failure"),
        (&acme, "session.verify", "u1", "success"),
        (&acme, "sessionXlogin", "u1", "success"),
        (&acme, "api_key.create", "u1", "success"),
        (&other, "session.login", "u1", "success"),
    ]
    .into_iter()
    .enumerate()
    {
        let ev = AuditEvent {
            at: NOW + i64::try_from(i).unwrap(),
            actor: actor.into(),
            outcome: outcome.into(),
            target: format!("t{i}"),
            ..audit(Some(org), action)
        };
        s.append_audit(&ev).await.unwrap();
        written.push(ev);
    }
    let find = |f: AuditFilter| {
        let s = s.clone();
        let acme = acme.clone();
        async move {
            s.search_audit_events(&acme, &f, all()).await.unwrap().into_iter().map(|e| e.target).collect::<Vec<_>>()
        }
    };
    let prefix = |p: &str| AuditFilter { action_prefix: Some(p.into()), ..Default::default() };
    assert_eq!(
        find(AuditFilter::default()).await,
        ["t4", "t3", "t2", "t1", "t0"],
        "only the organisation's, newest first"
    );
    assert_eq!(find(prefix("session.")).await, ["t2", "t1", "t0"], "'.' and '_' in a prefix are literal");
    assert_eq!(find(prefix("session.login")).await, ["t1", "t0"]);
    assert_eq!(find(prefix("session%")).await, Vec::<String>::new(), "'%' is literal");
    assert_eq!(find(AuditFilter { actor: Some("u1".into()), ..prefix("session") }).await, ["t3", "t2", "t0"]);
    assert_eq!(find(AuditFilter { outcome: Some("failure".into()), ..Default::default() }).await, ["t1"]);
    assert_eq!(find(AuditFilter { target: Some("t4".into()), ..Default::default() }).await, ["t4"]);
    assert_eq!(
        find(AuditFilter { since: Some(NOW + 1), until: Some(NOW + 3), ..Default::default() }).await,
        ["t2", "t1"],
        "since inclusive, until exclusive"
    );
    assert_eq!(
        s.search_audit_events(&acme, &AuditFilter::default(), page(2, 1)).await.unwrap(),
        vec![written[3].clone(), written[2].clone()]
    );
}

async fn login_failures_count_atomically_and_lock_once(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let fail = |now: UnixTime| {
        let s = s.clone();
        let id = ann.id.clone();
        let org = acme.id.clone();
        async move { s.record_login_failure(&id, now, 5, now + 900, &audit(Some(&org), "session.login")).await.unwrap() }
    };
    // Eight parallel failures are eight, not one: exactly one of them reached the threshold.
    let results = futures_join_all((0..8).map(|_| fail(NOW))).await;
    let mut counts: Vec<u32> = results.iter().map(|r| r.unwrap().0).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=8).collect::<Vec<_>>(), "every failure counted once");
    assert!(results.iter().all(|r| match r.unwrap() {
        (n, locked) if n < 5 => locked.is_none(),
        (_, locked) => locked == Some(NOW + 900),
    }));
    let u = s.user(&acme.id, &ann.id).await.unwrap().unwrap();
    assert_eq!((u.failed_logins, u.locked_until), (8, Some(NOW + 900)));
    assert_eq!(fail(NOW + 10).await, Some((9, Some(NOW + 900))), "a running lock is kept, not extended");
    assert_eq!(fail(NOW + 900).await, Some((1, None)), "an ended lock starts a new count");
    assert_eq!(
        s.record_login_failure(&new_id(), NOW, 5, NOW + 900, &audit(Some(&acme.id), "session.login")).await.unwrap(),
        None
    );
}

/// `join_all` without a futures dependency: spawn each and await them in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn cancelled_verifications_are_consumed_for_one_user_and_purpose(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let bob = seed_user(&*s, &acme.id, "bob@example.com").await;
    let reset = |u: &User| verification(u, VerificationPurpose::PasswordReset, &u.id);
    let (a1, a2, b1) = (reset(&ann), reset(&ann), reset(&bob));
    let a_email = verification(&ann, VerificationPurpose::Email, &ann.id);
    for v in [&a1, &a2, &b1, &a_email] {
        s.create_verification(v, &mail("x@example.com"), &audit(Some(&acme.id), "v")).await.unwrap();
    }
    let done = |v: &Verification| {
        let s = s.clone();
        let id = v.id.clone();
        async move { s.verification(&id).await.unwrap().unwrap().consumed_at }
    };
    assert_eq!(s.cancel_verifications(&ann.id, VerificationPurpose::PasswordReset, NOW + 5).await.unwrap(), 2);
    assert_eq!((done(&a1).await, done(&a2).await), (Some(NOW + 5), Some(NOW + 5)));
    assert_eq!(done(&b1).await, None, "other users' codes are untouched");
    assert_eq!(done(&a_email).await, None, "other purposes are untouched");
    assert_eq!(s.count_verification_attempt(&a1.id).await.unwrap(), None, "a cancelled code takes no more tries");
    assert_eq!(s.cancel_verifications(&ann.id, VerificationPurpose::PasswordReset, NOW + 6).await.unwrap(), 0);
}

// ------------------------------------------------------------------------- PKI: helpers --

const DAY: i64 = 86_400;

/// An issuing CA row certificates can name as their issuer.
async fn seed_issuer(s: &dyn Store, id: &str) -> CaCertificate {
    let ca = ca_cert(id, CaKind::Issuing, NOW - 100);
    s.insert_ca_certificates(std::slice::from_ref(&ca), &audit(None, "ca.insert")).await.unwrap();
    ca
}

async fn seed_app(s: &dyn Store, org: &Organisation, app: &str) -> Application {
    let a = full_app(org, app);
    s.create_application(&a, &audit(Some(&org.id), "application.create")).await.unwrap();
    a
}

/// An active certificate of `app` with lowercase-hex `serial`; its fingerprint and SPKI hash
/// are derived from the serial (distinct per serial).
fn issued(
    app: &Application,
    issuer_id: &str,
    serial: &str,
    cert_type: CertificateType,
    created_at: UnixTime,
    not_after: UnixTime,
) -> IssuedCertificate {
    IssuedCertificate {
        id: new_id(),
        org_id: app.org_id.clone(),
        app_id: app.id.clone(),
        client_id: app.client_id.clone(),
        cert_type,
        serial: serial.to_owned(),
        issuer_id: issuer_id.to_owned(),
        subject: format!("CN={}, O=Acme «ü»", app.client_id.as_str()),
        sans: vec![format!("DNS:{serial}.acme.example"), "URI:spiffe://acme/app?x=\"1\"".into()],
        key_type: "EC P-256".into(),
        spki_sha256: format!("{serial:5>64}"),
        fingerprint: format!("{serial:f>64}"),
        certificate_pem: format!("-----BEGIN CERTIFICATE-----\nMIIB{serial}\n-----END CERTIFICATE-----\n"),
        not_before: created_at - 60,
        not_after,
        revoked_at: None,
        revocation_reason: None,
        renewed_from: None,
        expiry_notified_at: None,
        created_by: "admin@acme.example".into(),
        created_at,
    }
}

async fn add_cert(s: &dyn Store, c: &IssuedCertificate) {
    s.insert_certificate(c, &audit(Some(&c.org_id), "certificate.issue")).await.unwrap();
}

fn at(now: UnixTime) -> CertificateFilter {
    CertificateFilter { now, ..CertificateFilter::default() }
}

/// The filter's meaning, in Rust: what `certificates` must return, newest first.
fn expected(certs: &[IssuedCertificate], org_id: &str, f: &CertificateFilter) -> Vec<IssuedCertificate> {
    let mut out: Vec<IssuedCertificate> = certs
        .iter()
        .filter(|c| c.org_id == org_id)
        .filter(|c| f.app_id.as_ref().is_none_or(|a| &c.app_id == a))
        .filter(|c| f.cert_type.is_none_or(|t| c.cert_type == t))
        .filter(|c| f.status.is_none_or(|st| c.status(f.now) == st))
        .filter(|c| f.serial.as_ref().is_none_or(|x| &c.serial == x))
        .filter(|c| f.fingerprint.as_ref().is_none_or(|x| &c.fingerprint == x))
        .filter(|c| f.spki_sha256.as_ref().is_none_or(|x| &c.spki_sha256 == x))
        .filter(|c| f.expires_before.is_none_or(|t| c.not_after < t))
        .cloned()
        .collect();
    out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    out
}

fn serials(certs: &[IssuedCertificate]) -> Vec<&str> {
    certs.iter().map(|c| c.serial.as_str()).collect()
}

/// Unsent mail addressed to `to`.
async fn queued_to(s: &dyn Store, to: &str) -> Vec<QueuedMail> {
    s.due_mail(i64::MAX, 500).await.unwrap().into_iter().filter(|m| m.to == to).collect()
}

// --------------------------------------------------------------------------- PKI: cases --

async fn organisation_domains_are_replaced_and_audited(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let bare = Organisation { allowed_domains: vec![], ..organisation("bare") };
    s.create_organisation(&bare, &audit(Some(&bare.id), "organisation.create")).await.unwrap();
    assert_eq!(s.organisation("bare").await.unwrap().as_ref(), Some(&bare), "an empty list round-trips");
    assert_eq!(
        s.organisation("acme").await.unwrap().unwrap().allowed_domains,
        ["acme.example", "api.example.org"],
        "created with its domains, in order"
    );

    let domains: Vec<String> =
        vec!["payments.acme.example".into(), "acme.example".into(), "xn--bcher-kva.example".into()];
    let ev = audit(Some(&acme.id), "organisation.domains");
    assert!(s.set_organisation_domains(&acme.id, &domains, NOW + 50, &ev).await.unwrap());
    let want = Organisation { allowed_domains: domains.clone(), updated_at: NOW + 50, ..acme.clone() };
    assert_eq!(s.organisation("acme").await.unwrap().as_ref(), Some(&want), "replaced, updated_at set");
    assert_eq!(s.organisation_by_id(&acme.id).await.unwrap().as_ref(), Some(&want));
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.organisation("bare").await.unwrap().as_ref(), Some(&bare), "other organisations untouched");

    // Cleared.
    assert!(
        s.set_organisation_domains(&acme.id, &[], NOW + 60, &audit(Some(&acme.id), "organisation.domains"))
            .await
            .unwrap()
    );
    assert!(s.organisation("acme").await.unwrap().unwrap().allowed_domains.is_empty());

    // Unknown organisation: false, no audit row.
    let ghost_ev = audit(None, "organisation.domains");
    assert!(!s.set_organisation_domains(&new_id(), &domains, NOW, &ghost_ev).await.unwrap());
    assert!(!audited(&*s, &ghost_ev).await);

    // Rolled back with its audit row.
    let reused = AuditEvent { action: "organisation.domains".into(), ..ev.clone() };
    assert_conflict(s.set_organisation_domains(&acme.id, &domains, NOW + 70, &reused).await, "audit id reused");
    let now_stored = s.organisation("acme").await.unwrap().unwrap();
    assert!(now_stored.allowed_domains.is_empty() && now_stored.updated_at == NOW + 60, "unchanged: {now_stored:?}");
}

async fn certificates_insert_lookup_and_conflicts(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    seed_issuer(&*s, "ca-1").await;
    let web = seed_app(&*s, &acme, "web").await;
    let elsewhere = seed_app(&*s, &other, "web").await;
    assert_eq!(s.application("acme$web").await.unwrap().unwrap().jwks_uri, web.jwks_uri, "jwks_uri round-trips");

    let a = issued(&web, "ca-1", "0a01", CertificateType::Transport, NOW, NOW + 90 * DAY);
    let ev = audit(Some(&acme.id), "certificate.issue");
    s.insert_certificate(&a, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await, "audit row written with the certificate");
    // Every optional field set, and revoked already: the whole record round-trips.
    let b = IssuedCertificate {
        revoked_at: Some(NOW + 5),
        revocation_reason: Some(RevocationReason::CessationOfOperation),
        renewed_from: Some(a.id.clone()),
        expiry_notified_at: Some(NOW + 3),
        sans: vec![],
        ..issued(&web, "ca-1", "0a02", CertificateType::ServerTransport, NOW + 1, NOW + DAY)
    };
    add_cert(&*s, &b).await;
    let c = issued(&elsewhere, "ca-1", "0a03", CertificateType::Signing, NOW + 2, NOW + DAY);
    add_cert(&*s, &c).await;

    assert_eq!(s.certificate(&acme.id, &a.id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(s.certificate(&acme.id, &b.id).await.unwrap().as_ref(), Some(&b), "every field round-trips");
    assert_eq!(s.certificate(&other.id, &a.id).await.unwrap(), None, "by id is scoped to the organisation");
    assert_eq!(s.certificate(&acme.id, &new_id()).await.unwrap(), None);
    assert_eq!(s.certificate_by_fingerprint(&a.fingerprint).await.unwrap().as_ref(), Some(&a));
    assert_eq!(s.certificate_by_fingerprint(&c.fingerprint).await.unwrap().as_ref(), Some(&c), "any organisation");
    assert_eq!(s.certificate_by_fingerprint(&"0".repeat(64)).await.unwrap(), None);
    assert_eq!(s.certificate_by_fingerprint(&a.fingerprint.to_uppercase()).await.unwrap(), None, "exact match");

    // Duplicate serial (even in another organisation), id or fingerprint: Conflict, nothing written.
    let before = audit_len(&*s).await;
    let dup_serial = IssuedCertificate {
        serial: a.serial.clone(),
        ..issued(&elsewhere, "ca-1", "0b01", CertificateType::Transport, NOW, NOW + DAY)
    };
    assert_conflict(
        s.insert_certificate(&dup_serial, &audit(Some(&other.id), "certificate.issue")).await,
        "duplicate serial",
    );
    assert_eq!(s.certificate(&other.id, &dup_serial.id).await.unwrap(), None);
    assert_eq!(s.certificate_by_fingerprint(&dup_serial.fingerprint).await.unwrap(), None);
    let dup_id = IssuedCertificate {
        id: a.id.clone(),
        ..issued(&web, "ca-1", "0b02", CertificateType::Transport, NOW, NOW + DAY)
    };
    assert_conflict(s.insert_certificate(&dup_id, &audit(Some(&acme.id), "certificate.issue")).await, "duplicate id");
    let dup_fp = IssuedCertificate {
        fingerprint: a.fingerprint.clone(),
        ..issued(&web, "ca-1", "0b03", CertificateType::Transport, NOW, NOW + DAY)
    };
    assert_conflict(
        s.insert_certificate(&dup_fp, &audit(Some(&acme.id), "certificate.issue")).await,
        "duplicate fingerprint",
    );
    assert_eq!(audit_len(&*s).await, before, "refused inserts wrote no audit row");
    assert_eq!(s.certificate(&acme.id, &a.id).await.unwrap().as_ref(), Some(&a), "original untouched");
    assert_eq!(serials(&s.certificates(&acme.id, &at(NOW), all()).await.unwrap()), ["0a02", "0a01"]);

    // Rolled back with its audit row.
    let d = issued(&web, "ca-1", "0a04", CertificateType::Signing, NOW + 3, NOW + DAY);
    assert_conflict(
        s.insert_certificate(&d, &AuditEvent { action: "certificate.issue".into(), ..ev.clone() }).await,
        "audit id reused",
    );
    assert_eq!(s.certificate(&acme.id, &d.id).await.unwrap(), None, "no certificate without its audit row");
    add_cert(&*s, &d).await;

    // Deleting the application keeps its inventory.
    assert!(s.delete_application("acme$web", &audit(Some(&acme.id), "application.delete")).await.unwrap());
    assert_eq!(
        s.certificate(&acme.id, &a.id).await.unwrap().as_ref(),
        Some(&a),
        "certificates outlive their application"
    );
    assert_eq!(s.certificate_by_fingerprint(&d.fingerprint).await.unwrap().as_ref(), Some(&d));
    assert_eq!(s.active_signing_certificates(&web.id, NOW).await.unwrap(), vec![d.clone()]);
}

/// Many issuances at once (SQLite commits them in groups): a conflicting insert fails alone,
/// with its audit row, and every other one is stored with its audit row.
async fn concurrent_certificate_inserts_fail_only_their_own(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    seed_issuer(&*s, "ca-1").await;
    let web = seed_app(&*s, &acme, "web").await;
    let before = audit_len(&*s).await;
    // 60 certificates; every tenth reuses the serial of the one before it, and number 25 reuses
    // the audit id of number 24.
    let mut certs = Vec::new();
    let mut events: Vec<AuditEvent> = Vec::new();
    for i in 0..60u32 {
        let serial = if i % 10 == 9 { format!("1c{:02x}", i - 1) } else { format!("1c{i:02x}") };
        let mut c = issued(&web, "ca-1", &serial, CertificateType::Transport, NOW + i64::from(i), NOW + DAY);
        c.fingerprint = format!("{i:f>64}");
        c.spki_sha256 = format!("{i:5>64}");
        let ev = if i == 25 {
            AuditEvent { action: "certificate.issue".into(), ..events[24].clone() }
        } else {
            audit(Some(&acme.id), "certificate.issue")
        };
        certs.push(c);
        events.push(ev);
    }
    let outcomes = futures_join_all(certs.iter().cloned().zip(events.iter().cloned()).map(|(c, ev)| {
        let s = s.clone();
        async move { s.insert_certificate(&c, &ev).await }
    }))
    .await;

    let mut stored = 0;
    for pair in (0..60).step_by(10).map(|i| i + 8) {
        let (first, second) = (&outcomes[pair], &outcomes[pair + 1]);
        assert!(
            first.is_ok() != second.is_ok(),
            "exactly one of the two with serial {} is stored: {first:?} {second:?}",
            certs[pair].serial
        );
        let loser = if first.is_ok() { pair + 1 } else { pair };
        assert!(is_conflict(&outcomes[loser]), "{:?}", outcomes[loser]);
        assert_eq!(s.certificate(&acme.id, &certs[loser].id).await.unwrap(), None);
        assert!(!audited(&*s, &events[loser]).await, "the refused insert left no audit row");
    }
    let (first, second) = (&outcomes[24], &outcomes[25]);
    assert!(first.is_ok() != second.is_ok(), "one audit id, one insert: {first:?} {second:?}");
    for (i, outcome) in outcomes.iter().enumerate() {
        if outcome.is_ok() {
            stored += 1;
            assert_eq!(s.certificate(&acme.id, &certs[i].id).await.unwrap().as_ref(), Some(&certs[i]));
            assert!(audited(&*s, &events[i]).await, "certificate {i} has its audit row");
        } else {
            assert!(i % 10 >= 8 || i == 24 || i == 25, "certificate {i} conflicts with nothing, yet: {outcome:?}");
        }
    }
    assert_eq!(stored, 60 - 6 - 1, "six serial clashes and one audit clash refused");
    assert_eq!(audit_len(&*s).await, before + stored);
    assert_eq!(s.certificates(&acme.id, &at(NOW), all()).await.unwrap().len(), stored);
}

async fn certificate_filters_status_and_paging(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    seed_issuer(&*s, "ca-1").await;
    let web = seed_app(&*s, &acme, "web").await;
    let batch = seed_app(&*s, &acme, "batch").await;
    let elsewhere = seed_app(&*s, &other, "web").await;

    use CertificateType::{ServerTransport, Signing, Transport};
    let a = issued(&web, "ca-1", "01", Transport, NOW, NOW + 1000);
    let b = issued(&web, "ca-1", "02", Signing, NOW + 1, NOW + 100);
    let c = issued(&batch, "ca-1", "03", ServerTransport, NOW + 2, NOW - 1);
    // Same created_at as c: the id breaks the tie.
    let d = IssuedCertificate {
        revoked_at: Some(NOW - 5),
        revocation_reason: Some(RevocationReason::KeyCompromise),
        ..issued(&batch, "ca-1", "04", Transport, NOW + 2, NOW + 5000)
    };
    // A renewal of b: same key.
    let e = IssuedCertificate {
        spki_sha256: b.spki_sha256.clone(),
        renewed_from: Some(b.id.clone()),
        ..issued(&web, "ca-1", "05", Signing, NOW + 3, NOW + 2000)
    };
    // Revoked after it expired.
    let f = IssuedCertificate {
        revoked_at: Some(NOW),
        revocation_reason: Some(RevocationReason::Superseded),
        ..issued(&web, "ca-1", "06", Signing, NOW - 10, NOW - 2)
    };
    let g = IssuedCertificate {
        spki_sha256: b.spki_sha256.clone(),
        ..issued(&elsewhere, "ca-1", "07", Signing, NOW + 4, NOW + 1000)
    };
    let certs = vec![a.clone(), b.clone(), c.clone(), d.clone(), e.clone(), f.clone(), g.clone()];
    for x in &certs {
        add_cert(&*s, x).await;
    }

    let mut cd = vec![c.clone(), d.clone()];
    cd.sort_by(|x, y| y.id.cmp(&x.id));
    let newest_first: Vec<IssuedCertificate> = [vec![e.clone()], cd, vec![b.clone(), a.clone(), f.clone()]].concat();
    assert_eq!(
        s.certificates(&acme.id, &at(NOW), all()).await.unwrap(),
        newest_first,
        "no criterion: all of the org's, newest first"
    );
    assert_eq!(s.certificates(&other.id, &at(NOW), all()).await.unwrap(), vec![g.clone()]);
    assert!(s.certificates(&new_id(), &at(NOW), all()).await.unwrap().is_empty());

    // Paging keeps the order.
    assert_eq!(s.certificates(&acme.id, &at(NOW), page(2, 0)).await.unwrap(), newest_first[..2]);
    assert_eq!(s.certificates(&acme.id, &at(NOW), page(2, 1)).await.unwrap(), newest_first[1..3]);
    assert_eq!(s.certificates(&acme.id, &at(NOW), page(2, 4)).await.unwrap(), newest_first[4..]);
    assert!(s.certificates(&acme.id, &at(NOW), page(2, 6)).await.unwrap().is_empty());

    // Hand-checked criteria.
    let q = |f: CertificateFilter| {
        let s = s.clone();
        let org = acme.id.clone();
        async move { s.certificates(&org, &f, all()).await.unwrap() }
    };
    let status = |st: CertificateStatus, now: UnixTime| CertificateFilter { status: Some(st), ..at(now) };
    assert_eq!(serials(&q(status(CertificateStatus::Active, NOW)).await), ["05", "02", "01"]);
    assert_eq!(serials(&q(status(CertificateStatus::Revoked, NOW)).await), ["04", "06"], "expired ones too");
    assert_eq!(serials(&q(status(CertificateStatus::Expired, NOW)).await), ["03"], "revoked is not expired");
    // b expires at NOW + 100: not_after == now is expired.
    assert_eq!(serials(&q(status(CertificateStatus::Active, NOW + 99)).await), ["05", "02", "01"]);
    assert_eq!(serials(&q(status(CertificateStatus::Active, NOW + 100)).await), ["05", "01"]);
    assert_eq!(serials(&q(status(CertificateStatus::Expired, NOW + 100)).await), ["03", "02"]);
    assert_eq!(
        serials(&q(CertificateFilter { app_id: Some(batch.id.clone()), ..at(NOW) }).await),
        serials(&newest_first[1..3])
    );
    assert_eq!(
        serials(&q(CertificateFilter { app_id: Some(elsewhere.id.clone()), ..at(NOW) }).await),
        Vec::<&str>::new(),
        "scoped by org"
    );
    assert_eq!(serials(&q(CertificateFilter { cert_type: Some(Signing), ..at(NOW) }).await), ["05", "02", "06"]);
    assert_eq!(serials(&q(CertificateFilter { cert_type: Some(ServerTransport), ..at(NOW) }).await), ["03"]);
    assert_eq!(serials(&q(CertificateFilter { serial: Some("04".into()), ..at(NOW) }).await), ["04"]);
    assert!(q(CertificateFilter { serial: Some("07".into()), ..at(NOW) }).await.is_empty(), "another org's serial");
    assert_eq!(serials(&q(CertificateFilter { fingerprint: Some(a.fingerprint.clone()), ..at(NOW) }).await), ["01"]);
    assert_eq!(
        serials(&q(CertificateFilter { spki_sha256: Some(b.spki_sha256.clone()), ..at(NOW) }).await),
        ["05", "02"],
        "renewals share the key"
    );
    assert_eq!(
        serials(&q(CertificateFilter { expires_before: Some(NOW + 1000), ..at(NOW) }).await),
        ["03", "02", "06"],
        "strictly before"
    );
    assert_eq!(
        serials(&q(CertificateFilter { expires_before: Some(NOW + 1001), ..at(NOW) }).await),
        ["03", "02", "01", "06"]
    );
    assert_eq!(
        serials(
            &q(CertificateFilter {
                app_id: Some(web.id.clone()),
                cert_type: Some(Signing),
                status: Some(CertificateStatus::Active),
                expires_before: Some(NOW + 1500),
                ..at(NOW)
            })
            .await
        ),
        ["02"],
        "every criterion applies"
    );

    // And every combination of criteria against the Rust meaning of the filter.
    let apps = [None, Some(web.id.clone()), Some(batch.id.clone())];
    let types = [None, Some(Transport), Some(ServerTransport), Some(Signing)];
    let statuses =
        [None, Some(CertificateStatus::Active), Some(CertificateStatus::Revoked), Some(CertificateStatus::Expired)];
    let befores = [None, Some(NOW + 100), Some(NOW + 2001)];
    let spkis = [None, Some(b.spki_sha256.clone())];
    for app in &apps {
        for t in types {
            for st in statuses {
                for before in befores {
                    for spki in &spkis {
                        for now in [NOW, NOW + 100] {
                            let f = CertificateFilter {
                                app_id: app.clone(),
                                cert_type: t,
                                status: st,
                                expires_before: before,
                                spki_sha256: spki.clone(),
                                ..at(now)
                            };
                            assert_eq!(
                                s.certificates(&acme.id, &f, all()).await.unwrap(),
                                expected(&certs, &acme.id, &f),
                                "{f:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    // The application's live signing certificates.
    let mut live = vec![e.clone(), b.clone()];
    live.sort_by(|x, y| (y.created_at, &y.id).cmp(&(x.created_at, &x.id)));
    assert_eq!(s.active_signing_certificates(&web.id, NOW).await.unwrap(), live, "neither revoked (f) nor expired");
    assert_eq!(
        s.active_signing_certificates(&web.id, NOW + 100).await.unwrap(),
        vec![e.clone()],
        "b expired at not_after"
    );
    assert!(
        s.active_signing_certificates(&batch.id, NOW).await.unwrap().is_empty(),
        "transport certificates are not signing ones"
    );
    assert_eq!(s.active_signing_certificates(&elsewhere.id, NOW).await.unwrap(), vec![g]);
}

async fn certificate_revocation_happens_once_with_its_mail(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    seed_issuer(&*s, "ca-1").await;
    seed_issuer(&*s, "ca-2").await;
    let web = seed_app(&*s, &acme, "web").await;
    let a = issued(&web, "ca-1", "0c", CertificateType::Transport, NOW, NOW + DAY);
    let b = issued(&web, "ca-1", "0a", CertificateType::Signing, NOW, NOW + DAY);
    let expired = issued(&web, "ca-1", "0b", CertificateType::Transport, NOW - 100, NOW - 1);
    let other_issuer = issued(&web, "ca-2", "01", CertificateType::Transport, NOW, NOW + DAY);
    let live = issued(&web, "ca-1", "09", CertificateType::Transport, NOW, NOW + DAY);
    for c in [&a, &b, &expired, &other_issuer, &live] {
        add_cert(&*s, c).await;
    }
    assert!(s.revoked_certificates("ca-1").await.unwrap().is_empty());

    // Rolled back with its audit row: not revoked, no mail.
    let used = audit(Some(&acme.id), "used");
    s.append_audit(&used).await.unwrap();
    let r = s
        .revoke_certificate(&a.id, RevocationReason::KeyCompromise, NOW + 1, &[mail("rollback@acme.example")], &used)
        .await;
    assert_conflict(r, "audit id reused");
    assert_eq!(s.certificate(&acme.id, &a.id).await.unwrap().as_ref(), Some(&a), "still not revoked");
    assert!(queued_to(&*s, "rollback@acme.example").await.is_empty(), "no mail without the revocation");

    let mails = [mail("admin1@acme.example"), mail("admin2@acme.example")];
    let ev = audit(Some(&acme.id), "certificate.revoke");
    assert!(s.revoke_certificate(&a.id, RevocationReason::KeyCompromise, NOW + 10, &mails, &ev).await.unwrap());
    let revoked_a = IssuedCertificate {
        revoked_at: Some(NOW + 10),
        revocation_reason: Some(RevocationReason::KeyCompromise),
        ..a.clone()
    };
    assert_eq!(s.certificate(&acme.id, &a.id).await.unwrap().as_ref(), Some(&revoked_a));
    assert!(audited(&*s, &ev).await);
    assert_eq!(queued_to(&*s, "admin1@acme.example").await, vec![mails[0].clone()], "mail queued with the revocation");
    assert_eq!(queued_to(&*s, "admin2@acme.example").await, vec![mails[1].clone()]);

    // Again: false, nothing written (not the time, not the reason, no mail, no audit).
    let again_ev = audit(Some(&acme.id), "certificate.revoke");
    let again = s
        .revoke_certificate(&a.id, RevocationReason::Superseded, NOW + 20, &[mail("admin1@acme.example")], &again_ev)
        .await
        .unwrap();
    assert!(!again, "already revoked");
    assert_eq!(s.certificate(&acme.id, &a.id).await.unwrap().as_ref(), Some(&revoked_a));
    assert_eq!(queued_to(&*s, "admin1@acme.example").await.len(), 1, "no second mail");
    assert!(!audited(&*s, &again_ev).await);
    assert!(
        !s.revoke_certificate(&new_id(), RevocationReason::Unspecified, NOW, &[], &audit(None, "x")).await.unwrap(),
        "unknown id"
    );

    // Expired certificates can be revoked too; an empty mail list is fine.
    assert!(
        s.revoke_certificate(
            &expired.id,
            RevocationReason::AaCompromise,
            NOW + 11,
            &[],
            &audit(Some(&acme.id), "certificate.revoke")
        )
        .await
        .unwrap()
    );
    assert!(
        s.revoke_certificate(
            &other_issuer.id,
            RevocationReason::CaCompromise,
            NOW + 12,
            &[],
            &audit(Some(&acme.id), "certificate.revoke")
        )
        .await
        .unwrap()
    );

    // Parallel revocations of one certificate: exactly one wins and queues its mail.
    let results = futures_join_all((0..8).map(|i| {
        let s = s.clone();
        let id = b.id.clone();
        let org = acme.id.clone();
        async move {
            s.revoke_certificate(
                &id,
                RevocationReason::PrivilegeWithdrawn,
                NOW + 30 + i,
                &[mail("race@acme.example")],
                &audit(Some(&org), "certificate.revoke"),
            )
            .await
            .unwrap()
        }
    }))
    .await;
    assert_eq!(results.iter().filter(|won| **won).count(), 1, "exactly one true: {results:?}");
    assert_eq!(queued_to(&*s, "race@acme.example").await.len(), 1, "mail queued once");
    let stored_b = s.certificate(&acme.id, &b.id).await.unwrap().unwrap();
    assert_eq!(stored_b.revocation_reason, Some(RevocationReason::PrivilegeWithdrawn));
    let won_at = stored_b.revoked_at.unwrap();

    // CRL entries: the issuer's revoked certificates by serial.
    assert_eq!(
        s.revoked_certificates("ca-1").await.unwrap(),
        vec![
            RevokedEntry { serial: "0a".into(), revoked_at: won_at, reason: RevocationReason::PrivilegeWithdrawn },
            RevokedEntry { serial: "0b".into(), revoked_at: NOW + 11, reason: RevocationReason::AaCompromise },
            RevokedEntry { serial: "0c".into(), revoked_at: NOW + 10, reason: RevocationReason::KeyCompromise },
        ]
    );
    assert_eq!(
        s.revoked_certificates("ca-2").await.unwrap(),
        vec![RevokedEntry { serial: "01".into(), revoked_at: NOW + 12, reason: RevocationReason::CaCompromise }]
    );
    assert!(s.revoked_certificates("ca-none").await.unwrap().is_empty());

    // Every reason round-trips.
    for (i, reason) in RevocationReason::ALL.into_iter().enumerate() {
        let c = issued(&web, "ca-2", &format!("e{i}"), CertificateType::Transport, NOW, NOW + DAY);
        add_cert(&*s, &c).await;
        assert!(
            s.revoke_certificate(&c.id, reason, NOW, &[], &audit(Some(&acme.id), "certificate.revoke")).await.unwrap()
        );
        assert_eq!(s.certificate(&acme.id, &c.id).await.unwrap().unwrap().revocation_reason, Some(reason));
    }
}

async fn crl_numbers_increase_and_the_highest_crl_is_kept(s: Arc<dyn Store>) {
    seed_issuer(&*s, "ca-1").await;
    seed_issuer(&*s, "ca-2").await;
    assert_eq!(s.next_crl_number("ca-1").await.unwrap(), 1, "numbers start at 1");
    assert_eq!(s.next_crl_number("ca-1").await.unwrap(), 2);
    assert_eq!(s.next_crl_number("ca-2").await.unwrap(), 1, "per issuer");
    assert_eq!(s.next_crl_number("ca-1").await.unwrap(), 3);

    // Twenty parallel takers get twenty distinct, consecutive numbers.
    let mut taken = futures_join_all((0..20).map(|_| {
        let s = s.clone();
        async move { s.next_crl_number("ca-1").await.unwrap() }
    }))
    .await;
    taken.sort_unstable();
    assert_eq!(taken, (4..=23).collect::<Vec<u64>>());
    assert_eq!(s.next_crl_number("ca-1").await.unwrap(), 24);
    assert_eq!(s.next_crl_number("ca-2").await.unwrap(), 2);

    assert!(s.crls().await.unwrap().is_empty());
    let crl = |issuer: &str, number: u64, der: &[u8]| StoredCrl {
        issuer_id: issuer.to_owned(),
        number,
        this_update: NOW + i64::try_from(number).unwrap(),
        next_update: NOW + DAY,
        der: der.to_vec(),
    };
    let five = crl("ca-1", 5, &[0x30, 0x00, 0xff, 0x05]);
    s.save_crl(&five).await.unwrap();
    assert_eq!(s.crls().await.unwrap(), vec![five.clone()]);
    s.save_crl(&crl("ca-1", 3, &[0x30, 0x03])).await.unwrap();
    assert_eq!(s.crls().await.unwrap(), vec![five.clone()], "a lower number does not replace a higher one");
    s.save_crl(&crl("ca-1", 5, &[0x30, 0x55])).await.unwrap();
    assert_eq!(s.crls().await.unwrap(), vec![five.clone()], "nor does the same number");
    let seven = crl("ca-1", 7, &[0x30, 0x07, 0x00]);
    s.save_crl(&seven).await.unwrap();
    let other = crl("ca-2", 1, &[0x30, 0x01]);
    s.save_crl(&other).await.unwrap();
    assert_eq!(s.crls().await.unwrap(), vec![seven.clone(), other.clone()], "one per issuer, the highest");
    assert_eq!(s.crl_numbers().await.unwrap(), vec![("ca-1".to_owned(), 7), ("ca-2".to_owned(), 1)]);

    // Racing saves: whatever the order, the highest number stays.
    futures_join_all((8..20u64).rev().map(|n| {
        let s = s.clone();
        let c = crl("ca-1", n, &n.to_be_bytes());
        async move { s.save_crl(&c).await.unwrap() }
    }))
    .await;
    assert_eq!(s.crls().await.unwrap(), vec![crl("ca-1", 19, &19u64.to_be_bytes()), other]);
}

async fn activating_ca_certificates_replaces_only_the_same_kind(s: Arc<dyn Store>) {
    let root1 = CaCertificate { active: true, ..ca_cert("root-1", CaKind::Root, NOW - 20) };
    let issuing1 = ca_cert("issuing-1", CaKind::Issuing, NOW - 10);
    s.insert_ca_certificates(&[root1.clone(), issuing1.clone()], &audit(None, "ca.insert")).await.unwrap();

    // A new issuing CA (given inactive: activation makes it active).
    let issuing2 = CaCertificate { active: false, ..ca_cert("issuing-2", CaKind::Issuing, NOW) };
    let ev = audit(None, "ca.rotate");
    s.activate_ca_certificates(std::slice::from_ref(&issuing2), &ev).await.unwrap();
    let inactive = |c: &CaCertificate| CaCertificate { active: false, ..c.clone() };
    let active = |c: &CaCertificate| CaCertificate { active: true, ..c.clone() };
    assert_eq!(
        s.ca_certificates().await.unwrap(),
        vec![root1.clone(), inactive(&issuing1), active(&issuing2)],
        "the old issuing CA stays, inactive; the root is untouched"
    );
    assert!(audited(&*s, &ev).await);

    // Rolled back: a duplicate id in the batch leaves everything as it was.
    let issuing3 = ca_cert("issuing-3", CaKind::Issuing, NOW + 1);
    let dup = CaCertificate { subject: "CN=impostor".into(), ..root1.clone() };
    assert_conflict(
        s.activate_ca_certificates(&[issuing3.clone(), dup], &audit(None, "ca.import")).await,
        "duplicate CA id",
    );
    assert_eq!(s.ca_certificates().await.unwrap(), vec![root1.clone(), inactive(&issuing1), active(&issuing2)]);
    let reused = AuditEvent { action: "ca.import".into(), ..ev.clone() };
    assert_conflict(s.activate_ca_certificates(std::slice::from_ref(&issuing3), &reused).await, "audit id reused");
    assert_eq!(s.ca_certificates().await.unwrap(), vec![root1.clone(), inactive(&issuing1), active(&issuing2)]);

    // An import of both kinds replaces both.
    let root2 = ca_cert("root-2", CaKind::Root, NOW + 2);
    s.activate_ca_certificates(&[root2.clone(), issuing3.clone()], &audit(None, "ca.import")).await.unwrap();
    assert_eq!(
        s.ca_certificates().await.unwrap(),
        vec![inactive(&root1), inactive(&issuing1), inactive(&issuing2), active(&issuing3), active(&root2)],
        "ordered by created_at"
    );
    // Certificates of an inactive issuer are still stored and listed on its CRL.
    let acme = seed_org(&*s, "acme").await;
    let web = seed_app(&*s, &acme, "web").await;
    let c = issued(&web, "issuing-1", "aa", CertificateType::Transport, NOW, NOW + DAY);
    add_cert(&*s, &c).await;
    assert!(
        s.revoke_certificate(
            &c.id,
            RevocationReason::Superseded,
            NOW,
            &[],
            &audit(Some(&acme.id), "certificate.revoke")
        )
        .await
        .unwrap()
    );
    assert_eq!(s.revoked_certificates("issuing-1").await.unwrap().len(), 1);
}

async fn expiring_certificates_are_warned_about_once(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    seed_issuer(&*s, "ca-1").await;
    let web = seed_app(&*s, &acme, "web").await;
    let far = seed_app(&*s, &other, "far").await;
    let before = NOW + 30 * DAY;
    let soon = issued(&web, "ca-1", "01", CertificateType::Transport, NOW - DAY, NOW + 10 * DAY);
    let sooner = issued(&far, "ca-1", "02", CertificateType::Signing, NOW - DAY, NOW + DAY);
    let later = issued(&web, "ca-1", "03", CertificateType::Transport, NOW - DAY, NOW + 60 * DAY);
    let at_cutoff = issued(&web, "ca-1", "04", CertificateType::Transport, NOW - DAY, before);
    let expired = issued(&web, "ca-1", "05", CertificateType::Transport, NOW - DAY, NOW);
    let revoked = IssuedCertificate {
        revoked_at: Some(NOW - 1),
        revocation_reason: Some(RevocationReason::Unspecified),
        ..issued(&web, "ca-1", "06", CertificateType::Transport, NOW - DAY, NOW + 2 * DAY)
    };
    let warned = IssuedCertificate {
        expiry_notified_at: Some(NOW - 5),
        ..issued(&web, "ca-1", "07", CertificateType::Transport, NOW - DAY, NOW + 3 * DAY)
    };
    for c in [&soon, &sooner, &later, &at_cutoff, &expired, &revoked, &warned] {
        add_cert(&*s, c).await;
    }

    assert_eq!(
        s.certificates_expiring(NOW, before, 10).await.unwrap(),
        vec![sooner.clone(), soon.clone()],
        "active, not yet warned, not_after in (now, before), soonest first, every organisation"
    );
    assert_eq!(s.certificates_expiring(NOW, before, 1).await.unwrap(), vec![sooner.clone()], "at most max");
    assert_eq!(
        s.certificates_expiring(NOW, before + 1, 10).await.unwrap(),
        vec![sooner.clone(), soon.clone(), at_cutoff.clone()]
    );
    assert_eq!(
        s.certificates_expiring(NOW - 1, before, 10).await.unwrap(),
        vec![expired.clone(), sooner.clone(), soon.clone()],
        "not_after == now counts as expired"
    );

    let mails = [mail("admin@acme.example")];
    s.mark_expiry_notified(&soon.id, NOW + 1, &mails).await.unwrap();
    let stored = s.certificate(&acme.id, &soon.id).await.unwrap().unwrap();
    assert_eq!(
        stored,
        IssuedCertificate { expiry_notified_at: Some(NOW + 1), ..soon.clone() },
        "only the warning time changed"
    );
    assert_eq!(queued_to(&*s, "admin@acme.example").await, mails.to_vec(), "mail queued with the mark");
    assert_eq!(s.certificates_expiring(NOW, before, 10).await.unwrap(), vec![sooner.clone()]);

    // A second node marking the same certificate changes nothing and sends nothing.
    s.mark_expiry_notified(&soon.id, NOW + 2, &[mail("admin@acme.example")]).await.unwrap();
    assert_eq!(s.certificate(&acme.id, &soon.id).await.unwrap().unwrap().expiry_notified_at, Some(NOW + 1));
    assert_eq!(queued_to(&*s, "admin@acme.example").await.len(), 1);
    s.mark_expiry_notified(&new_id(), NOW, &[mail("ghost@acme.example")]).await.unwrap();
    assert!(queued_to(&*s, "ghost@acme.example").await.is_empty(), "unknown id: nothing queued");

    // Revoked after being listed: no longer expiring.
    assert!(
        s.revoke_certificate(
            &sooner.id,
            RevocationReason::Superseded,
            NOW,
            &[],
            &audit(Some(&other.id), "certificate.revoke")
        )
        .await
        .unwrap()
    );
    assert!(s.certificates_expiring(NOW, before, 10).await.unwrap().is_empty());
}

async fn assertion_jtis_are_accepted_once_per_client(s: Arc<dyn Store>) {
    assert!(s.record_assertion_jti("acme$web", "jti-1", NOW + 60).await.unwrap(), "first use");
    assert!(!s.record_assertion_jti("acme$web", "jti-1", NOW + 60).await.unwrap(), "replay");
    assert!(!s.record_assertion_jti("acme$web", "jti-1", NOW + 600).await.unwrap(), "replay with another expiry");
    assert!(s.record_assertion_jti("acme$api", "jti-1", NOW + 60).await.unwrap(), "same jti, other client");
    assert!(s.record_assertion_jti("acme$web", "JTI-1", NOW + 60).await.unwrap(), "jti match is exact");
    assert!(s.record_assertion_jti("acme$web", "jti-2", NOW - 10).await.unwrap());

    // Parallel replays: exactly one is first.
    let results = futures_join_all((0..10).map(|_| {
        let s = s.clone();
        async move { s.record_assertion_jti("acme$web", "jti-race", NOW + 60).await.unwrap() }
    }))
    .await;
    assert_eq!(results.iter().filter(|first| **first).count(), 1, "{results:?}");

    assert_eq!(s.purge_assertion_jtis(NOW).await.unwrap(), 1, "only jti-2 has expired");
    assert!(!s.record_assertion_jti("acme$web", "jti-1", NOW + 60).await.unwrap(), "kept until it expires");
    assert_eq!(s.purge_assertion_jtis(NOW + 60).await.unwrap(), 0, "expires_at == now is kept");
    assert_eq!(s.purge_assertion_jtis(NOW + 61).await.unwrap(), 4);
    assert!(s.record_assertion_jti("acme$web", "jti-1", NOW + 120).await.unwrap(), "purged: recorded afresh");
}

async fn users_with_role_match_whole_roles_of_enabled_users(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let with_roles = |org: &str, email: &str, roles: &[&str], enabled: bool| User {
        roles: roles.iter().map(|r| role(r)).collect(),
        enabled,
        ..user(org, email)
    };
    let carol = with_roles(&acme.id, "carol@example.com", &["billing:viewer", "portcullis:admin"], true);
    let ann = with_roles(&acme.id, "ann@example.com", &["portcullis:admin"], true);
    let bob = with_roles(&acme.id, "bob@example.com", &["portcullis:admin"], false);
    let dan = with_roles(&acme.id, "dan@example.com", &["portcullis:admin-x", "portcullis:adminx"], true);
    let eve = with_roles(&acme.id, "eve@example.com", &["xportcullis:admin", "portcullis:viewer"], true);
    let fay = with_roles(&acme.id, "fay@example.com", &[], true);
    let oli = with_roles(&other.id, "oli@example.com", &["portcullis:admin"], true);
    for u in [&carol, &ann, &bob, &dan, &eve, &fay, &oli] {
        s.create_user(u, &audit(Some(&u.org_id), "user.create")).await.unwrap();
    }

    assert_eq!(
        s.users_with_role(&acme.id, "portcullis:admin", 10).await.unwrap(),
        vec![ann.clone(), carol.clone()],
        "enabled holders of exactly that role, in this organisation, by email"
    );
    assert_eq!(s.users_with_role(&acme.id, "portcullis:admin", 1).await.unwrap(), vec![ann.clone()], "at most max");
    assert_eq!(s.users_with_role(&other.id, "portcullis:admin", 10).await.unwrap(), vec![oli]);
    assert_eq!(s.users_with_role(&acme.id, "billing:viewer", 10).await.unwrap(), vec![carol.clone()]);
    assert_eq!(s.users_with_role(&acme.id, "portcullis:admin-x", 10).await.unwrap(), vec![dan.clone()]);
    for near in [
        "portcullis:admi",
        "ortcullis:admin",
        "portcullis",
        "admin",
        "portcullis:_dmin",
        "portcullis:%",
        "%",
        "_",
        "",
        "PORTCULLIS:ADMIN",
        "\"portcullis:admin\"",
    ] {
        assert!(s.users_with_role(&acme.id, near, 10).await.unwrap().is_empty(), "{near:?} matches no whole role");
    }
    assert!(s.users_with_role(&new_id(), "portcullis:admin", 10).await.unwrap().is_empty());
}

/// The portal's lists: who holds a role (users, enabled or not, and applications), and the
/// searches of organisations and applications; all paged, wildcards taken literally.
async fn role_holders_and_searches_page_and_match_whole_roles(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let with_roles = |org: &str, email: &str, roles: &[&str], enabled: bool| User {
        roles: roles.iter().map(|r| role(r)).collect(),
        enabled,
        ..user(org, email)
    };
    let ann = with_roles(&acme.id, "ann@example.com", &["payments:reader"], true);
    let bob = with_roles(&acme.id, "bob@example.com", &["payments:reader", "billing:viewer"], false);
    let cat = with_roles(&acme.id, "cat@example.com", &["payments:reader-x", "xpayments:reader"], true);
    let oli = with_roles(&other.id, "oli@example.com", &["payments:reader"], true);
    for u in [&ann, &bob, &cat, &oli] {
        s.create_user(u, &audit(Some(&u.org_id), "user.create")).await.unwrap();
    }
    let users = |v: Vec<User>| v.into_iter().map(|u| u.email.to_string()).collect::<Vec<_>>();
    assert_eq!(
        users(s.role_users(&acme.id, "payments:reader", all()).await.unwrap()),
        ["ann@example.com", "bob@example.com"],
        "disabled holders too, by email, whole roles only, this organisation only"
    );
    assert_eq!(users(s.role_users(&acme.id, "payments:reader", page(1, 1)).await.unwrap()), ["bob@example.com"]);
    for near in ["payments:reade", "payments:%", "%", "_", "", "PAYMENTS:READER", "\"payments:reader\""] {
        assert!(s.role_users(&acme.id, near, all()).await.unwrap().is_empty(), "{near:?}");
        assert!(s.role_applications(&acme.id, near, all()).await.unwrap().is_empty(), "{near:?}");
    }

    let mut web = full_app(&acme, "web");
    web.name = "Web Shop 100%".into();
    web.roles = vec![role("payments:reader")];
    let mut batch = minimal_app(&acme, "batch");
    batch.roles = vec![role("payments:reader"), role("billing:viewer")];
    let mut cli = minimal_app(&acme, "cli");
    cli.roles = vec![role("payments:reader-x")];
    let elsewhere = minimal_app(&other, "web");
    for a in [&web, &batch, &cli, &elsewhere] {
        s.create_application(a, &audit(Some(&a.org_id), "application.create")).await.unwrap();
    }
    let apps = |v: Vec<Application>| v.into_iter().map(|a| a.client_id.to_string()).collect::<Vec<_>>();
    assert_eq!(
        apps(s.role_applications(&acme.id, "payments:reader", all()).await.unwrap()),
        ["acme$batch", "acme$web"]
    );
    assert_eq!(apps(s.role_applications(&acme.id, "payments:reader", page(1, 1)).await.unwrap()), ["acme$web"]);
    assert_eq!(apps(s.role_applications(&acme.id, "billing:viewer", all()).await.unwrap()), ["acme$batch"]);

    assert_eq!(apps(s.search_applications(&acme.id, "SHOP", all()).await.unwrap()), ["acme$web"], "by name, any case");
    assert_eq!(apps(s.search_applications(&acme.id, "c", all()).await.unwrap()), ["acme$batch", "acme$cli"], "by slug");
    assert_eq!(apps(s.search_applications(&acme.id, "100%", all()).await.unwrap()), ["acme$web"]);
    assert!(s.search_applications(&acme.id, "%", all()).await.unwrap().len() == 1, "% is literal");
    assert!(s.search_applications(&acme.id, "_", all()).await.unwrap().is_empty(), "_ is literal");
    assert_eq!(apps(s.search_applications(&acme.id, "", page(1, 2)).await.unwrap()), ["acme$web"], "paged");

    let orgs = |v: Vec<Organisation>| v.into_iter().map(|o| o.slug.to_string()).collect::<Vec<_>>();
    assert_eq!(orgs(s.search_organisations("OTH", all()).await.unwrap()), ["other"], "by slug, any case");
    assert_eq!(orgs(s.search_organisations("ünïcode", all()).await.unwrap()), ["acme", "other"], "by name");
    assert_eq!(orgs(s.search_organisations("", page(1, 1)).await.unwrap()), ["other"], "paged");
    assert!(s.search_organisations("%", all()).await.unwrap().is_empty());
}

// ------------------------------------------------------------------------ OIDC: helpers --

/// An organisation with two applications ("web" and "portal": "acme$portal" sorts first),
/// two users and an active SSO session each.
struct Oidc {
    org: Organisation,
    app: Application,
    other_app: Application,
    ann: User,
    bob: User,
    ann_session: Session,
    bob_session: Session,
}

async fn active_session(s: &dyn Store, u: &User, token: u8) -> Session {
    let (sess, v) = seed_session(s, u, token).await;
    assert!(
        s.consume_verification(&v.id, NOW, &activate(&sess), &audit(Some(&u.org_id), "session.verify")).await.unwrap()
    );
    s.session(&sess.id).await.unwrap().unwrap()
}

async fn seed_oidc(s: &dyn Store) -> Oidc {
    let org = seed_org(s, "acme").await;
    let app = seed_app(s, &org, "web").await;
    let other_app = seed_app(s, &org, "portal").await;
    let ann = seed_user(s, &org.id, "ann@example.com").await;
    let bob = seed_user(s, &org.id, "bob@example.com").await;
    let ann_session = active_session(s, &ann, 1).await;
    let bob_session = active_session(s, &bob, 2).await;
    Oidc { org, app, other_app, ann, bob, ann_session, bob_session }
}

/// An unredeemed code whose hash is `hash(seed)`, every optional field set.
fn code(app: &Application, u: &User, sess: &Session, seed: u8) -> AuthorizationCode {
    AuthorizationCode {
        code_hash: hash(seed),
        client_id: app.client_id.as_str().to_owned(),
        org_id: app.org_id.clone(),
        user_id: u.id.clone(),
        session_id: sess.id.clone(),
        redirect_uri: "https://app.example/cb?x=\"q\"&y=«ü»".into(),
        scope: "openid profile email".into(),
        nonce: Some("n-0S6_WzA2Mj «ü» \"q\"".into()),
        code_challenge: Some("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into()),
        auth_time: NOW - 30,
        amr: vec!["pwd".into(), "otp".into()],
        created_at: NOW,
        expires_at: NOW + 60,
        consumed_at: None,
        issued_jti: None,
        issued_jti_expires_at: None,
        issued_family: None,
        issued_session: None,
    }
}

/// An unused refresh token whose hash is `hash(seed)`.
fn refresh_token(app: &Application, u: &User, session_id: &str, family_id: &str, seed: u8) -> RefreshToken {
    RefreshToken {
        id: new_id(),
        token_hash: hash(seed),
        family_id: family_id.to_owned(),
        client_id: app.client_id.as_str().to_owned(),
        org_id: app.org_id.clone(),
        user_id: u.id.clone(),
        session_id: session_id.to_owned(),
        scope: "openid offline_access «ü»".into(),
        auth_time: NOW - 30,
        amr: vec!["pwd".into(), "otp".into()],
        created_at: NOW,
        expires_at: NOW + 30 * DAY,
        used_at: None,
        revoked_at: None,
    }
}

/// Stores `rt` the only way the trait allows: as what redeeming a fresh code (`hash(code_seed)`,
/// long-lived so purges leave it alone) issued.
async fn issue_refresh(s: &dyn Store, rt: &RefreshToken, code_seed: u8) {
    let c = AuthorizationCode {
        code_hash: hash(code_seed),
        client_id: rt.client_id.clone(),
        org_id: rt.org_id.clone(),
        user_id: rt.user_id.clone(),
        session_id: rt.session_id.clone(),
        expires_at: NOW + 100 * DAY,
        nonce: None,
        code_challenge: None,
        ..code_template()
    };
    s.insert_authorization_code(&c, &audit(Some(&rt.org_id), "oauth.authorize")).await.unwrap();
    let issue = CodeIssue { jti: new_id(), jti_expires_at: NOW + 900, refresh: Some(rt.clone()) };
    assert!(
        s.redeem_authorization_code(&c.code_hash, NOW, &issue, &audit(Some(&rt.org_id), "oauth.token")).await.unwrap()
    );
}

fn code_template() -> AuthorizationCode {
    AuthorizationCode {
        code_hash: hash(0),
        client_id: String::new(),
        org_id: String::new(),
        user_id: String::new(),
        session_id: String::new(),
        redirect_uri: "https://app.example/cb".into(),
        scope: "openid".into(),
        nonce: None,
        code_challenge: None,
        auth_time: NOW - 30,
        amr: vec!["pwd".into()],
        created_at: NOW,
        expires_at: NOW + 60,
        consumed_at: None,
        issued_jti: None,
        issued_jti_expires_at: None,
        issued_family: None,
        issued_session: None,
    }
}

async fn refresh_of(s: &dyn Store, rt: &RefreshToken) -> Option<RefreshToken> {
    s.refresh_token_by_hash(&rt.token_hash).await.unwrap()
}

fn delivery(app: &Application, created_at: UnixTime, next_attempt_at: UnixTime) -> LogoutDelivery {
    LogoutDelivery {
        id: new_id(),
        client_id: app.client_id.as_str().to_owned(),
        uri: format!("https://{}.example/backchannel?x=\"1\"", app.slug.as_str()),
        logout_token: format!("eyJhbGciOiJFUzI1NiJ9.{}.c2ln", new_id()),
        attempts: 0,
        next_attempt_at,
        created_at,
        delivered_at: None,
        failed_at: None,
    }
}

fn consent(u: &User, app: &Application, scopes: &[&str], granted_at: UnixTime) -> Consent {
    Consent {
        user_id: u.id.clone(),
        client_id: app.client_id.as_str().to_owned(),
        org_id: u.org_id.clone(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        granted_at,
    }
}

fn totp(u: &User, secret: &[u8], created_at: UnixTime) -> UserTotp {
    UserTotp { user_id: u.id.clone(), sealed_secret: secret.to_vec(), confirmed_at: None, last_step: None, created_at }
}

// -------------------------------------------------------------------------- OIDC: cases --

async fn organisation_self_registration_is_switched_and_audited(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    assert!(!s.organisation("acme").await.unwrap().unwrap().self_registration, "off by default");
    let open = Organisation { self_registration: true, ..organisation("open") };
    s.create_organisation(&open, &audit(Some(&open.id), "organisation.create")).await.unwrap();
    assert_eq!(s.organisation("open").await.unwrap().as_ref(), Some(&open), "created open");

    let ev = audit(Some(&acme.id), "organisation.self_registration");
    assert!(s.set_organisation_self_registration(&acme.id, true, NOW + 50, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    let on = Organisation { self_registration: true, updated_at: NOW + 50, ..acme.clone() };
    assert_eq!(s.organisation_by_id(&acme.id).await.unwrap().as_ref(), Some(&on), "switched on, updated_at set");
    assert_eq!(s.organisation("open").await.unwrap().as_ref(), Some(&open), "other organisations untouched");

    assert!(
        s.set_organisation_self_registration(&acme.id, false, NOW + 60, &audit(Some(&acme.id), "x")).await.unwrap()
    );
    let off = Organisation { self_registration: false, updated_at: NOW + 60, ..acme.clone() };
    assert_eq!(s.organisation_by_id(&acme.id).await.unwrap(), Some(off));

    let ghost = audit(None, "organisation.self_registration");
    assert!(!s.set_organisation_self_registration(&new_id(), true, NOW, &ghost).await.unwrap());
    assert!(!audited(&*s, &ghost).await, "no audit for an unknown organisation");
}

async fn invited_users_get_an_address_a_link_and_then_a_password(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let ann = seed_user(&*s, &acme.id, "ann@example.com").await;
    let alias = address(&ann, "alias@example.com");
    let alias_v = verification(&ann, VerificationPurpose::Email, &alias.id);
    s.add_user_email(&alias, &alias_v, &mail("alias@example.com"), &audit(Some(&acme.id), "user.email.add"))
        .await
        .unwrap();

    let zoe = User {
        name: None,
        password_hash: None,
        roles: vec![],
        failed_logins: 3,
        locked_until: Some(NOW + 60),
        ..user(&acme.id, "zoe@example.com")
    };
    let zoe_email = UserEmail::primary_of(&zoe);
    let zoe_v = Verification {
        sealed_token: Some(vec![0x00, 0xff, 0x01]),
        ..verification(&zoe, VerificationPurpose::Invite, &zoe_email.id)
    };
    let zoe_mail = mail("zoe@example.com");
    let ev = audit(Some(&acme.id), "user.invite");
    s.create_invited_user(&zoe, &zoe_email, &zoe_v, &zoe_mail, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.user(&acme.id, &zoe.id).await.unwrap().as_ref(), Some(&zoe), "user round-trips, no password");
    assert_eq!(s.user_emails(&zoe.id).await.unwrap(), vec![zoe_email.clone()]);
    assert_eq!(s.verification(&zoe_v.id).await.unwrap().as_ref(), Some(&zoe_v), "an invite verification round-trips");
    assert_eq!(queued_to(&*s, "zoe@example.com").await, vec![zoe_mail]);

    // The address is taken, as a user's primary address or as another user's alias:
    // Conflict, and nothing of the invitation remains.
    for taken in ["ann@example.com", "alias@example.com"] {
        let dup = User { password_hash: None, ..user(&acme.id, taken) };
        let dup_v = verification(&dup, VerificationPurpose::Invite, &dup.id);
        let dup_mail = QueuedMail { to: format!("invite-{taken}"), ..mail(taken) };
        let dup_ev = audit(Some(&acme.id), "user.invite");
        assert_conflict(
            s.create_invited_user(&dup, &UserEmail::primary_of(&dup), &dup_v, &dup_mail, &dup_ev).await,
            taken,
        );
        assert_eq!(s.user(&acme.id, &dup.id).await.unwrap(), None);
        assert!(s.user_emails(&dup.id).await.unwrap().is_empty());
        assert_eq!(s.verification(&dup_v.id).await.unwrap(), None);
        assert!(queued_to(&*s, &dup_mail.to).await.is_empty(), "no mail for a refused invitation");
        assert!(!audited(&*s, &dup_ev).await);
    }
    assert_eq!(s.user_by_email(&acme.id, "ann@example.com").await.unwrap().as_ref(), Some(&ann));

    // Accepting: the password is set, the lockout lifted, the address verified.
    let effect = VerificationEffect::AcceptInvite {
        user_id: zoe.id.clone(),
        email_id: zoe_email.id.clone(),
        password_hash: "$argon2id$v=19$invited".into(),
    };
    let ev = audit(Some(&acme.id), "user.invite.accept");
    assert!(s.consume_verification(&zoe_v.id, NOW + 100, &effect, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    let accepted = User {
        password_hash: Some("$argon2id$v=19$invited".into()),
        failed_logins: 0,
        locked_until: None,
        updated_at: NOW + 100,
        ..zoe.clone()
    };
    assert_eq!(s.user(&acme.id, &zoe.id).await.unwrap().as_ref(), Some(&accepted));
    assert_eq!(s.user_emails(&zoe.id).await.unwrap(), vec![UserEmail { verified_at: Some(NOW + 100), ..zoe_email }]);
    assert_eq!(
        s.verification(&zoe_v.id).await.unwrap(),
        Some(Verification { consumed_at: Some(NOW + 100), sealed_token: None, ..zoe_v.clone() })
    );
    // Once only.
    let other = VerificationEffect::AcceptInvite {
        user_id: zoe.id.clone(),
        email_id: zoe.id.clone(),
        password_hash: "$argon2id$v=19$again".into(),
    };
    let again = audit(Some(&acme.id), "user.invite.accept");
    assert!(!s.consume_verification(&zoe_v.id, NOW + 200, &other, &again).await.unwrap());
    assert!(!audited(&*s, &again).await);
    assert_eq!(s.user(&acme.id, &zoe.id).await.unwrap().as_ref(), Some(&accepted));

    // An address of another user is not verified by someone's invitation.
    let yan = User { password_hash: None, ..user(&acme.id, "yan@example.com") };
    let yan_v = verification(&yan, VerificationPurpose::Invite, &yan.id);
    s.create_invited_user(&yan, &UserEmail::primary_of(&yan), &yan_v, &mail("yan@example.com"), &audit(None, "i"))
        .await
        .unwrap();
    let stray = VerificationEffect::AcceptInvite {
        user_id: yan.id.clone(),
        email_id: alias.id.clone(),
        password_hash: "$argon2id$v=19$yan".into(),
    };
    assert!(s.consume_verification(&yan_v.id, NOW + 300, &stray, &audit(None, "user.invite.accept")).await.unwrap());
    assert_eq!(s.user(&acme.id, &yan.id).await.unwrap().unwrap().password_hash.as_deref(), Some("$argon2id$v=19$yan"));
    assert!(s.user_emails(&ann.id).await.unwrap().iter().all(|e| e.verified_at.is_none()), "ann's addresses untouched");
    assert_eq!(s.user_emails(&yan.id).await.unwrap()[0].verified_at, None);
}

async fn authorization_codes_are_redeemed_once_with_what_they_issued(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let c = code(&f.app, &f.ann, &f.ann_session, 0xa1);
    let bare = AuthorizationCode {
        nonce: None,
        code_challenge: None,
        amr: vec![],
        ..code(&f.other_app, &f.ann, &f.ann_session, 0xa2)
    };
    let ev = audit(Some(&f.org.id), "oauth.authorize");
    s.insert_authorization_code(&c, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    s.insert_authorization_code(&bare, &audit(Some(&f.org.id), "oauth.authorize")).await.unwrap();
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&c), "every field round-trips");
    assert_eq!(s.authorization_code(&bare.code_hash).await.unwrap().as_ref(), Some(&bare), "None and empty round-trip");
    assert_eq!(s.authorization_code(&hash(0xaf)).await.unwrap(), None);

    // The same hash again: Conflict, the first one unchanged.
    let dup = AuthorizationCode { redirect_uri: "https://evil.example/cb".into(), ..c.clone() };
    let dup_ev = audit(Some(&f.org.id), "oauth.authorize");
    assert_conflict(s.insert_authorization_code(&dup, &dup_ev).await, "duplicate code hash");
    assert!(!audited(&*s, &dup_ev).await);
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&c));
    assert!(s.session_clients(&f.ann_session.id).await.unwrap().is_empty());

    // Redeemed with a refresh token.
    let rt = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    let issue = CodeIssue { jti: "jti-1".into(), jti_expires_at: NOW + 900, refresh: Some(rt.clone()) };
    let ev = audit(Some(&f.org.id), "oauth.token");
    assert!(s.redeem_authorization_code(&c.code_hash, NOW + 5, &issue, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    let redeemed = AuthorizationCode {
        consumed_at: Some(NOW + 5),
        issued_jti: Some("jti-1".into()),
        issued_jti_expires_at: Some(NOW + 900),
        issued_family: Some("fam-1".into()),
        issued_session: None,
        ..c.clone()
    };
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&redeemed));
    assert_eq!(refresh_of(&*s, &rt).await.as_ref(), Some(&rt), "the refresh token round-trips");
    assert_eq!(s.session_clients(&f.ann_session.id).await.unwrap(), vec!["acme$web".to_owned()]);

    // A second redemption: false, nothing written.
    let rt2 = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-2", 0x82);
    let again = CodeIssue { jti: "jti-2".into(), jti_expires_at: NOW + 901, refresh: Some(rt2.clone()) };
    let again_ev = audit(Some(&f.org.id), "oauth.token");
    assert!(!s.redeem_authorization_code(&c.code_hash, NOW + 6, &again, &again_ev).await.unwrap());
    assert!(!audited(&*s, &again_ev).await);
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&redeemed), "first issue kept");
    assert_eq!(refresh_of(&*s, &rt2).await, None, "no second refresh token");
    assert!(!s.redeem_authorization_code(&hash(0xaf), NOW, &again, &audit(None, "oauth.token")).await.unwrap());
    assert_eq!(refresh_of(&*s, &rt2).await, None);

    // Without a refresh token; then the session signs in to the second client, and once more to
    // the first: each client is listed once, in the order of first sign-in.
    let issue = CodeIssue { jti: "jti-3".into(), jti_expires_at: NOW + 902, refresh: None };
    assert!(s.redeem_authorization_code(&bare.code_hash, NOW + 10, &issue, &audit(None, "oauth.token")).await.unwrap());
    assert_eq!(
        s.authorization_code(&bare.code_hash).await.unwrap(),
        Some(AuthorizationCode {
            consumed_at: Some(NOW + 10),
            issued_jti: Some("jti-3".into()),
            issued_jti_expires_at: Some(NOW + 902),
            issued_family: None,
            issued_session: None,
            ..bare.clone()
        })
    );
    let c3 = code(&f.app, &f.ann, &f.ann_session, 0xa3);
    s.insert_authorization_code(&c3, &audit(None, "oauth.authorize")).await.unwrap();
    let issue = CodeIssue { jti: "jti-4".into(), jti_expires_at: NOW + 900, refresh: None };
    assert!(s.redeem_authorization_code(&c3.code_hash, NOW + 20, &issue, &audit(None, "oauth.token")).await.unwrap());
    assert_eq!(
        s.session_clients(&f.ann_session.id).await.unwrap(),
        vec!["acme$web".to_owned(), "acme$portal".to_owned()],
        "oldest first (not by name), each once"
    );
    assert!(s.session_clients(&f.bob_session.id).await.unwrap().is_empty());
    assert!(s.session_clients(&new_id()).await.unwrap().is_empty());
}

/// A gateway browser session made from ann's SSO session, its token hash `hash(seed)`.
fn browser_session(f: &Oidc, seed: u8) -> Session {
    Session {
        state: CredentialState::Active,
        verified_at: Some(NOW + 5),
        created_at: NOW + 5,
        last_used_at: NOW + 5,
        parent_id: Some(f.ann_session.id.clone()),
        user_agent: Some("gateway acme$web".into()),
        ..session(&f.ann, seed)
    }
}

async fn codes_are_redeemed_once_for_a_gateway_browser_session(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let c = code(&f.app, &f.ann, &f.ann_session, 0xa1);
    s.insert_authorization_code(&c, &audit(Some(&f.org.id), "oauth.authorize")).await.unwrap();

    // Redeemed: the code records the session, which is stored as given (parent included), and
    // the SSO session is recorded as signed in to the client.
    let browser = browser_session(&f, 0x31);
    let ev = audit(Some(&f.org.id), "gateway.session.create");
    assert!(s.redeem_code_for_session(&c.code_hash, NOW + 5, &browser, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    let redeemed =
        AuthorizationCode { consumed_at: Some(NOW + 5), issued_session: Some(browser.id.clone()), ..c.clone() };
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&redeemed));
    assert_eq!(s.session(&browser.id).await.unwrap().as_ref(), Some(&browser), "every field round-trips");
    assert_eq!(s.session_by_token(&hash(0x31)).await.unwrap().as_ref(), Some(&browser));
    assert_eq!(s.session_clients(&f.ann_session.id).await.unwrap(), vec!["acme$web".to_owned()]);

    // Again (or as an access-token redemption): false, nothing written.
    let second = browser_session(&f, 0x32);
    let again = audit(Some(&f.org.id), "gateway.session.create");
    assert!(!s.redeem_code_for_session(&c.code_hash, NOW + 6, &second, &again).await.unwrap());
    let issue = CodeIssue { jti: "jti-x".into(), jti_expires_at: NOW + 900, refresh: None };
    assert!(!s.redeem_authorization_code(&c.code_hash, NOW + 6, &issue, &again).await.unwrap());
    assert!(!audited(&*s, &again).await);
    assert_eq!(s.session(&second.id).await.unwrap(), None);
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&redeemed));
    assert!(!s.redeem_code_for_session(&hash(0xaf), NOW, &second, &again).await.unwrap());

    // The replay revokes the browser session (and nothing else of ann's).
    let replay = audit(Some(&f.org.id), "oauth.code.replay");
    assert!(s.revoke_code_grant(&c.code_hash, NOW + 7, &replay).await.unwrap());
    assert!(audited(&*s, &replay).await);
    let revoked = s.session(&browser.id).await.unwrap().unwrap();
    assert_eq!((revoked.state, revoked.revoked_at), (CredentialState::Revoked, Some(NOW + 7)));
    assert_eq!(s.session(&f.ann_session.id).await.unwrap().unwrap().state, CredentialState::Active);
    assert!(!s.revoke_code_grant(&c.code_hash, NOW + 8, &audit(None, "oauth.code.replay")).await.unwrap(), "once");

    // A code whose SSO session was signed out: refused, nothing written.
    let c2 = code(&f.app, &f.bob, &f.bob_session, 0xa2);
    s.insert_authorization_code(&c2, &audit(None, "oauth.authorize")).await.unwrap();
    assert!(s.revoke_session(&f.bob_session.id, NOW + 9, &audit(None, "session.revoke")).await.unwrap());
    let late = Session { parent_id: Some(f.bob_session.id.clone()), ..session(&f.bob, 0x33) };
    assert!(
        !s.redeem_code_for_session(&c2.code_hash, NOW + 10, &late, &audit(None, "gateway.session.create"))
            .await
            .unwrap()
    );
    assert_eq!(s.session(&late.id).await.unwrap(), None);
    assert_eq!(s.authorization_code(&c2.code_hash).await.unwrap().unwrap().consumed_at, None);
}

async fn concurrent_code_redemptions_one_wins(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let c = code(&f.app, &f.ann, &f.ann_session, 0xa1);
    s.insert_authorization_code(&c, &audit(Some(&f.org.id), "oauth.authorize")).await.unwrap();
    let before = audit_len(&*s).await;
    let issues: Vec<CodeIssue> = (0..8u8)
        .map(|i| CodeIssue {
            jti: format!("jti-{i}"),
            jti_expires_at: NOW + 900,
            refresh: Some(refresh_token(&f.app, &f.ann, &f.ann_session.id, &format!("fam-{i}"), 0x90 + i)),
        })
        .collect();
    let outcomes = futures_join_all(issues.iter().cloned().map(|issue| {
        let s = s.clone();
        let code_hash = c.code_hash.clone();
        let ev = audit(None, "oauth.token");
        async move { s.redeem_authorization_code(&code_hash, NOW + 1, &issue, &ev).await }
    }))
    .await;
    let winners: Vec<usize> = (0..8).filter(|&i| *outcomes[i].as_ref().unwrap()).collect();
    assert_eq!(winners.len(), 1, "exactly one redemption wins: {outcomes:?}");
    let won = &issues[winners[0]];
    let stored = s.authorization_code(&c.code_hash).await.unwrap().unwrap();
    assert_eq!(stored.issued_jti.as_ref(), Some(&won.jti));
    assert_eq!(stored.issued_family.as_deref(), won.refresh.as_ref().map(|r| r.family_id.as_str()));
    for issue in &issues {
        let rt = issue.refresh.as_ref().unwrap();
        assert_eq!(refresh_of(&*s, rt).await.is_some(), issue.jti == won.jti, "only the winner's refresh token");
    }
    assert_eq!(audit_len(&*s).await, before + 1);
    assert_eq!(s.session_clients(&f.ann_session.id).await.unwrap(), vec!["acme$web".to_owned()]);
}

async fn replayed_codes_revoke_their_access_token_and_family(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let c = code(&f.app, &f.ann, &f.ann_session, 0xa1);
    s.insert_authorization_code(&c, &audit(None, "oauth.authorize")).await.unwrap();

    // Never redeemed, or unknown: nothing to revoke, nothing written.
    let ev = audit(None, "oauth.code.replay");
    assert!(!s.revoke_code_grant(&c.code_hash, NOW, &ev).await.unwrap());
    assert!(!s.revoke_code_grant(&hash(0xaf), NOW, &ev).await.unwrap());
    assert!(!audited(&*s, &ev).await);
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&c));

    let rt = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    let issue = CodeIssue { jti: "jti-1".into(), jti_expires_at: NOW + 900, refresh: Some(rt.clone()) };
    assert!(s.redeem_authorization_code(&c.code_hash, NOW + 1, &issue, &audit(None, "oauth.token")).await.unwrap());
    // The family grew by a rotation; another grant of the same user is untouched.
    let rt2 = RefreshToken { created_at: NOW + 10, ..refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x82) };
    assert!(s.rotate_refresh_token(&rt.id, NOW + 10, &rt2, &audit(None, "oauth.refresh")).await.unwrap());
    let c2 = code(&f.app, &f.ann, &f.ann_session, 0xa2);
    s.insert_authorization_code(&c2, &audit(None, "oauth.authorize")).await.unwrap();
    let other = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-2", 0x83);
    let issue2 = CodeIssue { jti: "jti-2".into(), jti_expires_at: NOW + 950, refresh: Some(other.clone()) };
    assert!(s.redeem_authorization_code(&c2.code_hash, NOW + 2, &issue2, &audit(None, "oauth.token")).await.unwrap());

    assert!(!s.is_token_revoked("jti-1").await.unwrap());
    let ev = audit(Some(&f.org.id), "oauth.code.replay");
    assert!(s.revoke_code_grant(&c.code_hash, NOW + 20, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert!(s.is_token_revoked("jti-1").await.unwrap(), "the access token is on the revocation list");
    assert_eq!(
        refresh_of(&*s, &rt).await,
        Some(RefreshToken { used_at: Some(NOW + 10), revoked_at: Some(NOW + 20), ..rt.clone() })
    );
    assert_eq!(refresh_of(&*s, &rt2).await, Some(RefreshToken { revoked_at: Some(NOW + 20), ..rt2.clone() }));
    assert_eq!(refresh_of(&*s, &other).await.as_ref(), Some(&other), "another family is untouched");
    assert!(!s.is_token_revoked("jti-2").await.unwrap());

    // A second replay: false, nothing written.
    let again = audit(Some(&f.org.id), "oauth.code.replay");
    assert!(!s.revoke_code_grant(&c.code_hash, NOW + 30, &again).await.unwrap());
    assert!(!audited(&*s, &again).await);
    assert_eq!(refresh_of(&*s, &rt).await.unwrap().revoked_at, Some(NOW + 20), "first revocation time kept");

    // The access token was revoked already (by its client): the duplicate is ignored, the
    // family still goes.
    let t =
        RevokedToken { jti: "jti-2".into(), client_id: "acme$web".into(), expires_at: NOW + 950, revoked_at: NOW + 3 };
    s.revoke_token(&t, &audit(None, "token.revoke")).await.unwrap();
    assert!(s.revoke_code_grant(&c2.code_hash, NOW + 40, &audit(None, "oauth.code.replay")).await.unwrap());
    assert_eq!(refresh_of(&*s, &other).await.unwrap().revoked_at, Some(NOW + 40));

    // A code redeemed without a refresh token: the access token alone.
    let c3 = code(&f.other_app, &f.bob, &f.bob_session, 0xa3);
    s.insert_authorization_code(&c3, &audit(None, "oauth.authorize")).await.unwrap();
    let issue3 = CodeIssue { jti: "jti-3".into(), jti_expires_at: NOW + 800, refresh: None };
    assert!(s.redeem_authorization_code(&c3.code_hash, NOW + 3, &issue3, &audit(None, "oauth.token")).await.unwrap());
    assert!(s.revoke_code_grant(&c3.code_hash, NOW + 50, &audit(None, "oauth.code.replay")).await.unwrap());
    assert!(s.is_token_revoked("jti-3").await.unwrap());

    // Each entry is kept exactly as long as its access token lives.
    assert_eq!(s.purge_expired_revocations(NOW + 800).await.unwrap(), 0);
    assert_eq!(s.purge_expired_revocations(NOW + 801).await.unwrap(), 1, "jti-3");
    assert_eq!(s.purge_expired_revocations(NOW + 900).await.unwrap(), 0);
    assert_eq!(s.purge_expired_revocations(NOW + 901).await.unwrap(), 1, "jti-1");
    assert!(s.is_token_revoked("jti-2").await.unwrap());
}

async fn refresh_tokens_rotate_once_and_families_are_revoked_together(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let first = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    let bare = RefreshToken { amr: vec![], ..refresh_token(&f.other_app, &f.ann, &f.ann_session.id, "fam-2", 0x82) };
    issue_refresh(&*s, &first, 0xa1).await;
    issue_refresh(&*s, &bare, 0xa2).await;
    assert_eq!(refresh_of(&*s, &first).await.as_ref(), Some(&first));
    assert_eq!(refresh_of(&*s, &bare).await.as_ref(), Some(&bare));
    assert_eq!(s.refresh_token_by_hash(&hash(0x8f)).await.unwrap(), None);

    let second =
        RefreshToken { created_at: NOW + 10, ..refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x84) };
    let ev = audit(Some(&f.org.id), "oauth.refresh");
    assert!(s.rotate_refresh_token(&first.id, NOW + 10, &second, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(refresh_of(&*s, &first).await, Some(RefreshToken { used_at: Some(NOW + 10), ..first.clone() }));
    assert_eq!(refresh_of(&*s, &second).await.as_ref(), Some(&second));

    // Used already: false, nothing written.
    let third = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x85);
    let ev3 = audit(Some(&f.org.id), "oauth.refresh");
    assert!(!s.rotate_refresh_token(&first.id, NOW + 11, &third, &ev3).await.unwrap());
    assert!(!audited(&*s, &ev3).await);
    assert_eq!(refresh_of(&*s, &third).await, None);
    assert_eq!(refresh_of(&*s, &first).await.unwrap().used_at, Some(NOW + 10));
    assert!(!s.rotate_refresh_token(&new_id(), NOW + 11, &third, &ev3).await.unwrap(), "unknown id");
    assert_eq!(refresh_of(&*s, &third).await, None);

    // A successor whose hash is taken: Conflict, and the token stays unused.
    let clash = RefreshToken {
        token_hash: bare.token_hash.clone(),
        ..refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x86)
    };
    let clash_ev = audit(Some(&f.org.id), "oauth.refresh");
    assert_conflict(s.rotate_refresh_token(&second.id, NOW + 12, &clash, &clash_ev).await, "successor hash taken");
    assert!(!audited(&*s, &clash_ev).await);
    assert_eq!(refresh_of(&*s, &second).await.as_ref(), Some(&second), "still unused");
    assert_eq!(refresh_of(&*s, &bare).await.as_ref(), Some(&bare));

    // The family is revoked together (used and unused tokens alike); other families stay.
    let ev = audit(Some(&f.org.id), "oauth.refresh.reuse");
    assert_eq!(s.revoke_refresh_family("fam-1", NOW + 20, &ev).await.unwrap(), 2);
    assert!(audited(&*s, &ev).await);
    assert_eq!(
        refresh_of(&*s, &first).await,
        Some(RefreshToken { used_at: Some(NOW + 10), revoked_at: Some(NOW + 20), ..first.clone() })
    );
    assert_eq!(refresh_of(&*s, &second).await, Some(RefreshToken { revoked_at: Some(NOW + 20), ..second.clone() }));
    assert_eq!(refresh_of(&*s, &bare).await.as_ref(), Some(&bare));
    // A revoked token does not rotate.
    let ev = audit(Some(&f.org.id), "oauth.refresh");
    assert!(!s.rotate_refresh_token(&second.id, NOW + 21, &third, &ev).await.unwrap());
    assert!(!audited(&*s, &ev).await);
    assert_eq!(refresh_of(&*s, &third).await, None);
    // Revoking again changes nothing.
    assert_eq!(s.revoke_refresh_family("fam-1", NOW + 30, &audit(None, "x")).await.unwrap(), 0);
    assert_eq!(refresh_of(&*s, &second).await.unwrap().revoked_at, Some(NOW + 20));
    assert_eq!(s.revoke_refresh_family("fam-none", NOW + 30, &audit(None, "x")).await.unwrap(), 0);
}

async fn concurrent_refresh_rotations_one_wins(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let rt = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    issue_refresh(&*s, &rt, 0xa1).await;
    let before = audit_len(&*s).await;
    let successors: Vec<RefreshToken> =
        (0..8u8).map(|i| refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x90 + i)).collect();
    let outcomes = futures_join_all(successors.iter().cloned().map(|new| {
        let s = s.clone();
        let old = rt.id.clone();
        let ev = audit(None, "oauth.refresh");
        async move { s.rotate_refresh_token(&old, NOW + 1, &new, &ev).await }
    }))
    .await;
    let winners: Vec<usize> = (0..8).filter(|&i| *outcomes[i].as_ref().unwrap()).collect();
    assert_eq!(winners.len(), 1, "exactly one rotation wins: {outcomes:?}");
    for (i, new) in successors.iter().enumerate() {
        assert_eq!(refresh_of(&*s, new).await.is_some(), i == winners[0], "only the winner's successor is stored");
    }
    assert_eq!(refresh_of(&*s, &rt).await.unwrap().used_at, Some(NOW + 1));
    assert_eq!(audit_len(&*s).await, before + 1);
}

async fn ending_an_sso_session_revokes_its_tokens_and_queues_logouts(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let a1 = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-a1", 0x81);
    let a2 = refresh_token(&f.other_app, &f.ann, &f.ann_session.id, "fam-a2", 0x82);
    let b = refresh_token(&f.app, &f.bob, &f.bob_session.id, "fam-b", 0x83);
    for (rt, seed) in [(&a1, 0xa1), (&a2, 0xa2), (&b, 0xa3)] {
        issue_refresh(&*s, rt, seed).await;
    }
    assert_eq!(s.revoke_refresh_family("fam-a2", NOW + 1, &audit(None, "x")).await.unwrap(), 1);

    let d1 = delivery(&f.app, NOW, NOW);
    let d2 = delivery(&f.other_app, NOW + 1, NOW);
    let ev = audit(Some(&f.org.id), "session.logout");
    assert!(s.end_sso_session(&f.ann_session.id, NOW + 50, &[d2.clone(), d1.clone()], &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(state_of(&*s, &f.ann_session.id).await, (CredentialState::Revoked, Some(NOW + 50)));
    assert_eq!(refresh_of(&*s, &a1).await, Some(RefreshToken { revoked_at: Some(NOW + 50), ..a1.clone() }));
    assert_eq!(refresh_of(&*s, &a2).await.unwrap().revoked_at, Some(NOW + 1), "an earlier revocation keeps its time");
    assert_eq!(refresh_of(&*s, &b).await.as_ref(), Some(&b), "other sessions' tokens stay");
    assert_eq!(s.session(&f.bob_session.id).await.unwrap().as_ref(), Some(&f.bob_session));
    assert_eq!(s.due_logout_deliveries(NOW, 10).await.unwrap(), vec![d1.clone(), d2.clone()], "queued, round-trip");

    // Ended already: false, nothing written.
    let d3 = delivery(&f.app, NOW + 2, NOW);
    let again = audit(Some(&f.org.id), "session.logout");
    assert!(!s.end_sso_session(&f.ann_session.id, NOW + 60, std::slice::from_ref(&d3), &again).await.unwrap());
    assert!(!audited(&*s, &again).await);
    assert_eq!(s.due_logout_deliveries(NOW, 10).await.unwrap(), vec![d1.clone(), d2.clone()]);
    assert_eq!(state_of(&*s, &f.ann_session.id).await, (CredentialState::Revoked, Some(NOW + 50)));
    // Revoked otherwise: the same.
    let bob2 = active_session(&*s, &f.bob, 3).await;
    assert!(s.revoke_session(&bob2.id, NOW + 5, &audit(None, "session.revoke")).await.unwrap());
    assert!(!s.end_sso_session(&bob2.id, NOW + 60, std::slice::from_ref(&d3), &again).await.unwrap());
    assert!(!s.end_sso_session(&new_id(), NOW + 60, std::slice::from_ref(&d3), &again).await.unwrap());
    assert!(!audited(&*s, &again).await);
    assert_eq!(s.due_logout_deliveries(NOW, 10).await.unwrap().len(), 2);
    // A pending session can be ended (no deliveries).
    let (pending, _) = seed_session(&*s, &f.bob, 4).await;
    assert!(s.end_sso_session(&pending.id, NOW + 70, &[], &audit(None, "session.logout")).await.unwrap());
    assert_eq!(state_of(&*s, &pending.id).await, (CredentialState::Revoked, Some(NOW + 70)));
    assert_eq!(refresh_of(&*s, &b).await.as_ref(), Some(&b));
}

async fn logout_deliveries_are_due_retried_delivered_and_given_up(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let late = delivery(&f.app, NOW, NOW + 100);
    let first = delivery(&f.app, NOW + 1, NOW);
    let second = delivery(&f.other_app, NOW + 2, NOW - 5);
    let third = delivery(&f.app, NOW + 3, NOW);
    let all_four = [third.clone(), late.clone(), second.clone(), first.clone()];
    assert!(s.end_sso_session(&f.ann_session.id, NOW, &all_four, &audit(None, "session.logout")).await.unwrap());
    assert_eq!(s.due_logout_deliveries(NOW - 6, 10).await.unwrap(), vec![]);
    assert_eq!(s.due_logout_deliveries(NOW, 10).await.unwrap(), vec![first.clone(), second.clone(), third.clone()]);
    assert_eq!(s.due_logout_deliveries(NOW, 2).await.unwrap(), vec![first.clone(), second.clone()]);
    assert_eq!(
        s.due_logout_deliveries(NOW + 100, 10).await.unwrap(),
        vec![late.clone(), first.clone(), second.clone(), third.clone()],
        "oldest first"
    );

    // A failure with a retry: counted, due later.
    s.logout_delivery_failed(&first.id, 1, Some(NOW + 60), NOW).await.unwrap();
    let retried = LogoutDelivery { attempts: 1, next_attempt_at: NOW + 60, ..first.clone() };
    assert_eq!(s.due_logout_deliveries(NOW, 10).await.unwrap(), vec![second.clone(), third.clone()]);
    assert_eq!(
        s.due_logout_deliveries(NOW + 60, 10).await.unwrap(),
        vec![retried.clone(), second.clone(), third.clone()]
    );
    // Given up, or delivered: never due again, whatever comes after.
    s.logout_delivery_failed(&second.id, 5, None, NOW + 1).await.unwrap();
    s.logout_delivered(&third.id, NOW + 2).await.unwrap();
    s.logout_delivery_failed(&third.id, 1, Some(NOW + 3), NOW + 3).await.unwrap();
    s.logout_delivery_failed(&third.id, 2, None, NOW + 1).await.unwrap();
    s.logout_delivered(&second.id, NOW + 4).await.unwrap();
    assert_eq!(s.due_logout_deliveries(i64::MAX, 10).await.unwrap(), vec![late.clone(), retried.clone()]);
    // The recorded times: the failure at NOW + 1, the delivery at NOW + 2 (not overwritten).
    assert_eq!(s.purge_oidc(NOW + 2).await.unwrap(), 1, "the one given up before NOW + 2");
    assert_eq!(s.purge_oidc(NOW + 3).await.unwrap(), 1, "the one delivered at NOW + 2");
    assert_eq!(s.due_logout_deliveries(i64::MAX, 10).await.unwrap(), vec![late, retried]);
    // Unknown ids are no error.
    s.logout_delivered(&new_id(), NOW).await.unwrap();
    s.logout_delivery_failed(&new_id(), 1, None, NOW).await.unwrap();
}

async fn consents_are_saved_replaced_listed_and_revoked(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap(), None);
    assert!(s.user_consents(&f.ann.id).await.unwrap().is_empty());

    let c1 = consent(&f.ann, &f.app, &["email", "openid", "profile «ü»"], NOW);
    let c2 = consent(&f.ann, &f.other_app, &[], NOW + 5);
    let cb = consent(&f.bob, &f.app, &["openid"], NOW + 1);
    let ev = audit(Some(&f.org.id), "consent.grant");
    s.save_consent(&c1, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    for c in [&c2, &cb] {
        s.save_consent(c, &audit(Some(&f.org.id), "consent.grant")).await.unwrap();
    }
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap().as_ref(), Some(&c1));
    assert_eq!(s.consent(&f.ann.id, "acme$portal").await.unwrap().as_ref(), Some(&c2), "an empty list round-trips");
    assert_eq!(s.consent(&f.bob.id, "acme$web").await.unwrap().as_ref(), Some(&cb));
    assert_eq!(s.consent(&f.bob.id, "acme$portal").await.unwrap(), None);
    assert_eq!(s.user_consents(&f.ann.id).await.unwrap(), vec![c2.clone(), c1.clone()], "newest first");
    assert_eq!(s.user_consents(&f.bob.id).await.unwrap(), vec![cb.clone()]);

    // Saving again replaces.
    let wider = consent(&f.ann, &f.app, &["email", "offline_access", "openid", "profile «ü»"], NOW + 10);
    s.save_consent(&wider, &audit(Some(&f.org.id), "consent.grant")).await.unwrap();
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap().as_ref(), Some(&wider));
    assert_eq!(s.user_consents(&f.ann.id).await.unwrap(), vec![wider.clone(), c2.clone()]);

    // Revoking forgets the consent and revokes the user's refresh tokens for that client only.
    let ann_web = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    let ann_web_old = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-0", 0x84);
    let ann_portal = refresh_token(&f.other_app, &f.ann, &f.ann_session.id, "fam-2", 0x82);
    let bob_web = refresh_token(&f.app, &f.bob, &f.bob_session.id, "fam-3", 0x83);
    for (rt, seed) in [(&ann_web, 0xa1), (&ann_web_old, 0xa4), (&ann_portal, 0xa2), (&bob_web, 0xa3)] {
        issue_refresh(&*s, rt, seed).await;
    }
    s.revoke_refresh_family("fam-0", NOW + 15, &audit(None, "x")).await.unwrap();
    let ev = audit(Some(&f.org.id), "consent.revoke");
    assert!(s.revoke_consent(&f.ann.id, "acme$web", NOW + 20, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap(), None);
    assert_eq!(s.user_consents(&f.ann.id).await.unwrap(), vec![c2.clone()]);
    assert_eq!(s.consent(&f.bob.id, "acme$web").await.unwrap().as_ref(), Some(&cb));
    assert_eq!(refresh_of(&*s, &ann_web).await, Some(RefreshToken { revoked_at: Some(NOW + 20), ..ann_web.clone() }));
    assert_eq!(refresh_of(&*s, &ann_web_old).await.unwrap().revoked_at, Some(NOW + 15), "kept its time");
    assert_eq!(refresh_of(&*s, &ann_portal).await.as_ref(), Some(&ann_portal));
    assert_eq!(refresh_of(&*s, &bob_web).await.as_ref(), Some(&bob_web));

    // Again: false, nothing written.
    let again = audit(Some(&f.org.id), "consent.revoke");
    assert!(!s.revoke_consent(&f.ann.id, "acme$web", NOW + 30, &again).await.unwrap());
    assert!(!audited(&*s, &again).await);
    assert_eq!(refresh_of(&*s, &ann_web).await.unwrap().revoked_at, Some(NOW + 20));
}

/// Grants die with their application; other applications' grants stay.
async fn deleting_an_application_removes_its_grants(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let web_code = code(&f.app, &f.ann, &f.ann_session, 0xb1);
    let portal_code = code(&f.other_app, &f.ann, &f.ann_session, 0xb2);
    for c in [&web_code, &portal_code] {
        s.insert_authorization_code(c, &audit(None, "oauth.authorize")).await.unwrap();
    }
    let web_rt = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    let portal_rt = refresh_token(&f.other_app, &f.ann, &f.ann_session.id, "fam-2", 0x82);
    issue_refresh(&*s, &web_rt, 0xa1).await;
    issue_refresh(&*s, &portal_rt, 0xa2).await;
    for app in [&f.app, &f.other_app] {
        s.save_consent(&consent(&f.ann, app, &["openid"], NOW), &audit(None, "consent.grant")).await.unwrap();
    }
    assert!(s.delete_application("acme$web", &audit(Some(&f.org.id), "application.delete")).await.unwrap());
    assert_eq!(s.authorization_code(&web_code.code_hash).await.unwrap(), None);
    assert_eq!(s.authorization_code(&hash(0xa1)).await.unwrap(), None);
    assert_eq!(refresh_of(&*s, &web_rt).await, None);
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap(), None);
    assert_eq!(s.session_clients(&f.ann_session.id).await.unwrap(), vec!["acme$portal".to_owned()]);
    assert_eq!(s.authorization_code(&portal_code.code_hash).await.unwrap().as_ref(), Some(&portal_code));
    assert_eq!(refresh_of(&*s, &portal_rt).await.as_ref(), Some(&portal_rt));
    assert!(s.consent(&f.ann.id, "acme$portal").await.unwrap().is_some());
    // A new application with the same client id inherits nothing.
    seed_app(&*s, &f.org, "web").await;
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap(), None);
    assert_eq!(refresh_of(&*s, &web_rt).await, None);
}

async fn totp_steps_are_accepted_once_and_in_order(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap(), None);
    let ev = audit(Some(&f.org.id), "user.totp.verify");
    assert!(!s.use_totp_step(&f.ann.id, 10, true, NOW, &ev).await.unwrap(), "no enrolment");
    assert!(!audited(&*s, &ev).await);

    let t = totp(&f.ann, &[0x00, 0xff, 0x01, 0x00], NOW);
    let bobs = UserTotp { confirmed_at: Some(NOW - 5), last_step: Some(1_000), ..totp(&f.bob, &[7], NOW - 10) };
    let ev = audit(Some(&f.org.id), "user.totp.enrol");
    s.save_user_totp(&t, &ev).await.unwrap();
    assert!(audited(&*s, &ev).await);
    s.save_user_totp(&bobs, &audit(Some(&f.org.id), "user.totp.enrol")).await.unwrap();
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap().as_ref(), Some(&t));
    assert_eq!(s.user_totp(&f.bob.id).await.unwrap().as_ref(), Some(&bobs), "every field round-trips");

    // The first code confirms the enrolment.
    let ev = audit(Some(&f.org.id), "user.totp.verify");
    assert!(s.use_totp_step(&f.ann.id, 100, true, NOW + 5, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    let confirmed = UserTotp { confirmed_at: Some(NOW + 5), last_step: Some(100), ..t.clone() };
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap().as_ref(), Some(&confirmed));

    // The same step or an older one: refused, nothing written.
    for step in [100, 99, 0, -1] {
        let ev = audit(Some(&f.org.id), "user.totp.verify");
        assert!(!s.use_totp_step(&f.ann.id, step, true, NOW + 10, &ev).await.unwrap(), "step {step}");
        assert!(!audited(&*s, &ev).await);
        assert_eq!(s.user_totp(&f.ann.id).await.unwrap().as_ref(), Some(&confirmed));
    }
    // A later one is accepted; without `confirm` the confirmation time stays.
    assert!(s.use_totp_step(&f.ann.id, 101, false, NOW + 40, &audit(None, "user.totp.verify")).await.unwrap());
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap(), Some(UserTotp { last_step: Some(101), ..confirmed.clone() }));

    // Enrolling again over a confirmed app is refused, and writes nothing: only a reset
    // removes it.
    let again = totp(&f.ann, &[9, 9, 9], NOW + 50);
    let ev = audit(None, "user.totp.enrol");
    assert_conflict(s.save_user_totp(&again, &ev).await, "a confirmed enrolment is kept");
    assert!(!audited(&*s, &ev).await);
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap(), Some(UserTotp { last_step: Some(101), ..confirmed.clone() }));

    // Removed (an admin reset): once.
    let ev = audit(Some(&f.org.id), "user.totp.reset");
    assert!(s.delete_user_totp(&f.ann.id, &ev).await.unwrap());
    assert!(audited(&*s, &ev).await);
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap(), None);
    let ev = audit(Some(&f.org.id), "user.totp.reset");
    assert!(!s.delete_user_totp(&f.ann.id, &ev).await.unwrap());
    assert!(!audited(&*s, &ev).await);
    assert_eq!(s.user_totp(&f.bob.id).await.unwrap().as_ref(), Some(&bobs), "bob's factor untouched throughout");

    // After the reset a new enrolment starts afresh: new secret, unconfirmed, no step yet.
    s.save_user_totp(&again, &audit(None, "user.totp.enrol")).await.unwrap();
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap().as_ref(), Some(&again));
    assert!(s.use_totp_step(&f.ann.id, 50, true, NOW + 60, &audit(None, "user.totp.verify")).await.unwrap());
    assert_eq!(
        s.user_totp(&f.ann.id).await.unwrap(),
        Some(UserTotp { confirmed_at: Some(NOW + 60), last_step: Some(50), ..again.clone() })
    );
}

async fn concurrent_totp_uses_of_one_step_one_wins(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    s.save_user_totp(&totp(&f.ann, &[1, 2, 3], NOW), &audit(None, "user.totp.enrol")).await.unwrap();
    let before = audit_len(&*s).await;
    let outcomes = futures_join_all((0..8).map(|_| {
        let s = s.clone();
        let id = f.ann.id.clone();
        async move { s.use_totp_step(&id, 7, true, NOW + 1, &audit(None, "user.totp.verify")).await.unwrap() }
    }))
    .await;
    assert_eq!(outcomes.iter().filter(|won| **won).count(), 1, "one code, one login: {outcomes:?}");
    assert_eq!(audit_len(&*s).await, before + 1);
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap().unwrap().last_step, Some(7));
}

/// Like `auth_api_mutations_roll_back_with_their_audit_row`, for the OIDC methods.
async fn oidc_mutations_roll_back_with_their_audit_row(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let used = audit(Some(&f.org.id), "used");
    s.append_audit(&used).await.unwrap();
    let reuse = |action: &str| AuditEvent { action: action.into(), ..used.clone() };
    let ok = |action: &str| audit(Some(&f.org.id), action);
    let log_len = audit_len(&*s).await;
    let mut oks = 0;

    // set_organisation_self_registration
    assert_conflict(
        s.set_organisation_self_registration(&f.org.id, true, NOW + 5, &reuse("org")).await,
        "self_registration",
    );
    assert_eq!(s.organisation_by_id(&f.org.id).await.unwrap().as_ref(), Some(&f.org));

    // create_invited_user
    let zoe = User { password_hash: None, ..user(&f.org.id, "zoe@example.com") };
    let zoe_email = UserEmail::primary_of(&zoe);
    let zoe_v = verification(&zoe, VerificationPurpose::Invite, &zoe_email.id);
    assert_conflict(
        s.create_invited_user(&zoe, &zoe_email, &zoe_v, &mail("zoe@example.com"), &reuse("invite")).await,
        "create_invited_user",
    );
    assert_eq!(s.user(&f.org.id, &zoe.id).await.unwrap(), None);
    assert!(s.user_emails(&zoe.id).await.unwrap().is_empty());
    assert_eq!(s.verification(&zoe_v.id).await.unwrap(), None);
    assert!(queued_to(&*s, "zoe@example.com").await.is_empty());
    s.create_invited_user(&zoe, &zoe_email, &zoe_v, &mail("zoe@example.com"), &ok("invite")).await.unwrap();
    oks += 1;

    // consume_verification with AcceptInvite
    let accept = VerificationEffect::AcceptInvite {
        user_id: zoe.id.clone(),
        email_id: zoe_email.id.clone(),
        password_hash: "$argon2id$x".into(),
    };
    assert_conflict(s.consume_verification(&zoe_v.id, NOW + 5, &accept, &reuse("accept")).await, "accept invite");
    assert_eq!(s.user(&f.org.id, &zoe.id).await.unwrap().as_ref(), Some(&zoe), "no password set");
    assert_eq!(s.user_emails(&zoe.id).await.unwrap(), vec![zoe_email.clone()], "not verified");
    assert_eq!(s.verification(&zoe_v.id).await.unwrap().as_ref(), Some(&zoe_v), "not consumed");

    // insert_authorization_code
    let c = code(&f.app, &f.ann, &f.ann_session, 0xa1);
    assert_conflict(s.insert_authorization_code(&c, &reuse("authorize")).await, "insert_authorization_code");
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap(), None);
    s.insert_authorization_code(&c, &ok("authorize")).await.unwrap();
    oks += 1;

    // redeem_authorization_code
    let rt = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x81);
    let issue = CodeIssue { jti: "jti-1".into(), jti_expires_at: NOW + 900, refresh: Some(rt.clone()) };
    assert_conflict(s.redeem_authorization_code(&c.code_hash, NOW + 5, &issue, &reuse("token")).await, "redeem");
    assert_eq!(s.authorization_code(&c.code_hash).await.unwrap().as_ref(), Some(&c), "not consumed");
    assert_eq!(refresh_of(&*s, &rt).await, None, "no refresh token");
    assert!(s.session_clients(&f.ann_session.id).await.unwrap().is_empty(), "no session client");
    assert!(s.redeem_authorization_code(&c.code_hash, NOW + 5, &issue, &ok("token")).await.unwrap());
    oks += 1;

    // rotate_refresh_token
    let next = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 0x82);
    assert_conflict(s.rotate_refresh_token(&rt.id, NOW + 6, &next, &reuse("refresh")).await, "rotate");
    assert_eq!(refresh_of(&*s, &rt).await.as_ref(), Some(&rt), "still unused");
    assert_eq!(refresh_of(&*s, &next).await, None);

    // revoke_refresh_family
    assert_conflict(s.revoke_refresh_family("fam-1", NOW + 6, &reuse("family")).await, "revoke_refresh_family");
    assert_eq!(refresh_of(&*s, &rt).await.as_ref(), Some(&rt), "not revoked");

    // revoke_code_grant: undone entirely, so a later replay still revokes.
    assert_conflict(s.revoke_code_grant(&c.code_hash, NOW + 6, &reuse("replay")).await, "revoke_code_grant");
    assert!(!s.is_token_revoked("jti-1").await.unwrap());
    assert_eq!(refresh_of(&*s, &rt).await.as_ref(), Some(&rt));

    // end_sso_session
    let d = delivery(&f.app, NOW, NOW);
    assert_conflict(
        s.end_sso_session(&f.ann_session.id, NOW + 7, std::slice::from_ref(&d), &reuse("logout")).await,
        "end_sso_session",
    );
    assert_eq!(s.session(&f.ann_session.id).await.unwrap().as_ref(), Some(&f.ann_session), "still active");
    assert_eq!(refresh_of(&*s, &rt).await.as_ref(), Some(&rt));
    assert!(s.due_logout_deliveries(i64::MAX, 10).await.unwrap().is_empty(), "no delivery queued");

    // save_consent, revoke_consent
    let cons = consent(&f.ann, &f.app, &["openid"], NOW);
    assert_conflict(s.save_consent(&cons, &reuse("consent")).await, "save_consent");
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap(), None);
    s.save_consent(&cons, &ok("consent")).await.unwrap();
    oks += 1;
    let wider = consent(&f.ann, &f.app, &["openid", "profile"], NOW + 1);
    assert_conflict(s.save_consent(&wider, &reuse("consent")).await, "save_consent (replace)");
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap().as_ref(), Some(&cons));
    assert_conflict(s.revoke_consent(&f.ann.id, "acme$web", NOW + 8, &reuse("consent.revoke")).await, "revoke_consent");
    assert_eq!(s.consent(&f.ann.id, "acme$web").await.unwrap().as_ref(), Some(&cons));
    assert_eq!(refresh_of(&*s, &rt).await.as_ref(), Some(&rt));

    // TOTP
    let t = totp(&f.ann, &[1, 2], NOW);
    assert_conflict(s.save_user_totp(&t, &reuse("totp")).await, "save_user_totp");
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap(), None);
    s.save_user_totp(&t, &ok("totp")).await.unwrap();
    oks += 1;
    assert_conflict(s.save_user_totp(&totp(&f.ann, &[3], NOW + 1), &reuse("totp")).await, "save_user_totp (replace)");
    assert_conflict(s.use_totp_step(&f.ann.id, 5, true, NOW + 9, &reuse("totp.use")).await, "use_totp_step");
    assert_conflict(s.delete_user_totp(&f.ann.id, &reuse("totp.reset")).await, "delete_user_totp");
    assert_eq!(s.user_totp(&f.ann.id).await.unwrap().as_ref(), Some(&t), "unchanged");

    // What the refused calls would have done still works, once.
    assert!(s.revoke_code_grant(&c.code_hash, NOW + 10, &ok("replay")).await.unwrap());
    oks += 1;
    assert!(s.is_token_revoked("jti-1").await.unwrap());
    assert!(s.use_totp_step(&f.ann.id, 5, true, NOW + 10, &ok("totp.use")).await.unwrap());
    oks += 1;

    let log = s.audit_events(None, all()).await.unwrap();
    assert_eq!(log.iter().filter(|e| e.id == used.id).collect::<Vec<_>>(), vec![&used]);
    assert_eq!(log.len(), log_len + oks, "the successful writes only");
}

async fn purge_oidc_removes_only_what_is_due(s: Arc<dyn Store>) {
    let f = seed_oidc(&*s).await;
    let cut = NOW + 1000;
    // Codes: by expiry only, redeemed or not.
    let mk_code =
        |seed: u8, expires_at: UnixTime| AuthorizationCode { expires_at, ..code(&f.app, &f.ann, &f.ann_session, seed) };
    let codes = [
        (mk_code(0xb1, cut - 1), false, false),
        (mk_code(0xb2, cut - 1), true, false),
        (mk_code(0xb3, cut), false, true),
        (mk_code(0xb4, cut + 1), true, true),
    ];
    for (c, redeem, _) in &codes {
        s.insert_authorization_code(c, &audit(None, "oauth.authorize")).await.unwrap();
        if *redeem {
            let issue = CodeIssue { jti: new_id(), jti_expires_at: NOW + 900, refresh: None };
            assert!(s.redeem_authorization_code(&c.code_hash, NOW, &issue, &audit(None, "oauth.token")).await.unwrap());
        }
    }
    // Refresh tokens: by expiry only; a revoked or used one is kept until it expires (a reuse
    // must still be recognised).
    let mk_rt = |seed: u8, expires_at: UnixTime| RefreshToken {
        expires_at,
        ..refresh_token(&f.app, &f.ann, &f.ann_session.id, &format!("fam-{seed}"), seed)
    };
    let tokens = [(mk_rt(0x81, cut - 1), false), (mk_rt(0x82, cut), true), (mk_rt(0x83, cut + 500), true)];
    for (i, (rt, _)) in (0u8..).zip(&tokens) {
        issue_refresh(&*s, rt, 0xa1 + i).await;
    }
    s.revoke_refresh_family("fam-131", NOW, &audit(None, "x")).await.unwrap();
    // Deliveries: delivered or given up before the cut; pending ones never.
    let old_pending = delivery(&f.app, NOW - DAY, NOW);
    let delivered_before = delivery(&f.app, NOW, NOW);
    let delivered_at_cut = delivery(&f.app, NOW, NOW);
    let failed_before = delivery(&f.app, NOW, NOW);
    let failed_at_cut = delivery(&f.app, NOW, NOW);
    let ds = [
        old_pending.clone(),
        delivered_before.clone(),
        delivered_at_cut.clone(),
        failed_before.clone(),
        failed_at_cut.clone(),
    ];
    assert!(s.end_sso_session(&f.ann_session.id, NOW, &ds, &audit(None, "session.logout")).await.unwrap());
    s.logout_delivered(&delivered_before.id, cut - 1).await.unwrap();
    s.logout_delivered(&delivered_at_cut.id, cut).await.unwrap();
    s.logout_delivery_failed(&failed_before.id, 9, None, cut - 1).await.unwrap();
    s.logout_delivery_failed(&failed_at_cut.id, 9, None, cut).await.unwrap();

    assert_eq!(s.purge_oidc(cut).await.unwrap(), 2 + 1 + 2, "two codes, one token, two deliveries");
    for (c, _, kept) in &codes {
        assert_eq!(
            s.authorization_code(&c.code_hash).await.unwrap().is_some(),
            *kept,
            "code expiring {}",
            c.expires_at
        );
    }
    for (rt, kept) in &tokens {
        assert_eq!(refresh_of(&*s, rt).await.is_some(), *kept, "token expiring {}", rt.expires_at);
    }
    assert_eq!(s.purge_oidc(cut).await.unwrap(), 0);
    assert_eq!(s.purge_oidc(cut + 1).await.unwrap(), 1 + 1 + 2, "the ones at the cut");
    assert_eq!(s.due_logout_deliveries(i64::MAX, 10).await.unwrap(), vec![old_pending], "pending delivery stays");
    assert!(s.authorization_code(&codes[3].0.code_hash).await.unwrap().is_some());
    assert!(refresh_of(&*s, &tokens[2].0).await.is_some(), "a revoked token lives until it expires");
}

// ----------------------------------------------------------------------- PKI: migration --

const V2_SQLITE: [(i64, &str, &str); 2] = [
    (1, "0001_initial", include_str!("../migrations/sqlite/0001_initial.sql")),
    (2, "0002_auth_api", include_str!("../migrations/sqlite/0002_auth_api.sql")),
];
const V2_PG: [(i64, &str, &str); 2] = [
    (1, "0001_initial", include_str!("../migrations/postgres/0001_initial.sql")),
    (2, "0002_auth_api", include_str!("../migrations/postgres/0002_auth_api.sql")),
];

/// Schema v2 recorded as the store's runner records it, plus an organisation, an application
/// and a user written the way v2 wrote them.
fn schema_v2_with_rows(migrations: &[(i64, &str, &str)]) -> String {
    let mut sql = String::from(
        "CREATE TABLE IF NOT EXISTS portcullis_migrations (\n    version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at BIGINT NOT NULL);\n",
    );
    for (version, name, text) in migrations {
        sql.push_str(text);
        sql.push_str(&format!(
            "\nINSERT INTO portcullis_migrations (version, name, checksum, applied_at) VALUES ({version}, '{name}', '{}', 1);\n",
            portcullis_store::checksum(text)
        ));
    }
    sql.push_str(
        "INSERT INTO organisations (id, slug, name, created_at, updated_at) VALUES ('org-1', 'acme', 'Acme', 1, 2);
         INSERT INTO applications (id, org_id, slug, client_id, name, grant_types, scopes, roles, auth_method, redirect_uris,
             access_token_lifetime, signing_alg, enabled, created_at, updated_at)
         VALUES ('app-1', 'org-1', 'web', 'acme$web', 'Web', '[\"client_credentials\"]', '[]', '[]', 'private_key_jwt', '[]',
             900, 'ES256', TRUE, 1, 2);
         INSERT INTO users (id, org_id, email, name, password_hash, roles, enabled, created_at, updated_at)
         VALUES ('user-1', 'org-1', 'ann@example.com', NULL, NULL, '[\"portcullis:admin\"]', TRUE, 1, 2);",
    );
    sql
}

async fn v2_rows_survive_the_pki_migration(s: Arc<dyn Store>) {
    let acme = s.organisation("acme").await.unwrap().expect("the v2 organisation");
    assert!(acme.allowed_domains.is_empty(), "existing organisations allow no domains yet");
    assert!(!acme.self_registration);
    let app = s.application("acme$web").await.unwrap().expect("the v2 application");
    assert_oidc_defaults(&app);
    assert_eq!((app.jwks_uri, app.auth_method), (None, AuthMethod::PrivateKeyJwt));
    assert_eq!(s.users_with_role("org-1", "portcullis:admin", 10).await.unwrap().len(), 1);

    // The new tables work alongside the old rows.
    let domains = vec!["acme.example".to_owned()];
    assert!(
        s.set_organisation_domains("org-1", &domains, NOW, &audit(Some("org-1"), "organisation.domains"))
            .await
            .unwrap()
    );
    assert_eq!(s.organisation("acme").await.unwrap().unwrap().allowed_domains, domains);
    seed_issuer(&*s, "ca-1").await;
    let app = s.application("acme$web").await.unwrap().unwrap();
    add_cert(&*s, &issued(&app, "ca-1", "01", CertificateType::Signing, NOW, NOW + DAY)).await;
    assert_eq!(s.active_signing_certificates("app-1", NOW).await.unwrap().len(), 1);
    assert_eq!(s.next_crl_number("ca-1").await.unwrap(), 1);
    assert!(s.record_assertion_jti("acme$web", "j", NOW).await.unwrap());
}

// ---------------------------------------------------------------------- OIDC: migration --

/// What 0004 gives applications that existed before it.
#[track_caller]
fn assert_oidc_defaults(app: &Application) {
    assert_eq!(app.id_token_signing_alg, Algorithm::RS256);
    assert!(!app.first_party);
    assert!(app.post_logout_redirect_uris.is_empty());
    assert_eq!(app.backchannel_logout_uri, None);
    assert!(!app.always_issue_refresh_token);
}

const V3_SQLITE: [(i64, &str, &str); 3] =
    [V2_SQLITE[0], V2_SQLITE[1], (3, "0003_pki", include_str!("../migrations/sqlite/0003_pki.sql"))];
const V3_PG: [(i64, &str, &str); 3] =
    [V2_PG[0], V2_PG[1], (3, "0003_pki", include_str!("../migrations/postgres/0003_pki.sql"))];

/// Schema v3 with rows written the way v3 wrote them: an organisation with domains, an
/// application with a JWKS URL, a user with its address, an active session, an unconsumed
/// password-reset verification (blobs with 0x00 and 0xff: the session's token hash is
/// `hash(0x11)`, the code's `hash(0x12)`) and queued mail. `lit` writes the backend's literal
/// for bytes.
fn schema_v3_with_rows(migrations: &[(i64, &str, &str)], lit: fn(&[u8]) -> String) -> String {
    let mut sql = schema_v2_with_rows(&[]);
    let header_end = sql.find("INSERT INTO organisations").unwrap();
    sql.truncate(header_end);
    for (version, name, text) in migrations {
        sql.push_str(text);
        sql.push_str(&format!(
            "\nINSERT INTO portcullis_migrations (version, name, checksum, applied_at) VALUES ({version}, '{name}', '{}', 1);\n",
            portcullis_store::checksum(text)
        ));
    }
    sql.push_str(&format!(
        "INSERT INTO organisations (id, slug, name, allowed_domains, created_at, updated_at) VALUES ('org-1', 'acme', 'Acme', '[\"acme.example\"]', 1, 2);
         INSERT INTO applications (id, org_id, slug, client_id, name, grant_types, scopes, roles, auth_method, redirect_uris,
             access_token_lifetime, signing_alg, enabled, jwks_uri, created_at, updated_at)
         VALUES ('app-1', 'org-1', 'web', 'acme$web', 'Web', '[\"authorization_code\"]', '[]', '[]', 'private_key_jwt', '[\"https://web.example/cb\"]',
             900, 'ES256', TRUE, 'https://web.example/jwks', 1, 2);
         INSERT INTO users (id, org_id, email, name, password_hash, roles, enabled, failed_logins, locked_until, created_at, updated_at)
         VALUES ('user-1', 'org-1', 'ann@example.com', 'Ann', '$argon2id$v3', '[]', TRUE, 2, NULL, 1, 2);
         INSERT INTO user_emails (id, user_id, org_id, email, verified_at, created_at) VALUES ('user-1', 'user-1', 'org-1', 'ann@example.com', 3, 1);
         INSERT INTO sessions (id, user_id, org_id, token_hash, state, created_at, verified_at, last_used_at, expires_at, ip, user_agent, revoked_at)
         VALUES ('sess-1', 'user-1', 'org-1', {token}, 'active', 1, 2, 3, {far}, NULL, NULL, NULL);
         INSERT INTO verifications (id, purpose, org_id, user_id, subject_id, code_hash, attempts, expires_at, consumed_at, created_at, sealed_token)
         VALUES ('ver-1', 'password_reset', 'org-1', 'user-1', 'user-1', {code}, 1, {far}, NULL, 1, {bytes});
         INSERT INTO mail_queue (id, to_addr, subject, sealed_body, attempts, next_attempt_at, last_error, created_at, sent_at)
         VALUES ('mail-1', 'ann@example.com', 'Reset', {bytes}, 0, 1, NULL, 1, NULL);",
        far = NOW + DAY,
        token = lit(&hash(0x11).0),
        code = lit(&hash(0x12).0),
        bytes = lit(&[0x00, 0xff, 0x10]),
    ));
    sql
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

mod upgrade_v3 {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_v3_rows_survive_the_oidc_migration() {
        let before = super::schema_v3_with_rows(&super::V3_SQLITE, |b| format!("X'{}'", super::hex(b)));
        super::run_sqlite_from(super::v3_rows_survive_the_oidc_migration, Some(before)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_v3_rows_survive_the_oidc_migration() {
        let before = super::schema_v3_with_rows(&super::V3_PG, |b| format!("'\\x{}'::bytea", super::hex(b)));
        super::run_pg_from(super::v3_rows_survive_the_oidc_migration, Some(before)).await;
    }
}

async fn v3_rows_survive_the_oidc_migration(s: Arc<dyn Store>) {
    let acme = s.organisation("acme").await.unwrap().expect("the v3 organisation");
    assert_eq!((acme.allowed_domains.as_slice(), acme.self_registration), (&["acme.example".to_owned()][..], false));
    let app = s.application("acme$web").await.unwrap().expect("the v3 application");
    assert_eq!(app.jwks_uri.as_deref(), Some("https://web.example/jwks"));
    assert_oidc_defaults(&app);
    let ann = s.user("org-1", "user-1").await.unwrap().expect("the v3 user");
    assert_eq!(s.user_emails("user-1").await.unwrap()[0].verified_at, Some(3));
    let sess = s.session("sess-1").await.unwrap().expect("the v3 session");
    assert_eq!(sess.state, CredentialState::Active);
    // The verifications table was rebuilt on SQLite: every column of the old row survives.
    assert_eq!(sess.token_hash, hash(0x11));
    let blob = [0x00, 0xff, 0x10];
    let v = s.verification("ver-1").await.unwrap().expect("the v3 verification");
    assert_eq!(v.code_hash, hash(0x12));
    assert_eq!(
        (v.purpose, v.subject_id.as_str(), v.attempts, v.consumed_at, v.created_at, v.sealed_token.as_deref()),
        (VerificationPurpose::PasswordReset, "user-1", 1, None, 1, Some(&blob[..]))
    );
    assert_eq!(v.expires_at, NOW + DAY);
    assert_eq!(s.pending_mail_count().await.unwrap(), 1);

    // Invitations are verifications now; the old one still works, and still goes with its user.
    let invite = verification(&ann, VerificationPurpose::Invite, "user-1");
    s.create_verification(&invite, &mail("ann@example.com"), &audit(Some("org-1"), "user.invite")).await.unwrap();
    assert_eq!(s.verification(&invite.id).await.unwrap().as_ref(), Some(&invite));
    assert_eq!(s.count_verification_attempt("ver-1").await.unwrap(), Some(2));

    // The new tables work with the old rows.
    let c = AuthorizationCode {
        client_id: "acme$web".into(),
        org_id: "org-1".into(),
        user_id: "user-1".into(),
        session_id: "sess-1".into(),
        ..code_template()
    };
    s.insert_authorization_code(&c, &audit(Some("org-1"), "oauth.authorize")).await.unwrap();
    let rt = refresh_token(&app, &ann, "sess-1", "fam-1", 0x81);
    let issue = CodeIssue { jti: "jti-1".into(), jti_expires_at: NOW + 900, refresh: Some(rt.clone()) };
    assert!(
        s.redeem_authorization_code(&c.code_hash, NOW, &issue, &audit(Some("org-1"), "oauth.token")).await.unwrap()
    );
    assert_eq!(s.session_clients("sess-1").await.unwrap(), vec!["acme$web".to_owned()]);
    assert!(s.set_organisation_self_registration("org-1", true, NOW, &audit(Some("org-1"), "org")).await.unwrap());

    assert!(s.delete_user("org-1", "user-1", &audit(Some("org-1"), "user.delete")).await.unwrap());
    assert_eq!(s.verification("ver-1").await.unwrap(), None);
    assert_eq!(s.verification(&invite.id).await.unwrap(), None);
    assert_eq!(s.refresh_token_by_hash(&rt.token_hash).await.unwrap(), None);
    assert!(s.session_clients("sess-1").await.unwrap().is_empty());
}

// ------------------------------------------------------------- gateway control plane --

async fn audit_marks_follow_positions_and_fetch_skipped_ones(s: Arc<dyn Store>) {
    assert_eq!(s.latest_audit_seq().await.unwrap(), 0, "an empty log is at position 0");
    assert!(s.audit_marks(0, &[], 100).await.unwrap().is_empty());
    assert!(s.audit_marks(0, &[1, 2], 100).await.unwrap().is_empty(), "positions that hold nothing");

    let mut written = Vec::new();
    for (i, outcome) in ["success", "failure", "success", "success", "failure"].into_iter().enumerate() {
        let ev = AuditEvent { at: NOW + i as i64, outcome: outcome.into(), ..audit(None, &format!("feed.{i}")) };
        s.append_audit(&ev).await.unwrap();
        written.push(ev);
    }
    // A mutation that fails on its audit row (a reused id) writes no row; on PostgreSQL it
    // still uses up a position, which the feed must tolerate.
    let org = organisation("acme");
    assert_conflict(s.create_organisation(&org, &written[0]).await, "reused audit id");
    let last = audit(Some(&org.id), "organisation.create");
    s.create_organisation(&org, &last).await.unwrap();
    written.push(last);

    let marks = s.audit_marks(0, &[], 100).await.unwrap();
    assert_eq!(marks.len(), written.len(), "{marks:?}");
    for (m, ev) in marks.iter().zip(&written) {
        assert_eq!((m.at, m.action.as_str(), m.outcome.as_str()), (ev.at, ev.action.as_str(), ev.outcome.as_str()));
    }
    assert!(marks.windows(2).all(|w| w[0].seq < w[1].seq), "positions increase: {marks:?}");
    assert!(marks[0].seq > 0);
    let latest = s.latest_audit_seq().await.unwrap();
    assert_eq!(latest, marks.last().unwrap().seq, "the newest row's position");

    // Paged by `max`, resumed from the last position seen.
    let first = s.audit_marks(0, &[], 2).await.unwrap();
    assert_eq!(first, marks[..2]);
    let rest = s.audit_marks(first[1].seq, &[], 100).await.unwrap();
    assert_eq!(rest, marks[2..]);
    assert!(s.audit_marks(latest, &[], 100).await.unwrap().is_empty(), "nothing after the newest");

    // Positions asked for again: those at or before `after` come back (once, in order),
    // whatever `max`; positions after `after` are left to the paged query.
    let again = s.audit_marks(latest, &[marks[3].seq, marks[1].seq, marks[3].seq, latest + 50], 1).await.unwrap();
    assert_eq!(again, vec![marks[1].clone(), marks[3].clone()]);
    let both = s.audit_marks(marks[1].seq, &[marks[0].seq, marks[4].seq], 1).await.unwrap();
    assert_eq!(both, vec![marks[0].clone(), marks[2].clone()], "the page holds one new row, plus the one asked for");
    let many: Vec<i64> = (0..=latest + 300).collect();
    assert_eq!(s.audit_marks(latest, &many, 10).await.unwrap(), marks, "long lists of positions are fine");

    // Rows written by other methods land in the same sequence, after the rest.
    let t = RevokedToken { jti: "j".into(), client_id: "acme$web".into(), expires_at: NOW + 60, revoked_at: NOW };
    s.revoke_token(&t, &audit(None, "token.revoke")).await.unwrap();
    let next = s.audit_marks(latest, &[], 100).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].action, "token.revoke");
    assert!(next[0].seq > latest);
    assert_eq!(s.latest_audit_seq().await.unwrap(), next[0].seq);
}

async fn revoked_tokens_since_filter_by_revocation_and_expiry(s: Arc<dyn Store>) {
    assert!(s.revoked_tokens_since(i64::MIN, NOW, 100).await.unwrap().is_empty());
    let tok = |jti: &str, revoked_at: UnixTime, expires_at: UnixTime| RevokedToken {
        jti: jti.into(),
        client_id: "acme$web".into(),
        expires_at,
        revoked_at,
    };
    let old = tok("old", NOW - 100, NOW + 100);
    let b = tok("b", NOW, NOW + 10);
    let a = tok("a", NOW, NOW + 50);
    let expired = tok("expired", NOW + 5, NOW - 1);
    let late = tok("late", NOW + 7, NOW + 3600);
    for t in [&old, &b, &a, &expired, &late] {
        s.revoke_token(t, &audit(None, "token.revoke")).await.unwrap();
    }
    let jtis = |v: Vec<RevokedToken>| v.into_iter().map(|t| t.jti).collect::<Vec<_>>();

    let every = s.revoked_tokens_since(i64::MIN, NOW, 100).await.unwrap();
    assert_eq!(
        every,
        vec![old.clone(), a.clone(), b.clone(), late.clone()],
        "by revoked_at then jti; expired left out"
    );
    assert_eq!(jtis(s.revoked_tokens_since(NOW, NOW, 100).await.unwrap()), ["a", "b", "late"], "since is inclusive");
    assert_eq!(jtis(s.revoked_tokens_since(NOW + 1, NOW, 100).await.unwrap()), ["late"]);
    assert_eq!(jtis(s.revoked_tokens_since(NOW + 8, NOW, 100).await.unwrap()), Vec::<String>::new());
    assert_eq!(jtis(s.revoked_tokens_since(NOW, NOW + 10, 100).await.unwrap()), ["a", "b", "late"], "expiry inclusive");
    assert_eq!(jtis(s.revoked_tokens_since(NOW, NOW + 11, 100).await.unwrap()), ["a", "late"]);
    assert_eq!(
        jtis(s.revoked_tokens_since(i64::MIN, NOW - 1, 100).await.unwrap()),
        ["old", "a", "b", "expired", "late"]
    );
    assert_eq!(
        jtis(s.revoked_tokens_since(i64::MIN, NOW, 2).await.unwrap()),
        ["old", "a"],
        "at most max, oldest first"
    );

    s.purge_expired_revocations(NOW + 20).await.unwrap();
    assert_eq!(jtis(s.revoked_tokens_since(i64::MIN, i64::MIN, 100).await.unwrap()), ["old", "a", "late"]);
}

async fn all_role_grants_span_organisations(s: Arc<dyn Store>) {
    assert!(s.all_role_grants().await.unwrap().is_empty());
    let acme = seed_org(&*s, "acme").await;
    let beta = seed_org(&*s, "beta").await;
    let _empty = seed_org(&*s, "empty").await;
    let pay = service(&acme.id, "payments", "https://payments.example");
    let pay_grants =
        [grant("payments:viewer", "payments.invoice.read"), grant("payments:admin", "payments.invoice.write")];
    s.create_service(&pay, &pay_grants, &audit(Some(&acme.id), "service.create")).await.unwrap();
    let bill = service(&acme.id, "billing", "https://billing.example");
    s.create_service(
        &bill,
        &[grant("billing:admin", "billing.invoice.read")],
        &audit(Some(&acme.id), "service.create"),
    )
    .await
    .unwrap();
    let beta_pay = service(&beta.id, "payments", "https://payments.beta.example");
    s.create_service(&beta_pay, &[grant("payments:admin", "payments.invoice.read")], &audit(Some(&beta.id), "x"))
        .await
        .unwrap();
    let g = |org: &str, r: &str, p: &str| OrgRoleGrant { org: slug(org), role: role(r), permission: perm(p) };
    assert_eq!(
        s.all_role_grants().await.unwrap(),
        vec![
            g("acme", "billing:admin", "billing.invoice.read"),
            g("acme", "payments:admin", "payments.invoice.write"),
            g("acme", "payments:viewer", "payments.invoice.read"),
            g("beta", "payments:admin", "payments.invoice.read"),
        ],
        "every organisation's grants, named by slug, sorted"
    );

    s.set_role_permissions(
        &acme.id,
        &role("payments:admin"),
        &[perm("payments.invoice.read"), perm("payments.invoice.write")],
        &audit(Some(&acme.id), "role.set_permissions"),
    )
    .await
    .unwrap();
    s.delete_service(&acme.id, "billing", &audit(Some(&acme.id), "service.delete")).await.unwrap();
    assert_eq!(
        s.all_role_grants().await.unwrap(),
        vec![
            g("acme", "payments:admin", "payments.invoice.read"),
            g("acme", "payments:admin", "payments.invoice.write"),
            g("acme", "payments:viewer", "payments.invoice.read"),
            g("beta", "payments:admin", "payments.invoice.read"),
        ],
        "replaced and deleted grants show at once"
    );
    // The same grants as the per-organisation view.
    let mut per_org = Vec::new();
    for o in [&acme, &beta] {
        for r in s.role_grants(&o.id).await.unwrap() {
            per_org.push(OrgRoleGrant { org: o.slug.clone(), role: r.role, permission: r.permission });
        }
    }
    per_org.sort();
    assert_eq!(s.all_role_grants().await.unwrap(), per_org);
}

// ------------------------------------------------------------------------------- portal --

async fn organisation_counts_count_only_what_the_dashboard_shows(s: Arc<dyn Store>) {
    let acme = seed_org(&*s, "acme").await;
    let other = seed_org(&*s, "other").await;
    let zero = OrganisationCounts::default();
    assert_eq!(s.organisation_counts(&acme.id, NOW, NOW + 30 * DAY, NOW - 100).await.unwrap(), zero);

    seed_issuer(&*s, "ca-1").await;
    let web = seed_app(&*s, &acme, "web").await;
    seed_app(&*s, &acme, "batch").await;
    let elsewhere = seed_app(&*s, &other, "web").await;
    for (org, email) in [(&acme, "a@acme.example"), (&acme, "b@acme.example"), (&acme, "c@acme.example")] {
        s.create_user(&user(&org.id, email), &audit(Some(&org.id), "user.create")).await.unwrap();
    }
    s.create_user(&user(&other.id, "a@other.example"), &audit(Some(&other.id), "user.create")).await.unwrap();

    use CertificateType::Transport;
    // Counted: active, expiring before the bound.
    add_cert(&*s, &issued(&web, "ca-1", "01", Transport, NOW, NOW + DAY)).await;
    add_cert(&*s, &issued(&web, "ca-1", "02", Transport, NOW, NOW + 30 * DAY - 1)).await;
    // Not counted: at the bound, later, already expired, revoked, another organisation's.
    add_cert(&*s, &issued(&web, "ca-1", "03", Transport, NOW, NOW + 30 * DAY)).await;
    add_cert(&*s, &issued(&web, "ca-1", "04", Transport, NOW, NOW + 90 * DAY)).await;
    add_cert(&*s, &issued(&web, "ca-1", "05", Transport, NOW - 10 * DAY, NOW)).await;
    add_cert(
        &*s,
        &IssuedCertificate {
            revoked_at: Some(NOW - 1),
            revocation_reason: Some(RevocationReason::Superseded),
            ..issued(&web, "ca-1", "06", Transport, NOW, NOW + DAY)
        },
    )
    .await;
    add_cert(&*s, &issued(&elsewhere, "ca-1", "07", Transport, NOW, NOW + DAY)).await;

    let event = |org: &Organisation, action: &str, outcome: &str, at: UnixTime| AuditEvent {
        at,
        outcome: outcome.into(),
        ..audit(Some(&org.id), action)
    };
    for ev in [
        // Counted: failed password and code steps since the bound (inclusive).
        event(&acme, "session.login", "failure", NOW - 100),
        event(&acme, "session.verify", "failure", NOW),
        event(&acme, "session.login", "failure", NOW + 5),
        // Not counted: before the bound, successes, other actions, another organisation's.
        event(&acme, "session.login", "failure", NOW - 101),
        event(&acme, "session.login", "success", NOW),
        event(&acme, "session.authenticate", "failure", NOW),
        event(&acme, "session.login.reset_failures", "failure", NOW),
        event(&other, "session.login", "failure", NOW),
    ] {
        s.append_audit(&ev).await.unwrap();
    }

    let counts = s.organisation_counts(&acme.id, NOW, NOW + 30 * DAY, NOW - 100).await.unwrap();
    assert_eq!(counts, OrganisationCounts { applications: 2, users: 3, certificates_expiring: 2, failed_sign_ins: 3 });
    let counts = s.organisation_counts(&other.id, NOW, NOW + 30 * DAY, NOW - 100).await.unwrap();
    assert_eq!(counts, OrganisationCounts { applications: 1, users: 1, certificates_expiring: 1, failed_sign_ins: 1 });
    assert_eq!(s.organisation_counts("no-such-org", NOW, NOW + DAY, 0).await.unwrap(), zero);
}

async fn shared_attempt_counters_count_atomically_per_window(s: Arc<dyn Store>) {
    let keys = |ks: &[&str]| ks.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
    assert_eq!(s.attempt_count("ip:a", NOW).await.unwrap(), None);
    assert_eq!(
        s.count_attempts(&keys(&["ip:a", "client:x"]), 60, NOW).await.unwrap(),
        vec![(1, NOW + 60), (1, NOW + 60)]
    );
    assert_eq!(s.count_attempts(&keys(&["ip:a"]), 60, NOW + 10).await.unwrap(), vec![(2, NOW + 60)], "same window");
    assert_eq!(s.attempt_count("ip:a", NOW + 59).await.unwrap(), Some((2, NOW + 60)));
    assert_eq!(s.attempt_count("ip:a", NOW + 60).await.unwrap(), None, "the window ended");
    s.forgive_attempt("ip:a", NOW + 20).await.unwrap();
    assert_eq!(s.attempt_count("ip:a", NOW + 20).await.unwrap(), Some((1, NOW + 60)), "one taken back");
    s.forgive_attempt("ip:a", NOW + 20).await.unwrap();
    s.forgive_attempt("ip:a", NOW + 20).await.unwrap();
    assert_eq!(s.attempt_count("ip:a", NOW + 20).await.unwrap(), Some((0, NOW + 60)), "never below zero");
    assert_eq!(
        s.count_attempts(&keys(&["ip:a"]), 60, NOW + 60).await.unwrap(),
        vec![(1, NOW + 120)],
        "an event after the window ended opens a new one"
    );

    // Concurrent events (several nodes) all count, each seeing a different count.
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.count_attempts(&["client:race".to_owned()], 60, NOW).await.unwrap() }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap()[0].0);
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=24).collect::<Vec<u32>>());
    assert_eq!(s.attempt_count("client:race", NOW).await.unwrap(), Some((24, NOW + 60)));

    assert_eq!(s.purge_attempt_counters(NOW + 61).await.unwrap(), 2, "client:x and client:race ended");
    assert_eq!(s.attempt_count("ip:a", NOW + 61).await.unwrap(), Some((1, NOW + 120)), "a live window stays");
}

async fn leases_have_one_holder_until_they_run_out(s: Arc<dyn Store>) {
    assert!(s.take_lease("maintenance", "node-a", NOW, 30).await.unwrap());
    assert!(!s.take_lease("maintenance", "node-b", NOW + 1, 30).await.unwrap(), "held by node-a");
    assert!(s.take_lease("other-job", "node-b", NOW + 1, 30).await.unwrap(), "leases are per name");
    assert!(s.take_lease("maintenance", "node-a", NOW + 20, 30).await.unwrap(), "the holder renews");
    assert!(!s.take_lease("maintenance", "node-b", NOW + 40, 30).await.unwrap(), "renewed until NOW + 50");
    assert!(s.take_lease("maintenance", "node-b", NOW + 50, 30).await.unwrap(), "run out: taken over");
    assert!(!s.take_lease("maintenance", "node-a", NOW + 51, 30).await.unwrap());
    s.release_lease("maintenance", "node-a").await.unwrap();
    assert!(!s.take_lease("maintenance", "node-c", NOW + 52, 30).await.unwrap(), "only the holder releases");
    s.release_lease("maintenance", "node-b").await.unwrap();
    assert!(s.take_lease("maintenance", "node-c", NOW + 52, 30).await.unwrap(), "released: free at once");

    // Nodes asking at once: exactly one gets it.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.take_lease("race", &format!("node-{i}"), NOW, 30).await.unwrap() }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn staged_issuing_cas_are_promoted_once(s: Arc<dyn Store>) {
    let root = CaCertificate { active: true, ..ca_cert("ca-root", CaKind::Root, NOW - 10) };
    let old = ca_cert("ca-issuing-1", CaKind::Issuing, NOW);
    s.insert_ca_certificates(&[root.clone(), old.clone()], &audit(None, "ca.create")).await.unwrap();
    let staged = CaCertificate { active: false, ..ca_cert("ca-issuing-2", CaKind::Issuing, NOW + 100) };
    s.insert_ca_certificates(std::slice::from_ref(&staged), &audit(None, "ca.stage")).await.unwrap();
    let active = |cas: Vec<CaCertificate>| cas.into_iter().filter(|c| c.active).map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(active(s.ca_certificates().await.unwrap()), vec!["ca-root", "ca-issuing-1"], "staged: not issuing");

    let ev = audit(None, "ca.promote");
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (s, ev) = (s.clone(), AuditEvent { id: new_id(), ..ev.clone() });
        tasks.push(tokio::spawn(async move { s.promote_issuing_ca("ca-issuing-2", &ev).await }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(e) => assert!(matches!(e, StoreError::Conflict(_)), "{e:?}"),
        }
    }
    assert_eq!(won, 1, "one node promotes; the others conflict");
    assert_eq!(active(s.ca_certificates().await.unwrap()), vec!["ca-root", "ca-issuing-2"]);
    let promotions =
        s.audit_events(None, page(50, 0)).await.unwrap().into_iter().filter(|e| e.action == "ca.promote").count();
    assert_eq!(promotions, 1, "the losers wrote no audit row");
    assert_conflict(s.promote_issuing_ca("ca-root", &audit(None, "ca.promote")).await, "a root is never promoted");
    assert_conflict(s.promote_issuing_ca("ca-missing", &audit(None, "ca.promote")).await, "unknown id");
    assert_eq!(active(s.ca_certificates().await.unwrap()), vec!["ca-root", "ca-issuing-2"], "refusals changed nothing");
}

async fn committed_changes_wake_listeners(s: Arc<dyn Store>) {
    let signal = s.change_signal().await.unwrap().expect("PostgreSQL signals changes");
    let woken = |n: Arc<tokio::sync::Notify>| async move {
        tokio::time::timeout(std::time::Duration::from_secs(5), n.notified()).await.is_ok()
    };
    // Drain a wake-up the listener may have stored while connecting.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), signal.notified()).await;
    let wait = tokio::spawn(woken(signal.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    seed_org(&*s, "notified").await;
    assert!(wait.await.unwrap(), "a committed change wakes the listener");

    let mut failure = audit(None, "client.authenticate");
    failure.outcome = "failure".into();
    s.append_audit(&failure).await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(700), signal.notified()).await.is_err(),
        "a failed attempt changes nothing and notifies nobody"
    );
    assert!(
        s.change_signal().await.unwrap().is_some_and(|again| Arc::ptr_eq(&again, &signal)),
        "one listener per store"
    );
}
