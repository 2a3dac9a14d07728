//! Root tasks withheld until a worker has room, and which worker takes which.
//!
//! Dask orders a graph's roots so that consecutive ones feed the same task downstream (a
//! rechunk's merge, a reduction's first level). Each worker claims a contiguous share of
//! the queue, its reserve, and takes its roots from there, so that the task combining
//! them finds most of its inputs on one worker. Handed out in turn, two at a time, the
//! roots of a rechunk into three intermediates alternated between two workers, and half
//! of every intermediate's inputs crossed between them. A worker with nothing left to
//! claim takes the back half of the largest other reserve; a worker that leaves gives its
//! reserve back.

use crate::protocol::{IdMap, TaskId, WorkerId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Below this many entries of room, the unclaimed queue keeps its room as it empties.
const SHRINK_ROOTS_ABOVE: usize = 4096;

/// A root's place in the order: lowest priority value first, then lowest id.
type Entry = (i64, TaskId);

/// The part of a worker's memory the roots it claims at once may fill. Two workers that
/// claim far apart hold the results of both stretches at once, where Dask's order would
/// have them finish one first: a rechunk four times the memory of two 512 MiB workers,
/// its roots 8 MiB each, spilled 11.2-11.6 GB with halves claimed and 10.1-10.4 GB with
/// one or two roots at a time (docs/performance.md).
const CLAIM_MEMORY_FRACTION: f64 = 1.0 / 32.0;

/// How many roots a worker with `memory_limit` bytes (0: none) may claim at once, when
/// roots' results average `root_bytes` (`None`: none finished yet, so one at a time).
pub(in crate::scheduler) fn claim_limit(memory_limit: u64, root_bytes: Option<f64>) -> usize {
    match (memory_limit, root_bytes) {
        (0, _) => usize::MAX,
        (_, None) => 1,
        // Saturating: tiny (or empty) results allow any share.
        (limit, Some(bytes)) => ((limit as f64 * CLAIM_MEMORY_FRACTION / bytes) as usize).max(1),
    }
}

#[derive(Default)]
pub(in crate::scheduler) struct RootQueue {
    /// Unclaimed entries pushed in order, each not before the one pushed last: clients
    /// list a graph's roots in priority order, so nearly all land here, at O(1) a push and
    /// a pop (a heap's pop at 10^6 roots was 6% of the scheduler's time).
    in_order: VecDeque<Entry>,
    /// The other unclaimed entries.
    heap: BinaryHeap<Reverse<Entry>>,
    /// What each worker claimed and has not taken yet, in order; never empty.
    reserved: IdMap<WorkerId, VecDeque<Entry>>,
    /// Entries in all reserves.
    reserved_len: usize,
}

impl RootQueue {
    pub(in crate::scheduler) fn push(&mut self, priority: i64, id: TaskId) {
        let entry = (priority, id);
        if self.in_order.back().is_none_or(|&last| last <= entry) {
            self.in_order.push_back(entry);
        } else {
            self.heap.push(Reverse(entry));
        }
    }

    /// The next root for `worker`, one of `workers`: from its reserve, unless the
    /// unclaimed queue holds an earlier one (a graph submitted since); then it claims its
    /// share of those first, at most `limit` ([`claim_limit`]). With nothing to claim, it
    /// takes the back half of the largest reserve of another worker. Entries are not
    /// removed when a task stops being ready (cancelled, assigned after a worker loss
    /// requeued it twice); the caller skips those it pops.
    pub(in crate::scheduler) fn pop_for(
        &mut self,
        worker: WorkerId,
        workers: usize,
        limit: usize,
    ) -> Option<TaskId> {
        let next = self.peek_unclaimed();
        let own = (self.reserved.get(&worker))
            .and_then(VecDeque::front)
            .copied();
        match (own, next) {
            (None, None) => self.steal_for(worker),
            // A graph submitted since comes earlier in the order than its reserve.
            (own, Some(next)) if own.is_none_or(|own| next < own) => {
                self.claim(worker, workers, limit, own)
            }
            _ => {} // its reserve comes first
        }
        self.pop_own(worker)
    }

    /// `worker` left: what it claimed goes back to the unclaimed queue.
    pub(in crate::scheduler) fn release(&mut self, worker: WorkerId) {
        let Some(reserve) = self.reserved.remove(&worker) else {
            return;
        };
        self.reserved_len -= reserve.len();
        for (priority, id) in reserve {
            self.push(priority, id);
        }
    }

    /// Queued entries, claimed or not, stale ones included.
    pub(in crate::scheduler) fn len(&self) -> usize {
        self.in_order.len() + self.heap.len() + self.reserved_len
    }

    /// The workers holding a reserve.
    #[cfg(test)]
    pub(in crate::scheduler) fn reserving(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.reserved.keys().copied()
    }

    /// The priority of the next root in `worker`'s reserve.
    pub(in crate::scheduler) fn next_own(&self, worker: WorkerId) -> Option<i64> {
        let (priority, _) = self.reserved.get(&worker)?.front()?;
        Some(*priority)
    }

    /// The next root of `worker`'s reserve: never one claimed or taken from another's
    /// (see `Scheduler::schedule`).
    pub(in crate::scheduler) fn pop_own(&mut self, worker: WorkerId) -> Option<TaskId> {
        let reserve = self.reserved.get_mut(&worker)?;
        let (_, id) = reserve.pop_front()?;
        if reserve.is_empty() {
            self.reserved.remove(&worker);
        }
        self.reserved_len -= 1;
        Some(id)
    }

    /// Moves the worker's share of the unclaimed entries before `before` into the front of
    /// its reserve. The share divides them between the workers that will come to them:
    /// this one and those without a reserve or whose reserve comes after them (a worker
    /// busy with earlier roots takes none), so that two idle workers split a graph's roots
    /// in two halves, not one half and then a quarter.
    fn claim(&mut self, worker: WorkerId, workers: usize, limit: usize, before: Option<Entry>) {
        let Some(next) = self.peek_unclaimed() else {
            return;
        };
        let unclaimed = self.unclaimed_len();
        let share = if limit <= unclaimed.div_ceil(workers.max(1)) {
            limit // whoever shares: no need to count them (O(workers) a claim)
        } else {
            let busy_before = (self.reserved.iter())
                .filter(|&(&w, reserve)| w != worker && reserve.front().is_some_and(|&f| f < next))
                .count();
            let sharing = workers.saturating_sub(busy_before).max(1);
            unclaimed.div_ceil(sharing).min(limit)
        };
        let mut run = Vec::with_capacity(share.min(unclaimed));
        while run.len() < share {
            match self.peek_unclaimed() {
                Some(entry) if before.is_none_or(|b| entry < b) => {
                    self.pop_unclaimed();
                    run.push(entry);
                }
                _ => break,
            }
        }
        self.reserved_len += run.len();
        let reserve = self.reserved.entry(worker).or_default();
        for entry in run.into_iter().rev() {
            reserve.push_front(entry);
        }
    }

    /// `worker`, whose reserve is empty, takes the back half of the largest other one
    /// (ties: the lower worker id). Its owner keeps the front, which it is working through.
    fn steal_for(&mut self, worker: WorkerId) {
        let largest = (self.reserved.iter_mut())
            .filter(|(&w, _)| w != worker)
            .max_by_key(|(&w, reserve)| (reserve.len(), Reverse(w)));
        let Some((&victim, reserve)) = largest else {
            return;
        };
        let taken = reserve.split_off(reserve.len() / 2);
        if reserve.is_empty() {
            self.reserved.remove(&victim);
        }
        self.reserved.insert(worker, taken);
    }

    fn unclaimed_len(&self) -> usize {
        self.in_order.len() + self.heap.len()
    }

    fn peek_unclaimed(&self) -> Option<Entry> {
        match (self.in_order.front(), self.heap.peek()) {
            (Some(&first), Some(&Reverse(top))) => Some(first.min(top)),
            (Some(&first), None) => Some(first),
            (None, top) => top.map(|&Reverse(top)| top),
        }
    }

    fn pop_unclaimed(&mut self) -> Option<Entry> {
        let from_heap = match (self.in_order.front(), self.heap.peek()) {
            (Some(first), Some(Reverse(top))) => top < first,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if from_heap {
            return self.heap.pop().map(|Reverse(entry)| entry);
        }
        let entry = self.in_order.pop_front();
        let room = self.in_order.capacity();
        if room > SHRINK_ROOTS_ABOVE && self.in_order.len() < room / 4 {
            self.in_order.shrink_to(self.in_order.len() * 2);
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: WorkerId = WorkerId(1);
    const B: WorkerId = WorkerId(2);
    const C: WorkerId = WorkerId(3);

    fn id(n: u64) -> TaskId {
        TaskId(n)
    }

    /// A queue of roots 0..n, each its own priority.
    fn queue_of(n: u64) -> RootQueue {
        let mut queue = RootQueue::default();
        for n in 0..n {
            queue.push(n as i64, id(n));
        }
        queue
    }

    fn take(queue: &mut RootQueue, worker: WorkerId, workers: usize, count: usize) -> Vec<u64> {
        (0..count)
            .map_while(|_| queue.pop_for(worker, workers, usize::MAX))
            .map(|t| t.0)
            .collect()
    }

    #[test]
    fn roots_come_out_by_priority_then_id_whatever_order_they_went_in() {
        let pushed = [
            (0, 1),
            (0, 2),
            (5, 3),
            (1, 4),
            (5, 5),
            (-1, 6),
            (7, 7),
            (5, 8),
            (0, 9),
        ];
        let mut queue = RootQueue::default();
        for (priority, n) in pushed {
            queue.push(priority, id(n));
        }
        assert_eq!(queue.len(), pushed.len());
        let mut expected = pushed.to_vec();
        expected.sort_unstable();
        let popped: Vec<TaskId> = std::iter::from_fn(|| queue.pop_for(A, 1, usize::MAX)).collect();
        assert_eq!(
            popped,
            expected.iter().map(|&(_, n)| id(n)).collect::<Vec<_>>()
        );
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn two_workers_take_the_two_halves_of_a_graphs_roots() {
        let mut queue = queue_of(100);
        let mut a = Vec::new();
        let mut b = Vec::new();
        while queue.len() > 0 {
            a.extend(take(&mut queue, A, 2, 2));
            b.extend(take(&mut queue, B, 2, 2));
        }
        assert_eq!(a, (0..50).collect::<Vec<_>>());
        assert_eq!(b, (50..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_worker_with_nothing_left_takes_the_back_half_of_the_largest_reserve() {
        let mut queue = queue_of(90);
        assert_eq!(take(&mut queue, A, 2, 1), [0], "A claims 0..45");
        assert_eq!(take(&mut queue, B, 2, 3), [45, 46, 47], "B the rest");
        // C joins: nothing unclaimed; A's 44 left outnumber B's 42.
        assert_eq!(
            take(&mut queue, C, 3, 1),
            [23],
            "C takes the back half of A's"
        );
        assert_eq!(take(&mut queue, A, 3, 3), [1, 2, 3], "A keeps its front");
        assert_eq!(queue.len(), 90 - 8);
        let rest = [C, A, B].map(|w| take(&mut queue, w, 3, 100)).concat();
        assert_eq!(queue.len(), 0);
        let mut all = [vec![0, 45, 46, 47, 23, 1, 2, 3], rest].concat();
        all.sort_unstable();
        assert_eq!(all, (0..90).collect::<Vec<_>>(), "each root once");
    }

    #[test]
    fn a_graph_submitted_later_with_earlier_roots_goes_first_and_is_shared() {
        let mut queue = RootQueue::default();
        for n in 0..40 {
            queue.push(100 + n as i64, id(n));
        }
        assert_eq!(take(&mut queue, A, 2, 1), [0]);
        assert_eq!(take(&mut queue, B, 2, 1), [20]);
        for n in 40..60 {
            queue.push(n as i64 - 40, id(n));
        }
        assert_eq!(take(&mut queue, A, 2, 2), [40, 41], "the new graph first");
        assert_eq!(take(&mut queue, B, 2, 2), [50, 51], "its other half");
        assert_eq!(
            take(&mut queue, A, 2, 9),
            [42, 43, 44, 45, 46, 47, 48, 49, 1]
        );
        assert_eq!(
            take(&mut queue, B, 2, 9),
            [52, 53, 54, 55, 56, 57, 58, 59, 21]
        );
    }

    #[test]
    fn claims_stop_at_the_limit() {
        let mut queue = queue_of(100);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..3 {
            a.extend((0..4).map_while(|_| queue.pop_for(A, 2, 4)).map(|t| t.0));
            b.extend((0..4).map_while(|_| queue.pop_for(B, 2, 4)).map(|t| t.0));
        }
        assert_eq!(a, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]);
        assert_eq!(b, [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]);
    }

    #[test]
    fn the_limit_is_what_fits_in_a_part_of_memory() {
        let gib = 1 << 30;
        assert_eq!(claim_limit(0, Some(1e9)), usize::MAX, "no memory limit");
        assert_eq!(claim_limit(gib, None), 1, "root sizes unknown yet");
        assert_eq!(claim_limit(gib, Some(f64::from(1 << 20))), 32);
        assert_eq!(
            claim_limit(gib, Some(f64::from(1 << 30))),
            1,
            "at least one"
        );
        assert_eq!(claim_limit(gib, Some(0.0)), usize::MAX, "empty results");
    }

    #[test]
    fn a_worker_leaving_gives_its_reserve_back() {
        let mut queue = queue_of(10);
        assert_eq!(take(&mut queue, A, 2, 1), [0]);
        assert_eq!(take(&mut queue, B, 2, 1), [5]);
        queue.release(B);
        assert_eq!(queue.reserving().collect::<Vec<_>>(), [A]);
        assert_eq!(queue.len(), 8);
        assert_eq!(take(&mut queue, A, 1, 10), [1, 2, 3, 4, 6, 7, 8, 9]);
        queue.release(C); // holding nothing
        assert_eq!(queue.len(), 0);
    }
}
