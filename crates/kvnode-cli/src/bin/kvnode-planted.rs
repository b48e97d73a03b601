//! `kvnode-planted`: the `kvnode` binary with the test-only planted-bug switch armed (see
//! `kvnode::planted`). Built only with the `planted-bugs` feature (`cargo test` and
//! `cargo bench` builds; never `cargo build`), for the fault tests that prove the checkers
//! catch a known bug. It announces itself at start and in every `Status` reply. Never run it
//! for real data: `KVNODE_PLANTED_BUG` makes it break consistency on purpose.

#[path = "kvnode.rs"]
mod kvnode_main;

fn main() -> std::process::ExitCode {
    match kvnode::planted::arm_from_env() {
        Ok(bug) => eprintln!(
            "kvnode-planted: TEST BUILD WITH PLANTED-BUG HOOKS; planted bug: {}. Never use it for real data.",
            bug.map_or("none", |b| b.name())
        ),
        Err(e) => {
            eprintln!("kvnode-planted: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    kvnode_main::main()
}
