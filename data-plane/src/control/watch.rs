//! The Watch client: keeps one `ConfigDiscovery.Watch` stream open to the
//! control plane, applies each update to one side (delta on top of the held
//! config, content hash checked), validates it, swaps it in, persists it, and
//! only then ACKs. Anything that fails is NACKed and the old config keeps
//! serving. On any stream error it reconnects with backoff, saying which
//! version it holds, so it never moves backwards.

use super::cache::ConfigCache;
use super::state::{ConfigHolder, InvalidConfig, ServingConfig};
use relay_proto::v1 as pb;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// How to reach the control plane: one URL (a Service or load balancer in front of the
/// replicas), or the replicas' URLs in order of preference. Each (re)connection tries the one that
/// answered last first, then the others in order: a replica that cannot be reached costs one
/// connect attempt, and the data plane carries on with the next.
#[derive(Clone)]
pub struct ControlPlaneLink {
    endpoints: Arc<[tonic::transport::Endpoint]>,
    /// Index of the endpoint that answered last (shared by every clone: the config stream and
    /// usage reports go to the same replica while it answers).
    current: Arc<std::sync::atomic::AtomicUsize>,
    /// The data-plane token (`authorization: Bearer …`).
    pub token: Arc<str>,
}

/// TLS to the control plane (an `https://` URL), as PEM.
#[derive(Clone, Default)]
pub struct ControlPlaneTls {
    /// CA to verify the control plane with (else the Mozilla roots).
    pub ca_pem: Option<Vec<u8>>,
    /// This data plane's client certificate and key (mTLS); the certificate
    /// must be valid for the node id (a DNS name in its SAN).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ControlPlaneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl ControlPlaneLink {
    /// `urls`: one URL, or several separated by commas (in order of preference).
    pub fn new(urls: &str, token: &str, tls: &ControlPlaneTls) -> Result<Self, tonic::transport::Error> {
        let endpoints = split_urls(urls)
            .map(|url| Self::endpoint(url, tls))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            endpoints: Arc::from(endpoints),
            current: Arc::default(),
            token: Arc::from(token),
        })
    }

    /// Connects to the endpoint that answered last, else to the next one that does, in order;
    /// the error of the last one tried when none does.
    pub async fn connect(&self) -> Result<tonic::transport::Channel, LinkError> {
        use std::sync::atomic::Ordering;
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n.max(1);
        let mut last = Err(LinkError::NoUrl);
        for i in 0..n {
            let k = (first + i) % n;
            let Some(endpoint) = self.endpoints.get(k) else { break };
            match endpoint.connect().await {
                Ok(channel) => {
                    if k != first {
                        tracing::info!(
                            control_plane = %endpoint.uri(),
                            "the control plane connected to last cannot be reached: using the next one listed"
                        );
                        self.current.store(k, Ordering::Relaxed);
                    }
                    return Ok(channel);
                }
                Err(e) => {
                    tracing::debug!(control_plane = %endpoint.uri(), error = %e, "cannot connect to a control plane");
                    last = Err(e.into());
                }
            }
        }
        last
    }

    fn endpoint(url: &str, tls: &ControlPlaneTls) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut cfg = tonic::transport::ClientTlsConfig::new();
            cfg = match &tls.ca_pem {
                Some(ca) => cfg.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                None => cfg.with_webpki_roots(),
            };
            if let Some((cert, key)) = &tls.identity {
                cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(cfg)?;
        }
        Ok(endpoint)
    }

    pub fn bearer(&self) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, tonic::Status> {
        format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| tonic::Status::unauthenticated("the data-plane token is not a valid header value"))
    }
}

/// Why no control plane could be reached.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("no control-plane URL")]
    NoUrl,
}

/// The URLs of a `--control-plane` value: one, or several separated by commas (blanks ignored).
pub fn split_urls(urls: &str) -> impl Iterator<Item = &str> {
    let mut parts = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).peekable();
    // Nothing listed: the value as given, so that its error names it.
    let whole = parts.peek().is_none().then_some(urls.trim());
    parts.chain(whole)
}

/// Called with each config just swapped in (e.g. to sync shared account health).
pub type OnApply = Arc<dyn Fn(&ServingConfig) + Send + Sync>;

pub struct Watcher {
    pub link: ControlPlaneLink,
    pub node_id: String,
    /// Random per process (see `Hello.instance_id`).
    pub instance_id: String,
    pub holder: Arc<ConfigHolder>,
    pub cache: Option<Arc<ConfigCache>>,
    pub on_apply: Option<OnApply>,
    /// Config streams that failed or were refused (also `relay_config_stream_failures_total`).
    pub failures: Arc<std::sync::atomic::AtomicU64>,
    /// When a control plane was last heard from.
    pub freshness: Arc<super::freshness::Freshness>,
}

/// Applies one update: the complete new config, validated and indexed.
pub fn prepare(current: Option<&ServingConfig>, update: &pb::ConfigUpdate) -> Result<ServingConfig, InvalidConfig> {
    let held = current.map(|c| (&c.version, &c.resources));
    let resources = relay_proto::apply_update(held, update)?;
    let version = update.version.unwrap_or_default();
    ServingConfig::build(version, resources)
}

impl Watcher {
    /// Runs until `stop` becomes true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut reported_outage = false;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = self.session() => r,
                _ = crate::stopped(&mut stop) => return,
            };
            metrics::gauge!(relay_proto::metrics::CONTROL_PLANE_CONNECTED).set(0.0);
            self.freshness.disconnected();
            if result.is_err() {
                self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(relay_proto::metrics::CONFIG_STREAM_FAILURES_TOTAL).increment(1);
            }
            match result {
                Ok(()) => tracing::info!("config stream closed by the control plane; reconnecting"),
                Err(e) if !reported_outage => {
                    let hint = super::address_hint(&e.to_string()).unwrap_or_default();
                    tracing::warn!(error = %e, hint, "config stream to the control plane failed; serving the last config and retrying");
                    reported_outage = true;
                }
                Err(e) => tracing::debug!(error = %e, "config stream still failing"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
                reported_outage = false;
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = crate::stopped(&mut stop) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self) -> Result<(), tonic::Status> {
        let channel = self.link.connect().await.map_err(|e| {
            // The whole chain: tonic's own Display says only "transport error".
            let why = crate::proxy::error_chain(&e);
            tonic::Status::unavailable(format!("cannot connect to the control plane: {why}"))
        })?;
        let bearer = self.link.bearer()?;
        let mut client = ConfigDiscoveryClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        })
        .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(4);
        let current = self.holder.get();
        let held = current.as_ref().map(|c| c.version);
        tx.send(pb::WatchRequest {
            kind: Some(pb::watch_request::Kind::Hello(pb::Hello {
                node_id: self.node_id.clone(),
                build_version: env!("CARGO_PKG_VERSION").to_string(),
                held,
                held_hash: current.as_ref().map(|c| c.hash.clone()).unwrap_or_default(),
                instance_id: self.instance_id.clone(),
            })),
        })
        .await
        .map_err(|_| tonic::Status::internal("watch request channel closed"))?;
        let mut inbound = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        metrics::gauge!(relay_proto::metrics::CONTROL_PLANE_CONNECTED).set(1.0);
        self.freshness.connected();
        tracing::info!(held = ?held.map(|v| v.to_string()), "config stream open");
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            let update = tokio::select! {
                m = inbound.message() => match m? {
                    Some(u) => u,
                    None => break,
                },
                // The stream is open (HTTP/2 keepalive watches the connection): still in contact.
                _ = tick.tick() => {
                    self.freshness.touch();
                    continue;
                }
            };
            self.freshness.touch();
            let reply = self.handle(&update);
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Builds the ACK or NACK for one update, swapping the config on success.
    fn handle(&self, update: &pb::ConfigUpdate) -> pb::WatchRequest {
        let current = self.holder.get();
        let serving = current.as_ref().map(|c| c.version);
        match prepare(current.as_deref(), update) {
            Ok(next) => {
                let version = next.version;
                let changed = current
                    .as_ref()
                    .is_none_or(|c| c.hash != next.hash || c.version != next.version);
                let rejected = next.rejected.clone();
                if changed {
                    for x in &rejected {
                        let before = current.as_ref().is_some_and(|c| c.rejected.contains(x));
                        if !before {
                            let r = x.r#ref.clone().unwrap_or_default();
                            let kind = pb::ResourceKind::try_from(r.kind)
                                .map(|k| k.as_str_name())
                                .unwrap_or("?");
                            tracing::warn!(kind, id = %r.id, error = %x.error, "config resource taken out of service; the rest applies");
                        }
                    }
                    let resources = self.cache.as_ref().map(|_| next.resources.clone());
                    if let Some(hook) = &self.on_apply {
                        hook(&next);
                    }
                    self.holder.swap(next);
                    if let (Some(cache), Some(r)) = (&self.cache, resources) {
                        if let Err(e) = cache.store(version, &r) {
                            metrics::counter!(relay_proto::metrics::CONFIG_CACHE_ERRORS_TOTAL).increment(1);
                            tracing::error!(error = %e, "cannot persist the config cache");
                        }
                    }
                    tracing::info!(version = %version, full = update.full, "config applied");
                }
                metrics::counter!(relay_proto::metrics::CONFIG_UPDATES_TOTAL, "outcome" => "ack").increment(1);
                pb::WatchRequest {
                    kind: Some(pb::watch_request::Kind::Ack(pb::Ack {
                        nonce: update.nonce.clone(),
                        version: Some(version),
                        rejected,
                    })),
                }
            }
            Err(e) => {
                metrics::counter!(relay_proto::metrics::CONFIG_UPDATES_TOTAL, "outcome" => "nack").increment(1);
                tracing::warn!(error = %e, version = ?update.version.map(|v| v.to_string()), "config rejected; keeping the one served");
                pb::WatchRequest {
                    kind: Some(pb::watch_request::Kind::Nack(pb::Nack {
                        nonce: update.nonce.clone(),
                        serving,
                        error: e.to_string(),
                        reason: e.nack_reason() as i32,
                    })),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn watcher() -> Watcher {
        Watcher {
            link: ControlPlaneLink::new("http://127.0.0.1:1", "token", &ControlPlaneTls::default()).unwrap(),
            node_id: "dp-1".into(),
            instance_id: "i-1".into(),
            holder: Arc::new(ConfigHolder::default()),
            cache: None,
            on_apply: None,
            failures: Arc::default(),
            freshness: Arc::new(crate::control::freshness::Freshness::load(None, 0)),
        }
    }

    fn resources(proxy_url: &str) -> pb::Resources {
        let mut r = pb::Resources {
            groups: vec![pb::Group {
                id: "g".into(),
                ..Default::default()
            }],
            accounts: vec![pb::Account {
                id: "a".into(),
                name: "a".into(),
                kind: pb::AccountKind::AnthropicApiKey as i32,
                base_url: "https://api.anthropic.com".into(),
                credential: "sk".into(),
                weight: 1,
                group_ids: vec!["g".into()],
                status: pb::AccountStatus::Enabled as i32,
                proxy_url: proxy_url.into(),
                ..Default::default()
            }],
            settings: Some(pb::Settings {
                api_key_hash_secret: vec![3; 32],
                values: Default::default(),
            }),
            ..Default::default()
        };
        relay_proto::canonicalize(&mut r);
        r
    }

    fn full(revision: u64, r: pb::Resources) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            nonce: format!("n{revision}"),
            version: Some(pb::ConfigVersion::new(1, revision)),
            full: true,
            content_hash: relay_proto::config_hash(&r),
            resources: Some(r),
            ..Default::default()
        }
    }

    #[test]
    fn acks_nacks_and_their_reasons() {
        let w = watcher();
        let Some(pb::watch_request::Kind::Ack(a)) = w.handle(&full(1, resources(""))).kind else {
            panic!("a valid config is acked")
        };
        assert!(a.rejected.is_empty());

        // The config as a whole does not validate: NACK (invalid), keep serving.
        let mut bad = resources("");
        bad.settings = None;
        let Some(pb::watch_request::Kind::Nack(n)) = w.handle(&full(2, bad)).kind else {
            panic!("a structurally bad config is nacked")
        };
        assert_eq!(n.reason, pb::NackReason::Invalid as i32);
        assert_eq!(n.serving, Some(pb::ConfigVersion::new(1, 1)));
        assert_eq!(w.holder.get().unwrap().version, pb::ConfigVersion::new(1, 1));

        // A delta that does not lead to its hash: NACK (diverged), keep serving.
        let mut delta = full(3, pb::Resources::default());
        delta.full = false;
        delta.base = Some(pb::ConfigVersion::new(1, 1));
        let Some(pb::watch_request::Kind::Nack(n)) = w.handle(&delta).kind else {
            panic!("a delta that misses its hash is nacked")
        };
        assert_eq!(n.reason, pb::NackReason::Diverged as i32);
        assert_eq!(w.holder.get().unwrap().version, pb::ConfigVersion::new(1, 1));

        // One unusable account: applied without it, and said in the ACK.
        let Some(pb::watch_request::Kind::Ack(a)) = w.handle(&full(4, resources("http://p:1/x"))).kind else {
            panic!("one bad account does not refuse the config")
        };
        assert_eq!(a.version, Some(pb::ConfigVersion::new(1, 4)));
        assert_eq!(a.rejected.len(), 1);
        assert_eq!(a.rejected[0].r#ref.as_ref().unwrap().id, "a");
        assert_eq!(w.holder.get().unwrap().version, pb::ConfigVersion::new(1, 4));
    }
}
