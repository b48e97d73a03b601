//! Compiles `proto/*.proto` with tonic/prost. Uses the vendored `protoc` (no system protoc
//! needed) unless `PROTOC` is already set. (etcd's proto, which only the load generator
//! speaks, is compiled by `crates/kvnode-loadgen`.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &["proto/kv.proto", "proto/raft.proto", "proto/admin.proto"],
        &["proto"],
    )?;
    Ok(())
}
