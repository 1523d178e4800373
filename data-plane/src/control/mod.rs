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

/// What an error from the control-plane connection means when the address is not a relay control
/// plane's gRPC port: tonic's own words ("invalid compression flag", "corrupt message of type
/// InvalidContentType") say nothing to an operator who typed the wrong port or scheme.
pub fn address_hint(error: &str) -> Option<&'static str> {
    if error.contains("invalid compression flag") || error.contains("while receiving response with status") {
        return Some(
            "the --control-plane address answered plain HTTP: it is not a relay control plane's gRPC port \
             (the data plane's API port? the control plane listens on 50051 by default)",
        );
    }
    if error.contains("InvalidContentType") || error.contains("corrupt message") {
        return Some("the --control-plane address does not speak TLS: use http://, or start the control plane with --tls-cert/--tls-key");
    }
    if error.contains("h2 protocol error") || error.contains("frame with invalid size") {
        return Some(
            "the --control-plane address does not speak gRPC (HTTP/2): it is not a relay control plane's port",
        );
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn wrong_addresses_get_a_hint_and_other_errors_none() {
        let http = "status: Internal, message: \"protocol error: received message with invalid compression flag: 123 (valid flags are 0 and 1) while receiving response with status: 404 Not Found\"";
        assert!(super::address_hint(http).unwrap().contains("plain HTTP"));
        let tls = "transport error: received corrupt message of type InvalidContentType";
        assert!(super::address_hint(tls).unwrap().contains("does not speak TLS"));
        assert_eq!(
            super::address_hint("transport error: Connection refused (os error 111)"),
            None
        );
    }
}
