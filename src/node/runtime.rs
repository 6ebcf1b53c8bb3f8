//! The async runtime a node (or a client command) runs on.

use std::num::NonZeroUsize;

/// A runtime of `threads` worker threads, by default one fewer than the
/// machine's cores and at least 1. A hand-off between a node's tasks that
/// lands on a second thread wakes it; on a machine whose cores its
/// neighbours keep busy, that wake waits its turn. On 2 cores, two threads
/// against one cost ~40% more round-trip latency and gained no throughput
/// (docs/performance.md).
pub fn runtime(threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let default = cores.saturating_sub(1).max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.map_or(default, NonZeroUsize::get))
        .enable_all()
        .build()
}
