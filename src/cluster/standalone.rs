//! `rankmesh scheduler`: a scheduler on its own, for workers started by hand, by a site's
//! tooling or by another launcher. Its token comes from `RANKMESH_TOKEN` or is made here;
//! its address and token go into the scheduler file until it stops.

use super::{
    announce_dashboard, cancel_on_signal, publish_scheduler_file, serve_scheduler, ClusterError,
    Watchers,
};
use crate::protocol::Token;
use crate::scheduler::SchedulerConfig;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    pub host: String,
    /// 0: any free port.
    pub port: u16,
    pub scheduler_file: PathBuf,
    pub scheduler: SchedulerConfig,
    /// Where the dashboard listens (`HOST:PORT`); none: no dashboard.
    pub dashboard: Option<String>,
}

/// Serves until SIGINT or SIGTERM, then removes the scheduler file.
pub async fn serve(options: StandaloneOptions) -> Result<(), ClusterError> {
    let token = Token::from_env()
        .map_or_else(Token::generate, Ok)
        .map_err(ClusterError::Scheduler)?;
    let (host, port) = (options.host.as_str(), options.port);
    let listener = crate::transport::listen::bind((host, port))
        .await
        .map_err(|source| ClusterError::Listen {
            address: format!("{host}:{port}"),
            source,
        })?;
    let address = format!(
        "tcp://{}",
        listener.local_addr().map_err(ClusterError::Scheduler)?
    );
    let dashboard = match &options.dashboard {
        Some(at) => Some(crate::dashboard::bind(at).await?),
        None => None,
    };
    let dashboard_url = dashboard.as_ref().map(crate::dashboard::Listening::url);
    let path = options.scheduler_file;
    publish_scheduler_file(&address, &token, dashboard_url.clone(), &path)?;
    eprintln!(
        "rankmesh: scheduler at {address} (scheduler file {})",
        path.display()
    );
    if let Some(url) = &dashboard_url {
        announce_dashboard(url, &token);
    }
    let shutdown = cancel_on_signal().map_err(ClusterError::Signals)?;
    let (workers, _) = tokio::sync::watch::channel(Vec::new());
    let (watchers, requests) = Watchers::new(dashboard.is_some(), &shutdown);
    let serving = dashboard
        .zip(watchers.as_ref())
        .map(|(listening, w)| w.serving(listening, address.clone()));
    serve_scheduler(
        listener,
        token,
        options.scheduler,
        workers,
        requests,
        serving,
        shutdown,
    )
    .await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
