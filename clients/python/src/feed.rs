//! Subscriptions as Python sees them: events arrive in batches into a
//! queue the Python side takes from without waiting (`try_next`), and it
//! awaits `wait` only when that queue is empty.
//!
//! Waiting and taking are apart so that cancelling a wait never loses an
//! event: a batch received is in the queue before the wait ends, whether
//! or not anyone still awaits it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tokio::sync::Notify;
use treescale::{DurableSubscription, Subscription};

use crate::awaitable::awaitable;
use crate::event::Event;

/// Where a feed's events come from.
pub trait Source: Send + 'static {
    /// The next events that arrived together; `None` once there will be
    /// no more.
    fn next_batch(&mut self) -> impl Future<Output = Option<Vec<Event>>> + Send;
}

impl Source for Subscription {
    async fn next_batch(&mut self) -> Option<Vec<Event>> {
        let batch = Subscription::next_batch(self).await?;
        Some(batch.into_iter().map(Event::plain).collect())
    }
}

impl Source for DurableSubscription {
    async fn next_batch(&mut self) -> Option<Vec<Event>> {
        let acker = self.acker();
        let wrap = |e: treescale::DurableEvent| Event::durable(e.event, e.position, acker.clone());
        let mut batch = vec![wrap(self.next().await?)];
        while let Some(event) = self.try_next() {
            batch.push(wrap(event));
        }
        Some(batch)
    }
}

/// A subscription and the events received from it, not yet taken.
struct Feed<S> {
    source: tokio::sync::Mutex<Option<S>>,
    ready: Mutex<VecDeque<Event>>,
    stop: Notify,
}

impl<S: Source> Feed<S> {
    fn new(source: S) -> Arc<Self> {
        Arc::new(Feed {
            source: tokio::sync::Mutex::new(Some(source)),
            ready: Mutex::new(VecDeque::new()),
            stop: Notify::new(),
        })
    }
}

impl<S> Feed<S> {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A feed of any source, so one Python class serves every kind of
/// subscription.
trait AnyFeed: Send + Sync {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>>;
    fn wait<'py>(self: Arc<Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>>;
    fn unsubscribe(self: Arc<Self>);
}

impl<S: Source> AnyFeed for Feed<S> {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        Feed::ready(self)
    }

    /// Waits until events are ready to take; false once none will come.
    fn wait<'py>(self: Arc<Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, async move {
            if !self.ready().is_empty() {
                return Ok(true);
            }
            let mut source = self.source.lock().await;
            let Some(source) = source.as_mut() else {
                return Ok(false);
            };
            tokio::select! {
                batch = source.next_batch() => match batch {
                    Some(batch) => {
                        self.ready().extend(batch);
                        Ok(true)
                    }
                    None => Ok(false),
                },
                _ = self.stop.notified() => Ok(false),
            }
        })
    }

    /// Ends the subscription (a durable one is only detached): a pending
    /// wait returns false, and the events not yet taken are dropped.
    fn unsubscribe(self: Arc<Self>) {
        self.stop.notify_one();
        self.ready().clear();
        crate::awaitable::runtime().spawn(async move {
            self.source.lock().await.take();
        });
    }
}

/// A subscription of any kind: plain, queue group or durable (whose events
/// carry their position and `ack`).
#[pyclass(frozen, module = "treescale._native")]
pub struct NativeSubscription {
    feed: Arc<dyn AnyFeed>,
    /// For a durable subscription: the events the node held when it
    /// attached.
    backlog: Option<u64>,
}

impl NativeSubscription {
    pub fn plain(subscription: Subscription) -> Self {
        NativeSubscription {
            feed: Feed::new(subscription),
            backlog: None,
        }
    }

    pub fn durable(subscription: DurableSubscription) -> Self {
        NativeSubscription {
            backlog: Some(subscription.backlog()),
            feed: Feed::new(subscription),
        }
    }
}

#[pymethods]
impl NativeSubscription {
    #[getter]
    fn backlog(&self) -> Option<u64> {
        self.backlog
    }

    /// The next event received, if one is waiting.
    fn try_next(&self) -> Option<Event> {
        self.feed.ready().pop_front()
    }

    /// Every event received and not yet taken.
    fn take_ready(&self) -> Vec<Event> {
        self.feed.ready().drain(..).collect()
    }

    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.feed.clone().wait(py)
    }

    fn unsubscribe(&self) {
        self.feed.clone().unsubscribe();
    }
}
