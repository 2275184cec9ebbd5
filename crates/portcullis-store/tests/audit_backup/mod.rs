//! Contract cases of the audit chain and of backup and restore (part of `store.rs`'s suite,
//! run on both backends). Tampering is done over a connection of the test's own, after
//! dropping the append-only triggers, as an attacker with database rights could.

use std::sync::Arc;

use portcullis_core::audit_chain::{ChainFault, ChainSummary, ChainVerifier};
use portcullis_core::model::*;
use portcullis_core::store::Store;
use portcullis_store::backup::{NOT_BACKED_UP, TABLES};
use portcullis_store::{PgStore, SqliteStore};
use sqlx::sqlite::SqliteConnection;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Row};

use super::*;

/// Runs `sql` (one or more statements) on the case's database; the database's error as text.
async fn raw(sql: &str) -> Result<u64, String> {
    let sql = AssertSqlSafe(sql.to_owned());
    match RAW_DB.with(Clone::clone) {
        RawDb::Sqlite(path) => {
            let mut c = SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
            let r = sqlx::raw_sql(sql).execute(&mut c).await.map(|r| r.rows_affected()).map_err(|e| e.to_string());
            c.close().await.unwrap();
            r
        }
        RawDb::Pg(url) => {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let r = sqlx::raw_sql(sql).execute(&mut c).await.map(|r| r.rows_affected()).map_err(|e| e.to_string());
            c.close().await.unwrap();
            r
        }
    }
}

/// The first column of every row `sql` returns, as text.
async fn raw_strings(sql: &str) -> Vec<String> {
    let sql = AssertSqlSafe(sql.to_owned());
    match RAW_DB.with(Clone::clone) {
        RawDb::Sqlite(path) => {
            let mut c = SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
            let rows = sqlx::query(sql).fetch_all(&mut c).await.unwrap();
            rows.iter().map(|r| r.get::<String, _>(0)).collect()
        }
        RawDb::Pg(url) => {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let rows = sqlx::query(sql).fetch_all(&mut c).await.unwrap();
            rows.iter().map(|r| r.get::<String, _>(0)).collect()
        }
    }
}

async fn drop_guard() {
    let sql = match RAW_DB.with(Clone::clone) {
        RawDb::Sqlite(_) => "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete;",
        RawDb::Pg(_) => "DROP TRIGGER audit_events_append_only ON audit_events",
    };
    raw(sql).await.unwrap();
}

async fn verify(s: &dyn Store) -> Result<ChainSummary, ChainFault> {
    let mut v = ChainVerifier::new(chain_key(), None);
    s.scan_audit_chain(&mut v).await.unwrap();
    v.finish()
}

#[track_caller]
fn assert_intact(r: &Result<ChainSummary, ChainFault>, checked: u64) {
    match r {
        Ok(s) => assert_eq!(s.checked, checked, "{s:?}"),
        Err(f) => panic!("the chain should be intact: {f}"),
    }
}

/// Writes through many different store methods (so many different transactions end with an
/// audit row), filling most tables; returns the number of audit rows written.
async fn mixed_writes(s: &dyn Store) -> u64 {
    let f = seed_oidc(s).await;
    s.insert_signing_keys(
        &[key("k-next", Algorithm::ES256, KeyState::Next, NOW), key("k-cur", Algorithm::ES256, KeyState::Current, NOW)],
        &audit(None, "signing_key.create"),
    )
    .await
    .unwrap();
    let issuer = seed_issuer(s, "ca-1").await;
    let cert = issued(&f.app, &issuer.id, "0abc", CertificateType::Transport, NOW, NOW + 86_400);
    add_cert(s, &cert).await;
    let other = issued(&f.app, &issuer.id, "0abd", CertificateType::Signing, NOW, NOW + 86_400);
    add_cert(s, &other).await;
    assert!(
        s.revoke_certificate(&other.id, RevocationReason::KeyCompromise, NOW, &[], &audit(None, "certificate.revoke"))
            .await
            .unwrap()
    );
    let n = s.next_crl_number(&issuer.id).await.unwrap();
    s.save_crl(&StoredCrl {
        issuer_id: issuer.id.clone(),
        number: n,
        this_update: NOW,
        next_update: NOW + 60,
        der: vec![0, 0xff, 7],
    })
    .await
    .unwrap();
    assert!(s.record_assertion_jti(f.app.client_id.as_str(), "jti-1", NOW + 60).await.unwrap());
    let t = RevokedToken { jti: "j-1".into(), client_id: "acme$web".into(), expires_at: NOW + 60, revoked_at: NOW };
    s.revoke_token(&t, &audit(None, "token.revoke")).await.unwrap();
    s.save_consent(&consent(&f.ann, &f.app, &["openid"], NOW), &audit(Some(&f.org.id), "consent.grant")).await.unwrap();
    s.save_user_totp(&totp(&f.ann, b"\x00secret\xff", NOW), &audit(Some(&f.org.id), "totp.enrol")).await.unwrap();
    let rt = refresh_token(&f.app, &f.ann, &f.ann_session.id, "fam-1", 3);
    issue_refresh(s, &rt, 40).await;
    seed_api_key(s, &f.bob, "pk_backup").await;
    s.record_login_failure(&f.bob.id, NOW, 5, NOW + 60, &audit(Some(&f.org.id), "session.login")).await.unwrap();
    for i in 0..20 {
        s.append_audit(&AuditEvent { at: NOW + i, ..audit(Some(&f.org.id), "api.call") }).await.unwrap();
    }
    s.audit_events(None, all()).await.unwrap().len() as u64
}

pub(crate) async fn audit_chain_verifies_after_many_mixed_writes(s: Arc<dyn Store>) {
    assert_intact(&verify(s.as_ref()).await, 0);
    let written = mixed_writes(s.as_ref()).await;
    assert!(written > 30, "{written}");
    let summary = verify(s.as_ref()).await.unwrap();
    assert_eq!(summary.checked, written, "every row is chained");
    assert_eq!(summary.pre_rows, 0);
    assert_eq!(summary.head_seq, s.latest_audit_seq().await.unwrap(), "the head is the newest row");
    // A failed mutation leaves no row and no hole: positions stay dense.
    let dup = audit(None, "x");
    s.append_audit(&dup).await.unwrap();
    assert!(s.append_audit(&dup).await.is_err(), "a reused audit id");
    let after = verify(s.as_ref()).await.unwrap();
    assert_eq!((after.checked, after.head_seq), (written + 1, summary.head_seq + 1));
}

pub(crate) async fn audit_rows_refuse_update_and_delete(s: Arc<dyn Store>) {
    s.append_audit(&audit(None, "a")).await.unwrap();
    let seq = s.latest_audit_seq().await.unwrap();
    for sql in [
        format!("UPDATE audit_events SET target = 'x' WHERE seq = {seq}"),
        format!("DELETE FROM audit_events WHERE seq = {seq}"),
        "DELETE FROM audit_events".to_owned(),
    ] {
        let err = raw(&sql).await.expect_err(&sql);
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    if matches!(RAW_DB.with(Clone::clone), RawDb::Pg(_)) {
        let err = raw("TRUNCATE audit_events").await.expect_err("TRUNCATE");
        assert!(err.contains("append-only"), "{err}");
    }
    assert_intact(&verify(s.as_ref()).await, 1);
    // The head is not guarded (appends update it), but it is MACed: see the next case.
}

pub(crate) async fn audit_chain_names_the_tampered_row(s: Arc<dyn Store>) {
    for i in 0..8 {
        s.append_audit(&AuditEvent { target: format!("t{i}"), ..audit(None, "thing.do") }).await.unwrap();
    }
    let first = verify(s.as_ref()).await.unwrap();
    let last = first.head_seq;
    let (a, b) = (last - 5, last - 4);
    drop_guard().await;

    // Edited, then put back.
    raw(&format!("UPDATE audit_events SET target = target || 'x' WHERE seq = {a}")).await.unwrap();
    assert_eq!(verify(s.as_ref()).await, Err(ChainFault::Edited { seq: a }));
    raw(&format!("UPDATE audit_events SET target = substr(target, 1, length(target) - 1) WHERE seq = {a}"))
        .await
        .unwrap();
    assert_eq!(verify(s.as_ref()).await, Ok(first.clone()), "restored row verifies again");

    // Reordered: two rows' contents swapped, positions kept.
    let swap = |x: i64, y: i64| {
        format!(
            "CREATE TABLE swapped AS SELECT seq, target FROM audit_events WHERE seq IN ({x}, {y}); \
             UPDATE audit_events SET target = (SELECT target FROM swapped WHERE swapped.seq = {x} + {y} - audit_events.seq) \
             WHERE seq IN ({x}, {y}); DROP TABLE swapped"
        )
    };
    raw(&swap(a, b)).await.unwrap();
    assert_eq!(verify(s.as_ref()).await, Err(ChainFault::Edited { seq: a }));
    raw(&swap(a, b)).await.unwrap();
    assert_eq!(verify(s.as_ref()).await, Ok(first.clone()));

    // Deleted in the middle and at the end, then put back.
    for gone in [b, last] {
        raw(&format!("CREATE TABLE saved AS SELECT * FROM audit_events WHERE seq = {gone}")).await.unwrap();
        raw(&format!("DELETE FROM audit_events WHERE seq = {gone}")).await.unwrap();
        assert_eq!(verify(s.as_ref()).await, Err(ChainFault::Missing { from: gone, to: gone }), "deleted {gone}");
        raw("INSERT INTO audit_events SELECT * FROM saved; DROP TABLE saved").await.unwrap();
        assert_eq!(verify(s.as_ref()).await, Ok(first.clone()));
    }

    // The end cut off and the head moved back onto the new last row: the head's MAC fails,
    // and no server extends (and so launders) that head.
    raw(&format!("CREATE TABLE saved AS SELECT * FROM audit_events WHERE seq = {last}")).await.unwrap();
    raw("CREATE TABLE saved_head AS SELECT * FROM audit_chain").await.unwrap();
    raw(&format!(
        "DELETE FROM audit_events WHERE seq = {last}; \
         UPDATE audit_chain SET seq = seq - 1, mac = (SELECT mac FROM audit_events WHERE seq = {})",
        last - 1
    ))
    .await
    .unwrap();
    assert_eq!(verify(s.as_ref()).await, Err(ChainFault::HeadAltered));
    let refused = s.append_audit(&audit(None, "after.tampering")).await;
    assert!(matches!(&refused, Err(StoreError::Internal(m)) if m.contains("audit chain head")), "{refused:?}");
    raw("INSERT INTO audit_events SELECT * FROM saved; DROP TABLE saved; DELETE FROM audit_chain; \
         INSERT INTO audit_chain SELECT * FROM saved_head; DROP TABLE saved_head")
    .await
    .unwrap();
    assert_eq!(verify(s.as_ref()).await, Ok(first.clone()));

    // Inserted after the head, and before the chain.
    for (seq, fault) in [
        (last + 1, ChainFault::Unexpected { seq: last + 1 }),
        (-1, ChainFault::PreChainChanged { pre_rows: 0, found: 1 }),
    ] {
        raw(&format!(
            "INSERT INTO audit_events (seq, id, at, actor, action, target, outcome, details, mac) \
             VALUES ({seq}, 'forged', {NOW}, 'x', 'x', 'x', 'success', '{{}}', NULL)"
        ))
        .await
        .unwrap();
        assert_eq!(verify(s.as_ref()).await, Err(fault));
        raw("DELETE FROM audit_events WHERE id = 'forged'").await.unwrap();
    }
    assert_eq!(verify(s.as_ref()).await, Ok(first));
    s.append_audit(&audit(None, "after")).await.unwrap();
    assert_intact(&verify(s.as_ref()).await, 9);
}

/// Another store on the same database, as another node would open it.
async fn another_node() -> Arc<dyn Store> {
    let s: Arc<dyn Store> = match RAW_DB.with(Clone::clone) {
        RawDb::Sqlite(path) => Arc::new(SqliteStore::open(&path, NOW).await.unwrap()),
        RawDb::Pg(url) => Arc::new(PgStore::connect(&url, NOW).await.unwrap()),
    };
    s.start_audit_chain(chain_key()).await.unwrap();
    s
}

pub(crate) async fn concurrent_appends_from_several_nodes_form_one_chain(s: Arc<dyn Store>) {
    let nodes = [s.clone(), another_node().await, another_node().await];
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..4 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..15 {
                    let tag = format!("n{n}t{t}i{i}");
                    if i % 3 == 0 {
                        let tok = RevokedToken {
                            jti: tag.clone(),
                            client_id: "acme$web".into(),
                            expires_at: NOW + 60,
                            revoked_at: NOW,
                        };
                        node.revoke_token(&tok, &audit(None, "token.revoke")).await.unwrap();
                    } else {
                        node.append_audit(&AuditEvent { target: tag, ..audit(None, "api.call") }).await.unwrap();
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let summary = verify(s.as_ref()).await.unwrap();
    assert_eq!(summary.checked, 3 * 4 * 15, "one chain holds every append of every node");
    assert_eq!(summary.head_seq, 3 * 4 * 15, "positions are dense: 1..=180");
}

/// A fresh, migrated database of the given backend, and how to drop it.
struct Fresh {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    pg: Option<String>,
}

async fn fresh(sqlite: bool) -> Fresh {
    if sqlite {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db"), NOW).await.unwrap();
        Fresh { store: Arc::new(store), _dir: Some(dir), pg: None }
    } else {
        let db = format!("portcullis_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = pg_admin_connection(&pg_admin_url()).await;
        admin.execute(AssertSqlSafe(format!("CREATE DATABASE \"{db}\""))).await.unwrap();
        admin.close().await.unwrap();
        let store = PgStore::connect(&with_database(&pg_admin_url(), &db), NOW).await.unwrap();
        Fresh { store: Arc::new(store), _dir: None, pg: Some(db) }
    }
}

impl Fresh {
    async fn drop_db(self) {
        drop(self.store);
        if let Some(db) = self.pg {
            let mut admin = pg_admin_connection(&pg_admin_url()).await;
            admin.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))).await.unwrap();
            admin.close().await.unwrap();
        }
    }
}

/// Each table's rows (as JSON text, sorted) in an archive.
fn tables_of(archive: &[u8]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in std::str::from_utf8(archive).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(t) = v.get("table").and_then(|t| t.as_str()) {
            out.push((t.to_owned(), Vec::new()));
        } else if v.is_array() {
            out.last_mut().unwrap().1.push(line.to_owned());
        }
    }
    for (_, rows) in &mut out {
        rows.sort();
    }
    out
}

pub(crate) async fn backup_and_restore_round_trip_on_both_backends(s: Arc<dyn Store>) {
    let written = mixed_writes(s.as_ref()).await;
    let mut archive = Vec::new();
    let summary = s.backup(&mut archive).await.unwrap();
    let names: Vec<&str> = summary.tables.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, TABLES);
    let count = |t: &str| summary.tables.iter().find(|(n, _)| n == t).unwrap().1;
    assert_eq!(count("audit_events"), written);
    for t in ["organisations", "applications", "users", "sessions", "certificates", "crls", "audit_chain", "user_totp"]
    {
        assert!(count(t) > 0, "{t} has rows in the backup");
    }
    let source = tables_of(&archive);
    let head = verify(s.as_ref()).await.unwrap();

    // Into a fresh database of this backend and of the other one.
    let here_sqlite = matches!(RAW_DB.with(Clone::clone), RawDb::Sqlite(_));
    for sqlite in [here_sqlite, !here_sqlite] {
        let target = fresh(sqlite).await;
        let t = target.store.clone();

        // Damaged or cut short: refused, and nothing of it stays (a clean restore follows).
        let mut damaged = archive.clone();
        let at = damaged.len() / 2;
        damaged[at] = if damaged[at] == b'1' { b'2' } else { b'1' };
        assert!(t.restore(&mut &damaged[..], false).await.is_err(), "a damaged backup");
        let cut = &archive[..archive.len() - 40];
        assert!(t.restore(&mut &cut[..], false).await.is_err(), "a truncated backup");

        let restored = t.restore(&mut &archive[..], false).await.unwrap();
        assert_eq!(restored.tables, summary.tables);
        let mut again = Vec::new();
        t.backup(&mut again).await.unwrap();
        assert_eq!(tables_of(&again), source, "every row of every table, as it was (sqlite target: {sqlite})");
        assert_eq!(verify(t.as_ref()).await, Ok(head.clone()), "the restored chain verifies, same head");
        t.start_audit_chain(chain_key()).await.unwrap();
        t.append_audit(&audit(None, "after.restore")).await.unwrap();
        assert_intact(&verify(t.as_ref()).await, written + 1);

        // Not empty any more: refused unless replacing.
        let refused = t.restore(&mut &archive[..], false).await;
        assert!(matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("not empty")), "{refused:?}");
        t.restore(&mut &archive[..], true).await.unwrap();
        assert_eq!(verify(t.as_ref()).await, Ok(head.clone()), "replaced: the later row is gone");
        target.drop_db().await;
    }
}

pub(crate) async fn backups_cover_every_table(s: Arc<dyn Store>) {
    let sql = match RAW_DB.with(Clone::clone) {
        RawDb::Sqlite(_) => "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        RawDb::Pg(_) => {
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() \
             AND table_type = 'BASE TABLE'"
        }
    };
    let mut found = raw_strings(sql).await;
    found.sort();
    let mut expected: Vec<String> = TABLES.iter().chain(NOT_BACKED_UP).map(|t| (*t).to_owned()).collect();
    expected.sort();
    assert_eq!(
        found, expected,
        "a migration added or removed a table: list it in portcullis_store::backup::TABLES (restore order)"
    );
    // And a backup refuses to run when a table would be left out.
    raw("CREATE TABLE extra_table (x TEXT)").await.unwrap();
    let err = s.backup(&mut Vec::new()).await.unwrap_err();
    assert!(err.to_string().contains("extra_table"), "{err}");
}

/// Schema v5 (before the chain) with three audit rows at positions 1, 2 and 5 (a PostgreSQL
/// sequence leaves gaps), as an upgraded installation has them.
fn schema_v5_with_audit_rows(dir: &str) -> String {
    let files: [(i64, &str, &str); 5] = if dir == "sqlite" {
        [
            (1, "0001_initial", include_str!("../../migrations/sqlite/0001_initial.sql")),
            (2, "0002_auth_api", include_str!("../../migrations/sqlite/0002_auth_api.sql")),
            (3, "0003_pki", include_str!("../../migrations/sqlite/0003_pki.sql")),
            (4, "0004_oidc", include_str!("../../migrations/sqlite/0004_oidc.sql")),
            (
                5,
                "0005_gateway_browser_sessions",
                include_str!("../../migrations/sqlite/0005_gateway_browser_sessions.sql"),
            ),
        ]
    } else {
        [
            (1, "0001_initial", include_str!("../../migrations/postgres/0001_initial.sql")),
            (2, "0002_auth_api", include_str!("../../migrations/postgres/0002_auth_api.sql")),
            (3, "0003_pki", include_str!("../../migrations/postgres/0003_pki.sql")),
            (4, "0004_oidc", include_str!("../../migrations/postgres/0004_oidc.sql")),
            (
                5,
                "0005_gateway_browser_sessions",
                include_str!("../../migrations/postgres/0005_gateway_browser_sessions.sql"),
            ),
        ]
    };
    let mut sql = "CREATE TABLE portcullis_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, \
                   checksum TEXT NOT NULL, applied_at BIGINT NOT NULL);\n"
        .to_owned();
    for (version, name, text) in files {
        sql.push_str(text);
        sql.push_str(&format!(
            "\nINSERT INTO portcullis_migrations (version, name, checksum, applied_at) VALUES ({version}, '{name}', '{}', 1);\n",
            portcullis_store::checksum(text)
        ));
    }
    for seq in [1, 2, 5] {
        sql.push_str(&format!(
            "INSERT INTO audit_events (seq, id, at, org_id, actor, action, target, outcome, ip, details) \
             VALUES ({seq}, 'old-{seq}', 1, NULL, 'system', 'old.thing', 't', 'success', NULL, '{{}}');\n"
        ));
    }
    sql
}

/// Rows written before the chain stay unchained and are counted; the chain starts after them.
async fn older_rows_precede_the_chain(s: Arc<dyn Store>) {
    let before = verify(s.as_ref()).await.unwrap();
    assert_eq!((before.checked, before.pre_rows, before.head_seq), (0, 3, 5), "{before:?}");
    s.append_audit(&audit(None, "new.thing")).await.unwrap();
    let after = verify(s.as_ref()).await.unwrap();
    assert_eq!((after.checked, after.pre_rows, after.head_seq), (1, 3, 6), "{after:?}");
    // Deleting an old row is seen (their number is kept), editing one is not.
    drop_guard().await;
    raw("DELETE FROM audit_events WHERE seq = 2").await.unwrap();
    assert_eq!(verify(s.as_ref()).await, Err(ChainFault::PreChainChanged { pre_rows: 3, found: 2 }));
    // An older binary's insert (no seq, no mac) is refused on PostgreSQL, where seq has no
    // default any more; on SQLite (one process) it would land after the head and be named.
    let old_insert = "INSERT INTO audit_events (id, at, actor, action, target, outcome, details) \
                      VALUES ('old-binary', 1, 'x', 'x', 'x', 'success', '{}')";
    match RAW_DB.with(Clone::clone) {
        RawDb::Pg(_) => assert!(raw(old_insert).await.is_err()),
        RawDb::Sqlite(_) => {
            raw(old_insert).await.unwrap();
            // The deleted old row back, so that the new row is the only fault.
            raw("INSERT INTO audit_events (seq, id, at, actor, action, target, outcome, details) \
                 VALUES (2, 'old-2', 1, 'system', 'old.thing', 't', 'success', '{}')")
            .await
            .unwrap();
            assert_eq!(verify(s.as_ref()).await, Err(ChainFault::Unexpected { seq: 7 }));
        }
    }
}

mod upgrade_v5 {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_older_audit_rows_precede_the_chain() {
        let before = super::schema_v5_with_audit_rows("sqlite");
        super::super::run_sqlite_from(super::older_rows_precede_the_chain, Some(before)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_older_audit_rows_precede_the_chain() {
        let before = super::schema_v5_with_audit_rows("postgres");
        super::super::run_pg_from(super::older_rows_precede_the_chain, Some(before)).await;
    }
}
