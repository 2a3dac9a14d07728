//! The scheduler's dashboard: HTTP on one port, for people (`/status`) and for tools
//! (`/health`, `/json/counts.json`, `/json/identity.json`, `/metrics` in Prometheus' text
//! format). Login nodes are shared, so every request proves the cluster token: the link
//! printed at start carries it once (`?token=`), which sets a cookie for this port and
//! redirects to the same page without it; scrapers send `Authorization: Bearer <token>`.
//! Everything else gets 403. Pages are made here from scheduler snapshots
//! (`scheduler::monitor`); nothing is fetched from elsewhere.

mod capped;
pub mod history;
mod render;
pub mod report;
pub mod top;

use crate::protocol::Snapshot;
use crate::protocol::Token;
use crate::scheduler::monitor::Monitor;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where the dashboard listens unless told otherwise (`distributed`'s default).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8787";
/// Connections open at once (pages, their event streams, scrapers); more wait.
pub const MAX_CONNECTIONS: usize = 64;
/// How often an open status page gets a snapshot.
const EVENT_INTERVAL: Duration = Duration::from_millis(500);
/// The status page; its script draws what `/events` sends.
static STATUS_PAGE: LazyLock<String> = LazyLock::new(|| page(include_str!("status.html")));

/// A page template with what every page shares (styles, script helpers) put in.
fn page(template: &str) -> String {
    template
        .replacen("/*PAGE_CSS*/", include_str!("page.css"), 1)
        .replacen("/*PAGE_JS*/", include_str!("page.js"), 1)
}
/// Ports after a taken one that are tried before giving up.
const PORTS_TO_TRY: u16 = 100;

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("dashboard address {0:?} is not HOST:PORT")]
    Address(String),
    #[error("cannot listen on {address} (nor on the {PORTS_TO_TRY} ports after it): {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// A bound dashboard port, and how to reach it.
pub struct Listening {
    listener: TcpListener,
    pub address: SocketAddr,
}

impl Listening {
    /// The address people open: the host name when it listens on every interface.
    pub fn url(&self) -> String {
        let host = if self.address.ip().is_unspecified() {
            this_host()
        } else {
            self.address.ip().to_string()
        };
        format!("http://{host}:{}", self.address.port())
    }
}

/// This machine's host name, as people reach it.
pub fn this_host() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is what is passed.
    let ok = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    match std::str::from_utf8(&name[..end]) {
        Ok(host) if ok && !host.is_empty() => host.to_string(),
        _ => "localhost".to_string(),
    }
}

/// Binds `address` (`HOST:PORT`; port 0: any), or the next free port after a taken one.
pub async fn bind(address: &str) -> Result<Listening, DashboardError> {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .ok_or_else(|| DashboardError::Address(address.to_string()))?;
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let last = if port == 0 {
        0
    } else {
        port.saturating_add(PORTS_TO_TRY)
    };
    let mut first_error = None;
    for candidate in port..=last {
        match TcpListener::bind((host, candidate)).await {
            Ok(listener) => {
                let address = listener
                    .local_addr()
                    .map_err(|source| DashboardError::Listen {
                        address: format!("{host}:{candidate}"),
                        source,
                    })?;
                return Ok(Listening { listener, address });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                first_error.get_or_insert(e);
            }
            Err(source) => {
                return Err(DashboardError::Listen {
                    address: format!("{host}:{candidate}"),
                    source,
                })
            }
        }
    }
    Err(DashboardError::Listen {
        address: format!("{host}:{port}"),
        source: first_error.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()),
    })
}

/// What a dashboard serves from.
pub struct Serving {
    pub listening: Listening,
    pub monitor: Monitor,
    /// The run so far, for `/report.html`.
    pub history: history::SharedHistory,
    /// The scheduler's address, as identity.json reports it.
    pub scheduler_address: String,
}

struct Shared {
    token: Token,
    monitor: Monitor,
    history: history::SharedHistory,
    scheduler_address: String,
    port: u16,
}

/// Serves until `shutdown`.
pub async fn serve(serving: Serving, token: Token, shutdown: CancellationToken) {
    let Serving {
        listening,
        monitor,
        history,
        scheduler_address,
    } = serving;
    let shared = Arc::new(Shared {
        token,
        monitor,
        history,
        scheduler_address,
        port: listening.address.port(),
    });
    let app = Router::new()
        .route("/", get(|| async { Redirect::to("status") }))
        .route("/health", get(|| async { "ok" }))
        .route("/status", get(status))
        .route("/events", get(events))
        .route("/json/counts.json", get(counts))
        .route("/json/identity.json", get(identity))
        .route("/json/snapshot.json", get(full_snapshot))
        .route("/report.html", get(report_page))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .with_state(shared);
    let listener = capped::CappedListener::new(listening.listener, MAX_CONNECTIONS);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the dashboard stopped");
    }
}

/// The cookie that carries the token, one per port (cookies do not tell ports apart, and
/// several clusters may share a login node's localhost).
fn cookie_name(port: u16) -> String {
    format!("rankmesh-token-{port}")
}

async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let uri = request.uri().clone();
    if let Some(offered) = query_token(&uri) {
        if !shared.token.matches(&offered) {
            return forbidden();
        }
        // Into a cookie, and out of the address bar.
        let cookie = format!(
            "{}={offered}; Path=/; HttpOnly; SameSite=Strict",
            cookie_name(shared.port)
        );
        let mut response = Redirect::to(&relative_to_itself(uri.path())).into_response();
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    let proven = offered_tokens(request.headers(), shared.port)
        .iter()
        .any(|offered| shared.token.matches(offered));
    if proven {
        next.run(request).await
    } else {
        forbidden()
    }
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        "403 Forbidden: this dashboard needs the cluster token. Open the link rankmesh \
         printed (it carries the token once), or send `Authorization: Bearer <token>`.\n",
    )
        .into_response()
}

/// The page itself as a relative reference: behind a proxy that strips a prefix
/// (jupyter-server-proxy), an absolute path would leave the proxy.
fn relative_to_itself(path: &str) -> String {
    match path.rsplit('/').next() {
        Some(last) if !last.is_empty() => last.to_string(),
        _ => "./".to_string(),
    }
}

fn query_token(uri: &Uri) -> Option<String> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .map(str::to_string)
}

/// Tokens offered in a bearer header or in this port's cookie.
fn offered_tokens(headers: &HeaderMap, port: u16) -> Vec<String> {
    let mut offered = Vec::new();
    for value in headers.get_all(header::AUTHORIZATION) {
        if let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            offered.push(token.trim().to_string());
        }
    }
    let name = cookie_name(port);
    for value in headers.get_all(header::COOKIE) {
        let Ok(cookies) = value.to_str() else {
            continue;
        };
        for cookie in cookies.split(';') {
            if let Some((key, token)) = cookie.trim().split_once('=') {
                if key == name {
                    offered.push(token.to_string());
                }
            }
        }
    }
    offered
}

async fn snapshot(shared: &Shared) -> Result<Snapshot, Response> {
    shared.monitor.snapshot(u64::MAX).await.ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler is stopping or busy\n",
        )
            .into_response()
    })
}

async fn counts(State(shared): State<Arc<Shared>>) -> Result<Json<serde_json::Value>, Response> {
    Ok(Json(render::counts(&snapshot(&shared).await?)))
}

async fn identity(State(shared): State<Arc<Shared>>) -> Result<Json<serde_json::Value>, Response> {
    let snapshot = snapshot(&shared).await?;
    Ok(Json(render::identity(
        &snapshot,
        &shared.scheduler_address,
        shared.port,
    )))
}

#[derive(serde::Deserialize)]
struct ReportQuery {
    /// Only what happened from then on (ms since the scheduler started; see `now_ms`).
    #[serde(default)]
    since_ms: f64,
}

/// The run so far as one self-contained page (`performance_report` saves it).
async fn report_page(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(query): axum::extract::Query<ReportQuery>,
) -> axum::response::Html<String> {
    shared.history.sample(&shared.monitor).await;
    let part = shared.history.lock().since(query.since_ms);
    axum::response::Html(report::render(&part))
}

/// Everything a snapshot holds but the task stream (`rankmesh top` reads it).
async fn full_snapshot(State(shared): State<Arc<Shared>>) -> Result<Json<Snapshot>, Response> {
    Ok(Json(snapshot(&shared).await?))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Result<Response, Response> {
    let text = render::metrics(&snapshot(&shared).await?);
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// The live page: static, drawn in the browser from `/events`.
async fn status() -> axum::response::Html<&'static str> {
    axum::response::Html(STATUS_PAGE.as_str())
}

/// Snapshots as server-sent events, every [`EVENT_INTERVAL`], while the page is open.
async fn events(
    State(shared): State<Arc<Shared>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = tokio::time::interval(EVENT_INTERVAL);
    // Each event carries the task stream's entries the page has not had yet.
    let start = (ticks, shared, 0);
    let stream = futures::stream::unfold(start, |(mut ticks, shared, since)| async move {
        ticks.tick().await;
        let snapshot = shared.monitor.snapshot(since).await?;
        let since = snapshot.stream.last().map_or(since, |e| e.sequence + 1);
        let data = serde_json::to_string(&snapshot).ok()?;
        Some((Ok(Event::default().data(data)), (ticks, shared, since)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_bearer_header_and_this_ports_cookie_only() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("rankmesh-token-9000=other; rankmesh-token-8787=def"),
        );
        assert_eq!(offered_tokens(&headers, 8787), ["abc", "def"]);
        assert_eq!(offered_tokens(&headers, 9000), ["abc", "other"]);
        assert_eq!(
            offered_tokens(&HeaderMap::new(), 8787),
            Vec::<String>::new()
        );
    }

    #[test]
    fn redirects_stay_behind_the_proxy_prefix() {
        assert_eq!(relative_to_itself("/status"), "status");
        assert_eq!(relative_to_itself("/json/counts.json"), "counts.json");
        assert_eq!(relative_to_itself("/"), "./");
    }

    #[test]
    fn the_link_token_is_read_from_the_query() {
        let uri: Uri = "/status?x=1&token=t0k".parse().expect("a uri");
        assert_eq!(query_token(&uri).as_deref(), Some("t0k"));
        assert_eq!(query_token(&"/status".parse().expect("a uri")), None);
    }
}
