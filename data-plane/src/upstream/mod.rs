//! Everything about talking to an upstream account: usage accounting
//! (`usage`), the SSE usage tap (`sse`), content codings an upstream applied
//! anyway (`encoding`), and the pooled HTTP client (`client`, from `relay-net`,
//! which the control plane shares).

pub use relay_net::client;
pub mod encoding;
pub mod sse;
pub mod usage;
