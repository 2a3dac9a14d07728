//! A worker's memory management, as a policy over what the worker measures: results beyond
//! a target are spilled to disk, least recently used first; above the pause threshold the
//! worker takes no new tasks; above the terminate threshold its largest executor is
//! restarted before the kernel's OOM killer acts. Dask's names and default fractions.
//! Unlike Dask, the target also budgets the tasks a worker starts: the results a running
//! task is expected to make (and the spilled inputs it maps back) count against it, and a
//! task waits for room to be spilled for it, so that a worker's peak stays near its limit
//! rather than a task's working set above it.
//! Pure: the worker state machine feeds it what it stores and samples, and carries out
//! what it decides.

use crate::protocol::{FuncId, IdMap};
use std::time::Duration;

/// A worker's memory limit and the thresholds that act on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPolicy {
    /// Bytes for the worker, its executors and its shared memory; 0: unlimited.
    pub limit: u64,
    pub thresholds: MemoryThresholds,
}

/// Fractions of the limit, as Dask names them; `None` disables one.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryThresholds {
    /// Results in memory above this are spilled (managed bytes).
    pub target: Option<f64>,
    /// Process memory above this spills results until process memory is under the
    /// target (it sees what the store cannot: executors' working memory).
    pub spill: Option<f64>,
    /// Process memory above this pauses the worker.
    pub pause: Option<f64>,
    /// Process memory above this restarts the largest executor.
    pub terminate: Option<f64>,
}

impl Default for MemoryThresholds {
    fn default() -> Self {
        MemoryThresholds {
            target: Some(0.6),
            spill: Some(0.7),
            pause: Some(0.8),
            terminate: Some(0.95),
        }
    }
}

/// How a memory limit is given: bytes, a fraction of the node's memory, or `auto` (the
/// node's memory shared evenly among its workers, as Dask does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryLimit {
    Auto,
    Bytes(u64),
    Fraction(f64),
}

impl MemoryLimit {
    /// In bytes, for one of `workers_on_node` workers on a node with `node_memory` bytes.
    pub fn bytes(self, node_memory: u64, workers_on_node: u32) -> u64 {
        match self {
            MemoryLimit::Bytes(bytes) => bytes,
            MemoryLimit::Fraction(f) => (node_memory as f64 * f) as u64,
            MemoryLimit::Auto => node_memory / u64::from(workers_on_node.max(1)),
        }
    }
}

/// Each executor may keep this share of its worker's memory limit for speed, twice: in
/// input files kept mapped between tasks, and in freed heap kept for reuse. Both count in
/// the worker's process memory, so they cost spilling sooner, never more than the limit.
const EXECUTOR_KEPT_SHARE: u64 = 10;
/// Freed heap an executor keeps at most (with no limit, or a large one): enough for a
/// task's few temporaries of a large chunk.
pub const MAX_EXECUTOR_KEPT_HEAP: u64 = 512 << 20;

impl MemoryPolicy {
    /// Bytes of input files an executor of `slots` may keep mapped; `None` with no limit.
    pub fn executor_kept_mappings(&self, slots: usize) -> Option<u64> {
        (self.limit > 0).then(|| self.limit / EXECUTOR_KEPT_SHARE / slots.max(1) as u64)
    }

    /// Freed heap an executor of `slots` keeps for its tasks to reuse.
    pub fn executor_kept_heap(&self, slots: usize) -> u64 {
        self.executor_kept_mappings(slots)
            .map_or(MAX_EXECUTOR_KEPT_HEAP, |share| {
                share.min(MAX_EXECUTOR_KEPT_HEAP)
            })
    }

    fn bytes(&self, fraction: Option<f64>) -> Option<u64> {
        match (self.limit, fraction) {
            (0, _) | (_, None) => None,
            (limit, Some(f)) => Some((limit as f64 * f) as u64),
        }
    }
}

/// What the worker measured of its memory.
#[derive(Clone, Debug, Default)]
pub struct MemorySample {
    /// Memory of the worker process besides shared memory (its share of resident pages).
    pub worker_private: u64,
    /// (slot, bytes) of each running executor, measured as for the worker.
    pub executors: Vec<(usize, u64)>,
    /// Bytes of the worker's shared-memory files (results and reusable segments).
    pub shared: u64,
    /// Time since the previous sample.
    pub elapsed: Duration,
}

impl MemorySample {
    /// The worker's process memory: every byte counted once, shared memory included
    /// whether or not a process maps it.
    pub fn process_bytes(&self) -> u64 {
        self.worker_private + self.executors.iter().map(|(_, b)| b).sum::<u64>() + self.shared
    }
}

/// What the policy asks of the worker.
#[derive(Debug, Default, PartialEq)]
pub struct MemoryActions {
    /// Bytes of results to spill (beyond those being spilled already).
    pub spill: u64,
    /// Pause (`Some(true)`) or resume (`Some(false)`); `None`: as it is.
    pub pause: Option<bool>,
    /// Restart this slot's executor.
    pub restart: Option<usize>,
    /// Over the spill threshold: give back memory kept in reserve (free segments).
    pub relieve: bool,
    /// Executors are to keep their results (`Some(true)`) or write them (`Some(false)`);
    /// `None`: as they do.
    pub hold: Option<bool>,
}

/// Counters for `scheduler_info()` and the exit log.
#[derive(Clone, Debug, Default)]
pub struct MemoryCounters {
    pub process_bytes: u64,
    pub peak_process_bytes: u64,
    pub paused_for: Duration,
    pub executors_restarted: u64,
}

pub struct MemoryState {
    policy: MemoryPolicy,
    paused: bool,
    /// Executors keep their results in their own memory, rather than write them.
    executors_hold: bool,
    /// Bytes handed to spilling and not yet back.
    spilling: u64,
    counters: MemoryCounters,
}

impl MemoryState {
    pub fn new(policy: MemoryPolicy) -> Self {
        MemoryState {
            policy,
            paused: false,
            executors_hold: true,
            spilling: 0,
            counters: MemoryCounters::default(),
        }
    }

    pub fn policy(&self) -> &MemoryPolicy {
        &self.policy
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether executors keep their results (where the worker can read their memory):
    /// while its memory is under the target. Over it, results go to shared memory, which
    /// the worker spills and gives back whole, where memory an executor frees may stay in
    /// its heap; they are kept again once memory is under half the target.
    pub fn executors_hold(&self) -> bool {
        self.executors_hold
    }

    /// Results are on their way to disk.
    pub fn is_spilling(&self) -> bool {
        self.spilling > 0
    }

    pub fn counters(&self) -> &MemoryCounters {
        &self.counters
    }

    /// The store now holds `managed` bytes in memory and running tasks are expected to
    /// need `working` more: spill what lies above the target.
    pub fn stored(&mut self, managed: u64, working: u64) -> u64 {
        let Some(target) = self.policy.bytes(self.policy.thresholds.target) else {
            return 0;
        };
        self.spill_down_to(managed, target.saturating_sub(working))
    }

    /// Whether a task expected to need `need` bytes may start beside `managed` bytes of
    /// results and `working` bytes of running tasks; if not, `Err` with the bytes to
    /// spill to make room (0 when enough is on its way to disk already).
    pub fn room_for(&mut self, managed: u64, working: u64, need: u64) -> Result<(), u64> {
        let Some(target) = self.policy.bytes(self.policy.thresholds.target) else {
            return Ok(());
        };
        if managed.saturating_add(working).saturating_add(need) <= target {
            return Ok(());
        }
        let goal = target.saturating_sub(working).saturating_sub(need);
        Err(self.spill_down_to(managed, goal))
    }

    /// Whole results handed to spilling came to `extra` bytes more than asked for: they
    /// are on their way too, until their spill ends.
    pub fn spill_started(&mut self, extra: u64) {
        self.spilling += extra;
    }

    /// A spill of `bytes` ended (written or failed).
    pub fn spill_ended(&mut self, bytes: u64) {
        self.spilling = self.spilling.saturating_sub(bytes);
    }

    /// A new sample, with the store's `managed` bytes at the time.
    pub fn sampled(&mut self, sample: &MemorySample, managed: u64) -> MemoryActions {
        let process = sample.process_bytes();
        let counters = &mut self.counters;
        counters.process_bytes = process;
        counters.peak_process_bytes = counters.peak_process_bytes.max(process);
        if self.paused {
            counters.paused_for += sample.elapsed;
        }
        let mut actions = MemoryActions::default();
        let over = |fraction| self.policy.bytes(fraction).is_some_and(|b| process > b);
        let (spill, pause, terminate) = (
            over(self.policy.thresholds.spill),
            over(self.policy.thresholds.pause),
            over(self.policy.thresholds.terminate),
        );
        actions.relieve = spill;
        if spill {
            // As Dask: until process memory is back under the target, from the results
            // (the only memory the worker can move).
            let target = self
                .policy
                .bytes(self.policy.thresholds.target)
                .unwrap_or(0);
            let wanted = process.saturating_sub(target);
            actions.spill = self.spill_down_to(managed, managed.saturating_sub(wanted));
        }
        if pause != self.paused {
            self.paused = pause;
            actions.pause = Some(pause);
        }
        if let Some(target) = self.policy.bytes(self.policy.thresholds.target) {
            let hold = match self.executors_hold {
                true => process < target,
                false => process < target / 2,
            };
            if hold != self.executors_hold {
                self.executors_hold = hold;
                actions.hold = Some(hold);
            }
        }
        let threshold = self
            .policy
            .bytes(self.policy.thresholds.terminate)
            .unwrap_or(0);
        // Results in memory are for spilling to free, not for killing a task over.
        if terminate && process - managed.min(process) > threshold {
            // Only if that brings the worker back under the threshold.
            actions.restart = sample
                .executors
                .iter()
                .max_by_key(|(_, bytes)| *bytes)
                .filter(|(_, bytes)| process - bytes <= threshold)
                .map(|(slot, _)| *slot);
            if actions.restart.is_some() {
                self.counters.executors_restarted += 1;
            }
        }
        actions
    }

    /// Bytes to spill for `managed` to come down to `goal`, beyond those being spilled.
    fn spill_down_to(&mut self, managed: u64, goal: u64) -> u64 {
        let more = managed.saturating_sub(goal).saturating_sub(self.spilling);
        self.spilling += more;
        more
    }
}

/// The sizes of the results tasks made, by their function, to expect of the next ones.
#[derive(Debug, Default)]
pub struct ResultSizes {
    by_function: IdMap<FuncId, u64>,
    /// Of any task: for a function not seen yet.
    any: u64,
    seen: bool,
}

impl ResultSizes {
    /// A task of `function` made `size` bytes.
    pub fn record(&mut self, function: Option<FuncId>, size: u64) {
        // Half the last and half the history: chunks of one array are alike, and a change
        // (a new stage of a pipeline) shows within a few tasks.
        let blend = |old: &mut u64| *old = (*old + size).div_ceil(2);
        if self.seen {
            blend(&mut self.any);
        } else {
            (self.any, self.seen) = (size, true);
        }
        if let Some(function) = function {
            self.by_function
                .entry(function)
                .and_modify(blend)
                .or_insert(size);
        }
    }

    /// What the next task of `function` is expected to make; `None` before any task made
    /// anything.
    pub fn expected(&self, function: Option<FuncId>) -> Option<u64> {
        let known = function.and_then(|f| self.by_function.get(&f).copied());
        known.or(self.seen.then_some(self.any))
    }

    /// No task will run `function` any more.
    pub fn forget(&mut self, function: FuncId) {
        self.by_function.remove(&function);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn state() -> MemoryState {
        MemoryState::new(MemoryPolicy {
            limit: 100 * MIB,
            ..MemoryPolicy::default()
        })
    }

    fn sample(executors: &[(usize, u64)], shared: u64) -> MemorySample {
        MemorySample {
            worker_private: 5 * MIB,
            executors: executors.to_vec(),
            shared,
            elapsed: Duration::from_millis(200),
        }
    }

    #[test]
    fn executors_keep_a_share_of_the_limit_and_a_bounded_heap_without_one() {
        let limited = MemoryPolicy {
            limit: 1000 * MIB,
            ..MemoryPolicy::default()
        };
        assert_eq!(limited.executor_kept_mappings(2), Some(50 * MIB));
        assert_eq!(limited.executor_kept_heap(2), 50 * MIB);
        let large = MemoryPolicy {
            limit: 64 << 30,
            ..MemoryPolicy::default()
        };
        assert_eq!(large.executor_kept_heap(1), MAX_EXECUTOR_KEPT_HEAP);
        let unlimited = MemoryPolicy::default();
        assert_eq!(unlimited.limit, 0);
        assert_eq!(unlimited.executor_kept_mappings(4), None);
        assert_eq!(unlimited.executor_kept_heap(4), MAX_EXECUTOR_KEPT_HEAP);
    }

    #[test]
    fn results_beyond_the_target_are_spilled_once() {
        let mut memory = state();
        assert_eq!(memory.stored(50 * MIB, 0), 0, "under 60 MiB");
        assert_eq!(memory.stored(70 * MIB, 0), 10 * MIB);
        assert_eq!(
            memory.stored(72 * MIB, 0),
            2 * MIB,
            "not what is being spilled already"
        );
        memory.spill_ended(12 * MIB);
        assert_eq!(memory.stored(60 * MIB, 0), 0);
        assert_eq!(
            memory.stored(60 * MIB, 15 * MIB),
            15 * MIB,
            "running tasks count"
        );
    }

    #[test]
    fn a_task_starts_when_its_results_fit_under_the_target() {
        let mut memory = state();
        assert_eq!(memory.room_for(20 * MIB, 20 * MIB, 20 * MIB), Ok(()));
        // 30 + 20 + 20 = 70 MiB: 10 over the 60 MiB target.
        assert_eq!(memory.room_for(30 * MIB, 20 * MIB, 20 * MIB), Err(10 * MIB));
        assert_eq!(
            memory.room_for(30 * MIB, 20 * MIB, 20 * MIB),
            Err(0),
            "asked for once"
        );
        memory.spill_ended(10 * MIB);
        assert_eq!(memory.room_for(20 * MIB, 20 * MIB, 20 * MIB), Ok(()));
        let mut unlimited = MemoryState::new(MemoryPolicy::default());
        assert_eq!(unlimited.room_for(u64::MAX, u64::MAX, u64::MAX), Ok(()));
    }

    #[test]
    fn executors_keep_results_under_the_target_and_again_under_half_of_it() {
        let mut memory = state();
        assert!(memory.executors_hold());
        // The worker's own 5 MiB and 50 MiB in an executor: under the 60 MiB target.
        let actions = memory.sampled(&sample(&[(0, 50 * MIB)], 0), 0);
        assert_eq!(actions.hold, None);
        let actions = memory.sampled(&sample(&[(0, 56 * MIB)], 0), 0);
        assert_eq!(actions.hold, Some(false), "61 MiB: over the target");
        let actions = memory.sampled(&sample(&[(0, 40 * MIB)], 0), 0);
        assert_eq!(actions.hold, None, "45 MiB: not yet under half of it");
        assert!(!memory.executors_hold());
        let actions = memory.sampled(&sample(&[(0, 20 * MIB)], 0), 0);
        assert_eq!(actions.hold, Some(true), "25 MiB");
        let mut unlimited = MemoryState::new(MemoryPolicy::default());
        let actions = unlimited.sampled(&sample(&[(0, u64::MAX / 2)], 0), 0);
        assert_eq!(actions.hold, None);
        assert!(unlimited.executors_hold());
    }

    #[test]
    fn result_sizes_are_expected_by_function_then_of_any_task() {
        let (a, b) = (FuncId(1), FuncId(2));
        let mut sizes = ResultSizes::default();
        assert_eq!(sizes.expected(Some(a)), None, "nothing seen yet");
        sizes.record(Some(a), 64 * MIB);
        assert_eq!(sizes.expected(Some(a)), Some(64 * MIB));
        assert_eq!(sizes.expected(Some(b)), Some(64 * MIB), "of any task");
        sizes.record(Some(b), 0);
        assert_eq!(sizes.expected(None), Some(32 * MIB));
        sizes.record(Some(a), 32 * MIB);
        assert_eq!(sizes.expected(Some(a)), Some(48 * MIB));
        sizes.forget(a);
        assert_eq!(sizes.expected(Some(a)), sizes.expected(None));
    }

    #[test]
    fn process_memory_above_spill_spills_pauses_and_resumes() {
        let mut memory = state();
        // 5 + 20 + 50 = 75 MiB: over 70, under 80.
        let actions = memory.sampled(&sample(&[(0, 20 * MIB)], 50 * MIB), 50 * MIB);
        assert_eq!(actions.pause, None);
        assert!(actions.spill >= 5 * MIB, "{actions:?}");
        memory.spill_ended(actions.spill);
        // 5 + 40 + 40 = 85 MiB: paused.
        let actions = memory.sampled(&sample(&[(0, 40 * MIB)], 40 * MIB), 40 * MIB);
        assert_eq!(actions.pause, Some(true));
        assert!(memory.is_paused());
        memory.spill_ended(actions.spill);
        let actions = memory.sampled(&sample(&[(0, 40 * MIB)], 40 * MIB), 40 * MIB);
        assert_eq!(actions.pause, None, "told once");
        memory.spill_ended(actions.spill);
        // Down to 25 MiB: resumed.
        let actions = memory.sampled(&sample(&[(0, 10 * MIB)], 10 * MIB), 10 * MIB);
        assert_eq!(actions.pause, Some(false));
        assert_eq!(memory.counters().paused_for, Duration::from_millis(400));
        assert_eq!(memory.counters().peak_process_bytes, 85 * MIB);
    }

    #[test]
    fn above_terminate_the_largest_executor_is_restarted() {
        let mut memory = state();
        let executors = [(0, 10 * MIB), (1, 70 * MIB), (2, 5 * MIB)];
        // 5 + 85 + 10, of which no result in memory: spilling cannot help.
        let actions = memory.sampled(&sample(&executors, 10 * MIB), 0);
        assert_eq!(actions.restart, Some(1));
        assert_eq!(memory.counters().executors_restarted, 1);
    }

    #[test]
    fn an_executor_is_not_restarted_for_memory_it_does_not_hold() {
        let mut memory = state();
        // 5 + 10 + 90: the results in shared memory are over the threshold, not the
        // executor: spilling them is what helps.
        let actions = memory.sampled(&sample(&[(0, 10 * MIB)], 90 * MIB), 90 * MIB);
        assert_eq!(actions.restart, None);
        assert!(actions.spill > 0 && actions.relieve);
    }

    #[test]
    fn no_limit_no_management() {
        let mut memory = MemoryState::new(MemoryPolicy::default());
        assert_eq!(memory.stored(u64::MAX / 2, 0), 0);
        let actions = memory.sampled(&sample(&[(0, 1 << 40)], 1 << 40), 1 << 40);
        assert_eq!(actions, MemoryActions::default());
    }
}
