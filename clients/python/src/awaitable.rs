//! Rust futures as Python awaitables, without a trip through the event
//! loop when they need not wait.

use std::future::Future;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

/// Runs `future` as far as it goes without waiting. Most calls on a busy
/// client end there (a publish with room in the buffer, an event already
/// received), and their result comes back as an awaitable already done:
/// handing a future to asyncio costs a task, a thread hop and a wake-up of
/// the loop, many times the call itself. Otherwise asyncio awaits the rest,
/// run on the tokio runtime; cancelling it drops the Rust future.
pub fn awaitable<'py, F, T>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let mut future = Box::pin(future);
    let polled = {
        // Timers and spawned tasks need the runtime at hand.
        let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    };
    match polled {
        Poll::Ready(result) => {
            let result = result.and_then(|value| value.into_py_any(py));
            Ok(Bound::new(
                py,
                Done {
                    result: Mutex::new(Some(result)),
                },
            )?
            .into_any())
        }
        // Polled again with asyncio's waker, it registers that one instead.
        Poll::Pending => pyo3_async_runtimes::tokio::future_into_py(py, future),
    }
}

/// An awaitable whose result (or exception) is already known.
#[pyclass(frozen, module = "treescale._native")]
pub struct Done {
    result: Mutex<Option<PyResult<Py<PyAny>>>>,
}

#[pymethods]
impl Done {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Ends the `await` at once: StopIteration carries the result.
    fn __next__(&self) -> PyResult<Py<PyAny>> {
        let taken = self.result.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            Some(Ok(value)) => Err(PyStopIteration::new_err((value,))),
            Some(Err(error)) => Err(error),
            None => Err(PyRuntimeError::new_err(
                "this awaitable was already awaited; call the method again",
            )),
        }
    }
}
