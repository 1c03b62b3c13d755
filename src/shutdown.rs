//! The shutdown signal every task listens to.
//!
//! One [`Shutdown`] is created by `app`; SIGTERM/SIGINT (or a test) triggers it; listeners stop
//! accepting, open requests get `proxy.shutdown_grace` to finish, background tasks (probe,
//! replay, store writer) return at their next await point.

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trigger shutdown (idempotent).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown is triggered.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    /// Trigger on SIGTERM or SIGINT.
    pub fn trigger_on_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("cannot listen for SIGTERM: {e}");
                            let _ = ctrl_c.await;
                            this.trigger();
                            return;
                        }
                    };
                tokio::select! {
                    _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
            this.trigger();
        });
    }
}
