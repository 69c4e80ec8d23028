//! Signals: SIGTERM and SIGINT stop the server; SIGHUP is caught here ([`Hangups`]) and
//! the server reloads on it (beside the reload it drives, so this module stays a leaf).
//!
//! The first SIGTERM or SIGINT starts the graceful stop; a second one, while connections
//! drain, cuts it short. Once halfguard listens for these signals the kernel no longer ends
//! the process on them, so without the second one a Ctrl-C would have to wait the whole
//! drain.

use std::future::Future;

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

/// The first stop signal (SIGTERM or SIGINT) and the second, as two futures, for
/// `Server::run_until`. Call it inside the runtime, before binding: from this call
/// on a signal is caught, not fatal, so one sent as soon as halfguard listens is not lost.
pub fn signals() -> (
    impl Future<Output = Signal> + Send,
    impl Future<Output = Signal> + Send,
) {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let (second_tx, second_rx) = tokio::sync::oneshot::channel();
    let mut stops = Stops::new();
    tokio::spawn(async move {
        let _ = first_tx.send(stops.next().await);
        let _ = second_tx.send(stops.next().await);
    });
    let wait = |rx: tokio::sync::oneshot::Receiver<Signal>| async move {
        match rx.await {
            Ok(s) => s,
            // The listener is gone with the runtime: no signal will come.
            Err(_) => std::future::pending().await,
        }
    };
    (wait(first_rx), wait(second_rx))
}

/// SIGTERM and SIGINT as they come, each one logged.
struct Stops {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Stops {
    fn new() -> Stops {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(t), Ok(i)) => Some((t, i)),
                _ => None,
            };
            Stops { streams }
        }
        #[cfg(not(unix))]
        Stops {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            return tokio::select! {
                _ = int.recv() => {
                    tracing::info!("SIGINT received");
                    Signal::Interrupt
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM received");
                    Signal::Terminate
                }
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("SIGINT received");
        Signal::Interrupt
    }
}

/// SIGHUP, caught from the moment this is made. SIGHUP's default action ends the process,
/// so `run` makes this first, before the listeners bind and the names resolve: one sent
/// while halfguard starts (`systemctl reload` right after `start`) is a reload once it
/// runs, not the end of the process.
pub struct Hangups {
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts catching SIGHUP. Call it inside the runtime (`Runtime::enter`).
    pub fn catch() -> Hangups {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Hangups {
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Hangups {}
    }

    /// False when SIGHUP could not be caught (the caller says so once logging is up).
    pub fn caught(&self) -> bool {
        #[cfg(unix)]
        {
            self.hup.is_some()
        }
        #[cfg(not(unix))]
        false
    }

    /// The next SIGHUP (one that came before this call counts); `None` when none can come.
    pub async fn next(&mut self) -> Option<()> {
        #[cfg(unix)]
        if let Some(hup) = &mut self.hup {
            return hup.recv().await;
        }
        None
    }
}
