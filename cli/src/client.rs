//! The connection to the control plane: the admin token (flag, env or file),
//! the `authorization: Bearer` interceptor, and turning gRPC failures into
//! operator-facing errors (which never contain the token or a secret).

use std::error::Error as StdError;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use relay_proto::v1::admin_client::AdminClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The admin token: `--token-file` wins over `--token` / `RELAY_ADMIN_TOKEN`.
pub fn load_token(token: Option<&str>, token_file: Option<&Path>) -> Result<String> {
    let token = match token_file {
        Some(path) => {
            let raw =
                std::fs::read_to_string(path).with_context(|| format!("cannot read token file {}", path.display()))?;
            let t = raw.trim().to_string();
            if t.is_empty() {
                return Err(anyhow!("token file {} is empty", path.display()));
            }
            t
        }
        None => match token.map(str::trim) {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => {
                return Err(anyhow!(
                    "no admin token: pass --token-file PATH or --token, or set RELAY_ADMIN_TOKEN"
                ))
            }
        },
    };
    Ok(token)
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth {
    header: MetadataValue<Ascii>,
}

impl BearerAuth {
    pub fn new(token: &str) -> Result<Self> {
        let mut header: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            // The error would not echo the token, but say nothing about it anyway.
            .map_err(|_| anyhow!("the admin token contains characters that cannot be sent in a header"))?;
        header.set_sensitive(true);
        Ok(BearerAuth { header })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.header.clone());
        Ok(request)
    }
}

pub type Api = AdminClient<InterceptedService<Channel, BearerAuth>>;

/// An authenticated admin client and where it points.
pub struct Conn {
    pub api: Api,
    pub server: String,
}

/// Accepts `host:port` as shorthand for `http://host:port`.
pub fn normalize_server(server: &str) -> String {
    let s = server.trim();
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// The deepest cause of an error (e.g. "Connection refused (os error 111)").
fn root_cause(e: &(dyn StdError + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Prepares a client. The connection is made on the first call, so a command
/// validates its input (and reads its secrets) before anything goes out; an
/// unreachable server is reported by [`status_error`].
pub fn connect(server: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Conn> {
    let server = normalize_server(server);
    let auth = BearerAuth::new(token)?;
    let mut endpoint = Endpoint::from_shared(server.clone())
        .map_err(|e| anyhow!("invalid --server URL {server:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    if server.starts_with("https://") {
        let tls = match ca_pem {
            Some(ca) => {
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca))
            }
            None => tonic::transport::ClientTlsConfig::new().with_webpki_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow!("TLS setup for {server}: {e}"))?;
    }
    let channel = endpoint.connect_lazy();
    Ok(Conn {
        api: AdminClient::with_interceptor(channel, auth),
        server,
    })
}

/// The operator-facing error for a failed call.
pub fn status_error(status: &Status, server: &str) -> anyhow::Error {
    let message = if status.message().is_empty() {
        status.code().description()
    } else {
        status.message()
    };
    // A server that is not a relay control plane's gRPC port (the data plane's HTTP port, a web
    // server): it answers with HTTP, which gRPC reads as garbage.
    if message.contains("invalid compression flag") || message.contains("while receiving response with status") {
        return anyhow!(
            "{server} is not a relay control plane's admin port (it answered plain HTTP; the data plane's API \
             port?): give --server the control plane's gRPC address (default port 50051)"
        );
    }
    let words = match status.code() {
        // Raised by the client itself when the transport fails (it has a source);
        // a server answering UNAVAILABLE has none.
        Code::Unavailable if status.source().is_some() => {
            let cause = status.source().map_or_else(|| message.to_string(), root_cause);
            if cause.contains("InvalidContentType") || cause.contains("corrupt message") {
                return anyhow!(
                    "cannot reach control plane at {server}: the server does not speak TLS there (use http://, \
                     or start the control plane with --tls-cert/--tls-key)"
                );
            }
            return anyhow!("cannot reach control plane at {server}: {cause}");
        }
        Code::Unauthenticated => Some("unauthenticated"),
        Code::PermissionDenied => Some("permission denied"),
        Code::NotFound => Some("not found"),
        Code::AlreadyExists => Some("already exists"),
        Code::InvalidArgument => Some("invalid argument"),
        Code::FailedPrecondition => Some("failed precondition"),
        Code::Aborted => Some("conflict"),
        Code::DeadlineExceeded => Some("timed out"),
        Code::Unavailable => Some("unavailable"),
        _ => None,
    };
    match words {
        Some(w) if !message.starts_with(w) => anyhow!("{w}: {message}"),
        _ => anyhow!("{message}"),
    }
}

/// Unwraps an RPC result, turning a `Status` into an operator-facing error.
pub trait RpcResult<T> {
    fn or_report(self, server: &str) -> Result<T>;
}

impl<T> RpcResult<T> for Result<Response<T>, Status> {
    fn or_report(self, server: &str) -> Result<T> {
        self.map(Response::into_inner).map_err(|s| status_error(&s, server))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_name_the_code() {
        let e = status_error(&Status::permission_denied("read-only token"), "http://x");
        assert_eq!(e.to_string(), "permission denied: read-only token");
        let e = status_error(&Status::not_found("account \"a\""), "http://x");
        assert_eq!(e.to_string(), "not found: account \"a\"");
        let e = status_error(&Status::unauthenticated(""), "http://x");
        assert!(e.to_string().starts_with("unauthenticated: "));
        let e = status_error(&Status::internal("boom"), "http://x");
        assert_eq!(e.to_string(), "boom");
        // What tonic says when the port answers plain HTTP (the data plane's API port).
        let e = status_error(
            &Status::internal(
                "protocol error: received message with invalid compression flag: 123 (valid flags are 0 and 1) \
                 while receiving response with status: 404 Not Found",
            ),
            "http://127.0.0.1:8080",
        );
        assert!(
            e.to_string().contains("is not a relay control plane's admin port"),
            "{e}"
        );
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "  secret-token\n").unwrap();
        assert_eq!(load_token(Some("other"), Some(&f)).unwrap(), "secret-token");
        assert_eq!(load_token(Some("tok\n"), None).unwrap(), "tok");
        let err = load_token(None, None).unwrap_err().to_string();
        assert!(err.contains("no admin token"));
        std::fs::write(&f, "\n").unwrap();
        assert!(load_token(None, Some(&f)).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn bad_token_error_does_not_echo_it() {
        let err = BearerAuth::new("bad\ntoken-XYZ").err().unwrap().to_string();
        assert!(!err.contains("XYZ"));
    }

    #[test]
    fn interceptor_sets_bearer() {
        let mut auth = BearerAuth::new("abc").unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap().to_str().unwrap(),
            "Bearer abc"
        );
    }

    #[test]
    fn server_shorthand() {
        assert_eq!(normalize_server("localhost:50051"), "http://localhost:50051");
        assert_eq!(normalize_server("https://cp:443"), "https://cp:443");
    }

    #[tokio::test]
    async fn unreachable_server_is_reported() {
        // Bind then drop a listener to get a port with (almost surely) nothing on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let mut conn = connect(&url, "tok", None).unwrap();
        let result = conn
            .api
            .get_config_version(relay_proto::v1::GetConfigVersionRequest {})
            .await;
        let err = result.or_report(&conn.server).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!("cannot reach control plane at {url}: ")),
            "{err}"
        );
        assert!(!err.contains("tok\""));
    }
}
