//! Published datasets (`Client.publish_dataset`): pickled values kept by name, whose
//! futures the scheduler holds for them, so they outlive the client that published them
//! and any client can fetch them by name.

use super::records::TaskState;
use super::Scheduler;
use crate::protocol::{ClientId, Coordinated, DatasetOp, TaskId, ToClient};
use bytes::Bytes;

pub(super) struct Dataset {
    value: Bytes,
    /// Held while published; sorted, without repeats.
    pub(super) tasks: Vec<TaskId>,
}

impl Scheduler {
    /// Answers a request on the published datasets at once.
    pub(super) fn dataset_request(&mut self, client: ClientId, request: u64, op: DatasetOp) {
        let reply = match op {
            DatasetOp::Publish {
                name,
                value,
                tasks,
                overwrite,
            } => self.publish(name, value, tasks, overwrite),
            DatasetOp::Unpublish { name } => {
                if let Some(dataset) = self.datasets.remove(&name) {
                    self.unpin(dataset.tasks);
                }
                Coordinated::Done
            }
            DatasetOp::Get { name } => match self.datasets.get(&name) {
                Some(dataset) => Coordinated::Value(dataset.value.clone()),
                None => Coordinated::Refused(format!("Dataset {name:?} not found")),
            },
            DatasetOp::List => Coordinated::Names(self.datasets.keys().cloned().collect()),
        };
        self.outbox
            .to_clients
            .push((client, ToClient::Coordinated { request, reply }));
    }

    fn publish(
        &mut self,
        name: String,
        value: Bytes,
        mut tasks: Vec<TaskId>,
        overwrite: bool,
    ) -> Coordinated {
        if self.datasets.contains_key(&name) && !overwrite {
            return Coordinated::Refused(format!("Dataset {name:?} already exists"));
        }
        let not_live = tasks.iter().find(|id| {
            self.tasks
                .get(id)
                .is_none_or(|task| matches!(task.state, TaskState::Released))
        });
        if let Some(id) = not_live {
            return Coordinated::Refused(format!(
                "task {id} of dataset {name:?} is not live (released, or never submitted)"
            ));
        }
        tasks.sort_unstable();
        tasks.dedup();
        for id in &tasks {
            if let Some(task) = self.tasks.get_mut(id) {
                task.published += 1;
            }
        }
        if let Some(replaced) = self.datasets.insert(name, Dataset { value, tasks }) {
            self.unpin(replaced.tasks);
        }
        Coordinated::Done
    }

    /// `Client.restart()` drops every dataset with every task.
    pub(super) fn unpublish_all(&mut self) {
        let datasets = std::mem::take(&mut self.datasets);
        for dataset in datasets.into_values() {
            self.unpin(dataset.tasks);
        }
    }

    fn unpin(&mut self, tasks: Vec<TaskId>) {
        for id in &tasks {
            if let Some(task) = self.tasks.get_mut(id) {
                task.published -= 1;
            }
        }
        self.release_unneeded(tasks);
    }
}
