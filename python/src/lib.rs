//! `rankmesh._rankmesh`: the client's connection to the scheduler, the executor's link
//! to its worker, its counted views of mapped inputs, its heap and the results it keeps,
//! and the private-file rules. The public API is the pure-Python `rankmesh` package around it.

mod client;
mod convert;
mod executor_link;
mod files;
mod heap;
mod held;
mod mapped_view;
mod reports;

use pyo3::prelude::*;

pyo3::create_exception!(_rankmesh, RankmeshError, pyo3::exceptions::PyException);
pyo3::create_exception!(_rankmesh, HandshakeRefused, RankmeshError);
pyo3::create_exception!(_rankmesh, ConnectionLost, RankmeshError);

#[pymodule]
fn _rankmesh(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // What a peer's hello must carry (tests speak the handshake by hand).
    m.add("PROTOCOL_VERSION", rankmesh::protocol::PROTOCOL_VERSION)?;
    m.add("RankmeshError", py.get_type::<RankmeshError>())?;
    m.add("HandshakeRefused", py.get_type::<HandshakeRefused>())?;
    m.add("ConnectionLost", py.get_type::<ConnectionLost>())?;
    m.add_class::<client::ClientCore>()?;
    m.add_class::<executor_link::ExecutorLink>()?;
    m.add_class::<mapped_view::MappedView>()?;
    m.add_function(wrap_pyfunction!(files::runtime_base, m)?)?;
    m.add_function(wrap_pyfunction!(files::read_scheduler_file, m)?)?;
    m.add_function(wrap_pyfunction!(files::write_private, m)?)?;
    m.add_function(wrap_pyfunction!(heap::keep_freed_heap, m)?)?;
    m.add_function(wrap_pyfunction!(heap::heap_free_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(heap::trim_heap, m)?)?;
    m.add_function(wrap_pyfunction!(held::frame_spans, m)?)?;
    m.add_function(wrap_pyfunction!(held::read_lent_frames, m)?)?;
    Ok(())
}
