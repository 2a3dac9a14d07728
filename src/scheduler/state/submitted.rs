//! What a task was submitted with and keeps unchanged until it is forgotten: its payload,
//! its inputs and its functions, packed per submit part.
//!
//! The tasks of one submit part share one allocation of each (`Part`), and a record holds
//! an `Arc` and spans into it. Each task's own allocations cost more than what they held:
//! a `Bytes` (32 bytes), two boxed lists (16 each) and a malloc chunk of 32 bytes for a
//! list of one or two inputs, in every record of graphs of 10^7 tasks.

use crate::protocol::{FuncId, TaskId, TaskSpec};
use bytes::{Bytes, BytesMut};
use std::ops::Range;
use std::sync::Arc;

/// Payloads up to this size share their part's buffer; a larger one gets a part of its
/// own, so that tasks with small payloads do not keep it alive.
const PACKED_PAYLOAD_MAX: usize = 1024;

/// The most a submit part may hold of payload bytes, inputs or functions, so that spans
/// fit in u32 (`check_part_size`; a frame holds at most 256 MiB anyway).
const PART_MAX: usize = u32::MAX as usize;

/// What one task was submitted with: spans of its part.
#[derive(Clone)]
pub(super) struct Submitted {
    part: Arc<Part>,
    payload: Span,
    deps: Span,
    funcs: Span,
}

#[derive(Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        let start = self.start as usize;
        start..start + self.len as usize
    }
}

/// The payloads, inputs and functions of some tasks of a submit part, end to end.
struct Part {
    payloads: Bytes,
    deps: Box<[TaskId]>,
    funcs: Box<[FuncId]>,
}

impl Submitted {
    /// The pickled task: a slice of its part's buffer (no copy).
    pub(super) fn payload(&self) -> Bytes {
        self.part.payloads.slice(self.payload.range())
    }

    pub(super) fn payload_len(&self) -> usize {
        self.payload.len as usize
    }

    /// Inputs in payload order; may repeat an id.
    pub(super) fn deps(&self) -> &[TaskId] {
        &self.part.deps[self.deps.range()]
    }

    /// Callables the payload refers to.
    pub(super) fn funcs(&self) -> &[FuncId] {
        &self.part.funcs[self.funcs.range()]
    }
}

/// Where the next task's spans start in a part being filled; also the totals of a part.
#[derive(Default)]
struct Cursor {
    payloads: usize,
    deps: usize,
    funcs: usize,
}

impl Cursor {
    /// The spans of `spec` in `part`, which holds it at this cursor; moves past them.
    fn take(&mut self, part: &Arc<Part>, spec: &TaskSpec) -> Submitted {
        let submitted = Submitted {
            part: part.clone(),
            payload: span(self.payloads, spec.payload.len()),
            deps: span(self.deps, spec.deps.len()),
            funcs: span(self.funcs, spec.funcs.len()),
        };
        self.payloads += spec.payload.len();
        self.deps += spec.deps.len();
        self.funcs += spec.funcs.len();
        submitted
    }
}

/// A span of `len` items from `start`: below `PART_MAX` in a checked submit.
fn span(start: usize, len: usize) -> Span {
    Span {
        start: start as u32,
        len: len as u32,
    }
}

fn totals<'a>(specs: impl Iterator<Item = &'a TaskSpec>) -> Cursor {
    specs.fold(Cursor::default(), |mut sum, spec| {
        sum.payloads += spec.payload.len();
        sum.deps += spec.deps.len();
        sum.funcs += spec.funcs.len();
        sum
    })
}

/// Fails where a submit part holds too much to pack (more than `PART_MAX` of payload
/// bytes, inputs or functions).
pub(super) fn check_part_size(specs: &[TaskSpec]) -> Result<(), String> {
    too_large(&totals(specs.iter()), specs.len()).map_or(Ok(()), Err)
}

fn too_large(total: &Cursor, tasks: usize) -> Option<String> {
    let Cursor {
        payloads,
        deps,
        funcs,
    } = total;
    [payloads, deps, funcs]
        .iter()
        .any(|&&n| n > PART_MAX)
        .then(|| {
            format!(
                "a submit part of {tasks} tasks holds too much ({payloads} payload bytes, \
                 {deps} inputs, {funcs} functions; at most {PART_MAX} of each): send it in \
                 smaller parts"
            )
        })
}

/// One part holding what `specs` were submitted with, end to end.
fn part_of<'a>(specs: impl Iterator<Item = &'a TaskSpec> + Clone) -> Arc<Part> {
    let total = totals(specs.clone());
    let mut payloads = BytesMut::with_capacity(total.payloads);
    let mut deps = Vec::with_capacity(total.deps);
    let mut funcs = Vec::with_capacity(total.funcs);
    for spec in specs {
        payloads.extend_from_slice(&spec.payload);
        deps.extend_from_slice(&spec.deps);
        funcs.extend_from_slice(&spec.funcs);
    }
    Arc::new(Part {
        payloads: payloads.freeze(),
        deps: deps.into_boxed_slice(),
        funcs: funcs.into_boxed_slice(),
    })
}

/// Packs a checked submit part's tasks, in order. Moves payloads out of the frame they were
/// decoded from, which whole would live as long as any task of the part: small ones into
/// one buffer, large ones each into a part of its own. A part lives until its last task is
/// forgotten: its small payloads and lists are a few MiB at most.
pub(super) fn pack(specs: &[TaskSpec]) -> Vec<Submitted> {
    let is_small = |spec: &&TaskSpec| spec.payload.len() <= PACKED_PAYLOAD_MAX;
    let shared = part_of(specs.iter().filter(is_small));
    let mut cursor = Cursor::default();
    specs
        .iter()
        .map(|spec| {
            if is_small(&spec) {
                cursor.take(&shared, spec)
            } else {
                Cursor::default().take(&part_of(std::iter::once(spec)), spec)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientId, TaskOptions};
    use smallvec::smallvec;

    fn spec(seq: u64, payload: Vec<u8>, deps: &[u64], func: u64) -> TaskSpec {
        let client = ClientId(1);
        TaskSpec {
            id: TaskId::new(client, seq),
            deps: deps.iter().map(|&d| TaskId::new(client, d)).collect(),
            funcs: smallvec![FuncId(func)],
            payload: Bytes::from(payload),
            priority: 0,
            workers: Vec::new(),
            options: TaskOptions::default(),
            prefix: 0,
        }
    }

    #[test]
    fn each_task_gets_back_what_it_was_submitted_with() {
        let specs = vec![
            spec(0, vec![1; 10], &[], 7),
            spec(1, vec![2; PACKED_PAYLOAD_MAX + 1], &[0], 8),
            spec(2, vec![3; 5], &[0, 1, 0], 9),
        ];
        let packed = pack(&specs);
        assert_eq!(packed.len(), specs.len());
        for (spec, submitted) in specs.iter().zip(&packed) {
            assert_eq!(submitted.payload(), spec.payload);
            assert_eq!(submitted.payload_len(), spec.payload.len());
            assert_eq!(submitted.deps(), &spec.deps[..]);
            assert_eq!(submitted.funcs(), &spec.funcs[..]);
        }
        // The large payload's part is its own (the scheduler's tests check the buffers).
        assert!(Arc::ptr_eq(&packed[0].part, &packed[2].part));
        assert!(!Arc::ptr_eq(&packed[0].part, &packed[1].part));
    }

    #[test]
    fn a_part_too_large_for_its_spans_is_refused_by_name() {
        assert_eq!(check_part_size(&[spec(0, vec![1; 10], &[], 7)]), Ok(()));
        let at_most = Cursor {
            payloads: PART_MAX,
            deps: PART_MAX,
            funcs: PART_MAX,
        };
        assert_eq!(too_large(&at_most, 3), None);
        let inputs = Cursor {
            deps: PART_MAX + 1,
            ..Cursor::default()
        };
        let error = too_large(&inputs, 3).expect("too many inputs");
        assert!(error.contains("3 tasks") && error.contains(&format!("{} inputs", PART_MAX + 1)));
        let bytes = Cursor {
            payloads: PART_MAX + 1,
            ..Cursor::default()
        };
        assert!(too_large(&bytes, 1).is_some());
    }
}
