//! Rust messages to Python tuples and back, and transport errors to Python exceptions.

use crate::{ConnectionLost, HandshakeRefused, RankmeshError};
use bytes::Bytes;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyTuple};
use rankmesh::protocol::{ErrorInfo, HandshakeError, ObjectRef};
use rankmesh::transport::TransportError;

pub fn bytes_of(data: &PyBackedBytes) -> Bytes {
    Bytes::copy_from_slice(data)
}

pub fn object_to_py<'py>(py: Python<'py>, object: &ObjectRef) -> PyResult<Bound<'py, PyTuple>> {
    match object {
        ObjectRef::Inline { data, layout } => {
            ("inline", PyBytes::new(py, data), layout.clone()).into_pyobject(py)
        }
        ObjectRef::Shm { path, layout } => ("shm", path.as_str(), layout.clone()).into_pyobject(py),
        ObjectRef::Held { key, layout, .. } => ("held", *key, layout.clone()).into_pyobject(py),
    }
}

pub fn object_from_py(
    kind: &str,
    data: &Bound<'_, PyAny>,
    layout: Vec<u64>,
) -> PyResult<ObjectRef> {
    match kind {
        "inline" => Ok(ObjectRef::Inline {
            data: bytes_of(&data.extract()?),
            layout,
        }),
        "shm" => Ok(ObjectRef::Shm {
            path: data.extract()?,
            layout,
        }),
        // (key, spans): a result the executor keeps.
        "held" => {
            let (key, spans): (u64, Vec<(u64, u64)>) = data.extract()?;
            Ok(ObjectRef::Held { key, layout, spans })
        }
        other => Err(RankmeshError::new_err(format!(
            "unknown object kind {other:?}"
        ))),
    }
}

pub fn error_to_py<'py>(py: Python<'py>, error: &ErrorInfo) -> PyResult<Bound<'py, PyTuple>> {
    (
        error.type_name.as_str(),
        error.message.as_str(),
        error.traceback.as_str(),
        PyBytes::new(py, &error.pickled),
    )
        .into_pyobject(py)
}

pub fn error_from_py(tuple: &Bound<'_, PyAny>) -> PyResult<ErrorInfo> {
    let (type_name, message, traceback, pickled): (String, String, String, PyBackedBytes) =
        tuple.extract()?;
    Ok(ErrorInfo {
        type_name,
        message,
        traceback,
        pickled: bytes_of(&pickled),
    })
}

pub fn transport_error(e: TransportError) -> PyErr {
    match e {
        TransportError::Connect { address, source } => {
            PyOSError::new_err(format!("cannot reach {address}: {source}"))
        }
        TransportError::Handshake {
            address,
            source: HandshakeError::Refused(reason),
        } => HandshakeRefused::new_err(format!("{address} refused the connection: {reason}")),
        other => ConnectionLost::new_err(other.to_string()),
    }
}
