//! Signals: SIGTERM and SIGINT stop the server; SIGHUP reloads the config.

/// Which stop was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM (Kubernetes, systemd): fail `/readyz` for `admin.drain_delay` first, so load
    /// balancers stop sending, then stop accepting and drain.
    Terminate,
    /// SIGINT (Ctrl-C): someone at a terminal wants it stopped; skip the delay, still drain.
    Interrupt,
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return Signal::Interrupt;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT received");
                Signal::Interrupt
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Terminate
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}

/// Reloads through `handle` on every SIGHUP, for as long as the process runs.
pub async fn reload_on_sighup(handle: crate::Handle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /reload");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading");
            // The outcome is logged and counted by the reload itself.
            let _ = handle.reload().await;
        }
    }
    #[cfg(not(unix))]
    drop(handle);
}
