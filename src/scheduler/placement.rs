//! Where tasks run: the placement policy, kept apart from the bookkeeping in `state`.
//!
//! - Root tasks (no inputs) wait in a [`RootQueue`] and go out only while a worker has
//!   free queue capacity ([`queue_depth`]), least loaded worker first ([`LoadIndex`]).
//!   Handing them all out at once would let input-reading tasks fill every worker's memory
//!   before anything downstream runs. Each worker takes them from its own contiguous
//!   share of the queue, so that siblings meet on one worker ([`roots`]).
//! - Other tasks go out as soon as they are ready, to the candidate with the earliest
//!   estimated start ([`cheapest`]): its queue (what its assigned tasks are expected to
//!   take, by kind: [`Kinds`], [`QueuedKinds`]) plus fetching the inputs it lacks, where
//!   inputs held on the same node (host) come at shared-memory speed. So among idle
//!   workers the one holding the most input bytes wins, then one on the same node as the
//!   inputs, then the least loaded; a long queue can outweigh a transfer. Candidates are the workers
//!   holding the task's inputs, the least loaded worker of each of their nodes, and the
//!   least loaded worker overall, so placing a task costs O(inputs) whatever the number
//!   of workers.

use crate::protocol::{IdMap, WorkerId};
use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

mod roots;
pub(super) use roots::{claim_limit, RootQueue};

/// Tasks queued per worker thread: enough for `target_queued_work_s` of work at the
/// current average task duration, so tiny tasks get deep queues and long ones two.
pub(super) fn queue_depth(target_queued_work_s: f64, avg_task_duration_s: f64) -> u32 {
    const MIN_DEPTH: f64 = 2.0;
    const MAX_DEPTH: f64 = 256.0;
    let depth = (target_queued_work_s / avg_task_duration_s).ceil();
    // A NaN (0 / 0) compares false everywhere: `clamp` would keep it, so map it first.
    if depth.is_nan() {
        return MIN_DEPTH as u32;
    }
    depth.clamp(MIN_DEPTH, MAX_DEPTH) as u32
}

/// A node: the scheduler numbers the distinct host names its workers report.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct NodeId(pub(super) u32);

/// A worker's load: assigned tasks per thread. Ordered by that ratio, then by id.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Load {
    pub(super) processing: u32,
    pub(super) nthreads: u32,
    pub(super) worker: WorkerId,
    /// Where the worker runs (a worker never moves, so ordering can ignore it).
    pub(super) node: NodeId,
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        // processing / nthreads compared without division (nthreads is at least 1).
        let lhs = u64::from(self.processing) * u64::from(other.nthreads);
        let rhs = u64::from(other.processing) * u64::from(self.nthreads);
        lhs.cmp(&rhs).then(self.worker.cmp(&other.worker))
    }
}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Workers ordered by load, overall and per node, so the least loaded one is found in
/// O(log W).
#[derive(Default)]
pub(super) struct LoadIndex {
    loads: BTreeSet<Load>,
    by_node: HashMap<NodeId, BTreeSet<Load>>,
}

impl LoadIndex {
    pub(super) fn insert(&mut self, load: Load) {
        self.loads.insert(load);
        self.by_node.entry(load.node).or_default().insert(load);
    }

    pub(super) fn remove(&mut self, load: &Load) {
        self.loads.remove(load);
        if let Some(on_node) = self.by_node.get_mut(&load.node) {
            on_node.remove(load);
            if on_node.is_empty() {
                self.by_node.remove(&load.node);
            }
        }
    }

    pub(super) fn least_loaded(&self) -> Option<Load> {
        self.loads.first().copied()
    }

    pub(super) fn least_loaded_on(&self, node: NodeId) -> Option<Load> {
        self.by_node.get(&node)?.first().copied()
    }

    #[cfg(test)]
    pub(super) fn contains(&self, load: &Load) -> bool {
        self.loads.contains(load)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.loads.len()
    }
}

/// What the scheduler has learned of each kind of task (Dask's key prefix, `Task::prefix`).
///
/// How long one takes, a running average: a worker's queue is what its tasks are expected
/// to take (Dask's occupancy), not their number times the average of all tasks. The 72
/// slices of a rechunk's 126 MB intermediate, under a millisecond each, queued on the
/// worker holding it, looked like 72 average tasks (the merges and the random chunks
/// before them took tens), so some went to the other worker, which fetched all 126 MB.
///
/// Where its results are read: whether tasks on other workers read them lately
/// ([`Kinds::read_elsewhere`]). A large one of such a kind is copied out of the executor
/// that keeps it at once, before a peer asks; one read where it was made is left alone.
#[derive(Default)]
pub(super) struct Kinds {
    by_kind: Vec<KindRecord>,
}

#[derive(Clone, Copy)]
struct KindRecord {
    /// Seconds; NaN: none computed yet.
    duration_s: f64,
    /// Reads of its results by tasks, and of those, by tasks on another worker than a
    /// holder, both halved once `reads` reaches [`RECENT_READS`].
    reads: u32,
    reads_elsewhere: u32,
}

/// Reads of a kind's results that [`Kinds::read_elsewhere`] weighs (older ones fade).
const RECENT_READS: u32 = 64;

impl Kinds {
    fn record_mut(&mut self, kind: u32) -> &mut KindRecord {
        let kind = kind as usize;
        if kind >= self.by_kind.len() {
            let unknown = KindRecord {
                duration_s: f64::NAN,
                reads: 0,
                reads_elsewhere: 0,
            };
            self.by_kind.resize(kind + 1, unknown);
        }
        &mut self.by_kind[kind]
    }

    /// A task of `kind` took `seconds`; `weight`: that of the newest in the average.
    pub(super) fn computed(&mut self, kind: u32, seconds: f64, weight: f64) {
        let average = &mut self.record_mut(kind).duration_s;
        *average = match average.is_nan() {
            true => seconds,
            false => *average + weight * (seconds - *average),
        };
    }

    /// Seconds a task of `kind` is expected to take: `unknown` if none has been computed.
    pub(super) fn expected_duration(&self, kind: u32, unknown: f64) -> f64 {
        match self.by_kind.get(kind as usize) {
            Some(record) if !record.duration_s.is_nan() => record.duration_s,
            _ => unknown,
        }
    }

    /// A task was assigned that reads a result of `kind`; `elsewhere`: on a worker that
    /// does not hold it.
    pub(super) fn read(&mut self, kind: u32, elsewhere: bool) {
        let record = self.record_mut(kind);
        if record.reads >= RECENT_READS {
            record.reads /= 2;
            record.reads_elsewhere /= 2;
        }
        record.reads += 1;
        record.reads_elsewhere += u32::from(elsewhere);
    }

    /// Whether a quarter or more of the recent reads of `kind`'s results were by tasks on
    /// other workers; false while none has been read.
    pub(super) fn read_elsewhere(&self, kind: u32) -> bool {
        self.by_kind
            .get(kind as usize)
            .is_some_and(|r| r.reads_elsewhere > 0 && r.reads_elsewhere * 4 >= r.reads)
    }
}

/// The priorities of a worker's assigned tasks, counted: how many it will run before a
/// root of a given priority (its ready tasks run lowest value first). Withheld roots are
/// not counted: they come out of the root queue in order, before the worker's next one,
/// and at thousands of workers a count per root cost a tenth of a map graph's rate.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(super) struct QueuedPriorities {
    by_priority: BTreeMap<i64, u32>,
    len: u32,
}

impl QueuedPriorities {
    pub(super) fn add(&mut self, priority: i64) {
        *self.by_priority.entry(priority).or_default() += 1;
        self.len += 1;
    }

    pub(super) fn remove(&mut self, priority: i64) {
        if let Entry::Occupied(mut count) = self.by_priority.entry(priority) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
            self.len -= 1;
        }
    }

    /// The tasks counted.
    pub(super) fn len(&self) -> u32 {
        self.len
    }

    /// Tasks at `priority` or before it, counted up to `cap` (it stops there); `None` when
    /// none comes after it, so that all count (without counting them).
    pub(super) fn up_to(&self, priority: i64, cap: u32) -> Option<u32> {
        let (&last, _) = self.by_priority.last_key_value()?;
        if last <= priority {
            return None;
        }
        let mut counted = 0u32;
        for &count in self.by_priority.range(..=priority).map(|(_, count)| count) {
            counted = counted.saturating_add(count);
            if counted >= cap {
                return Some(cap);
            }
        }
        Some(counted)
    }
}

/// The tasks assigned to a worker, counted by kind, so that its queue is priced with each
/// kind's current duration (a count times a duration at assignment would drift as the
/// averages move). Few kinds are assigned to a worker at a time: a list.
#[derive(Default, Debug, PartialEq, Eq)]
pub(super) struct QueuedKinds(Vec<(u32, u32)>);

impl QueuedKinds {
    pub(super) fn add(&mut self, kind: u32) {
        match self.0.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += 1,
            None => self.0.push((kind, 1)),
        }
    }

    pub(super) fn remove(&mut self, kind: u32) {
        if let Some(at) = self.0.iter().position(|&(k, _)| k == kind) {
            self.0[at].1 -= 1;
            if self.0[at].1 == 0 {
                self.0.swap_remove(at);
            }
        }
    }

    /// Seconds of work queued: each kind's count times its expected duration (`unknown`
    /// where none of it has been computed).
    pub(super) fn seconds(&self, kinds: &Kinds, unknown: f64) -> f64 {
        self.0
            .iter()
            .map(|&(kind, count)| f64::from(count) * kinds.expected_duration(kind, unknown))
            .sum()
    }

    /// Counts by kind, sorted.
    #[cfg(test)]
    pub(super) fn counts(&self) -> Vec<(u32, u32)> {
        let mut counts = self.0.clone();
        counts.sort_unstable();
        counts
    }
}

/// What placing one task on one candidate worker would cost.
#[derive(Copy, Clone, Debug)]
pub(super) struct CandidateCost {
    pub(super) load: Load,
    /// Seconds of work assigned to the worker ([`QueuedKinds::seconds`]), all threads.
    pub(super) queued_s: f64,
    /// Bytes of the task's inputs the worker would have to fetch.
    pub(super) missing_bytes: u64,
    /// Of those, bytes another worker on its node holds (a shared-memory copy).
    pub(super) node_bytes: u64,
    /// Bytes of the task's inputs the worker already holds.
    pub(super) held_bytes: u64,
}

/// Assumed transfer speeds, to weigh fetching inputs against queueing.
#[derive(Copy, Clone, Debug)]
pub(super) struct Bandwidths {
    /// Between nodes.
    pub(super) network_bytes_per_s: f64,
    /// Between workers on one node.
    pub(super) node_bytes_per_s: f64,
}

/// A task's input bytes by where they are, tallied in one pass over the inputs so that
/// costing a candidate is O(1): a wide merge (a rechunk) has hundreds of inputs and as
/// many candidates, and costing each against every input was quadratic. Kept by the
/// scheduler between tasks, so its tables are allocated once.
#[derive(Default)]
pub(super) struct InputBytes {
    total: u64,
    /// Input bytes each worker holds already.
    held: IdMap<WorkerId, u64>,
    /// Input bytes with at least one holder on each node.
    on_node: HashMap<NodeId, u64>,
    /// Scratch: the distinct nodes of one input's holders.
    nodes: Vec<NodeId>,
}

impl InputBytes {
    pub(super) fn clear(&mut self) {
        self.total = 0;
        self.held.clear();
        self.on_node.clear();
    }

    /// One input (a repeated input counts each time) of `size` bytes, held by these
    /// workers, each on its node.
    pub(super) fn add(&mut self, size: u64, holders: impl Iterator<Item = (WorkerId, NodeId)>) {
        self.total += size;
        self.nodes.clear();
        for (worker, node) in holders {
            *self.held.entry(worker).or_default() += size;
            if !self.nodes.contains(&node) {
                self.nodes.push(node);
            }
        }
        for node in &self.nodes {
            *self.on_node.entry(*node).or_default() += size;
        }
    }

    /// What running the task on `load`'s worker, `queued_s` of work assigned to it, would
    /// cost in transfers.
    pub(super) fn cost(&self, load: Load, queued_s: f64) -> CandidateCost {
        let held_bytes = self.held.get(&load.worker).copied().unwrap_or(0);
        // Every input the worker holds has a holder on its node: take those out.
        let node_bytes = self.on_node.get(&load.node).copied().unwrap_or(0) - held_bytes;
        CandidateCost {
            load,
            queued_s,
            missing_bytes: self.total - held_bytes,
            node_bytes,
            held_bytes,
        }
    }
}

impl CandidateCost {
    /// Seconds until the task could start there: the worker's queue, then the transfers.
    fn estimated_start(&self, bandwidths: Bandwidths) -> f64 {
        let queue_s = self.queued_s / f64::from(self.load.nthreads);
        let remote_bytes = self.missing_bytes - self.node_bytes;
        queue_s
            + remote_bytes as f64 / bandwidths.network_bytes_per_s
            + self.node_bytes as f64 / bandwidths.node_bytes_per_s
    }
}

/// The candidate with the earliest estimated start; ties go to the one holding more of the
/// inputs, then to the less loaded, then to the lower worker id. `None` only when there
/// are no candidates.
pub(super) fn cheapest(candidates: &[CandidateCost], bandwidths: Bandwidths) -> Option<WorkerId> {
    candidates
        .iter()
        .map(|c| (c.estimated_start(bandwidths), c))
        .min_by(|(start_a, a), (start_b, b)| {
            start_a
                .total_cmp(start_b)
                .then(b.held_bytes.cmp(&a.held_bytes))
                .then(a.load.cmp(&b.load))
        })
        .map(|(_, c)| c.load.worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANDWIDTHS: Bandwidths = Bandwidths {
        network_bytes_per_s: 1e9,
        node_bytes_per_s: 1e10,
    };

    fn load(worker: u32, processing: u32, nthreads: u32) -> Load {
        Load {
            processing,
            nthreads,
            worker: WorkerId(worker),
            node: NodeId(0),
        }
    }

    /// Tasks of 1 ms each.
    fn cost(worker: u32, processing: u32, missing_bytes: u64, held_bytes: u64) -> CandidateCost {
        CandidateCost {
            load: load(worker, processing, 1),
            queued_s: f64::from(processing) * 1e-3,
            missing_bytes,
            node_bytes: 0,
            held_bytes,
        }
    }

    #[test]
    fn queued_priorities_count_the_tasks_up_to_a_priority_and_stop_at_the_cap() {
        let mut queued = QueuedPriorities::default();
        for priority in [5, -3, 5, 9, 5] {
            queued.add(priority);
        }
        assert_eq!(queued.up_to(-4, 10), Some(0));
        assert_eq!(queued.up_to(-3, 10), Some(1));
        assert_eq!(queued.up_to(5, 10), Some(4), "ties count as ahead");
        assert_eq!(queued.up_to(5, 2), Some(2), "stops at the cap");
        assert_eq!(queued.up_to(9, 10), None, "none after");
        queued.remove(5);
        queued.remove(-3);
        queued.remove(7); // not queued: nothing changes
        assert_eq!(queued.len(), 3);
        assert_eq!(queued.up_to(5, 10), Some(2));
        for priority in [5, 5, 9] {
            queued.remove(priority);
        }
        assert_eq!(queued, QueuedPriorities::default(), "no empty counts left");
    }

    #[test]
    fn queue_depth_targets_a_fixed_amount_of_queued_work() {
        assert_eq!(queue_depth(1e-3, 1e-4), 10);
        assert_eq!(queue_depth(1e-3, 3e-4), 4);
        assert_eq!(queue_depth(1e-3, 1.0), 2, "long tasks: two per thread");
        assert_eq!(queue_depth(1e-3, 1e-9), 256, "tiny tasks: capped");
        assert_eq!(queue_depth(1e-3, 0.0), 256);
        assert_eq!(queue_depth(0.0, 0.0), 2);
    }

    #[test]
    fn load_compares_tasks_per_thread() {
        let mut index = LoadIndex::default();
        index.insert(load(1, 3, 1));
        index.insert(load(2, 4, 2));
        index.insert(load(3, 8, 4));
        assert_eq!(
            index.least_loaded(),
            Some(load(2, 4, 2)),
            "2 per thread, lower id wins"
        );
        index.remove(&load(2, 4, 2));
        assert_eq!(index.least_loaded(), Some(load(3, 8, 4)));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn cheapest_weighs_queue_against_transfer() {
        // 1 ms per task, 1 GB/s: 2 tasks queued (2 ms) beat fetching 10 MB (10 ms).
        let holder = cost(1, 2, 0, 10_000_000);
        let idle = cost(2, 0, 10_000_000, 0);
        assert_eq!(cheapest(&[idle, holder], BANDWIDTHS), Some(WorkerId(1)));
        // With 20 tasks queued on the holder, fetching is quicker.
        let busy_holder = cost(1, 20, 0, 10_000_000);
        assert_eq!(
            cheapest(&[busy_holder, idle], BANDWIDTHS),
            Some(WorkerId(2))
        );
        assert_eq!(cheapest(&[], BANDWIDTHS), None);
    }

    #[test]
    fn cheapest_breaks_ties_by_held_bytes_then_id() {
        let a = cost(3, 0, 0, 0);
        let b = cost(2, 0, 0, 0);
        assert_eq!(cheapest(&[a, b], BANDWIDTHS), Some(WorkerId(2)));
        let holds_more = CandidateCost { held_bytes: 5, ..a };
        assert_eq!(cheapest(&[holds_more, b], BANDWIDTHS), Some(WorkerId(3)));
    }

    #[test]
    fn a_copy_on_the_same_node_is_cheaper_than_one_across_the_network() {
        // 10 MB to fetch either way; 1 ms per task. Across the network: 10 ms; from a
        // worker on the same node: 1 ms. So the same-node worker wins despite a queue.
        let remote = cost(1, 0, 10_000_000, 0);
        let same_node = CandidateCost {
            node_bytes: 10_000_000,
            ..cost(2, 0, 10_000_000, 0)
        };
        assert_eq!(
            cheapest(&[remote, same_node], BANDWIDTHS),
            Some(WorkerId(2))
        );
        let queued = CandidateCost {
            load: load(2, 5, 1),
            queued_s: 5e-3,
            ..same_node
        };
        assert_eq!(cheapest(&[remote, queued], BANDWIDTHS), Some(WorkerId(2)));
    }

    #[test]
    fn idle_workers_rank_holder_then_same_node_then_less_loaded() {
        let holder = cost(3, 0, 0, 1);
        let neighbour = CandidateCost {
            node_bytes: 1,
            ..cost(2, 0, 1, 0)
        };
        let remote = cost(1, 0, 1, 0);
        let all = [remote, neighbour, holder];
        assert_eq!(cheapest(&all, BANDWIDTHS), Some(WorkerId(3)));
        assert_eq!(cheapest(&all[..2], BANDWIDTHS), Some(WorkerId(2)));
        // Equal starts (no duration known yet, nothing to fetch): the less loaded.
        let busy = CandidateCost {
            queued_s: 0.0,
            ..cost(1, 5, 0, 0)
        };
        let idle = cost(4, 0, 0, 0);
        assert_eq!(cheapest(&[busy, idle], BANDWIDTHS), Some(WorkerId(4)));
    }

    #[test]
    fn the_least_loaded_worker_of_a_node_is_found() {
        let on = |worker, processing, node| Load {
            node: NodeId(node),
            ..load(worker, processing, 1)
        };
        let mut index = LoadIndex::default();
        for l in [on(1, 0, 0), on(2, 3, 1), on(3, 1, 1)] {
            index.insert(l);
        }
        assert_eq!(index.least_loaded_on(NodeId(1)), Some(on(3, 1, 1)));
        index.remove(&on(3, 1, 1));
        assert_eq!(index.least_loaded_on(NodeId(1)), Some(on(2, 3, 1)));
        index.remove(&on(2, 3, 1));
        assert_eq!(index.least_loaded_on(NodeId(1)), None);
        assert_eq!(index.least_loaded(), Some(on(1, 0, 0)));
    }

    #[test]
    fn input_bytes_cost_each_candidate_as_a_pass_over_the_inputs_would() {
        // (size, holders as (worker, node)); input 1 is named twice by the task.
        let inputs: [(u64, &[(u32, u32)]); 4] = [
            (100, &[(1, 0)]),
            (10, &[(2, 0), (3, 1)]),
            (10, &[(2, 0), (3, 1)]),
            (1000, &[(4, 1), (5, 1)]),
        ];
        let mut tally = InputBytes::default();
        for (size, holders) in inputs {
            let holders = holders.iter().map(|&(w, n)| (WorkerId(w), NodeId(n)));
            tally.add(size, holders);
        }
        for worker in 1..=6 {
            let node = if worker <= 2 { 0 } else { 1 };
            let (mut missing, mut on_node, mut held) = (0, 0, 0);
            for (size, holders) in inputs {
                if holders.iter().any(|&(w, _)| w == worker) {
                    held += size;
                } else {
                    missing += size;
                    if holders.iter().any(|&(_, n)| n == node) {
                        on_node += size;
                    }
                }
            }
            let load = Load {
                processing: 0,
                nthreads: 1,
                worker: WorkerId(worker),
                node: NodeId(node),
            };
            let cost = tally.cost(load, 0.0);
            assert_eq!(
                (cost.missing_bytes, cost.node_bytes, cost.held_bytes),
                (missing, on_node, held),
                "worker {worker}"
            );
        }
        tally.clear();
        assert_eq!(tally.cost(load(1, 0, 1), 0.0).missing_bytes, 0);
    }

    #[test]
    fn a_queue_is_priced_by_what_each_kind_takes() {
        let mut kinds = Kinds::default();
        kinds.computed(0, 1.0, 0.2);
        kinds.computed(0, 2.0, 0.2);
        assert!((kinds.expected_duration(0, 9.0) - 1.2).abs() < 1e-12);
        assert_eq!(kinds.expected_duration(3, 9.0), 9.0, "never computed");
        kinds.computed(2, 1e-3, 0.2);
        let mut queued = QueuedKinds::default();
        for kind in [0, 2, 2, 3] {
            queued.add(kind);
        }
        assert!((queued.seconds(&kinds, 9.0) - (1.2 + 2e-3 + 9.0)).abs() < 1e-12);
        queued.remove(3);
        queued.remove(2);
        queued.remove(7); // never added: nothing to take away
        assert_eq!(queued.counts(), vec![(0, 1), (2, 1)]);
        queued.remove(0);
        queued.remove(2);
        assert_eq!(queued, QueuedKinds::default());
    }

    #[test]
    fn a_kind_is_read_elsewhere_while_a_quarter_of_its_recent_reads_are() {
        let mut kinds = Kinds::default();
        assert!(!kinds.read_elsewhere(0), "never read");
        for _ in 0..3 {
            kinds.read(0, false);
        }
        assert!(!kinds.read_elsewhere(0), "read only where made");
        kinds.read(0, true);
        assert!(kinds.read_elsewhere(0), "one read of four elsewhere");
        // Then only local reads: the one elsewhere fades as they halve.
        let mut reads = 0;
        while kinds.read_elsewhere(0) {
            kinds.read(0, false);
            reads += 1;
            assert!(reads < 4 * RECENT_READS, "never faded");
        }
        assert!(!kinds.read_elsewhere(1), "kinds are apart");
    }
}
