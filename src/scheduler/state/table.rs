//! The task table: records kept densely in a vector and found by id through an index.
//!
//! A hash map of the records themselves would keep up to half of its (large) buckets
//! empty, all of them resident, and touch them at random; here only the small index is
//! sparse. Removal moves the last record into the hole, so the records stay dense.
//!
//! Clients number their tasks in sequence, and the scheduler meets them in about that
//! order (submitted, assigned, finished, released), so the index keeps positions in pages
//! of consecutive ids: a lookup is a probe in a small map of pages (cached) and a load
//! next to the last one. A hash of every id sent each lookup to a random place in an
//! index of 27 MB at 10^6 tasks, a cache miss each, about 7 per task.

use super::records::Task;
use crate::heap::ShrinkWhenSparse;
use crate::protocol::{IdMap, TaskId};

/// Below this many records of room, the vector keeps its room when it empties.
const SHRINK_ABOVE_CAPACITY: usize = 1024;

/// Ids per page: 1 KiB of positions. A page lives while one of its ids does, so a lone
/// long-lived task costs at most this much index.
const PAGE_BITS: u32 = 8;
const PAGE_IDS: usize = 1 << PAGE_BITS;

/// A record's position. 2^32 tasks would need 650 GB of records first.
type Position = u32;
/// A page's slot of an id not in the table.
const NO_POSITION: Position = Position::MAX;

/// The positions of ids `page << PAGE_BITS ..` up to the next page.
struct Page {
    positions: Box<[Position; PAGE_IDS]>,
    /// Slots in use: the page goes when none is.
    used: u16,
}

impl Page {
    fn new() -> Page {
        Page {
            positions: Box::new([NO_POSITION; PAGE_IDS]),
            used: 0,
        }
    }
}

fn page_of(id: TaskId) -> u64 {
    id.0 >> PAGE_BITS
}

fn slot_of(id: TaskId) -> usize {
    (id.0 as usize) & (PAGE_IDS - 1)
}

#[derive(Default)]
pub(super) struct TaskTable {
    /// Where each task's record is in `records`, by page of ids.
    index: IdMap<u64, Page>,
    /// The id of each record, by position.
    ids: Vec<TaskId>,
    records: Vec<Task>,
}

impl TaskTable {
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    fn position(&self, id: &TaskId) -> Option<usize> {
        let at = self.index.get(&page_of(*id))?.positions[slot_of(*id)];
        (at != NO_POSITION).then_some(at as usize)
    }

    pub(super) fn contains_key(&self, id: &TaskId) -> bool {
        self.position(id).is_some()
    }

    pub(super) fn get(&self, id: &TaskId) -> Option<&Task> {
        self.position(id).map(|at| &self.records[at])
    }

    pub(super) fn get_mut(&mut self, id: &TaskId) -> Option<&mut Task> {
        self.position(id).map(|at| &mut self.records[at])
    }

    /// Adds a task, or replaces the record of one already there (returned).
    pub(super) fn insert(&mut self, id: TaskId, task: Task) -> Option<Task> {
        let page = self.index.entry(page_of(id)).or_insert_with(Page::new);
        let slot = &mut page.positions[slot_of(id)];
        if *slot != NO_POSITION {
            return Some(std::mem::replace(&mut self.records[*slot as usize], task));
        }
        *slot = self.records.len() as Position;
        page.used += 1;
        self.ids.push(id);
        self.records.push(task);
        None
    }

    pub(super) fn remove(&mut self, id: &TaskId) -> Option<Task> {
        let key = page_of(*id);
        let page = self.index.get_mut(&key)?;
        let at = std::mem::replace(&mut page.positions[slot_of(*id)], NO_POSITION);
        if at == NO_POSITION {
            return None;
        }
        page.used -= 1;
        if page.used == 0 {
            self.index.remove(&key);
        }
        let at = at as usize;
        self.ids.swap_remove(at);
        let task = self.records.swap_remove(at);
        if let Some(&moved) = self.ids.get(at) {
            if let Some(page) = self.index.get_mut(&page_of(moved)) {
                page.positions[slot_of(moved)] = at as Position;
            }
        }
        self.shrink_when_sparse();
        Some(task)
    }

    /// Asserts that the index finds every record where it is and holds nothing else.
    #[cfg(test)]
    pub(super) fn check_index(&self) {
        for (at, id) in self.ids.iter().enumerate() {
            assert_eq!(
                self.position(id),
                Some(at),
                "task {id} is indexed elsewhere"
            );
        }
        let used: usize = self.index.values().map(|page| usize::from(page.used)).sum();
        assert_eq!(used, self.records.len(), "index slots in use");
        for page in self.index.values() {
            let filled = page
                .positions
                .iter()
                .filter(|&&at| at != NO_POSITION)
                .count();
            assert_eq!(
                filled,
                usize::from(page.used),
                "a page's count of its slots"
            );
        }
    }

    /// Pages of the index.
    #[cfg(test)]
    pub(super) fn pages(&self) -> usize {
        self.index.len()
    }

    /// Gives back the room of a big graph once most of it is gone.
    fn shrink_when_sparse(&mut self) {
        self.index.shrink_when_sparse();
        let room = self.records.capacity();
        if room > SHRINK_ABOVE_CAPACITY && self.records.len() < room / 4 {
            let keep = self.records.len() * 2;
            self.records.shrink_to(keep);
            self.ids.shrink_to(keep);
        }
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&TaskId, &mut Task)> {
        self.into_iter()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &TaskId> {
        self.ids.iter()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Task> {
        self.records.iter()
    }
}

#[cfg(test)]
impl std::ops::Index<&TaskId> for TaskTable {
    type Output = Task;

    fn index(&self, id: &TaskId) -> &Task {
        match self.get(id) {
            Some(task) => task,
            None => panic!("task {id} is not in the table"),
        }
    }
}

impl<'a> IntoIterator for &'a TaskTable {
    type Item = (&'a TaskId, &'a Task);
    type IntoIter = std::iter::Zip<std::slice::Iter<'a, TaskId>, std::slice::Iter<'a, Task>>;

    fn into_iter(self) -> Self::IntoIter {
        self.ids.iter().zip(&self.records)
    }
}

impl<'a> IntoIterator for &'a mut TaskTable {
    type Item = (&'a TaskId, &'a mut Task);
    type IntoIter = std::iter::Zip<std::slice::Iter<'a, TaskId>, std::slice::IterMut<'a, Task>>;

    fn into_iter(self) -> Self::IntoIter {
        self.ids.iter().zip(&mut self.records)
    }
}
