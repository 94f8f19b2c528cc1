//! Graceful shutdown on SIGINT or SIGTERM.

use std::time::Duration;
use tokio::sync::watch;

/// How long a requested stop may take before the process exits anyway.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

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
        // A stop must not wait forever on a peer that does not answer (a broker that is gone:
        // the consumer waits to leave its group, the producer to deliver). Exiting is safe at
        // any point: positions only ever cover what Kafka acknowledged or the target applied.
        std::thread::spawn(|| {
            std::thread::sleep(STOP_GRACE);
            tracing::warn!(
                "still stopping {} s after the shutdown request (Kafka or Redis not answering); exiting now: whatever was not acknowledged or applied is taken up again from the checkpoints on the next start",
                STOP_GRACE.as_secs()
            );
            std::process::exit(0);
        });
        // A second signal stops the process immediately.
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    rx
}
