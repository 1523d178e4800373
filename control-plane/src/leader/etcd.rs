//! Leader election on etcd: a lease with the configured TTL, and one key (`PREFIX` + `leader`)
//! created only when absent (`create_revision == 0`) and attached to the lease. Whoever created it
//! leads until its lease ends; the others watch the key (every second) and campaign when it is
//! gone.
//!
//! We speak etcd's v3 JSON gateway (`/v3/lease/grant`, `/v3/lease/keepalive`,
//! `/v3/lease/revoke`, `/v3/kv/txn`, `/v3/kv/range`, keys and values base64) over HTTP/1.1 with
//! hyper, not the `etcd-client` crate: its build script needs a system `protoc`, and building relay
//! must not. Every etcd since 3.4 serves the gateway on its client port.
//!
//! TLS: `https://` endpoints are reached over rustls, trusting the given CA (etcd's
//! `--trusted-ca-file` side) or else the public web roots, with a client certificate when one is
//! given (etcd's `--client-cert-auth`). All endpoints use the same scheme.
//!
//! With etcd's authentication on (`etcdctl auth enable`), relay logs in as a user
//! (`/v3/auth/authenticate`) and sends the token it gets in the `Authorization` header; a token
//! etcd no longer takes (expired, or issued by another member after a failover) is replaced by
//! logging in again. The user needs read and write on the prefix (the leader key and its lease).
//!
//! Stepping down: the leader keeps its lease alive every TTL/3 and stops leading once no keepalive
//! has been answered for TTL minus a margin since the last good one was *sent* (the lease lives
//! at least TTL past that instant on the server), or when etcd says the lease is gone, or when the
//! key is no longer its own. So it steps down before its lease can have expired and before another
//! replica can win. On shutdown it revokes the lease: another replica takes over at once.

use super::{wait, Coordinator, LeaderError, Leadership, Role};
use crate::store::DynStore;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub const MECHANISM: &str = "etcd";

/// An etcd user relay logs in as when etcd's authentication is on.
#[derive(Clone)]
pub struct EtcdCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// TLS to etcd (`https://` endpoints): what to trust, and the client certificate to show.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// PEM certificates of the CA that signs etcd's server certificates: trusted instead of the
    /// public web roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and its private key (PEM), for an etcd started with
    /// `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Whether anything is set (only `https://` endpoints can use it).
    pub fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some()
    }
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// Where and how to campaign.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://HOST:PORT` or `https://HOST:PORT` of each member (one scheme for all); the next is
    /// tried when one cannot be reached.
    pub endpoints: Vec<String>,
    /// Key prefix (default `/relay/`); the leader key is `PREFIX` + `leader`.
    pub prefix: String,
    /// The lease's TTL: a leader that cannot reach etcd steps down within it, and a dead leader
    /// is replaced within it.
    pub ttl: Duration,
    /// The user to log in as when etcd's authentication is on; `None`: no login.
    pub credentials: Option<EtcdCredentials>,
    /// TLS for `https://` endpoints; refused with `http://` ones.
    pub tls: EtcdTls,
}

impl EtcdOptions {
    /// Endpoints from a comma-separated list, with the default prefix and a 10 s TTL.
    pub fn new(endpoints: &str) -> Self {
        Self {
            endpoints: endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect(),
            prefix: "/relay/".to_string(),
            ttl: Duration::from_secs(10),
            credentials: None,
            tls: EtcdTls::default(),
        }
    }

    /// Checks what can be checked without reaching etcd: the TTL, the endpoints (one scheme; TLS
    /// only with `https://`), the user name, the CA and client certificate.
    pub fn validate(&self) -> Result<(), LeaderError> {
        self.client().map(|_| ())
    }

    fn client(&self) -> Result<Etcd, LeaderError> {
        if self.ttl < Duration::from_secs(2) {
            return Err(LeaderError::Invalid(
                "the leader TTL must be at least 2 seconds (etcd's shortest lease)".into(),
            ));
        }
        if self.credentials.as_ref().is_some_and(|c| c.user.is_empty()) {
            return Err(LeaderError::Invalid("the etcd user name is empty".into()));
        }
        let mut etcd = Etcd::new(&self.endpoints, self.ttl, &self.tls)?;
        etcd.credentials = self.credentials.clone();
        Ok(etcd)
    }

    /// The key whose creator leads.
    pub fn key(&self) -> String {
        format!("{}leader", self.prefix)
    }
}

impl Leadership {
    /// Campaigns on etcd in the background; `Following` until it wins. The endpoints and the TLS
    /// files are checked here, etcd is not reached.
    pub fn etcd(store: DynStore, replica: &str, opts: EtcdOptions) -> Result<Self, LeaderError> {
        let etcd = opts.client()?;
        let replica_name = replica.to_string();
        tracing::info!(
            replica,
            mechanism = MECHANISM,
            endpoints = %opts.endpoints.join(","),
            key = %opts.key(),
            ttl_secs = opts.ttl.as_secs(),
            user = opts.credentials.as_ref().map(|c| c.user.as_str()),
            tls = etcd.tls,
            "leader election on etcd"
        );
        Ok(Leadership::build(MECHANISM, replica, move |c| {
            run(etcd, store, replica_name, opts, c)
        }))
    }
}

#[derive(Debug, thiserror::Error)]
enum EtcdError {
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd did not answer in time")]
    Timeout,
    #[error("etcd refused the call (code {code}): {message}")]
    Refused { code: i64, message: String },
    #[error("etcd refused the login of user {user:?} (check the user and its password): {message}")]
    Login { user: String, message: String },
    #[error("etcd's answer is unreadable: {0}")]
    Bad(String),
}

/// The error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// An int64 of the gateway's JSON (a string, or a number).
fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One key as etcd returns it.
#[derive(Debug, Clone)]
struct Kv {
    value: Vec<u8>,
    lease: i64,
}

impl Kv {
    fn from_json(v: &Value) -> Result<Self, EtcdError> {
        let value = match v.get("value").and_then(Value::as_str) {
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| EtcdError::Bad(format!("value: {e}")))?,
            None => Vec::new(),
        };
        Ok(Kv {
            value,
            lease: v.get("lease").and_then(int).unwrap_or(0),
        })
    }

    /// The replica named in the leader key's value.
    fn holder(&self) -> String {
        serde_json::from_slice::<Value>(&self.value)
            .ok()
            .and_then(|v| v.get("replica").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.value).into_owned())
    }
}

/// A tiny client of the JSON gateway, over the endpoints in turn.
struct Etcd {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `http[s]://host:port`.
    endpoints: Vec<String>,
    /// Whether the endpoints are `https://`.
    tls: bool,
    current: usize,
    /// Who to log in as (etcd's authentication), and the token of the last login: `Some("")` when
    /// etcd said its authentication is off.
    credentials: Option<EtcdCredentials>,
    token: Option<String>,
}

/// gRPC's UNAUTHENTICATED: etcd's answer to a token it does not (or no longer) know.
const UNAUTHENTICATED: i64 = 16;
/// gRPC's PERMISSION_DENIED: the user's roles do not cover the key.
const PERMISSION_DENIED: i64 = 7;

/// Whether etcd's refusal means "log in (again)": a token it does not (or no longer) know, or no
/// token while its authentication is on (INVALID_ARGUMENT "user name is empty", e.g. when it was
/// turned on after relay found it off).
fn needs_login(code: i64, message: &str) -> bool {
    code == UNAUTHENTICATED || message.contains("user name is empty")
}

/// rustls for `https://` endpoints: the given CA (else the public web roots), the client
/// certificate when given. ALPN stays empty: etcd offers only `h2`, the gateway is spoken in HTTP/1.1.
fn client_tls(tls: &EtcdTls) -> Result<rustls::ClientConfig, LeaderError> {
    let bad = |what: &str, e: String| LeaderError::Invalid(format!("etcd TLS: {what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| bad("the CA certificates", e.to_string()))?;
                roots.add(cert).map_err(|e| bad("the CA certificates", e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("the CA certificates", "no PEM certificate in them".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", e.to_string()))?
        .with_root_certificates(roots);
    match &tls.identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = rustls_pemfile::certs(&mut cert.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("the client certificate", e.to_string()))?;
            if chain.is_empty() {
                return Err(bad("the client certificate", "no PEM certificate in it".into()));
            }
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .map_err(|e| bad("the client key", e.to_string()))?
                .ok_or_else(|| bad("the client key", "no PEM private key in it".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("the client certificate and key", e.to_string()))
        }
    }
}

impl Etcd {
    fn new(endpoints: &[String], ttl: Duration, tls: &EtcdTls) -> Result<Self, LeaderError> {
        if endpoints.is_empty() {
            return Err(LeaderError::Invalid("no etcd endpoint given".into()));
        }
        let mut bases = Vec::new();
        let mut schemes = Vec::new();
        for e in endpoints {
            let bad = |reason: &str| LeaderError::Endpoint {
                endpoint: e.clone(),
                reason: reason.to_string(),
            };
            let uri: http::Uri = e
                .parse()
                .map_err(|_| bad("not a URL (expected http://HOST:2379 or https://HOST:2379)"))?;
            let scheme = match uri.scheme_str() {
                Some(s @ ("http" | "https")) => s.to_string(),
                _ => return Err(bad("expected http://HOST:2379 or https://HOST:2379")),
            };
            if scheme == "http" && tls.is_set() {
                return Err(bad(
                    "a CA or client certificate for etcd is given but this endpoint is plain http://: use https://",
                ));
            }
            let authority = uri
                .authority()
                .ok_or_else(|| bad("no host (expected http://HOST:2379 or https://HOST:2379)"))?;
            bases.push(format!("{scheme}://{authority}"));
            schemes.push(scheme);
        }
        if schemes.iter().any(|s| s != &schemes[0]) {
            return Err(LeaderError::Invalid(
                "the etcd endpoints mix http:// and https://: give one scheme for all".into(),
            ));
        }
        let https = schemes[0] == "https";
        let mut conn = HttpConnector::new();
        conn.enforce_http(false);
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some((ttl / 4).max(Duration::from_millis(300))));
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(client_tls(tls)?);
        let connector = if https {
            builder.https_only().enable_http1().wrap_connector(conn)
        } else {
            builder.https_or_http().enable_http1().wrap_connector(conn)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            endpoints: bases,
            tls: https,
            current: 0,
            credentials: None,
            token: None,
        })
    }

    /// POSTs `body` to `path`, logged in when credentials are set (once more when etcd no longer
    /// takes the token).
    async fn call(&mut self, path: &str, body: &Value, deadline: Instant) -> Result<Value, EtcdError> {
        if self.credentials.is_none() {
            return match self.post(path, body, deadline, None).await {
                Err(EtcdError::Refused { code, message }) if needs_login(code, &message) => Err(EtcdError::Refused {
                    code,
                    message: format!("{message} (etcd's authentication is on: relay needs an etcd user and password)"),
                }),
                answer => answer,
            };
        }
        let mut retried = false;
        loop {
            if self.token.is_none() {
                self.token = Some(self.authenticate(deadline).await?);
            }
            let token = self.token.clone().filter(|t| !t.is_empty());
            match self.post(path, body, deadline, token.as_deref()).await {
                Err(EtcdError::Refused { code, ref message }) if !retried && needs_login(code, message) => {
                    tracing::debug!(code, message = %message, "etcd no longer takes relay's token; logging in again");
                    retried = true;
                    self.token = None;
                }
                Err(EtcdError::Refused {
                    code: PERMISSION_DENIED,
                    message,
                }) => {
                    let user = self.credentials.as_ref().map(|c| c.user.as_str()).unwrap_or_default();
                    return Err(EtcdError::Refused {
                        code: PERMISSION_DENIED,
                        message: format!(
                            "{message} (etcd user {user:?} needs a role with read and write on relay's key prefix)"
                        ),
                    });
                }
                answer => return answer,
            }
        }
    }

    /// Logs in: the token for the `Authorization` header, or "" when etcd's authentication is off.
    async fn authenticate(&mut self, deadline: Instant) -> Result<String, EtcdError> {
        let Some(c) = self.credentials.clone() else {
            return Ok(String::new());
        };
        let body = json!({ "name": c.user, "password": c.password });
        match self.post("/v3/auth/authenticate", &body, deadline, None).await {
            Ok(v) => {
                tracing::debug!(user = %c.user, "logged in to etcd");
                v.get("token")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| EtcdError::Bad("etcd answered the login without a token".into()))
            }
            // FAILED_PRECONDITION: etcd's authentication is off; the calls go without a token.
            Err(EtcdError::Refused { message, .. }) if message.contains("authentication is not enabled") => {
                Ok(String::new())
            }
            Err(EtcdError::Refused { message, .. }) => Err(EtcdError::Login { user: c.user, message }),
            Err(e) => Err(e),
        }
    }

    /// POSTs `body` to `path`, trying the next endpoint when one cannot be reached.
    async fn post(
        &mut self,
        path: &str,
        body: &Value,
        deadline: Instant,
        token: Option<&str>,
    ) -> Result<Value, EtcdError> {
        let body = Bytes::from(body.to_string());
        let mut last = String::new();
        for _ in 0..self.endpoints.len() {
            let base = &self.endpoints[self.current];
            let mut req =
                http::Request::post(format!("{base}{path}")).header(http::header::CONTENT_TYPE, "application/json");
            if let Some(token) = token {
                req = req.header(http::header::AUTHORIZATION, token);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| EtcdError::Bad(e.to_string()))?;
            let sent = self.client.request(req);
            let answer = async {
                let resp = sent.await.map_err(|e| chain(&e))?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map_err(|e| chain(&e))?.to_bytes();
                Ok::<_, String>((status, bytes))
            };
            match tokio::time::timeout_at(deadline, answer).await {
                Err(_) => return Err(EtcdError::Timeout),
                Ok(Err(e)) => {
                    last = format!("{base}: {e}");
                    self.current = (self.current + 1) % self.endpoints.len();
                }
                Ok(Ok((status, bytes))) => return parse_answer(status, &bytes),
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    async fn grant(&mut self, ttl: Duration, deadline: Instant) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl.as_secs().max(1) }), deadline)
            .await?;
        v.get("ID")
            .and_then(int)
            .ok_or_else(|| EtcdError::Bad("lease grant without an ID".into()))
    }

    /// The lease's remaining TTL in seconds (0: the lease is gone).
    async fn keepalive(&mut self, lease: i64, deadline: Instant) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }), deadline)
            .await?;
        Ok(v.get("TTL").and_then(int).unwrap_or(0))
    }

    async fn revoke(&mut self, lease: i64, deadline: Instant) -> Result<(), EtcdError> {
        match self
            .call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }), deadline)
            .await
        {
            Ok(_) => Ok(()),
            // NOT_FOUND: already gone.
            Err(EtcdError::Refused { code: 5, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn range(&mut self, key: &str, deadline: Instant) -> Result<Option<Kv>, EtcdError> {
        let v = self
            .call("/v3/kv/range", &json!({ "key": b64(key.as_bytes()) }), deadline)
            .await?;
        first_kv(&v)
    }

    /// Creates `key` with `value` on `lease` if it does not exist. `Ok(Ok(revision))`: created at
    /// that revision; `Ok(Err(kv))`: it exists (`kv`, when it could be read).
    async fn create(
        &mut self,
        key: &str,
        value: &[u8],
        lease: i64,
        deadline: Instant,
    ) -> Result<Result<i64, Option<Kv>>, EtcdError> {
        let k = b64(key.as_bytes());
        let body = json!({
            "compare": [{ "target": "CREATE", "key": k, "create_revision": "0" }],
            "success": [{ "request_put": { "key": k, "value": b64(value), "lease": lease.to_string() } }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let v = self.call("/v3/kv/txn", &body, deadline).await?;
        if v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
            let rev = v
                .get("header")
                .and_then(|h| h.get("revision"))
                .and_then(int)
                .unwrap_or(0);
            return Ok(Ok(rev));
        }
        let range = v
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .cloned()
            .unwrap_or(Value::Null);
        Ok(Err(first_kv(&range)?))
    }
}

fn first_kv(v: &Value) -> Result<Option<Kv>, EtcdError> {
    v.get("kvs").and_then(|k| k.get(0)).map(Kv::from_json).transpose()
}

/// The gateway's JSON (streaming calls answer `{"result": …}` lines: the first one), or its error.
fn parse_answer(status: http::StatusCode, bytes: &[u8]) -> Result<Value, EtcdError> {
    let text = String::from_utf8_lossy(bytes);
    // etcd with --client-cert-auth and its authentication on refuses, on the gateway, any client
    // certificate that carries a Common Name (it cannot map it to a user there).
    if text.contains("CommonName of client sending a request against gateway") {
        return Err(EtcdError::Refused {
            code: i64::from(status.as_u16()),
            message: "etcd refuses a client certificate with a Common Name on its JSON gateway once its \
                      authentication is on: give relay a client certificate without a CN (subject alternative \
                      names only); the etcd user comes from the user and password"
                .into(),
        });
    }
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: Value = serde_json::from_str(line).map_err(|e| {
        EtcdError::Bad(format!(
            "HTTP {status}: {e}: {}",
            line.chars().take(200).collect::<String>()
        ))
    })?;
    let v = match v.get("result") {
        Some(r) => r.clone(),
        None => v,
    };
    let error = v.get("error").cloned().filter(|e| !e.is_null());
    if let Some(e) = error {
        // {"error": "...", "code": 5} (unary) or {"error": {"grpc_code": 5, "message": "..."}}.
        let code = v
            .get("code")
            .and_then(int)
            .or_else(|| e.get("grpc_code").and_then(int))
            .unwrap_or(-1);
        let message = e
            .as_str()
            .map(str::to_string)
            .or_else(|| e.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| e.to_string());
        return Err(EtcdError::Refused { code, message });
    }
    if !status.is_success() {
        return Err(EtcdError::Refused {
            code: i64::from(status.as_u16()),
            message: line.chars().take(200).collect(),
        });
    }
    Ok(v)
}

/// What a campaign found.
enum Campaign {
    Won {
        lease: i64,
        revision: i64,
        granted_at: Instant,
        since_ms: i64,
    },
    Follow(Option<String>),
}

/// Why holding ended.
enum Held {
    Stopped,
    Lost(String),
}

struct Timing {
    ttl: Duration,
    /// Keepalive period (TTL/3).
    tick: Duration,
    /// Step down when no keepalive was answered for `ttl - margin`.
    margin: Duration,
    /// Followers look at the key this often.
    poll: Duration,
    /// Longest a campaign call may take.
    call: Duration,
}

impl Timing {
    fn new(ttl: Duration) -> Self {
        let tick = ttl / 3;
        Self {
            ttl,
            tick,
            margin: (ttl / 4).max(Duration::from_millis(250)),
            poll: tick.min(Duration::from_secs(1)),
            call: tick.max(Duration::from_millis(500)),
        }
    }

    /// Until when a lease last known alive at `good` is surely alive, minus the margin.
    fn safe_until(&self, good: Instant) -> Instant {
        good + self.ttl.saturating_sub(self.margin)
    }
}

async fn campaign(etcd: &mut Etcd, key: &str, replica: &str, t: &Timing) -> Result<Campaign, EtcdError> {
    if let Some(kv) = etcd.range(key, Instant::now() + t.call).await? {
        return Ok(Campaign::Follow(Some(kv.holder())));
    }
    let granted_at = Instant::now();
    let lease = etcd.grant(t.ttl, granted_at + t.call).await?;
    let since_ms = crate::model::now_ms();
    let value = json!({ "replica": replica, "since_ms": since_ms }).to_string();
    match etcd.create(key, value.as_bytes(), lease, Instant::now() + t.call).await {
        Ok(Ok(revision)) => Ok(Campaign::Won {
            lease,
            revision,
            granted_at,
            since_ms,
        }),
        Ok(Err(kv)) => {
            let _ = etcd.revoke(lease, Instant::now() + t.call).await;
            Ok(Campaign::Follow(kv.map(|kv| kv.holder())))
        }
        Err(e) => {
            // The key may have been created on this lease after all: revoking deletes it.
            let _ = etcd.revoke(lease, Instant::now() + t.call).await;
            Err(e)
        }
    }
}

async fn hold(
    etcd: &mut Etcd,
    key: &str,
    lease: i64,
    granted_at: Instant,
    t: &Timing,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Held {
    let mut last_good = granted_at;
    let mut next = granted_at + t.tick;
    loop {
        if *stop.borrow() {
            return Held::Stopped;
        }
        let deadline = t.safe_until(last_good);
        tokio::select! {
            _ = tokio::time::sleep_until(next.min(deadline)) => {}
            _ = stop.changed() => return Held::Stopped,
        }
        if Instant::now() >= deadline {
            return Held::Lost(format!(
                "no keepalive answered for {:.1}s (lease TTL {:.1}s)",
                (deadline - last_good).as_secs_f64(),
                t.ttl.as_secs_f64()
            ));
        }
        let sent = Instant::now();
        match etcd.keepalive(lease, deadline).await {
            Ok(left) if left > 0 => {
                last_good = sent;
                next = sent + t.tick;
                // The key must still be ours (an operator may have deleted it).
                match etcd.range(key, t.safe_until(last_good)).await {
                    Ok(Some(kv)) if kv.lease == lease => {}
                    Ok(Some(kv)) => return Held::Lost(format!("the leader key now belongs to {}", kv.holder())),
                    Ok(None) => return Held::Lost("the leader key was deleted".into()),
                    Err(_) => {}
                }
            }
            Ok(_) => return Held::Lost("etcd says the lease expired".into()),
            Err(EtcdError::Timeout) => {}
            Err(e) => {
                tracing::debug!(error = %e, "etcd keepalive failed; retrying");
                next = Instant::now() + Duration::from_millis(200);
            }
        }
    }
}

async fn run(mut etcd: Etcd, store: DynStore, replica: String, opts: EtcdOptions, c: Coordinator) {
    let Coordinator { sink, mut stop } = c;
    let key = opts.key();
    let t = Timing::new(opts.ttl);
    // A lease this replica held and has not managed to revoke yet.
    let mut stale_lease: Option<i64> = None;
    // The last failure logged: each new one is logged once, not every poll.
    let mut failing: Option<String> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(lease) = stale_lease {
            if etcd.revoke(lease, Instant::now() + t.call).await.is_ok() {
                stale_lease = None;
            }
        }
        match campaign(&mut etcd, &key, &replica, &t).await {
            Ok(Campaign::Won {
                lease,
                revision,
                granted_at,
                since_ms,
            }) => {
                failing = None;
                let detail = format!("etcd key {key} create revision {revision}");
                let claim = tokio::time::timeout_at(
                    t.safe_until(granted_at),
                    store.claim_term(&replica, MECHANISM, &detail, since_ms),
                )
                .await;
                let term = match claim {
                    Ok(Ok(term)) if Instant::now() < t.safe_until(granted_at) => term,
                    Ok(Ok(_)) | Err(_) => {
                        tracing::warn!("won the etcd election but recording the term took too long; campaigning again");
                        stale_lease = Some(lease);
                        continue;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "won the etcd election but cannot record the term; campaigning again");
                        stale_lease = Some(lease);
                        sink.set(Role::Following { leader: None });
                        wait(&mut stop, t.poll).await;
                        continue;
                    }
                };
                sink.set(Role::Leading { term, since_ms });
                let held = hold(&mut etcd, &key, lease, granted_at, &t, &mut stop).await;
                // Step down first: jobs stop before anyone else can win.
                sink.set(Role::Following { leader: None });
                match held {
                    Held::Stopped => {
                        if let Err(e) = etcd.revoke(lease, Instant::now() + t.call).await {
                            tracing::warn!(error = %e, "could not revoke the leader lease; it expires within the TTL");
                        }
                        break;
                    }
                    Held::Lost(why) => {
                        tracing::warn!(reason = %why, term, "lost the etcd leadership");
                        stale_lease = Some(lease);
                    }
                }
            }
            Ok(Campaign::Follow(leader)) => {
                failing = None;
                sink.set(Role::Following { leader });
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    match e {
                        EtcdError::Login { .. } => {
                            tracing::error!(error = %text, "leader election: cannot log in to etcd; retrying")
                        }
                        _ => tracing::warn!(
                            error = %text,
                            "leader election: etcd unreachable or refusing: nobody can be known to lead; retrying"
                        ),
                    }
                }
                failing = Some(text);
                sink.set(Role::Following { leader: None });
            }
        }
        wait(&mut stop, t.poll).await;
    }
    sink.set(Role::Following { leader: None });
}
