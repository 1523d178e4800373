//! `relay-mock-upstream`: run the fake Anthropic API as a process (benchmarks, manual testing).
//!
//! ```text
//! relay-mock-upstream --listen 127.0.0.1:9999 [--ttfb-ms N] [--event-delay-ms N] [--text-events N]
//!     [--event-bytes N] [--fault CREDENTIAL=KIND[:N]]... [--no-record] [--no-count-tokens]
//!     [--oauth-token-lifetime-secs N]
//! ```
//! Prints `listening on ADDR` on stdout once bound, then serves until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use relay_mock_upstream::{Fault, MockConfig, MockUpstream};

#[derive(Debug, Parser)]
#[command(
    name = "relay-mock-upstream",
    about = "A fake Anthropic API for relay's tests and benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// Delay before the first SSE event (and before a non-streaming answer), in ms.
    #[arg(long, default_value_t = 0)]
    ttfb_ms: u64,
    /// Delay between SSE events, in ms.
    #[arg(long, default_value_t = 0)]
    event_delay_ms: u64,
    /// Number of text deltas per answer.
    #[arg(long)]
    text_events: Option<usize>,
    /// Bytes of text per delta.
    #[arg(long)]
    event_bytes: Option<usize>,
    /// A fault for one credential: CREDENTIAL=KIND[:N], KIND one of rate-limited, overloaded, server-error,
    /// unauthorized, drop-mid-stream, error-event, stall, org-disabled, echo-credential (N: retry-after secs, events before, or the last N characters of the credential quoted).
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<(String, Fault)>,
    /// Do not record requests and response bodies.
    #[arg(long)]
    no_record: bool,
    /// Answer `POST /v1/messages/count_tokens` with 404 `not_found_error`, as an upstream that lacks it.
    #[arg(long)]
    no_count_tokens: bool,
    /// OAuth: lifetime (`expires_in`) of the access tokens the mock's OAuth server issues, in seconds.
    #[arg(long, default_value_t = 3600)]
    oauth_token_lifetime_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// HTTP/1.1 only: no ALPN `h2` with TLS, no h2c without.
    #[arg(long)]
    no_h2: bool,
}

fn parse_fault(s: &str) -> Result<(String, Fault), String> {
    let (credential, fault) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected CREDENTIAL=KIND[:N], got {s:?}"))?;
    if credential.is_empty() {
        return Err(format!("empty credential in {s:?}"));
    }
    let fault: Fault = fault
        .parse()
        .map_err(|e: relay_mock_upstream::ParseFaultError| e.to_string())?;
    Ok((credential.to_string(), fault))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let defaults = MockConfig::default();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(relay_mock_upstream::MockTls {
            cert_chain_pem: std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?,
        }),
        _ => None,
    };
    let config = MockConfig {
        listen: args.listen,
        ttfb: Duration::from_millis(args.ttfb_ms),
        event_delay: Duration::from_millis(args.event_delay_ms),
        text_events: args.text_events.unwrap_or(defaults.text_events),
        event_bytes: args.event_bytes.unwrap_or(defaults.event_bytes),
        faults_by_credential: args.faults.into_iter().collect::<HashMap<_, _>>(),
        record: !args.no_record,
        tls,
        h2: !args.no_h2,
        oauth: relay_mock_upstream::OAuthMockConfig {
            token_lifetime: Duration::from_secs(args.oauth_token_lifetime_secs),
            ..Default::default()
        },
        ..defaults
    };
    let mock = MockUpstream::start(config)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    if args.no_count_tokens {
        mock.set_count_tokens_served(false);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", mock.addr())?;
        out.flush()?;
    }
    relay_runtime::signal::shutdown().await;
    drop(mock);
    Ok(())
}
