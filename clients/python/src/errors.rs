//! TreeScale's exceptions, and which [`ClientError`] raises which.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use treescale::wire::{PublishRefusal, RequestError};
use treescale::ClientError;

create_exception!(
    treescale,
    Error,
    PyException,
    "Every error TreeScale raises."
);
create_exception!(
    treescale,
    ConnectError,
    Error,
    "No node could be found, reached or trusted."
);
create_exception!(
    treescale,
    Disconnected,
    Error,
    "Not connected now; the client is reconnecting. Requests fail with it meanwhile, and publishing fails with it once the reconnect buffer is full."
);
create_exception!(
    treescale,
    ClosedError,
    Error,
    "The client is closed for good: closed by the program, refused by its node, or it gave up reconnecting."
);
create_exception!(
    treescale,
    SlowConsumer,
    ClosedError,
    "The node disconnected this client because it did not read its events fast enough."
);
create_exception!(
    treescale,
    Refused,
    Error,
    "The node refused the operation (a durable subscription in use elsewhere, a full store, ...)."
);
create_exception!(
    treescale,
    PermissionDenied,
    Refused,
    "The cluster's permissions.toml does not let this client's user do it."
);
create_exception!(
    treescale,
    NoResponders,
    Error,
    "A request's topic has no subscriber anywhere in the overlay."
);
create_exception!(
    treescale,
    Timeout,
    Error,
    "No answer to a request within its timeout."
);
create_exception!(
    treescale,
    Unconfirmed,
    Error,
    "The connection closed before the node confirmed an at-least-once event: it may or may not be stored."
);
create_exception!(
    treescale,
    InvalidArgument,
    Error,
    "A bad topic, pattern, payload or option."
);

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("Error", py.get_type::<Error>())?;
    module.add("ConnectError", py.get_type::<ConnectError>())?;
    module.add("Disconnected", py.get_type::<Disconnected>())?;
    module.add("ClosedError", py.get_type::<ClosedError>())?;
    module.add("SlowConsumer", py.get_type::<SlowConsumer>())?;
    module.add("Refused", py.get_type::<Refused>())?;
    module.add("PermissionDenied", py.get_type::<PermissionDenied>())?;
    module.add("NoResponders", py.get_type::<NoResponders>())?;
    module.add("Timeout", py.get_type::<Timeout>())?;
    module.add("Unconfirmed", py.get_type::<Unconfirmed>())?;
    module.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    Ok(())
}

/// The exception for `error`, with the Rust client's message.
pub fn raise(error: ClientError) -> PyErr {
    let message = error.to_string();
    match error {
        ClientError::NoNodeFound { .. }
        | ClientError::Unreachable { .. }
        | ClientError::NoneReachable { .. }
        | ClientError::Connect { .. }
        | ClientError::Discovery(_)
        | ClientError::Trust(_) => ConnectError::new_err(message),
        ClientError::Disconnected { .. } | ClientError::BufferFull { .. } => {
            Disconnected::new_err(message)
        }
        ClientError::SlowConsumer { .. } => SlowConsumer::new_err(message),
        ClientError::GaveUp { .. }
        | ClientError::Closed(_)
        | ClientError::NotAnswering { .. }
        | ClientError::ConnectionLost { .. }
        | ClientError::UnexpectedReply(_) => ClosedError::new_err(message),
        ClientError::PermissionDenied(_)
        | ClientError::Refused {
            error: RequestError::PermissionDenied,
            ..
        }
        | ClientError::PublishRefused {
            reason: PublishRefusal::PermissionDenied,
            ..
        } => PermissionDenied::new_err(message),
        ClientError::Refused {
            error:
                RequestError::InvalidPattern
                | RequestError::InvalidTopic
                | RequestError::InvalidGroup
                | RequestError::InvalidDurableName,
            ..
        } => InvalidArgument::new_err(message),
        ClientError::Refused { .. } | ClientError::PublishRefused { .. } => {
            Refused::new_err(message)
        }
        ClientError::NoResponders { .. } => NoResponders::new_err(message),
        ClientError::Timeout { .. } | ClientError::NoAnswer { .. } => Timeout::new_err(message),
        ClientError::Unconfirmed(_) => Unconfirmed::new_err(message),
        ClientError::Topic(_) | ClientError::PayloadTooLarge(_) | ClientError::NotARequest(_) => {
            InvalidArgument::new_err(message)
        }
    }
}

/// The exception for `error` while connecting: a node that refuses or
/// drops the new connection is one the client could not connect to.
pub fn raise_on_connect(error: ClientError) -> PyErr {
    match error {
        ClientError::Closed(_)
        | ClientError::ConnectionLost { .. }
        | ClientError::NotAnswering { .. }
        | ClientError::UnexpectedReply(_) => ConnectError::new_err(error.to_string()),
        other => raise(other),
    }
}

/// A bad argument given from Python.
pub fn invalid(message: impl Into<String>) -> PyErr {
    InvalidArgument::new_err(message.into())
}
