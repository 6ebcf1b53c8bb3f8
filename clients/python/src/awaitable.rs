//! Rust futures as Python awaitables: at once when they need not wait,
//! else as asyncio futures resolved from the tokio runtime.
//!
//! The bridge is this module's own rather than pyo3-async-runtimes': that
//! crate's runtime threads enter Python to resolve a future whenever it
//! completes, also while the interpreter is finalizing, which kills the
//! process at exit ("PyGILState_Release: thread state must be current";
//! PyO3/pyo3-async-runtimes#40, seen here with events still in flight).
//! Here an atexit hook closes a gate that every entry passes, before
//! Python begins to finalize.

use std::future::Future;
use std::sync::{Mutex, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};

use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::IntoPyObjectExt;
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

/// The runtime every client of the process runs on.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("treescale")
            .enable_all()
            .build()
            .expect("a tokio runtime starts")
    })
}

/// Closed (true) once Python is exiting: from then on no runtime thread
/// enters Python. Entries hold it shared while inside.
static EXITING: RwLock<bool> = RwLock::new(false);

/// Runs `f` inside Python, unless Python is exiting.
fn with_python(f: impl FnOnce(Python<'_>)) {
    let exiting = EXITING.read().unwrap_or_else(|e| e.into_inner());
    if !*exiting {
        Python::attach(f);
    }
}

/// Called by atexit (registered by the package): waits for the entries
/// under way, without holding the interpreter they need, and closes the
/// gate. What completes later is dropped unseen.
#[pyfunction]
pub fn close_for_exit(py: Python<'_>) {
    py.detach(|| *EXITING.write().unwrap_or_else(|e| e.into_inner()) = true);
}

/// Runs `future` as far as it goes without waiting. Most calls on a busy
/// client end there (a publish with room in the buffer, an event already
/// received), and their result comes back as an awaitable already done:
/// an asyncio future costs a task, two thread hops and a wake-up of the
/// loop, many times the call itself. Otherwise the rest runs on the
/// runtime and resolves an asyncio future; cancelling that future drops
/// the Rust one.
pub fn awaitable<'py, F, T>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let mut future = Box::pin(future);
    let polled = {
        // Timers and spawned tasks need the runtime at hand.
        let _runtime = runtime().enter();
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    };
    match polled {
        Poll::Ready(result) => Ok(Bound::new(
            py,
            Done {
                result: Mutex::new(Some(result.and_then(|value| value.into_py_any(py)))),
            },
        )?
        .into_any()),
        // Polled again by the runtime, it registers the runtime's waker.
        Poll::Pending => in_asyncio(py, future),
    }
}

/// An asyncio future of the running loop, resolved when `future` is.
fn in_asyncio<'py, F, T>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let get_running_loop = GET_RUNNING_LOOP.get_or_try_init(py, || {
        py.import("asyncio")?
            .getattr("get_running_loop")
            .map(Bound::unbind)
    })?;
    let event_loop = get_running_loop.call0(py)?;
    let py_future = event_loop.call_method0(py, "create_future")?;
    let resolve = Resolve {
        future: py_future.clone_ref(py),
    };
    let task = runtime().spawn(async move {
        let result = future.await;
        // Entering Python may wait for the interpreter: not on a thread
        // that drives connections.
        tokio::task::spawn_blocking(move || {
            with_python(|py| {
                let resolve = resolve.with(result.and_then(|value| value.into_py_any(py)));
                // A loop closed meanwhile has no one left to tell.
                let _ = event_loop.call_method1(py, "call_soon_threadsafe", (resolve,));
            })
        });
    });
    py_future.call_method1(
        py,
        "add_done_callback",
        (AbortOnDone {
            task: task.abort_handle(),
        },),
    )?;
    Ok(py_future.into_bound(py))
}

/// Sets an asyncio future's outcome, run by its loop.
struct Resolve {
    future: Py<PyAny>,
}

impl Resolve {
    fn with(self, result: PyResult<Py<PyAny>>) -> Resolved {
        Resolved {
            future: self.future,
            result: Mutex::new(Some(result)),
        }
    }
}

#[pyclass(frozen, module = "treescale._native")]
struct Resolved {
    future: Py<PyAny>,
    result: Mutex<Option<PyResult<Py<PyAny>>>>,
}

#[pymethods]
impl Resolved {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let future = self.future.bind(py);
        // Cancelled meanwhile: its awaiter has gone.
        if future.call_method0("done")?.is_truthy()? {
            return Ok(());
        }
        match self.result.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(Ok(value)) => future.call_method1("set_result", (value,))?,
            Some(Err(error)) => future.call_method1("set_exception", (error.into_value(py),))?,
            None => return Ok(()),
        };
        Ok(())
    }
}

/// Drops the Rust future of an asyncio future that is done: a cancelled
/// one stops what it waited for; a resolved one has already finished.
#[pyclass(frozen, module = "treescale._native")]
struct AbortOnDone {
    task: AbortHandle,
}

#[pymethods]
impl AbortOnDone {
    fn __call__(&self, _future: &Bound<'_, PyAny>) {
        self.task.abort();
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
