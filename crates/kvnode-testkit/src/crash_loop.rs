//! The driver of the crash-loop tests (`tests/crash/crash_loop.rs`, `tests/crash/crash_loop_api.rs`): each
//! round runs the test binary itself again as a child process (only one ignored test of it,
//! the child's writer), reads the child's report lines from its stdout as they come, lets the
//! child go on for a while after its first acknowledgement, kills it with SIGKILL and hands
//! the reports to the test, which then reopens the data in-process and checks what survived.
//!
//! The test owns what the reports mean ([`ChildReports`]) and what a round checks; this module
//! owns the process: the seed, spawning, reading, timing and the kill.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::PathBuf;
use std::process::{self, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Rng;

/// The environment variable that replays a crash loop from its master seed.
pub const SEED_ENV: &str = "KVNODE_CRASH_SEED";
/// Child environment: the data directory (its presence makes the ignored test a child).
pub const CHILD_DIR_ENV: &str = "KVNODE_CRASH_CHILD_DIR";
/// Child environment: the child's own seed.
pub const CHILD_SEED_ENV: &str = "KVNODE_CRASH_CHILD_SEED";
/// How long a child may take to acknowledge its first write of a round.
pub const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(20);

/// What a child reports on its stdout: lines that carry the test's mark (see [`report`]).
pub trait ChildReports: Send + 'static {
    /// True once the child has acknowledged something: the round's clock starts then.
    fn acknowledged(&self) -> bool;
    /// Records one report: the text after the mark on a complete line.
    fn record(&mut self, report: &str);
    /// What is wrong with the reports so far (inconsistent or unparseable reports, failures
    /// the child saw); a round with any fails.
    fn problems(&self) -> &[String];
}

/// The child's side of a round, inside its ignored test.
pub struct Child {
    /// The data directory.
    pub dir: PathBuf,
    /// The child's seed.
    pub seed: u64,
    /// A 4-thread runtime for the child's writers.
    pub runtime: tokio::runtime::Runtime,
}

impl Child {
    /// `Some` when this process is a crash-loop child (the parent set [`CHILD_DIR_ENV`]);
    /// `None` when the ignored test was run some other way, and should do nothing. Ends
    /// libtest's "test … " line, so that the reports start on lines of their own.
    pub fn from_env() -> Option<Child> {
        let dir = PathBuf::from(std::env::var_os(CHILD_DIR_ENV)?);
        let seed = child_number(CHILD_SEED_ENV);
        println!();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("child: tokio runtime");
        Some(Child { dir, seed, runtime })
    }
}

/// The number in the child's environment variable `name` (panics if missing or bad).
pub fn child_number(name: &str) -> u64 {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("child: {name} missing"))
        .parse()
        .unwrap_or_else(|e| panic!("child: {name} is not a number: {e}"))
}

/// The parent's side: the master seed (from [`SEED_ENV`], printed so a failure can be
/// replayed), the generator every round draws from, and the data directory the children and
/// the parent's checks share.
pub struct Parent {
    /// The master seed.
    pub seed: u64,
    /// Drawn from for every round's child seed and kill time.
    pub rng: Rng,
    /// The data directory.
    pub data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Parent {
    /// Starts a crash loop called `name`, with `default_seed` unless [`SEED_ENV`] is set.
    pub fn start(name: &str, default_seed: u64) -> Parent {
        let seed = master_seed(SEED_ENV, default_seed);
        println!("{name}: master seed {seed} (replay with {SEED_ENV}={seed})");
        let dir = tempfile::tempdir().expect("tempdir");
        Parent {
            seed,
            rng: Rng::new(seed),
            data: dir.path().join("data"),
            _dir: dir,
        }
    }

    /// One round (see [`run_child`]): draws the child's seed and a kill time in
    /// `kill_after_ms`, and runs the child with the data directory, its seed and `env`.
    pub fn round<R: ChildReports>(
        &mut self,
        child_test: &str,
        mark: &str,
        env: &[(&str, OsString)],
        reports: R,
        kill_after_ms: (u64, u64),
    ) -> ChildRound<R> {
        let child_seed = self.rng.next_u64();
        let kill_after = Duration::from_millis(self.rng.range(kill_after_ms.0, kill_after_ms.1));
        let mut all = vec![
            (CHILD_DIR_ENV, self.data.clone().into_os_string()),
            (CHILD_SEED_ENV, child_seed.to_string().into()),
        ];
        all.extend(env.iter().cloned());
        let mut round = run_child(
            child_test,
            mark,
            &all,
            reports,
            kill_after,
            FIRST_ACK_TIMEOUT,
        );
        round.kill_after = kill_after;
        round
    }
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
    /// The last 40 lines of its stdout that were not reports (libtest's text, panics).
    pub other: Vec<String>,
    /// Its whole stderr.
    pub stderr: String,
    /// Why the round went wrong before the kill: the child exited on its own, acknowledged
    /// nothing in time, or its stdout could not be read. `None`: it was killed while running,
    /// as planned.
    pub early_exit: Option<String>,
    /// How long the child ran after its first acknowledgement before the kill.
    pub kill_after: Duration,
}

impl<R: ChildReports> ChildRound<R> {
    /// Why the round failed before anything was checked: the child exited early, or its
    /// reports have problems (with the child's output); `None` if neither.
    pub fn failure(&self) -> Option<String> {
        if let Some(why) = &self.early_exit {
            return Some(format!("{why}{}", self.output()));
        }
        let problems = self.reports.problems();
        (!problems.is_empty()).then(|| {
            format!(
                "the child's reports are inconsistent or it saw a failure:\n{}{}",
                problems.join("\n"),
                self.output()
            )
        })
    }

    /// The child's output, for a failure message: its last non-report lines and its stderr.
    pub fn output(&self) -> String {
        format!(
            "\n--- child stdout (last lines) ---\n{}\n--- child stderr ---\n{}",
            self.other.join("\n"),
            self.stderr
        )
    }
}

/// Kills the child if it is still running (the failure paths).
struct KillOnDrop(Option<process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One round: starts this test binary again running only the ignored test `child_test` (its
/// full path, e.g. `crash_loop::child_writer`), with `env`, records the reports on its stdout
/// (lines with `mark`) into `reports`, waits (up to `first_ack_timeout`) until the
/// reports say something was acknowledged, lets it run `kill_after` more, then SIGKILLs it and
/// returns once both its streams are read to the end.
pub fn run_child<R: ChildReports>(
    child_test: &str,
    mark: &str,
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
    let stdout_reader = read_reports(
        process.stdout.take().expect("piped"),
        mark.to_string(),
        reports.clone(),
    );
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
    let (other, read_error) = stdout_reader.join().expect("stdout reader");
    let stderr = stderr_reader.join().expect("stderr reader");
    let early_exit = early_exit.or(read_error);
    let reports = Arc::try_unwrap(reports)
        .unwrap_or_else(|_| panic!("the stdout reader has ended"))
        .into_inner()
        .unwrap();
    ChildRound {
        reports,
        other: Vec::from(other),
        stderr,
        early_exit,
        kill_after,
    }
}

/// Reads the child's stdout until it closes, recording the reports on complete lines into
/// `log`; returns the last 40 other lines, and the read error if there was one.
fn read_reports<R: ChildReports>(
    stdout: impl Read + Send + 'static,
    mark: String,
    log: Arc<Mutex<R>>,
) -> JoinHandle<(VecDeque<String>, Option<String>)> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut other = VecDeque::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                // A line cut short by the kill carries no complete report.
                Ok(_) if !line.ends_with('\n') => break,
                // libtest may print its own text on the same line before the mark.
                Ok(_) => match line.find(&mark) {
                    Some(at) => log.lock().unwrap().record(line[at + mark.len()..].trim()),
                    None => {
                        if other.len() == 40 {
                            other.pop_front();
                        }
                        other.push_back(line.trim_end().to_string());
                    }
                },
                Err(e) => return (other, Some(format!("reading the child's stdout: {e}"))),
            }
        }
        (other, None)
    })
}

fn read_all(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
