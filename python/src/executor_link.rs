//! The executor's side of its Unix socket to the worker.

use crate::convert::{error_from_py, object_from_py, object_to_py};
use crate::{ConnectionLost, RankmeshError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use rankmesh::protocol::{
    self, BlockingFrameWriter, BorrowFailure, FrameReader, FrameWriter, FromExecutor, LoanToCopy,
    Role, TaskId, TaskOutcome, ToExecutor, Token, EXECUTOR_REPORT_INTERVAL,
};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;
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
            let mut reader = self.reader.lock().map_err(poisoned)?;
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
        self.reports.keep(outcomes)
    }

    /// Sends the results kept for a report, unless a message from the worker is here. An
    /// executor calls it before the last task it has, so that the worker can queue it more
    /// meanwhile.
    fn report_unless_input(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let reader = self.reader.lock().map_err(poisoned)?;
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

fn poisoned<T>(_: PoisonError<T>) -> PyErr {
    RankmeshError::new_err("link poisoned")
}

/// Why a send failed, without Python: the reporter thread sends too.
enum SendError {
    Poisoned,
    Lost(String),
}

impl<T> From<PoisonError<T>> for SendError {
    fn from(_: PoisonError<T>) -> Self {
        SendError::Poisoned
    }
}

impl From<SendError> for PyErr {
    fn from(e: SendError) -> PyErr {
        match e {
            SendError::Poisoned => RankmeshError::new_err("link poisoned"),
            SendError::Lost(why) => ConnectionLost::new_err(why),
        }
    }
}

/// Everything the executor sends goes by `writer`, under its lock: a report and a
/// borrow's answer never interleave, and the reporter thread can send while the main
/// thread runs a task.
struct Reports {
    writer: Mutex<BlockingFrameWriter>,
    kept: Mutex<Kept>,
    /// Wakes the reporter thread when a result is kept while it sleeps.
    kept_one: Condvar,
}

#[derive(Default)]
struct Kept {
    /// Each with when it was kept, for its `report_delay_us`.
    outcomes: Vec<(Instant, TaskOutcome)>,
    /// When the oldest of `outcomes` was kept: they are due an interval later.
    since: Option<Instant>,
    /// When a result was kept last: the reporter watches for one interval after it before
    /// it sleeps until woken (a wake-up per report would cost what keeping them saves).
    last_kept: Option<Instant>,
    reporter_sleeps: bool,
    /// Why the reporter could not send (the worker is gone); the next call raises it.
    failed: Option<String>,
    closed: bool,
}

impl Reports {
    fn new(writer: BlockingFrameWriter) -> Self {
        Reports {
            writer: Mutex::new(writer),
            kept: Mutex::new(Kept::default()),
            kept_one: Condvar::new(),
        }
    }

    fn keep(&self, outcomes: Vec<TaskOutcome>) -> PyResult<()> {
        let mut kept = self.kept.lock().map_err(poisoned)?;
        if let Some(why) = &kept.failed {
            return Err(ConnectionLost::new_err(why.clone()));
        }
        let now = Instant::now();
        kept.outcomes.extend(outcomes.into_iter().map(|o| (now, o)));
        kept.since.get_or_insert(now);
        kept.last_kept = Some(now);
        if kept.reporter_sleeps {
            self.kept_one.notify_one();
        }
        Ok(())
    }

    fn send(&self, message: &FromExecutor) -> Result<(), SendError> {
        let mut writer = self.writer.lock()?;
        writer
            .send(message)
            .map_err(|e| SendError::Lost(e.to_string()))
    }

    /// Sends the results kept, if any. The writer is taken first, so reports go in the
    /// order their results were kept.
    fn send_kept(&self) -> Result<(), SendError> {
        let mut writer = self.writer.lock()?;
        let outcomes = {
            let mut kept = self.kept.lock()?;
            if let Some(why) = &kept.failed {
                return Err(SendError::Lost(why.clone()));
            }
            kept.since = None;
            std::mem::take(&mut kept.outcomes)
        };
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let outcomes = outcomes
            .into_iter()
            .map(|(kept_at, outcome)| TaskOutcome {
                report_delay_us: now.duration_since(kept_at).as_micros() as u64,
                ..outcome
            })
            .collect();
        writer
            .send(&FromExecutor::Results(outcomes))
            .map_err(|e| SendError::Lost(e.to_string()))
    }

    /// The reporter thread: sends kept results once they are due, while the main thread
    /// may be running a long task. Ends when the link closes or a send fails.
    fn report_when_due(&self) {
        rankmesh::process::leave_signals_to_the_main_thread();
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        loop {
            if kept.closed || kept.failed.is_some() {
                return;
            }
            let now = Instant::now();
            let wait_until = match kept.since {
                Some(since) if now >= since + EXECUTOR_REPORT_INTERVAL => {
                    drop(kept);
                    let sent = self.send_kept();
                    let Ok(relocked) = self.kept.lock() else {
                        return;
                    };
                    kept = relocked;
                    match sent {
                        Ok(()) => {}
                        Err(SendError::Lost(why)) => kept.failed = Some(why),
                        Err(SendError::Poisoned) => kept.failed = Some("link poisoned".into()),
                    }
                    continue;
                }
                Some(since) => Some(since + EXECUTOR_REPORT_INTERVAL),
                None => kept
                    .last_kept
                    .map(|last| last + EXECUTOR_REPORT_INTERVAL)
                    .filter(|&until| until > now),
            };
            kept = match wait_until {
                Some(until) => match self.kept_one.wait_timeout(kept, until - now) {
                    Ok((kept, _)) => kept,
                    Err(_) => return,
                },
                None => {
                    kept.reporter_sleeps = true;
                    let Ok(mut woken) = self.kept_one.wait(kept) else {
                        return;
                    };
                    woken.reporter_sleeps = false;
                    woken
                }
            };
        }
    }

    fn close(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.closed = true;
            self.kept_one.notify_one();
        }
    }
}
