//! The shutdown signal every relay binary waits for.

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `kill`, systemd and Kubernetes send). Where the
/// SIGTERM handler cannot be installed (or off Unix), on Ctrl-C alone.
pub async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_ends_the_wait_and_nothing_else_does() {
        let waiting = tokio::spawn(super::shutdown());
        // Not before a signal.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        // Once the handler is installed, SIGTERM to this process ends the wait (and, with the
        // handler installed, does not end the process).
        let pid = std::process::id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
    }
}
