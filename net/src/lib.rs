//! relay-net: the network pieces both planes use, so neither depends on the other for them.
//!
//! - [`client`]: the pooled upstream HTTP clients over rustls (one direct, one per outbound
//!   proxy) and [`client::ProxySpec`], an account's parsed proxy URL. The data plane forwards
//!   requests with it; the control plane probes accounts, refreshes OAuth tokens and sends
//!   webhooks with it; `relay-oauth` talks to the token endpoint with it.
//! - [`h1`]: relay's own HTTP/1.1 client connections under [`client`] (no connection task: the
//!   response body reads its socket from the task that polls it).
//! - [`listen`]: accepting connections with backoff on accept errors and a connection cap per
//!   listener within the open-file limit (the data plane's API and ops listeners, the control
//!   plane's gRPC listener).

pub mod client;
pub mod h1;
pub mod listen;
