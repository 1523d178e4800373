//! relay-control-plane: owns accounts, API keys, groups, pricing and usage
//! (in Postgres, or an embedded SQLite store in standalone mode), serves the
//! admin gRPC API for `relayctl`, and pushes versioned config to every data
//! plane over `ConfigDiscovery.Watch` while ingesting their usage over
//! `UsageIngest.Report`.

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod crypto;
pub mod jobs;

pub mod leader;
pub mod model;
pub mod notify;
pub mod requests;
pub mod retention;
pub mod server;
pub mod spend;
pub mod store;
