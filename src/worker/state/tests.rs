//! Worker tests: a recording comm that round-trips what goes to the scheduler and to
//! executors through the wire format, a `TestEnv` that feeds events, one test per
//! behaviour. No process is started.

use super::*;
use crate::protocol::{decode, encode, frame_offsets, InputLocation, ObjectLoan, ToExecutor};
use crate::store::{ShmDir, SpillDir, StoreBytes, StoreError};
use crate::worker::memory::{MemoryPolicy, MemoryThresholds};
use serde::{de::DeserializeOwned, Serialize};
use std::path::PathBuf;

fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
    decode(&encode(msg).expect("message encodes")).expect("message decodes")
}

/// One batch an executor slot was given.
#[derive(Debug)]
struct Ran {
    slot: usize,
    generation: u64,
    functions: Vec<FuncId>,
    tasks: Vec<TaskId>,
    /// How each task reads its inputs.
    inputs: Vec<Vec<ObjectRef>>,
}

#[derive(Default)]
struct TestComm {
    sent: VecDeque<FromWorker>,
    /// `FromWorker::Transferred`, kept apart: they only feed the dashboard's task stream,
    /// so tests about fetching need not list them (`a_fetch_reports_its_transfer` does).
    transfers: Vec<Transfer>,
    fetches: VecDeque<(WorkerId, Vec<TaskId>)>,
    runs: VecDeque<Ran>,
    released_functions: VecDeque<(usize, u64, Vec<FuncId>)>,
    adopted: Vec<PathBuf>,
    mapped_in: usize,
    /// Spilled inputs read ahead of their tasks.
    read_ahead: Vec<Arc<Object>>,
    /// Kept results to copy out of their executors at once.
    copied_out: Vec<(TaskId, Arc<Object>)>,
    /// Result files that cannot be taken over.
    unadoptable: Vec<PathBuf>,
    /// Where result files are taken over from for real, if set.
    shm: Option<Arc<ShmDir>>,
    spills: VecDeque<Vec<(TaskId, Arc<Object>)>>,
    reserves_dropped: usize,
    /// Executor generations told to give back their reserves.
    executor_reserves_dropped: VecDeque<(usize, u64)>,
    /// Dead executor generations whose leftovers were to be removed.
    cleared: VecDeque<(usize, u64)>,
    restarts: VecDeque<(usize, u64, String)>,
    wakes: VecDeque<(Duration, Wake)>,
    plugins: VecDeque<(usize, u64, Vec<Plugin>, Vec<String>)>,
    /// Executor generations told that results in files were let go.
    objects_released: VecDeque<(usize, u64)>,
    /// (slot, generation, key) of the results executors were told to drop.
    held_released: Vec<(usize, u64, u64)>,
    /// Executor generations told to keep their large results, or write them.
    holding: VecDeque<(usize, u64, bool)>,
    /// Lent results executors were asked to copy: (slot, generation, request, loan).
    borrows: VecDeque<(usize, u64, u64, ObjectLoan)>,
    /// Answers to fetches that asked for lent results to be copied here.
    borrowed: VecDeque<(u64, Result<Object, StoreError>)>,
}

impl WorkerComm for TestComm {
    fn send(&mut self, msg: FromWorker) {
        match round_trip(&msg) {
            FromWorker::Transferred(transfers) => self.transfers.extend(transfers),
            msg => self.sent.push_back(msg),
        }
    }

    fn fetch(&mut self, peer: &WorkerInfo, ids: Vec<TaskId>) {
        self.fetches.push_back((peer.id, ids));
    }

    fn run(
        &mut self,
        slot: usize,
        generation: u64,
        functions: Vec<FunctionBlob>,
        tasks: Vec<RunTask>,
    ) {
        let ToExecutor::Functions(functions) = round_trip(&ToExecutor::Functions(functions)) else {
            unreachable!("Functions stay Functions")
        };
        let ToExecutor::Run(tasks) = round_trip(&ToExecutor::Run(tasks)) else {
            unreachable!("a Run stays a Run")
        };
        self.runs.push_back(Ran {
            slot,
            generation,
            functions: functions.iter().map(|f| f.id).collect(),
            tasks: tasks.iter().map(|t| t.id).collect(),
            inputs: tasks.into_iter().map(|t| t.inputs).collect(),
        });
    }

    fn release_functions(&mut self, slot: usize, generation: u64, ids: Vec<FuncId>) {
        self.released_functions.push_back((slot, generation, ids));
    }

    fn adopt(&mut self, path: &Path, layout: Vec<u64>) -> Result<Object, StoreError> {
        self.adopted.push(path.to_path_buf());
        if self.unadoptable.iter().any(|p| p == path) {
            return Err(StoreError::ForeignPath(path.to_path_buf()));
        }
        if let Some(shm) = &self.shm {
            return shm.adopt(path, layout);
        }
        let (_, total) = frame_offsets(&layout).ok_or(StoreError::BadLayout(layout.clone()))?;
        Object::inline(Bytes::from(vec![0u8; total as usize]), layout)
    }

    fn adopt_held(
        &mut self,
        layout: Vec<u64>,
        holder: Holder,
        source: Arc<ProcessMemory>,
        spans: Vec<(u64, u64)>,
        published: Published,
    ) -> Result<Object, StoreError> {
        let shm = self
            .shm
            .clone()
            .expect("tests of kept results have a folder");
        Object::held(layout, holder, source, spans, shm, published)
    }

    fn map_in(&mut self, _object: Arc<Object>) {
        self.mapped_in += 1;
    }

    fn read_ahead(&mut self, objects: Vec<Arc<Object>>) {
        self.read_ahead.extend(objects);
    }

    fn copy_out(&mut self, id: TaskId, object: Arc<Object>) {
        self.copied_out.push((id, object));
    }

    fn spill(&mut self, objects: Vec<(TaskId, Arc<Object>)>) {
        self.spills.push_back(objects);
    }

    fn restart_executor(&mut self, slot: usize, generation: u64, reason: String) {
        self.restarts.push_back((slot, generation, reason));
    }

    fn objects_released(&mut self, slot: usize, generation: u64, held: Vec<u64>) {
        let ToExecutor::ObjectsReleased { held } =
            round_trip(&ToExecutor::ObjectsReleased { held })
        else {
            unreachable!("ObjectsReleased stays ObjectsReleased")
        };
        self.objects_released.push_back((slot, generation));
        self.held_released
            .extend(held.into_iter().map(|key| (slot, generation, key)));
    }

    fn hold_results(&mut self, slot: usize, generation: u64, hold: bool) {
        let ToExecutor::HoldResults(hold) = round_trip(&ToExecutor::HoldResults(hold)) else {
            unreachable!("HoldResults stays HoldResults")
        };
        self.holding.push_back((slot, generation, hold));
    }

    fn borrow(&mut self, slot: usize, generation: u64, copy: LoanToCopy) {
        let ToExecutor::Borrow(copy) = round_trip(&ToExecutor::Borrow(copy)) else {
            unreachable!("Borrow stays Borrow")
        };
        self.borrows
            .push_back((slot, generation, copy.request, copy.loan));
    }

    fn borrowed(&mut self, request: u64, result: Result<Object, StoreError>) {
        self.borrowed.push_back((request, result));
    }

    fn wake_after(&mut self, delay: Duration, wake: Wake) {
        self.wakes.push_back((delay, wake));
    }

    fn plugins(&mut self, slot: usize, generation: u64, setup: Vec<Plugin>, teardown: Vec<String>) {
        self.plugins.push_back((slot, generation, setup, teardown));
    }

    fn clear_after(&mut self, slot: usize, generation: u64) {
        self.cleared.push_back((slot, generation));
    }

    fn drop_reserves(&mut self) {
        self.reserves_dropped += 1;
    }

    fn drop_executor_reserves(&mut self, slot: usize, generation: u64) {
        let ToExecutor::DropReserves = round_trip(&ToExecutor::DropReserves) else {
            unreachable!("DropReserves stays DropReserves")
        };
        self.executor_reserves_dropped.push_back((slot, generation));
    }
}

impl TestComm {
    fn take_sent(&mut self) -> Vec<FromWorker> {
        self.sent.drain(..).collect()
    }

    fn take_runs(&mut self) -> Vec<Ran> {
        self.runs.drain(..).collect()
    }

    fn take_fetches(&mut self) -> Vec<(WorkerId, Vec<TaskId>)> {
        let mut fetches: Vec<_> = self.fetches.drain(..).collect();
        fetches.sort();
        fetches
    }

    fn emptiness_check(&self) {
        assert!(self.sent.is_empty(), "unexpected messages: {:?}", self.sent);
        assert!(
            self.fetches.is_empty(),
            "unexpected fetches: {:?}",
            self.fetches
        );
        assert!(self.runs.is_empty(), "unexpected runs: {:?}", self.runs);
        assert!(self.released_functions.is_empty());
        assert!(
            self.objects_released.is_empty(),
            "unexpected release notices: {:?}",
            self.objects_released
        );

        assert!(self.spills.is_empty(), "unexpected spills");
        assert!(self.read_ahead.is_empty(), "unexpected reads ahead");
        assert!(self.borrows.is_empty(), "unexpected loans to copy");
        assert!(self.borrowed.is_empty(), "unexpected answers to loans");
        assert!(
            self.restarts.is_empty(),
            "unexpected restarts: {:?}",
            self.restarts
        );
        assert!(self.wakes.is_empty(), "unexpected wakes: {:?}", self.wakes);
        assert!(
            self.plugins.is_empty(),
            "unexpected plugins: {:?}",
            self.plugins
        );
    }
}

struct TestEnv {
    state: WorkerState,
    comm: TestComm,
    store: Store,
    /// Where results are spilled to (a folder in a temp folder), with a memory limit.
    spill: Option<(SpillDir, tempfile::TempDir)>,
}

const PEERS: [WorkerId; 2] = [WorkerId(2), WorkerId(3)];

fn peer(id: WorkerId) -> WorkerInfo {
    WorkerInfo {
        id,
        data_address: format!("127.0.0.1:{}", 9000 + id.0),
        host: "node".into(),
        nthreads: 1,
        memory_limit: 0,
        rank: None,
        pid: 1,
        topology: None,
        doorbell: None,
        resources: Default::default(),
    }
}

fn small(fill: u8) -> Object {
    Object::inline(Bytes::from(vec![fill; 64]), vec![64]).expect("a valid layout")
}

impl TestEnv {
    /// A worker with `slots` executors, all up (generation 1), and no memory limit.
    fn new(slots: usize) -> Self {
        Self::build(slots, MemoryPolicy::default(), false)
    }

    /// A worker as [`TestEnv::new`] whose peers on its own host read its results as bytes
    /// (an MPI job run with `--no-same-node-links`).
    fn read_as_bytes_on_its_host(slots: usize) -> Self {
        Self::build(slots, MemoryPolicy::default(), true)
    }

    /// A worker as [`TestEnv::new`] under `memory`: its results live in a shared-memory
    /// folder of its own, and are spilled for real to a folder in a temp folder.
    fn with_memory(slots: usize, memory: MemoryPolicy) -> Self {
        let mut env = Self::build(slots, memory, false);
        env.comm.shm = Some(Arc::new(
            ShmDir::create("rankmesh-test").expect("a shared-memory folder"),
        ));
        let local = tempfile::tempdir().expect("a temp folder");
        let spill = SpillDir::create(local.path()).expect("a spill folder");
        env.spill = Some((spill, local));
        env
    }

    fn build(slots: usize, memory: MemoryPolicy, same_host_reads_bytes: bool) -> Self {
        let store = Store::default();
        let settings = WorkerSettings {
            slots,
            max_crashes: 3,
            memory,
            transport: DataTransport::Tcp,
            same_host_reads_bytes,
            host: "node".into(),
        };
        let mut env = TestEnv {
            state: WorkerState::new(settings, store.clone()),
            comm: TestComm::default(),
            store,
            spill: None,
        };
        for &id in &PEERS {
            env.scheduler(ToWorker::PeerAdded(Box::new(peer(id))));
        }
        for slot in 0..slots {
            env.ready(slot, 1);
        }
        env
    }

    /// A new generation of the executor in `slot` is up (no readable memory).
    fn ready(&mut self, slot: usize, generation: u64) {
        self.executor(ExecutorEvent::Ready {
            slot,
            generation,
            pid: 100,
            memory: None,
        });
    }

    fn scheduler(&mut self, msg: ToWorker) {
        self.state
            .handle_scheduler(round_trip(&msg), &mut self.comm);
        self.state.sanity_check();
    }

    fn executor(&mut self, event: ExecutorEvent) {
        self.state.handle_executor(event, &mut self.comm);
        self.state.sanity_check();
    }

    fn fetched(
        &mut self,
        peer: WorkerId,
        ids: Vec<TaskId>,
        result: Result<Fetched, TransportError>,
    ) {
        let elapsed = Duration::from_millis(1);
        self.state
            .fetch_finished(peer, ids, result, elapsed, &mut self.comm);
        self.state.sanity_check();
    }

    fn compute(&mut self, tasks: Vec<ComputeTask>) {
        self.scheduler(ToWorker::Compute(tasks));
    }

    fn results(&mut self, slot: usize, outcomes: Vec<TaskOutcome>) {
        self.executor(ExecutorEvent::Results { slot, outcomes });
    }

    fn died(&mut self, slot: usize) {
        self.executor(ExecutorEvent::Died {
            slot,
            reason: "killed by signal 9".into(),
            traceback: "Fatal Python error: Segmentation fault\n  File \"task.py\", line 3".into(),
            failed_starts: 0,
        });
    }

    /// The ids of every batch run since the last look, per slot.
    fn ran(&mut self) -> Vec<(usize, Vec<TaskId>)> {
        self.comm
            .take_runs()
            .into_iter()
            .map(|r| (r.slot, r.tasks))
            .collect()
    }

    /// The executor generations told that results in files were let go, since the last look.
    fn release_notices(&mut self) -> Vec<(usize, u64)> {
        self.comm.objects_released.drain(..).collect()
    }

    fn done_ids(&mut self) -> Vec<TaskId> {
        match self.comm.take_sent().as_slice() {
            [FromWorker::Done(done)] => done.iter().map(|d| d.id).collect(),
            other => panic!("expected one Done, got {other:?}"),
        }
    }

    /// The one message sent since the last look, a task's failure.
    fn one_failure(&mut self) -> (TaskId, ErrorInfo) {
        match self.comm.take_sent().as_slice() {
            [FromWorker::Failed { id, error }] => (*id, error.clone()),
            other => panic!("expected one Failed, got {other:?}"),
        }
    }

    fn failed(&mut self) -> Vec<(TaskId, String)> {
        self.comm
            .take_sent()
            .into_iter()
            .map(|msg| match msg {
                FromWorker::Failed { id, error } => (id, error.type_name),
                other => panic!("expected Failed, got {other:?}"),
            })
            .collect()
    }
}

fn task(id: u64, inputs: &[(u64, &[WorkerId])]) -> ComputeTask {
    ComputeTask {
        id: TaskId(id),
        funcs: Default::default(),
        payload: Bytes::from(format!("payload {id}")),
        inputs: inputs
            .iter()
            .map(|(input, workers)| InputLocation {
                id: TaskId(*input),
                workers: workers.to_vec(),
                size: 64,
            })
            .collect(),
        priority: id as i64,
        read_by_tasks: true,
        read_elsewhere: false,
    }
}

fn ok(id: u64) -> TaskOutcome {
    TaskOutcome {
        id: TaskId(id),
        duration_us: 100,
        report_delay_us: 0,
        result: Ok(ObjectRef::Inline {
            data: Bytes::from(vec![1u8; 64]),
            layout: vec![64],
        }),
    }
}

fn ids(list: &[u64]) -> Vec<TaskId> {
    list.iter().copied().map(TaskId).collect()
}

// ------------------------------------------------------------------ running

#[test]
fn a_task_whose_inputs_are_here_runs_at_once() {
    let mut env = TestEnv::new(1);
    env.store.insert(TaskId(1), small(7));
    env.compute(vec![task(10, &[(1, &PEERS)])]);
    assert_eq!(env.ran(), [(0, ids(&[10]))]);
    env.results(0, vec![ok(10)]);
    assert_eq!(env.done_ids(), ids(&[10]));
    assert_eq!(env.store.get(TaskId(10)).map(|o| o.size()), Some(64));
    env.comm.emptiness_check();
}

#[test]
fn results_of_one_batch_are_reported_in_one_done_with_when_each_ended() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[]), task(2, &[]), task(3, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1, 2, 3]))]);
    let reported_after = |id, report_delay_us| TaskOutcome {
        report_delay_us,
        ..ok(id)
    };
    env.results(
        0,
        vec![reported_after(1, 7000), reported_after(2, 3500), ok(3)],
    );
    match env.comm.take_sent().as_slice() {
        [FromWorker::Done(done)] => {
            let delays: Vec<_> = done.iter().map(|d| (d.id, d.report_delay_us)).collect();
            assert_eq!(
                delays,
                [(TaskId(1), 7000), (TaskId(2), 3500), (TaskId(3), 0)]
            );
        }
        other => panic!("expected one Done, got {other:?}"),
    }
    env.comm.emptiness_check();
}

#[test]
fn ready_tasks_are_dealt_round_robin_in_priority_order() {
    let mut env = TestEnv::new(2);
    env.compute(vec![task(4, &[]), task(1, &[]), task(3, &[]), task(2, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1, 3])), (1, ids(&[2, 4]))]);
    env.comm.emptiness_check();
}

#[test]
fn executors_get_no_more_than_their_queue_depth() {
    let mut env = TestEnv::new(1);
    // Tasks of 1 s each: a queue of one.
    env.compute(vec![task(1, &[]), task(2, &[])]);
    let first = env.ran();
    env.results(
        0,
        first[0]
            .1
            .iter()
            .map(|id| TaskOutcome {
                duration_us: 1_000_000,
                ..ok(id.0)
            })
            .collect(),
    );
    env.comm.take_sent();
    env.compute((10..20).map(|i| task(i, &[])).collect());
    assert_eq!(env.ran(), [(0, ids(&[10]))], "one at a time now");
    env.comm.emptiness_check();
}

/// `count` result files as an executor writes them (a 100,000-byte frame, padded), in a
/// shared-memory folder the worker takes files over from for real.
fn results_in_files(env: &mut TestEnv, count: u64) -> Vec<PathBuf> {
    let shm = ShmDir::create("rankmesh-test").expect("a shared-memory folder");
    let written: Vec<PathBuf> = (1..=count)
        .map(|i| {
            let path = shm.path().join(format!("0.1-{i}"));
            std::fs::write(&path, vec![5u8; 100_032]).expect("written");
            path
        })
        .collect();
    env.comm.shm = Some(Arc::new(shm));
    written
}

/// Runs task `id` and finishes it with the result file at `path`.
fn finish_with_file(env: &mut TestEnv, id: u64, path: &Path) {
    env.compute(vec![task(id, &[])]);
    env.ran();
    let outcome = TaskOutcome {
        result: Ok(ObjectRef::Shm {
            path: path.display().to_string(),
            layout: vec![100_000],
        }),
        ..ok(id)
    };
    env.results(0, vec![outcome]);
    assert_eq!(env.done_ids(), ids(&[id]));
}

#[test]
fn a_large_result_is_taken_over_and_mapped_in_once_a_peer_reads_bytes() {
    let mut env = TestEnv::new(1);
    let written = results_in_files(&mut env, 2);
    finish_with_file(&mut env, 1, &written[0]);
    assert_eq!(env.comm.adopted, [written[0].clone()]);
    assert_eq!(
        env.comm.mapped_in, 0,
        "peers on this host link the file: its pages stay where the executor wrote them"
    );
    let stored = env.store.get(TaskId(1)).expect("stored");
    assert!(stored.is_shared() && stored.bytes().unwrap()[..100_000].iter().all(|&b| b == 5));
    let elsewhere = WorkerInfo {
        host: "node2".into(),
        ..peer(WorkerId(9))
    };
    env.scheduler(ToWorker::PeerAdded(Box::new(elsewhere)));
    finish_with_file(&mut env, 2, &written[1]);
    assert_eq!(
        env.comm.mapped_in, 1,
        "a peer on another host reads bytes: they are mapped in off the loop"
    );
    env.comm.emptiness_check();
}

#[test]
fn a_large_result_is_mapped_in_where_peers_on_its_host_read_bytes() {
    let mut env = TestEnv::read_as_bytes_on_its_host(1);
    let written = results_in_files(&mut env, 1);
    finish_with_file(&mut env, 1, &written[0]);
    assert_eq!(
        env.comm.mapped_in, 1,
        "its peers on this host do not link its files"
    );
    env.comm.emptiness_check();
}

#[test]
fn a_result_that_cannot_be_taken_over_fails_its_task() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[])]);
    env.ran();
    env.comm.unadoptable.push(PathBuf::from("/elsewhere/1"));
    let outcome = TaskOutcome {
        result: Ok(ObjectRef::Shm {
            path: "/elsewhere/1".into(),
            layout: vec![100_000],
        }),
        ..ok(1)
    };
    env.results(0, vec![outcome]);
    assert_eq!(env.failed(), [(TaskId(1), "StoreError".to_string())]);
    assert!(!env.store.contains(TaskId(1)));
    env.comm.emptiness_check();
}

#[test]
fn a_task_error_goes_to_the_scheduler_as_it_is() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[])]);
    env.ran();
    let error = ErrorInfo::runtime("ValueError", "bad value".into());
    let outcome = TaskOutcome {
        result: Err(error.clone()),
        ..ok(1)
    };
    env.results(0, vec![outcome]);
    assert_eq!(
        env.comm.take_sent(),
        [FromWorker::Failed {
            id: TaskId(1),
            error
        }]
    );
    env.comm.emptiness_check();
}

// ------------------------------------------------------------------ fetching

#[test]
fn missing_inputs_are_fetched_with_one_request_per_peer() {
    let mut env = TestEnv::new(1);
    let [a, b] = PEERS;
    env.compute(vec![
        task(10, &[(1, &[a]), (2, &[b])]),
        task(11, &[(3, &[a])]),
    ]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[1, 3])), (b, ids(&[2]))]);
    env.comm.emptiness_check();
}

#[test]
fn a_task_runs_once_all_its_inputs_arrived_and_the_copies_are_reported() {
    let mut env = TestEnv::new(1);
    let [a, b] = PEERS;
    env.compute(vec![task(10, &[(1, &[a]), (2, &[b])])]);
    env.comm.take_fetches();
    env.fetched(a, ids(&[1]), Ok(vec![(TaskId(1), Some(small(1)))]));
    assert!(env.ran().is_empty(), "input 2 is still on its way");
    assert_eq!(env.comm.take_sent(), [FromWorker::Replicated(ids(&[1]))]);
    env.fetched(b, ids(&[2]), Ok(vec![(TaskId(2), Some(small(2)))]));
    assert_eq!(env.ran(), [(0, ids(&[10]))]);
    assert_eq!(env.comm.take_sent(), [FromWorker::Replicated(ids(&[2]))]);
    assert_eq!(env.state.stats().fetched_objects, 2);
    let report = env.state.memory_report();
    assert_eq!(
        (report.fetched_bytes, report.transport),
        (128, DataTransport::Tcp)
    );
    env.comm.emptiness_check();
}

#[test]
fn a_fetch_reports_its_transfer() {
    let mut env = TestEnv::new(1);
    let [a, _] = PEERS;
    env.compute(vec![task(10, &[(1, &[a]), (2, &[a])])]);
    env.comm.take_fetches();
    let objects = vec![(TaskId(1), Some(small(1))), (TaskId(2), Some(small(2)))];
    env.fetched(a, ids(&[1, 2]), Ok(objects));
    let transfer = Transfer {
        from: a,
        bytes: 128,
        duration_us: 1000,
    };
    assert_eq!(env.comm.transfers, [transfer]);
}

#[test]
fn an_input_two_tasks_need_is_fetched_once() {
    let mut env = TestEnv::new(2);
    let [a, _] = PEERS;
    env.compute(vec![task(10, &[(1, &[a])])]);
    env.compute(vec![task(11, &[(1, &[a])])]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[1]))]);
    env.fetched(a, ids(&[1]), Ok(vec![(TaskId(1), Some(small(1)))]));
    assert_eq!(env.ran(), [(0, ids(&[10])), (1, ids(&[11]))]);
    env.comm.take_sent();
    env.comm.emptiness_check();
}

#[test]
fn a_failed_fetch_hands_every_task_waiting_for_it_back_to_the_scheduler() {
    let mut env = TestEnv::new(1);
    let [a, _] = PEERS;
    env.compute(vec![task(10, &[(1, &[a])]), task(11, &[(1, &[a])])]);
    env.comm.take_fetches();
    let error = TransportError::Mpi("connection reset".into());
    env.fetched(a, ids(&[1]), Err(error));
    let missing = |id| FromWorker::InputMissing {
        id: TaskId(id),
        input: TaskId(1),
        holders: vec![a],
    };
    assert_eq!(env.comm.take_sent(), [missing(10), missing(11)]);
    // The scheduler may send them again, to be fetched from elsewhere.
    env.compute(vec![task(10, &[(1, &[PEERS[1]])])]);
    assert_eq!(env.comm.take_fetches(), [(PEERS[1], ids(&[1]))]);
    assert!(env.ran().is_empty());
    env.comm.emptiness_check();
}

#[test]
fn an_input_its_peer_no_longer_holds_hands_its_task_back() {
    let mut env = TestEnv::new(1);
    let [a, _] = PEERS;
    env.compute(vec![task(10, &[(1, &[a]), (2, &[a])])]);
    env.comm.take_fetches();
    env.fetched(
        a,
        ids(&[1, 2]),
        Ok(vec![(TaskId(1), Some(small(1))), (TaskId(2), None)]),
    );
    let missing = FromWorker::InputMissing {
        id: TaskId(10),
        input: TaskId(2),
        holders: vec![a],
    };
    assert_eq!(
        env.comm.take_sent(),
        [missing, FromWorker::Replicated(ids(&[1]))]
    );
    assert!(env.ran().is_empty());
    env.comm.emptiness_check();
}

#[test]
fn an_input_on_no_known_worker_is_handed_back_at_once() {
    let mut env = TestEnv::new(1);
    env.scheduler(ToWorker::PeerRemoved(PEERS[1]));
    env.compute(vec![task(10, &[(1, &[PEERS[1]])])]);
    let missing = FromWorker::InputMissing {
        id: TaskId(10),
        input: TaskId(1),
        holders: vec![PEERS[1]],
    };
    assert_eq!(env.comm.take_sent(), [missing]);
    env.comm.emptiness_check();
}

#[test]
fn an_input_released_while_another_is_fetched_fails_the_task_when_it_would_run() {
    let mut env = TestEnv::new(1);
    let [a, _] = PEERS;
    env.store.insert(TaskId(1), small(1));
    env.compute(vec![task(10, &[(1, &[a]), (2, &[a])])]);
    env.comm.take_fetches();
    env.scheduler(ToWorker::Release(ids(&[1])));
    env.fetched(a, ids(&[2]), Ok(vec![(TaskId(2), Some(small(2)))]));
    let sent = env.comm.take_sent();
    assert!(
        matches!(
            sent.as_slice(),
            [FromWorker::Failed { id, error }, FromWorker::Replicated(_)]
                if *id == TaskId(10) && error.message.contains("released before it ran")
        ),
        "{sent:?}"
    );
    assert!(env.ran().is_empty());
    env.comm.emptiness_check();
}

#[test]
fn a_task_cancelled_while_its_input_is_fetched_never_runs() {
    let mut env = TestEnv::new(1);
    let [a, _] = PEERS;
    env.compute(vec![task(10, &[(1, &[a])])]);
    env.comm.take_fetches();
    env.scheduler(ToWorker::Cancel(ids(&[10])));
    env.fetched(a, ids(&[1]), Ok(vec![(TaskId(1), Some(small(1)))]));
    // The copy is reported (the scheduler then releases it), and nothing runs.
    assert_eq!(env.comm.take_sent(), [FromWorker::Replicated(ids(&[1]))]);
    assert!(env.ran().is_empty());
    env.comm.emptiness_check();
}

#[test]
fn a_peer_asking_for_an_object_being_released_gets_it_whole_or_not_at_all() {
    let mut env = TestEnv::new(1);
    env.store.insert(TaskId(1), small(9));
    // A data server is sending it: it holds the object.
    let being_sent = env.store.get(TaskId(1)).expect("stored");
    env.scheduler(ToWorker::Release(ids(&[1])));
    assert!(
        env.store.get(TaskId(1)).is_none(),
        "a new request finds nothing"
    );
    assert!(
        being_sent.bytes().unwrap().iter().all(|&b| b == 9),
        "the send in progress is intact"
    );
    env.comm.emptiness_check();
}

// ------------------------------------------------------------------ crashes

#[test]
fn a_crash_among_several_tasks_reruns_each_alone() {
    let mut env = TestEnv::new(2);
    env.compute(vec![task(1, &[]), task(2, &[]), task(3, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1, 3])), (1, ids(&[2]))]);
    env.died(0);
    assert!(
        env.ran().is_empty(),
        "its slot waits for the next generation"
    );
    env.ready(0, 2);
    // Each suspect runs alone on an idle slot.
    let runs = env.comm.take_runs();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].slot, runs[0].generation), (0, 2));
    assert_eq!(runs[0].tasks, ids(&[1]));
    env.results(0, vec![ok(1)]);
    assert_eq!(env.done_ids(), ids(&[1]));
    assert_eq!(env.ran(), [(0, ids(&[3]))], "the next suspect, alone");
    env.results(1, vec![ok(2)]);
    env.results(0, vec![ok(3)]);
    env.comm.take_sent();
    env.comm.emptiness_check();
}

#[test]
fn tasks_fail_with_the_reason_when_no_executor_can_start_and_run_once_one_does() {
    let mut env = TestEnv::new(2);
    let never_ready = |slot, failed_starts| ExecutorEvent::Died {
        slot,
        reason: "executor process (pid 7) exited with status 1 before connecting".into(),
        traceback: String::new(),
        failed_starts,
    };
    // Both executors die, and their replacements keep ending before they are ready.
    for slot in 0..2 {
        env.executor(never_ready(slot, 0));
    }
    env.compute(vec![task(1, &[])]);
    for failed_starts in 1..FAILED_STARTS_BEFORE_GIVING_UP {
        env.executor(never_ready(0, failed_starts));
        env.executor(never_ready(1, failed_starts));
    }
    env.comm.emptiness_check(); // still waiting: they may yet start
    env.executor(never_ready(0, FAILED_STARTS_BEFORE_GIVING_UP));
    env.comm.emptiness_check(); // the other slot may yet start
    env.executor(never_ready(1, FAILED_STARTS_BEFORE_GIVING_UP));
    let (id, error) = env.one_failure();
    assert_eq!(
        (id, error.type_name.as_str()),
        (TaskId(1), "ExecutorCannotStart")
    );
    assert!(error
        .message
        .contains("exited with status 1 before connecting"));
    // New tasks fail at once while none can start.
    env.compute(vec![task(2, &[])]);
    assert_eq!(
        env.failed(),
        [(TaskId(2), "ExecutorCannotStart".to_string())]
    );
    // One starts after all (the environment was mended): tasks run there again.
    env.ready(1, 9);
    env.compute(vec![task(3, &[])]);
    assert_eq!(env.ran(), [(1, ids(&[3]))]);
    env.results(1, vec![ok(3)]);
    assert_eq!(env.done_ids(), ids(&[3]));
    env.comm.emptiness_check();
}

#[test]
fn a_task_that_keeps_killing_its_executor_fails_after_the_limit() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[])]);
    for generation in 2..=3 {
        assert_eq!(env.ran(), [(0, ids(&[1]))]);
        env.died(0);
        env.ready(0, generation);
    }
    assert_eq!(env.ran(), [(0, ids(&[1]))]);
    env.died(0);
    let (id, error) = env.one_failure();
    assert_eq!(
        (id, error.type_name.as_str()),
        (TaskId(1), "ExecutorCrashed")
    );
    assert!(error.message.contains("died 3 times") && error.message.contains("signal 9"));
    env.ready(0, 4);
    env.comm.emptiness_check();
}

#[test]
fn a_new_executor_generation_gets_the_functions_again() {
    let mut env = TestEnv::new(1);
    let f = FuncId(42);
    env.scheduler(ToWorker::Functions(vec![FunctionBlob {
        id: f,
        bytes: Bytes::from_static(b"code"),
    }]));
    let uses_f = |id| ComputeTask {
        funcs: smallvec::smallvec![f],
        ..task(id, &[])
    };
    env.compute(vec![uses_f(1)]);
    let runs = env.comm.take_runs();
    assert_eq!(runs[0].functions, [f]);
    env.results(0, vec![ok(1)]);
    env.compute(vec![uses_f(2)]);
    assert!(env.comm.take_runs()[0].functions.is_empty(), "it has it");
    env.died(0);
    env.ready(0, 2);
    let runs = env.comm.take_runs();
    assert_eq!(
        (runs[0].generation, runs[0].functions.clone()),
        (2, vec![f])
    );
    env.comm.take_sent();
    env.comm.emptiness_check();
}

#[test]
fn released_functions_leave_the_executors_that_have_them() {
    let mut env = TestEnv::new(2);
    let (f, g) = (FuncId(1), FuncId(2));
    let blobs = [f, g].map(|id| FunctionBlob {
        id,
        bytes: Bytes::from_static(b"code"),
    });
    env.scheduler(ToWorker::Functions(blobs.to_vec()));
    env.compute(vec![ComputeTask {
        funcs: smallvec::smallvec![f],
        ..task(1, &[])
    }]);
    env.comm.take_runs();
    env.scheduler(ToWorker::ReleaseFunctions(vec![f, g]));
    assert_eq!(
        env.comm.released_functions.drain(..).collect::<Vec<_>>(),
        [(0, 1, vec![f])],
        "only slot 0 had f; nobody had g"
    );
    assert_eq!(env.state.take_freed_bytes(), 8);
    env.comm.emptiness_check();
}

// ------------------------------------------------------------------ cancelling

#[test]
fn a_task_cancelled_while_running_finishes_unreported() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[]), task(2, &[])]);
    env.ran();
    env.scheduler(ToWorker::Cancel(ids(&[1])));
    let wakes: Vec<_> = env.comm.wakes.drain(..).collect();
    env.results(0, vec![ok(1), ok(2)]);
    assert_eq!(env.done_ids(), ids(&[2]));
    assert!(!env.store.contains(TaskId(1)), "its result was dropped");
    // It ended within its grace: the reminder finds nothing to stop.
    for (_, wake) in wakes {
        env.state.woken(wake, &mut env.comm);
    }
    env.comm.emptiness_check();
}

#[test]
fn a_cancelled_task_still_running_after_its_grace_has_its_executor_restarted() {
    let mut env = TestEnv::new(2);
    env.compute(vec![task(1, &[]), task(2, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1])), (1, ids(&[2]))]);
    env.scheduler(ToWorker::Cancel(ids(&[2])));
    let wake = Wake::CancelGraceOver {
        slot: 1,
        generation: 1,
        task: TaskId(2),
    };
    assert_eq!(
        env.comm.wakes.drain(..).collect::<Vec<_>>(),
        [(CANCEL_GRACE, wake.clone())]
    );
    env.state.woken(wake, &mut env.comm);
    let restarts: Vec<_> = env.comm.restarts.drain(..).collect();
    assert!(
        matches!(restarts.as_slice(), [(1, 1, reason)] if reason.contains("cancelled")),
        "{restarts:?}"
    );
    // The restarted executor's death takes the cancelled task along, unblamed and unreported.
    env.died(1);
    env.executor(ExecutorEvent::Ready {
        slot: 1,
        generation: 2,
        pid: 101,
        memory: None,
    });
    env.compute(vec![task(3, &[])]);
    let ran: Vec<TaskId> = env.ran().into_iter().flat_map(|(_, ids)| ids).collect();
    assert_eq!(ran, ids(&[3]));
    assert!(
        env.comm.take_sent().is_empty(),
        "nothing failed: {:?}",
        env.comm.sent
    );
    env.comm.emptiness_check();
}

#[test]
fn a_task_cancelled_before_it_ran_is_forgotten() {
    let mut env = TestEnv::new(1);
    env.died(0); // nothing can run until the executor is back
    env.compute(vec![task(1, &[]), task(2, &[])]);
    env.scheduler(ToWorker::Cancel(ids(&[1])));
    env.ready(0, 2);
    assert_eq!(env.ran(), [(0, ids(&[2]))]);
    env.comm.emptiness_check();
}

#[test]
fn a_cancelled_task_lost_with_its_executor_is_not_retried() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[]), task(2, &[])]);
    env.ran();
    env.scheduler(ToWorker::Cancel(ids(&[1])));
    env.comm.wakes.clear();
    env.died(0);
    env.ready(0, 2);
    assert_eq!(env.ran(), [(0, ids(&[2]))], "only the live suspect reruns");
    env.comm.emptiness_check();
}

// ------------------------------------------------------------------ memory

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// With Dask's default fractions: target 6 MiB, spill 7, pause 8, terminate 9.5; a
/// transfer cap of 1 MiB.
const LIMIT: u64 = 10 * MIB;

fn limited() -> MemoryPolicy {
    MemoryPolicy {
        limit: LIMIT,
        thresholds: MemoryThresholds::default(),
    }
}

/// What the runtime measures every 50 ms: the worker's own memory, each executor's, and
/// its shared-memory files.
fn sample(worker_private: u64, executors: &[(usize, u64)], shared: u64) -> MemorySample {
    MemorySample {
        worker_private,
        executors: executors.to_vec(),
        shared,
        elapsed: Duration::from_millis(50),
    }
}

/// `task` whose inputs are each of `size` bytes.
fn task_sized(id: u64, inputs: &[(u64, &[WorkerId])], size: u64) -> ComputeTask {
    let mut compute = task(id, inputs);
    for input in &mut compute.inputs {
        input.size = size;
    }
    compute
}

/// A result of `size` bytes the executor sent inline (a small one).
fn inline_result(id: u64, size: u64) -> TaskOutcome {
    TaskOutcome {
        result: Ok(ObjectRef::Inline {
            data: Bytes::from(vec![1u8; size as usize]),
            layout: vec![size],
        }),
        ..ok(id)
    }
}

fn spilled_ids(batch: &[(TaskId, Arc<Object>)]) -> Vec<TaskId> {
    batch.iter().map(|(id, _)| *id).collect()
}

/// What a spill of `batch` comes back as when the disk is full.
fn disk_full(batch: Vec<(TaskId, Arc<Object>)>) -> Vec<SpillOutcome> {
    let outcome = |(id, object): (TaskId, Arc<Object>)| {
        let error = StoreError::Spill {
            path: PathBuf::from(format!("/local/rankmesh-spill-1-x/{id}")),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        (id, object, Err(error))
    };
    batch.into_iter().map(outcome).collect()
}

impl TestEnv {
    /// A result of `size` bytes in the worker's shared memory (as a large fetched one is).
    fn shm_object(&self, size: u64, fill: u8) -> Object {
        let shm = self
            .comm
            .shm
            .as_ref()
            .expect("a worker with a memory limit");
        let mut builder = shm.allocate(vec![size]).expect("shared memory");
        builder.buffer().fill(fill);
        let object = builder.finish();
        assert!(object.is_shared() && object.size() == size);
        object
    }

    /// Results `ids` of `size` bytes each in shared memory, stored (no event: the worker
    /// acts on them at the next one).
    fn hold(&self, ids: impl IntoIterator<Item = u64>, size: u64) {
        for id in ids {
            self.store
                .insert(TaskId(id), self.shm_object(size, id as u8));
        }
    }

    /// An event that changes nothing memory management sees: the worker acts on what
    /// its store holds, as after any event.
    fn any_event(&mut self) {
        self.scheduler(ToWorker::PeerAdded(Box::new(peer(WorkerId(4)))));
    }

    fn sampled(&mut self, sample: MemorySample) {
        self.state.memory_sampled(sample, &mut self.comm);
        self.state.sanity_check();
    }

    fn spill_finished(&mut self, outcomes: Vec<SpillOutcome>) {
        self.state.spill_finished(outcomes, &mut self.comm);
        self.state.sanity_check();
    }

    /// The one batch handed to spilling since the last look.
    fn spill_batch(&mut self) -> Vec<(TaskId, Arc<Object>)> {
        let batch = self.comm.spills.pop_front().expect("a batch to spill");
        assert!(self.comm.spills.is_empty(), "one batch only");
        batch
    }

    /// Writes `batch` to the spill folder, as the runtime does off the event loop.
    fn write(&self, batch: Vec<(TaskId, Arc<Object>)>) -> Vec<SpillOutcome> {
        let (dir, _) = self.spill.as_ref().expect("a worker with a memory limit");
        let outcome = |(id, object): (TaskId, Arc<Object>)| {
            let spilled = dir.spill(&object);
            (id, object, spilled)
        };
        batch.into_iter().map(outcome).collect()
    }

    /// The messages since the last look, which must all be memory reports.
    fn memory_reports(&mut self) -> Vec<WorkerMemory> {
        let reports = self.comm.take_sent().into_iter().map(|msg| match msg {
            FromWorker::Memory(report) => report,
            other => panic!("expected a memory report, got {other:?}"),
        });
        reports.collect()
    }

    /// The one memory report since the last look.
    fn memory_report(&mut self) -> WorkerMemory {
        match self.memory_reports().as_slice() {
            [report] => report.clone(),
            other => panic!("expected one memory report, got {other:?}"),
        }
    }

    /// Tasks failed since the last look, sorted, with their error.
    fn failed_with(&mut self) -> Vec<(TaskId, ErrorInfo)> {
        let mut failed: Vec<_> = (self.comm.take_sent().into_iter())
            .map(|msg| match msg {
                FromWorker::Failed { id, error } => (id, error),
                other => panic!("expected Failed, got {other:?}"),
            })
            .collect();
        failed.sort_by_key(|(id, _)| *id);
        failed
    }
}

#[test]
fn above_the_target_the_least_recently_used_idle_results_are_spilled() {
    let mut env = TestEnv::with_memory(1, limited());
    env.hold(1..=2, MIB);
    // 2 is read by a running task, 1 is being sent to a peer: both busy.
    env.compute(vec![task(21, &[(2, &PEERS)])]);
    assert_eq!(env.ran(), [(0, ids(&[21]))]);
    let being_sent = env.store.get(TaskId(1)).expect("stored");
    // 8 MiB: 2 over the target. 2 and 1 are the least recently used, then 5 and 3.
    env.hold(3..=8, MIB);
    for id in [5, 3, 6, 4, 7, 8] {
        env.store.get(TaskId(id));
    }
    env.any_event();
    let batch = env.spill_batch();
    assert_eq!(
        spilled_ids(&batch),
        ids(&[5, 3]),
        "idle ones, least recently used first: not 2 (a task's input) nor 1 (being sent)"
    );
    assert_eq!(env.store.bytes().in_memory, 8 * MIB, "until written");
    env.any_event();
    assert!(env.comm.spills.is_empty(), "asked for once");
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    assert_eq!(
        env.store.bytes(),
        StoreBytes {
            in_memory: 6 * MIB,
            on_disk: 2 * MIB,
            unspilled: 0
        }
    );
    let stats = env.state.stats();
    assert_eq!((stats.spilled_objects, stats.spilled_bytes), (2, 2 * MIB));
    let report = env.state.memory_report();
    assert_eq!(
        (
            report.managed_bytes,
            report.spilled_bytes,
            report.spilled_total
        ),
        (6 * MIB, 2 * MIB, 2 * MIB)
    );
    let spilled = env.store.get(TaskId(5)).expect("still there");
    assert!(spilled.is_spilled() && spilled.read().unwrap().iter().all(|&b| b == 5));
    assert!(being_sent.is_shared(), "the busy ones stay in memory");
    assert!(env.store.get(TaskId(2)).is_some_and(|o| o.is_shared()));
    assert_eq!(env.release_notices(), [(0, 1)], "files went");
    env.comm.emptiness_check();
}

impl TestEnv {
    /// A worker with a memory limit holding results 1 to 8 of a MiB each, 2 MiB over its
    /// target, that spilled 1 and 2.
    fn with_1_and_2_spilled() -> TestEnv {
        let mut env = TestEnv::with_memory(1, limited());
        env.hold(1..=8, MIB);
        env.any_event();
        let batch = env.spill_batch();
        assert_eq!(spilled_ids(&batch), ids(&[1, 2]));
        let outcomes = env.write(batch);
        env.spill_finished(outcomes);
        env
    }
}

#[test]
fn spilled_inputs_are_read_ahead_as_their_task_goes_to_its_executor() {
    let mut env = TestEnv::with_1_and_2_spilled();
    env.compute(vec![task(21, &[(1, &PEERS), (3, &PEERS)])]);
    assert_eq!(env.ran(), [(0, ids(&[21]))]);
    let read_ahead: Vec<_> = env.comm.read_ahead.drain(..).collect();
    let spilled = env.store.get(TaskId(1)).expect("stored");
    assert_eq!(
        read_ahead.len(),
        1,
        "the spilled input, not the one in memory"
    );
    assert!(Arc::ptr_eq(&read_ahead[0], &spilled));
    assert_eq!(
        env.release_notices(),
        [(0, 1)],
        "the spilled results' files went"
    );
    env.comm.emptiness_check();
}

#[test]
fn spilled_inputs_of_the_tasks_next_in_line_are_read_ahead_once() {
    let mut env = TestEnv::with_1_and_2_spilled();
    env.scheduler(ToWorker::Release(ids(&[5, 6, 7, 8]))); // room for the tasks below
    env.release_notices();
    // Until a result shows what tasks make here, none queues behind another: 22 and 23
    // wait for 21, and their spilled inputs are read meanwhile.
    env.compute(vec![
        task(21, &[(3, &PEERS)]),
        task(22, &[(1, &PEERS)]),
        task(23, &[(2, &PEERS)]),
    ]);
    assert_eq!(env.ran(), [(0, ids(&[21]))]);
    let read_ahead: Vec<_> = env.comm.read_ahead.drain(..).collect();
    let spilled = [1, 2].map(|id| env.store.peek(TaskId(id)).expect("stored"));
    assert_eq!(read_ahead.len(), 2, "the spilled inputs of 22 and 23");
    for object in &spilled {
        assert!(read_ahead.iter().any(|o| Arc::ptr_eq(o, object)));
    }
    assert_eq!(
        env.store.bytes().unspilled,
        0,
        "not read by a task yet, nor their use counted"
    );
    env.results(0, vec![inline_result(21, 128)]);
    assert_eq!(env.done_ids(), ids(&[21]));
    assert_eq!(env.ran(), [(0, ids(&[22, 23]))]);
    assert!(env.comm.read_ahead.is_empty(), "asked for once");
    env.comm.emptiness_check();
}

#[test]
fn results_no_task_reads_are_spilled_first_and_inputs_of_waiting_tasks_last() {
    let mut env = TestEnv::with_memory(1, limited());
    let [a, _] = PEERS;
    // Runs a task making a result of 1 MiB here (2 as it is written out): one that would
    // take the worker over its 6 MiB target waits for results to be spilled first; those
    // are returned.
    let run = |env: &mut TestEnv, compute: ComputeTask| {
        let id = compute.id.0;
        env.compute(vec![compute]);
        let mut spilled = Vec::new();
        if let Some(batch) = env.comm.spills.pop_front() {
            spilled = spilled_ids(&batch);
            let outcomes = env.write(batch);
            env.spill_finished(outcomes);
        }
        assert_eq!(env.ran(), [(0, ids(&[id]))]);
        env.results(0, vec![inline_result(id, MIB)]);
        env.comm.take_sent();
        spilled
    };
    let make = |env: &mut TestEnv, id: u64, read_by_tasks: bool| {
        let compute = ComputeTask {
            read_by_tasks,
            ..task(id, &[])
        };
        run(env, compute)
    };
    make(&mut env, 1, true);
    make(&mut env, 2, false); // only a client wants it (a persisted chunk)
    make(&mut env, 3, true); // task 20 waits here for it and another input
    env.compute(vec![task_sized(20, &[(3, &[]), (99, &[a])], 0)]);
    assert_eq!(env.comm.take_fetches().len(), 1);
    for id in 4..=5 {
        assert!(make(&mut env, id, true).is_empty(), "up to the target");
    }
    let spilled: Vec<TaskId> = (6..=11).flat_map(|id| make(&mut env, id, true)).collect();
    assert_eq!(
        spilled,
        ids(&[2, 1, 4, 5, 6, 7]),
        "the unread one, then the least recently used, not 3 (a waiting task's input)"
    );
    // 12 is made unread, then a later task reads it: from then on it is spilled by last use.
    assert_eq!(make(&mut env, 12, false), ids(&[8]));
    assert_eq!(run(&mut env, task(13, &[(12, &[])])), ids(&[9]));
    assert_eq!(
        make(&mut env, 14, true),
        ids(&[10]),
        "least recently used, not 12"
    );
    env.scheduler(ToWorker::Release(ids(&[2])));
    env.comm.emptiness_check();
}

#[test]
fn executors_hear_when_results_in_files_are_released() {
    let mut env = TestEnv::with_memory(2, limited());
    env.store.insert(TaskId(1), small(1));
    env.scheduler(ToWorker::Release(ids(&[1])));
    assert!(
        env.release_notices().is_empty(),
        "a result on the heap is mapped by no one"
    );
    env.hold(2..=3, MIB);
    env.died(1);
    env.scheduler(ToWorker::Release(ids(&[2, 3])));
    assert_eq!(
        env.release_notices(),
        [(0, 1)],
        "one notice for the event, to each executor that is up"
    );
    env.comm.emptiness_check();
}

#[test]
fn a_result_released_while_it_is_spilled_is_not_counted_as_spilled() {
    let mut env = TestEnv::with_memory(1, limited());
    env.hold(1..=7, MIB); // 1 MiB over the target
    env.any_event();
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[1]));
    env.scheduler(ToWorker::Release(ids(&[1])));
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    assert!(!env.store.contains(TaskId(1)));
    assert_eq!(
        env.store.bytes(),
        StoreBytes {
            in_memory: 6 * MIB,
            on_disk: 0,
            unspilled: 0
        }
    );
    assert_eq!(env.state.stats().spilled_objects, 0);
    let (dir, _) = env.spill.as_ref().expect("a spill folder");
    let files = std::fs::read_dir(dir.path()).expect("readable").count();
    assert_eq!(files, 0, "its copy on disk is removed");
    assert_eq!(env.release_notices(), [(0, 1)], "files went");
    env.comm.emptiness_check();
}

#[test]
fn results_being_spilled_count_in_full_against_the_excess() {
    let mut env = TestEnv::with_memory(1, limited());
    let [a, _] = PEERS;
    env.compute(vec![task_sized(11, &[(9, &[a])], 32 * KIB)]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[9]))]);
    env.hold(1..=6, MIB); // at the target

    // The input on its way puts a task 32 KiB over: 1 (1 MiB) goes to disk for it.
    env.compute(vec![task(10, &[])]);
    assert!(env.ran().is_empty());
    let handed: Vec<_> = env.comm.spills.drain(..).flatten().collect();
    assert_eq!(spilled_ids(&handed), ids(&[1]), "a MiB to disk for 32 KiB");
    // The input comes: the MiB on its way covers it, nothing more is spilled.
    let input = Object::inline(Bytes::from(vec![9u8; 32 * KIB as usize]), vec![32 * KIB]);
    env.fetched(a, ids(&[9]), Ok(vec![(TaskId(9), input.ok())]));
    env.comm.take_sent();
    assert!(env.comm.spills.is_empty() && env.ran().is_empty());
    let outcomes = env.write(handed);
    env.spill_finished(outcomes);
    assert_eq!(env.ran(), [(0, ids(&[10]))]);
    // A small result: 64 KiB of results over 5 MiB, not a MiB less; under the target.
    env.results(0, vec![inline_result(10, 32 * KIB)]);
    assert_eq!(env.store.bytes().in_memory, 5 * MIB + 64 * KIB);
    assert!(env.comm.spills.is_empty());
    assert_eq!(env.ran(), [(0, ids(&[11]))]);
}

#[test]
fn over_the_spill_threshold_memory_kept_in_reserve_is_given_back() {
    let mut env = TestEnv::with_memory(1, limited());
    env.sampled(sample(MIB, &[(0, 5 * MIB)], 0)); // 6 MiB
    assert_eq!(env.comm.reserves_dropped, 0);
    assert!(env.comm.executor_reserves_dropped.is_empty());
    env.sampled(sample(MIB, &[(0, 6 * MIB + 512 * KIB)], 0)); // 7.5 MiB
    assert_eq!(env.comm.reserves_dropped, 1);
    let generation = env.state.slots[0].generation;
    assert!(generation > 0, "the executor is up");
    assert_eq!(
        env.comm
            .executor_reserves_dropped
            .drain(..)
            .collect::<Vec<_>>(),
        [(0, generation)],
        "its executor gives back its kept heap"
    );
    env.comm.emptiness_check();
}

#[test]
fn above_pause_no_task_runs_and_no_fetch_starts_until_memory_is_back_under() {
    let mut env = TestEnv::with_memory(1, limited());
    // 9 MiB: over pause (8 MiB), under terminate; all of it the executor's.
    env.sampled(sample(MIB, &[(0, 8 * MIB)], 0));
    assert_eq!(
        env.memory_report(),
        WorkerMemory {
            paused: true,
            limit: LIMIT,
            process_bytes: 9 * MIB,
            ..WorkerMemory::default()
        }
    );
    env.compute(vec![task(1, &[]), task(2, &[(5, &[PEERS[0]])])]);
    assert!(env.ran().is_empty(), "no new task runs");
    assert!(env.comm.take_fetches().is_empty(), "nothing more comes in");
    env.sampled(sample(MIB, &[(0, 8 * MIB)], 0));
    env.comm.emptiness_check(); // told once
                                // 2 MiB: resumed.
    env.sampled(sample(MIB, &[(0, MIB)], 0));
    assert_eq!(
        env.memory_report(),
        WorkerMemory {
            paused: false,
            limit: LIMIT,
            process_bytes: 2 * MIB,
            paused_seconds: 0.1, // the two samples after the one that paused it
            ..WorkerMemory::default()
        }
    );
    assert_eq!(env.comm.take_fetches(), [(PEERS[0], ids(&[5]))]);
    assert_eq!(env.ran(), [(0, ids(&[1]))]);
    env.comm.emptiness_check();
}

impl TestEnv {
    /// A worker of one executor running task 10, paused at 9 MiB (6 of them results,
    /// 1..=6), and the batch of 3 MiB of results it spills to come down.
    fn paused_spilling() -> (TestEnv, Vec<(TaskId, Arc<Object>)>) {
        let mut env = TestEnv::with_memory(1, limited());
        env.hold(1..=6, MIB);
        env.compute(vec![task(10, &[])]);
        assert_eq!(env.ran(), [(0, ids(&[10]))]);
        env.sampled(sample(MIB, &[(0, 2 * MIB)], 6 * MIB));
        assert!(env.memory_report().paused);
        let batch = env.spill_batch();
        assert_eq!(spilled_ids(&batch), ids(&[1, 2, 3]));
        (env, batch)
    }
}

#[test]
fn a_spill_failing_while_paused_fails_the_waiting_tasks_and_unpauses_the_worker_for_the_scheduler()
{
    let (mut env, batch) = TestEnv::paused_spilling();
    env.compute(vec![task(11, &[]), task(12, &[(20, &[PEERS[0]])])]);
    assert!(env.ran().is_empty() && env.comm.take_fetches().is_empty());
    env.comm.emptiness_check(); // they wait for memory to come down
                                // The disk is full: memory will not come down.
    env.spill_finished(disk_full(batch));
    let sent = env.comm.take_sent();
    assert!(
        matches!(sent.first(), Some(FromWorker::Memory(report)) if !report.paused),
        "the scheduler sees it unpaused, so that its work comes here and fails: {sent:?}"
    );
    env.comm.sent.extend(sent.into_iter().skip(1));
    let failed = env.failed_with();
    assert_eq!(
        failed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        ids(&[11, 12]),
        "the waiting tasks fail; the running one finishes"
    );
    for (_, error) in &failed {
        assert_eq!(error.type_name, "SpillError");
        assert!(
            error.message.contains("over its pause threshold")
                && error.message.contains("cannot spill results to disk")
                && error.message.contains("No space left on device"),
            "{}",
            error.message
        );
    }
    assert_eq!(env.state.stats().spill_failures, 3);
    assert_eq!(env.store.bytes().in_memory, 6 * MIB, "kept in memory");
    // Work the scheduler sends now fails the same way, at once.
    env.compute(vec![task(13, &[])]);
    let failed = env.failed_with();
    assert!(
        matches!(failed.as_slice(), [(id, e)] if *id == TaskId(13) && e.type_name == "SpillError"),
        "{failed:?}"
    );
    env.results(0, vec![ok(10)]);
    assert_eq!(env.done_ids(), ids(&[10]));
    assert!(env.ran().is_empty() && env.comm.take_fetches().is_empty());
    env.comm.emptiness_check();
}

#[test]
fn a_spill_failing_for_results_released_meanwhile_says_nothing_about_the_disk() {
    let (mut env, batch) = TestEnv::paused_spilling();
    env.compute(vec![task(11, &[])]);
    assert!(env.ran().is_empty(), "11 waits for memory to come down");
    // Released while being written (an executor keeping them may drop their frames
    // under the spill, which then fails reading them): the writes fail.
    env.scheduler(ToWorker::Release(ids(&[1, 2, 3])));
    let efault = |(id, object): (TaskId, Arc<Object>)| {
        let error = StoreError::Spill {
            path: PathBuf::from(format!("/local/rankmesh-spill-1-x/{id}")),
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        };
        (id, object, Err(error))
    };
    env.spill_finished(batch.into_iter().map(efault).collect());
    assert_eq!(env.state.stats().spill_failures, 0);
    assert!(env.failed_with().is_empty(), "no task fails for it");
    env.sampled(sample(MIB, &[(0, 2 * MIB)], 3 * MIB));
    assert!(
        !env.memory_report().paused,
        "and memory came down with the release"
    );
}

#[test]
fn after_a_failed_spill_spilling_waits_a_second_of_samples_then_resumes_and_repauses() {
    let mut env = TestEnv::with_memory(1, limited());
    env.hold(1..=6, MIB);
    let paused = sample(MIB, &[(0, 2 * MIB)], 6 * MIB); // 9 MiB
    env.sampled(paused.clone());
    assert!(env.memory_report().paused);
    let batch = env.spill_batch();
    env.spill_finished(disk_full(batch));
    assert!(!env.memory_report().paused);
    // Each sample asks for 3 MiB spilled: none is tried for 19 samples...
    for _ in 1..20 {
        env.sampled(paused.clone());
        env.comm.emptiness_check();
    }
    // ... and the 20th (a second at 50 ms) tries again, and reports as every 20th does.
    env.sampled(paused.clone());
    assert!(!env.memory_report().paused, "the spill error lasts");
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[1, 2, 3]));
    // The disk has room again: paused as the scheduler sees it, and tasks wait again.
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    assert!(env.memory_report().paused);
    env.compute(vec![task(1, &[])]);
    assert!(env.ran().is_empty());
    assert_eq!(env.release_notices(), [(0, 1)], "files went");
    env.comm.emptiness_check();
}

#[test]
fn above_terminate_the_executor_holding_the_most_is_restarted() {
    let mut env = TestEnv::with_memory(2, limited());
    // 10 MiB, no result among it: only a restart brings it under 9.5 MiB.
    env.sampled(sample(MIB, &[(0, 2 * MIB), (1, 7 * MIB)], 0));
    let restarts: Vec<_> = env.comm.restarts.drain(..).collect();
    assert!(
        matches!(restarts.as_slice(), [(1, 1, reason)] if reason.contains("terminate threshold")),
        "{restarts:?}"
    );
    assert_eq!(env.state.executors_restarted(), 1);
    assert!(env.memory_report().paused);
    env.comm.emptiness_check();
}

#[test]
fn above_terminate_results_are_spilled_rather_than_an_executor_restarted() {
    let mut env = TestEnv::with_memory(1, limited());
    env.hold(1..=8, MIB);
    // 10 MiB, 8 of them results: spilling them does it.
    env.sampled(sample(512 * KIB, &[(0, MIB + 512 * KIB)], 8 * MIB));
    assert!(env.comm.restarts.is_empty());
    assert_eq!(env.state.executors_restarted(), 0);
    assert_eq!(
        spilled_ids(&env.spill_batch()),
        ids(&[1, 2, 3, 4]),
        "down to the target"
    );
    assert!(env.memory_report().paused);
    env.comm.emptiness_check();
}

#[test]
fn above_terminate_no_executor_is_restarted_when_that_would_not_bring_memory_under_it() {
    let mut env = TestEnv::with_memory(2, limited());
    // 10.25 MiB, 9.75 of them the worker's own: no restart gets it under 9.5 MiB.
    let worker = 9 * MIB + 768 * KIB;
    env.sampled(sample(worker, &[(0, 256 * KIB), (1, 256 * KIB)], 0));
    assert!(env.comm.restarts.is_empty());
    assert_eq!(env.state.executors_restarted(), 0);
    assert!(env.memory_report().paused);
    env.comm.emptiness_check();
}

#[test]
fn fetches_beyond_the_transfer_cap_wait_for_earlier_ones_to_finish() {
    let mut env = TestEnv::with_memory(1, limited());
    let [a, _] = PEERS;
    // Four inputs of 400 KiB from one peer: two requests of 800 KiB under the 1 MiB cap,
    // one on its way at a time.
    let inputs: [(u64, &[WorkerId]); 4] = [(1, &[a]), (2, &[a]), (3, &[a]), (4, &[a])];
    env.compute(vec![task_sized(10, &inputs, 400 * KIB)]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[1, 2]))]);
    let fetched = |ids: &[u64]| Ok(ids.iter().map(|&id| (TaskId(id), Some(small(1)))).collect());
    env.fetched(a, ids(&[1, 2]), fetched(&[1, 2]));
    assert_eq!(env.comm.take_sent(), [FromWorker::Replicated(ids(&[1, 2]))]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[3, 4]))]);
    assert!(env.ran().is_empty());
    env.fetched(a, ids(&[3, 4]), fetched(&[3, 4]));
    assert_eq!(env.comm.take_sent(), [FromWorker::Replicated(ids(&[3, 4]))]);
    assert_eq!(env.ran(), [(0, ids(&[10]))]);
    env.comm.emptiness_check();
}

#[test]
fn a_fetch_larger_than_the_transfer_cap_starts_when_nothing_else_is_on_its_way() {
    let mut env = TestEnv::with_memory(1, limited());
    let [a, b] = PEERS;
    env.compute(vec![task_sized(10, &[(1, &[a])], 512 * KIB)]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[1]))]);
    env.compute(vec![task_sized(11, &[(2, &[b])], 3 * MIB)]);
    assert!(
        env.comm.take_fetches().is_empty(),
        "over the cap with 1 on its way"
    );
    env.fetched(a, ids(&[1]), Ok(vec![(TaskId(1), Some(small(1)))]));
    assert_eq!(env.comm.take_fetches(), [(b, ids(&[2]))], "alone");
    env.comm.take_sent();
    env.ran();
    env.comm.emptiness_check();
}

#[test]
fn a_quiet_worker_is_one_with_nothing_under_way() {
    let mut env = TestEnv::with_memory(1, limited());
    assert!(env.state.is_quiet(), "up, with nothing to do");
    env.compute(vec![task(1, &[])]);
    assert!(!env.state.is_quiet(), "a task to run");
    assert_eq!(env.ran(), [(0, ids(&[1]))]);
    env.results(0, vec![ok(1)]);
    env.comm.take_sent();
    assert!(env.state.is_quiet(), "its result is held, nothing runs");
    env.died(0);
    assert!(!env.state.is_quiet(), "its executor restarting");
    env.ready(0, 2);
    assert!(env.state.is_quiet(), "up again");
    env.compute(vec![task(2, &[(9, &[WorkerId(2)])])]);
    assert!(!env.state.is_quiet(), "an input on its way");
    assert_eq!(env.comm.take_fetches(), [(WorkerId(2), ids(&[9]))]);
}

#[test]
fn a_quiet_worker_s_slower_samples_each_bring_a_report() {
    let mut env = TestEnv::with_memory(1, limited());
    let quiet = MemorySample {
        elapsed: Duration::from_secs(1),
        ..sample(512 * KIB, &[], 0)
    };
    for _ in 0..3 {
        env.sampled(quiet.clone());
        assert!(!env.memory_report().paused);
    }
    env.comm.emptiness_check();
}

#[test]
fn memory_goes_to_the_scheduler_every_twentieth_sample_and_after_a_spill_with_the_next() {
    let mut env = TestEnv::with_memory(1, limited());
    let calm = sample(512 * KIB, &[], 5 * MIB);
    for _ in 1..20 {
        env.sampled(calm.clone());
        env.comm.emptiness_check();
    }
    env.sampled(calm.clone());
    assert_eq!(env.memory_report().spilled_total, 0, "the 20th sample");
    env.hold(1..=7, MIB);
    // 7.5 MiB: over the spill threshold, down to the target (2 of 1 MiB for 1.5 MiB).
    env.sampled(sample(512 * KIB, &[], 7 * MIB));
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[1, 2]));
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    env.store.get(TaskId(1)).expect("a peer reads it back");
    assert_eq!(
        env.release_notices(),
        [(0, 1)],
        "their files in memory went"
    );
    env.comm.emptiness_check();
    assert!(
        !env.state.is_quiet(),
        "its report is due with the next sample"
    );
    env.sampled(calm.clone());
    assert!(env.state.is_quiet());
    let expected = WorkerMemory {
        paused: false,
        limit: LIMIT,
        process_bytes: 5 * MIB + 512 * KIB,
        managed_bytes: 5 * MIB,
        spilled_bytes: 2 * MIB,
        spilled_total: 2 * MIB,
        unspilled_total: MIB,
        paused_seconds: 0.0,
        fetched_bytes: 0,
        transport: DataTransport::Tcp,
    };
    assert_eq!(env.memory_report(), expected, "the sample after the spill");
    for _ in 1..20 {
        env.sampled(calm.clone());
        env.comm.emptiness_check();
    }
    env.sampled(calm);
    assert_eq!(env.memory_report(), expected, "and the next 20th");
    env.comm.emptiness_check();
}

#[test]
fn a_dead_executors_leftovers_are_cleared_once_it_is_down() {
    let mut env = TestEnv::new(2);
    env.died(1);
    assert_eq!(env.comm.cleared.drain(..).collect::<Vec<_>>(), [(1, 1)]);
    env.ready(1, 2);
    env.died(1);
    assert_eq!(env.comm.cleared.drain(..).collect::<Vec<_>>(), [(1, 2)]);
    env.died(1); // reported twice: nothing left of a generation to clear
    assert!(env.comm.cleared.is_empty());
    env.comm.emptiness_check();
}

impl TestEnv {
    /// Runs a first task making a result of `size` bytes, then has it released: the
    /// worker now expects tasks to make results of about that size.
    fn learn_result_size(&mut self, id: u64, size: u64) {
        self.compute(vec![task(id, &[])]);
        assert_eq!(self.ran(), [(0, ids(&[id]))]);
        self.results(0, vec![inline_result(id, size)]);
        assert_eq!(self.done_ids(), ids(&[id]));
        // A result over the target goes to disk (heap results too) before it is released.
        while let Some(batch) = self.comm.spills.pop_front() {
            let outcomes = self.write(batch);
            self.spill_finished(outcomes);
        }
        self.scheduler(ToWorker::Release(ids(&[id])));
    }
}

#[test]
fn a_task_waits_until_results_are_spilled_to_make_room_for_it() {
    let mut env = TestEnv::with_memory(1, limited());
    env.learn_result_size(10, MIB);
    env.hold(1..=6, MIB); // at the target: nothing spilled for the results alone
    env.compute(vec![task(11, &[])]);
    assert!(
        env.ran().is_empty(),
        "6 MiB of results and 1 more expected (twice, written out): over 6"
    );
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[1, 2]), "the least recently used");
    env.any_event();
    assert!(
        env.ran().is_empty() && env.comm.spills.is_empty(),
        "asked once"
    );
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    assert_eq!(env.ran(), [(0, ids(&[11]))]);
}

#[test]
fn a_result_written_out_counts_twice_against_the_memory_target() {
    // A 6 MiB target, 3 MiB of results and a task expected to make 2 MiB. An executor
    // that keeps its results adds 2 MiB; one that writes them into files holds the value
    // and its file at once as the task ends: 4 MiB, over the target.
    let setup = |env: &mut TestEnv| {
        env.learn_result_size(10, 2 * MIB);
        env.hold(1..=3, MIB);
        env.compute(vec![task(11, &[])]);
    };
    let mut keeping = TestEnv::with_memory(1, limited());
    keeping.readable_executor_replaces(0, 2);
    setup(&mut keeping);
    assert_eq!(keeping.ran(), [(0, ids(&[11]))]);
    assert!(keeping.comm.spills.is_empty());

    let mut writing = TestEnv::with_memory(1, limited());
    setup(&mut writing);
    assert!(writing.ran().is_empty(), "it waits for room");
    assert_eq!(spilled_ids(&writing.spill_batch()), ids(&[1]));

    // At the target the worker asks its executors to stop keeping results.
    let mut stopped = TestEnv::with_memory(1, limited());
    stopped.readable_executor_replaces(0, 2);
    stopped.sampled(sample(0, &[(0, 6 * MIB)], 0));
    assert_eq!(stopped.comm.holding.back(), Some(&(0, 2, false)));
    setup(&mut stopped);
    assert!(stopped.ran().is_empty(), "it waits for room");
    assert_eq!(spilled_ids(&stopped.spill_batch()), ids(&[1]));
}

#[test]
fn a_task_larger_than_the_target_runs_alone_once_nothing_can_make_room() {
    let mut env = TestEnv::with_memory(1, limited());
    // 4 MiB results, written out: 8 MiB in memory as a task ends.
    env.learn_result_size(10, 4 * MIB);
    env.hold(1..=2, MIB);
    env.compute(vec![task(11, &[]), task(12, &[])]);
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[1, 2]), "everything, for 8 MiB");
    assert!(env.ran().is_empty());
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    // Nothing left to spill and nothing running: it starts, though over the target; the
    // next waits for it.
    assert_eq!(env.ran(), [(0, ids(&[11]))]);
    env.results(0, vec![ok(11)]);
    assert_eq!(env.done_ids(), ids(&[11]));
    assert_eq!(env.ran(), [(0, ids(&[12]))]);
}

#[test]
fn until_a_result_shows_their_size_tasks_do_not_queue_behind_one_another() {
    let mut env = TestEnv::with_memory(2, limited());
    env.compute(vec![task(10, &[]), task(11, &[]), task(12, &[])]);
    // One per idle executor (a long task, or one waiting for tasks it submitted, must
    // not hold back the others); none queued behind a running one.
    assert_eq!(env.ran(), [(0, ids(&[10])), (1, ids(&[11]))]);
    env.results(0, vec![inline_result(10, KIB)]);
    assert_eq!(env.done_ids(), ids(&[10]));
    assert_eq!(env.ran(), [(0, ids(&[12]))]);
    // Without a limit nothing waits.
    let mut unlimited = TestEnv::new(1);
    unlimited.compute(vec![task(10, &[]), task(11, &[])]);
    assert_eq!(unlimited.ran(), [(0, ids(&[10, 11]))]);
}

#[test]
fn an_input_fetch_waits_for_room_while_a_task_runs() {
    let mut env = TestEnv::with_memory(1, limited());
    let [a, _] = PEERS;
    env.learn_result_size(10, KIB);
    env.hold(1..=5, MIB);
    env.compute(vec![task(11, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[11]))]);
    // 5 MiB of results, a running task and a 2 MiB input: 1 MiB over the target.
    env.compute(vec![task_sized(12, &[(9, &[a])], 2 * MIB)]);
    assert!(env.comm.take_fetches().is_empty(), "it waits for room");
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[1, 2]));
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[9]))]);
}

#[test]
fn a_task_waits_for_room_while_an_input_is_on_its_way() {
    let mut env = TestEnv::with_memory(1, limited());
    let [a, _] = PEERS;
    env.learn_result_size(10, 4 * MIB);
    // The fetch fits (3 of a 6 MiB target); a task making 4 MiB beside it does not, and
    // nothing can be spilled for it until the input is stored.
    env.compute(vec![task_sized(12, &[(9, &[a])], 3 * MIB)]);
    assert_eq!(env.comm.take_fetches(), [(a, ids(&[9]))]);
    env.compute(vec![task(11, &[])]);
    assert!(env.ran().is_empty(), "it waits for the fetch");
    assert!(env.comm.spills.is_empty(), "nothing in memory to spill");
    let input = Object::inline(Bytes::from(vec![9; 3 * MIB as usize]), vec![3 * MIB])
        .expect("a valid layout");
    env.fetched(a, ids(&[9]), Ok(vec![(TaskId(9), Some(input))]));
    env.comm.take_sent();
    // Stored, the input can go to disk for the task that came first.
    let batch = env.spill_batch();
    assert_eq!(spilled_ids(&batch), ids(&[9]));
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    assert_eq!(env.ran(), [(0, ids(&[11]))]);
}

// ------------------------------------------------------------------ plugins

#[test]
fn plugins_reach_every_executor_up_and_every_one_that_starts_later() {
    let mut env = TestEnv::new(2);
    let plugin = |name: &str| Plugin {
        name: name.into(),
        pickled: Bytes::from(name.as_bytes().to_vec()),
    };
    env.scheduler(ToWorker::Plugins(vec![plugin("a")]));
    let sent: Vec<_> = env.comm.plugins.drain(..).collect();
    assert_eq!(
        sent,
        [
            (0, 1, vec![plugin("a")], vec![]),
            (1, 1, vec![plugin("a")], vec![])
        ]
    );
    env.scheduler(ToWorker::Plugins(vec![plugin("b")]));
    env.comm.plugins.clear();
    // A restarted executor sets up all of them, before any task.
    env.died(1);
    env.executor(ExecutorEvent::Ready {
        slot: 1,
        generation: 2,
        pid: 101,
        memory: None,
    });
    let sent: Vec<_> = env.comm.plugins.drain(..).collect();
    assert_eq!(sent, [(1, 2, vec![plugin("a"), plugin("b")], vec![])]);
    env.scheduler(ToWorker::UnregisterPlugin("a".into()));
    let sent: Vec<_> = env.comm.plugins.drain(..).collect();
    assert_eq!(
        sent,
        [
            (0, 1, vec![], vec!["a".to_string()]),
            (1, 2, vec![], vec!["a".to_string()])
        ]
    );
    env.comm.emptiness_check();
}

#[test]
fn a_restart_restarts_every_executor_up() {
    let mut env = TestEnv::new(2);
    env.died(1); // down: nothing to restart there
    env.scheduler(ToWorker::RestartExecutors);
    let restarts: Vec<_> = env.comm.restarts.drain(..).collect();
    assert!(
        matches!(restarts.as_slice(), [(0, 1, reason)] if reason.contains("Client.restart()")),
        "{restarts:?}"
    );
    env.comm.emptiness_check();
}

// ------------------------------------------------------------------ results kept by executors

/// What a test executor reports as ready: the probe is in this process, whose memory the
/// worker may read (it reads its own), as it reads a real executor's.
static PROBE: [u8; 16] = crate::protocol::EXECUTOR_PROBE;

fn this_process() -> Arc<ProcessMemory> {
    let probe = PROBE.as_ptr() as u64;
    let memory = ProcessMemory::open(std::process::id(), probe, &PROBE);
    Arc::new(memory.expect("a process may read its own memory"))
}

/// A frame a test executor keeps, and the outcome that reports it kept under `key`.
fn kept(id: u64, key: u64, frame: &[u8]) -> TaskOutcome {
    TaskOutcome {
        result: Ok(ObjectRef::Held {
            key,
            layout: vec![frame.len() as u64],
            spans: vec![(frame.as_ptr() as u64, frame.len() as u64)],
        }),
        ..ok(id)
    }
}

impl TestEnv {
    /// A worker whose `slots` executors are replaced by readable ones (generation 2).
    fn with_readable_executors(slots: usize) -> Self {
        let mut env = Self::new(slots);
        env.comm.shm = Some(Arc::new(
            ShmDir::create("rankmesh-test").expect("a shared-memory folder"),
        ));
        for slot in 0..slots {
            env.readable_executor_replaces(slot, 2);
        }
        env
    }

    /// Executor `slot` dies and `generation`, whose memory can be read, replaces it.
    fn readable_executor_replaces(&mut self, slot: usize, generation: u64) {
        self.died(slot);
        self.executor(ExecutorEvent::Ready {
            slot,
            generation,
            pid: 100,
            memory: Some(this_process()),
        });
        self.comm.cleared.clear();
    }
}

#[test]
fn executors_whose_memory_can_be_read_keep_their_results_and_others_are_not_asked() {
    let mut env = TestEnv::with_readable_executors(2);
    assert_eq!(
        env.comm.holding.drain(..).collect::<Vec<_>>(),
        [(0, 2, true), (1, 2, true)]
    );
    env.comm.emptiness_check();
    // An executor the worker cannot read is never asked to keep results.
    let mut env = TestEnv::new(1);
    assert!(env.comm.holding.is_empty());
    let frame = vec![7u8; 100_000];
    env.compute(vec![task(1, &[])]);
    env.ran();
    env.results(0, vec![kept(1, 5, &frame)]);
    match env.comm.take_sent().as_slice() {
        [FromWorker::Failed { id, error }] => {
            assert_eq!((*id, error.type_name.as_str()), (TaskId(1), "StoreError"));
            assert!(
                error.message.contains("not asked to keep"),
                "{}",
                error.message
            );
        }
        other => panic!("a result it was not asked to keep fails its task, got {other:?}"),
    }
    assert_eq!(
        env.comm.held_released,
        [(0, 1, 5)],
        "and the executor drops it"
    );
}

/// A result executor `slot` keeps, of a task that took 0.1 s (so that executors are
/// handed one task at a time).
/// The outcome of a task of 0.1 s.
fn slow(outcome: TaskOutcome) -> TaskOutcome {
    TaskOutcome {
        duration_us: 100_000,
        ..outcome
    }
}

fn kept_slowly(id: u64, key: u64, frame: &[u8]) -> TaskOutcome {
    slow(kept(id, key, frame))
}

#[test]
fn an_executor_of_short_tasks_has_three_at_hand() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1]))]);
    // Tasks of about 5 ms: `EXECUTOR_REPORT_INTERVAL` of queued work would be two.
    let five_ms = |id| TaskOutcome {
        duration_us: 50_000,
        ..ok(id)
    };
    env.results(0, vec![five_ms(1)]);
    env.comm.take_sent();
    env.compute(vec![task(2, &[]), task(3, &[]), task(4, &[]), task(5, &[])]);
    assert_eq!(
        env.ran(),
        [(0, ids(&[2, 3, 4]))],
        "one running, one after it while its report is on the way, one to report ahead of"
    );
    // Tasks of over 10 ms: one at a time.
    env.results(0, vec![slow(ok(2)), slow(ok(3)), slow(ok(4))]);
    env.comm.take_sent();
    assert_eq!(env.ran(), [(0, ids(&[5]))]);
    env.compute(vec![task(6, &[])]);
    assert_eq!(env.ran(), [], "6 waits for the executor");
    env.results(0, vec![slow(ok(5))]);
    env.comm.take_sent();
    assert_eq!(env.ran(), [(0, ids(&[6]))]);
}

#[test]
fn a_task_goes_to_the_executor_that_keeps_its_inputs() {
    let mut env = TestEnv::with_readable_executors(2);
    env.comm.holding.clear();
    let (one, two) = (vec![1u8; 100_000], vec![2u8; 100_000]);
    env.compute(vec![task(1, &[]), task(2, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1])), (1, ids(&[2]))]);
    env.results(0, vec![kept_slowly(1, 11, &one)]);
    env.results(1, vec![kept_slowly(2, 12, &two)]);
    env.comm.take_sent();
    // Dealt from executor 0 on, 3 comes first: it reads what 1 keeps.
    env.compute(vec![task(3, &[(2, &[])]), task(4, &[(1, &[])])]);
    let runs = env.comm.take_runs();
    let placed: Vec<_> = runs.iter().map(|r| (r.slot, r.tasks.clone())).collect();
    assert_eq!(placed, [(0, ids(&[4])), (1, ids(&[3]))]);
    for run in &runs {
        assert!(
            matches!(run.inputs[0][..], [ObjectRef::Held { .. }]),
            "read by key, no copy"
        );
    }
    assert!(env.comm.copied_out.is_empty());
}

impl TestEnv {
    /// Two readable executors: 0 keeps result 1 (its frame returned, for the spans to stay
    /// valid) and runs a long task, 5 (tasks take 0.1 s here, so none queues behind
    /// another); 1 is free. Task 2, which reads 1, waits for 1's copy out of executor 0.
    fn reader_waiting_for_a_copy() -> (TestEnv, Vec<u8>) {
        let mut env = TestEnv::with_readable_executors(2);
        env.comm.holding.clear();
        let frame = vec![1u8; 100_000];
        env.compute(vec![task(1, &[]), task(9, &[])]);
        assert_eq!(env.ran(), [(0, ids(&[1])), (1, ids(&[9]))]);
        env.results(0, vec![kept_slowly(1, 11, &frame)]);
        env.comm.take_sent();
        env.compute(vec![task(5, &[])]);
        assert_eq!(env.ran(), [(0, ids(&[5]))]);
        env.results(1, vec![slow(ok(9))]);
        env.comm.take_sent();
        env.compute(vec![task(2, &[(1, &[])])]);
        assert_eq!(env.ran(), [], "2 waits for a copy of 1 out of executor 0");
        (env, frame)
    }
}

#[test]
fn an_input_another_executor_keeps_is_copied_out_off_the_loop_before_the_task_runs() {
    let (mut env, _frame) = TestEnv::reader_waiting_for_a_copy();
    let (id, object) = env.comm.copied_out.remove(0);
    assert_eq!(id, TaskId(1));
    object.publish().expect("copied out");
    env.state.woken(Wake::CopiedOut(TaskId(1)), &mut env.comm);
    env.state.sanity_check();
    let runs = env.comm.take_runs();
    assert_eq!((runs[0].slot, runs[0].tasks.clone()), (1, ids(&[2])));
    assert!(matches!(runs[0].inputs[0][..], [ObjectRef::Shm { .. }]));
    assert_eq!(
        env.comm.held_released,
        [(0, 2, 11)],
        "executor 0 drops its copy"
    );
}

impl TestEnv {
    /// Task 1 done on a readable executor, which keeps `frame` as its result under key 5:
    /// the worker and the stored object.
    fn one_kept_result(frame: &[u8]) -> (Self, Arc<Object>) {
        let mut env = TestEnv::with_readable_executors(1);
        env.comm.holding.clear();
        env.compute(vec![task(1, &[])]);
        env.ran();
        env.results(0, vec![kept(1, 5, frame)]);
        assert_eq!(env.done_ids(), ids(&[1]));
        let object = env.store.get(TaskId(1)).expect("stored");
        (env, object)
    }
}

#[test]
fn a_kept_result_is_read_by_key_until_copied_out_then_from_the_copy() {
    let frame = vec![7u8; 100_000];
    let (mut env, object) = TestEnv::one_kept_result(&frame);
    assert!(object.is_unpublished() && object.bytes().is_none() && object.shared_path().is_none());
    assert_eq!(object.size(), 100_032, "padded to 64 bytes, as in a file");
    assert_eq!(env.store.bytes().in_memory, 100_032, "counted as in memory");
    env.compute(vec![task(2, &[(1, &[])])]);
    let run = env.comm.take_runs();
    assert!(matches!(
        run[0].inputs[0][..],
        [ObjectRef::Held { key: 5, .. }]
    ));
    // A peer asks for it: the data server copies it out.
    let bytes = object.read().expect("copied out");
    assert!(bytes[..100_000].iter().all(|&b| b == 7));
    assert!(object.shared_path().is_some());
    env.results(0, vec![ok(2)]);
    assert_eq!(env.done_ids(), ids(&[2]));
    assert_eq!(
        env.comm.held_released,
        [(0, 2, 5)],
        "the executor may drop its copy"
    );
    env.comm.objects_released.clear();
    env.compute(vec![task(3, &[(1, &[])])]);
    let run = env.comm.take_runs();
    assert!(matches!(run[0].inputs[0][..], [ObjectRef::Shm { .. }]));
    drop((bytes, object));
    env.scheduler(ToWorker::Release(ids(&[1])));
    assert_eq!(env.release_notices(), [(0, 2)], "its file went");
    env.comm.emptiness_check();
}

#[test]
fn a_small_kept_result_is_copied_out_onto_the_heap_and_read_inline_after() {
    let frame = vec![7u8; 8_000];
    let (mut env, object) = TestEnv::one_kept_result(&frame);
    assert!(object.is_unpublished());
    // A peer asks for it: copied out, with no file for it.
    let bytes = object.read().expect("copied out");
    assert!(bytes[..8_000].iter().all(|&b| b == 7));
    assert!(object.shared_path().is_none() && object.bytes().is_some());
    env.compute(vec![task(2, &[(1, &[])])]);
    let run = env.comm.take_runs();
    let [ObjectRef::Inline { data, .. }] = &run[0].inputs[0][..] else {
        panic!("read inline: {:?}", run[0].inputs);
    };
    assert!(data[..8_000].iter().all(|&b| b == 7));
    assert_eq!(
        env.comm.held_released,
        [(0, 2, 5)],
        "the executor may drop its copy"
    );
    drop((bytes, object));
    env.results(0, vec![ok(2)]);
    assert_eq!(env.done_ids(), ids(&[2]));
    // Its executor was told when it was copied out, and no file goes: no notice now.
    assert_eq!(env.release_notices(), [(0, 2)]);
    env.scheduler(ToWorker::Release(ids(&[1])));
    env.comm.emptiness_check();
}

#[test]
fn a_released_or_spilled_kept_result_is_dropped_by_its_executor() {
    let mut env = TestEnv::with_memory(1, limited());
    env.readable_executor_replaces(0, 2);
    env.comm.holding.clear();
    let frames = [vec![1u8; 3_000_000], vec![2u8; 4_000_000]];
    env.compute(vec![task(1, &[]), task(2, &[])]);
    for (i, frame) in frames.iter().enumerate() {
        let id = i as u64 + 1;
        while env.comm.take_runs().is_empty() {
            env.compute(vec![]);
        }
        env.results(0, vec![kept(id, 10 + id, frame)]);
    }
    env.comm.take_sent();
    // 7 MB is over the target (0.6 of 10 MiB): the older result goes to disk, copied
    // straight out of the executor.
    let batch = env.comm.spills.pop_front().expect("a spill");
    assert_eq!(batch.iter().map(|(id, _)| id.0).collect::<Vec<_>>(), [1]);
    let outcomes = env.write(batch);
    env.spill_finished(outcomes);
    let spilled = env.store.get(TaskId(1)).expect("still held");
    assert!(spilled.is_spilled());
    assert_eq!(&*spilled.read().expect("read back"), &frames[0][..]);
    assert!(env.comm.held_released.contains(&(0, 2, 11)));
    env.comm.held_released.clear();
    env.scheduler(ToWorker::Release(ids(&[2])));
    assert_eq!(env.comm.held_released, [(0, 2, 12)]);
}

#[test]
fn results_kept_by_an_executor_that_died_are_lost_and_the_tasks_reading_them_dropped() {
    let mut env = TestEnv::with_readable_executors(1);
    env.comm.holding.clear();
    let (lost, copied) = (vec![1u8; 100_000], vec![2u8; 100_000]);
    env.compute(vec![task(1, &[]), task(2, &[]), task(3, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1, 2, 3]))]);
    env.results(0, vec![kept(1, 1, &lost), kept(2, 2, &copied), ok(3)]);
    env.comm.take_sent();
    env.store
        .get(TaskId(2))
        .expect("stored")
        .read()
        .expect("copied out");
    // Task 4 reads the lost result and is running; 5 reads one copied out and 3's inline
    // one; 6 reads the lost one and waits.
    env.compute(vec![
        task(4, &[(1, &[])]),
        task(5, &[(2, &[]), (3, &[])]),
        task(6, &[(1, &[]), (3, &[])]),
    ]);
    env.comm.take_runs();
    env.comm.held_released.clear();
    env.comm.objects_released.clear();
    env.died(0);
    assert_eq!(
        env.comm.take_sent(),
        [FromWorker::ResultsLost(ids(&[1]))],
        "the scheduler places 4 and 6 again and recomputes 1"
    );
    assert!(!env.store.contains(TaskId(1)));
    assert!(env.store.contains(TaskId(2)) && env.store.contains(TaskId(3)));
    env.executor(ExecutorEvent::Ready {
        slot: 0,
        generation: 3,
        pid: 101,
        memory: Some(this_process()),
    });
    assert_eq!(
        env.comm.holding.drain(..).collect::<Vec<_>>(),
        [(0, 3, true)]
    );
    assert_eq!(env.ran(), [(0, ids(&[5]))], "only 5 runs again");
}

#[test]
fn over_the_target_executors_write_their_results_until_memory_is_under_half_of_it() {
    let mut env = TestEnv::with_memory(1, limited());
    env.readable_executor_replaces(0, 2);
    assert_eq!(
        env.comm.holding.drain(..).collect::<Vec<_>>(),
        [(0, 2, true)]
    );
    // The target is 6 MiB of the 10 MiB limit.
    env.sampled(sample(MIB, &[(0, 6 * MIB)], 0));
    assert_eq!(
        env.comm.holding.drain(..).collect::<Vec<_>>(),
        [(0, 2, false)]
    );
    env.sampled(sample(MIB, &[(0, 3 * MIB)], 0));
    assert!(
        env.comm.holding.is_empty(),
        "4 MiB: not under half the target yet"
    );
    env.readable_executor_replaces(0, 3);
    assert!(
        env.comm.holding.is_empty(),
        "a new executor writes its results too"
    );
    env.sampled(sample(MIB, &[(0, MIB)], 0));
    assert_eq!(
        env.comm.holding.drain(..).collect::<Vec<_>>(),
        [(0, 3, true)]
    );
}

#[test]
fn a_large_kept_result_is_copied_out_at_once_where_other_workers_read_its_kind() {
    let mut env = TestEnv::with_readable_executors(1);
    let large = vec![3u8; COPY_OUT_AT_ONCE as usize];
    let small = vec![4u8; 100_000];
    let with_peers = |id| ComputeTask {
        read_elsewhere: true,
        ..task(id, &[])
    };
    env.compute(vec![with_peers(1), with_peers(2), task(3, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1, 2, 3]))]);
    let outcomes = vec![kept(1, 1, &large), kept(2, 2, &small), kept(3, 3, &large)];
    env.results(0, outcomes);
    assert_eq!(
        env.done_ids(),
        ids(&[1, 2, 3]),
        "all at once: tasks here read the large one while it is copied"
    );
    let copied: Vec<_> = env.comm.copied_out.drain(..).collect();
    assert_eq!(
        copied.len(),
        1,
        "only the large one, and only with other workers"
    );
    let (id, object) = &copied[0];
    assert_eq!(*id, TaskId(1));
    assert!(Arc::ptr_eq(object, &env.store.get(TaskId(1)).unwrap()));
    assert!(object.lend().is_some(), "lent before the copy starts");
    object.publish().expect("copied out");
    env.state.woken(Wake::CopiedOut(TaskId(1)), &mut env.comm);
    env.state.sanity_check();
    assert_eq!(env.comm.take_sent(), [], "reported already");
    assert_eq!(
        env.comm.held_released,
        [(0, 2, 1)],
        "the executor drops its copy"
    );
}

impl TestEnv {
    /// A worker whose executor kept result 1, large and of a kind read elsewhere: reported
    /// done at once, and being copied out (the object handed to the copy).
    fn with_a_large_result_being_copied_out() -> (TestEnv, Arc<Object>) {
        let mut env = TestEnv::with_readable_executors(1);
        let large = vec![3u8; COPY_OUT_AT_ONCE as usize];
        env.compute(vec![ComputeTask {
            read_elsewhere: true,
            ..task(1, &[])
        }]);
        env.ran();
        env.results(0, vec![kept(1, 1, &large)]);
        assert_eq!(env.done_ids(), ids(&[1]));
        let (id, object) = env.comm.copied_out.remove(0);
        assert_eq!(id, TaskId(1));
        assert!(env.comm.copied_out.is_empty());
        (env, object)
    }
}

#[test]
fn a_result_released_while_it_is_copied_out_is_forgotten() {
    let (mut env, object) = TestEnv::with_a_large_result_being_copied_out();
    env.scheduler(ToWorker::Release(ids(&[1])));
    assert!(env.store.get(TaskId(1)).is_none());
    // The copy ends after all (its object dropped with it): nothing to say or count.
    let _ = object.publish();
    drop(object);
    env.state.woken(Wake::CopiedOut(TaskId(1)), &mut env.comm);
    env.state.sanity_check();
    assert_eq!(env.comm.take_sent(), []);
    assert_eq!(env.state.copying_out_bytes(), 0);
}

#[test]
fn a_result_lost_while_it_was_copied_out_is_reported_done_then_lost() {
    let (mut env, _copying) = TestEnv::with_a_large_result_being_copied_out();
    env.died(0);
    match env.comm.take_sent().as_slice() {
        [FromWorker::ResultsLost(lost)] => assert_eq!(lost, &ids(&[1])),
        other => panic!("expected ResultsLost, got {other:?}"),
    }
    // The copy ends, failed: nothing more to say.
    env.state.woken(Wake::CopiedOut(TaskId(1)), &mut env.comm);
    env.state.sanity_check();
    assert_eq!(env.comm.take_sent(), []);
}

#[test]
fn a_kept_result_being_copied_out_counts_twice_against_the_memory_target() {
    // A 100 MiB limit: a 60 MiB target, over which two 24 MiB copies of one result and
    // the next task's expected 24 MiB would go.
    let policy = MemoryPolicy {
        limit: 100 * MIB,
        thresholds: MemoryThresholds::default(),
    };
    let mut env = TestEnv::with_memory(1, policy);
    env.readable_executor_replaces(0, 2);
    let large = vec![3u8; 24 * MIB as usize];
    let with_peers = |id| ComputeTask {
        read_elsewhere: true,
        ..task(id, &[])
    };
    env.compute(vec![with_peers(1), with_peers(2)]);
    assert_eq!(
        env.ran(),
        [(0, ids(&[1]))],
        "one until results show their size"
    );
    env.results(0, vec![kept(1, 1, &large)]);
    assert_eq!(env.comm.copied_out.len(), 1);
    assert_eq!(env.ran(), [], "2 waits while 1 is in memory twice");
    let (_, object) = env.comm.copied_out.remove(0);
    object.publish().expect("copied out");
    env.state.woken(Wake::CopiedOut(TaskId(1)), &mut env.comm);
    env.state.sanity_check();
    assert_eq!(env.done_ids(), ids(&[1]));
    assert_eq!(env.ran(), [(0, ids(&[2]))], "then it runs");
}

#[test]
fn a_copy_ending_after_its_reader_was_dropped_and_sent_again_leaves_the_new_one_waiting() {
    let (mut env, _frame) = TestEnv::reader_waiting_for_a_copy();
    // Executor 0 dies with 1; 2, its reader, is dropped, and sent again by the scheduler
    // with 1 recomputed on a peer.
    env.died(0);
    env.comm.take_sent();
    env.compute(vec![task(2, &[(1, &[PEERS[0]])])]);
    assert_eq!(env.comm.take_fetches(), [(PEERS[0], ids(&[1]))]);
    // The old copy ends, failed.
    env.state.woken(Wake::CopiedOut(TaskId(1)), &mut env.comm);
    env.state.sanity_check();
    let ran = env.ran();
    assert!(
        !ran.iter().any(|(_, tasks)| tasks.contains(&TaskId(2))),
        "2 still waits for its fetch, ran {ran:?}"
    );
    let sent = env.comm.take_sent();
    assert!(
        !sent.iter().any(|m| matches!(m, FromWorker::Failed { .. })),
        "{sent:?}"
    );
}

// ------------------------------------------------------------------ results lent by peers

/// A request to copy `frame`, kept by a peer's executor, as its worker lends it.
fn copy_of(request: u64, frame: &[u8], layout: Vec<u64>) -> LoanToCopy {
    LoanToCopy {
        request,
        loan: loan_of(frame),
        layout,
    }
}

/// Where a peer's executor keeps `frame`, as its worker lends it.
fn loan_of(frame: &[u8]) -> ObjectLoan {
    ObjectLoan {
        pid: 4242,
        probe: 0x1000,
        spans: vec![(frame.as_ptr() as u64, frame.len() as u64)],
    }
}

#[test]
fn a_lent_result_is_copied_by_the_least_busy_executor_and_kept_there() {
    let mut env = TestEnv::with_readable_executors(2);
    env.comm.holding.clear();
    env.compute(vec![task(1, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1]))]);
    let frame = vec![3u8; 100_000];
    let layout = vec![frame.len() as u64];
    env.state
        .borrow_asked(copy_of(7, &frame, layout.clone()), &mut env.comm);
    env.state.sanity_check();
    let (slot, generation, request, loan) = env.comm.borrows.pop_front().expect("asked");
    assert_eq!((slot, generation, request), (1, 2, 7), "the idle executor");
    assert_eq!(loan, loan_of(&frame));
    // It copied the frame into its memory and keeps it under its key 40.
    let copy = frame.clone();
    env.executor(ExecutorEvent::Borrowed {
        slot: 1,
        request: 7,
        outcome: Ok(ObjectRef::Held {
            key: 40,
            layout,
            spans: vec![(copy.as_ptr() as u64, copy.len() as u64)],
        }),
    });
    let (request, object) = env.comm.borrowed.pop_front().expect("answered");
    assert_eq!(request, 7);
    let object = object.expect("kept here");
    let holder = Holder {
        slot: 1,
        generation: 2,
        key: 40,
    };
    assert_eq!(object.kept_only_by(), Some(holder));
    let read = Arc::new(object)
        .read()
        .expect("read out of the executor that copied it");
    assert!(read[..frame.len()] == frame[..], "the copy's bytes");
    env.comm.emptiness_check();
}

#[test]
fn a_loan_no_executor_here_can_copy_fails_and_so_does_one_whose_copier_died() {
    let frame = vec![3u8; 100_000];
    let layout = vec![frame.len() as u64];
    // An executor the worker cannot read keeps no results, nor lent ones.
    let mut env = TestEnv::new(1);
    env.state
        .borrow_asked(copy_of(1, &frame, layout.clone()), &mut env.comm);
    let (request, result) = env.comm.borrowed.pop_front().expect("answered at once");
    assert_eq!(request, 1);
    assert!(matches!(result, Err(StoreError::Borrow(_))), "{result:?}");
    env.comm.emptiness_check();

    let mut env = TestEnv::with_readable_executors(1);
    env.comm.holding.clear();
    env.state
        .borrow_asked(copy_of(2, &frame, layout.clone()), &mut env.comm);
    assert_eq!(env.comm.borrows.len(), 1);
    env.comm.borrows.clear();
    env.died(0);
    let (request, result) = env.comm.borrowed.pop_front().expect("answered");
    assert_eq!(request, 2);
    let why = result.expect_err("failed").to_string();
    assert!(why.contains("ended: killed by signal 9"), "{why}");

    // Refused by the system: told apart, as no later loan would fare better.
    env.readable_executor_replaces(0, 3);
    env.comm.holding.clear();
    env.state
        .borrow_asked(copy_of(3, &frame, layout), &mut env.comm);
    env.comm.borrows.clear();
    env.executor(ExecutorEvent::Borrowed {
        slot: 0,
        request: 3,
        outcome: Err(BorrowFailure {
            message: "Operation not permitted".into(),
            refused: true,
        }),
    });
    let (request, result) = env.comm.borrowed.pop_front().expect("answered");
    assert_eq!(request, 3);
    assert!(
        matches!(result, Err(StoreError::BorrowRefused(_))),
        "{result:?}"
    );
}
