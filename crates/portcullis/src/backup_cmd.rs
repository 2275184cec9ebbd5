//! `portcullis audit verify`, `portcullis backup` and `portcullis restore` (docs/operations.md):
//! commands run directly against the database, alongside running servers (`audit verify` and
//! `backup` only read; `restore` wants an empty database and every server stopped).

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use portcullis_core::audit_chain::{ChainSummary, ChainVerifier, RecordedHead};
use portcullis_core::clock::SystemClock;
use portcullis_core::crypto::vault::{KeyVault, LocalKeyVault};
use portcullis_core::store::{BackupSummary, Store};
use portcullis_core::usecases::master_key_matches;

use crate::config::Settings;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the audit log's hash chain: every row, in order, up to the chain head. Exits 0
    /// and prints the head (SEQ:MAC) when intact; exits non-zero naming the first bad row.
    Verify {
        /// A head printed by an earlier run (SEQ:MAC): the chain must still pass through it,
        /// which catches the whole database being put back to an older copy.
        #[arg(long, value_name = "SEQ:MAC")]
        expect_head: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Where to write the backup (`-` for standard output). Written to FILE.partial, then
    /// renamed: FILE is complete or absent.
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A file written by `portcullis backup` (`-` for standard input).
    pub file: PathBuf,
    /// Delete everything in the database first instead of refusing a non-empty one.
    #[arg(long)]
    pub force: bool,
}

/// The store of an existing installation: never creates an empty SQLite database.
async fn existing_store(s: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    if s.database_url.is_none() {
        let db = s.data_dir.join("portcullis.db");
        if !db.exists() {
            bail!("there is no database at {} (use --data-dir or --database-url)", db.display());
        }
    }
    super::open_store(s, &SystemClock).await
}

/// The vault with this installation's master key, refusing another key.
async fn vault_for(store: &dyn Store, s: &Settings) -> anyhow::Result<LocalKeyVault> {
    let key = super::master_key(&s.data_dir, true)?;
    let vault = LocalKeyVault::new(&key)?;
    match master_key_matches(store, &vault).await? {
        Some(true) => Ok(vault),
        Some(false) => bail!("the master key does not match this database"),
        None => bail!("the database was never initialised: start `portcullis serve` once"),
    }
}

async fn verify_chain(
    store: &dyn Store,
    vault: &LocalKeyVault,
    expect: Option<RecordedHead>,
) -> anyhow::Result<Result<ChainSummary, portcullis_core::audit_chain::ChainFault>> {
    let mut verifier = ChainVerifier::new(vault.audit_chain_key(), expect);
    store.scan_audit_chain(&mut verifier).await?;
    Ok(verifier.finish())
}

fn describe(s: &ChainSummary) -> String {
    let mut line = format!("audit chain intact: {} rows checked, head {}", s.checked, s.head());
    if s.pre_rows > 0 {
        line.push_str(&format!(" ({} older rows precede the chain and are not covered)", s.pre_rows));
    }
    line
}

pub async fn audit(cmd: AuditCommand, s: &Settings) -> anyhow::Result<()> {
    let AuditCommand::Verify { expect_head } = cmd;
    let expect = expect_head
        .map(|h| RecordedHead::parse(&h).ok_or_else(|| anyhow::anyhow!("--expect-head {h:?}: expected SEQ:MAC (hex)")))
        .transpose()?;
    let store = existing_store(s).await?;
    let vault = vault_for(store.as_ref(), s).await?;
    match verify_chain(store.as_ref(), &vault, expect).await? {
        Ok(summary) => {
            println!("{}", describe(&summary));
            Ok(())
        }
        Err(fault) => bail!("audit chain broken: {fault}"),
    }
}

fn summary_line(what: &str, b: &BackupSummary) -> String {
    let rows: u64 = b.tables.iter().map(|(_, n)| n).sum();
    format!("{what}: schema version {}, {rows} rows in {} tables", b.schema_version, b.tables.len())
}

pub async fn backup(args: BackupArgs, s: &Settings) -> anyhow::Result<()> {
    let store = existing_store(s).await?;
    let summary = if args.file == Path::new("-") {
        let mut out = BufWriter::new(std::io::stdout());
        store.backup(&mut out).await?
    } else {
        let partial = partial_path(&args.file);
        let summary = write_file(store.as_ref(), &partial).await;
        let summary = match summary {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        std::fs::rename(&partial, &args.file)
            .with_context(|| format!("renaming {} to {}", partial.display(), args.file.display()))?;
        summary
    };
    eprintln!("{}", summary_line(&format!("backup written to {}", args.file.display()), &summary));
    eprintln!(
        "the master key is not in the backup (private keys in it are sealed with it): keep master.key or \
         PORTCULLIS_MASTER_KEY safe separately"
    );
    Ok(())
}

fn partial_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// The backup, owner-only (it holds keyed hashes and sealed keys), flushed to disk.
async fn write_file(store: &dyn Store, path: &Path) -> anyhow::Result<BackupSummary> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let summary = store.backup(&mut out).await?;
    let file = out.into_inner().map_err(|e| e.into_error()).context("writing the backup")?;
    file.sync_all().context("flushing the backup to disk")?;
    Ok(summary)
}

pub async fn restore(args: RestoreArgs, s: &Settings) -> anyhow::Result<()> {
    super::ensure_data_dir(&s.data_dir)?;
    // SQLite: not while a server uses this data directory (PostgreSQL: stop every node first).
    let _lock = super::lock_data_dir(&s.data_dir)?;
    let store = super::open_store(s, &SystemClock).await?;
    let summary = if args.file == Path::new("-") {
        let mut input = BufReader::new(std::io::stdin());
        store.restore(&mut input, args.force).await?
    } else {
        let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
        store.restore(&mut BufReader::new(file), args.force).await?
    };
    eprintln!("{}", summary_line("restored", &summary));
    // The restored data is only usable with the master key it was sealed with.
    match super::master_key(&s.data_dir, true) {
        Err(_) => eprintln!(
            "now put the master key of the backed-up installation in place ({}/master.key, mode 0600, or \
             PORTCULLIS_MASTER_KEY) before starting the server",
            s.data_dir.display()
        ),
        Ok(key) => {
            let vault = LocalKeyVault::new(&key)?;
            if master_key_matches(store.as_ref(), &vault).await? != Some(true) {
                bail!("restored, but the master key here is not the one the backup was sealed with: replace it");
            }
            match verify_chain(store.as_ref(), &vault, None).await? {
                Ok(chain) => eprintln!("master key matches; {}", describe(&chain)),
                Err(fault) => bail!("restored, but the audit chain is broken: {fault}"),
            }
        }
    }
    Ok(())
}
