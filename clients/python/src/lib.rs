//! `treescale._native`: the Rust client of TreeScale, bound for Python.
//!
//! This layer is plumbing; the documented, typed API is the Python package
//! around it (`python/treescale`). Every call that waits returns an
//! awaitable (see [`awaitable`]), and no call holds the interpreter while
//! it waits: the waiting happens on a tokio runtime of the module's own.

mod awaitable;
mod client;
mod errors;
mod event;
mod feed;

use pyo3::prelude::*;

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(client::connect, module)?)?;
    module.add_class::<client::NativeClient>()?;
    module.add_class::<client::ConnectionEvents>()?;
    module.add_class::<feed::NativeSubscription>()?;
    module.add_class::<event::Event>()?;
    module.add_class::<awaitable::Done>()?;
    module.add_function(wrap_pyfunction!(awaitable::close_for_exit, module)?)?;
    errors::register(module)?;
    Ok(())
}
