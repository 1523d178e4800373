//! What the Anthropic API says about an answer beyond its status, read once for every reader: the
//! error body ([`ApiError`], also the data of a mid-stream SSE `event: error`) and the rate-limit
//! headers ([`ratelimit`]: `retry-after`, the API-key `anthropic-ratelimit-*` limits and the
//! subscription `anthropic-ratelimit-unified-*` windows).
//!
//! These are parsers only: what a value means for an account (how long it stays out, whether the
//! client is at fault) is the reader's rule (the data plane's `proxy::health`, the control plane's
//! probes). Both planes read upstream answers, so both use this module and never a copy of it.

mod error_body;
pub mod ratelimit;

pub use error_body::ApiError;
