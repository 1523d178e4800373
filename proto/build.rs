//! Compiles `relay/v1/*.proto` with protox (a pure-Rust protobuf compiler), so
//! building relay never needs a system `protoc`.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["relay/v1/config.proto", "relay/v1/usage.proto", "relay/v1/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("relay_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().btree_map(".").compile_fds(fds)?;
    Ok(())
}
