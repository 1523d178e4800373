//! The data plane's side of the control-plane contract: the Watch client and
//! the config it serves (`watch`, `state`, `cache`), and the usage pipeline
//! (`spool`, `report`).

pub mod cache;
pub mod freshness;
pub mod quota_report;
pub mod report;
pub mod spend;
pub mod spool;
pub mod state;
pub mod state_report;
pub mod watch;
