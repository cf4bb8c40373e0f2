//! The service manager's side of the edge (systemd `Type=notify`, through `$NOTIFY_SOCKET`):
//! `READY=1` once the log is open and every listener is bound and served, `STOPPING=1` when
//! shutdown begins, and with `WatchdogSec=` a `WATCHDOG=1` at half the interval while a
//! health check passes: the log is not poisoned and the appender commits an empty request
//! in time. A stuck appender or a poisoned log stops the pings, so systemd restarts the
//! edge. Without `$NOTIFY_SOCKET` (not run by systemd) all of this does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

use crate::log::appender::Appender;
use crate::log::Log;

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The edge is serving.
pub(crate) fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// The edge is shutting down.
pub(crate) fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Whether the log can still take a commit: not poisoned, and an empty request gets
/// through the appender within `within`.
async fn healthy(appender: &Appender, log: &Log, within: Duration) -> Result<(), String> {
    if let Some(why) = log.poisoned() {
        return Err(format!("the log is poisoned: {why}"));
    }
    match tokio::time::timeout(within, appender.commit_state(Vec::new())).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the appender refused a commit: {e}")),
        Err(_) => Err(format!("the appender did not commit within {within:?}")),
    }
}

/// With a watchdog asked for (`WATCHDOG_USEC`), pings it at half its interval while the
/// health check passes.
pub(crate) fn start_watchdog(appender: Appender, log: Arc<Log>) -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = interval / 2;
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut warned = false;
        loop {
            match healthy(&appender, &log, every).await {
                Ok(()) => {
                    warned = false;
                    notify(&[NotifyState::Watchdog]);
                }
                Err(why) if !warned => {
                    warned = true;
                    tracing::error!(%why, "health check failed: the systemd watchdog is no longer pinged");
                }
                Err(_) => {}
            }
            tokio::time::sleep(every).await;
        }
    }))
}
