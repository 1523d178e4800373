//! relay-control-plane: owns accounts, API keys, groups, pricing and usage
//! (in Postgres, or an embedded SQLite store in standalone mode), serves the
//! admin gRPC API for `relayctl`, and pushes versioned config to every data
//! plane over `ConfigDiscovery.Watch` while ingesting their usage over
//! `UsageIngest.Report`; serves the web console (`web`) on a listener of its own.

pub mod api;
pub mod bootstrap;
pub mod capture;
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
pub mod web;
