//! Proof that the fault-test suite can fail: `kvctl jepsen run` against real `kvnode`
//! processes with each planted bug switched on (the `planted-bugs` feature, which `cargo
//! test` builds in; release builds never have it) must report the violation the bug causes,
//! and the same campaign with no bug planted must pass. Re-checking each saved run offline
//! (`kvctl jepsen check`) gives the same verdicts.
//!
//! Each run: 3 nodes, 8 shards, 30 s of partitions that cut one node off (`one`,
//! `primaries`, `majority`: with 3 nodes the minority is one node), a fault held ~4 s.
//!
//! The deposed-leader campaign also gives each request 500 ms instead of 5 s and binds six
//! workers to each node instead of two. A worker sends every request to its own node, and on
//! a cut-off node a write waits out its deadline: with the defaults, the two workers bound
//! there spent most of each ~4 s fault stuck on one write and made 0–2 reads of the deposed
//! leader, so a run found up to three stale keys and one run in four found none (a red
//! CI). With these settings a fault sends 4–12 reads to the cut-off node (2–8 served), and
//! three runs found 6, 5 and 13 stale keys over the two read levels.
//!
//! Runs use `--net auto`: iptables in a private network namespace as root, the TCP proxy
//! otherwise. Run folders are kept under the test target's tmp dir (printed on failure).

use std::path::PathBuf;
use std::process::Command;

struct Outcome {
    code: Option<i32>,
    report: String,
}

/// `options` add to the flags every campaign has: `--levels` at least.
fn campaign(name: &str, base_port: u16, bug: Option<&str>, options: &[&str], seed: u64) -> Outcome {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("jepsen-{name}"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvctl"));
    command
        .args(["jepsen", "run"])
        .arg("--kvnode")
        // The test-only binary that arms the planted bug (`kvnode` never does).
        .arg(env!("CARGO_BIN_EXE_kvnode-planted"))
        .arg("--out")
        .arg(&out)
        .args(["--time", "30s", "--interval", "4s"])
        .args(["--nemesis", "partition"])
        .args(["--partitions", "one,primaries,majority"])
        .args(options)
        .args(["--seed", &seed.to_string()])
        .args(["--base-port", &base_port.to_string()]);
    if let Some(bug) = bug {
        command.args(["--planted-bug", bug]);
    }
    let output = command.output().expect("run kvctl jepsen");
    let report = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Outcome {
        code: output.status.code(),
        report,
    }
}

/// The verdict line of `check` in the report, e.g. `FAIL linearizable (lin/fri) ...`.
fn verdict_of<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| {
            let l = l.trim_start();
            (l.starts_with("ok ") || l.starts_with("FAIL ")) && l.contains(check)
        })
        .unwrap_or_else(|| panic!("no verdict line for {check:?} in:\n{report}"))
}

fn failed(report: &str, check: &str) -> bool {
    verdict_of(report, check).trim_start().starts_with("FAIL")
}

/// `kvctl jepsen check` on the run folder the report names: its exit code and output.
fn recheck(report: &str) -> Outcome {
    let dir = report
        .lines()
        .find_map(|l| l.strip_prefix("run folder: "))
        .unwrap_or_else(|| panic!("no run folder in:\n{report}"))
        .trim();
    let output = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["jepsen", "check", dir])
        .output()
        .expect("run kvctl jepsen check");
    Outcome {
        code: output.status.code(),
        report: String::from_utf8_lossy(&output.stdout).into_owned(),
    }
}

/// The verdict lines (`ok …` / `FAIL …`) of a report.
fn verdicts(report: &str) -> Vec<&str> {
    report
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .collect()
}

#[test]
fn with_no_bug_planted_the_same_campaign_passes_and_rechecks_the_same_offline() {
    let o = campaign(
        "control",
        18000,
        None,
        &["--levels", "lin,lease,session,bst:500,ev"],
        11,
    );
    assert_eq!(o.code, Some(0), "a clean build must pass:\n{}", o.report);
    assert!(o.report.contains("verdict: PASS"), "{}", o.report);
    let again = recheck(&o.report);
    assert_eq!(again.code, Some(0), "{}", again.report);
    assert_eq!(verdicts(&again.report), verdicts(&o.report));
}

/// Runs `bug`'s campaign and asserts it fails, with at least one of `checks` failing.
fn assert_caught(
    base_port: u16,
    bug: &str,
    options: &[&str],
    seed: u64,
    checks: &[&str],
    why: &str,
) {
    let o = campaign(bug, base_port, Some(bug), options, seed);
    assert_eq!(
        o.code,
        Some(1),
        "the planted bug must be caught:\n{}",
        o.report
    );
    let again = recheck(&o.report);
    assert_eq!(again.code, Some(1), "the saved history fails offline too");
    assert_eq!(verdicts(&again.report), verdicts(&o.report));
    assert!(
        checks.iter().any(|check| failed(&o.report, check)),
        "{why}: expected one of {checks:?} to fail:\n{}",
        o.report
    );
}

#[test]
fn a_follower_serving_linearizable_reads_locally_is_caught() {
    assert_caught(
        18200,
        "follower-local-read",
        &["--levels", "lin"],
        12,
        &["linearizable (lin/fri)"],
        "stale follower reads are a linearizability violation",
    );
}

#[test]
fn a_leader_serving_reads_without_confirming_leadership_is_caught() {
    assert_caught(
        18400,
        "leader-no-confirm",
        &[
            "--levels",
            "lin,lease",
            "--timeout",
            "500ms",
            "--workers-per-node",
            "6",
        ],
        13,
        &["linearizable (lin/fri)", "lease (linearizable)"],
        "a deposed leader's reads are stale",
    );
}

#[test]
fn acknowledging_uncommitted_writes_is_caught() {
    assert_caught(
        18600,
        "ack-uncommitted",
        &["--levels", "lin"],
        14,
        &["set (lost writes)", "linearizable (lin/fri)"],
        "acknowledged writes that never commit, or whose outcome was guessed, break the history",
    );
}
