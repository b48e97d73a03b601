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

/// True if the package index pip would use (`PIP_INDEX_URL`, else pypi.org) accepts a TCP
/// connection within 5 s: without it grpcio cannot be installed, and the Python test skips.
pub fn package_index_reachable() -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let url = std::env::var("PIP_INDEX_URL").unwrap_or_else(|_| "https://pypi.org/simple".into());
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url.as_str()));
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let default_port = if scheme == "http" { 80 } else { 443 };
    let target = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let Ok(addrs) = target.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, std::time::Duration::from_secs(5)).is_ok())
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
