//! The task table: records kept densely in a vector and found by id through an index.
//!
//! A hash map of the records themselves would keep up to half of its (large) buckets
//! empty, all of them resident, and touch them at random; here only the small index is
//! sparse. Removal moves the last record into the hole, so the records stay dense.

use super::records::Task;
use crate::heap::ShrinkWhenSparse;
use crate::protocol::{IdMap, TaskId};
use std::hash::{Hash, Hasher};

/// Below this many records of room, the vector keeps its room when it empties.
const SHRINK_ABOVE_CAPACITY: usize = 1024;

/// A task id in two halves, so that an index entry (id and position) takes 12 bytes, not
/// 16: at 10^6 tasks the index is then 27 MB rather than 36.
#[derive(Clone, Copy, PartialEq, Eq)]
struct IndexKey([u32; 2]);

impl From<TaskId> for IndexKey {
    fn from(id: TaskId) -> Self {
        IndexKey([(id.0 >> 32) as u32, id.0 as u32])
    }
}

impl Hash for IndexKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `TaskId` hashes, so the id hasher mixes it the same way.
        state.write_u64((u64::from(self.0[0]) << 32) | u64::from(self.0[1]));
    }
}

/// A record's position. 2^32 tasks would need 650 GB of records first.
type Position = u32;

#[derive(Default)]
pub(super) struct TaskTable {
    /// Where each task's record is in `records`.
    index: IdMap<IndexKey, Position>,
    /// The id of each record, by position.
    ids: Vec<TaskId>,
    records: Vec<Task>,
}

impl TaskTable {
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    fn position(&self, id: &TaskId) -> Option<usize> {
        self.index.get(&IndexKey::from(*id)).map(|&at| at as usize)
    }

    pub(super) fn contains_key(&self, id: &TaskId) -> bool {
        self.index.contains_key(&IndexKey::from(*id))
    }

    pub(super) fn get(&self, id: &TaskId) -> Option<&Task> {
        self.position(id).map(|at| &self.records[at])
    }

    pub(super) fn get_mut(&mut self, id: &TaskId) -> Option<&mut Task> {
        self.position(id).map(|at| &mut self.records[at])
    }

    /// Adds a task, or replaces the record of one already there (returned).
    pub(super) fn insert(&mut self, id: TaskId, task: Task) -> Option<Task> {
        if let Some(at) = self.position(&id) {
            return Some(std::mem::replace(&mut self.records[at], task));
        }
        self.index
            .insert(IndexKey::from(id), self.records.len() as Position);
        self.ids.push(id);
        self.records.push(task);
        None
    }

    pub(super) fn remove(&mut self, id: &TaskId) -> Option<Task> {
        let at = self.index.remove(&IndexKey::from(*id))? as usize;
        self.ids.swap_remove(at);
        let task = self.records.swap_remove(at);
        if let Some(&moved) = self.ids.get(at) {
            self.index.insert(IndexKey::from(moved), at as Position);
        }
        self.shrink_when_sparse();
        Some(task)
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
