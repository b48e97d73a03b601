//! The driver of the crash-loop tests (`tests/crash/crash_loop.rs`, `tests/crash/crash_loop_api.rs`): each
//! round runs the test binary itself again as a child process (only one ignored test of it,
//! the child's writer), reads the child's report lines from its stdout as they come, lets the
//! child go on for a while after its first acknowledgement, kills it with SIGKILL and hands
//! the reports to the test, which then reopens the data in-process and checks what survived.
//!
//! The test owns what the reports mean ([`ChildReports`]) and what a round checks; this module
//! owns the process: the seed, spawning, reading, timing and the kill.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a child reports on its stdout, one line at a time.
pub trait ChildReports: Send + 'static {
    /// Records one complete line of the child's stdout (report or not).
    fn record(&mut self, line: &str);
    /// Records a problem with the reports themselves (e.g. reading stdout failed).
    fn problem(&mut self, problem: String);
    /// True once the child has acknowledged something: the round's clock starts then.
    fn acknowledged(&self) -> bool;
}

/// The master seed: `env` if set (decimal or `0x` hex), else `default`. Panics on a bad value.
pub fn master_seed(env: &str, default: u64) -> u64 {
    let Ok(text) = std::env::var(env) else {
        return default;
    };
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("{env}={text:?} is not a u64: {e}"))
}

/// Writes one report line (`MARK line`) on stdout and flushes it, so a line the child got past
/// is the parent's to read even if the child is killed right after.
pub fn report(mark: &str, line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{mark} {line}")
        .and_then(|()| out.flush())
        .expect("child: stdout closed");
}

/// What one round's child left behind.
pub struct ChildRound<R> {
    /// Its reports.
    pub reports: R,
    /// Its whole stderr.
    pub stderr: String,
    /// Why the round went wrong before the kill: the child exited on its own, or acknowledged
    /// nothing in time. `None`: it was killed while running, as planned.
    pub early_exit: Option<String>,
}

/// Kills the child if it is still running (the failure paths).
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One round: starts this test binary again running only the ignored test `child_test`, with
/// `env`, records its stdout into `reports`, waits (up to `first_ack_timeout`) until the
/// reports say something was acknowledged, lets it run `kill_after` more, then SIGKILLs it and
/// returns once both its streams are read to the end.
pub fn run_child<R: ChildReports>(
    child_test: &str,
    env: &[(&str, OsString)],
    reports: R,
    kill_after: Duration,
    first_ack_timeout: Duration,
) -> ChildRound<R> {
    let exe = std::env::current_exe().expect("current_exe");
    let spawned = Command::new(&exe)
        .args([
            child_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning the child {}: {e}", exe.display()));
    let mut child = KillOnDrop(Some(spawned));
    let process = child.0.as_mut().expect("just spawned");
    let reports = Arc::new(Mutex::new(reports));
    let stdout_reader = read_reports(process.stdout.take().expect("piped"), reports.clone());
    let stderr_reader = read_all(process.stderr.take().expect("piped"));

    // Let every round write something before its kill.
    let deadline = Instant::now() + first_ack_timeout;
    let early_exit = loop {
        if reports.lock().unwrap().acknowledged() {
            break None;
        }
        if let Some(status) = process.try_wait().expect("try_wait") {
            break Some(format!(
                "the child exited with {status} before acknowledging anything"
            ));
        }
        if Instant::now() > deadline {
            break Some(format!(
                "the child acknowledged nothing within {first_ack_timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if early_exit.is_none() {
        std::thread::sleep(kill_after);
    }
    let early_exit = early_exit.or_else(|| {
        process
            .try_wait()
            .expect("try_wait")
            .map(|status| format!("the child exited with {status} before it was killed"))
    });
    let mut process = child.0.take().expect("still ours");
    process.kill().expect("SIGKILL the child");
    process.wait().expect("reap the child");
    stdout_reader.join().expect("stdout reader");
    let stderr = stderr_reader.join().expect("stderr reader");
    let reports = Arc::try_unwrap(reports)
        .unwrap_or_else(|_| panic!("the stdout reader has ended"))
        .into_inner()
        .unwrap();
    ChildRound {
        reports,
        stderr,
        early_exit,
    }
}

/// Reads the child's stdout until it closes, recording complete lines into `log`.
fn read_reports<R: ChildReports>(
    stdout: impl Read + Send + 'static,
    log: Arc<Mutex<R>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                // A line cut short by the kill carries no complete report.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => log.lock().unwrap().record(line.trim_end()),
                Err(e) => {
                    log.lock()
                        .unwrap()
                        .problem(format!("reading the child's stdout: {e}"));
                    break;
                }
            }
        }
    })
}

fn read_all(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
