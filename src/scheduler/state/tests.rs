//! Scheduler tests: a recording Comm that round-trips every message through the wire
//! format, a `TestEnv` that hands out ids, and one test per behaviour.

use super::*;
use crate::protocol::{
    decode, decode_sharing, encode, Coordinate, Coordinated, DatasetOp, Plugin, Resources,
    TaskFinished, TaskOptions, WorkerTopology,
};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeSet, VecDeque};

fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
    decode(&encode(msg).expect("message encodes")).expect("message decodes")
}

/// Records what the scheduler sends, after a trip through the wire format.
#[derive(Default)]
struct TestComm {
    workers: BTreeMap<WorkerId, VecDeque<ToWorker>>,
    clients: BTreeMap<ClientId, VecDeque<ToClient>>,
    /// The peers each worker was told of (`PeerAdded`, `PeerRemoved`), kept apart from
    /// its other messages and checked as a worker would rely on them.
    known_peers: BTreeMap<WorkerId, BTreeSet<WorkerId>>,
}

impl Comm for TestComm {
    fn send_worker(&mut self, worker: WorkerId, msg: ToWorker) {
        let known = self.known_peers.entry(worker).or_default();
        match round_trip(&msg) {
            ToWorker::PeerAdded(info) => {
                assert!(
                    info.id != worker,
                    "worker {worker} was introduced to itself"
                );
                assert!(
                    known.insert(info.id),
                    "worker {worker} was told of {} twice",
                    info.id
                );
            }
            ToWorker::PeerRemoved(peer) => {
                assert!(known.remove(&peer), "worker {worker} never heard of {peer}");
            }
            msg => {
                // A worker fetches only from holders it has been told of.
                if let ToWorker::Compute(tasks) = &msg {
                    for holder in tasks
                        .iter()
                        .flat_map(|t| &t.inputs)
                        .flat_map(|i| &i.workers)
                    {
                        assert!(
                            *holder == worker || known.contains(holder),
                            "worker {worker} was sent inputs on {holder} before hearing of it"
                        );
                    }
                }
                self.workers.entry(worker).or_default().push_back(msg);
            }
        }
    }

    fn send_client(&mut self, client: ClientId, msg: ToClient) {
        self.clients
            .entry(client)
            .or_default()
            .push_back(round_trip(&msg));
    }
}

impl TestComm {
    fn take_worker(&mut self, worker: WorkerId) -> Vec<ToWorker> {
        self.workers
            .remove(&worker)
            .map(Vec::from)
            .unwrap_or_default()
    }

    /// Whether `worker` was told of `peer` (and not told it left since).
    fn knows(&self, worker: WorkerId, peer: WorkerId) -> bool {
        self.known_peers
            .get(&worker)
            .is_some_and(|known| known.contains(&peer))
    }

    fn take_client(&mut self, client: ClientId) -> Vec<ToClient> {
        self.clients
            .remove(&client)
            .map(Vec::from)
            .unwrap_or_default()
    }

    fn emptiness_check(&self) {
        for (worker, msgs) in &self.workers {
            assert!(
                msgs.is_empty(),
                "unexpected messages to worker {worker}: {msgs:?}"
            );
        }
        for (client, msgs) in &self.clients {
            assert!(
                msgs.is_empty(),
                "unexpected messages to client {client}: {msgs:?}"
            );
        }
    }
}

const SIZE: u64 = 100;

struct TestEnv {
    scheduler: Scheduler,
    comm: TestComm,
}

impl TestEnv {
    fn new() -> Self {
        TestEnv {
            scheduler: Scheduler::new(SchedulerConfig::default()),
            comm: TestComm::default(),
        }
    }

    /// Registers a worker on a node of its own and checks the membership messages it causes.
    fn worker(&mut self, nthreads: u32) -> WorkerId {
        let n = self.scheduler.worker_count() + 1;
        self.worker_on(&format!("node{n}"), nthreads)
    }

    /// Registers a worker on `host` and checks the membership messages it causes.
    fn worker_on(&mut self, host: &str, nthreads: u32) -> WorkerId {
        self.worker_offering(host, nthreads, Resources::default())
    }

    fn worker_offering(&mut self, host: &str, nthreads: u32, resources: Resources) -> WorkerId {
        let n = self.scheduler.worker_count() + 1;
        let reg = WorkerRegistration {
            data_address: format!("10.0.0.{n}:7000"),
            host: host.into(),
            nthreads,
            memory_limit: 1 << 30,
            pid: 100,
            rank: None,
            topology: None,
            doorbell: None,
            resources,
        };
        let others: Vec<WorkerId> = self.scheduler.workers().map(|w| w.id).collect();
        let clients: Vec<ClientId> = self.scheduler.clients.keys().copied().collect();
        let id = self.scheduler.add_worker(reg, &mut self.comm);
        let plugins = self.scheduler.plugins.clone();
        match self.comm.take_worker(id).as_slice() {
            [ToWorker::Registered { worker_id }, rest @ ..] => {
                assert_eq!(*worker_id, id);
                // Then every registered plugin, if there are any.
                match rest {
                    [] => assert!(plugins.is_empty()),
                    [ToWorker::Plugins(sent)] => assert_eq!(*sent, plugins),
                    other => panic!("expected the plugins, got {other:?}"),
                }
            }
            other => panic!("expected Registered, got {other:?}"),
        }
        // Other workers hear of it only when they need its results.
        for other in others {
            assert_eq!(self.comm.take_worker(other), []);
        }
        for client in clients {
            assert!(
                matches!(self.comm.take_client(client).as_slice(), [ToClient::WorkerAdded(info)] if info.id == id)
            );
        }
        self.scheduler.sanity_check();
        id
    }

    fn workers(&mut self, nthreads: &[u32]) -> Vec<WorkerId> {
        nthreads.iter().map(|&n| self.worker(n)).collect()
    }

    fn client(&mut self) -> ClientId {
        let id = self.scheduler.add_client(&mut self.comm);
        match self.comm.take_client(id).as_slice() {
            [ToClient::Workers(workers)] => {
                assert_eq!(workers.len(), self.scheduler.worker_count())
            }
            other => panic!("expected the workers snapshot, got {other:?}"),
        }
        id
    }

    /// Through the codec, as the server decodes it (payloads are slices of the frame).
    fn client_msg(&mut self, client: ClientId, msg: FromClient) {
        let frame = encode(&msg).expect("message encodes");
        let msg = decode_sharing(&frame).expect("message decodes");
        self.scheduler.handle_client(client, msg, &mut self.comm);
        self.scheduler.sanity_check();
    }

    fn submit(&mut self, client: ClientId, tasks: Vec<TaskSpec>, wanted: &[TaskId]) {
        let msg = FromClient::Submit {
            functions: Vec::new(),
            tasks,
            wanted: wanted.to_vec(),
            prefixes: prefixes(),
            more: false,
        };
        self.client_msg(client, msg);
    }

    /// The worker's connection broke (it died).
    fn lose_worker(&mut self, worker: WorkerId) {
        self.scheduler
            .remove_worker(worker, Departure::Lost, &mut self.comm);
        self.scheduler.sanity_check();
    }

    fn worker_msg(&mut self, worker: WorkerId, msg: FromWorker) {
        self.scheduler.handle_worker(worker, msg, &mut self.comm);
        self.scheduler.sanity_check();
    }

    fn done_sized(&mut self, worker: WorkerId, done: &[(TaskId, u64)]) {
        let done = done
            .iter()
            .map(|&(id, size)| TaskDone {
                id,
                size,
                duration_us: 100,
                report_delay_us: 0,
            })
            .collect();
        self.worker_msg(worker, FromWorker::Done(done));
    }

    fn done(&mut self, worker: WorkerId, ids: &[TaskId]) {
        let done: Vec<_> = ids.iter().map(|&id| (id, SIZE)).collect();
        self.done_sized(worker, &done);
    }

    fn schedule(&mut self) {
        self.scheduler.schedule(&mut self.comm);
        self.scheduler.sanity_check();
    }

    /// The one `Compute` the worker was sent.
    fn compute_tasks(&mut self, worker: WorkerId) -> Vec<ComputeTask> {
        match self.comm.take_worker(worker).as_slice() {
            [ToWorker::Compute(tasks)] => tasks.clone(),
            other => panic!("expected one Compute for worker {worker}, got {other:?}"),
        }
    }

    fn computed(&mut self, worker: WorkerId) -> Vec<TaskId> {
        self.compute_tasks(worker).iter().map(|t| t.id).collect()
    }

    /// The one `Release` the worker was sent, sorted.
    fn released(&mut self, worker: WorkerId) -> Vec<TaskId> {
        match self.comm.take_worker(worker).as_slice() {
            [ToWorker::Release(ids)] => sorted(ids),
            other => panic!("expected one Release for worker {worker}, got {other:?}"),
        }
    }

    /// The one `Finished` the client was sent, sorted.
    fn finished(&mut self, client: ClientId) -> Vec<TaskId> {
        match self.comm.take_client(client).as_slice() {
            [ToClient::Finished(done)] => sorted(&done.iter().map(|f| f.id).collect::<Vec<_>>()),
            other => panic!("expected one Finished for client {client}, got {other:?}"),
        }
    }
}

fn sorted(ids: &[TaskId]) -> Vec<TaskId> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

/// The task kinds every test submit names: one, `task`.
fn prefixes() -> Vec<String> {
    vec!["task".to_string()]
}

fn spec(id: TaskId, deps: &[TaskId]) -> TaskSpec {
    TaskSpec {
        id,
        deps: deps.to_vec(),
        funcs: Default::default(),
        payload: Bytes::from(id.0.to_le_bytes().to_vec()),
        priority: 0,
        workers: vec![],
        options: TaskOptions::default(),
        prefix: 0,
    }
}

fn ids(client: ClientId, range: std::ops::Range<u64>) -> Vec<TaskId> {
    range.map(|seq| TaskId::new(client, seq)).collect()
}

/// Two workers given 100 roots, each its own priority: the first run of 10 each goes out
/// one root at a time, while roots' sizes are unknown (0..10 and 10..20); both runs
/// finish with results of `result_size` bytes, and the scheduler hands out the next runs.
fn second_runs_of_roots(result_size: u64) -> (TestEnv, [WorkerId; 2], ClientId, Vec<TaskId>) {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let roots = ids(c, 0..100);
    let tasks = roots
        .iter()
        .map(|&id| TaskSpec {
            priority: id.0 as i64,
            ..spec(id, &[])
        })
        .collect();
    env.submit(c, tasks, &roots);
    env.schedule();
    assert_eq!(env.computed(w1), roots[..10]);
    assert_eq!(env.computed(w2), roots[10..20]);
    let sized = |range: &[TaskId]| {
        range
            .iter()
            .map(|&id| (id, result_size))
            .collect::<Vec<_>>()
    };
    env.done_sized(w1, &sized(&roots[..10]));
    env.done_sized(w2, &sized(&roots[10..20]));
    env.comm.take_client(c);
    env.schedule();
    (env, [w1, w2], c, roots)
}

#[test]
fn consecutive_roots_go_to_one_worker_in_runs() {
    // Siblings in priority order stay together: small results, so each worker claims half
    // of the rest and takes its runs from there.
    let (mut env, [w1, w2], _, roots) = second_runs_of_roots(SIZE);
    assert_eq!(env.computed(w1), roots[20..30]);
    assert_eq!(env.computed(w2), roots[60..70]);
    // (Two roots on two idle workers still spread: see the locality test below.)
}

#[test]
fn roots_claim_no_more_than_a_part_of_a_workers_memory() {
    // 8 MiB results on 1 GiB workers: claims of 4 (a 32nd of the memory), so w1's run of
    // 10 leaves it 30 and 31, and w2 starts after them, not halfway.
    let (mut env, [w1, w2], _, roots) = second_runs_of_roots(8 << 20);
    assert_eq!(env.computed(w1), roots[20..30]);
    assert_eq!(env.computed(w2), roots[32..42]);
}

/// [`second_runs_of_roots`] with 10 more tasks, each reading root 20 (w1's next run) at
/// `priority` and held to w1: w1 finishes roots 20..30, so they are ready there, while
/// w2 still runs 60..70; the next scheduling pass is done.
fn readers_of_root_20_ready_on_w1(priority: i64) -> (TestEnv, [WorkerId; 2], Vec<TaskId>) {
    let (mut env, [w1, w2], c, roots) = second_runs_of_roots(SIZE);
    let readers = ids(c, 100..110);
    let tasks = (readers.iter())
        .map(|&id| TaskSpec {
            priority,
            // Where a reader runs is not what is tested.
            workers: vec![w1],
            ..spec(id, &[roots[20]])
        })
        .collect();
    env.submit(c, tasks, &readers);
    assert_eq!(env.computed(w1), roots[20..30]);
    assert_eq!(env.computed(w2), roots[60..70]);
    env.done(w1, &roots[20..30]);
    env.comm.take_client(c);
    env.schedule();
    (env, [w1, w2], [&roots[..], &readers[..]].concat())
}

#[test]
fn a_worker_runs_its_next_roots_before_queued_tasks_that_come_later_in_the_order() {
    // The readers come after every root (a rechunk's splits after the roots of the last
    // intermediate): w1's queue is full of them, yet it runs its next roots first, so
    // their room is counted without them. Its own roots: w2, busy, keeps its reserve.
    let (mut env, [w1, w2], tasks) = readers_of_root_20_ready_on_w1(i64::MAX);
    let mut handed = env.computed(w1);
    handed.sort();
    assert_eq!(handed, [&tasks[30..40], &tasks[100..]].concat());
    assert!(env.comm.take_worker(w2).is_empty(), "w2's queue is full");
}

#[test]
fn queued_tasks_ahead_of_the_next_roots_leave_no_room_for_them() {
    let (mut env, [w1, w2], tasks) = readers_of_root_20_ready_on_w1(-1);
    assert_eq!(env.computed(w1), tasks[100..], "only the earlier readers");
    assert!(env.comm.take_worker(w2).is_empty());
}

#[test]
fn roots_a_lost_worker_had_claimed_still_run() {
    let (mut env, [w1, w2], c, roots) = second_runs_of_roots(SIZE);
    assert_eq!(env.computed(w1), roots[20..30]);
    assert_eq!(env.computed(w2), roots[60..70], "w2 claimed 60..100");
    env.lose_worker(w2);
    env.comm.take_client(c);
    let mut ran = roots[..30].to_vec();
    env.done(w1, &roots[20..30]);
    env.comm.take_client(c);
    // (w2's results 10..20 were lost with it: they run again too.)
    let distinct = |ran: &[TaskId]| {
        let mut ran = sorted(ran);
        ran.dedup();
        ran
    };
    while distinct(&ran).len() < roots.len() {
        env.schedule();
        let batch = env.computed(w1);
        env.done(w1, &batch);
        env.comm.take_client(c);
        ran.extend(batch);
    }
    assert_eq!(
        distinct(&ran),
        roots,
        "w2's share, assigned or claimed, ran on w1"
    );
}

#[test]
fn root_tasks_are_withheld_until_workers_have_room() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let roots = ids(c, 0..10_000);
    // Priorities run against ids, so the queue order is the scheduler's, not insertion's.
    let tasks = roots
        .iter()
        .map(|&id| TaskSpec {
            priority: -(id.0 as i64),
            ..spec(id, &[])
        })
        .collect();
    env.submit(c, tasks, &roots);
    env.schedule();
    // 1 ms queued per thread at 0.1 ms per task: 10 tasks each.
    let first = env.computed(w1);
    let second = env.computed(w2);
    assert_eq!((first.len(), second.len()), (10, 10));
    // One at a time while roots' sizes are unknown: the first 20 in the queue's order.
    let mut handed_out = sorted(&[first.clone(), second].concat());
    handed_out.reverse();
    assert_eq!(
        handed_out,
        roots[roots.len() - 20..]
            .iter()
            .rev()
            .copied()
            .collect::<Vec<_>>()
    );
    env.comm.emptiness_check();

    env.schedule();
    env.comm.emptiness_check();
    env.done(w1, &first);
    assert_eq!(env.finished(c), sorted(&first));
    env.schedule();
    let refill = env.computed(w1);
    assert_eq!(refill.len(), 10, "w1 gets its freed capacity back");
    assert!(refill
        .iter()
        .all(|id| roots[roots.len() - 30..roots.len() - 20].contains(id)));
    env.comm.emptiness_check();
}

#[test]
fn a_task_goes_to_the_worker_holding_its_big_input() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [big, other, later] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(big, &[]), spec(other, &[])], &[big, other]);
    env.schedule();
    assert_eq!(env.computed(w1), [big]);
    assert_eq!(env.computed(w2), [other]);
    env.done_sized(w1, &[(big, 100_000_000)]);
    assert_eq!(env.finished(c), [big]);
    env.submit(c, vec![spec(later, &[big])], &[later]);
    env.schedule();
    // w1 is as loaded as w2 would be after the transfer, but moving 100 MB takes 100 ms.
    let tasks = env.compute_tasks(w1);
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].id, later);
    assert_eq!(
        tasks[0].inputs,
        [InputLocation {
            id: big,
            workers: vec![w1],
            size: 100_000_000
        }]
    );
    env.comm.emptiness_check();
}

#[test]
fn small_inputs_do_not_pin_work_to_a_busy_worker() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let source = TaskId::new(c, 0);
    env.submit(c, vec![spec(source, &[])], &[source]);
    env.schedule();
    assert_eq!(env.computed(w1), [source]);
    env.done_sized(w1, &[(source, 10)]);
    assert_eq!(env.finished(c), [source]);
    let consumers = ids(c, 1..11);
    let tasks = consumers.iter().map(|&id| spec(id, &[source])).collect();
    env.submit(c, tasks, &consumers);
    env.schedule();
    let (on_w1, on_w2) = (env.computed(w1), env.computed(w2));
    assert_eq!(
        (on_w1.len(), on_w2.len()),
        (5, 5),
        "10 consumers of a 10-byte input spread evenly"
    );
    env.comm.emptiness_check();
}

#[test]
fn intermediates_are_released_as_a_chain_runs() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let chain = ids(c, 0..4);
    let tasks = (0..4)
        .map(|i| spec(chain[i], &chain[i.saturating_sub(1)..i]))
        .collect();
    env.submit(c, tasks, &[chain[3]]);
    for i in 0..4 {
        env.schedule();
        let compute = env.compute_tasks(w);
        assert_eq!(compute.iter().map(|t| t.id).collect::<Vec<_>>(), [chain[i]]);
        assert_eq!(
            compute[0].read_by_tasks,
            i < 3,
            "the worker hears which results only a client wants"
        );
        assert!(
            !compute[0].read_elsewhere,
            "and that no other worker reads its kind"
        );
        env.done(w, &[chain[i]]);
        if i > 0 {
            assert_eq!(
                env.released(w),
                [chain[i - 1]],
                "input of step {i} freed once used"
            );
        }
    }
    assert_eq!(env.finished(c), [chain[3]]);
    assert_eq!(
        env.scheduler.task_count(),
        4,
        "the inputs are kept as the wanted result's lineage"
    );
    env.client_msg(c, FromClient::Release(vec![chain[3]]));
    assert_eq!(env.released(w), [chain[3]]);
    assert_eq!(env.scheduler.task_count(), 0, "and forgotten with it");
    env.comm.emptiness_check();
}

impl TestEnv {
    /// One part of a submit sent in parts; `more`: others follow.
    fn submit_part(
        &mut self,
        client: ClientId,
        tasks: Vec<TaskSpec>,
        wanted: &[TaskId],
        more: bool,
    ) {
        let msg = FromClient::Submit {
            functions: Vec::new(),
            tasks,
            wanted: wanted.to_vec(),
            prefixes: prefixes(),
            more,
        };
        self.client_msg(client, msg);
    }
}

#[test]
fn a_result_of_an_early_part_of_a_submit_waits_for_the_parts_that_use_it() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, b, d] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    env.submit_part(c, vec![spec(a, &[])], &[], true);
    env.schedule();
    assert_eq!(env.computed(w), [a]);
    env.done(w, &[a]);
    assert_eq!(
        env.scheduler.task_count(),
        1,
        "a later part may still name it"
    );
    env.comm.emptiness_check();
    env.submit_part(c, vec![spec(b, &[a])], &[], true);
    env.submit_part(c, vec![spec(d, &[b])], &[d], false);
    env.schedule();
    assert_eq!(env.computed(w), [b]);
    env.done(w, &[b]);
    assert_eq!(env.released(w), [a], "held until its last dependent ran");
    env.schedule();
    assert_eq!(env.computed(w), [d]);
    env.done(w, &[d]);
    assert_eq!(env.released(w), [b]);
    assert_eq!(env.finished(c), [d]);
    env.client_msg(c, FromClient::Release(vec![d]));
    assert_eq!(env.released(w), [d]);
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

#[test]
fn a_client_that_leaves_mid_submit_leaves_nothing_held() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let other = env.client();
    let [a, b] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit_part(c, vec![spec(a, &[]), spec(b, &[])], &[b], true);
    env.schedule();
    assert_eq!(sorted(&env.computed(w)), [a, b]);
    env.done(w, &[a, b]);
    assert_eq!(env.finished(c), [b]);
    // Another client holds `b` too: it outlives `c`, `a` does not.
    env.client_msg(other, FromClient::Want(vec![b]));
    assert_eq!(env.finished(other), [b]);
    env.scheduler.remove_client(c, &mut env.comm);
    env.scheduler.sanity_check();
    assert_eq!(env.released(w), [a]);
    assert_eq!(env.scheduler.task_count(), 1);
    env.comm.emptiness_check();
}

#[test]
fn a_submit_listing_a_task_before_its_dependencies_adds_them_first() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, b, d, x, y] = ids(c, 0..5)[..] else {
        unreachable!()
    };
    // Ids descending (indexed by a table) and ascending (by binary search), each listing
    // a dependent before what it depends on.
    let submits = [
        vec![spec(d, &[a, b]), spec(b, &[a]), spec(a, &[])],
        vec![spec(x, &[y]), spec(y, &[])],
    ];
    for (tasks, last) in submits.into_iter().zip([d, x]) {
        env.submit(c, tasks, &[last]);
        let order = run_in_order(&mut env, &[w]);
        assert_eq!(order, if last == d { vec![a, b, d] } else { vec![y, x] });
        assert_eq!(env.finished(c), [last]);
    }
}

#[test]
fn a_rejected_last_part_still_ends_the_submit() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, b] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    let unknown = TaskId::new(c, 99);
    env.submit_part(c, vec![spec(a, &[])], &[], true);
    env.schedule();
    assert_eq!(env.computed(w), [a]);
    env.done(w, &[a]);
    env.submit_part(c, vec![spec(b, &[unknown])], &[b], false);
    assert!(matches!(
        env.comm.take_client(c).as_slice(),
        [ToClient::SubmitRejected { .. }]
    ));
    assert_eq!(env.released(w), [a]);
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

/// Builds a binary reduction over `leaves` leaves; returns the specs and the final id.
fn tree(client: ClientId, leaves: u64) -> (Vec<TaskSpec>, TaskId) {
    let mut specs: Vec<TaskSpec> = ids(client, 0..leaves)
        .into_iter()
        .map(|id| spec(id, &[]))
        .collect();
    let mut level: Vec<TaskId> = specs.iter().map(|s| s.id).collect();
    let mut next_seq = leaves;
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| {
                let id = TaskId::new(client, next_seq);
                next_seq += 1;
                specs.push(spec(id, pair));
                id
            })
            .collect();
    }
    (specs, level[0])
}

#[test]
fn a_tree_reduction_frees_each_level_as_the_next_completes() {
    let mut env = TestEnv::new();
    let workers = env.workers(&[2, 2]);
    let c = env.client();
    let (specs, root) = tree(c, 16);
    let parents: BTreeMap<TaskId, TaskId> = specs
        .iter()
        .flat_map(|s| s.deps.iter().map(move |&d| (d, s.id)))
        .collect();
    env.submit(c, specs, &[root]);
    let mut finished_parents = BTreeSet::new();
    let mut released = BTreeSet::new();
    loop {
        env.schedule();
        let mut assigned = Vec::new();
        for &w in &workers {
            let msgs = env.comm.take_worker(w);
            match msgs.as_slice() {
                [ToWorker::Compute(tasks)] => {
                    assigned.push((w, tasks.iter().map(|t| t.id).collect::<Vec<_>>()));
                }
                [] => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        if assigned.is_empty() {
            break;
        }
        for (w, done) in assigned {
            env.done(w, &done);
            finished_parents.extend(done);
            for w in &workers {
                for msg in env.comm.take_worker(*w) {
                    let ToWorker::Release(ids) = msg else {
                        panic!("unexpected {msg:?}")
                    };
                    for id in ids {
                        assert!(
                            finished_parents.contains(&parents[&id]),
                            "{id} freed before its parent ran"
                        );
                        assert!(released.insert(id), "{id} released twice");
                    }
                }
            }
        }
    }
    assert_eq!(released.len(), 30, "every input freed");
    assert_eq!(env.finished(c), [root]);
    assert_eq!(
        env.scheduler.task_count(),
        31,
        "all kept as the root's lineage"
    );
    env.client_msg(c, FromClient::Release(vec![root]));
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.take_worker(workers[0]);
    env.comm.take_worker(workers[1]);
    env.comm.emptiness_check();
}

#[test]
fn wanted_intermediates_are_kept() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, b] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(a, &[]), spec(b, &[a])], &[a, b]);
    env.schedule();
    env.computed(w);
    env.done(w, &[a]);
    assert_eq!(env.finished(c), [a]);
    env.schedule();
    env.computed(w);
    env.done(w, &[b]);
    assert_eq!(env.finished(c), [b]);
    assert_eq!(env.scheduler.task_count(), 2);
    env.comm.emptiness_check();
}

#[test]
fn a_failure_errs_dependents_and_tells_the_client_once() {
    let mut env = TestEnv::new();
    let w = env.worker(4);
    let c = env.client();
    let bystander = env.client();
    let [a, b, x, y, z, late] = ids(c, 0..6)[..] else {
        unreachable!()
    };
    let other = TaskId::new(bystander, 0);
    env.submit(
        c,
        vec![
            spec(a, &[]),
            spec(b, &[]),
            spec(x, &[a]),
            spec(y, &[x]),
            spec(z, &[x, b]),
        ],
        &[b, y, z],
    );
    env.submit(bystander, vec![spec(other, &[])], &[other]);
    env.schedule();
    assert_eq!(sorted(&env.computed(w)), [a, b, other]);
    env.done(w, &[a, b]);
    assert_eq!(env.finished(c), [b]);
    env.schedule();
    assert_eq!(env.computed(w), [x]);
    let error = ErrorInfo::runtime("ValueError", "bad input".into());
    env.worker_msg(
        w,
        FromWorker::Failed {
            id: x,
            error: error.clone(),
        },
    );
    match env.comm.take_client(c).as_slice() {
        [ToClient::Failed {
            ids,
            origin,
            error: sent,
        }] => {
            assert_eq!(
                (ids.as_slice(), *origin, sent),
                ([y, z].as_slice(), x, &error)
            );
        }
        other => panic!("expected one Failed, got {other:?}"),
    }
    // `a` only fed the failed task; `b` is still wanted.
    assert_eq!(env.released(w), [a]);
    assert!(env.comm.take_client(bystander).is_empty());

    // A new task on top of a failed one fails at once.
    env.submit(c, vec![spec(late, &[y])], &[late]);
    assert!(
        matches!(env.comm.take_client(c).as_slice(), [ToClient::Failed { ids, origin, .. }] if *ids == [late] && *origin == x)
    );
    env.client_msg(c, FromClient::Release(vec![y, z, late]));
    assert_eq!(
        env.scheduler.task_count(),
        2,
        "b and the other client's task remain"
    );

    env.done(w, &[other]);
    assert_eq!(env.finished(bystander), [other]);
    env.comm.emptiness_check();
}

#[test]
fn cancel_stops_tasks_and_everything_downstream() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, b, running, mid, top, keep] = ids(c, 0..6)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(a, &[]), spec(b, &[])], &[a, b]);
    env.schedule();
    env.computed(w);
    env.done(w, &[a, b]);
    assert_eq!(env.finished(c), [a, b]);
    env.submit(
        c,
        vec![
            spec(running, &[a]),
            spec(mid, &[running]),
            spec(top, &[mid, b]),
            spec(keep, &[b]),
        ],
        &[mid, top, keep],
    );
    env.client_msg(c, FromClient::Release(vec![a, b]));
    env.schedule();
    assert_eq!(sorted(&env.computed(w)), [running, keep]);
    env.client_msg(c, FromClient::Cancel(vec![running]));
    assert_eq!(
        env.comm.take_worker(w),
        [ToWorker::Cancel(vec![running]), ToWorker::Release(vec![a])]
    );
    assert_eq!(
        env.comm.take_client(c),
        [ToClient::Cancelled(vec![mid, top])]
    );
    // `b` still feeds `keep`.
    assert_eq!(env.scheduler.task_count(), 2);
    env.done(w, &[running]);
    assert_eq!(
        env.released(w),
        [running],
        "a late result of a cancelled task is dropped"
    );
    env.done(w, &[keep]);
    assert_eq!(env.released(w), [b]);
    assert_eq!(env.finished(c), [keep]);
    env.client_msg(c, FromClient::Cancel(vec![keep]));
    assert_eq!(env.released(w), [keep]);
    assert_eq!(env.comm.take_client(c), [ToClient::Cancelled(vec![keep])]);
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

#[test]
fn want_resends_known_outcomes() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, gone] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(a, &[]), spec(gone, &[])], &[a, gone]);
    env.schedule();
    env.computed(w);
    env.done(w, &[a, gone]);
    assert_eq!(env.finished(c), [a, gone]);
    env.client_msg(c, FromClient::Release(vec![gone]));
    assert_eq!(env.released(w), [gone]);
    env.client_msg(c, FromClient::Want(vec![a]));
    assert_eq!(env.finished(c), [a]);
    env.client_msg(c, FromClient::Want(vec![gone]));
    match env.comm.take_client(c).as_slice() {
        [ToClient::Failed { ids, origin, error }] => {
            assert_eq!((ids.as_slice(), *origin), ([gone].as_slice(), gone));
            assert_eq!(error.type_name, "UnknownTask");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    env.comm.emptiness_check();
}

#[test]
fn a_broken_submit_is_rejected_whole() {
    let mut env = TestEnv::new();
    env.worker(1);
    let c = env.client();
    let stranger = env.client();
    let [a, b, d] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    let foreign = TaskId::new(stranger, 0);
    let unknown = TaskId::new(c, 99);
    let func = FuncId(7);
    let blob = FunctionBlob {
        id: func,
        bytes: Bytes::from_static(b"pickled"),
    };
    let cases: Vec<(Vec<TaskSpec>, Vec<FunctionBlob>, TaskId)> = vec![
        (
            vec![spec(a, &[]), spec(foreign, &[])],
            vec![blob.clone()],
            foreign,
        ),
        (
            vec![spec(a, &[]), spec(b, &[unknown])],
            vec![blob.clone()],
            unknown,
        ),
        (vec![spec(a, &[d]), spec(b, &[a]), spec(d, &[b])], vec![], a),
        (vec![spec(a, &[]), spec(a, &[])], vec![], a),
        (
            vec![
                spec(a, &[]),
                TaskSpec {
                    funcs: smallvec::smallvec![FuncId(8)],
                    ..spec(b, &[])
                },
            ],
            vec![],
            b,
        ),
    ];
    for (tasks, functions, culprit) in cases {
        env.client_msg(
            c,
            FromClient::Submit {
                functions,
                tasks,
                wanted: vec![a],
                prefixes: prefixes(),
                more: false,
            },
        );
        match env.comm.take_client(c).as_slice() {
            [ToClient::SubmitRejected { reason }] => {
                assert!(
                    reason.contains(&culprit.to_string()),
                    "{reason:?} names {culprit}"
                );
            }
            other => panic!("expected SubmitRejected, got {other:?}"),
        }
        assert_eq!(env.scheduler.task_count(), 0, "no task kept");
    }
    // The blob shipped with a rejected submit was kept: the client counts it as shipped.
    env.submit(
        c,
        vec![TaskSpec {
            funcs: smallvec::smallvec![func],
            ..spec(a, &[])
        }],
        &[a],
    );
    assert_eq!(env.scheduler.task_count(), 1);
    env.schedule();
    assert!(matches!(
        env.comm.take_worker(WorkerId(1)).as_slice(),
        [ToWorker::Functions(blobs), ToWorker::Compute(_)] if blobs == &vec![blob]
    ));
    env.comm.emptiness_check();
}

#[test]
fn a_departing_client_frees_everything_and_others_keep_working() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let (leaver, stayer) = (env.client(), env.client());
    let [a, b, c_] = ids(leaver, 0..3)[..] else {
        unreachable!()
    };
    env.submit(
        leaver,
        vec![spec(a, &[]), spec(b, &[a]), spec(c_, &[b])],
        &[c_],
    );
    env.schedule();
    env.computed(w);
    env.done(w, &[a]);
    env.schedule();
    assert_eq!(env.computed(w), [b]);
    let kept = TaskId::new(stayer, 0);
    env.submit(stayer, vec![spec(kept, &[])], &[kept]);
    env.scheduler.remove_client(leaver, &mut env.comm);
    env.scheduler.sanity_check();
    assert_eq!(
        env.comm.take_worker(w),
        [ToWorker::Cancel(vec![b]), ToWorker::Release(vec![a])]
    );
    assert_eq!(env.scheduler.task_count(), 1);
    assert_eq!(env.scheduler.client_count(), 1);
    env.schedule();
    assert_eq!(env.computed(w), [kept]);
    env.done(w, &[kept]);
    assert_eq!(env.finished(stayer), [kept]);
    env.comm.emptiness_check();
}

#[test]
fn a_lost_worker_has_its_tasks_reassigned_and_results_recomputed() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [a, b, sum] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    env.submit(
        c,
        vec![spec(a, &[]), spec(b, &[]), spec(sum, &[a, b])],
        &[sum],
    );
    env.schedule();
    assert_eq!(env.computed(w1), [a]);
    assert_eq!(env.computed(w2), [b]);
    env.done_sized(w1, &[(a, 1_000_000_000)]);
    env.done(w2, &[b]);
    env.schedule();
    assert_eq!(env.computed(w1), [sum], "next to its big input");

    env.lose_worker(w1);
    assert_eq!(env.comm.take_worker(w2), []);
    assert!(!env.comm.knows(w2, w1), "w2 was told w1 left");
    assert_eq!(env.comm.take_client(c), [ToClient::WorkerRemoved(w1)]);
    env.schedule();
    assert_eq!(env.computed(w2), [a], "lost input recomputed first");
    env.done(w2, &[a]);
    env.schedule();
    let tasks = env.compute_tasks(w2);
    assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [sum]);
    assert!(tasks[0].inputs.iter().all(|input| input.workers == [w2]));
    env.done(w2, &[sum]);
    assert_eq!(env.released(w2), [a, b]);
    assert_eq!(env.finished(c), [sum]);
    env.comm.emptiness_check();
}

#[test]
fn a_lost_result_is_recomputed_from_inputs_released_before() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y, z] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(x, &[]), spec(y, &[x]), spec(z, &[y])], &[z]);
    for (task, input) in [(x, None), (y, Some(x)), (z, Some(y))] {
        env.schedule();
        assert_eq!(env.computed(w1), [task]);
        env.done(w1, &[task]);
        if let Some(input) = input {
            assert_eq!(env.released(w1), [input]);
        }
    }
    assert_eq!(env.finished(c), [z]);
    env.lose_worker(w1);
    assert_eq!(env.comm.take_worker(w2), []);
    assert!(!env.comm.knows(w2, w1), "w2 was told w1 left");
    assert_eq!(env.comm.take_client(c), [ToClient::WorkerRemoved(w1)]);
    // The whole chain runs again, each input dropped again once used.
    for (task, input) in [(x, None), (y, Some(x)), (z, Some(y))] {
        env.schedule();
        assert_eq!(env.computed(w2), [task]);
        env.done(w2, &[task]);
        if let Some(input) = input {
            assert_eq!(env.released(w2), [input]);
        }
    }
    assert_eq!(env.finished(c), [z]);
    assert_eq!(env.scheduler.recomputed_tasks(), 3);
    env.client_msg(c, FromClient::Release(vec![z]));
    assert_eq!(env.released(w2), [z]);
    assert_eq!(
        env.scheduler.task_count(),
        0,
        "the lineage goes with the result"
    );
    env.comm.emptiness_check();
}

#[test]
fn a_lost_result_whose_input_failed_on_recompute_fails_too() {
    let mut env = TestEnv::new();
    let [w1, w2, w3] = env.workers(&[1, 1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(x, &[]), spec(y, &[x])], &[x, y]);
    env.schedule();
    assert_eq!(env.computed(w1), [x]);
    env.done(w1, &[x]);
    assert_eq!(env.finished(c), [x]);
    env.schedule();
    assert_eq!(env.computed(w1), [y]);
    env.done(w1, &[y]);
    assert_eq!(env.finished(c), [y]);
    env.worker_msg(w2, FromWorker::Replicated(vec![y]));
    // x is lost and recomputed; y survives on w2.
    env.lose_worker(w1);
    env.comm.take_worker(w2);
    env.comm.take_worker(w3);
    env.comm.take_client(c);
    env.schedule();
    let again = env.computed(w2);
    assert_eq!(again, [x]);
    let error = ErrorInfo::runtime("OSError", "input file vanished".into());
    env.worker_msg(w2, FromWorker::Failed { id: x, error });
    assert!(
        matches!(env.comm.take_client(c).as_slice(), [ToClient::Failed { ids, origin, .. }] if *ids == [x] && *origin == x)
    );
    // Now y is lost as well: its input cannot be recomputed, so it fails with x's error.
    env.lose_worker(w2);
    assert_eq!(env.comm.take_worker(w3), []);
    assert!(!env.comm.knows(w3, w2), "w3 was told w2 left");
    match env.comm.take_client(c).as_slice() {
        [ToClient::WorkerRemoved(_), ToClient::Failed { ids, origin, error }] => {
            assert_eq!((ids.as_slice(), *origin), ([y].as_slice(), x));
            assert_eq!(error.type_name, "OSError");
        }
        other => panic!("expected WorkerRemoved and Failed, got {other:?}"),
    }
    env.schedule();
    env.comm.emptiness_check();
}

#[test]
fn functions_are_sent_once_per_worker() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let func = FuncId(42);
    let blob = FunctionBlob {
        id: func,
        bytes: Bytes::from_static(b"def f(): ..."),
    };
    let uses_func = |id| TaskSpec {
        funcs: smallvec::smallvec![func],
        ..spec(id, &[])
    };
    let first = ids(c, 0..2);
    let msg = FromClient::Submit {
        functions: vec![blob.clone(), blob.clone()],
        tasks: first.iter().map(|&id| uses_func(id)).collect(),
        wanted: first.clone(),
        prefixes: prefixes(),
        more: false,
    };
    env.client_msg(c, msg);
    env.schedule();
    for w in [w1, w2] {
        let msgs = env.comm.take_worker(w);
        assert!(
            matches!(msgs.as_slice(), [ToWorker::Functions(blobs), ToWorker::Compute(_)] if *blobs == [blob.clone()]),
            "{msgs:?}"
        );
    }
    env.done(w1, &first[..1]);
    env.done(w2, &first[1..]);
    assert_eq!(env.comm.take_client(c).len(), 2);
    let second = ids(c, 2..4);
    env.submit(c, second.iter().map(|&id| uses_func(id)).collect(), &second);
    env.schedule();
    assert_eq!(
        env.computed(w1).len() + env.computed(w2).len(),
        2,
        "code not sent again"
    );
    env.comm.emptiness_check();
}

#[test]
fn a_function_lives_while_a_task_or_a_client_needs_it() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let (c, other) = (env.client(), env.client());
    let func = FuncId(42);
    let blob = FunctionBlob {
        id: func,
        bytes: Bytes::from(vec![7u8; 100_000]),
    };
    let uses_func = |id| TaskSpec {
        funcs: smallvec::smallvec![func],
        ..spec(id, &[])
    };
    let [a, b] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    let submit = |tasks, functions, wanted| FromClient::Submit {
        functions,
        tasks,
        wanted,
        prefixes: prefixes(),
        more: false,
    };
    env.client_msg(c, submit(vec![uses_func(a)], vec![blob.clone()], vec![a]));
    env.schedule();
    assert!(matches!(
        env.comm.take_worker(w).as_slice(),
        [ToWorker::Functions(_), ToWorker::Compute(_)]
    ));
    env.done(w, &[a]);
    env.comm.take_client(c);
    // The client lets go of the function, but its task still refers to it.
    env.client_msg(c, FromClient::ReleaseFunctions(vec![func]));
    assert_eq!(env.scheduler.functions.len(), 1);
    env.comm.emptiness_check();
    // Its last task goes: the function goes too, here and on the worker.
    env.client_msg(c, FromClient::Release(vec![a]));
    assert!(env.scheduler.functions.is_empty());
    assert_eq!(
        env.comm.take_worker(w),
        [
            ToWorker::Release(vec![a]),
            ToWorker::ReleaseFunctions(vec![func])
        ]
    );
    // Used again without its code: refused, as it was released.
    env.client_msg(c, submit(vec![uses_func(b)], vec![], vec![b]));
    assert!(matches!(
        env.comm.take_client(c).as_slice(),
        [ToClient::SubmitRejected { reason }] if reason.contains("released")
    ));
    // Shipped again, it reaches the worker again.
    env.client_msg(c, submit(vec![uses_func(b)], vec![blob.clone()], vec![b]));
    env.schedule();
    assert!(matches!(
        env.comm.take_worker(w).as_slice(),
        [ToWorker::Functions(blobs), ToWorker::Compute(_)] if *blobs == [blob.clone()]
    ));
    // Another client ships the same code: it stays while that client may use it.
    env.client_msg(other, submit(vec![], vec![blob.clone()], vec![]));
    env.scheduler.remove_client(c, &mut env.comm);
    env.scheduler.sanity_check();
    assert_eq!(env.comm.take_worker(w), [ToWorker::Cancel(vec![b])]);
    assert_eq!(env.scheduler.functions.len(), 1);
    env.scheduler.remove_client(other, &mut env.comm);
    env.scheduler.sanity_check();
    assert_eq!(
        env.comm.take_worker(w),
        [ToWorker::ReleaseFunctions(vec![func])]
    );
    assert!(env.scheduler.functions.is_empty());
    env.comm.emptiness_check();
}

#[test]
fn stray_results_and_copies_are_released() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let a = TaskId::new(c, 0);
    let stray = TaskId::new(c, 77);
    env.done(w1, &[stray]);
    assert_eq!(env.released(w1), [stray]);
    env.submit(c, vec![spec(a, &[])], &[a]);
    env.schedule();
    env.computed(w1);
    env.done(w1, &[a]);
    env.finished(c);
    env.worker_msg(w2, FromWorker::Replicated(vec![a, stray]));
    assert_eq!(env.released(w2), [stray]);
    env.client_msg(c, FromClient::Release(vec![a]));
    assert_eq!(env.released(w1), [a]);
    assert_eq!(env.released(w2), [a], "the replica is dropped too");
    env.comm.emptiness_check();
}

#[test]
fn ready_tasks_wait_for_a_worker() {
    let mut env = TestEnv::new();
    let c = env.client();
    let roots = ids(c, 0..3);
    env.submit(c, roots.iter().map(|&id| spec(id, &[])).collect(), &roots);
    env.schedule();
    env.comm.emptiness_check();
    let w = env.worker(1);
    env.schedule();
    assert_eq!(env.computed(w), roots);
}

/// The benchmark's loop, small: every task finishes and everything is freed at the end.
#[test]
fn a_whole_workload_runs_to_completion() {
    let mut env = TestEnv::new();
    let workers = env.workers(&[1, 2, 3]);
    let c = env.client();
    let independent = ids(c, 100_000..101_000);
    let (mut specs, root) = tree(c, 128);
    specs.extend(independent.iter().map(|&id| spec(id, &[])));
    let wanted: Vec<TaskId> = independent.iter().copied().chain([root]).collect();
    let total = specs.len();
    env.submit(c, specs, &wanted);
    let mut computed = 0;
    loop {
        env.schedule();
        let mut any = false;
        for &w in &workers {
            let msgs = env.comm.take_worker(w);
            for msg in msgs {
                match msg {
                    ToWorker::Compute(tasks) => {
                        any = true;
                        computed += tasks.len();
                        let done: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
                        env.done(w, &done);
                    }
                    ToWorker::Release(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        if !any {
            break;
        }
    }
    assert_eq!(computed, total);
    let finished: usize = env
        .comm
        .take_client(c)
        .iter()
        .map(|msg| match msg {
            ToClient::Finished(done) => done.len(),
            other => panic!("unexpected {other:?}"),
        })
        .sum();
    assert_eq!(finished, wanted.len());
    assert_eq!(
        env.scheduler.task_count(),
        total,
        "the wanted results and the root's lineage"
    );
    env.client_msg(c, FromClient::Release(wanted));
    assert_eq!(env.scheduler.task_count(), 0);
    for w in workers {
        env.comm.take_worker(w);
    }
    env.comm.emptiness_check();
}

#[test]
fn restricted_tasks_run_only_on_their_workers_whatever_the_locality() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    // x is a root restricted to w2, though w1 is as idle; y's input will sit on w2.
    let tasks = vec![
        TaskSpec {
            workers: vec![w2],
            ..spec(x, &[])
        },
        TaskSpec {
            workers: vec![w1],
            ..spec(y, &[x])
        },
    ];
    env.submit(c, tasks, &[y]);
    env.schedule();
    assert_eq!(env.computed(w2), [x]);
    env.done_sized(w2, &[(x, 1 << 30)]);
    env.schedule();
    // Unrestricted, y would run where its gigabyte input is.
    let computed = env.compute_tasks(w1);
    assert_eq!(computed.iter().map(|t| t.id).collect::<Vec<_>>(), [y]);
    assert_eq!(computed[0].inputs[0].workers, [w2]);
    env.done(w1, &[y]);
    assert_eq!(env.released(w2), [x]);
    assert_eq!(env.finished(c), [y]);
    env.comm.emptiness_check();
}

#[test]
fn a_task_restricted_to_workers_that_are_gone_fails_instead_of_waiting() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.lose_worker(w2);
    env.comm.take_worker(w1);
    env.comm.take_client(c);
    let never_registered = WorkerId(99);
    let tasks = vec![
        TaskSpec {
            workers: vec![w2, never_registered],
            ..spec(x, &[])
        },
        spec(y, &[x]),
    ];
    env.submit(c, tasks, &[y]);
    env.schedule();
    match env.comm.take_client(c).as_slice() {
        [ToClient::Failed { ids, origin, error }] => {
            assert_eq!((ids.as_slice(), *origin), ([y].as_slice(), x));
            assert_eq!(error.type_name, "NoWorkerError");
            assert!(error.message.contains("[2, 99]"), "{}", error.message);
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // The failed future keeps y (and its error, and x as its lineage) until the client
    // lets go.
    assert_eq!(env.scheduler.task_count(), 2);
    env.client_msg(c, FromClient::Release(vec![y]));
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

#[test]
fn work_overflowing_a_busy_holder_goes_to_its_node_before_the_network() {
    let mut env = TestEnv::new();
    let w1 = env.worker_on("a", 1);
    let w2 = env.worker_on("b", 1); // least loaded overall by id, but across the network
    let w3 = env.worker_on("a", 1);
    let c = env.client();
    let ids = ids(c, 0..151);
    let (big, consumers) = (ids[0], &ids[1..]);
    env.submit(c, vec![spec(big, &[])], &[big]);
    env.schedule();
    assert_eq!(env.computed(w1), [big]);
    env.done_sized(w1, &[(big, 20_000_000)]);
    assert_eq!(env.finished(c), [big]);
    let specs = consumers.iter().map(|&id| spec(id, &[big])).collect();
    env.submit(c, specs, consumers);
    env.schedule();
    // At 0.1 ms per task, w1's queue beats a 10 ms copy of 20 MB from its node's shared
    // memory up to ~100 tasks; after that w3 (same node) takes the rest. Over the network
    // it would take 20 ms, so w2 gets nothing.
    let on_w1 = env.computed(w1).len();
    let on_w3 = env.computed(w3).len();
    assert_eq!(on_w1 + on_w3, 150);
    assert!(on_w1 >= 100 && on_w3 >= 20, "w1 {on_w1}, w3 {on_w3}");
    assert!(env.comm.take_worker(w2).is_empty());
    env.comm.emptiness_check();
}

#[test]
fn short_tasks_stay_with_the_holder_of_their_big_input_whatever_the_average_task() {
    // A rechunk: a merge makes a 126 MB intermediate (1 s), then 72 slices of it (0.5 ms
    // each) are ready at once. The average task is long, but the slices' own duration is
    // known: all 72 queued on the holder (36 ms) start before a copy of 126 MB to its
    // neighbour would end (63 ms), so none goes there.
    let mut env = TestEnv::new();
    let w1 = env.worker_on("a", 1);
    let w2 = env.worker_on("a", 1);
    let c = env.client();
    let ids = ids(c, 0..74);
    let (merge, first_slice, slices) = (ids[0], ids[1], &ids[2..]);
    let kind = |id, deps: &[TaskId], prefix| TaskSpec {
        prefix,
        ..spec(id, deps)
    };
    let submit = |env: &mut TestEnv, tasks: Vec<TaskSpec>, wanted: &[TaskId]| {
        let msg = FromClient::Submit {
            functions: Vec::new(),
            tasks,
            wanted: wanted.to_vec(),
            prefixes: vec!["rechunk-merge".into(), "rechunk-split".into()],
            more: false,
        };
        env.client_msg(c, msg);
        env.schedule();
    };
    let done = |env: &mut TestEnv, id, size, duration_us| {
        let done = TaskDone {
            id,
            size,
            duration_us,
            report_delay_us: 0,
        };
        env.worker_msg(w1, FromWorker::Done(vec![done]));
        assert_eq!(env.finished(c), [id]);
    };
    submit(&mut env, vec![kind(merge, &[], 0)], &[merge]);
    assert_eq!(env.computed(w1), [merge]);
    done(&mut env, merge, 126_000_000, 1_000_000);
    submit(
        &mut env,
        vec![kind(first_slice, &[merge], 1)],
        &[first_slice],
    );
    assert_eq!(env.computed(w1), [first_slice]);
    done(&mut env, first_slice, 1_750_000, 500);
    let specs = slices.iter().map(|&id| kind(id, &[merge], 1)).collect();
    submit(&mut env, specs, slices);
    assert_eq!(env.computed(w1).len(), slices.len());
    assert!(env.comm.take_worker(w2).is_empty(), "a slice went to w2");
    env.comm.emptiness_check();
}

#[test]
fn results_of_a_kind_other_workers_read_are_marked_for_copying_out_at_once() {
    // Kind 0 is made on w1 and read on w2 (an array made on one rank, summed on another);
    // kind 1 is made and read on w1 (a rechunk's intermediate, sliced where it is).
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let on = |worker, id, deps: &[TaskId], prefix| TaskSpec {
        workers: vec![worker],
        prefix,
        ..spec(id, deps)
    };
    let run = |env: &mut TestEnv, round: u64| -> (bool, bool) {
        let [made, sliced, read, slice] = ids(c, 4 * round..4 * round + 4)[..] else {
            unreachable!()
        };
        let msg = FromClient::Submit {
            functions: Vec::new(),
            tasks: vec![
                on(w1, made, &[], 0),
                on(w1, sliced, &[], 1),
                on(w2, read, &[made], 2),
                on(w1, slice, &[sliced], 2),
            ],
            wanted: vec![read, slice],
            prefixes: vec!["make".into(), "merge".into(), "use".into()],
            more: false,
        };
        env.client_msg(c, msg);
        env.schedule();
        let compute = env.compute_tasks(w1);
        let marked = |id| compute.iter().find(|t| t.id == id).unwrap().read_elsewhere;
        let marks = (marked(made), marked(sliced));
        env.done(w1, &[made, sliced]);
        env.schedule();
        assert_eq!(env.computed(w1), [slice]);
        assert_eq!(env.computed(w2), [read]);
        env.done(w2, &[read]);
        env.done(w1, &[slice]);
        let _ = env.comm.take_client(c);
        let _ = (env.comm.take_worker(w1), env.comm.take_worker(w2));
        marks
    };
    assert_eq!(run(&mut env, 0), (false, false), "nothing known yet");
    assert_eq!(run(&mut env, 1), (true, false));
    env.comm.emptiness_check();
}

#[test]
fn a_task_whose_workers_keep_dying_fails_with_killed_worker() {
    let mut env = TestEnv::new();
    let workers = env.workers(&[1, 1, 1, 1]);
    let c = env.client();
    let [killer, fine] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(killer, &[])], &[killer]);
    let mut dead = Vec::new();
    for attempt in 1..=3 {
        env.schedule();
        let on = *workers
            .iter()
            .find(|&&w| !dead.contains(&w) && !env.comm.take_worker(w).is_empty())
            .expect("the task went to a live worker");
        dead.push(on);
        env.lose_worker(on);
        let msgs = env.comm.take_client(c);
        if attempt < 3 {
            assert_eq!(msgs, [ToClient::WorkerRemoved(on)], "attempt {attempt}");
        } else {
            match msgs.as_slice() {
                [ToClient::WorkerRemoved(_), ToClient::Failed { ids, error, .. }] => {
                    assert_eq!(ids, &[killer]);
                    assert_eq!(error.type_name, "KilledWorker");
                    for w in &dead {
                        assert!(
                            error.message.contains(&format!("worker {w} (")),
                            "{}",
                            error.message
                        );
                    }
                    assert!(
                        error.message.contains("allowed_failures = 3"),
                        "{}",
                        error.message
                    );
                }
                other => panic!("expected WorkerRemoved and Failed, got {other:?}"),
            }
        }
    }
    // The last worker still works.
    for w in &workers {
        env.comm.take_worker(*w);
    }
    env.submit(c, vec![spec(fine, &[])], &[fine]);
    env.schedule();
    let last = workers.iter().find(|w| !dead.contains(w)).copied();
    assert_eq!(last.map(|w| env.computed(w)), Some(vec![fine]));
    env.comm.emptiness_check();
}

#[test]
fn workers_leaving_on_purpose_count_nothing_against_their_tasks() {
    let mut env = TestEnv::new();
    let c = env.client();
    let task = TaskId::new(c, 0);
    env.submit(c, vec![spec(task, &[])], &[task]);
    for _ in 0..5 {
        let w = env.worker(1);
        env.schedule();
        assert_eq!(env.computed(w), [task]);
        env.worker_msg(w, FromWorker::Leaving);
        // Its connection closes after it said so.
        env.lose_worker(w);
        assert_eq!(env.comm.take_client(c), [ToClient::WorkerRemoved(w)]);
    }
    let w = env.worker(1);
    env.schedule();
    assert_eq!(env.computed(w), [task]);
    env.done(w, &[task]);
    assert_eq!(env.finished(c), [task]);
    env.comm.emptiness_check();
}

#[test]
fn an_input_a_worker_could_not_fetch_is_recomputed_and_the_task_placed_again() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit(
        c,
        vec![
            spec(x, &[]),
            TaskSpec {
                workers: vec![w2],
                ..spec(y, &[x])
            },
        ],
        &[y],
    );
    env.schedule();
    assert_eq!(env.computed(w1), [x]);
    env.done(w1, &[x]);
    env.schedule();
    assert_eq!(env.computed(w2), [y]);
    // w1 still counts as alive, but w2 could not get x from it.
    let missing = FromWorker::InputMissing {
        id: y,
        input: x,
        holders: vec![w1],
    };
    env.worker_msg(w2, missing);
    assert_eq!(env.released(w1), [x], "w1's copy is given up");
    env.schedule();
    assert_eq!(
        env.computed(w1),
        [x],
        "x computed again (w1 is least loaded)"
    );
    env.done(w1, &[x]);
    env.schedule();
    assert_eq!(env.computed(w2), [y]);
    env.done(w2, &[y]);
    assert_eq!(env.finished(c), [y]);
    assert_eq!(env.released(w1), [x]);
    // A report about a task the worker no longer runs changes nothing.
    let stale = FromWorker::InputMissing {
        id: y,
        input: x,
        holders: vec![w1],
    };
    env.worker_msg(w2, stale);
    env.comm.emptiness_check();
}

#[test]
fn results_a_worker_lost_are_recomputed_and_the_tasks_it_dropped_placed_again() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y, z] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    let on_w1 = |spec: TaskSpec| TaskSpec {
        workers: vec![w1],
        ..spec
    };
    env.submit(
        c,
        vec![
            on_w1(spec(x, &[])),
            on_w1(spec(z, &[])),
            on_w1(spec(y, &[x, z])),
        ],
        &[y],
    );
    env.schedule();
    let compute = env.compute_tasks(w1);
    assert_eq!(
        sorted(&compute.iter().map(|t| t.id).collect::<Vec<_>>()),
        sorted(&[x, z])
    );
    env.done(w1, &[x, z]);
    env.worker_msg(w2, FromWorker::Replicated(vec![z]));
    env.schedule();
    assert_eq!(env.computed(w1), [y]);
    // The executor keeping x and z on w1 died: w1 dropped y, which read them.
    let lost = FromWorker::ResultsLost(vec![x, z]);
    env.worker_msg(w1, round_trip(&lost));
    env.schedule();
    assert_eq!(
        env.computed(w1),
        [x],
        "x had no other copy; z is still on w2"
    );
    assert_eq!(env.scheduler.recomputed_tasks(), 1);
    env.done(w1, &[x]);
    env.schedule();
    assert_eq!(env.computed(w1), [y], "y placed again once x is back");
    env.done(w1, &[y]);
    assert_eq!(env.finished(c), [y]);
    assert_eq!(env.released(w1), [x]);
    assert_eq!(env.released(w2), [z]);
    // Reported again, or for a task it does not hold: nothing changes.
    env.worker_msg(w2, FromWorker::ResultsLost(vec![x]));
    env.comm.emptiness_check();
}

#[test]
fn a_wanted_result_kept_elsewhere_is_announced_again_when_a_holder_dies() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let x = TaskId::new(c, 0);
    env.submit(c, vec![spec(x, &[])], &[x]);
    env.schedule();
    assert_eq!(env.computed(w1), [x]);
    env.done(w1, &[x]);
    assert_eq!(env.finished(c), [x]);
    env.worker_msg(w2, FromWorker::Replicated(vec![x]));
    env.lose_worker(w1);
    assert_eq!(env.comm.take_worker(w2), []);
    assert!(!env.comm.knows(w2, w1), "w2 was told w1 left");
    match env.comm.take_client(c).as_slice() {
        [ToClient::WorkerRemoved(gone), ToClient::Finished(finished)] => {
            assert_eq!(*gone, w1);
            assert_eq!((finished[0].id, finished[0].worker), (x, w2));
        }
        other => panic!("expected WorkerRemoved and Finished, got {other:?}"),
    }
    assert_eq!(env.scheduler.recomputed_tasks(), 0);
    env.comm.emptiness_check();
}

#[test]
fn a_task_with_retries_runs_again_after_raising_then_errs_when_they_are_spent() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    let retried = TaskSpec {
        options: TaskOptions {
            retries: 2,
            ..TaskOptions::default()
        },
        ..spec(x, &[])
    };
    env.submit(c, vec![retried, spec(y, &[])], &[x, y]);
    env.schedule();
    let fail = |env: &mut TestEnv, worker| {
        let error = ErrorInfo::runtime("ValueError", "flaky".into());
        env.worker_msg(worker, FromWorker::Failed { id: x, error });
    };
    let runs_x = |env: &mut TestEnv| {
        let assigned_x = |msgs: &[ToWorker]| matches!(msgs, [ToWorker::Compute(tasks)] if tasks.iter().any(|t| t.id == x));
        let runs: Vec<WorkerId> = [w1, w2]
            .into_iter()
            .filter(|&w| assigned_x(&env.comm.take_worker(w)))
            .collect();
        assert_eq!(runs.len(), 1, "x goes to one worker at a time");
        runs[0]
    };
    let first = runs_x(&mut env);
    fail(&mut env, first);
    assert!(
        env.comm.take_client(c).is_empty(),
        "a retry is not a failure"
    );
    env.schedule();
    let second = runs_x(&mut env);
    fail(&mut env, second);
    env.schedule();
    let third = runs_x(&mut env);
    fail(&mut env, third);
    match env.comm.take_client(c).as_slice() {
        [ToClient::Failed { ids, origin, error }] => {
            assert_eq!((ids.as_slice(), *origin), ([x].as_slice(), x));
            assert_eq!(error.message, "flaky");
        }
        other => panic!("expected Failed after the third run, got {other:?}"),
    }
    env.schedule();
    assert!(env.comm.take_worker(w1).is_empty() && env.comm.take_worker(w2).is_empty());
}

#[test]
fn allow_other_workers_prefers_its_workers_and_runs_elsewhere_when_they_are_gone() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    let loose = |id| TaskSpec {
        workers: vec![w2],
        options: TaskOptions {
            allow_other_workers: true,
            ..TaskOptions::default()
        },
        ..spec(id, &[])
    };
    env.submit(c, vec![loose(x)], &[x]);
    env.schedule();
    assert_eq!(
        env.computed(w2),
        [x],
        "its preferred worker, though w1 is as idle"
    );
    env.done(w2, &[x]);
    env.lose_worker(w2);
    env.comm.take_worker(w1);
    env.comm.take_client(c);
    env.submit(c, vec![loose(y)], &[y]);
    env.schedule();
    // Both on w1, not NoWorkerError: y, and x, whose only copy went with w2.
    assert_eq!(sorted(&env.computed(w1)), [x, y]);
}

// ------------------------------------------------------------------ coordination

fn coordinate(env: &mut TestEnv, client: ClientId, request: u64, op: Coordinate) {
    env.client_msg(client, FromClient::Coordinate { request, op });
}

/// The `Coordinated` answers `client` was sent, as (request, reply).
fn answers(env: &mut TestEnv, client: ClientId) -> Vec<(u64, Coordinated)> {
    env.comm
        .take_client(client)
        .into_iter()
        .map(|msg| match msg {
            ToClient::Coordinated { request, reply } => (request, reply),
            other => panic!("expected Coordinated, got {other:?}"),
        })
        .collect()
}

fn acquire(name: &str, max_leases: u32) -> Coordinate {
    Coordinate::Acquire {
        name: name.into(),
        max_leases,
    }
}

#[test]
fn a_lock_is_granted_in_turn_and_a_client_that_leaves_gives_it_back() {
    let mut env = TestEnv::new();
    let [a, b, c] = [env.client(), env.client(), env.client()];
    coordinate(&mut env, a, 1, acquire("file.nc", 1));
    assert_eq!(answers(&mut env, a), [(1, Coordinated::Granted)]);
    coordinate(&mut env, b, 7, acquire("file.nc", 1));
    coordinate(&mut env, c, 3, acquire("file.nc", 1));
    assert!(answers(&mut env, b).is_empty() && answers(&mut env, c).is_empty());
    let held = Coordinate::Leases {
        name: "file.nc".into(),
    };
    coordinate(&mut env, c, 4, held.clone());
    assert_eq!(answers(&mut env, c), [(4, Coordinated::Count(1))]);

    let release = |lease| Coordinate::Release {
        name: "file.nc".into(),
        lease,
    };
    coordinate(&mut env, b, 8, release(7));
    assert!(matches!(
        &answers(&mut env, b)[..],
        [(8, Coordinated::Refused(_))]
    ));
    coordinate(&mut env, a, 2, release(1));
    assert_eq!(answers(&mut env, a), [(2, Coordinated::Done)]);
    assert_eq!(answers(&mut env, b), [(7, Coordinated::Granted)]);
    // b dies holding it (its connection closed): c gets it.
    env.scheduler.remove_client(b, &mut env.comm);
    env.scheduler.sanity_check();
    assert_eq!(answers(&mut env, c), [(3, Coordinated::Granted)]);
    coordinate(&mut env, c, 5, release(3));
    assert_eq!(answers(&mut env, c), [(5, Coordinated::Done)]);
    coordinate(&mut env, c, 6, held);
    assert_eq!(answers(&mut env, c), [(6, Coordinated::Count(0))]);
    env.comm.emptiness_check();
}

#[test]
fn a_withdrawn_wait_is_answered_once_and_a_grant_before_it_stands() {
    let mut env = TestEnv::new();
    let [a, b] = [env.client(), env.client()];
    coordinate(&mut env, a, 1, acquire("l", 1));
    coordinate(&mut env, b, 1, acquire("l", 1));
    answers(&mut env, a);
    env.client_msg(b, FromClient::Withdraw(1));
    assert_eq!(answers(&mut env, b), [(1, Coordinated::Withdrawn)]);
    env.client_msg(b, FromClient::Withdraw(1)); // answered already: nothing more
    assert!(answers(&mut env, b).is_empty());
    // a's grant crossed a's withdraw: a keeps it (it takes the grant it gets).
    coordinate(&mut env, b, 2, acquire("l", 1));
    env.client_msg(a, FromClient::Withdraw(1));
    assert!(answers(&mut env, a).is_empty() && answers(&mut env, b).is_empty());
    let release = Coordinate::Release {
        name: "l".into(),
        lease: 1,
    };
    coordinate(&mut env, a, 2, release);
    assert_eq!(answers(&mut env, a), [(2, Coordinated::Done)]);
    assert_eq!(answers(&mut env, b), [(2, Coordinated::Granted)]);
    env.comm.emptiness_check();
}

#[test]
fn a_semaphore_grants_its_leases_at_once_then_in_order() {
    let mut env = TestEnv::new();
    let a = env.client();
    for request in 1..=4 {
        coordinate(&mut env, a, request, acquire("slots", 2));
    }
    assert_eq!(
        answers(&mut env, a),
        [(1, Coordinated::Granted), (2, Coordinated::Granted)]
    );
    let release = |lease| Coordinate::Release {
        name: "slots".into(),
        lease,
    };
    coordinate(&mut env, a, 5, release(2));
    assert_eq!(
        answers(&mut env, a),
        [(3, Coordinated::Granted), (5, Coordinated::Done)]
    );
}

#[test]
fn events_variables_and_queues_answer_their_waiters() {
    let mut env = TestEnv::new();
    let [a, b] = [env.client(), env.client()];
    let name = || "x".to_string();
    // Event: waits until set, then answers at once until cleared.
    coordinate(&mut env, b, 1, Coordinate::EventWait { name: name() });
    coordinate(&mut env, b, 2, Coordinate::EventIsSet { name: name() });
    assert_eq!(answers(&mut env, b), [(2, Coordinated::Flag(false))]);
    coordinate(&mut env, a, 1, Coordinate::EventSet { name: name() });
    assert_eq!(answers(&mut env, a), [(1, Coordinated::Done)]);
    assert_eq!(answers(&mut env, b), [(1, Coordinated::Done)]);
    coordinate(&mut env, b, 3, Coordinate::EventWait { name: name() });
    assert_eq!(answers(&mut env, b), [(3, Coordinated::Done)]);
    coordinate(&mut env, a, 2, Coordinate::EventClear { name: name() });
    coordinate(&mut env, a, 3, Coordinate::EventIsSet { name: name() });
    assert_eq!(
        answers(&mut env, a),
        [(2, Coordinated::Done), (3, Coordinated::Flag(false))]
    );

    // Variable: a get waits for a value; the last value stays until deleted.
    let value = |v: &'static [u8]| Bytes::from_static(v);
    coordinate(&mut env, b, 4, Coordinate::VariableGet { name: name() });
    assert!(answers(&mut env, b).is_empty());
    let set = |v| Coordinate::VariableSet {
        name: name(),
        value: v,
    };
    coordinate(&mut env, a, 4, set(value(b"one")));
    assert_eq!(
        answers(&mut env, b),
        [(4, Coordinated::Value(value(b"one")))]
    );
    coordinate(&mut env, a, 5, set(value(b"two")));
    coordinate(&mut env, a, 6, Coordinate::VariableGet { name: name() });
    assert_eq!(
        answers(&mut env, a),
        [
            (4, Coordinated::Done),
            (5, Coordinated::Done),
            (6, Coordinated::Value(value(b"two")))
        ]
    );
    coordinate(&mut env, a, 7, Coordinate::VariableDelete { name: name() });
    coordinate(&mut env, a, 8, Coordinate::VariableGet { name: name() });
    assert_eq!(answers(&mut env, a), [(7, Coordinated::Done)]);
    env.client_msg(a, FromClient::Withdraw(8));
    assert_eq!(answers(&mut env, a), [(8, Coordinated::Withdrawn)]);

    // Queue: items in order; a get waits for the next put, first waiter first.
    let put = |v| Coordinate::QueuePut {
        name: name(),
        value: v,
    };
    coordinate(&mut env, b, 5, Coordinate::QueueGet { name: name() });
    coordinate(&mut env, b, 6, Coordinate::QueueGet { name: name() });
    coordinate(&mut env, a, 9, put(value(b"p")));
    coordinate(&mut env, a, 10, put(value(b"q")));
    coordinate(&mut env, a, 11, put(value(b"r")));
    coordinate(&mut env, a, 12, Coordinate::QueueSize { name: name() });
    assert_eq!(
        answers(&mut env, b),
        [
            (5, Coordinated::Value(value(b"p"))),
            (6, Coordinated::Value(value(b"q")))
        ]
    );
    assert_eq!(
        answers(&mut env, a).last(),
        Some(&(12, Coordinated::Count(1)))
    );
    // A waiter that leaves stops waiting: the next put is kept for the next get.
    coordinate(&mut env, b, 7, Coordinate::QueueGet { name: name() });
    assert_eq!(answers(&mut env, b), [(7, Coordinated::Value(value(b"r")))]);
    coordinate(&mut env, b, 8, Coordinate::QueueGet { name: name() });
    env.scheduler.remove_client(b, &mut env.comm);
    env.scheduler.sanity_check();
    coordinate(&mut env, a, 13, put(value(b"s")));
    coordinate(&mut env, a, 14, Coordinate::QueueGet { name: name() });
    assert_eq!(
        answers(&mut env, a),
        [
            (13, Coordinated::Done),
            (14, Coordinated::Value(value(b"s")))
        ]
    );
    env.comm.emptiness_check();
}

// ------------------------------------------------------------------ resources

fn needing(id: TaskId, resources: &str) -> TaskSpec {
    TaskSpec {
        options: TaskOptions {
            resources: resources.parse().expect("valid resources"),
            ..TaskOptions::default()
        },
        ..spec(id, &[])
    }
}

#[test]
fn tasks_needing_resources_go_only_where_they_are_free_one_holder_at_a_time() {
    let mut env = TestEnv::new();
    let plain = env.worker_on("a", 4);
    let gpu = env.worker_offering("b", 4, "GPU=1".parse().expect("valid"));
    let c = env.client();
    let [x, y, z] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    env.submit(
        c,
        vec![needing(x, "GPU=1"), needing(y, "GPU=1"), spec(z, &[])],
        &[x, y, z],
    );
    env.schedule();
    // One GPU: x runs there, y waits for it though three threads are idle; z goes anywhere.
    let on_gpu = env.computed(gpu);
    let on_plain = env.computed(plain);
    assert!(on_gpu.contains(&x) && !on_gpu.contains(&y) && !on_plain.contains(&y));
    assert!(!on_plain.contains(&x));
    env.done(gpu, &[x]);
    env.schedule();
    assert_eq!(env.computed(gpu), [y], "the GPU is free again");
    if !on_gpu.contains(&z) {
        env.done(plain, &[z]);
    } else {
        env.done(gpu, &[z]);
    }
    env.done(gpu, &[y]);
}

#[test]
fn a_task_needing_resources_no_worker_has_fails_at_once() {
    let mut env = TestEnv::new();
    env.worker_offering("a", 1, "GPU=1".parse().expect("valid"));
    let c = env.client();
    let [x] = ids(c, 0..1)[..] else {
        unreachable!()
    };
    env.submit(c, vec![needing(x, "GPU=2")], &[x]);
    env.schedule();
    match env.comm.take_client(c).as_slice() {
        [ToClient::Failed { ids, error, .. }] => {
            assert_eq!(ids.as_slice(), [x]);
            assert_eq!(error.type_name, "NoWorkerError");
            assert!(error.message.contains("GPU=2"), "{}", error.message);
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn a_worker_placed_on_gpus_offers_them_as_gpu_resources() {
    let mut env = TestEnv::new();
    let reg = WorkerRegistration {
        data_address: "10.0.0.9:7000".into(),
        host: "gpunode".into(),
        nthreads: 8,
        memory_limit: 1 << 30,
        pid: 1,
        rank: Some(1),
        topology: Some(WorkerTopology {
            gpus: vec!["0".into(), "1".into()],
            ..WorkerTopology::default()
        }),
        doorbell: None,
        resources: "MEM=4e9".parse().expect("valid"),
    };
    let w = env.scheduler.add_worker(reg, &mut env.comm);
    env.comm.take_worker(w);
    let info = env
        .scheduler
        .workers()
        .find(|i| i.id == w)
        .expect("registered");
    assert_eq!(info.resources.to_string(), "GPU=2,MEM=4000000000");
}

// ------------------------------------------------------------------ plugins

#[test]
fn plugins_go_to_every_worker_and_to_workers_joining_later() {
    let mut env = TestEnv::new();
    let w1 = env.worker(1);
    let c = env.client();
    let register = |name: &str| FromClient::RegisterPlugin {
        name: name.into(),
        plugin: Bytes::from_static(b"pickled"),
    };
    env.client_msg(c, register("setup-env"));
    let plugin = Plugin {
        name: "setup-env".into(),
        pickled: Bytes::from_static(b"pickled"),
    };
    assert_eq!(
        env.comm.take_worker(w1),
        [ToWorker::Plugins(vec![plugin.clone()])]
    );
    // Registered again: replaced, not doubled.
    env.client_msg(c, register("setup-env"));
    env.comm.take_worker(w1);
    let w2 = env.worker(1); // checks that the plugin came right after Registered
    assert_eq!(env.scheduler.plugins, std::slice::from_ref(&plugin));
    env.client_msg(c, FromClient::UnregisterPlugin("setup-env".into()));
    for w in [w1, w2] {
        assert_eq!(
            env.comm.take_worker(w),
            [ToWorker::UnregisterPlugin("setup-env".into())]
        );
    }
    assert!(env.scheduler.plugins.is_empty());
}

#[test]
fn restart_cancels_every_clients_tasks_then_restarts_every_workers_executors() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let (a, b) = (env.client(), env.client());
    let [x, y] = ids(a, 0..2)[..] else {
        unreachable!()
    };
    let [z] = ids(b, 0..1)[..] else {
        unreachable!()
    };
    env.submit(a, vec![spec(x, &[]), spec(y, &[x])], &[y]);
    env.submit(b, vec![spec(z, &[])], &[z]);
    env.schedule();
    let ran: Vec<WorkerId> = [w1, w2]
        .into_iter()
        .filter(|&w| !env.comm.take_worker(w).is_empty())
        .collect();
    env.client_msg(b, FromClient::Restart);
    assert_eq!(env.comm.take_client(a), [ToClient::Cancelled(vec![y])]);
    assert_eq!(env.comm.take_client(b), [ToClient::Cancelled(vec![z])]);
    for w in [w1, w2] {
        let msgs = env.comm.take_worker(w);
        assert_eq!(msgs.last(), Some(&ToWorker::RestartExecutors), "{msgs:?}");
        if ran.contains(&w) {
            assert!(matches!(msgs[0], ToWorker::Cancel(_)), "{msgs:?}");
        }
    }
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

#[test]
fn a_retired_worker_is_told_and_removed_and_its_work_counts_against_no_task() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [x, y] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    let on_w2 = |id| TaskSpec {
        workers: vec![w2],
        options: TaskOptions {
            allow_other_workers: true,
            ..TaskOptions::default()
        },
        ..spec(id, &[])
    };
    env.submit(c, vec![on_w2(x), on_w2(y)], &[x, y]);
    env.schedule();
    assert_eq!(sorted(&env.computed(w2)), [x, y]);
    env.done(w2, &[x]);
    assert_eq!(env.finished(c), [x]);
    env.client_msg(c, FromClient::RetireWorkers(vec![w2, WorkerId(99)]));
    assert_eq!(env.comm.take_worker(w2), [ToWorker::Retire]);
    assert_eq!(env.comm.take_worker(w1), []);
    assert!(!env.comm.knows(w1, w2), "w1 was told w2 left");
    assert_eq!(env.comm.take_client(c), [ToClient::WorkerRemoved(w2)]);
    // Its running task and its only result are redone on w1, nothing held against them.
    env.schedule();
    assert_eq!(sorted(&env.computed(w1)), [x, y]);
    for id in [x, y] {
        assert!(env.scheduler.tasks[&id].killed_workers().is_empty());
    }
}

#[test]
fn a_future_another_client_holds_keeps_the_result_and_its_inputs_past_the_owner() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let (owner, other) = (env.client(), env.client());
    let [a, b, pending] = ids(owner, 0..3)[..] else {
        unreachable!()
    };
    env.submit(owner, vec![spec(a, &[]), spec(b, &[a])], &[b]);
    env.schedule();
    let ran = env.computed(w);
    env.done(w, &ran);
    env.schedule();
    let ran = env.computed(w);
    env.done(w, &ran);
    assert_eq!(env.finished(owner), [b]);
    env.comm.take_worker(w); // `a` released: its dependent is computed
                             // A future on `b` reached the other client (pickled into a task, a dataset...).
    env.client_msg(other, FromClient::Want(vec![b]));
    assert_eq!(env.finished(other), [b]);
    // The other client builds on a task of the owner's that has not run yet.
    env.submit(owner, vec![spec(pending, &[b])], &[pending]);
    let mine = TaskId::new(other, 0);
    env.submit(other, vec![spec(mine, &[pending])], &[mine]);
    env.scheduler.remove_client(owner, &mut env.comm);
    env.scheduler.sanity_check();
    env.comm.emptiness_check(); // nothing cancelled, nothing released
    env.schedule();
    assert_eq!(env.computed(w), [pending]);
    env.done(w, &[pending]);
    env.schedule();
    assert_eq!(env.computed(w), [mine]);
    env.done(w, &[mine]);
    assert_eq!(env.finished(other), [mine]);
    assert_eq!(env.released(w), [pending]);
    env.client_msg(other, FromClient::Release(vec![b, mine]));
    assert_eq!(env.released(w), [b, mine]);
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

#[test]
fn cancelling_another_clients_task_only_gives_up_the_hold() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let (owner, other) = (env.client(), env.client());
    let a = TaskId::new(owner, 0);
    env.submit(owner, vec![spec(a, &[])], &[a]);
    env.client_msg(other, FromClient::Want(vec![a]));
    env.client_msg(other, FromClient::Cancel(vec![a]));
    assert_eq!(env.comm.take_client(other), [ToClient::Cancelled(vec![a])]);
    env.schedule();
    assert_eq!(env.computed(w), [a]);
    env.done(w, &[a]);
    assert_eq!(env.finished(owner), [a]);
    // The owner's cancel stops it for every holder.
    env.client_msg(other, FromClient::Want(vec![a]));
    assert_eq!(env.finished(other), [a]);
    env.client_msg(owner, FromClient::Cancel(vec![a]));
    assert_eq!(env.comm.take_client(owner), [ToClient::Cancelled(vec![a])]);
    assert_eq!(env.comm.take_client(other), [ToClient::Cancelled(vec![a])]);
    assert_eq!(env.released(w), [a]);
    env.comm.emptiness_check();
}

fn dataset(env: &mut TestEnv, client: ClientId, request: u64, op: DatasetOp) {
    env.client_msg(client, FromClient::Dataset { request, op });
}

fn publish(name: &str, tasks: &[TaskId], overwrite: bool) -> DatasetOp {
    DatasetOp::Publish {
        name: name.into(),
        value: Bytes::from(name.as_bytes().to_vec()),
        tasks: tasks.to_vec(),
        overwrite,
    }
}

#[test]
fn a_published_dataset_holds_its_tasks_until_unpublished() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let (owner, reader) = (env.client(), env.client());
    let [a, b] = ids(owner, 0..2)[..] else {
        unreachable!()
    };
    env.submit(owner, vec![spec(a, &[]), spec(b, &[])], &[a, b]);
    env.schedule();
    let ran = env.computed(w);
    env.done(w, &ran);
    assert_eq!(env.finished(owner), [a, b]);
    dataset(&mut env, owner, 1, publish("x", &[a], false));
    dataset(&mut env, owner, 2, publish("x", &[b], false));
    dataset(
        &mut env,
        owner,
        3,
        publish("y", &[TaskId::new(owner, 9)], false),
    );
    let replies = answers(&mut env, owner);
    assert_eq!(replies[0], (1, Coordinated::Done));
    assert!(
        matches!(&replies[1], (2, Coordinated::Refused(why)) if why.contains("already exists"))
    );
    assert!(matches!(&replies[2], (3, Coordinated::Refused(why)) if why.contains("not live")));
    // The owner drops its futures and leaves: `b` goes, the published `a` stays.
    env.client_msg(owner, FromClient::Release(vec![a, b]));
    assert_eq!(env.released(w), [b]);
    env.scheduler.remove_client(owner, &mut env.comm);
    env.scheduler.sanity_check();
    env.comm.emptiness_check();
    dataset(&mut env, reader, 4, DatasetOp::List);
    dataset(&mut env, reader, 5, DatasetOp::Get { name: "x".into() });
    assert_eq!(
        answers(&mut env, reader),
        [
            (4, Coordinated::Names(vec!["x".into()])),
            (5, Coordinated::Value(Bytes::from_static(b"x")))
        ]
    );
    env.client_msg(reader, FromClient::Want(vec![a]));
    assert_eq!(env.finished(reader), [a]);
    dataset(
        &mut env,
        reader,
        6,
        DatasetOp::Unpublish { name: "x".into() },
    );
    assert_eq!(answers(&mut env, reader), [(6, Coordinated::Done)]);
    env.client_msg(reader, FromClient::Release(vec![a]));
    assert_eq!(env.released(w), [a]);
    dataset(&mut env, reader, 7, DatasetOp::Get { name: "x".into() });
    assert!(
        matches!(&answers(&mut env, reader)[..], [(7, Coordinated::Refused(why))] if why.contains("not found"))
    );
    assert_eq!(env.scheduler.task_count(), 0);
    env.comm.emptiness_check();
}

#[test]
fn republishing_a_name_with_overwrite_moves_the_hold() {
    let mut env = TestEnv::new();
    let w = env.worker(1);
    let c = env.client();
    let [a, b] = ids(c, 0..2)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(a, &[]), spec(b, &[])], &[a, b]);
    env.schedule();
    let ran = env.computed(w);
    env.done(w, &ran);
    env.finished(c);
    dataset(&mut env, c, 1, publish("x", &[a, a], false));
    dataset(&mut env, c, 2, publish("x", &[b], true));
    assert_eq!(
        answers(&mut env, c),
        [(1, Coordinated::Done), (2, Coordinated::Done)]
    );
    env.client_msg(c, FromClient::Release(vec![a, b]));
    assert_eq!(env.released(w), [a]);
    env.comm.emptiness_check();
}

#[test]
fn progress_is_counted_by_prefix_once_per_task() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [a, b, failing, downstream, cancelled] = ids(c, 0..5)[..] else {
        unreachable!()
    };
    let kind = |id, deps: &[TaskId], prefix| TaskSpec {
        prefix,
        ..spec(id, deps)
    };
    let msg = FromClient::Submit {
        functions: Vec::new(),
        tasks: vec![
            kind(a, &[], 0),
            kind(b, &[a], 1),
            kind(failing, &[], 0),
            kind(downstream, &[failing], 1),
            kind(cancelled, &[b], 1),
        ],
        wanted: vec![b, downstream, cancelled],
        prefixes: vec!["load".into(), "sum".into()],
        more: false,
    };
    env.client_msg(c, msg);
    env.schedule();
    let on_w1 = env.computed(w1);
    let on_w2 = env.computed(w2);
    let (a_worker, failing_worker) = if on_w1.contains(&a) {
        (w1, w2)
    } else {
        (w2, w1)
    };
    assert!(on_w1.len() + on_w2.len() == 2);
    env.done(a_worker, &[a]);
    let error = ErrorInfo::runtime("ValueError", "no".into());
    env.worker_msg(failing_worker, FromWorker::Failed { id: failing, error });
    env.schedule();
    let b_worker = if env.computed(w1).contains(&b) {
        w1
    } else {
        w2
    };
    env.done(b_worker, &[b]);
    env.client_msg(c, FromClient::Cancel(vec![cancelled]));
    // The worker holding `b` is lost: what is recomputed is not new progress.
    env.lose_worker(b_worker);
    let survivor = if b_worker == w1 { w2 } else { w1 };
    let mut recomputed = Vec::new();
    loop {
        env.schedule();
        let sent: Vec<TaskId> = env
            .comm
            .take_worker(survivor)
            .into_iter()
            .flat_map(|msg| match msg {
                ToWorker::Compute(tasks) => tasks.into_iter().map(|t| t.id).collect(),
                _ => Vec::new(),
            })
            .collect();
        if sent.is_empty() {
            break;
        }
        env.done(survivor, &sent);
        recomputed.extend(sent);
    }
    assert!(recomputed.contains(&b), "{recomputed:?}");

    let snapshot = env.scheduler.snapshot(0.0, Vec::new(), 0.0);
    let counts: Vec<(&str, u64, u64, u64, u64)> = snapshot
        .prefixes
        .iter()
        .map(|p| (p.name.as_str(), p.submitted, p.done, p.erred, p.forgotten))
        .collect();
    assert_eq!(counts, [("load", 2, 1, 1, 0), ("sum", 3, 1, 1, 1)]);
    let ran: Vec<(u32, Option<u32>)> = env
        .scheduler
        .take_ran()
        .iter()
        .map(|r| (r.worker, r.prefix))
        .collect();
    assert_eq!(ran[..2], [(a_worker.0, Some(0)), (b_worker.0, Some(1))]);
    assert_eq!(ran.len(), 2 + recomputed.len());
    assert!(env.scheduler.take_ran().is_empty());
}

#[test]
fn a_submit_naming_a_prefix_it_does_not_carry_is_rejected() {
    let mut env = TestEnv::new();
    let c = env.client();
    let a = TaskId::new(c, 0);
    let msg = FromClient::Submit {
        functions: Vec::new(),
        tasks: vec![TaskSpec {
            prefix: 1,
            ..spec(a, &[])
        }],
        wanted: vec![a],
        prefixes: prefixes(),
        more: false,
    };
    env.client_msg(c, msg);
    match env.comm.take_client(c).as_slice() {
        [ToClient::SubmitRejected { reason }] => assert!(reason.contains("prefix 1"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(env.scheduler.task_count(), 0);
}

#[test]
fn a_client_watching_progress_hears_its_computed_count() {
    let mut env = TestEnv::new();
    let w = env.worker(2);
    let (c, other) = (env.client(), env.client());
    let [a, b, d] = ids(c, 0..3)[..] else {
        unreachable!()
    };
    env.client_msg(c, FromClient::WatchProgress(true));
    assert_eq!(env.comm.take_client(c), [ToClient::Computed(0)]);
    env.submit(c, vec![spec(a, &[]), spec(b, &[])], &[a, b]);
    let x = TaskId::new(other, 0);
    env.submit(other, vec![spec(x, &[])], &[x]);
    env.schedule();
    assert_eq!(env.computed(w).len(), 3);
    env.done(w, &[a, b, x]);
    assert_eq!(
        env.comm.take_client(c),
        [
            ToClient::Finished(vec![
                TaskFinished {
                    id: a,
                    worker: w,
                    size: SIZE
                },
                TaskFinished {
                    id: b,
                    worker: w,
                    size: SIZE
                },
            ]),
            ToClient::Computed(2)
        ]
    );
    assert_eq!(env.finished(other), [x]); // the other client did not ask
    env.client_msg(c, FromClient::WatchProgress(false));
    env.submit(c, vec![spec(d, &[])], &[d]);
    env.schedule();
    env.computed(w);
    env.done(w, &[d]);
    assert_eq!(env.finished(c), [d]);
    env.comm.emptiness_check();
}

#[test]
fn transfers_workers_report_join_the_task_stream() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let transfer = crate::protocol::Transfer {
        from: w1,
        bytes: 4096,
        duration_us: 250,
    };
    env.worker_msg(w2, FromWorker::Transferred(vec![transfer]));
    let ran = env.scheduler.take_ran();
    assert_eq!(ran.len(), 1);
    assert_eq!(
        (
            ran[0].worker,
            ran[0].prefix,
            ran[0].from,
            ran[0].bytes,
            ran[0].duration_us
        ),
        (w2.0, None, Some(w1.0), 4096, 250)
    );
    env.comm.emptiness_check();
}

#[test]
fn workers_hear_of_a_peer_once_before_they_first_read_from_it_and_only_they_of_its_loss() {
    let mut env = TestEnv::new();
    // Registering sends other workers nothing (checked by `worker`).
    let [w1, w2, w3] = env.workers(&[1, 1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let [a, b, c1, c2] = ids(c, 0..4)[..] else {
        unreachable!()
    };
    env.submit(c, vec![spec(a, &[]), spec(b, &[])], &[a, b]);
    env.schedule();
    assert_eq!(env.computed(w1), [a]);
    assert_eq!(env.computed(w2), [b]);
    env.done(w1, &[a]);
    assert_eq!(env.finished(c), [a]);
    env.done(w2, &[b]);
    assert_eq!(env.finished(c), [b]);
    // Both read a and b: whoever runs them fetches from the other holder.
    env.submit(c, vec![spec(c1, &[a, b]), spec(c2, &[a, b])], &[c1, c2]);
    env.schedule();
    let (w1_runs, w2_runs) = (env.computed(w1), env.computed(w2));
    assert_eq!(w1_runs.len() + w2_runs.len(), 2, "{w1_runs:?} {w2_runs:?}");
    for (worker, holder, runs) in [(w1, w2, &w1_runs), (w2, w1, &w2_runs)] {
        assert_eq!(env.comm.knows(worker, holder), !runs.is_empty());
    }
    assert!(
        !env.comm.knows(w3, w1) && !env.comm.knows(w3, w2),
        "w3 read nothing"
    );
    let reader = if w1_runs.is_empty() { w2 } else { w1 };
    let holder = if reader == w1 { w2 } else { w1 };
    env.lose_worker(holder);
    assert!(
        !env.comm.knows(reader, holder),
        "the reader was told the holder left"
    );
    // The fake refuses a PeerRemoved to a worker that never heard of the peer: w3 got none.
    assert_eq!(env.comm.take_worker(w3), []);
}
/// Schedules and completes whatever the workers are sent until nothing more is; returns
/// the tasks run, sorted.
fn run_everything(env: &mut TestEnv, workers: &[WorkerId]) -> Vec<TaskId> {
    sorted(&run_in_order(env, workers))
}

/// Runs every task handed out, round after round, until none is; returns them in the
/// order they were handed out.
fn run_in_order(env: &mut TestEnv, workers: &[WorkerId]) -> Vec<TaskId> {
    let mut ran = Vec::new();
    loop {
        env.schedule();
        let before = ran.len();
        for &worker in workers {
            for msg in env.comm.take_worker(worker) {
                if let ToWorker::Compute(tasks) = msg {
                    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
                    env.done(worker, &ids);
                    ran.extend(ids);
                }
            }
        }
        if ran.len() == before {
            return ran;
        }
    }
}

#[test]
fn the_task_table_finds_tasks_across_pages_and_clients_and_drops_emptied_pages() {
    let mut env = TestEnv::new();
    let [w] = env.workers(&[1])[..] else {
        unreachable!()
    };
    let (c1, c2) = (env.client(), env.client());
    // Ids over several pages of the index, with gaps, in two clients' namespaces.
    let first: Vec<TaskId> = ids(c1, 0..1300)
        .into_iter()
        .filter(|id| id.0 % 7 != 3)
        .collect();
    let second = ids(c2, 250..900);
    for (client, batch) in [(c1, &first), (c2, &second)] {
        let specs = batch.iter().map(|&id| spec(id, &[])).collect();
        env.submit(client, specs, batch);
    }
    run_everything(&mut env, &[w]);
    assert!(env.scheduler.tasks.pages() >= 8);
    // Released out of order: records from other pages move into the holes.
    let (gone, kept): (Vec<TaskId>, Vec<TaskId>) =
        first.iter().chain(&second).partition(|id| id.0 % 5 < 2);
    for client in [c1, c2] {
        let mine = |list: &[TaskId]| -> Vec<TaskId> {
            list.iter()
                .copied()
                .filter(|id| id.owner() == client)
                .collect()
        };
        env.client_msg(client, FromClient::Release(mine(&gone)));
    }
    for id in &kept {
        // A test task's payload is its id.
        assert_eq!(
            env.scheduler.tasks[id].submitted.payload()[..],
            id.0.to_le_bytes()
        );
    }
    assert!(gone.iter().all(|id| !env.scheduler.tasks.contains_key(id)));
    for client in [c1, c2] {
        let mine = kept.iter().copied().filter(|id| id.owner() == client);
        env.client_msg(client, FromClient::Release(mine.collect()));
    }
    assert_eq!(env.scheduler.tasks.len(), 0);
    assert_eq!(env.scheduler.tasks.pages(), 0);
}

#[test]
fn a_submits_payloads_leave_its_frame_small_ones_packed_together() {
    let mut env = TestEnv::new();
    let c = env.client();
    let mut tasks: Vec<TaskSpec> = ids(c, 0..4).iter().map(|&id| spec(id, &[])).collect();
    tasks[2].payload = Bytes::from(vec![7u8; 4096]);
    let frame = encode(&FromClient::Submit {
        functions: Vec::new(),
        tasks,
        wanted: ids(c, 0..4),
        prefixes: prefixes(),
        more: false,
    })
    .unwrap();
    let msg = decode_sharing(&frame).unwrap();
    env.scheduler.handle_client(c, msg, &mut env.comm);
    env.scheduler.sanity_check();
    // No task keeps a slice of the frame (it would hold the whole part's bytes).
    assert!(frame.is_unique());
    let payload = |seq: u64| {
        env.scheduler.tasks[&TaskId::new(c, seq)]
            .submitted
            .payload()
    };
    assert_eq!(payload(2), vec![7u8; 4096]);
    let small: Vec<Bytes> = [0, 1, 3].into_iter().map(payload).collect();
    for (seq, bytes) in [0, 1, 3].into_iter().zip(&small) {
        assert_eq!(bytes[..], TaskId::new(c, seq).0.to_le_bytes());
    }
    // One buffer, in submit order.
    assert_eq!(small[0].as_ptr_range().end, small[1].as_ptr_range().start);
    assert_eq!(small[1].as_ptr_range().end, small[2].as_ptr_range().start);
}

#[test]
fn a_task_record_stays_small() {
    // 10^7-task graphs: each byte here is 10 MB of scheduler memory (issue 19).
    assert!(std::mem::size_of::<records::Task>() <= 112);
}

#[test]
fn a_workers_task_list_stays_within_twice_its_tasks_and_its_departure_finds_them() {
    let mut env = TestEnv::new();
    let [w1, w2] = env.workers(&[1, 1])[..] else {
        unreachable!()
    };
    let c = env.client();
    let mut kept = Vec::new();
    for round in 0..50u64 {
        let batch = ids(c, round * 100..round * 100 + 100);
        let specs = batch.iter().map(|&id| spec(id, &[])).collect();
        env.submit(c, specs, &batch);
        run_everything(&mut env, &[w1, w2]);
        env.comm.take_client(c);
        // The client keeps one result of each round and lets go of the others.
        kept.push(batch[0]);
        env.client_msg(c, FromClient::Release(batch[1..].to_vec()));
        env.comm.take_worker(w1);
        env.comm.take_worker(w2);
    }
    let noted = env.scheduler.workers[&w1].tasks.noted().len();
    assert!(
        noted <= 2 * kept.len() + 1024,
        "{noted} entries for {} tasks",
        kept.len()
    );

    let on_w1: Vec<TaskId> = kept
        .iter()
        .copied()
        .filter(|id| env.scheduler.tasks[id].is_on(w1))
        .collect();
    assert!(!on_w1.is_empty());
    env.lose_worker(w1);
    env.comm.take_client(c);
    assert_eq!(
        run_everything(&mut env, &[w2]),
        sorted(&on_w1),
        "only w1's results are recomputed"
    );
}

#[test]
fn the_tasks_of_an_open_submit_take_a_run_per_gap_in_their_ids() {
    let c = ClientId(1);
    let mut runs = records::IdRuns::default();
    for id in ids(c, 0..1000).into_iter().chain(ids(c, 2000..2010)) {
        runs.push(id);
    }
    runs.push(TaskId::new(c, 5));
    assert_eq!(runs.runs(), 3);
    let expected: Vec<TaskId> = ids(c, 0..1000)
        .into_iter()
        .chain(ids(c, 2000..2010))
        .chain([TaskId::new(c, 5)])
        .collect();
    assert_eq!(runs.iter().collect::<Vec<_>>(), expected);
    assert!(runs.contains(&TaskId::new(c, 2009)) && !runs.contains(&TaskId::new(c, 2010)));
}
