//! The store's one writer: a thread that takes commands, applies all that
//! are waiting in one transaction, commits (with fsync unless told not to)
//! and only then reports each command's outcome. While one commit runs the
//! next batch gathers, so the cost of an fsync is shared by every event
//! that arrived during it.
//!
//! A command that fails (a full map, a full disk) must not take the others
//! of its batch down with it: when a batch fails, its commands are retried
//! one transaction each.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{
    corrupt, decode_u64, name_prefix, queue_key, OutboxEntry, QueueStats, QueuedEvent, Recovered,
    Store, StoreError, Table, Tables,
};
use crate::wire::{DurableRecord, DurableTarget, Event};

/// Commands applied in one transaction at most.
const MAX_BATCH: usize = 4096;

/// A durable subscription an event is for. `seq` is `None` when this node
/// is the event's origin and numbers it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub durable: String,
    pub seq: Option<u64>,
}

/// Where an event's epoch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epoch {
    /// From the event's origin, which stamped it.
    Given(u64),
    /// This node is the origin, and the event came on a client connection
    /// (`session`; `generation` counts the refusals the node made it, each
    /// of which ends an epoch). The epoch is the first of its events the
    /// writer takes, until taking one fails: an epoch promises that none
    /// of the publisher's events after it is missing here.
    Connection { session: u64, generation: u64 },
}

/// One event to take custody of.
#[derive(Debug, Clone)]
pub struct Custody {
    pub event: Event,
    /// The publisher's epoch: the sequence number of the first
    /// at-least-once event its connection to the origin node brought. A
    /// connection sends every at-least-once event from its epoch on, in
    /// order, so once an event of one epoch has reached a durable's home,
    /// so has every event of the publisher's between the epoch and it.
    pub epoch: Epoch,
    /// Durable subscriptions homed on this node: the event joins their queues.
    pub here: Vec<Target>,
    /// Homed elsewhere: the event goes into the outbox for them.
    pub onward: Vec<Target>,
}

pub enum Command<T> {
    /// Take custody of events, then report `then`. Queued events are
    /// stamped `stored_ms` (ms since the Unix epoch), for the age limit.
    Take {
        items: Vec<Custody>,
        stored_ms: u64,
        then: T,
    },
    /// The next hop holds these outbox entries now.
    Forget { keys: Vec<u64> },
    /// The client of durable subscription `durable` has handled every event
    /// up to `position`.
    Consumed { durable: String, position: u64 },
    /// Forget the sequence ranges of publishers not heard from since
    /// `idle_before_ms` (ms since the Unix epoch).
    ForgetPublishers { idle_before_ms: u64 },
    /// Client connection `session` is gone: forget its epochs.
    ConnectionGone { session: u64 },
    /// Keep these durable subscription records, then report `then`.
    PutDurables {
        records: Vec<DurableRecord>,
        then: T,
    },
}

/// What one command did, reported after its commit.
pub struct Outcome<T> {
    /// The `then` of the command; `None` for commands without one.
    pub then: Option<T>,
    pub result: Result<Done, StoreError>,
}

/// What a committed command changed.
#[derive(Debug, Default)]
pub struct Done {
    /// New outbox entries, by key.
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Queues that changed, with what they hold now.
    pub queues: Vec<(String, QueueStats)>,
}

/// The handle the node keeps: send commands here.
pub struct Writer<T> {
    mode: Mode<T>,
}

enum Mode<T> {
    Thread {
        commands: mpsc::UnboundedSender<Command<T>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    /// Each command commits inside `send`; see `StoreConfig::inline_io`.
    Inline {
        state: Box<std::sync::Mutex<State>>,
        outcomes: mpsc::UnboundedSender<Outcome<T>>,
    },
}

impl<T: Send + 'static> Writer<T> {
    /// Starts the writer, on its own thread unless `inline`, from what
    /// [`Store::recover`] found; outcomes go to `outcomes` in command order.
    pub fn start(
        store: Arc<dyn Store>,
        recovered: &Recovered,
        outcomes: mpsc::UnboundedSender<Outcome<T>>,
        inline: bool,
    ) -> Writer<T> {
        let mut state = State {
            store,
            queues: recovered.queues.clone(),
            next_key: recovered.next_outbox_key(),
            epochs: HashMap::new(),
        };
        if inline {
            let state = Box::new(std::sync::Mutex::new(state));
            return Writer {
                mode: Mode::Inline { state, outcomes },
            };
        }
        let (commands, mut rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    for outcome in state.apply_batch(std::mem::take(&mut batch)) {
                        if outcomes.send(outcome).is_err() {
                            return;
                        }
                    }
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Writer {
            mode: Mode::Thread {
                commands,
                thread: Some(thread),
            },
        }
    }

    pub fn send(&self, command: Command<T>) {
        match &self.mode {
            // The thread only stops when this handle is dropped.
            Mode::Thread { commands, .. } => {
                let _ = commands.send(command);
            }
            Mode::Inline { state, outcomes } => {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                for outcome in state.apply_batch(vec![command]) {
                    let _ = outcomes.send(outcome);
                }
            }
        }
    }
}

impl<T> Drop for Writer<T> {
    /// Lets the thread finish what it was given, so nothing accepted is
    /// left half done.
    fn drop(&mut self) {
        if let Mode::Thread { commands, thread } = &mut self.mode {
            let (closed, _) = mpsc::unbounded_channel();
            drop(std::mem::replace(commands, closed));
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The writer thread's state. `queues` and `next_key` change only when a
/// transaction commits.
struct State {
    store: Arc<dyn Store>,
    queues: HashMap<String, QueueStats>,
    next_key: u64,
    /// The epoch of each client connection that brought events here.
    epochs: HashMap<Epoch, u64>,
}

/// The changes one transaction has made so far, to keep if it commits.
struct Pending {
    queues: HashMap<String, QueueStats>,
    next_key: u64,
    epochs: HashMap<Epoch, u64>,
}

impl State {
    fn apply_batch<T>(&mut self, batch: Vec<Command<T>>) -> Vec<Outcome<T>> {
        if batch.len() > 1 {
            match self.transaction(&batch) {
                Ok(done) => return zip_outcomes(batch, done.into_iter().map(Ok)),
                Err(e) => tracing::debug!("batch failed ({e}); retrying one command at a time"),
            }
        }
        let mut results = Vec::with_capacity(batch.len());
        for command in &batch {
            let result = self
                .transaction(std::slice::from_ref(command))
                .map(|mut done| done.pop().unwrap_or_default());
            // Events of these connections are missing here now: their
            // next events start new epochs.
            if let (Err(_), Command::Take { items, .. }) = (&result, command) {
                for item in items {
                    self.epochs.remove(&item.epoch);
                }
            }
            results.push(result);
        }
        zip_outcomes(batch, results.into_iter())
    }

    /// Applies `commands` in one transaction and commits it.
    fn transaction<T>(&mut self, commands: &[Command<T>]) -> Result<Vec<Done>, StoreError> {
        let mut pending = Pending {
            queues: self.queues.clone(),
            next_key: self.next_key,
            epochs: self.epochs.clone(),
        };
        let mut done = Vec::with_capacity(commands.len());
        let store = &*self.store;
        store.write(&mut |tables| {
            // A retried transaction starts again from what was committed.
            done.clear();
            pending.queues.clone_from(&self.queues);
            pending.next_key = self.next_key;
            pending.epochs.clone_from(&self.epochs);
            let mut apply = Apply {
                store,
                tables,
                pending: &mut pending,
                publishers: HashMap::new(),
            };
            for command in commands {
                done.push(apply.command(command)?);
            }
            apply.write_publishers()
        })?;
        self.queues = pending.queues;
        self.next_key = pending.next_key;
        self.epochs = pending.epochs;
        Ok(done)
    }
}

/// One command's effect on the tables of a transaction.
struct Apply<'a> {
    store: &'a dyn Store,
    tables: &'a mut dyn Tables,
    pending: &'a mut Pending,
    /// The publisher ranges this transaction read, by table key prefix
    /// (durable and publisher): read once, written once at its end, however
    /// many of the publisher's events it takes.
    publishers: HashMap<Vec<u8>, PublisherRanges>,
}

/// One publisher's ranges for one durable subscription, as a transaction
/// changes them.
struct PublisherRanges {
    /// The epochs' starts as stored, to delete those merged away.
    stored: Vec<u64>,
    /// Each range: its start and the highest sequence number brought.
    ranges: Vec<(u64, u64)>,
    /// When the last event of the publisher's arrived (ms since the Unix
    /// epoch); `None` while unchanged.
    touched: Option<u64>,
}

impl Apply<'_> {
    fn command<T>(&mut self, command: &Command<T>) -> Result<Done, StoreError> {
        let mut done = Done::default();
        match command {
            Command::Take {
                items, stored_ms, ..
            } => {
                let mut changed = Vec::new();
                for item in items {
                    let epoch = match item.epoch {
                        Epoch::Given(epoch) => epoch,
                        connection => *self
                            .pending
                            .epochs
                            .entry(connection)
                            .or_insert(item.event.id.seq),
                    };
                    for target in &item.here {
                        let seq = self.number(target)?;
                        self.arrive(&target.durable, seq, &item.event, epoch, *stored_ms)?;
                        changed.push(target.durable.clone());
                    }
                    if item.onward.is_empty() {
                        continue;
                    }
                    let mut targets = Vec::with_capacity(item.onward.len());
                    for target in &item.onward {
                        targets.push(DurableTarget {
                            durable: target.durable.clone(),
                            seq: self.number(target)?,
                        });
                    }
                    let entry = OutboxEntry {
                        event: item.event.clone(),
                        epoch,
                        targets,
                    };
                    let key = self.pending.next_key;
                    self.pending.next_key += 1;
                    self.tables
                        .put(Table::Outbox, &key.to_be_bytes(), &encode(&entry))?;
                    done.outbox.push((key, entry));
                }
                changed.sort();
                changed.dedup();
                // Duplicates and early arrivals name queues that may not
                // exist yet.
                done.queues = changed
                    .into_iter()
                    .filter_map(|name| {
                        let stats = self.pending.queues.get(&name)?;
                        Some((name, *stats))
                    })
                    .collect();
            }
            Command::Forget { keys } => {
                for key in keys {
                    self.tables.delete(Table::Outbox, &key.to_be_bytes())?;
                }
            }
            Command::Consumed { durable, position } => {
                if let Some(mut stats) = self.pending.queues.get(durable).copied() {
                    let up_to = (*position).min(stats.next.saturating_sub(1));
                    while stats.first <= up_to {
                        let key = queue_key(durable, stats.first);
                        if let Some(queued) = self.queued(&key)? {
                            stats.bytes -= queued.event.payload.len() as u64;
                            self.tables.delete(Table::Queue, &key)?;
                        }
                        stats.first += 1;
                    }
                    stats.oldest_ms = match self.queued(&queue_key(durable, stats.first))? {
                        Some(queued) => queued.stored_ms,
                        None => 0,
                    };
                    self.pending.queues.insert(durable.clone(), stats);
                    done.queues.push((durable.clone(), stats));
                }
            }
            Command::ConnectionGone { session } => {
                self.pending.epochs.retain(|epoch, _| {
                    !matches!(epoch, Epoch::Connection { session: s, .. } if s == session)
                });
            }
            Command::ForgetPublishers { idle_before_ms } => {
                self.write_publishers()?;
                let mut idle = Vec::new();
                let location = self.store.location();
                self.tables
                    .scan(Table::Publishers, &[], &[], &mut |key, value| {
                        let touched = value
                            .get(8..)
                            .and_then(decode_u64)
                            .ok_or_else(|| corrupt(location, Table::Publishers, "bad record"))?;
                        if touched < *idle_before_ms {
                            idle.push(key.to_vec());
                        }
                        Ok(true)
                    })?;
                for key in idle {
                    self.tables.delete(Table::Publishers, &key)?;
                }
            }
            Command::PutDurables { records, .. } => {
                for record in records {
                    self.tables
                        .put(Table::Durables, record.name.as_bytes(), &encode(record))?;
                    if record.home == self.store.owner() {
                        self.pending
                            .queues
                            .entry(record.name.clone())
                            .or_insert(QueueStats {
                                first: 1,
                                next: 1,
                                ..Default::default()
                            });
                    }
                }
            }
        }
        Ok(done)
    }

    /// The event's number for `target`: given, or the next of this node's
    /// sequence for it when this node is the origin.
    fn number(&mut self, target: &Target) -> Result<u64, StoreError> {
        if let Some(seq) = target.seq {
            return Ok(seq);
        }
        let key = target.durable.as_bytes();
        let last = self.counter(Table::OriginSeqs, key)?.unwrap_or(0);
        self.tables
            .put(Table::OriginSeqs, key, &(last + 1).to_be_bytes())?;
        Ok(last + 1)
    }

    /// An event numbered `seq` by its origin reaches durable `name`'s home:
    /// queue it if it is next in its origin's order (with any that waited
    /// for it), keep it aside if it came early, drop it if already seen.
    fn arrive(
        &mut self,
        name: &str,
        seq: u64,
        event: &Event,
        epoch: u64,
        stored_ms: u64,
    ) -> Result<(), StoreError> {
        let mut origin_key = name_prefix(name);
        origin_key.extend_from_slice(event.origin.as_bytes());
        let expected = self.counter(Table::Expected, &origin_key)?.unwrap_or(1);
        let early_key = |seq: u64| {
            let mut key = origin_key.clone();
            key.extend_from_slice(&seq.to_be_bytes());
            key
        };
        if seq < expected {
            return Ok(());
        }
        if seq > expected {
            let early = (epoch, event);
            return self
                .tables
                .put(Table::Early, &early_key(seq), &encode(&early));
        }
        self.queue_once(name, epoch, event, stored_ms)?;
        let mut next = expected + 1;
        loop {
            let key = early_key(next);
            let (epoch, waiting): (u64, Event) = match self.tables.get(Table::Early, &key)? {
                Some(bytes) => {
                    postcard::from_bytes(bytes).map_err(|e| self.corrupt(Table::Early, e))?
                }
                None => break,
            };
            self.tables.delete(Table::Early, &key)?;
            self.queue_once(name, epoch, &waiting, stored_ms)?;
            next += 1;
        }
        self.tables
            .put(Table::Expected, &origin_key, &next.to_be_bytes())
    }

    /// Queues `event` for durable `name` unless its publisher's sequence
    /// number lies in a range already brought by one of its epochs: then a
    /// client sent it again through another node, and it is here already.
    ///
    /// Each epoch's range runs from the epoch to the highest number it has
    /// brought. Ranges that meet are merged: every number in the union was
    /// passed by one of the epochs, so the union is as sound as its parts.
    fn queue_once(
        &mut self,
        name: &str,
        epoch: u64,
        event: &Event,
        stored_ms: u64,
    ) -> Result<(), StoreError> {
        let seq = event.id.seq;
        let mut prefix = name_prefix(name);
        prefix.extend_from_slice(&event.id.publisher.to_be_bytes());
        let publisher = self.publisher_ranges(prefix)?;
        let ranges = &mut publisher.ranges;
        let seen = ranges
            .iter()
            .any(|&(start, high)| start <= seq && seq <= high);
        let (mut start, mut high) = (epoch.min(seq), seq);
        let mut grown = true;
        while grown {
            grown = false;
            ranges.retain(|&(other_start, other_high)| {
                let meets =
                    other_start <= high.saturating_add(1) && start <= other_high.saturating_add(1);
                if meets {
                    (start, high) = (start.min(other_start), high.max(other_high));
                    grown = true;
                }
                !meets
            });
        }
        ranges.push((start, high));
        publisher.touched = Some(stored_ms);
        if !seen {
            self.append(name, event, stored_ms)?;
        }
        Ok(())
    }

    /// The ranges under `prefix`, read from the table on first use in this
    /// transaction.
    fn publisher_ranges(&mut self, prefix: Vec<u8>) -> Result<&mut PublisherRanges, StoreError> {
        use std::collections::hash_map::Entry;
        let entry = match self.publishers.entry(prefix) {
            Entry::Occupied(entry) => return Ok(entry.into_mut()),
            Entry::Vacant(entry) => entry,
        };
        let prefix = entry.key();
        let mut ranges = Vec::new();
        let location = self.store.location();
        self.tables
            .scan(Table::Publishers, prefix, prefix, &mut |key, value| {
                let start = decode_u64(&key[prefix.len()..]);
                let high = value.get(..8).and_then(decode_u64);
                match start.zip(high) {
                    Some(range) => ranges.push(range),
                    None => {
                        return Err(corrupt(location, Table::Publishers, "bad record"));
                    }
                }
                Ok(true)
            })?;
        Ok(entry.insert(PublisherRanges {
            stored: ranges.iter().map(|(start, _)| *start).collect(),
            ranges,
            touched: None,
        }))
    }

    /// Writes the publisher ranges this transaction changed, and forgets
    /// them (the table holds them now).
    fn write_publishers(&mut self) -> Result<(), StoreError> {
        for (prefix, publisher) in self.publishers.drain() {
            let Some(touched) = publisher.touched else {
                continue;
            };
            let key = |start: u64| {
                let mut key = prefix.clone();
                key.extend_from_slice(&start.to_be_bytes());
                key
            };
            for start in publisher.stored {
                if !publisher.ranges.iter().any(|(s, _)| *s == start) {
                    self.tables.delete(Table::Publishers, &key(start))?;
                }
            }
            for (start, high) in publisher.ranges {
                let mut value = high.to_be_bytes().to_vec();
                value.extend_from_slice(&touched.to_be_bytes());
                self.tables.put(Table::Publishers, &key(start), &value)?;
            }
        }
        Ok(())
    }

    fn append(&mut self, name: &str, event: &Event, stored_ms: u64) -> Result<(), StoreError> {
        let stats = self
            .pending
            .queues
            .entry(name.to_string())
            .or_insert(QueueStats {
                first: 1,
                next: 1,
                ..Default::default()
            });
        let queued = QueuedEvent {
            stored_ms,
            event: event.clone(),
        };
        self.tables
            .put(Table::Queue, &queue_key(name, stats.next), &encode(&queued))?;
        if stats.is_empty() {
            stats.oldest_ms = stored_ms;
        }
        stats.next += 1;
        stats.bytes += event.payload.len() as u64;
        let next = stats.next;
        self.tables
            .put(Table::Positions, name.as_bytes(), &next.to_be_bytes())
    }

    fn counter(&self, table: Table, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.tables.get(table, key)? {
            Some(bytes) => decode_u64(bytes)
                .map(Some)
                .ok_or_else(|| corrupt(self.store.location(), table, "a counter is not 8 bytes")),
            None => Ok(None),
        }
    }

    fn queued(&self, key: &[u8]) -> Result<Option<QueuedEvent>, StoreError> {
        match self.tables.get(Table::Queue, key)? {
            Some(bytes) => postcard::from_bytes(bytes)
                .map(Some)
                .map_err(|e| self.corrupt(Table::Queue, e)),
            None => Ok(None),
        }
    }

    fn corrupt(&self, table: Table, e: postcard::Error) -> StoreError {
        corrupt(self.store.location(), table, &e.to_string())
    }
}

fn zip_outcomes<T>(
    batch: Vec<Command<T>>,
    results: impl Iterator<Item = Result<Done, StoreError>>,
) -> Vec<Outcome<T>> {
    batch
        .into_iter()
        .zip(results)
        .map(|(command, result)| Outcome {
            then: match command {
                Command::Take { then, .. } | Command::PutDurables { then, .. } => Some(then),
                Command::Forget { .. }
                | Command::Consumed { .. }
                | Command::ForgetPublishers { .. }
                | Command::ConnectionGone { .. } => None,
            },
            result,
        })
        .collect()
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding to a Vec cannot fail")
}
