//! `rankmesh scheduler`: a scheduler on its own, for workers started by hand, by a site's
//! tooling or by another launcher. Its token comes from `RANKMESH_TOKEN` or is made here;
//! its address and token go into the scheduler file until it stops.

use super::{cancel_on_signal, publish_scheduler_file, ClusterError};
use crate::protocol::Token;
use crate::scheduler::{server, SchedulerConfig};
use std::path::PathBuf;
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    pub host: String,
    /// 0: any free port.
    pub port: u16,
    pub scheduler_file: PathBuf,
    pub scheduler: SchedulerConfig,
}

/// Serves until SIGINT or SIGTERM, then removes the scheduler file.
pub async fn serve(options: StandaloneOptions) -> Result<(), ClusterError> {
    let token = Token::from_env()
        .map_or_else(Token::generate, Ok)
        .map_err(ClusterError::Scheduler)?;
    let (host, port) = (options.host.as_str(), options.port);
    let listener =
        TcpListener::bind((host, port))
            .await
            .map_err(|source| ClusterError::Listen {
                address: format!("{host}:{port}"),
                source,
            })?;
    let address = format!(
        "tcp://{}",
        listener.local_addr().map_err(ClusterError::Scheduler)?
    );
    let path = options.scheduler_file;
    publish_scheduler_file(&address, &token, &path)?;
    eprintln!(
        "rankmesh: scheduler at {address} (scheduler file {})",
        path.display()
    );
    let shutdown = cancel_on_signal().map_err(ClusterError::Signals)?;
    let (workers, _) = tokio::sync::watch::channel(Vec::new());
    server::serve(listener, token, options.scheduler, workers, shutdown).await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
