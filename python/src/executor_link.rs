//! The executor's side of its Unix socket to the worker.

use crate::convert::{error_from_py, object_from_py, object_to_py};
use crate::{ConnectionLost, RankmeshError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use rankmesh::protocol::{
    self, BorrowFailure, FrameReader, FrameWriter, FromExecutor, LoanToCopy, Role, TaskId,
    TaskOutcome, ToExecutor, Token,
};
use std::sync::Mutex;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// What the worker reads at the address the executor reports as ready, to learn whether it
/// may copy results out of this process (`ObjectRef::Held`).
static PROBE: [u8; 16] = protocol::EXECUTOR_PROBE;

#[pyclass(module = "rankmesh._rankmesh")]
pub struct ExecutorLink {
    runtime: tokio::runtime::Runtime,
    reader: Mutex<FrameReader<OwnedReadHalf>>,
    writer: Mutex<FrameWriter<OwnedWriteHalf>>,
}

#[pymethods]
impl ExecutorLink {
    #[new]
    fn new(py: Python<'_>, path: &str, token: &str) -> PyResult<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .on_thread_start(rankmesh::process::leave_signals_to_the_main_thread)
            .enable_all()
            .build()?;
        let token = Token::new(token);
        let (reader, writer) = py.detach(|| {
            runtime.block_on(async {
                let stream = UnixStream::connect(path).await?;
                let (r, w) = stream.into_split();
                let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
                reader.keep_buffers(protocol::EXECUTOR_LINK_BUFFER);
                writer.keep_buffers(protocol::EXECUTOR_LINK_BUFFER);
                protocol::connect(&mut reader, &mut writer, &token, Role::Executor)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                writer
                    .send(&FromExecutor::Ready {
                        pid: std::process::id(),
                        probe: PROBE.as_ptr() as u64,
                    })
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                Ok::<_, std::io::Error>((reader, writer))
            })
        })?;
        Ok(ExecutorLink {
            runtime,
            reader: Mutex::new(reader),
            writer: Mutex::new(writer),
        })
    }

    /// The next message from the worker; `("shutdown",)` also when the worker is gone.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let msg = py.detach(|| {
            let mut reader = self
                .reader
                .lock()
                .map_err(|_| RankmeshError::new_err("link poisoned"))?;
            self.runtime
                .block_on(reader.recv::<ToExecutor>())
                .map_err(|e| ConnectionLost::new_err(e.to_string()))
        })?;
        let item: Bound<'py, PyTuple> = match msg {
            None | Some(ToExecutor::Shutdown) => PyTuple::new(py, ["shutdown"])?,
            Some(ToExecutor::ObjectsReleased { held }) => {
                ("objects_released", held).into_pyobject(py)?
            }
            Some(ToExecutor::HoldResults(hold)) => ("hold_results", hold).into_pyobject(py)?,
            Some(ToExecutor::DropReserves) => PyTuple::new(py, ["drop_reserves"])?,
            Some(ToExecutor::Borrow(LoanToCopy {
                request,
                loan,
                layout,
            })) => {
                ("borrow", request, loan.pid, loan.probe, loan.spans, layout).into_pyobject(py)?
            }
            Some(ToExecutor::Functions(blobs)) => {
                let blobs = blobs
                    .iter()
                    .map(|b| (b.id.0, PyBytes::new(py, &b.bytes)))
                    .collect::<Vec<_>>();
                ("functions", blobs).into_pyobject(py)?
            }
            Some(ToExecutor::Plugins { setup, teardown }) => {
                let setup = setup
                    .iter()
                    .map(|p| (p.name.clone(), PyBytes::new(py, &p.pickled)))
                    .collect::<Vec<_>>();
                ("plugins", setup, teardown).into_pyobject(py)?
            }
            Some(ToExecutor::ReleaseFunctions(ids)) => {
                let ids = ids.iter().map(|id| id.0).collect::<Vec<_>>();
                ("release_functions", ids).into_pyobject(py)?
            }
            Some(ToExecutor::Run(tasks)) => {
                let tasks = tasks
                    .iter()
                    .map(|t| {
                        let inputs = t
                            .inputs
                            .iter()
                            .map(|o| object_to_py(py, o))
                            .collect::<PyResult<Vec<_>>>()?;
                        Ok((t.id.0, PyBytes::new(py, &t.payload), inputs))
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                ("run", tasks).into_pyobject(py)?
            }
        };
        PyList::new(py, [item])
    }

    /// A lent result copied and kept (`ok`: `("held", (key, spans), layout)`), or why not
    /// (`ok` false: `(message, refused)`).
    fn send_borrowed(
        &self,
        py: Python<'_>,
        request: u64,
        ok: bool,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let outcome = match ok {
            true => {
                let (kind, data, layout): (String, Bound<'_, PyAny>, Vec<u64>) = value.extract()?;
                Ok(object_from_py(&kind, &data, layout)?)
            }
            false => {
                let (message, refused): (String, bool) = value.extract()?;
                Err(BorrowFailure { message, refused })
            }
        };
        self.send(py, FromExecutor::Borrowed { request, outcome })
    }

    /// Results: `(task_id, duration_us, "ok", (kind, data, layout))` or
    /// `(task_id, duration_us, "err", (type_name, message, traceback, pickled))`.
    fn send_results(&self, py: Python<'_>, results: &Bound<'_, PyList>) -> PyResult<()> {
        let mut outcomes = Vec::with_capacity(results.len());
        for item in results.iter() {
            let (id, duration_us, kind, value): (u64, u64, String, Bound<'_, PyAny>) =
                item.extract()?;
            let result = match kind.as_str() {
                "ok" => {
                    let (object_kind, data, layout): (String, Bound<'_, PyAny>, Vec<u64>) =
                        value.extract()?;
                    Ok(object_from_py(&object_kind, &data, layout)?)
                }
                "err" => Err(error_from_py(&value)?),
                other => {
                    return Err(RankmeshError::new_err(format!(
                        "unknown result kind {other:?}"
                    )))
                }
            };
            outcomes.push(TaskOutcome {
                id: TaskId(id),
                duration_us,
                result,
            });
        }
        self.send(py, FromExecutor::Results(outcomes))
    }
}

impl ExecutorLink {
    fn send(&self, py: Python<'_>, message: FromExecutor) -> PyResult<()> {
        py.detach(|| {
            let mut writer = self
                .writer
                .lock()
                .map_err(|_| RankmeshError::new_err("link poisoned"))?;
            self.runtime
                .block_on(writer.send(&message))
                .map_err(|e| ConnectionLost::new_err(e.to_string()))
        })
    }
}
