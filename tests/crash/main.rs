//! Crash safety with real processes, one test binary: the test binary runs itself again as a
//! child (one ignored test of it), kills it with SIGKILL at random moments and checks what
//! survived (`kvnode_testkit::crash_loop` drives both): the storage layer (`crash_loop`) and
//! the public API (`crash_loop_api`).

mod crash_loop;
mod crash_loop_api;
