//! The audit log's hash chain: the key, the canonical encoding of a row, and the verifier.
//!
//! Every audit row carries `mac = HMAC-SHA-256(chain key, previous row's mac ‖ every column of
//! the row, seq included)`, so editing, removing, inserting or reordering rows breaks the chain
//! at the first row touched. The chain head (one row: the first chained `seq`, how many older
//! unchained rows precede it, the last `seq` and `mac`) carries its own MAC under a distinct
//! label, updated with every append, so cutting rows off the end is seen too. The chain key is
//! derived from the master key and never stored: database access alone cannot recompute it.
//!
//! What it cannot see: the whole database put back to an older copy (the head and the rows
//! then agree). `portcullis audit verify` prints the head so operators can record it elsewhere
//! and check later that the chain still passes through it ([`RecordedHead`]).

use std::fmt;
use std::ops::ControlFlow;

use aws_lc_rs::hmac;

/// Labels keep a row MAC from ever being taken for a head MAC, and the reverse.
const ROW_LABEL: &[u8] = b"portcullis/audit-row/v1";
const HEAD_LABEL: &[u8] = b"portcullis/audit-head/v1";
pub const MAC_LEN: usize = 32;

/// The HMAC key of the chain (derived from the master key by the key vault).
#[derive(Clone)]
pub struct AuditChainKey(hmac::Key);

impl fmt::Debug for AuditChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditChainKey { .. }")
    }
}

/// Every column of an audit row as stored (`details` is the stored JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    pub id: String,
    pub at: i64,
    pub org_id: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub ip: Option<String>,
    pub details: String,
    /// `None` for rows written before the chain started.
    pub mac: Option<Vec<u8>>,
}

/// The chain head as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The `seq` of the first chained row.
    pub first_seq: i64,
    /// How many (unchained) rows the log held when the chain started.
    pub pre_rows: i64,
    /// The `seq` of the last chained row (`first_seq - 1` while there is none).
    pub seq: i64,
    pub mac: Option<Vec<u8>>,
    /// `None` only until the first start with the master key seals it.
    pub head_mac: Option<Vec<u8>>,
}

/// Length-prefixed fields: no two different rows encode alike.
struct Encoder(hmac::Context);

impl Encoder {
    fn new(key: &hmac::Key, label: &[u8]) -> Self {
        let mut e = Self(hmac::Context::with_key(key));
        e.bytes(label);
        e
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.update(&(b.len() as u64).to_be_bytes());
        self.0.update(b);
    }
    fn int(&mut self, v: i64) {
        self.0.update(&v.to_be_bytes());
    }
    fn opt(&mut self, b: Option<&[u8]>) {
        match b {
            None => self.0.update(&[0]),
            Some(b) => {
                self.0.update(&[1]);
                self.bytes(b);
            }
        }
    }
    fn finish(self) -> [u8; MAC_LEN] {
        let tag = self.0.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl AuditChainKey {
    pub fn new(key: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// The MAC of `row` (its own `mac` column aside) following a row whose MAC is `prev`
    /// (`None` for the first chained row).
    pub fn row_mac(&self, prev: Option<&[u8]>, row: &AuditRow) -> [u8; MAC_LEN] {
        let mut e = Encoder::new(&self.0, ROW_LABEL);
        e.opt(prev);
        e.int(row.seq);
        e.bytes(row.id.as_bytes());
        e.int(row.at);
        e.opt(row.org_id.as_deref().map(str::as_bytes));
        e.bytes(row.actor.as_bytes());
        e.bytes(row.action.as_bytes());
        e.bytes(row.target.as_bytes());
        e.bytes(row.outcome.as_bytes());
        e.opt(row.ip.as_deref().map(str::as_bytes));
        e.bytes(row.details.as_bytes());
        e.finish()
    }

    /// The MAC of the head's position: which row ends the chain, and where it began.
    pub fn head_mac(&self, first_seq: i64, pre_rows: i64, seq: i64, mac: Option<&[u8]>) -> [u8; MAC_LEN] {
        let mut e = Encoder::new(&self.0, HEAD_LABEL);
        e.int(first_seq);
        e.int(pre_rows);
        e.int(seq);
        e.opt(mac);
        e.finish()
    }

    fn head_is_valid(&self, h: &ChainHead) -> bool {
        h.head_mac.as_deref().is_some_and(|m| same(&self.head_mac(h.first_seq, h.pre_rows, h.seq, h.mac.as_deref()), m))
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Receives the chain head and then every audit row in `seq` order, all read from one
/// consistent snapshot (the store's side of a verification).
pub trait AuditChainVisitor {
    fn head(&mut self, head: Option<ChainHead>) -> ControlFlow<()>;
    fn row(&mut self, row: AuditRow) -> ControlFlow<()>;
}

/// A head recorded earlier (`SEQ:MAC` in hex, as `audit verify` prints it): the chain must
/// still pass through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHead {
    pub seq: i64,
    pub mac: Vec<u8>,
}

impl RecordedHead {
    pub fn parse(s: &str) -> Option<Self> {
        let (seq, mac) = s.trim().split_once(':')?;
        let mac = crate::pki::unhex(mac)?;
        (mac.len() == MAC_LEN).then_some(Self { seq: seq.parse().ok()?, mac })
    }
}

/// The first thing wrong with the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFault {
    /// There is no chain head: the database predates the audit chain's migration.
    NoHead,
    /// The head was never sealed with the master key: no server has started on this
    /// database since the chain was added, or the head was reset.
    HeadUnsealed,
    /// The head record does not match its MAC: it was altered.
    HeadAltered,
    /// The row at `seq` does not match its MAC: it was edited (or rows were renumbered or
    /// reordered there).
    Edited { seq: i64 },
    /// Rows `from..=to` are missing (deleted); `to` is the head's `seq` when the end was cut.
    Missing { from: i64, to: i64 },
    /// The row at `seq` lies after the chain head: it was inserted.
    Unexpected { seq: i64 },
    /// The rows older than the chain were `pre_rows`, now they are `found`.
    PreChainChanged { pre_rows: i64, found: i64 },
    /// The recorded head is not in the chain: the log was rolled back or rewritten.
    NotThroughRecorded { seq: i64 },
}

impl fmt::Display for ChainFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHead => f.write_str("the audit chain head is missing (run the migrations)"),
            Self::HeadUnsealed => f.write_str(
                "the audit chain head is not sealed: no server has started on this database since the chain was \
                 added, or the head was reset",
            ),
            Self::HeadAltered => f.write_str("the audit chain head does not match its MAC: it was altered"),
            Self::Edited { seq } => write!(f, "audit row seq {seq} does not match its MAC: edited (or rows moved)"),
            Self::Missing { from, to } if from == to => write!(f, "audit row seq {from} is missing: deleted"),
            Self::Missing { from, to } => write!(f, "audit rows seq {from} to {to} are missing: deleted"),
            Self::Unexpected { seq } => write!(f, "audit row seq {seq} is unexpected: it lies after the chain head"),
            Self::PreChainChanged { pre_rows, found } => write!(
                f,
                "{found} audit rows precede the chain, but {pre_rows} did when it started: rows were inserted or deleted there"
            ),
            Self::NotThroughRecorded { seq } => {
                write!(f, "the chain does not pass through the recorded head at seq {seq}: rolled back or rewritten")
            }
        }
    }
}

/// What an intact chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Chained rows checked.
    pub checked: u64,
    /// Older rows the chain does not cover.
    pub pre_rows: i64,
    pub head_seq: i64,
    pub head_mac: Option<Vec<u8>>,
}

impl ChainSummary {
    /// `SEQ:MAC` (hex): what to record and pass back as a [`RecordedHead`].
    pub fn head(&self) -> String {
        format!("{}:{}", self.head_seq, self.head_mac.as_deref().map(crate::pki::hex).unwrap_or_default())
    }
}

/// Checks the chain as the store streams it (an [`AuditChainVisitor`]); stops at the first fault.
#[derive(Debug)]
pub struct ChainVerifier {
    key: AuditChainKey,
    recorded: Option<RecordedHead>,
    recorded_seen: bool,
    head: Option<ChainHead>,
    next_seq: i64,
    prev: Option<[u8; MAC_LEN]>,
    pre_found: i64,
    checked: u64,
    fault: Option<ChainFault>,
}

impl ChainVerifier {
    pub fn new(key: AuditChainKey, recorded: Option<RecordedHead>) -> Self {
        Self {
            key,
            recorded,
            recorded_seen: false,
            head: None,
            next_seq: 0,
            prev: None,
            pre_found: 0,
            checked: 0,
            fault: None,
        }
    }

    fn fail(&mut self, fault: ChainFault) -> ControlFlow<()> {
        self.fault = Some(fault);
        ControlFlow::Break(())
    }

    /// The verdict once the store has streamed everything.
    pub fn finish(self) -> Result<ChainSummary, ChainFault> {
        if let Some(f) = self.fault {
            return Err(f);
        }
        let Some(head) = self.head else { return Err(ChainFault::NoHead) };
        if self.pre_found != head.pre_rows {
            return Err(ChainFault::PreChainChanged { pre_rows: head.pre_rows, found: self.pre_found });
        }
        // The rows ran out before the head's last one: the end was cut off.
        if self.next_seq <= head.seq {
            return Err(ChainFault::Missing { from: self.next_seq, to: head.seq });
        }
        let last = self.prev.map(|m| m.to_vec());
        if last != head.mac {
            return Err(ChainFault::HeadAltered);
        }
        if let Some(r) = &self.recorded
            && !self.recorded_seen
        {
            return Err(ChainFault::NotThroughRecorded { seq: r.seq });
        }
        Ok(ChainSummary { checked: self.checked, pre_rows: head.pre_rows, head_seq: head.seq, head_mac: head.mac })
    }
}

impl AuditChainVisitor for ChainVerifier {
    fn head(&mut self, head: Option<ChainHead>) -> ControlFlow<()> {
        let Some(head) = head else { return self.fail(ChainFault::NoHead) };
        if head.head_mac.is_none() {
            return self.fail(ChainFault::HeadUnsealed);
        }
        if !self.key.head_is_valid(&head) {
            return self.fail(ChainFault::HeadAltered);
        }
        self.next_seq = head.first_seq;
        self.head = Some(head);
        ControlFlow::Continue(())
    }

    fn row(&mut self, row: AuditRow) -> ControlFlow<()> {
        let Some(head) = &self.head else { return self.fail(ChainFault::NoHead) };
        if row.seq < head.first_seq {
            self.pre_found += 1;
            return ControlFlow::Continue(());
        }
        if row.seq > head.seq {
            return self.fail(ChainFault::Unexpected { seq: row.seq });
        }
        if row.seq > self.next_seq {
            return self.fail(ChainFault::Missing { from: self.next_seq, to: row.seq - 1 });
        }
        let mac = self.key.row_mac(self.prev.as_ref().map(|m| m.as_slice()), &row);
        if !row.mac.as_deref().is_some_and(|m| same(&mac, m)) {
            return self.fail(ChainFault::Edited { seq: row.seq });
        }
        if let Some(r) = &self.recorded
            && r.seq == row.seq
        {
            if !same(&r.mac, &mac) {
                let seq = r.seq;
                return self.fail(ChainFault::NotThroughRecorded { seq });
            }
            self.recorded_seen = true;
        }
        self.prev = Some(mac);
        self.next_seq = row.seq + 1;
        self.checked += 1;
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditChainKey {
        AuditChainKey::new(&[9u8; 32])
    }

    fn row(seq: i64) -> AuditRow {
        AuditRow {
            seq,
            id: format!("id-{seq}"),
            at: 1_700_000_000 + seq,
            org_id: Some("org".into()),
            actor: "system".into(),
            action: "thing.do".into(),
            target: "t".into(),
            outcome: "success".into(),
            ip: None,
            details: "{}".into(),
            mac: None,
        }
    }

    /// A chain of `n` rows after `pre` unchained ones (seq 1..=pre), and its sealed head.
    fn chain(pre: i64, n: i64) -> (Vec<AuditRow>, ChainHead) {
        let k = key();
        let mut rows: Vec<AuditRow> = (1..=pre).map(row).collect();
        let mut prev: Option<[u8; 32]> = None;
        for seq in pre + 1..=pre + n {
            let mut r = row(seq);
            let mac = k.row_mac(prev.as_ref().map(|m| m.as_slice()), &r);
            r.mac = Some(mac.to_vec());
            prev = Some(mac);
            rows.push(r);
        }
        let mac = prev.map(|m| m.to_vec());
        let head_mac = k.head_mac(pre + 1, pre, pre + n, mac.as_deref()).to_vec();
        (rows, ChainHead { first_seq: pre + 1, pre_rows: pre, seq: pre + n, mac, head_mac: Some(head_mac) })
    }

    fn verify(rows: &[AuditRow], head: &ChainHead, recorded: Option<RecordedHead>) -> Result<ChainSummary, ChainFault> {
        let mut v = ChainVerifier::new(key(), recorded);
        if v.head(Some(head.clone())).is_continue() {
            for r in rows {
                if v.row(r.clone()).is_break() {
                    break;
                }
            }
        }
        v.finish()
    }

    #[test]
    fn an_intact_chain_verifies_and_names_its_head() {
        let (rows, head) = chain(2, 5);
        let s = verify(&rows, &head, None).unwrap();
        assert_eq!((s.checked, s.pre_rows, s.head_seq), (5, 2, 7));
        let recorded = RecordedHead::parse(&s.head()).unwrap();
        assert_eq!(recorded.seq, 7);
        assert!(verify(&rows, &head, Some(recorded)).is_ok());
        let (empty, head0) = chain(0, 0);
        assert_eq!(verify(&empty, &head0, None).unwrap().checked, 0);
    }

    #[test]
    fn every_kind_of_tampering_is_named_at_its_row() {
        let (rows, head) = chain(1, 6);
        let mut edited = rows.clone();
        edited[3].details = "{\"x\":1}".into();
        assert_eq!(verify(&edited, &head, None), Err(ChainFault::Edited { seq: 4 }));

        let mut deleted = rows.clone();
        deleted.remove(3);
        assert_eq!(verify(&deleted, &head, None), Err(ChainFault::Missing { from: 4, to: 4 }));

        let tail = &rows[..5];
        assert_eq!(verify(tail, &head, None), Err(ChainFault::Missing { from: 6, to: 7 }));

        let mut inserted = rows.clone();
        let mut extra = row(8);
        extra.mac = Some(vec![0; 32]);
        inserted.push(extra);
        assert_eq!(verify(&inserted, &head, None), Err(ChainFault::Unexpected { seq: 8 }));

        // Two rows' contents swapped (seq kept): the first of them no longer matches.
        let mut swapped = rows.clone();
        let (a, b) = (swapped[2].clone(), swapped[3].clone());
        swapped[2] = AuditRow { seq: 3, ..b };
        swapped[3] = AuditRow { seq: 4, ..a };
        assert_eq!(verify(&swapped, &head, None), Err(ChainFault::Edited { seq: 3 }));

        let mut pre = rows.clone();
        pre.insert(0, row(0));
        assert_eq!(verify(&pre, &head, None), Err(ChainFault::PreChainChanged { pre_rows: 1, found: 2 }));
    }

    #[test]
    fn the_head_cannot_be_moved_back_or_reset() {
        let (rows, head) = chain(0, 4);
        // Cut the last row and point the head at the new last row, reusing that row's MAC.
        let cut = &rows[..3];
        let forged = ChainHead { seq: 3, mac: rows[2].mac.clone(), ..head.clone() };
        assert_eq!(verify(cut, &forged, None), Err(ChainFault::HeadAltered));
        let unsealed = ChainHead { head_mac: None, ..head.clone() };
        assert_eq!(verify(&rows, &unsealed, None), Err(ChainFault::HeadUnsealed));
        // A head with a valid MAC (only the key holder makes one) naming another last row.
        let other = vec![7u8; 32];
        let h = ChainHead {
            mac: Some(other.clone()),
            head_mac: Some(key().head_mac(1, 0, 4, Some(&other)).to_vec()),
            ..head.clone()
        };
        assert_eq!(verify(&rows, &h, None), Err(ChainFault::HeadAltered));
    }

    #[test]
    fn a_recorded_head_catches_a_rollback() {
        let (rows, head) = chain(0, 5);
        let recorded = RecordedHead { seq: 5, mac: rows[4].mac.clone().unwrap() };
        // The database put back to when it had 3 rows: consistent, but short of the record.
        let (old_rows, old_head) = (rows[..3].to_vec(), {
            let mac = rows[2].mac.clone();
            ChainHead { seq: 3, head_mac: Some(key().head_mac(1, 0, 3, mac.as_deref()).to_vec()), mac, ..head }
        });
        assert!(verify(&old_rows, &old_head, None).is_ok());
        assert_eq!(verify(&old_rows, &old_head, Some(recorded)), Err(ChainFault::NotThroughRecorded { seq: 5 }));
        assert!(RecordedHead::parse("5:zz").is_none());
        assert!(RecordedHead::parse("5").is_none());
    }

    #[test]
    fn the_encoding_is_unambiguous_and_keyed() {
        let mut a = row(1);
        a.actor = "ab".into();
        a.action = "c".into();
        let mut b = row(1);
        b.actor = "a".into();
        b.action = "bc".into();
        assert_ne!(key().row_mac(None, &a), key().row_mac(None, &b));
        let mut none = row(1);
        none.ip = None;
        let mut empty = row(1);
        empty.ip = Some(String::new());
        assert_ne!(key().row_mac(None, &none), key().row_mac(None, &empty));
        assert_ne!(key().row_mac(None, &a), AuditChainKey::new(&[1u8; 32]).row_mac(None, &a));
        assert_eq!(format!("{:?}", key()), "AuditChainKey { .. }");
    }
}
