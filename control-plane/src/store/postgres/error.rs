//! Postgres failures as typed store errors: what cannot reach or hear from the server is
//! `Unavailable` (worth a retry), what the server refused is `Internal`, a value that does not
//! convert is `Corrupt`; each keeps the driver's error as its source. Messages carry the
//! server's own words and SQLSTATE with a hint for the usual first-hour mistakes, never a query
//! parameter.

use crate::store::{Result, StoreError};
use std::str::FromStr;
use std::time::Duration;

/// How long a new database connection may take to become a session (TCP, TLS, authentication).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A driver error, by kind (see the module doc).
pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    let message = explain(&e);
    match kind(&e) {
        Kind::Unavailable => StoreError::unavailable(message, e),
        Kind::Corrupt => StoreError::corrupt_from(message, e),
        Kind::Internal => StoreError::internal(message, e),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Unavailable,
    Corrupt,
    Internal,
}

/// Unavailable (retrying later may succeed): no answer from the server (connection refused,
/// lost or closed, TLS, a timeout), or a SQLSTATE that says the server cannot serve now or this
/// client at all (connection exceptions, shutdown, no slots, authentication, a missing
/// database), or a transaction that lost a race (serialization failure, deadlock). Corrupt: a
/// column that does not convert. Anything else the server or driver refused is Internal.
fn kind(e: &tokio_postgres::Error) -> Kind {
    if let Some(d) = e.as_db_error() {
        let code = d.code().code();
        let unavailable = code.starts_with("08")
            || code.starts_with("53")
            || code.starts_with("57P")
            || code.starts_with("28")
            || matches!(code, "3D000" | "40001" | "40P01");
        return if unavailable { Kind::Unavailable } else { Kind::Internal };
    }
    // The driver's own kinds are private; their messages are stable and say which.
    let text = e.to_string();
    if e.is_closed()
        || [
            "error connecting",
            "error performing TLS",
            "error communicating",
            "timeout",
            "connection closed",
        ]
        .iter()
        .any(|p| text.starts_with(p))
    {
        Kind::Unavailable
    } else if text.starts_with("error deserializing column") {
        Kind::Corrupt
    } else {
        Kind::Internal
    }
}

/// What went wrong, as an operator can act on it: the server's own message (never query
/// parameters) with its SQLSTATE and, for the usual first-hour mistakes, what to do; otherwise
/// the whole error chain (connection refused, TLS).
pub(super) fn explain(e: &tokio_postgres::Error) -> String {
    if let Some(d) = e.as_db_error() {
        let hint = match d.code().code() {
            "28P01" => " (the password in the database URL is wrong)",
            "28000" => " (the role does not exist, or the server's pg_hba.conf refuses this client: check the user in the database URL and pg_hba.conf; a server that requires TLS needs sslmode=require or stricter)",
            "3D000" => " (create the database, or fix its name in the database URL)",
            "53300" => " (the server has no connection slots left: raise its max_connections or lower --db-max-connections)",
            "57P03" => " (the server is starting up or shutting down: try again shortly)",
            _ => "",
        };
        return format!("{}: {}{hint}", d.code().code(), d.message());
    }
    let mut out = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out.push_str(connection_hint(&out));
    out
}

/// What to do about a connection that failed before the server said anything, from its error
/// chain ("" when there is nothing useful to add).
pub(super) fn connection_hint(chain: &str) -> &'static str {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("server does not support tls") {
        " (the server offers no TLS: use sslmode=prefer or disable, or turn ssl on in the server)"
    } else if lower.contains("connection refused") {
        " (nothing listens there: check the host and port in the database URL, and that Postgres runs)"
    } else if lower.contains("failed to lookup address") || lower.contains("name or service not known") {
        " (the host name in the database URL does not resolve: check it, and this machine's DNS)"
    } else if lower.contains("invalidcertificate") || lower.contains("certificate") {
        " (the server's certificate did not verify: check sslrootcert and the host name in the URL)"
    } else {
        ""
    }
}

/// A pool error: the connection's own error when there is one; every pool failure means no
/// session to the database, so `Unavailable`.
pub(super) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::{PoolError, TimeoutType};
    match e {
        PoolError::Backend(e) => StoreError::unavailable(explain(&e), e),
        PoolError::Timeout(TimeoutType::Create) => StoreError::unavailable(
            format!(
                "no Postgres session within {}s at the database URL's host and port (is a Postgres server \
                 listening there, not another service? is the network between here and there slow or filtered?)",
                CONNECT_TIMEOUT.as_secs()
            ),
            e,
        ),
        PoolError::Timeout(_) => StoreError::unavailable("timed out waiting for a database connection", e),
        other => StoreError::unavailable(other.to_string(), other),
    }
}

/// A stored BIGINT back to a count; a negative one is corrupt.
pub(super) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|e| StoreError::corrupt_from(format!("{what} is negative"), e))
}

/// A stored INT back to a `u32`; a negative one is corrupt.
pub(super) fn to_u32(v: i32, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|e| StoreError::corrupt_from(format!("{what} {v} is negative"), e))
}

/// A stored enum's text back to its type.
pub(super) fn parse<T: FromStr<Err = String>>(s: &str) -> Result<T> {
    s.parse().map_err(StoreError::corrupt)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::connection_hint;
    use crate::store::StoreError;

    /// A database URL pointing at a port where something else listens (it accepts and says
    /// nothing Postgres understands) fails with a message, not a hang, and as `Unavailable`.
    #[tokio::test]
    async fn a_port_that_is_not_postgres_is_an_error_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                open.push(sock);
            }
        });
        let url = format!("postgres://relay@127.0.0.1:{port}/relay?sslmode=disable");
        let started = std::time::Instant::now();
        let err = match super::super::PostgresStore::connect(&url, 2).await {
            Ok(_) => panic!("connected to a silent port"),
            Err(e) => e,
        };
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("no Postgres session within 15s"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(40));
    }

    /// Nothing listening is `Unavailable` (retry), with the cause kept as the source.
    #[tokio::test]
    async fn a_refused_connection_is_unavailable_with_its_source() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("postgres://relay@127.0.0.1:{port}/relay?sslmode=disable");
        let err = match super::super::PostgresStore::connect(&url, 2).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(e) => e,
        };
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(std::error::Error::source(&err).is_some(), "{err:?}");
        assert!(err.to_string().contains("nothing listens there"), "{err}");
    }

    /// A refused statement is Internal (not "retry"); a lost connection is Unavailable.
    #[tokio::test]
    async fn a_refused_statement_is_internal_and_a_closed_connection_unavailable() {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: the test Postgres server");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        let driver = tokio::spawn(conn);
        let err = super::pg(client.batch_execute("SELECT * FROM no_such_table").await.unwrap_err());
        assert!(matches!(err, StoreError::Internal { .. }), "{err:?}");
        assert!(err.to_string().starts_with("database error: 42P01: "), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        let err = super::pg(
            client
                .query_one("SELECT 'x'::TEXT", &[])
                .await
                .unwrap()
                .try_get::<_, i64>(0)
                .unwrap_err(),
        );
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        driver.abort();
        let _ = driver.await;
        let err = super::pg(client.batch_execute("SELECT 1").await.unwrap_err());
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    }

    /// A connection that failed before the server spoke says what to check.
    #[test]
    fn connection_failures_say_what_to_check() {
        for (chain, says) in [
            (
                "error connecting to server: failed to lookup address information: Name or service not known",
                "does not resolve",
            ),
            (
                "error connecting to server: Connection refused (os error 111)",
                "nothing listens there",
            ),
            (
                "error performing TLS handshake: server does not support TLS",
                "offers no TLS",
            ),
            ("invalid peer certificate: UnknownIssuer", "sslrootcert"),
        ] {
            assert!(connection_hint(chain).contains(says), "{chain}");
        }
        assert_eq!(connection_hint("something else"), "");
    }
}
