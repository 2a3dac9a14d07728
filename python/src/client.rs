//! The client's connection: a background Rust thread keeps the scheduler connection and a
//! table of task states; Python calls block on it with the GIL released.

use crate::convert::{bytes_of, error_to_py, transport_error};
use crate::{ConnectionLost, RankmeshError};
use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyTuple};
use rankmesh::protocol::{
    frame_offsets, ClientId, ClusterInfo, Coordinate, Coordinated, DatasetOp, ErrorInfo,
    FromClient, FuncId, FunctionBlob, Resources, Role, TaskId, TaskOptions, TaskSpec, ToClient,
    Token, WorkerId, WorkerInfo,
};
use rankmesh::store::{HeapAllocator, Object};
use rankmesh::transport::tcp::{self, TcpTransport};
use rankmesh::transport::{Transport, TransportError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often a blocked wait wakes up to let Python handle Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);
/// Submits are split into parts (`FromClient::Submit::more`) of about this size: no
/// message nears the frame limit, the scheduler decodes one part at a time (its transient
/// memory is that of a part, not of the graph), and the first tasks run while the rest
/// of a big graph is still on its way.
const SUBMIT_CHUNK_BYTES: usize = 4 << 20;

enum Status {
    Finished(WorkerId),
    Failed(Arc<ErrorInfo>),
    Cancelled,
}

#[derive(Default)]
struct State {
    tasks: HashMap<TaskId, Status>,
    workers: HashMap<WorkerId, WorkerInfo>,
    /// Set when the connection to the scheduler is gone.
    lost: Option<String>,
    rejected: Vec<String>,
    /// The scheduler's last answer to `FromClient::Info`, and how many have come.
    info: Option<ClusterInfo>,
    info_replies: u64,
    /// Answers to `coordinate` requests not collected yet, by request number.
    coordinated: HashMap<u64, Coordinated>,
    /// This client's tasks computed (first computations) when it started watching progress
    /// and as last heard since; None until the scheduler's first answer.
    computed: Option<(u64, u64)>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, msg: ToClient) {
        let mut state = self.lock();
        match msg {
            ToClient::Finished(done) => {
                for task in done {
                    state.tasks.insert(task.id, Status::Finished(task.worker));
                }
            }
            ToClient::Failed { ids, error, .. } => {
                let error = Arc::new(error);
                for id in ids {
                    state.tasks.insert(id, Status::Failed(error.clone()));
                }
            }
            ToClient::Cancelled(ids) => {
                for id in ids {
                    state.tasks.insert(id, Status::Cancelled);
                }
            }
            ToClient::Workers(workers) => {
                state.workers = workers.into_iter().map(|w| (w.id, w)).collect();
            }
            ToClient::WorkerAdded(info) => {
                state.workers.insert(info.id, info);
            }
            ToClient::WorkerRemoved(id) => {
                state.workers.remove(&id);
                // Its results are recomputed, or announced again where a copy is left.
                state
                    .tasks
                    .retain(|_, status| !matches!(status, Status::Finished(w) if *w == id));
            }
            ToClient::SubmitRejected { reason } => state.rejected.push(reason),
            ToClient::Info(info) => {
                state.info = Some(info);
                state.info_replies += 1;
            }
            ToClient::Coordinated { request, reply } => {
                state.coordinated.insert(request, reply);
            }
            ToClient::Computed(count) => {
                let first = state.computed.map_or(count, |(first, _)| first);
                state.computed = Some((first, count));
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    fn lose(&self, why: String) {
        self.lock().lost = Some(why);
        self.changed.notify_all();
    }
}

#[pyclass(module = "rankmesh._rankmesh")]
pub struct ClientCore {
    #[pyo3(get)]
    client_id: u32,
    runtime: tokio::runtime::Runtime,
    outbox: Mutex<Option<mpsc::UnboundedSender<FromClient>>>,
    shared: Arc<Shared>,
    next_sequence: AtomicU64,
    next_request: AtomicU64,
    transport: Arc<TcpTransport>,
    stop: CancellationToken,
}

#[pymethods]
impl ClientCore {
    #[new]
    #[pyo3(signature = (address, token, timeout = 10.0))]
    fn new(py: Python<'_>, address: &str, token: &str, timeout: f64) -> PyResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rankmesh-client")
            .on_thread_start(rankmesh::process::leave_signals_to_the_main_thread)
            .enable_all()
            .build()?;
        let token = Token::new(token);
        // Connected means welcomed and told the workers, so `workers()` is right at once.
        let connect = async {
            let (mut reader, writer, client_id) = tcp::connect(address, &token, Role::Client)
                .await
                .map_err(transport_error)?;
            let client_id = client_id
                .ok_or_else(|| RankmeshError::new_err("the scheduler did not name this client"))?;
            match reader.recv::<ToClient>().await {
                Ok(Some(first @ ToClient::Workers(_))) => Ok((reader, writer, client_id, first)),
                Ok(other) => Err(RankmeshError::new_err(format!(
                    "the scheduler's first message was not the worker list: {other:?}"
                ))),
                Err(e) => Err(RankmeshError::new_err(format!(
                    "the scheduler connection failed: {e}"
                ))),
            }
        };
        let connected = py.detach(|| {
            runtime.block_on(async {
                let limit = Duration::from_secs_f64(timeout.max(0.001));
                tokio::time::timeout(limit, connect)
                    .await
                    .unwrap_or_else(|_| {
                        Err(pyo3::exceptions::PyTimeoutError::new_err(format!(
                            "no answer from the scheduler at {address} within {timeout} s"
                        )))
                    })
            })
        });
        let (mut reader, mut writer, client_id, workers) = connected?;
        let shared = Arc::new(Shared::default());
        shared.apply(workers);
        let stop = CancellationToken::new();
        let (outbox, mut inbox) = mpsc::unbounded_channel::<FromClient>();
        let events = shared.clone();
        let stop_reader = stop.clone();
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_reader.cancelled() => return,
                    msg = reader.recv::<ToClient>() => match msg {
                        Ok(Some(msg)) => events.apply(msg),
                        Ok(None) => return events.lose("the scheduler closed the connection".into()),
                        Err(e) => return events.lose(format!("the scheduler connection failed: {e}")),
                    },
                }
            }
        });
        let failures = shared.clone();
        runtime.spawn(async move {
            if let Err(e) = writer.forward(&mut inbox).await {
                failures.lose(format!("cannot send to the scheduler: {e}"));
            }
        });
        Ok(ClientCore {
            client_id: client_id.0,
            runtime,
            outbox: Mutex::new(Some(outbox)),
            shared,
            next_sequence: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            transport: Arc::new(TcpTransport::new(token)),
            stop,
        })
    }

    /// Reserves `count` consecutive task ids; returns the first.
    fn next_task_id(&self, count: u64) -> u64 {
        let first = self.next_sequence.fetch_add(count, Ordering::Relaxed);
        TaskId::new(ClientId(self.client_id), first).0
    }

    /// `tasks`: (id, deps, function ids, payload, priority, prefix); `restrictions`: task id
    /// → the only worker ids that may run it; `options`: task id → (retries,
    /// allow_other_workers, resources as (name, amount) pairs).
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (functions, tasks, wanted, restrictions = None, options = None))]
    fn submit(
        &self,
        functions: Vec<(u64, PyBackedBytes)>,
        tasks: Vec<(u64, Vec<u64>, Vec<u64>, PyBackedBytes, i64, PyBackedStr)>,
        wanted: Vec<u64>,
        restrictions: Option<HashMap<u64, Vec<u32>>>,
        options: Option<HashMap<u64, TaskOptionsTuple>>,
    ) -> PyResult<()> {
        let mut restrictions = restrictions.unwrap_or_default();
        let mut options = options.unwrap_or_default();
        let wanted: std::collections::HashSet<u64> = wanted.into_iter().collect();
        let mut batch = SubmitBatch::new(self, &functions);
        for (id, deps, funcs, payload, priority, prefix) in tasks {
            let spec = TaskSpec {
                id: TaskId(id),
                deps: deps.into_iter().map(TaskId).collect(),
                funcs: funcs.into_iter().map(FuncId).collect(),
                payload: bytes_of(&payload),
                priority,
                workers: restrictions
                    .remove(&id)
                    .map(|ws| ws.into_iter().map(WorkerId).collect())
                    .unwrap_or_default(),
                options: options.remove(&id).map(task_options).unwrap_or_default(),
                prefix: 0,
            };
            batch.push(spec, &prefix, wanted.contains(&id))?;
        }
        batch.finish()
    }

    /// Many calls at once, all held by this client (`client.map`): task `first_id + i` has
    /// `payloads[i]` (bytes), inputs `deps[i]` and function ids `funcs[i]` (lists of ints;
    /// the same list object may stand for many tasks), priority `first_priority + i`, and
    /// all of them `prefix`, `restriction` (the only worker ids that may run them) and
    /// `options` (retries, allow_other_workers, resources). Columns instead of a tuple per
    /// task: what was 3-4 µs of conversion per task is a fraction of that.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (functions, first_id, payloads, deps, funcs, first_priority, prefix,
                        restriction = None, options = None))]
    fn submit_calls(
        &self,
        functions: Vec<(u64, PyBackedBytes)>,
        first_id: u64,
        payloads: &Bound<'_, PyList>,
        deps: &Bound<'_, PyList>,
        funcs: &Bound<'_, PyList>,
        first_priority: i64,
        prefix: &str,
        restriction: Option<Vec<u32>>,
        options: Option<TaskOptionsTuple>,
    ) -> PyResult<()> {
        let count = payloads.len();
        if deps.len() != count || funcs.len() != count {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{count} payloads but {} deps and {} funcs",
                deps.len(),
                funcs.len()
            )));
        }
        let workers: Vec<WorkerId> = restriction
            .unwrap_or_default()
            .into_iter()
            .map(WorkerId)
            .collect();
        let options = options.map(task_options).unwrap_or_default();
        let mut ids_of = ListOfIds::default();
        let mut funcs_of = ListOfIds::default();
        let mut batch = SubmitBatch::new(self, &functions);
        for (index, payload) in payloads.iter().enumerate() {
            let payload = payload.cast::<PyBytes>()?;
            let spec = TaskSpec {
                id: TaskId(first_id + index as u64),
                deps: ids_of.get(&deps.get_item(index)?)?.map(TaskId).collect(),
                funcs: funcs_of.get(&funcs.get_item(index)?)?.map(FuncId).collect(),
                payload: Bytes::copy_from_slice(payload.as_bytes()),
                priority: first_priority + index as i64,
                workers: workers.clone(),
                options: options.clone(),
                prefix: 0,
            };
            batch.push(spec, prefix, true)?;
        }
        batch.finish()
    }

    /// A worker plugin, pickled: every executor sets it up (`FromClient::RegisterPlugin`).
    fn register_plugin(&self, name: String, plugin: PyBackedBytes) -> PyResult<()> {
        self.send(FromClient::RegisterPlugin {
            name,
            plugin: bytes_of(&plugin),
        })
    }

    /// These workers leave on purpose and are not replaced (`FromClient::RetireWorkers`).
    fn retire_workers(&self, ids: Vec<u32>) -> PyResult<()> {
        self.send(FromClient::RetireWorkers(
            ids.into_iter().map(WorkerId).collect(),
        ))
    }

    /// Cancels every client's tasks and restarts every executor (`FromClient::Restart`).
    fn restart(&self) -> PyResult<()> {
        self.send(FromClient::Restart)
    }

    /// Whether the scheduler should keep `computed()` up to date (progress bars are open).
    fn watch_progress(&self, on: bool) -> PyResult<()> {
        self.shared.lock().computed = None;
        self.send(FromClient::WatchProgress(on))
    }

    /// Tasks of this client computed since `watch_progress(True)`: the scheduler answers it
    /// before it handles what is submitted after it. None before that answer.
    fn computed(&self) -> Option<u64> {
        self.shared
            .lock()
            .computed
            .map(|(first, latest)| latest - first)
    }

    fn unregister_plugin(&self, name: String) -> PyResult<()> {
        self.send(FromClient::UnregisterPlugin(name))
    }

    fn want(&self, ids: Vec<u64>) -> PyResult<()> {
        self.send(FromClient::Want(ids.into_iter().map(TaskId).collect()))
    }

    fn release(&self, ids: Vec<u64>) -> PyResult<()> {
        let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
        {
            let mut state = self.shared.lock();
            for id in &ids {
                state.tasks.remove(id);
            }
        }
        if self.shared.lock().lost.is_some() {
            return Ok(()); // nothing to release on a scheduler that is gone
        }
        self.send(FromClient::Release(ids))
    }

    /// The client will ship these functions again before a task uses them.
    fn release_functions(&self, ids: Vec<u64>) -> PyResult<()> {
        if ids.is_empty() || self.shared.lock().lost.is_some() {
            return Ok(());
        }
        self.send(FromClient::ReleaseFunctions(
            ids.into_iter().map(FuncId).collect(),
        ))
    }

    /// Cancels the tasks; those not ended yet read as cancelled at once.
    fn cancel(&self, ids: Vec<u64>) -> PyResult<()> {
        let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
        {
            let mut state = self.shared.lock();
            for id in &ids {
                state.tasks.entry(*id).or_insert(Status::Cancelled);
            }
        }
        self.shared.changed.notify_all();
        self.send(FromClient::Cancel(ids))
    }

    /// Blocks until all (or any) of `ids` ended or `timeout` passed; returns those ended.
    #[pyo3(signature = (ids, timeout = None, return_when = "ALL"))]
    fn wait(
        &self,
        py: Python<'_>,
        ids: Vec<u64>,
        timeout: Option<f64>,
        return_when: &str,
    ) -> PyResult<Vec<u64>> {
        let need_all = match return_when {
            "ALL" => true,
            "ANY" => false,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "return_when must be ALL or ANY, not {other:?}"
                )))
            }
        };
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
        // ALL: ids[..checked] had all ended when last looked at, so each wake-up looks at
        // the ids from the first one still pending (tasks end roughly in the order asked):
        // waiting for 10^6 tasks is not 10^6 lookups per message from the scheduler.
        let mut checked = 0;
        loop {
            let outcome = py.detach(|| {
                let slice_end = Instant::now() + SIGNAL_CHECK;
                let mut state = self.shared.lock();
                loop {
                    if let Some(reason) = state.rejected.pop() {
                        return Err(RankmeshError::new_err(format!(
                            "the scheduler rejected a submit: {reason}"
                        )));
                    }
                    let ended = |state: &State| -> Vec<u64> {
                        ids.iter()
                            .filter(|id| state.tasks.contains_key(id))
                            .map(|id| id.0)
                            .collect()
                    };
                    let satisfied = if need_all {
                        while checked < ids.len() && state.tasks.contains_key(&ids[checked]) {
                            checked += 1;
                        }
                        // All seen ended; one whose worker left meanwhile is pending again.
                        checked == ids.len() && {
                            checked = ids
                                .iter()
                                .position(|id| !state.tasks.contains_key(id))
                                .unwrap_or(ids.len());
                            checked == ids.len()
                        }
                    } else {
                        ids.is_empty() || ids.iter().any(|id| state.tasks.contains_key(id))
                    };
                    let expired = deadline.is_some_and(|d| Instant::now() >= d);
                    if satisfied && need_all {
                        return Ok(Some(ids.iter().map(|id| id.0).collect()));
                    }
                    if satisfied || expired {
                        return Ok(Some(ended(&state)));
                    }
                    if let Some(reason) = &state.lost {
                        return Err(ConnectionLost::new_err(reason.clone()));
                    }
                    let now = Instant::now();
                    if now >= slice_end {
                        return Ok(None);
                    }
                    let until = deadline.map_or(slice_end, |d| d.min(slice_end));
                    state = self
                        .shared
                        .changed
                        .wait_timeout(state, until.saturating_duration_since(now))
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            })?;
            if let Some(ended) = outcome {
                return Ok(ended);
            }
            py.check_signals()?;
        }
    }

    /// Those of `ids` without a result (erred, cancelled or still pending), in order: one
    /// call where `state` per task would be 10^6 calls.
    fn unfinished(&self, ids: Vec<u64>) -> Vec<u64> {
        let state = self.shared.lock();
        ids.into_iter()
            .filter(|id| !matches!(state.tasks.get(&TaskId(*id)), Some(Status::Finished(_))))
            .collect()
    }

    fn state(&self, id: u64) -> &'static str {
        match self.shared.lock().tasks.get(&TaskId(id)) {
            None => "pending",
            Some(Status::Finished(_)) => "finished",
            Some(Status::Failed(_)) => "error",
            Some(Status::Cancelled) => "cancelled",
        }
    }

    /// The worker this client was told holds the task's result, if it has finished.
    fn location(&self, id: u64) -> Option<u32> {
        match self.shared.lock().tasks.get(&TaskId(id)) {
            Some(Status::Finished(worker)) => Some(worker.0),
            _ => None,
        }
    }

    fn error<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Option<Bound<'py, PyAny>>> {
        let error = match self.shared.lock().tasks.get(&TaskId(id)) {
            Some(Status::Failed(error)) => error.clone(),
            _ => return Ok(None),
        };
        Ok(Some(error_to_py(py, &error)?.into_any()))
    }

    /// Results straight from the workers holding them, in the order asked; in place of a
    /// result whose worker is gone, unreachable or no longer holds it, a string that says
    /// why (the scheduler recomputes it or announces another copy: wait, fetch again).
    fn fetch<'py>(&self, py: Python<'py>, ids: Vec<u64>) -> PyResult<Bound<'py, PyList>> {
        let objects = self.fetch_objects(py, &ids)?;
        let out = PyList::empty(py);
        for (id, object) in ids.into_iter().zip(objects) {
            match object {
                Fetched::Object(object) => out.append(object_frames(py, id, &object)?)?,
                not_fetched => out.append(not_fetched.why())?,
            }
        }
        Ok(out)
    }

    /// `fetch`, each result turned into its value here by `loads(pickle stream, buffers)`
    /// as it is read: (values in the order asked, None for those not fetched; {id: why}
    /// for those). For 10^6 results, no list of 10^6 (stream, buffers) pairs in between.
    fn fetch_loaded<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u64>,
        loads: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyDict>)> {
        let objects = self.fetch_objects(py, &ids)?;
        let values = PyList::empty(py);
        let missing = PyDict::new(py);
        // Each object is let go once it is a value.
        for (id, object) in ids.into_iter().zip(objects) {
            match object {
                Fetched::Object(object) => {
                    let (pickled, buffers) = object_frames(py, id, &object)?;
                    drop(object);
                    values.append(loads.call1((pickled, buffers))?)?;
                }
                not_fetched => {
                    missing.set_item(id, not_fetched.why())?;
                    values.append(py.None())?;
                }
            }
        }
        Ok((values, missing))
    }

    /// The cluster's counters, asked of the scheduler: (recomputed tasks, {worker id:
    /// {memory counters}}).
    fn info<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyTuple>> {
        let asked = self.shared.lock().info_replies;
        self.send(FromClient::Info)?;
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let info = py.detach(|| {
            let mut state = self.shared.lock();
            loop {
                if let Some(reason) = &state.lost {
                    return Err(ConnectionLost::new_err(reason.clone()));
                }
                if state.info_replies > asked {
                    return Ok(state.info.clone().unwrap_or_default());
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(RankmeshError::new_err(
                        "the scheduler did not answer in time",
                    ));
                }
                state = self
                    .shared
                    .changed
                    .wait_timeout(state, deadline - now)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        })?;
        let workers = PyDict::new(py);
        for (id, memory) in &info.workers {
            let d = PyDict::new(py);
            d.set_item("paused", memory.paused)?;
            d.set_item("memory_limit", memory.limit)?;
            d.set_item("process_bytes", memory.process_bytes)?;
            d.set_item("managed_bytes", memory.managed_bytes)?;
            d.set_item("spilled_bytes", memory.spilled_bytes)?;
            d.set_item("spilled_total", memory.spilled_total)?;
            d.set_item("unspilled_total", memory.unspilled_total)?;
            d.set_item("paused_seconds", memory.paused_seconds)?;
            workers.set_item(id.0, d)?;
        }
        PyTuple::new(
            py,
            [
                info.recomputed_tasks.into_pyobject(py)?.into_any(),
                workers.into_any(),
            ],
        )
    }

    /// One request on a named synchronisation object (see `Coordinate`): `op` is its
    /// variant's name in snake case, `value` the bytes it stores, `number` its lease count
    /// or lease. Blocks until answered; after `timeout` seconds the request is withdrawn
    /// and its answer (which may still be a grant or a value) awaited. Returns (kind,
    /// value, request number): kind "granted" (the request number names the lease; a
    /// grant that crossed the withdrawal is kept, so timeout=0 is a non-blocking try),
    /// "done", "value" (bytes), "count" (int), "flag" (bool), "withdrawn" or "refused"
    /// (the reason).
    #[pyo3(signature = (op, name, value = None, number = 0, timeout = None))]
    fn coordinate<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        name: String,
        value: Option<PyBackedBytes>,
        number: u64,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let value = || value.as_ref().map(bytes_of).unwrap_or_default();
        let op = match op {
            "acquire" => Coordinate::Acquire {
                name,
                max_leases: u32::try_from(number).unwrap_or(u32::MAX),
            },
            "release" => Coordinate::Release {
                name,
                lease: number,
            },
            "leases" => Coordinate::Leases { name },
            "event_set" => Coordinate::EventSet { name },
            "event_clear" => Coordinate::EventClear { name },
            "event_wait" => Coordinate::EventWait { name },
            "event_is_set" => Coordinate::EventIsSet { name },
            "variable_set" => Coordinate::VariableSet {
                name,
                value: value(),
            },
            "variable_get" => Coordinate::VariableGet { name },
            "variable_delete" => Coordinate::VariableDelete { name },
            "queue_put" => Coordinate::QueuePut {
                name,
                value: value(),
            },
            "queue_get" => Coordinate::QueueGet { name },
            "queue_size" => Coordinate::QueueSize { name },
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown coordination request {other:?}"
                )))
            }
        };
        self.ask(
            py,
            |request| FromClient::Coordinate { request, op },
            timeout,
        )
    }

    /// One request on the published datasets (`DatasetOp`): "publish" (value, tasks,
    /// overwrite), "unpublish", "get" or "list". Answered at once; returns what
    /// `coordinate` returns, and ("names", list, request) for "list".
    #[pyo3(signature = (op, name = String::new(), value = None, tasks = Vec::new(), overwrite = false))]
    fn dataset<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        name: String,
        value: Option<PyBackedBytes>,
        tasks: Vec<u64>,
        overwrite: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let op = match op {
            "publish" => DatasetOp::Publish {
                name,
                value: value.as_ref().map(bytes_of).unwrap_or_default(),
                tasks: tasks.into_iter().map(TaskId).collect(),
                overwrite,
            },
            "unpublish" => DatasetOp::Unpublish { name },
            "get" => DatasetOp::Get { name },
            "list" => DatasetOp::List,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown dataset request {other:?}"
                )))
            }
        };
        self.ask(py, |request| FromClient::Dataset { request, op }, None)
    }

    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let state = self.shared.lock();
        let out = PyList::empty(py);
        let mut workers: Vec<&WorkerInfo> = state.workers.values().collect();
        workers.sort_by_key(|w| w.id);
        for w in workers {
            let d = PyDict::new(py);
            d.set_item("id", w.id.0)?;
            d.set_item("data_address", &w.data_address)?;
            d.set_item("host", &w.host)?;
            d.set_item("rank", w.rank)?;
            d.set_item("pid", w.pid)?;
            d.set_item("nthreads", w.nthreads)?;
            d.set_item("memory_limit", w.memory_limit)?;
            let resources = PyDict::new(py);
            for (name, amount) in w.resources.iter() {
                resources.set_item(name, amount)?;
            }
            d.set_item("resources", resources)?;
            let place = match &w.topology {
                Some(t) => {
                    let p = PyDict::new(py);
                    p.set_item("cpus", &t.cpus)?;
                    p.set_item("cores", t.cores)?;
                    p.set_item("numa_nodes", &t.numa_nodes)?;
                    p.set_item("numa_memory", t.numa_memory)?;
                    p.set_item("gpus", &t.gpus)?;
                    Some(p)
                }
                None => None,
            };
            d.set_item("topology", place)?;
            out.append(d)?;
        }
        Ok(out)
    }

    fn close(&self) {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.stop.cancel();
    }
}

impl ClientCore {
    /// The results of `ids`, in their order, fetched from the workers holding them; in
    /// place of one that could not be fetched, why. One worker's answer (in the order
    /// asked) goes to its places as it is, without a map of all the objects in between.
    fn fetch_objects(&self, py: Python<'_>, ids: &[u64]) -> PyResult<Vec<Fetched>> {
        // Per worker: its info, the ids it holds and their places in `ids`.
        let mut by_worker: HashMap<WorkerId, (WorkerInfo, Vec<TaskId>, Vec<usize>)> =
            HashMap::new();
        {
            let state = self.shared.lock();
            for (place, &id) in ids.iter().enumerate() {
                let Some(Status::Finished(worker)) = state.tasks.get(&TaskId(id)) else {
                    return Err(RankmeshError::new_err(format!(
                        "task {id} has no result to fetch"
                    )));
                };
                if let Some(info) = state.workers.get(worker) {
                    let entry = by_worker
                        .entry(*worker)
                        .or_insert_with(|| (info.clone(), Vec::new(), Vec::new()));
                    entry.1.push(TaskId(id));
                    entry.2.push(place);
                }
            }
        }
        let transport = self.transport.clone();
        let fetched = py.detach(|| {
            self.runtime.block_on(async {
                let fetches = by_worker.values_mut().map(|(info, ids, places)| {
                    let transport = &transport;
                    let ids = std::mem::take(ids);
                    async move {
                        let fetched = transport.fetch(info, ids, Arc::new(HeapAllocator)).await;
                        (info, places, fetched)
                    }
                });
                futures::future::join_all(fetches).await
            })
        });
        let mut objects: Vec<Fetched> = ids.iter().map(|_| Fetched::Gone).collect();
        for (info, places, fetched) in fetched {
            match fetched {
                // In the order asked (the transport checks it).
                Ok(fetched) => {
                    for ((_, object), &place) in fetched.into_iter().zip(places.iter()) {
                        if let Some(object) = object {
                            objects[place] = Fetched::Object(object);
                        }
                    }
                }
                // A worker that does not know the token is not a lost worker.
                Err(e @ TransportError::Handshake { .. }) => return Err(transport_error(e)),
                Err(e) => {
                    let why: Arc<str> = format!("cannot fetch it from {info}: {e}").into();
                    for &place in places.iter() {
                        objects[place] = Fetched::Unreachable(why.clone());
                    }
                }
            }
        }
        Ok(objects)
    }

    /// Sends the request `message` makes of a new request number, waits for its answer
    /// (see `await_reply`) and returns it as Python sees it.
    fn ask<'py>(
        &self,
        py: Python<'py>,
        message: impl FnOnce(u64) -> FromClient,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        self.send(message(request))?;
        let reply = self.await_reply(py, request, timeout)?;
        reply_tuple(py, request, reply)
    }

    /// Waits for the answer to `request`; after `timeout` seconds the request is withdrawn
    /// and its answer (which may still be a grant or a value) awaited.
    fn await_reply(
        &self,
        py: Python<'_>,
        request: u64,
        timeout: Option<f64>,
    ) -> PyResult<Coordinated> {
        let mut deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let reply = loop {
            let outcome = py.detach(|| {
                let slice_end = Instant::now() + SIGNAL_CHECK;
                let mut state = self.shared.lock();
                loop {
                    if let Some(reply) = state.coordinated.remove(&request) {
                        return Ok(Some(reply));
                    }
                    if let Some(reason) = &state.lost {
                        return Err(ConnectionLost::new_err(reason.clone()));
                    }
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) || now >= slice_end {
                        return Ok(None);
                    }
                    let until = deadline.map_or(slice_end, |d| d.min(slice_end));
                    state = self
                        .shared
                        .changed
                        .wait_timeout(state, until - now)
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            })?;
            if let Some(reply) = outcome {
                break reply;
            }
            if let Err(interrupted) = py.check_signals() {
                self.send(FromClient::Withdraw(request))?;
                return Err(interrupted);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // Answered exactly once: Withdrawn, or what came first.
                self.send(FromClient::Withdraw(request))?;
                deadline = None;
            }
        };
        Ok(reply)
    }

    fn send(&self, msg: FromClient) -> PyResult<()> {
        if let Some(reason) = &self.shared.lock().lost {
            return Err(ConnectionLost::new_err(reason.clone()));
        }
        let outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        match outbox.as_ref() {
            Some(outbox) => outbox
                .send(msg)
                .map_err(|_| ConnectionLost::new_err("the client is closed")),
            None => Err(ConnectionLost::new_err("the client is closed")),
        }
    }
}

impl Drop for ClientCore {
    fn drop(&mut self) {
        self.close();
    }
}

/// A reply as Python sees it: (kind, value, request number).
fn reply_tuple<'py>(
    py: Python<'py>,
    request: u64,
    reply: Coordinated,
) -> PyResult<Bound<'py, PyTuple>> {
    let (kind, value): (&str, Bound<'py, PyAny>) = match reply {
        Coordinated::Granted => ("granted", py.None().into_bound(py)),
        Coordinated::Done => ("done", py.None().into_bound(py)),
        Coordinated::Value(bytes) => ("value", PyBytes::new(py, &bytes).into_any()),
        Coordinated::Count(n) => ("count", n.into_pyobject(py)?.into_any()),
        Coordinated::Flag(set) => ("flag", set.into_pyobject(py)?.to_owned().into_any()),
        Coordinated::Withdrawn => ("withdrawn", py.None().into_bound(py)),
        Coordinated::Refused(why) => ("refused", why.into_pyobject(py)?.into_any()),
        Coordinated::Names(names) => ("names", PyList::new(py, names)?.into_any()),
    };
    let request = request.into_pyobject(py)?.into_any();
    PyTuple::new(py, [kind.into_pyobject(py)?.into_any(), value, request])
}

/// (retries, allow_other_workers, resources as (name, amount) pairs), as Python gives them.
type TaskOptionsTuple = (u32, bool, Vec<(String, f64)>);

fn task_options((retries, allow_other_workers, resources): TaskOptionsTuple) -> TaskOptions {
    TaskOptions {
        retries,
        allow_other_workers,
        resources: Resources::new(resources),
    }
}

/// Lists of ints from Python where many tasks share one list object: the last one read is
/// kept, so a list given for every task is read once.
#[derive(Default)]
struct ListOfIds {
    last: Option<(usize, Vec<u64>)>,
}

impl ListOfIds {
    fn get(&mut self, list: &Bound<'_, PyAny>) -> PyResult<impl Iterator<Item = u64> + '_> {
        let pointer = list.as_ptr() as usize;
        if self.last.as_ref().is_none_or(|(last, _)| *last != pointer) {
            self.last = Some((pointer, list.extract()?));
        }
        Ok(self.last.iter().flat_map(|(_, ids)| ids.iter().copied()))
    }
}

/// Tasks gathered into `Submit` messages of about SUBMIT_CHUNK_BYTES at most; the first
/// message carries the function blobs. Each message names the prefixes its tasks use and
/// tasks refer to them by index.
struct SubmitBatch<'a> {
    core: &'a ClientCore,
    functions: Vec<FunctionBlob>,
    tasks: Vec<TaskSpec>,
    wanted: Vec<TaskId>,
    prefixes: Vec<String>,
    prefix_index: HashMap<String, u32>,
    bytes: usize,
    /// Parts sent so far; the scheduler holds their results until the last part.
    parts_sent: usize,
}

impl<'a> SubmitBatch<'a> {
    fn new(core: &'a ClientCore, functions: &[(u64, PyBackedBytes)]) -> Self {
        SubmitBatch {
            core,
            functions: functions
                .iter()
                .map(|(id, bytes)| FunctionBlob {
                    id: FuncId(*id),
                    bytes: bytes_of(bytes),
                })
                .collect(),
            tasks: Vec::new(),
            wanted: Vec::new(),
            prefixes: Vec::new(),
            prefix_index: HashMap::new(),
            bytes: 0,
            parts_sent: 0,
        }
    }

    fn push(&mut self, mut task: TaskSpec, prefix: &str, wanted: bool) -> PyResult<()> {
        task.prefix = match self.prefix_index.get(prefix) {
            Some(&at) => at,
            None => {
                let at = self.prefixes.len() as u32;
                self.prefixes.push(prefix.to_string());
                self.prefix_index.insert(prefix.to_string(), at);
                at
            }
        };
        self.bytes += task.payload.len() + 8 * (task.deps.len() + task.funcs.len()) + 32;
        if wanted {
            self.wanted.push(task.id);
        }
        self.tasks.push(task);
        if self.bytes >= SUBMIT_CHUNK_BYTES {
            self.send(true)?;
        }
        Ok(())
    }

    /// Sends the tasks gathered so far; `more`: other parts of this submit follow.
    fn send(&mut self, more: bool) -> PyResult<()> {
        self.core.send(FromClient::Submit {
            functions: std::mem::take(&mut self.functions),
            tasks: std::mem::take(&mut self.tasks),
            wanted: std::mem::take(&mut self.wanted),
            prefixes: std::mem::take(&mut self.prefixes),
            more,
        })?;
        self.prefix_index.clear();
        self.bytes = 0;
        self.parts_sent += 1;
        Ok(())
    }

    /// Sends the last part: the last tasks, the functions alone if there were no tasks, or
    /// nothing but the end of a submit sent in parts.
    fn finish(mut self) -> PyResult<()> {
        if !self.tasks.is_empty() || !self.functions.is_empty() || self.parts_sent > 0 {
            self.send(false)?;
        }
        Ok(())
    }
}

/// What became of one result asked of a worker.
enum Fetched {
    Object(Object),
    /// Its worker is gone, or no longer holds it.
    Gone,
    /// Its worker did not answer (why).
    Unreachable(Arc<str>),
}

impl Fetched {
    fn why(&self) -> &str {
        match self {
            Fetched::Unreachable(why) => why,
            _ => "the worker holding it is gone or no longer holds it",
        }
    }
}

/// A fetched object as Python reads it: (pickle stream, out-of-band buffers as
/// bytearrays; an empty tuple when there are none, as for most small results).
fn object_frames<'py>(
    py: Python<'py>,
    id: u64,
    object: &Object,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyTuple>)> {
    let (offsets, _) = frame_offsets(&object.layout)
        .ok_or_else(|| RankmeshError::new_err(format!("task {id} has a bad layout")))?;
    // A client's fetched objects are never spilled.
    let bytes = (object.bytes())
        .ok_or_else(|| RankmeshError::new_err(format!("task {id} is not in memory")))?;
    let frame = |i: usize| {
        let start = offsets[i] as usize;
        &bytes[start..start + object.layout[i] as usize]
    };
    let pickled = PyBytes::new(py, if offsets.is_empty() { &[] } else { frame(0) });
    let buffers = PyTuple::new(
        py,
        (1..offsets.len()).map(|i| PyByteArray::new(py, frame(i))),
    )?;
    Ok((pickled, buffers))
}
