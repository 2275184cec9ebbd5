//! Backup and restore of both backends in one portable format (docs/operations.md).
//!
//! A backup is UTF-8 JSON lines: a header (format, format version, schema version = the latest
//! migration applied, the source backend, every table with its columns and their kinds); then
//! per table `{"table":NAME}`, one JSON array per row (bytes as base64), `{"end":NAME,"rows":N}`;
//! and last `{"sha256":HEX}` over every byte before that line. Values are copied as stored:
//! private keys stay sealed, secrets stay keyed hashes, and no key material is added.
//!
//! The backup reads every table in one snapshot (SQLite: one read transaction; PostgreSQL:
//! `REPEATABLE READ, READ ONLY`), so it is consistent while servers write. A restore checks the
//! schema version and columns against the database, loads everything in one transaction and
//! commits only if the checksum at the end matches. [`TABLES`] must name every table: a backup
//! refuses to run when the database has one it does not name.

use std::io::{BufRead, Read, Write};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use portcullis_core::StoreError;
use portcullis_core::store::StoreResult;
use serde_json::{Value, json};

pub const FORMAT: &str = "portcullis-backup";
pub const FORMAT_VERSION: u64 = 1;

/// Every table a backup holds, parents before children (the restore order).
pub const TABLES: &[&str] = &[
    "settings",
    "organisations",
    "services",
    "role_permissions",
    "applications",
    "users",
    "user_emails",
    "signing_keys",
    "ca_certificates",
    "revoked_tokens",
    "audit_events",
    "audit_chain",
    "sessions",
    "api_keys",
    "verifications",
    "mail_queue",
    "certificates",
    "crls",
    "crl_numbers",
    "assertion_jtis",
    "authorization_codes",
    "refresh_tokens",
    "session_clients",
    "consents",
    "logout_deliveries",
    "user_totp",
];

/// Tables that are not data: the migration record (the restored database has its own), and
/// the running nodes' coordination — failure-counter windows of a minute or an hour, and
/// leases of whoever was running then (a restored lease would only hold up the schedule).
pub const NOT_BACKED_UP: &[&str] = &["portcullis_migrations", "attempt_counters", "leases"];

/// The longest line a restore reads (a row with a large PEM or CRL is far below it).
const MAX_LINE: usize = 64 << 20;

/// A column's kind, as the database declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Int8,
    /// PostgreSQL's 4-byte INTEGER (read as `i32`).
    Int4,
    Bool,
    Text,
    Bytes,
}

impl Kind {
    /// The kind as the archive names it (both integer sizes are `int`).
    fn portable(self) -> &'static str {
        match self {
            Self::Int8 | Self::Int4 => "int",
            Self::Bool => "bool",
            Self::Text => "text",
            Self::Bytes => "bytes",
        }
    }
}

/// What differs between the backends here: catalog queries, transaction modes, the audit
/// table's append-only guard.
pub(crate) trait BackendSql {
    const NAME: &'static str;
    /// A read transaction whose reads all see one snapshot.
    const SNAPSHOT_BEGIN: &'static str;
    /// A write transaction for the restore.
    const RESTORE_BEGIN: &'static str;
    /// Every table's name (`name`).
    const TABLES_SQL: &'static str;
    /// One table's columns in order (`name`, `type`), `$1` the table.
    const COLUMNS_SQL: &'static str;
    const TYPES: &'static [(&'static str, Kind)];
    /// Lets a replacing restore delete audit rows, inside its transaction; then restores the guard.
    const GUARD_OFF: &'static [&'static str];
    const GUARD_ON: &'static [&'static str];
}

impl BackendSql for sqlx::SqlitePool {
    const NAME: &'static str = "sqlite";
    const SNAPSHOT_BEGIN: &'static str = "BEGIN";
    const RESTORE_BEGIN: &'static str = "BEGIN IMMEDIATE";
    const TABLES_SQL: &'static str = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'";
    const COLUMNS_SQL: &'static str = "SELECT name, type FROM pragma_table_info($1) ORDER BY cid";
    const TYPES: &'static [(&'static str, Kind)] = &[
        ("BIGINT", Kind::Int8),
        ("INTEGER", Kind::Int8),
        ("BOOLEAN", Kind::Bool),
        ("TEXT", Kind::Text),
        ("BLOB", Kind::Bytes),
    ];
    // The same triggers as migration 0006.
    const GUARD_OFF: &'static [&'static str] =
        &["DROP TRIGGER audit_events_no_update", "DROP TRIGGER audit_events_no_delete"];
    const GUARD_ON: &'static [&'static str] = &[
        "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
        "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
    ];
}

impl BackendSql for sqlx::PgPool {
    const NAME: &'static str = "postgresql";
    const SNAPSHOT_BEGIN: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    const RESTORE_BEGIN: &'static str = "BEGIN";
    const TABLES_SQL: &'static str = "SELECT table_name::text AS name FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'";
    const COLUMNS_SQL: &'static str = "SELECT column_name::text AS name, data_type::text AS type \
         FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position";
    const TYPES: &'static [(&'static str, Kind)] = &[
        ("bigint", Kind::Int8),
        ("integer", Kind::Int4),
        ("boolean", Kind::Bool),
        ("text", Kind::Text),
        ("bytea", Kind::Bytes),
    ];
    const GUARD_OFF: &'static [&'static str] = &[
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_truncate",
    ];
    const GUARD_ON: &'static [&'static str] = &[
        "ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only",
        "ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_truncate",
    ];
}

pub(crate) fn kind_of<B: BackendSql>(table: &str, column: &str, ty: &str) -> StoreResult<Kind> {
    B::TYPES.iter().find(|(name, _)| name.eq_ignore_ascii_case(ty)).map(|(_, k)| *k).ok_or_else(|| {
        StoreError::Internal(format!("column {table}.{column} has type {ty}, which backups do not know"))
    })
}

/// Checks that the database's tables are exactly [`TABLES`] (and the ones not backed up).
pub(crate) fn check_tables(found: &[String]) -> StoreResult<()> {
    for t in found {
        if !TABLES.contains(&t.as_str()) && !NOT_BACKED_UP.contains(&t.as_str()) {
            return Err(StoreError::Internal(format!(
                "table {t} is not covered by backups: add it to portcullis_store::backup::TABLES"
            )));
        }
    }
    if let Some(t) = TABLES.iter().find(|t| !found.iter().any(|f| f == *t)) {
        return Err(StoreError::Internal(format!("table {t} is missing from the database")));
    }
    Ok(())
}

/// `"name"` (names come from the catalog and [`TABLES`], never from input; quoted anyway).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError::Internal(format!("backup I/O: {e}"))
}

fn bad(what: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("not a usable backup: {what}"))
}

/// Writes lines and hashes every byte written.
pub(crate) struct ArchiveWriter<'a> {
    out: &'a mut (dyn Write + Send),
    hash: digest::Context,
}

impl<'a> ArchiveWriter<'a> {
    pub(crate) fn new(out: &'a mut (dyn Write + Send)) -> Self {
        Self { out, hash: digest::Context::new(&digest::SHA256) }
    }

    pub(crate) fn line(&mut self, v: &Value) -> StoreResult<()> {
        let mut text = serde_json::to_vec(v).map_err(|e| StoreError::Internal(format!("backup encoding: {e}")))?;
        text.push(b'\n');
        self.hash.update(&text);
        self.out.write_all(&text).map_err(io_err)
    }

    pub(crate) fn header(
        &mut self,
        backend: &str,
        schema: i64,
        tables: &[(String, Vec<(String, Kind)>)],
    ) -> StoreResult<()> {
        let tables: Vec<Value> = tables
            .iter()
            .map(|(name, cols)| {
                json!({ "name": name, "columns": cols.iter().map(|(c, k)| json!([c, k.portable()])).collect::<Vec<_>>() })
            })
            .collect();
        self.line(&json!({ "format": FORMAT, "version": FORMAT_VERSION, "schema": schema, "source": backend, "tables": tables }))
    }

    /// The checksum line; the archive is complete once it is flushed.
    pub(crate) fn finish(self) -> StoreResult<()> {
        let sum = portcullis_core::pki::hex(self.hash.finish().as_ref());
        let mut text =
            serde_json::to_vec(&json!({ "sha256": sum })).map_err(|e| StoreError::Internal(e.to_string()))?;
        text.push(b'\n');
        self.out.write_all(&text).map_err(io_err)?;
        self.out.flush().map_err(io_err)
    }
}

/// A value as read from the database.
pub(crate) enum ValueRead {
    Null,
    Int(i64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

impl ValueRead {
    /// The value as the archive holds it.
    pub(crate) fn into_json(self) -> Value {
        match self {
            Self::Null => Value::Null,
            Self::Int(i) => Value::from(i),
            Self::Bool(b) => Value::Bool(b),
            Self::Text(s) => Value::String(s),
            Self::Bytes(b) => Value::String(B64.encode(b)),
        }
    }
}

/// A value to bind on restore, typed by the target column's kind.
#[derive(Debug)]
pub(crate) enum ValueBind {
    Int8(Option<i64>),
    Int4(Option<i32>),
    Bool(Option<bool>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

pub(crate) fn bind_value(table: &str, column: &str, kind: Kind, v: &Value) -> StoreResult<ValueBind> {
    let wrong = || bad(format!("{table}.{column}: expected {}, got {v}", kind.portable()));
    Ok(match (kind, v) {
        (Kind::Int8, Value::Null) => ValueBind::Int8(None),
        (Kind::Int4, Value::Null) => ValueBind::Int4(None),
        (Kind::Bool, Value::Null) => ValueBind::Bool(None),
        (Kind::Text, Value::Null) => ValueBind::Text(None),
        (Kind::Bytes, Value::Null) => ValueBind::Bytes(None),
        (Kind::Int8, v) => ValueBind::Int8(Some(v.as_i64().ok_or_else(wrong)?)),
        (Kind::Int4, v) => ValueBind::Int4(Some(v.as_i64().and_then(|i| i32::try_from(i).ok()).ok_or_else(wrong)?)),
        (Kind::Bool, Value::Bool(b)) => ValueBind::Bool(Some(*b)),
        (Kind::Text, Value::String(s)) => ValueBind::Text(Some(s.clone())),
        (Kind::Bytes, Value::String(s)) => ValueBind::Bytes(Some(B64.decode(s).map_err(|_| wrong())?)),
        _ => return Err(wrong()),
    })
}

/// Reads lines and hashes every byte before the checksum line.
pub(crate) struct ArchiveReader<'a> {
    input: &'a mut (dyn BufRead + Send),
    hash: digest::Context,
    buf: Vec<u8>,
}

/// What a parsed header says.
pub(crate) struct Header {
    pub schema: i64,
    pub tables: Vec<(String, Vec<(String, String)>)>,
}

impl<'a> ArchiveReader<'a> {
    pub(crate) fn new(input: &'a mut (dyn BufRead + Send)) -> Self {
        Self { input, hash: digest::Context::new(&digest::SHA256), buf: Vec::new() }
    }

    /// The next line as JSON (hashed unless it is the checksum line); `None` at the end.
    fn next_raw(&mut self) -> StoreResult<Option<Value>> {
        self.buf.clear();
        let n = Read::take(&mut self.input, MAX_LINE as u64 + 1).read_until(b'\n', &mut self.buf).map_err(io_err)?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.len() > MAX_LINE || self.buf.last() != Some(&b'\n') {
            return Err(bad("a line is cut off or too long"));
        }
        let v: Value = serde_json::from_slice(&self.buf).map_err(|e| bad(format!("a line is not JSON: {e}")))?;
        if v.get("sha256").is_none() {
            self.hash.update(&self.buf);
        }
        Ok(Some(v))
    }

    pub(crate) fn next(&mut self) -> StoreResult<Value> {
        self.next_raw()?.ok_or_else(|| bad("it ends early (no checksum line): truncated"))
    }

    pub(crate) fn header(&mut self) -> StoreResult<Header> {
        let h = self.next()?;
        if h.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(bad("it does not start with a portcullis-backup header"));
        }
        if h.get("version").and_then(Value::as_u64) != Some(FORMAT_VERSION) {
            let found = h.get("version").cloned().unwrap_or_default();
            return Err(bad(format!("format version {found} is not {FORMAT_VERSION}")));
        }
        let schema = h.get("schema").and_then(Value::as_i64).ok_or_else(|| bad("no schema version"))?;
        let mut tables = Vec::new();
        for t in h.get("tables").and_then(Value::as_array).ok_or_else(|| bad("no table list"))? {
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| bad("a table has no name"))?;
            let mut cols = Vec::new();
            for c in t.get("columns").and_then(Value::as_array).ok_or_else(|| bad("a table has no columns"))? {
                let pair = c.as_array().filter(|p| p.len() == 2).ok_or_else(|| bad("a column is not [name, kind]"))?;
                match (pair.first().and_then(Value::as_str), pair.get(1).and_then(Value::as_str)) {
                    (Some(n), Some(k)) => cols.push((n.to_owned(), k.to_owned())),
                    _ => return Err(bad("a column is not [name, kind]")),
                }
            }
            tables.push((name.to_owned(), cols));
        }
        Ok(Header { schema, tables })
    }

    /// The checksum line must come now, match, and be the last line.
    pub(crate) fn finish(mut self) -> StoreResult<()> {
        let line = self.next()?;
        let want = line.get("sha256").and_then(Value::as_str).ok_or_else(|| bad("data after the last table"))?;
        let got = portcullis_core::pki::hex(self.hash.clone().finish().as_ref());
        if want != got {
            return Err(bad("the checksum does not match: the file is damaged"));
        }
        if self.next_raw()?.is_some() {
            return Err(bad("data after the checksum line"));
        }
        Ok(())
    }
}

/// Inherent backup and restore methods of `$store`; the `Store` impl delegates to them.
macro_rules! backup_store {
    ($store:ident, $pool:ty, $row:ty) => {
        impl $store {
            async fn table_columns<'c, E>(ex: E, table: &str) -> StoreResult<Vec<(String, $crate::backup::Kind)>>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                let rows = sqlx::query(<$pool as $crate::backup::BackendSql>::COLUMNS_SQL)
                    .bind(table)
                    .fetch_all(ex)
                    .await
                    .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        let name: String = r.try_get("name").map_err(db_err)?;
                        let ty: String = r.try_get("type").map_err(db_err)?;
                        let kind = $crate::backup::kind_of::<$pool>(table, &name, &ty)?;
                        Ok((name, kind))
                    })
                    .collect()
            }

            /// Every table with its columns, after checking the database has exactly the
            /// tables [`TABLES`] names; and the schema version.
            async fn backup_layout(
                conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection,
            ) -> StoreResult<(i64, Vec<(String, Vec<(String, $crate::backup::Kind)>)>)> {
                let found: Vec<String> = sqlx::query(<$pool as $crate::backup::BackendSql>::TABLES_SQL)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(db_err)?
                    .iter()
                    .map(|r| r.try_get::<String, _>("name").map_err(db_err))
                    .collect::<StoreResult<_>>()?;
                $crate::backup::check_tables(&found)?;
                let schema: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM portcullis_migrations")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(db_err)?
                    .try_get("v")
                    .map_err(db_err)?;
                let mut tables = Vec::new();
                for t in $crate::backup::TABLES {
                    tables.push(((*t).to_owned(), Self::table_columns(&mut *conn, t).await?));
                }
                Ok((schema, tables))
            }

            fn read_value(r: &$row, i: usize, kind: $crate::backup::Kind) -> StoreResult<$crate::backup::ValueRead> {
                use $crate::backup::{Kind, ValueRead};
                let v = match kind {
                    Kind::Int8 => r.try_get::<Option<i64>, _>(i).map_err(db_err)?.map(ValueRead::Int),
                    Kind::Int4 => r.try_get::<Option<i32>, _>(i).map_err(db_err)?.map(|v| ValueRead::Int(i64::from(v))),
                    Kind::Bool => r.try_get::<Option<bool>, _>(i).map_err(db_err)?.map(ValueRead::Bool),
                    Kind::Text => r.try_get::<Option<String>, _>(i).map_err(db_err)?.map(ValueRead::Text),
                    Kind::Bytes => r.try_get::<Option<Vec<u8>>, _>(i).map_err(db_err)?.map(ValueRead::Bytes),
                };
                Ok(v.unwrap_or(ValueRead::Null))
            }

            async fn backup_to(&self, out: &mut (dyn std::io::Write + Send)) -> StoreResult<BackupSummary> {
                use futures_util::TryStreamExt;
                use $crate::backup::{ArchiveWriter, ident};
                let mut tx = self.pool.begin_with(<$pool as $crate::backup::BackendSql>::SNAPSHOT_BEGIN).await.map_err(db_err)?;
                let (schema, tables) = Self::backup_layout(&mut *tx).await?;
                let mut w = ArchiveWriter::new(out);
                w.header(<$pool as $crate::backup::BackendSql>::NAME, schema, &tables)?;
                let mut counts = Vec::new();
                for (table, cols) in &tables {
                    w.line(&serde_json::json!({ "table": table }))?;
                    let list: Vec<String> = cols.iter().map(|(c, _)| ident(c)).collect();
                    let sql = format!("SELECT {} FROM {}", list.join(", "), ident(table));
                    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
                    let mut n: u64 = 0;
                    while let Some(r) = rows.try_next().await.map_err(db_err)? {
                        let mut values = Vec::with_capacity(cols.len());
                        for (i, (_, kind)) in cols.iter().enumerate() {
                            values.push(Self::read_value(&r, i, *kind)?.into_json());
                        }
                        w.line(&serde_json::Value::Array(values))?;
                        n += 1;
                    }
                    drop(rows);
                    w.line(&serde_json::json!({ "end": table, "rows": n }))?;
                    counts.push((table.clone(), n));
                }
                w.finish()?;
                tx.rollback().await.map_err(db_err)?;
                Ok(BackupSummary { schema_version: schema, tables: counts })
            }

            async fn restore_from(&self, input: &mut (dyn std::io::BufRead + Send), replace: bool) -> StoreResult<BackupSummary> {
                use $crate::backup::{ArchiveReader, BackendSql, bind_value, ident};
                let mut tx = self.pool.begin_with(<$pool as BackendSql>::RESTORE_BEGIN).await.map_err(db_err)?;
                let (schema, tables) = Self::backup_layout(&mut *tx).await?;
                let mut r = ArchiveReader::new(input);
                let header = r.header()?;
                if header.schema != schema {
                    return Err(StoreError::Conflict(format!(
                        "the backup has schema version {} and this database {schema}: restore with the portcullis version that took it",
                        header.schema
                    )));
                }
                let names: Vec<&str> = header.tables.iter().map(|(n, _)| n.as_str()).collect();
                if names != $crate::backup::TABLES {
                    return Err(StoreError::Conflict(format!("the backup's tables {names:?} are not this version's")));
                }
                // Empty: no table has a row, except the chain head that the migration wrote.
                for (table, _) in &tables {
                    let probe = if table == "audit_chain" {
                        "SELECT 1 AS x FROM audit_chain WHERE mac IS NOT NULL".to_owned()
                    } else {
                        format!("SELECT 1 AS x FROM {} LIMIT 1", ident(table))
                    };
                    let used = sqlx::query(sqlx::AssertSqlSafe(probe)).fetch_optional(&mut *tx).await.map_err(db_err)?.is_some();
                    if used && !replace {
                        return Err(StoreError::Conflict(format!(
                            "the database is not empty (table {table} has rows): restore into a new database, or replace everything with --force"
                        )));
                    }
                }
                for stmt in <$pool as BackendSql>::GUARD_OFF {
                    sqlx::query(*stmt).execute(&mut *tx).await.map_err(db_err)?;
                }
                for (table, _) in tables.iter().rev() {
                    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {}", ident(table)))).execute(&mut *tx).await.map_err(db_err)?;
                }
                let mut counts = Vec::new();
                for ((table, cols), (_, archived)) in tables.iter().zip(&header.tables) {
                    // The archive's columns in its order, each with this database's kind.
                    let mut kinds = Vec::with_capacity(archived.len());
                    for (c, _) in archived {
                        let k = cols.iter().find(|(n, _)| n == c).map(|(_, k)| *k).ok_or_else(|| {
                            StoreError::Conflict(format!("the backup has column {table}.{c}, which this database lacks"))
                        })?;
                        kinds.push((c.as_str(), k));
                    }
                    if let Some((c, _)) = cols.iter().find(|(c, _)| !archived.iter().any(|(a, _)| a == c)) {
                        return Err(StoreError::Conflict(format!("the backup lacks column {table}.{c}")));
                    }
                    let start = r.next()?;
                    if start.get("table").and_then(serde_json::Value::as_str) != Some(table.as_str()) {
                        return Err($crate::backup::bad_line(&format!("the start of table {table}")));
                    }
                    let per_row = kinds.len().max(1);
                    // Up to 200 rows per INSERT, within both backends' parameter limits.
                    let batch = (30_000 / per_row).clamp(1, 200);
                    let mut pending: Vec<Vec<$crate::backup::ValueBind>> = Vec::with_capacity(batch);
                    let mut n: u64 = 0;
                    loop {
                        let line = r.next()?;
                        if let Some(values) = line.as_array() {
                            if values.len() != kinds.len() {
                                return Err($crate::backup::bad_line(&format!("a row of {table} with {} values", values.len())));
                            }
                            let row = kinds
                                .iter()
                                .zip(values)
                                .map(|((c, k), v)| bind_value(table, c, *k, v))
                                .collect::<StoreResult<Vec<_>>>()?;
                            pending.push(row);
                            n += 1;
                            if pending.len() == batch {
                                Self::insert_rows(&mut *tx, table, &kinds, &mut pending).await?;
                            }
                            continue;
                        }
                        let end_ok = line.get("end").and_then(serde_json::Value::as_str) == Some(table.as_str())
                            && line.get("rows").and_then(serde_json::Value::as_u64) == Some(n);
                        if !end_ok {
                            return Err($crate::backup::bad_line(&format!("the end of table {table} after {n} rows")));
                        }
                        break;
                    }
                    Self::insert_rows(&mut *tx, table, &kinds, &mut pending).await?;
                    counts.push((table.clone(), n));
                }
                r.finish()?;
                for stmt in <$pool as BackendSql>::GUARD_ON {
                    sqlx::query(*stmt).execute(&mut *tx).await.map_err(db_err)?;
                }
                tx.commit().await.map_err(db_err)?;
                Ok(BackupSummary { schema_version: schema, tables: counts })
            }

            /// One multi-row INSERT of `rows` (emptied).
            async fn insert_rows(
                conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection,
                table: &str,
                cols: &[(&str, $crate::backup::Kind)],
                rows: &mut Vec<Vec<$crate::backup::ValueBind>>,
            ) -> StoreResult<()> {
                use $crate::backup::{ValueBind, ident};
                if rows.is_empty() {
                    return Ok(());
                }
                let names: Vec<String> = cols.iter().map(|(c, _)| ident(c)).collect();
                let mut p = 0;
                let tuples: Vec<String> = rows
                    .iter()
                    .map(|row| {
                        let slots: Vec<String> = row
                            .iter()
                            .map(|_| {
                                p += 1;
                                format!("${p}")
                            })
                            .collect();
                        format!("({})", slots.join(", "))
                    })
                    .collect();
                let sql = format!("INSERT INTO {} ({}) VALUES {}", ident(table), names.join(", "), tuples.join(", "));
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for v in rows.drain(..).flatten() {
                    q = match v {
                        ValueBind::Int8(v) => q.bind(v),
                        ValueBind::Int4(v) => q.bind(v),
                        ValueBind::Bool(v) => q.bind(v),
                        ValueBind::Text(v) => q.bind(v),
                        ValueBind::Bytes(v) => q.bind(v),
                    };
                }
                q.execute(&mut *conn).await.map_err(db_err)?;
                Ok(())
            }
        }
    };
}

pub(crate) fn bad_line(what: &str) -> StoreError {
    bad(format!("expected {what}"))
}
