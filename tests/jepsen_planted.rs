//! Proof that the fault-test suite can fail: `kvctl jepsen run` against real `kvnode`
//! processes with each planted bug switched on (the `planted-bugs` feature, which `cargo
//! test` builds in; release builds never have it) must report the violation the bug causes,
//! and the same campaign with no bug planted must pass.
//!
//! Each run: 3 nodes, 8 shards, 30 s of partitions that cut one node off (`one`,
//! `primaries`, `majority`: with 3 nodes the minority is one node), a fault held ~4 s. Runs
//! use `--net auto`: iptables in a private network namespace as root, the TCP proxy
//! otherwise. Run folders are kept under the test target's tmp dir (printed on failure).

use std::path::PathBuf;
use std::process::Command;

struct Outcome {
    code: Option<i32>,
    report: String,
}

fn campaign(name: &str, base_port: u16, bug: Option<&str>, levels: &str, seed: u64) -> Outcome {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("jepsen-{name}"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvctl"));
    command
        .args(["jepsen", "run"])
        .arg("--kvnode")
        .arg(env!("CARGO_BIN_EXE_kvnode"))
        .arg("--out")
        .arg(&out)
        .args(["--time", "30s", "--interval", "4s"])
        .args(["--nemesis", "partition"])
        .args(["--partitions", "one,primaries,majority"])
        .args(["--levels", levels])
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

#[test]
fn with_no_bug_planted_the_same_campaign_passes() {
    let o = campaign("control", 18000, None, "lin,lease,session,bst:500,ev", 11);
    assert_eq!(o.code, Some(0), "a clean build must pass:\n{}", o.report);
    assert!(o.report.contains("verdict: PASS"), "{}", o.report);
}

#[test]
fn a_follower_serving_linearizable_reads_locally_is_caught() {
    let o = campaign(
        "follower-local-read",
        18200,
        Some("follower-local-read"),
        "lin",
        12,
    );
    assert_eq!(
        o.code,
        Some(1),
        "the planted bug must be caught:\n{}",
        o.report
    );
    assert!(
        failed(&o.report, "linearizable (lin/fri)"),
        "stale follower reads are a linearizability violation:\n{}",
        o.report
    );
}

#[test]
fn a_leader_serving_reads_without_confirming_leadership_is_caught() {
    let o = campaign(
        "leader-no-confirm",
        18400,
        Some("leader-no-confirm"),
        "lin,lease",
        13,
    );
    assert_eq!(
        o.code,
        Some(1),
        "the planted bug must be caught:\n{}",
        o.report
    );
    assert!(
        failed(&o.report, "linearizable (lin/fri)") || failed(&o.report, "lease (linearizable)"),
        "a deposed leader's reads are stale:\n{}",
        o.report
    );
}

#[test]
fn acknowledging_uncommitted_writes_is_caught() {
    let o = campaign("ack-uncommitted", 18600, Some("ack-uncommitted"), "lin", 14);
    assert_eq!(
        o.code,
        Some(1),
        "the planted bug must be caught:\n{}",
        o.report
    );
    assert!(
        failed(&o.report, "set (lost writes)") || failed(&o.report, "linearizable (lin/fri)"),
        "acknowledged writes that never commit are lost:\n{}",
        o.report
    );
}
