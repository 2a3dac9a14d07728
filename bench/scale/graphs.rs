//! Generated task graphs in the shapes Dask workloads take, numbered as a client numbers
//! its tasks (`TaskId::new(client, sequence)` from 1 up), dependencies first.

use bytes::Bytes;
use rankmesh::protocol::{ClientId, FuncId, FunctionBlob, TaskId, TaskOptions, TaskSpec};

/// The one callable every generated task refers to, as a pickled function would be.
const FUNCTION: FuncId = FuncId(1);
const FUNCTION_BYTES: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Independent tasks (`client.map`).
    Map,
    /// A binary tree reduction over `tasks / 2` leaves.
    Tree,
    /// `map_blocks` with a halo, stage after stage: block `i` of a stage reads blocks
    /// `i - 1`, `i` and `i + 1` of the stage before.
    Blocks { stages: u64 },
    /// All-to-all between two stages of `k = sqrt(tasks)` tasks each: `k²` edges, so the
    /// edge count, not the task count, follows `tasks`.
    Rechunk,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Map => "map",
            Shape::Tree => "tree",
            Shape::Blocks { .. } => "blocks",
            Shape::Rechunk => "rechunk",
        }
    }
}

/// Which tasks the client holds futures on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// Those nothing depends on, as `dask.compute` of the final result.
    Sinks,
    /// Every task, as `client.compute` of every intermediate.
    All,
}

pub struct Graph {
    pub functions: Vec<FunctionBlob>,
    /// Dependencies before their dependents.
    pub tasks: Vec<TaskSpec>,
    pub wanted: Vec<TaskId>,
    /// The tasks' kinds, which `TaskSpec::prefix` indexes.
    pub prefixes: Vec<String>,
}

impl Graph {
    pub fn edges(&self) -> usize {
        self.tasks.iter().map(|t| t.deps.len()).sum()
    }
}

/// Adds tasks in the order they should run: the sequence number is also the priority
/// (lower runs first), as Dask's `order` gives one.
struct Builder {
    client: ClientId,
    payload: Bytes,
    tasks: Vec<TaskSpec>,
}

impl Builder {
    fn add(&mut self, prefix: u32, deps: Vec<TaskId>) -> TaskId {
        let sequence = self.tasks.len() as u64 + 1;
        let id = TaskId::new(self.client, sequence);
        self.tasks.push(TaskSpec {
            id,
            deps,
            funcs: smallvec::smallvec![FUNCTION],
            payload: self.payload.clone(),
            priority: sequence as i64,
            workers: Vec::new(),
            options: TaskOptions::default(),
            prefix,
        });
        id
    }

    /// Leaves `[first, first + count)` reduced pairwise in post-order, so each pair's sum
    /// comes right after its inputs (depth first, as Dask orders reductions).
    fn tree(&mut self, count: u64) -> TaskId {
        if count <= 1 {
            return self.add(0, Vec::new());
        }
        let left = self.tree(count / 2);
        let right = self.tree(count - count / 2);
        self.add(1, vec![left, right])
    }
}

/// A graph of about `size` tasks (`Rechunk`: `size` edges) for `client`, each task
/// carrying `payload_bytes` of payload.
pub fn build(
    shape: Shape,
    size: u64,
    wanted: Wanted,
    client: ClientId,
    payload_bytes: usize,
) -> Graph {
    let mut builder = Builder {
        client,
        payload: Bytes::from(vec![0u8; payload_bytes]),
        tasks: Vec::with_capacity(size as usize),
    };
    let prefixes: &[&str] = match shape {
        Shape::Map => {
            for _ in 0..size {
                builder.add(0, Vec::new());
            }
            &["map"]
        }
        Shape::Tree => {
            builder.tree((size / 2).max(1));
            &["tree-leaf", "tree-combine"]
        }
        Shape::Blocks { stages } => {
            let stages = stages.max(1);
            let width = (size / stages).max(1) as usize;
            let mut previous: Vec<TaskId> =
                (0..width).map(|_| builder.add(0, Vec::new())).collect();
            for _ in 1..stages {
                previous = (0..width)
                    .map(|i| {
                        let halo = previous[i.saturating_sub(1)..(i + 2).min(width)].to_vec();
                        builder.add(1, halo)
                    })
                    .collect();
            }
            &["blocks-load", "blocks-halo"]
        }
        Shape::Rechunk => {
            let k = ((size as f64).sqrt() as u64).max(1);
            let split: Vec<TaskId> = (0..k).map(|_| builder.add(0, Vec::new())).collect();
            for _ in 0..k {
                builder.add(1, split.clone());
            }
            &["rechunk-split", "rechunk-merge"]
        }
    };
    let tasks = builder.tasks;
    let wanted = match wanted {
        Wanted::All => tasks.iter().map(|t| t.id).collect(),
        Wanted::Sinks => {
            let inputs: std::collections::HashSet<TaskId> =
                tasks.iter().flat_map(|t| t.deps.iter().copied()).collect();
            tasks
                .iter()
                .map(|t| t.id)
                .filter(|id| !inputs.contains(id))
                .collect()
        }
    };
    Graph {
        functions: vec![FunctionBlob {
            id: FUNCTION,
            bytes: Bytes::from(vec![0u8; FUNCTION_BYTES]),
        }],
        tasks,
        wanted,
        prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
    }
}
