//! Compiles `relay/v1/*.proto` with protox (a pure-Rust protobuf compiler), so
//! building relay never needs a system `protoc`.
use prost::Message;
use std::path::PathBuf;

/// Keep in step with the `redacted_debug!` list in src/lib.rs.
const SECRET_BEARING: [&str; 6] = [
    "relay.v1.Account",
    "relay.v1.Settings",
    "relay.v1.CreateAccountRequest",
    "relay.v1.UpdateAccountRequest",
    "relay.v1.CreateApiKeyResponse",
    "relay.v1.CreateAdminTokenResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["relay/v1/config.proto", "relay/v1/usage.proto", "relay/v1/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("relay_descriptor.bin"), fds.encode_to_vec())?;
    // Messages that carry a secret get a hand-written, redacting Debug (src/lib.rs).
    tonic_prost_build::configure()
        .btree_map(".")
        .skip_debug(SECRET_BEARING)
        .compile_fds(fds)?;
    Ok(())
}
