//! Signals: SIGINT and SIGTERM start a graceful shutdown. SIGHUP, which operators send
//! expecting a reload, is caught so that it does not kill the process (its default action);
//! live reload itself is not built yet, so it is logged and ignored.

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT received");
                    return;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM received");
                    return;
                }
                _ = hup.recv() => tracing::warn!(
                    "SIGHUP received: live reload is not supported yet; the running config is unchanged"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
