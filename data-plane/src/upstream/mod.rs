//! Everything about talking to an upstream account: usage accounting
//! (`usage`), the SSE usage tap (`sse`), and the pooled HTTP client (`client`).

pub mod client;
pub mod sse;
pub mod usage;
