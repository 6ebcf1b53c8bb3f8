//! The store: LMDB (through heed) in the node's data dir, holding what the
//! node has taken custody of.
//!
//! - `outbox`: at-least-once events on their way to durable subscriptions
//!   homed elsewhere, kept until the next hop acknowledges them.
//! - `queue`: the events of each durable subscription homed here, by
//!   position, kept until its client acknowledges them.
//! - `durables`: every durable subscription of the cluster, so interest
//!   survives restarts and partitions.
//! - `expected` and `early`: per durable subscription and origin node, the
//!   next sequence number due and the events that came before their turn.
//!   They drop duplicates and restore each origin's order.
//!
//! Reads happen on the caller's thread; all writes go through one
//! [`writer`] thread that commits many operations per transaction.

pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions};
use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::wire::{DurableRecord, DurableTarget, Event};

/// Layout version of the store; a store of another version is refused.
const FORMAT: u32 = 1;
/// Default LMDB map size: the most the store may ever hold.
pub const DEFAULT_MAP_SIZE: usize = 1 << 30;
/// Longest durable subscription name.
pub const MAX_DURABLE_NAME: usize = 64;

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SyncMode {
    /// fsync every commit before anything is acknowledged: nothing
    /// acknowledged is lost, even to a power cut.
    #[default]
    Always,
    /// Leave flushing to the OS: a crashed or killed node loses nothing, a
    /// power cut or kernel crash may lose recently acknowledged events.
    Never,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most bytes the store may hold (LMDB's map size).
    pub map_size: usize,
    pub sync: SyncMode,
    /// Commit on the driver's thread instead of a writer thread. Slower,
    /// but a simulation on virtual time then replays exactly.
    pub inline_writer: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            map_size: DEFAULT_MAP_SIZE,
            sync: SyncMode::Always,
            inline_writer: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store in {path}: {source}")]
    Open { path: PathBuf, source: heed::Error },
    #[error("the store in {path} is corrupt or not a treescale store ({detail}); move it aside to start with an empty store (what it held is lost), or restore it from a backup")]
    Corrupt { path: PathBuf, detail: String },
    #[error("the store in {path} has format {found}; this treescale reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("the store in {path} belongs to node {found}, not to {expected} whose key is in this data dir; was the data dir copied from another node?")]
    Foreign {
        path: PathBuf,
        found: String,
        expected: NodeId,
    },
    #[error("the store is full: its map of {map_size} bytes has no room left; raise --store-size, or let subscribers catch up")]
    MapFull { map_size: usize },
    #[error("the disk holding the store is full; free space there")]
    DiskFull,
    #[error("store error: {0}")]
    Other(heed::Error),
}

impl StoreError {
    /// Out of room, as opposed to broken.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::MapFull { .. } | StoreError::DiskFull)
    }
}

/// Classifies an error from a write.
fn write_error(e: heed::Error, map_size: usize) -> StoreError {
    const ENOSPC: i32 = 28;
    match e {
        heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::MapFull { map_size },
        heed::Error::Io(ref io) if io.raw_os_error() == Some(ENOSPC) => StoreError::DiskFull,
        other => StoreError::Other(other),
    }
}

/// An at-least-once event the node holds for durable subscriptions homed
/// elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub event: Event,
    pub targets: Vec<DurableTarget>,
}

/// An event in a durable subscription's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedEvent {
    /// When it was stored, in ms since the Unix epoch: for the age limit.
    pub stored_ms: u64,
    pub event: Event,
}

/// What a durable subscription's queue holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Position of the oldest event held, or of the next when empty.
    pub first: u64,
    /// Position the next event will get.
    pub next: u64,
    pub bytes: u64,
    /// `stored_ms` of the oldest event; 0 when empty.
    pub oldest_ms: u64,
}

impl QueueStats {
    pub fn len(&self) -> u64 {
        self.next - self.first
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The node's store. Cheap to clone: all clones share one environment.
#[derive(Clone)]
pub struct Store {
    env: Env,
    path: PathBuf,
    map_size: usize,
    /// The node that owns the store.
    node: NodeId,
    durables: Database<Bytes, Bytes>,
    outbox: Database<Bytes, Bytes>,
    queue: Database<Bytes, Bytes>,
    /// Per durable subscription homed here: the position the next event gets.
    positions: Database<Bytes, Bytes>,
    /// Per durable subscription: the last sequence number this node gave,
    /// as an origin.
    origin_seqs: Database<Bytes, Bytes>,
    expected: Database<Bytes, Bytes>,
    early: Database<Bytes, Bytes>,
}

/// Everything the node needs from its store when it starts.
pub struct Recovered {
    pub durables: Vec<DurableRecord>,
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Queue stats of every durable subscription with a queue here.
    pub queues: HashMap<String, QueueStats>,
}

impl Store {
    /// Opens (or creates) the store in `data_dir/store`, refusing one
    /// written by another node or another format.
    pub fn open(data_dir: &Path, node: NodeId, config: &StoreConfig) -> Result<Store, StoreError> {
        let path = data_dir.join("store");
        let open_error = |source: heed::Error| match source {
            heed::Error::Mdb(
                e @ (heed::MdbError::Invalid
                | heed::MdbError::Corrupted
                | heed::MdbError::VersionMismatch
                | heed::MdbError::PageNotFound),
            ) => StoreError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            },
            source => StoreError::Open {
                path: path.clone(),
                source,
            },
        };
        std::fs::create_dir_all(&path).map_err(|e| open_error(e.into()))?;
        let mut options = EnvOpenOptions::new();
        options.map_size(config.map_size).max_dbs(8);
        let flags = match config.sync {
            SyncMode::Always => EnvFlags::empty(),
            SyncMode::Never => EnvFlags::NO_SYNC,
        };
        // SAFETY: LMDB requires that no other environment in this process
        // and no other process opens these files while we hold them. The
        // data dir's LOCK (taken by the node before this) guarantees it.
        let env = unsafe { options.flags(flags).open(&path) }.map_err(open_error)?;
        let mut txn = env.write_txn().map_err(open_error)?;
        let mut db = |name: &str| env.create_database::<Bytes, Bytes>(&mut txn, Some(name));
        let (meta, durables, outbox, queue, positions, origin_seqs, expected, early) = (|| {
            Ok((
                db("meta")?,
                db("durables")?,
                db("outbox")?,
                db("queue")?,
                db("positions")?,
                db("origin_seqs")?,
                db("expected")?,
                db("early")?,
            ))
        })()
        .map_err(open_error)?;
        let corrupt = |detail: &str| StoreError::Corrupt {
            path: path.clone(),
            detail: detail.to_string(),
        };
        match meta.get(&txn, b"format").map_err(open_error)? {
            None => {
                meta.put(&mut txn, b"format", &FORMAT.to_le_bytes())
                    .map_err(open_error)?;
                meta.put(&mut txn, b"node", node.as_bytes())
                    .map_err(open_error)?;
            }
            Some(found) => {
                let found =
                    u32::from_le_bytes(found.try_into().map_err(|_| corrupt("bad format record"))?);
                if found != FORMAT {
                    return Err(StoreError::Format { path, found });
                }
                let owner = meta
                    .get(&txn, b"node")
                    .map_err(open_error)?
                    .ok_or_else(|| corrupt("no node record"))?;
                if owner != node.as_bytes() {
                    return Err(StoreError::Foreign {
                        found: hex(owner),
                        path,
                        expected: node,
                    });
                }
            }
        }
        txn.commit().map_err(open_error)?;
        Ok(Store {
            env,
            path,
            map_size: config.map_size,
            node,
            durables,
            outbox,
            queue,
            positions,
            origin_seqs,
            expected,
            early,
        })
    }

    /// Reads what survives a restart.
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        let txn = self.env.read_txn().map_err(|e| self.read_error(e))?;
        let mut durables = Vec::new();
        for item in self.durables.iter(&txn).map_err(|e| self.read_error(e))? {
            let (_, value) = item.map_err(|e| self.read_error(e))?;
            durables.push(self.decode::<DurableRecord>(value, "durables")?);
        }
        let mut outbox = Vec::new();
        for item in self.outbox.iter(&txn).map_err(|e| self.read_error(e))? {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            outbox.push((
                self.decode_u64(key, "outbox")?,
                self.decode::<OutboxEntry>(value, "outbox")?,
            ));
        }
        let mut queues = HashMap::new();
        for item in self.positions.iter(&txn).map_err(|e| self.read_error(e))? {
            let (name, next) = item.map_err(|e| self.read_error(e))?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| self.corrupt("positions", "name is not UTF-8"))?;
            let next = self.decode_u64(next, "positions")?;
            let mut stats = QueueStats {
                first: next,
                next,
                ..Default::default()
            };
            let prefix = name_prefix(&name);
            let entries = self
                .queue
                .prefix_iter(&txn, &prefix)
                .map_err(|e| self.read_error(e))?;
            for (i, item) in entries.enumerate() {
                let (key, value) = item.map_err(|e| self.read_error(e))?;
                let queued = self.decode::<QueuedEvent>(value, "queue")?;
                if i == 0 {
                    stats.first = self.decode_u64(&key[prefix.len()..], "queue")?;
                    stats.oldest_ms = queued.stored_ms;
                }
                stats.bytes += queued.event.payload.len() as u64;
            }
            queues.insert(name, stats);
        }
        Ok(Recovered {
            durables,
            outbox,
            queues,
        })
    }

    /// Up to `limit` events of durable `name`'s queue from position `from`.
    pub fn read_queue(
        &self,
        name: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        let txn = self.env.read_txn().map_err(|e| self.read_error(e))?;
        let prefix = name_prefix(name);
        let start = queue_key(name, from);
        let mut end = prefix.clone();
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        let range = (
            std::ops::Bound::Included(start.as_slice()),
            std::ops::Bound::Included(end.as_slice()),
        );
        let mut events = Vec::new();
        for item in self
            .queue
            .range(&txn, &range)
            .map_err(|e| self.read_error(e))?
            .take(limit)
        {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let position = self.decode_u64(&key[prefix.len()..], "queue")?;
            events.push((position, self.decode::<QueuedEvent>(value, "queue")?.event));
        }
        Ok(events)
    }

    fn decode<'a, T: Deserialize<'a>>(&self, bytes: &'a [u8], db: &str) -> Result<T, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| self.corrupt(db, &e.to_string()))
    }

    fn decode_u64(&self, bytes: &[u8], db: &str) -> Result<u64, StoreError> {
        bytes
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| self.corrupt(db, "key is not 8 bytes"))
    }

    fn corrupt(&self, db: &str, detail: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("bad record in {db}: {detail}"),
        }
    }

    fn read_error(&self, e: heed::Error) -> StoreError {
        match e {
            heed::Error::Mdb(heed::MdbError::Corrupted | heed::MdbError::PageNotFound) => {
                self.corrupt("store", &e.to_string())
            }
            other => StoreError::Other(other),
        }
    }
}

/// Keys of per-subscription records start with the name and a 0 byte,
/// which names never contain.
fn name_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 41);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

fn queue_key(name: &str, position: u64) -> Vec<u8> {
    let mut key = name_prefix(name);
    key.extend_from_slice(&position.to_be_bytes());
    key
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` may name a durable subscription: 1 to 64 letters, digits,
/// `-`, `_` or `.`.
pub fn valid_durable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DURABLE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests;
