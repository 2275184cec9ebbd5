//! The `Store` contract, run unchanged against both adapters.
//!
//! Every case is one `async fn(Arc<dyn Store>)`; `contract_tests!` turns each into two
//! `#[tokio::test]`s, `sqlite::<case>` (a fresh file in a temp dir) and `postgres::<case>` (a
//! fresh database on the server named by `PORTCULLIS_TEST_PG_URL`, dropped afterwards even
//! when the case fails). The PostgreSQL tests never skip: an unreachable server is a failure.

// clippy.toml's *-in-tests allowances cover #[test] fns only, not this file's helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::future::Future;
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
);

/// Runs `case` on its own task so that a failing assertion comes back here as a `JoinError`:
/// the caller can clean up and then resume the panic.
async fn run_case<F, Fut>(case: F, store: Arc<dyn Store>) -> Result<(), tokio::task::JoinError>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(case(store)).await
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
    let dir = tempfile::tempdir().expect("create temp dir");
    let store = SqliteStore::open(&dir.path().join("p.db"), NOW).await.expect("open SQLite store");
    let outcome = run_case(case, Arc::new(store.clone())).await;
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
        let store = PgStore::connect(&with_database(&admin_url, &db), NOW).await?;
        let outcome = run_case(case, Arc::new(store.clone())).await;
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
        access_token_lifetime: 900,
        signing_alg: Algorithm::PS256,
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
        access_token_lifetime: 60,
        signing_alg: Algorithm::EdDSA,
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
        access_token_lifetime: 300,
        signing_alg: Algorithm::ES256,
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
