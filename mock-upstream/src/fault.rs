//! Injectable faults: what they are, and how they are named on the command line and in headers.

use std::fmt;
use std::str::FromStr;

/// A failure the mock produces instead of (or in the middle of) a normal answer.
///
/// Status faults (`RateLimited`, `Overloaded`, `ServerError`, `Unauthorized`, `OrgDisabled`,
/// `EchoCredential`) apply to every authenticated route (`/v1/messages`, `/v1/messages/count_tokens`, `/v1/models…`). Stream faults
/// (`DropMidStream`, `ErrorEventMidStream`, `Stall`) apply to `POST /v1/messages` only; see the variants for
/// what they do to a non-streaming request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// 429 `rate_limit_error`, `retry-after: retry_after_secs`, `anthropic-ratelimit-requests-remaining: 0`,
    /// RFC 3339 reset headers, and for Bearer (OAuth) credentials `anthropic-ratelimit-unified-status: rejected`
    /// with `anthropic-ratelimit-unified-reset: <unix secs>`.
    RateLimited { retry_after_secs: u64 },
    /// 529 `overloaded_error`.
    Overloaded,
    /// 500 `api_error`.
    ServerError,
    /// 401 `authentication_error` ("invalid x-api-key").
    Unauthorized,
    /// Streaming: 200, then `after_events` SSE events, then the body ends with an error so the connection is
    /// aborted (HTTP/1.1: closed mid-chunked-body; h2: stream reset). Non-streaming: 200 with the first half of
    /// the JSON body, then the same abort.
    DropMidStream { after_events: usize },
    /// Streaming: 200, `after_events` SSE events, then
    /// `event: error` / `{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}` and a clean
    /// end of body. Non-streaming: a plain 529 `overloaded_error`.
    ErrorEventMidStream { after_events: usize },
    /// Streaming: 200, `after_events` SSE events, then nothing ever again (the connection stays open).
    /// Non-streaming: no response at all (not even headers).
    Stall { after_events: usize },
    /// 400 `invalid_request_error` "This organization has been disabled."
    OrgDisabled,
    /// 400 `invalid_request_error` quoting the credential the request carried (`x-api-key`, else the
    /// Bearer token), as some compatible upstreams (gateways in front of other APIs) do: "Incorrect API
    /// key provided: sk-…". A 400 is the request's error to relay, so this answer is the one that would
    /// reach a client as the upstream sent it. `last`: only its last `last` characters are quoted (0:
    /// the whole credential).
    EchoCredential { last: usize },
}

/// The `after_events` used when a stream fault is named without a count.
pub const DEFAULT_FAULT_AFTER_EVENTS: usize = 3;
/// The `retry_after_secs` used when `rate-limited` is named without a count.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 30;

/// A fault name (or its count) was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault {0:?}: expected rate-limited|overloaded|server-error|unauthorized|drop-mid-stream|error-event|stall|org-disabled|echo-credential, optionally followed by :N")]
pub struct ParseFaultError(pub String);

impl Fault {
    /// Builds a fault from its kebab-case name and an optional parameter: the `retry-after` seconds for
    /// `rate-limited`, the number of events sent before the fault for the stream faults, how many of the
    /// credential's last characters `echo-credential` quotes (ignored otherwise).
    ///
    /// Names: `rate-limited`, `overloaded`, `server-error`, `unauthorized`, `drop-mid-stream` (alias `drop`),
    /// `error-event` (alias `error-event-mid-stream`), `stall`, `org-disabled`, `echo-credential`.
    pub fn parse(kind: &str, param: Option<u64>) -> Result<Fault, ParseFaultError> {
        let after = param
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(DEFAULT_FAULT_AFTER_EVENTS);
        Ok(match kind.trim().to_ascii_lowercase().as_str() {
            "rate-limited" | "rate_limited" | "ratelimited" | "429" => Fault::RateLimited {
                retry_after_secs: param.unwrap_or(DEFAULT_RETRY_AFTER_SECS),
            },
            "overloaded" | "529" => Fault::Overloaded,
            "server-error" | "server_error" | "500" => Fault::ServerError,
            "unauthorized" | "401" => Fault::Unauthorized,
            "drop-mid-stream" | "drop_mid_stream" | "drop" => Fault::DropMidStream { after_events: after },
            "error-event" | "error_event" | "error-event-mid-stream" => {
                Fault::ErrorEventMidStream { after_events: after }
            }
            "stall" => Fault::Stall { after_events: after },
            "org-disabled" | "org_disabled" => Fault::OrgDisabled,
            "echo-credential" | "echo_credential" => Fault::EchoCredential {
                last: param.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            },
            _ => return Err(ParseFaultError(kind.to_string())),
        })
    }

    /// The canonical kebab-case name (as accepted by [`Fault::parse`] and the `x-mock-fault` header).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::RateLimited { .. } => "rate-limited",
            Fault::Overloaded => "overloaded",
            Fault::ServerError => "server-error",
            Fault::Unauthorized => "unauthorized",
            Fault::DropMidStream { .. } => "drop-mid-stream",
            Fault::ErrorEventMidStream { .. } => "error-event",
            Fault::Stall { .. } => "stall",
            Fault::OrgDisabled => "org-disabled",
            Fault::EchoCredential { .. } => "echo-credential",
        }
    }

    /// True for the faults that answer with an error status before any body is sent.
    pub fn is_status_fault(&self) -> bool {
        matches!(
            self,
            Fault::RateLimited { .. }
                | Fault::Overloaded
                | Fault::ServerError
                | Fault::Unauthorized
                | Fault::OrgDisabled
                | Fault::EchoCredential { .. }
        )
    }
}

/// `KIND[:N]`, e.g. `rate-limited:5`, `drop-mid-stream:10`, `overloaded`.
impl FromStr for Fault {
    type Err = ParseFaultError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((kind, n)) => {
                let n: u64 = n.trim().parse().map_err(|_| ParseFaultError(s.to_string()))?;
                Fault::parse(kind, Some(n))
            }
            None => Fault::parse(s, None),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::RateLimited { retry_after_secs } => write!(f, "{}:{retry_after_secs}", self.kind()),
            Fault::DropMidStream { after_events }
            | Fault::ErrorEventMidStream { after_events }
            | Fault::Stall { after_events } => write!(f, "{}:{after_events}", self.kind()),
            Fault::EchoCredential { last } => write!(f, "{}:{last}", self.kind()),
            _ => f.write_str(self.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let all = [
            Fault::RateLimited { retry_after_secs: 7 },
            Fault::Overloaded,
            Fault::ServerError,
            Fault::Unauthorized,
            Fault::DropMidStream { after_events: 2 },
            Fault::ErrorEventMidStream { after_events: 0 },
            Fault::Stall { after_events: 9 },
            Fault::OrgDisabled,
            Fault::EchoCredential { last: 0 },
            Fault::EchoCredential { last: 20 },
        ];
        for f in all {
            assert_eq!(f.to_string().parse::<Fault>(), Ok(f));
        }
        assert_eq!(
            "stall".parse::<Fault>(),
            Ok(Fault::Stall {
                after_events: DEFAULT_FAULT_AFTER_EVENTS
            })
        );
        assert_eq!(
            "rate-limited".parse::<Fault>(),
            Ok(Fault::RateLimited {
                retry_after_secs: DEFAULT_RETRY_AFTER_SECS
            })
        );
        assert!("nope".parse::<Fault>().is_err());
        assert!("stall:x".parse::<Fault>().is_err());
    }
}
