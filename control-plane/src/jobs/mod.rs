//! Work that must run once for the whole fleet, on the leader (see `leader`): OAuth token refresh
//! (`oauth_refresh`) and active probes of accounts in trouble (`probe`). Each job is started with the leadership term it runs under and carries it
//! into every write it makes, so a replica that lost leadership cannot overwrite its successor.

pub mod oauth_refresh;
pub mod probe;
