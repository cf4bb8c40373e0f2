//! Serving until a signal: start a [`Node`], wait for SIGINT or SIGTERM (or a fatal log
//! error), shut it down.

use std::sync::Arc;

use crate::config::{Config, Source};
use crate::log::Log;
use crate::node::Node;
use crate::startup::LoadedConfig;

pub use crate::node::{reload, ServeError};

/// Exit status after a second SIGINT/SIGTERM.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Serves until SIGINT or SIGTERM (or a fatal log error); SIGHUP reloads what can be
/// reloaded (see [`reload`]). `config` is checked and its files read first; errors name no
/// line (see [`serve`] for a config loaded from its file).
pub async fn run(config: Config) -> Result<(), ServeError> {
    run_observed(config, |_| {}).await
}

/// [`run`], handing the opened log to `observe` first: the fuzz harness decodes everything
/// stored after each input (reads run beside the appender).
pub async fn run_observed(
    config: Config,
    observe: impl FnOnce(Arc<Log>),
) -> Result<(), ServeError> {
    let loaded = crate::startup::prepare(config, &Source::embedded())?;
    serve_observed(loaded, observe).await
}

/// Serves a configuration loaded by [`crate::startup::load`] until SIGINT or SIGTERM (or a
/// fatal log error).
pub async fn serve(loaded: LoadedConfig) -> Result<(), ServeError> {
    serve_observed(loaded, |_| {}).await
}

async fn serve_observed(
    loaded: LoadedConfig,
    observe: impl FnOnce(Arc<Log>),
) -> Result<(), ServeError> {
    let mut node = Node::start(loaded, observe).await?;
    let fatal = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing in-flight appends (a second signal exits at once)");
            // Everything acknowledged is already in the log (fsynced, or written to the OS
            // per the fsync mode), so leaving now loses nothing acknowledged.
            tokio::spawn(async {
                shutdown_signal().await;
                tracing::warn!("second signal: exiting now");
                std::process::exit(EXIT_SECOND_SIGNAL);
            });
            None
        }
        why = node.failed() => why,
    };
    node.shutdown(fatal).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
