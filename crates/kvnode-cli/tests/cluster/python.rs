//! A second-language client: Python grpcio code generated from `proto/kv.proto`. The Python
//! environment (a venv with grpcio and grpcio-tools from PyPI) is created on first use under
//! cargo's target temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Python {
    interpreter: PathBuf,
    generated: PathBuf,
}

fn run(cmd: &mut Command) -> bool {
    match cmd.output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "{cmd:?} failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("{cmd:?} could not start: {e}");
            false
        }
    }
}

/// Creates (once) the venv, installs grpcio, and generates the client code.
pub fn environment() -> Option<Python> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-grpc");
    let venv = root.join("venv");
    let interpreter = venv.join("bin/python");
    if !interpreter.exists() && !run(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        return None;
    }
    let has_grpc = Command::new(&interpreter)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_grpc
        && !run(Command::new(&interpreter).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "grpcio",
            "grpcio-tools",
        ]))
    {
        return None;
    }
    let generated = root.join("generated");
    std::fs::create_dir_all(&generated).ok()?;
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let ok = run(Command::new(&interpreter)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", generated.display()))
        .arg(format!("--grpc_python_out={}", generated.display()))
        .arg(proto.join("kv.proto")));
    ok.then_some(Python {
        interpreter,
        generated,
    })
}

/// Runs `kv_client.py ADDR KEY VALUE`; returns its stdout (panics with its output on failure).
pub fn run_client(python: &Python, addr: &str, key: &str, value: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/kv_client.py");
    let out = Command::new(&python.interpreter)
        .arg(script)
        .args([addr, key, value])
        .env("PYTHONPATH", &python.generated)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
