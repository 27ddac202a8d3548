//! The shutdown signal: a future that ends on SIGTERM or SIGINT.

use std::future::Future;

/// The signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the {signal} handler: {source} (stop the process with SIGKILL)")]
pub struct SignalError {
    pub signal: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Installs handlers for SIGTERM and SIGINT now (inside a tokio runtime) and
/// returns a future that ends, with a log line, when either arrives. From
/// then on those signals no longer kill the process: install when it is
/// ready to stop gracefully (a long start-up stays killable).
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, SignalError> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind, name| {
        signal(kind).map_err(|source| SignalError {
            signal: name,
            source,
        })
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn ends_on_sigterm_and_not_before() {
        let mut stop = Box::pin(shutdown_signal().unwrap());
        // Nothing sent yet: still waiting.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut stop)
            .await
            .is_err());
        // SAFETY: raise(3) sends a signal to this process; the handler above
        // is installed, so it does not terminate it.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .unwrap();
    }
}
