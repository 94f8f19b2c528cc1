//! Graceful shutdown on SIGINT or SIGTERM.

use tokio::sync::watch;

/// A receiver that flips to `true` when the process is asked to stop.
pub fn signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        tracing::info!("shutdown requested (send the signal again to stop at once)");
        let _ = tx.send(true);
        // A second signal stops the process immediately.
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    rx
}
