//! Leader election on Postgres alone (no etcd): a dedicated connection holds a session advisory
//! lock (`pg_try_advisory_lock`); whoever holds it leads. The leader checks its connection every
//! TTL/3 and steps down as soon as a check fails or does not answer within TTL/3: the lock goes
//! with the session, so a replica whose connection broke may already have been replaced. The
//! others try the lock every TTL/3. Failover takes as long as Postgres needs to notice a dead
//! session (immediate when the process dies; TCP keepalive timeouts when the host vanishes).

use super::{wait, Coordinator, LeaderError, Leadership, Role};
use crate::store::pg_tls::PgTarget;
use crate::store::DynStore;
use std::time::Duration;

pub const MECHANISM: &str = "postgres-advisory-lock";

/// The advisory lock's key ("relay" and 2; the migration lock is 1).
pub const LEADER_LOCK: i64 = 0x7265_6c61_7900_0002;

/// `application_name` of the lock's connection.
pub const APPLICATION_NAME: &str = "relay-leader-lock";

impl Leadership {
    /// Campaigns for the advisory lock in the background; `Following` until it holds it.
    pub fn postgres(store: DynStore, replica: &str, database_url: &str, ttl: Duration) -> Result<Self, LeaderError> {
        if ttl < Duration::from_millis(300) {
            return Err(LeaderError::Invalid("the leader TTL is too short".into()));
        }
        let target = crate::store::pg_tls::target(database_url)?;
        let replica_name = replica.to_string();
        tracing::info!(
            replica,
            mechanism = MECHANISM,
            ttl_secs = ttl.as_secs(),
            "leader election on a Postgres advisory lock (no etcd given)"
        );
        Ok(Leadership::build(MECHANISM, replica, move |c| {
            run(target, store, replica_name, ttl, c)
        }))
    }
}

async fn run(target: PgTarget, store: DynStore, replica: String, ttl: Duration, c: Coordinator) {
    let Coordinator { sink, mut stop } = c;
    let PgTarget { mut config, tls, .. } = target;
    config.application_name(APPLICATION_NAME);
    config.connect_timeout(ttl / 3);
    let tick = ttl / 3;
    let mut failing = false;
    'connect: loop {
        if *stop.borrow() {
            break;
        }
        let (client, conn) = match config.connect(tls.clone()).await {
            Ok(c) => c,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "leader lock: cannot connect to Postgres; retrying");
                }
                failing = true;
                sink.set(Role::Following { leader: None });
                wait(&mut stop, tick).await;
                continue;
            }
        };
        failing = false;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "leader lock connection ended");
            }
        });
        // Campaign on this connection until it fails.
        loop {
            if *stop.borrow() {
                driver.abort();
                break 'connect;
            }
            let got = tokio::time::timeout(
                tick,
                client.query_one("SELECT pg_try_advisory_lock($1), pg_backend_pid()", &[&LEADER_LOCK]),
            )
            .await;
            let (won, pid): (bool, i32) = match got {
                Ok(Ok(row)) => (row.get(0), row.get(1)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader lock: Postgres connection failed; reconnecting");
                    break;
                }
                Err(_) => {
                    tracing::warn!("leader lock: Postgres did not answer in time; reconnecting");
                    break;
                }
            };
            if !won {
                let leader = store.leader().await.ok().flatten().map(|l| l.holder);
                sink.set(Role::Following { leader });
                wait(&mut stop, tick).await;
                continue;
            }
            let since_ms = crate::model::now_ms();
            let detail = format!("advisory lock {LEADER_LOCK} held by backend pid {pid}");
            let term = match store.claim_term(&replica, MECHANISM, &detail, since_ms).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "holding the leader lock but cannot record the term; letting go");
                    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK]).await;
                    wait(&mut stop, tick).await;
                    continue;
                }
            };
            sink.set(Role::Leading { term, since_ms });
            // Hold: check the session every TTL/3.
            loop {
                wait(&mut stop, tick).await;
                if *stop.borrow() {
                    sink.set(Role::Following { leader: None });
                    let _ =
                        tokio::time::timeout(tick, client.execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK]))
                            .await;
                    driver.abort();
                    break 'connect;
                }
                match tokio::time::timeout(tick, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        sink.set(Role::Following { leader: None });
                        tracing::warn!(error = %e, term, "leader lock connection failed: stepped down");
                        break;
                    }
                    Err(_) => {
                        sink.set(Role::Following { leader: None });
                        tracing::warn!(term, "leader lock connection did not answer in time: stepped down");
                        break;
                    }
                }
            }
            break;
        }
        // A new session: the old one (and any lock it held) is dropped.
        drop(client);
        driver.abort();
        sink.set(Role::Following { leader: None });
        wait(&mut stop, tick).await;
    }
    sink.set(Role::Following { leader: None });
}
