//! Worker tests: a recording comm that round-trips what goes to the scheduler and to
//! executors through the wire format, a `TestEnv` that feeds events, one test per
//! behaviour. No process is started.

use super::*;
use crate::protocol::{decode, encode, frame_offsets, InputLocation, ToExecutor};
use crate::store::{ShmDir, StoreError};
use crate::worker::memory::MemoryPolicy;
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
}

#[derive(Default)]
struct TestComm {
    sent: VecDeque<FromWorker>,
    fetches: VecDeque<(WorkerId, Vec<TaskId>)>,
    runs: VecDeque<Ran>,
    released_functions: VecDeque<(usize, u64, Vec<FuncId>)>,
    adopted: Vec<PathBuf>,
    mapped_in: usize,
    /// Result files that cannot be taken over.
    unadoptable: Vec<PathBuf>,
    /// Where result files are taken over from for real, if set.
    shm: Option<ShmDir>,
    spills: VecDeque<Vec<(TaskId, Arc<Object>)>>,
    reserves_dropped: usize,
    /// Dead executor generations whose leftovers were to be removed.
    cleared: VecDeque<(usize, u64)>,
    restarts: VecDeque<(usize, u64, String)>,
}

impl WorkerComm for TestComm {
    fn send(&mut self, msg: FromWorker) {
        self.sent.push_back(round_trip(&msg));
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

    fn map_in(&mut self, _object: Arc<Object>) {
        self.mapped_in += 1;
    }

    fn spill(&mut self, objects: Vec<(TaskId, Arc<Object>)>) {
        self.spills.push_back(objects);
    }

    fn restart_executor(&mut self, slot: usize, generation: u64, reason: String) {
        self.restarts.push_back((slot, generation, reason));
    }

    fn clear_after(&mut self, slot: usize, generation: u64) {
        self.cleared.push_back((slot, generation));
    }

    fn drop_reserves(&mut self) {
        self.reserves_dropped += 1;
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
        assert!(self.spills.is_empty(), "unexpected spills");
        assert!(
            self.restarts.is_empty(),
            "unexpected restarts: {:?}",
            self.restarts
        );
    }
}

struct TestEnv {
    state: WorkerState,
    comm: TestComm,
    store: Store,
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
    }
}

fn small(fill: u8) -> Object {
    Object::inline(Bytes::from(vec![fill; 64]), vec![64]).expect("a valid layout")
}

impl TestEnv {
    /// A worker with `slots` executors, all up (generation 1).
    fn new(slots: usize) -> Self {
        let store = Store::default();
        let settings = WorkerSettings {
            slots,
            max_crashes: 3,
            memory: MemoryPolicy::default(),
        };
        let peers = PEERS.iter().map(|&id| peer(id)).collect();
        let mut env = TestEnv {
            state: WorkerState::new(settings, store.clone(), peers),
            comm: TestComm::default(),
            store,
        };
        for slot in 0..slots {
            env.executor(ExecutorEvent::Ready {
                slot,
                generation: 1,
                pid: 100,
            });
        }
        env
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

    fn done_ids(&mut self) -> Vec<TaskId> {
        match self.comm.take_sent().as_slice() {
            [FromWorker::Done(done)] => done.iter().map(|d| d.id).collect(),
            other => panic!("expected one Done, got {other:?}"),
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
        funcs: Vec::new(),
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
    }
}

fn ok(id: u64) -> TaskOutcome {
    TaskOutcome {
        id: TaskId(id),
        duration_us: 100,
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
fn results_of_one_batch_are_reported_in_one_done() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[]), task(2, &[]), task(3, &[])]);
    assert_eq!(env.ran(), [(0, ids(&[1, 2, 3]))]);
    env.results(0, vec![ok(1), ok(2), ok(3)]);
    assert_eq!(env.done_ids(), ids(&[1, 2, 3]));
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

#[test]
fn a_large_result_is_taken_over_and_mapped_in() {
    let mut env = TestEnv::new(1);
    let shm = ShmDir::create("rankmesh-test").expect("a shared-memory folder");
    // What the executor wrote: its file, of the layout's size.
    let path = shm.path().join("0.1-1");
    std::fs::write(&path, vec![5u8; 100_032]).expect("written");
    env.comm.shm = Some(shm);
    env.compute(vec![task(1, &[])]);
    env.ran();
    let outcome = TaskOutcome {
        result: Ok(ObjectRef::Shm {
            path: path.display().to_string(),
            layout: vec![100_000],
        }),
        ..ok(1)
    };
    env.results(0, vec![outcome]);
    assert_eq!(env.comm.adopted, [path]);
    assert_eq!(
        env.comm.mapped_in, 1,
        "its pages are mapped in off the loop"
    );
    let stored = env.store.get(TaskId(1)).expect("stored");
    assert!(stored.is_shared() && stored.bytes()[..100_000].iter().all(|&b| b == 5));
    assert_eq!(env.done_ids(), ids(&[1]));
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
    env.comm.emptiness_check();
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
        being_sent.bytes().iter().all(|&b| b == 9),
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
    env.executor(ExecutorEvent::Ready {
        slot: 0,
        generation: 2,
        pid: 100,
    });
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
fn a_task_that_keeps_killing_its_executor_fails_after_the_limit() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[])]);
    for generation in 2..=3 {
        assert_eq!(env.ran(), [(0, ids(&[1]))]);
        env.died(0);
        env.executor(ExecutorEvent::Ready {
            slot: 0,
            generation,
            pid: 100,
        });
    }
    assert_eq!(env.ran(), [(0, ids(&[1]))]);
    env.died(0);
    let failed = env.comm.take_sent();
    assert!(
        matches!(
            failed.as_slice(),
            [FromWorker::Failed { id, error }]
                if *id == TaskId(1) && error.type_name == "ExecutorCrashed"
                    && error.message.contains("died 3 times") && error.message.contains("signal 9")
        ),
        "{failed:?}"
    );
    env.executor(ExecutorEvent::Ready {
        slot: 0,
        generation: 4,
        pid: 100,
    });
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
        funcs: vec![f],
        ..task(id, &[])
    };
    env.compute(vec![uses_f(1)]);
    let runs = env.comm.take_runs();
    assert_eq!(runs[0].functions, [f]);
    env.results(0, vec![ok(1)]);
    env.compute(vec![uses_f(2)]);
    assert!(env.comm.take_runs()[0].functions.is_empty(), "it has it");
    env.died(0);
    env.executor(ExecutorEvent::Ready {
        slot: 0,
        generation: 2,
        pid: 100,
    });
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
        funcs: vec![f],
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
    env.results(0, vec![ok(1), ok(2)]);
    assert_eq!(env.done_ids(), ids(&[2]));
    assert!(!env.store.contains(TaskId(1)), "its result was dropped");
    env.comm.emptiness_check();
}

#[test]
fn a_task_cancelled_before_it_ran_is_forgotten() {
    let mut env = TestEnv::new(1);
    env.died(0); // nothing can run until the executor is back
    env.compute(vec![task(1, &[]), task(2, &[])]);
    env.scheduler(ToWorker::Cancel(ids(&[1])));
    env.executor(ExecutorEvent::Ready {
        slot: 0,
        generation: 2,
        pid: 100,
    });
    assert_eq!(env.ran(), [(0, ids(&[2]))]);
    env.comm.emptiness_check();
}

#[test]
fn a_cancelled_task_lost_with_its_executor_is_not_retried() {
    let mut env = TestEnv::new(1);
    env.compute(vec![task(1, &[]), task(2, &[])]);
    env.ran();
    env.scheduler(ToWorker::Cancel(ids(&[1])));
    env.died(0);
    env.executor(ExecutorEvent::Ready {
        slot: 0,
        generation: 2,
        pid: 100,
    });
    assert_eq!(env.ran(), [(0, ids(&[2]))], "only the live suspect reruns");
    env.comm.emptiness_check();
}
