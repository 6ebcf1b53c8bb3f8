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
//! - `publishers`: per durable subscription and publisher, the ranges of
//!   the publisher's sequence numbers already queued, by epoch. They drop
//!   an event a client sent again through another node.
//!
//! The tables live behind the [`Store`] trait: [`LmdbStore`] on disk, and
//! [`MemoryStore`] for simulations and tests. What each write does to the
//! tables ([`writer`]) and how they are read back are written once, over
//! the trait. Reads happen on the caller's thread; all writes go through
//! one [`writer`] thread that commits many operations per transaction.

mod lmdb;
mod memory;
pub mod reader;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::wire::{DurableRecord, DurableTarget, Event};

/// Layout version of the store; a store of another version is refused.
const FORMAT: u32 = 2;
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
    /// Commit and read on the driver's thread instead of the writer's and
    /// the reader's. Slower, but a simulation on virtual time then replays
    /// exactly.
    pub inline_io: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            map_size: DEFAULT_MAP_SIZE,
            sync: SyncMode::Always,
            inline_io: false,
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

/// The tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Every durable subscription of the cluster, by name.
    Durables,
    /// Outbox entries by key.
    Outbox,
    /// Queued events, by durable name and position.
    Queue,
    /// Per durable subscription homed here: the position the next event gets.
    Positions,
    /// Per durable subscription: the last sequence number this node gave,
    /// as an origin.
    OriginSeqs,
    /// Per durable subscription and origin: the next sequence number due.
    Expected,
    /// Events that came before their turn, by durable, origin and sequence.
    Early,
    /// Per durable and publisher, by epoch: the highest sequence number
    /// of the publisher's that epoch has brought (see [`writer`]).
    Publishers,
}

impl Table {
    const ALL: [Table; 8] = [
        Table::Durables,
        Table::Outbox,
        Table::Queue,
        Table::Positions,
        Table::OriginSeqs,
        Table::Expected,
        Table::Early,
        Table::Publishers,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::Durables => "durables",
            Table::Outbox => "outbox",
            Table::Queue => "queue",
            Table::Positions => "positions",
            Table::OriginSeqs => "origin_seqs",
            Table::Expected => "expected",
            Table::Early => "early",
            Table::Publishers => "publishers",
        }
    }
}

/// Everything the node needs from its store when it starts.
pub struct Recovered {
    pub durables: Vec<DurableRecord>,
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Queue stats of every durable subscription with a queue here.
    pub queues: HashMap<String, QueueStats>,
}

impl Recovered {
    /// The key the writer gives the next outbox entry: after every stored one.
    pub fn next_outbox_key(&self) -> u64 {
        self.outbox.last().map_or(1, |(key, _)| key + 1)
    }
}

/// Called with each record a scan finds; returns whether to go on.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'a;

/// One consistent view of the tables.
pub trait ReadTables {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<&[u8]>, StoreError>;
    /// Calls `visit` with each record of `table` from key `from` on whose
    /// key starts with `prefix`, in key order, while it returns true.
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        prefix: &[u8],
        visit: &mut Visit,
    ) -> Result<(), StoreError>;
}

/// A write transaction's view of the tables.
pub trait Tables: ReadTables {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError>;
}

/// Where a node keeps what it has taken custody of. Shared by the writer
/// thread and the node's reads.
pub trait Store: Send + Sync {
    /// Where it lives, for errors.
    fn location(&self) -> &Path;
    /// The node it belongs to.
    fn owner(&self) -> NodeId;
    /// Runs `read` on one consistent view.
    fn read(
        &self,
        read: &mut dyn FnMut(&dyn ReadTables) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Runs `write` in one transaction and commits it (synced, as
    /// configured) before returning; if `write` fails, nothing of it is
    /// kept.
    fn write(
        &self,
        write: &mut dyn FnMut(&mut dyn Tables) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// Reads what survives a restart.
    fn recover(&self) -> Result<Recovered, StoreError> {
        let mut recovered = Recovered {
            durables: Vec::new(),
            outbox: Vec::new(),
            queues: HashMap::new(),
        };
        let corrupt = |table: Table, detail: &str| corrupt(self.location(), table, detail);
        self.read(&mut |tables| {
            tables.scan(Table::Durables, &[], &[], &mut |_, value| {
                recovered.durables.push(
                    postcard::from_bytes::<DurableRecord>(value)
                        .map_err(|e| corrupt(Table::Durables, &e.to_string()))?,
                );
                Ok(true)
            })?;
            tables.scan(Table::Outbox, &[], &[], &mut |key, value| {
                let key = decode_u64(key).ok_or_else(|| corrupt(Table::Outbox, "bad key"))?;
                let entry = postcard::from_bytes::<OutboxEntry>(value)
                    .map_err(|e| corrupt(Table::Outbox, &e.to_string()))?;
                recovered.outbox.push((key, entry));
                Ok(true)
            })?;
            let mut positions = Vec::new();
            tables.scan(Table::Positions, &[], &[], &mut |name, next| {
                let name = String::from_utf8(name.to_vec())
                    .map_err(|_| corrupt(Table::Positions, "name is not UTF-8"))?;
                let next =
                    decode_u64(next).ok_or_else(|| corrupt(Table::Positions, "bad value"))?;
                positions.push((name, next));
                Ok(true)
            })?;
            for (name, next) in positions {
                let mut stats = QueueStats {
                    first: next,
                    next,
                    ..Default::default()
                };
                let prefix = name_prefix(&name);
                let mut first = true;
                tables.scan(Table::Queue, &prefix, &prefix, &mut |key, value| {
                    let queued: QueuedEvent = postcard::from_bytes(value)
                        .map_err(|e| corrupt(Table::Queue, &e.to_string()))?;
                    if first {
                        stats.first = decode_u64(&key[prefix.len()..])
                            .ok_or_else(|| corrupt(Table::Queue, "bad key"))?;
                        stats.oldest_ms = queued.stored_ms;
                        first = false;
                    }
                    stats.bytes += queued.event.payload.len() as u64;
                    Ok(true)
                })?;
                recovered.queues.insert(name, stats);
            }
            Ok(())
        })?;
        Ok(recovered)
    }

    /// Up to `limit` events of durable `name`'s queue from position `from`.
    fn read_queue(
        &self,
        name: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        let prefix = name_prefix(name);
        let mut events = Vec::new();
        let corrupt = |detail: &str| corrupt(self.location(), Table::Queue, detail);
        self.read(&mut |tables| {
            events.clear();
            tables.scan(
                Table::Queue,
                &queue_key(name, from),
                &prefix,
                &mut |key, value| {
                    let position =
                        decode_u64(&key[prefix.len()..]).ok_or_else(|| corrupt("bad key"))?;
                    let queued: QueuedEvent =
                        postcard::from_bytes(value).map_err(|e| corrupt(&e.to_string()))?;
                    events.push((position, queued.event));
                    Ok(events.len() < limit)
                },
            )
        })?;
        Ok(events)
    }
}

/// A record that does not decode: the store is corrupt.
fn corrupt(location: &Path, table: Table, detail: &str) -> StoreError {
    StoreError::Corrupt {
        path: location.to_path_buf(),
        detail: format!("bad record in {}: {detail}", table.name()),
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

/// An at-least-once event the node holds for durable subscriptions homed
/// elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub event: Event,
    /// The publisher's epoch at the event's origin; see [`writer::Custody`].
    pub epoch: u64,
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

pub use lmdb::LmdbStore;
pub use memory::MemoryStore;

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
