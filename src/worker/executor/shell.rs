//! Command-line tasks (HyperQueue style): the payload is a msgpack list of arguments, the
//! result is the command's standard output as a pickled `bytes` object.

use super::{EventSender, Executor, ExecutorEvent};
use crate::protocol::{
    decode, BorrowFailure, ErrorInfo, FuncId, FunctionBlob, LoanToCopy, ObjectRef, Plugin, RunTask,
    TaskOutcome,
};
use bytes::Bytes;
use std::time::Instant;
use tokio::process::Command;

pub struct ShellExecutor {
    slot: usize,
    events: EventSender,
}

impl ShellExecutor {
    pub fn start(slot: usize, events: EventSender) -> Self {
        let _ = events.send(ExecutorEvent::Ready {
            slot,
            generation: 1,
            pid: 0,
            memory: None,
        });
        ShellExecutor { slot, events }
    }
}

impl Executor for ShellExecutor {
    fn run(&mut self, _generation: u64, _functions: Vec<FunctionBlob>, tasks: Vec<RunTask>) {
        let (slot, events) = (self.slot, self.events.clone());
        tokio::spawn(async move {
            for task in tasks {
                let started = Instant::now();
                let result = run_command(&task.payload).await;
                let outcome = TaskOutcome {
                    id: task.id,
                    duration_us: started.elapsed().as_micros() as u64,
                    report_delay_us: 0,
                    result,
                };
                let _ = events.send(ExecutorEvent::Results {
                    slot,
                    outcomes: vec![outcome],
                });
            }
        });
    }

    /// Command lines use no functions.
    fn release_functions(&mut self, _generation: u64, _ids: Vec<FuncId>) {}

    /// Commands run as they come; the memory they use is counted by nobody.
    fn restart(&mut self, _generation: u64, _reason: String) {}

    /// Plugins are Python: a shell executor has nothing to set up.
    fn plugins(&mut self, _generation: u64, _setup: Vec<Plugin>, _teardown: Vec<String>) {}

    /// Commands read no objects.
    fn objects_released(&mut self, _generation: u64, _held: Vec<u64>) {}

    /// Never asked: a shell executor's memory is not read (its results are inline).
    fn hold_results(&mut self, _generation: u64, _hold: bool) {}

    /// Commands keep nothing for speed.
    fn drop_reserves(&mut self, _generation: u64) {}

    /// Commands keep no results.
    fn borrow(&mut self, _generation: u64, copy: LoanToCopy) {
        let outcome = Err(BorrowFailure {
            message: "a shell executor keeps no results".into(),
            refused: true,
        });
        let slot = self.slot;
        let request = copy.request;
        let _ = self.events.send(ExecutorEvent::Borrowed {
            slot,
            request,
            outcome,
        });
    }
}

async fn run_command(payload: &[u8]) -> Result<ObjectRef, ErrorInfo> {
    let argv: Vec<String> = decode(payload)
        .map_err(|e| ErrorInfo::runtime("ValueError", format!("not a command: {e}")))?;
    let Some((program, args)) = argv.split_first() else {
        return Err(ErrorInfo::runtime("ValueError", "empty command".into()));
    };
    let output = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            ErrorInfo::runtime("FileNotFoundError", format!("cannot run `{program}`: {e}"))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ErrorInfo::runtime(
            "CalledProcessError",
            format!(
                "`{}` failed ({}): {}",
                argv.join(" "),
                output.status,
                stderr.trim_end()
            ),
        ));
    }
    let data = pickled_bytes(&output.stdout);
    Ok(ObjectRef::Inline {
        layout: vec![data.len() as u64],
        data,
    })
}

/// `pickle.dumps(data, protocol=5)` for a bytes object: PROTO 5, BINBYTES8, STOP.
fn pickled_bytes(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(&[0x80, 5, 0x8e]);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
    out.push(b'.');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode, TaskId};
    use tokio::sync::mpsc;

    async fn run(argv: &[&str]) -> Result<ObjectRef, ErrorInfo> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut executor = ShellExecutor::start(0, tx);
        assert!(matches!(rx.recv().await, Some(ExecutorEvent::Ready { .. })));
        let payload = encode(&argv).unwrap();
        executor.run(
            1,
            vec![],
            vec![RunTask {
                id: TaskId(1),
                payload,
                inputs: vec![],
            }],
        );
        match rx.recv().await {
            Some(ExecutorEvent::Results { mut outcomes, .. }) => outcomes.remove(0).result,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn stdout_becomes_a_pickled_bytes_result() {
        let Ok(ObjectRef::Inline { data, .. }) = run(&["echo", "hi"]).await else {
            panic!("echo failed")
        };
        assert_eq!(&data[..], pickled_bytes(b"hi\n").as_ref());
        assert!(data.ends_with(b"hi\n."));
    }

    #[tokio::test]
    async fn failing_commands_report_their_status() {
        let err = run(&["sh", "-c", "echo oops >&2; exit 3"])
            .await
            .unwrap_err();
        assert_eq!(err.type_name, "CalledProcessError");
        assert!(
            err.message.contains("oops") && err.message.contains('3'),
            "{}",
            err.message
        );
    }
}
