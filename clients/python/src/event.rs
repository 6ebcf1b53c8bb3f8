//! An event as Python sees it: its fields are converted when read.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use treescale::DurableAcker;

use crate::errors::invalid;

/// One event received by a subscription, or the answer to a request.
#[pyclass(frozen, module = "treescale")]
pub struct Event {
    pub(crate) event: treescale::Event,
    /// For an event of a durable subscription: its position, and how to
    /// acknowledge it.
    durable: Option<(u64, DurableAcker)>,
}

impl Event {
    pub fn plain(event: treescale::Event) -> Self {
        Event {
            event,
            durable: None,
        }
    }

    pub fn durable(event: treescale::Event, position: u64, acker: DurableAcker) -> Self {
        Event {
            event,
            durable: Some((position, acker)),
        }
    }
}

#[pymethods]
impl Event {
    #[getter]
    fn topic(&self) -> &str {
        self.event.topic.as_str()
    }

    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.event.payload)
    }

    /// The headers, as a dict (a key given twice keeps its last value).
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let headers = PyDict::new(py);
        for (key, value) in &self.event.headers {
            headers.set_item(key, value)?;
        }
        Ok(headers)
    }

    /// The event's id, `publisher-sequence`: the same however often it was
    /// sent.
    #[getter]
    fn id(&self) -> String {
        self.event.id.to_string()
    }

    /// The id of the node where the event entered the overlay.
    #[getter]
    fn origin(&self) -> String {
        self.event.origin.to_string()
    }

    /// Its position in a durable subscription's queue; None otherwise.
    #[getter]
    fn position(&self) -> Option<u64> {
        self.durable.as_ref().map(|(position, _)| *position)
    }

    /// Whether it is a request, which `Client.respond` can answer.
    #[getter]
    fn is_request(&self) -> bool {
        self.event.reply.is_some()
    }

    /// Acknowledges this event of a durable subscription, and every one
    /// before it: the node may delete them.
    fn ack(&self) -> PyResult<()> {
        let Some((position, acker)) = &self.durable else {
            return Err(invalid(
                "only events of a durable subscription are acknowledged",
            ));
        };
        acker.ack(*position);
        Ok(())
    }

    fn __repr__(&self) -> String {
        let payload = &self.event.payload;
        let shown = String::from_utf8_lossy(&payload[..payload.len().min(40)]);
        let more = if payload.len() > 40 { "..." } else { "" };
        match self.position() {
            Some(position) => format!(
                "<Event {} position={position} payload={shown:?}{more}>",
                self.event.topic
            ),
            None => format!("<Event {} payload={shown:?}{more}>", self.event.topic),
        }
    }
}
