//! Reads of durable queues, off the driver's task. LMDB reads are
//! memory-mapped and usually take microseconds, but a page not in memory is
//! a disk read, and the driver must never wait on a disk: reads run on a
//! thread of their own and their results come back on a channel, like the
//! writer's outcomes.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Store, StoreError};
use crate::wire::Event;

/// Events of a queue by position, or why they could not be read.
pub type QueueEvents = Result<Vec<(u64, Event)>, StoreError>;

/// A read to make: `limit` events of `durable`'s queue from position
/// `from`. `tag` comes back with the result.
struct Request<T> {
    durable: String,
    from: u64,
    limit: usize,
    tag: T,
}

/// The handle the node keeps: ask for reads here.
pub struct Reader<T> {
    mode: Mode<T>,
}

enum Mode<T> {
    Thread(mpsc::UnboundedSender<Request<T>>),
    /// Each read runs inside `read`; see `StoreConfig::inline_io`,
    /// which chooses this too, so simulations stay on one thread.
    Inline {
        store: Arc<dyn Store>,
        results: mpsc::UnboundedSender<(T, QueueEvents)>,
    },
}

impl<T: Send + 'static> Reader<T> {
    /// Starts the reader, on its own thread unless `inline`; results go to
    /// `results` in the order asked.
    pub fn start(
        store: Arc<dyn Store>,
        results: mpsc::UnboundedSender<(T, QueueEvents)>,
        inline: bool,
    ) -> Reader<T> {
        if inline {
            return Reader {
                mode: Mode::Inline { store, results },
            };
        }
        let (requests, mut rx) = mpsc::unbounded_channel::<Request<T>>();
        std::thread::Builder::new()
            .name("store-reader".into())
            .spawn(move || {
                // Ends when the handle is dropped.
                while let Some(request) = rx.blocking_recv() {
                    let events = store.read_queue(&request.durable, request.from, request.limit);
                    if results.send((request.tag, events)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Reader {
            mode: Mode::Thread(requests),
        }
    }

    /// Reads up to `limit` events of `durable`'s queue from position
    /// `from`; the result comes with `tag`.
    pub fn read(&self, durable: &str, from: u64, limit: usize, tag: T) {
        match &self.mode {
            Mode::Thread(requests) => {
                let request = Request {
                    durable: durable.to_string(),
                    from,
                    limit,
                    tag,
                };
                let _ = requests.send(request);
            }
            Mode::Inline { store, results } => {
                let _ = results.send((tag, store.read_queue(durable, from, limit)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::NodeId;

    #[tokio::test]
    async fn a_read_comes_back_with_its_tag_on_either_mode() {
        for inline in [false, true] {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new(NodeId::from_bytes([1; 32])));
            let (tx, mut rx) = mpsc::unbounded_channel();
            let reader = Reader::start(store, tx, inline);
            reader.read("absent", 1, 10, 7u32);
            let (tag, events) = rx.recv().await.unwrap();
            assert_eq!(tag, 7);
            assert!(events.unwrap().is_empty(), "an unknown queue holds nothing");
        }
    }
}
