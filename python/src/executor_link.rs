//! The executor's side of its Unix socket to the worker.

use crate::convert::{error_from_py, object_from_py, object_to_py};
use crate::reports::{Reports, SendError};
use crate::{ConnectionLost, RankmeshError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use rankmesh::protocol::{
    self, BlockingFrameWriter, BorrowFailure, FrameReader, FrameWriter, FromExecutor, LoanToCopy,
    Role, TaskId, TaskOutcome, ToExecutor, Token,
};
use std::sync::{Arc, Mutex};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

/// What the worker reads at the address the executor reports as ready, to learn whether it
/// may copy results out of this process (`ObjectRef::Held`).
static PROBE: [u8; 16] = protocol::EXECUTOR_PROBE;

#[pyclass(module = "rankmesh._rankmesh")]
pub struct ExecutorLink {
    runtime: tokio::runtime::Runtime,
    reader: Mutex<FrameReader<OwnedReadHalf>>,
    reports: Arc<Reports>,
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
                let writer = BlockingFrameWriter::new(&stream)?;
                let (r, w) = stream.into_split();
                let (mut reader, mut handshake) = (FrameReader::new(r), FrameWriter::new(w));
                reader.keep_buffers(protocol::EXECUTOR_LINK_BUFFER);
                protocol::connect(&mut reader, &mut handshake, &token, Role::Executor)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                handshake
                    .send(&FromExecutor::Ready {
                        pid: std::process::id(),
                        probe: PROBE.as_ptr() as u64,
                    })
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                // Later messages go by `writer`; the socket's writing side stays open.
                handshake.into_inner().forget();
                Ok::<_, std::io::Error>((reader, writer))
            })
        })?;
        let reports = Arc::new(Reports::new(writer));
        let reporter = Arc::clone(&reports);
        std::thread::Builder::new()
            .name("rankmesh-reports".into())
            .spawn(move || reporter.report_when_due())?;
        Ok(ExecutorLink {
            runtime,
            reader: Mutex::new(reader),
            reports,
        })
    }

    /// The next message from the worker; `("shutdown",)` also when the worker is gone.
    /// Results kept for a report are sent first, unless a message is here already.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let msg = py.detach(|| {
            let mut reader = self.reader.lock().map_err(SendError::from)?;
            if !reader.has_input() {
                self.reports.send_kept()?;
            }
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

    /// Keeps results for the next report: `(task_id, duration_us, "ok", (kind, data,
    /// layout))` or `(task_id, duration_us, "err", (type_name, message, traceback,
    /// pickled))`. They go within `EXECUTOR_REPORT_INTERVAL`, or sooner
    /// (`report_unless_input`, `recv`).
    fn keep_results(&self, results: &Bound<'_, PyList>) -> PyResult<()> {
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
                report_delay_us: 0, // set as the report goes
                result,
            });
        }
        Ok(self.reports.keep(outcomes)?)
    }

    /// Sends the results kept for a report, unless a message from the worker is here. An
    /// executor calls it before the last task it has, so that the worker can queue it more
    /// meanwhile.
    fn report_unless_input(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let reader = self.reader.lock().map_err(SendError::from)?;
            if reader.has_input() {
                return Ok(());
            }
            Ok(self.reports.send_kept()?)
        })
    }
}

impl ExecutorLink {
    fn send(&self, py: Python<'_>, message: FromExecutor) -> PyResult<()> {
        py.detach(|| Ok(self.reports.send(&message)?))
    }
}

impl Drop for ExecutorLink {
    fn drop(&mut self) {
        self.reports.close();
    }
}
