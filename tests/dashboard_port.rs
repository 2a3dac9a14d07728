//! The dashboard port answers only requests that prove the cluster token: in a bearer
//! header, in the link (which turns it into a cookie for this port) or in that cookie.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup should panic loudly

use rankmesh::dashboard;
use rankmesh::protocol::Token;
use rankmesh::scheduler::{monitor, server, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Dashboard {
    port: u16,
    token: Token,
    shutdown: CancellationToken,
}

async fn start() -> Dashboard {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = Token::generate().unwrap();
    let shutdown = CancellationToken::new();
    let (workers, _) = tokio::sync::watch::channel(Vec::new());
    let (monitor, requests) = monitor::monitor();
    let listening = dashboard::bind("127.0.0.1:0").await.unwrap();
    let port = listening.address.port();
    let history = dashboard::history::record(monitor.clone(), shutdown.clone());
    let serving = dashboard::Serving {
        listening,
        monitor,
        history,
        scheduler_address: "tcp://127.0.0.1:1".into(),
    };
    tokio::spawn(dashboard::serve(serving, token.clone(), shutdown.clone()));
    tokio::spawn(server::serve(
        listener,
        token.clone(),
        SchedulerConfig::default(),
        workers,
        requests,
        shutdown.clone(),
    ));
    Dashboard {
        port,
        token,
        shutdown,
    }
}

/// One HTTP/1.1 request; returns the status code and the whole response.
async fn get(port: u16, path: &str, headers: &[String]) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap();
    (status, response)
}

#[tokio::test]
async fn every_endpoint_refuses_a_missing_or_wrong_token() {
    let d = start().await;
    for path in [
        "/",
        "/health",
        "/status",
        "/events",
        "/metrics",
        "/json/counts.json",
        "/json/identity.json",
        "/json/snapshot.json",
        "/report.html",
        "/nothing",
    ] {
        assert_eq!(
            get(d.port, path, &[]).await.0,
            403,
            "{path} without a token"
        );
        let wrong = ["Authorization: Bearer wrong".to_string()];
        assert_eq!(
            get(d.port, path, &wrong).await.0,
            403,
            "{path} with a wrong token"
        );
        let cookie = [format!("Cookie: rankmesh-token-{}=wrong", d.port)];
        assert_eq!(
            get(d.port, path, &cookie).await.0,
            403,
            "{path} with a wrong cookie"
        );
        let link = format!("{path}?token=wrong");
        assert_eq!(get(d.port, &link, &[]).await.0, 403, "{link}");
    }
    d.shutdown.cancel();
}

#[tokio::test]
async fn the_token_opens_the_endpoints_and_the_link_sets_a_cookie() {
    let d = start().await;
    let bearer = [format!("Authorization: Bearer {}", d.token.as_str())];
    let (status, health) = get(d.port, "/health", &bearer).await;
    assert_eq!(status, 200);
    assert!(health.ends_with("ok"), "{health}");
    let (status, counts) = get(d.port, "/json/counts.json", &bearer).await;
    assert_eq!(status, 200);
    assert!(counts.contains("\"workers\":0"), "{counts}");
    let (status, metrics) = get(d.port, "/metrics", &bearer).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("dask_scheduler_clients 0"), "{metrics}");

    let link = format!("/status?token={}", d.token.as_str());
    let (status, redirect) = get(d.port, &link, &[]).await;
    assert_eq!(status, 303);
    let cookie = format!("rankmesh-token-{}={}", d.port, d.token.as_str());
    assert!(
        redirect.contains(&format!("set-cookie: {cookie}; Path=/; HttpOnly")),
        "{redirect}"
    );
    assert!(redirect.contains("location: status\r\n"), "{redirect}");
    let (status, page) = get(d.port, "/status", &[format!("Cookie: {cookie}")]).await;
    assert_eq!(status, 200);
    assert!(page.contains("EventSource(\"events\")"), "{page}");
    assert!(
        page.contains("function bytes") && !page.contains("/*PAGE_"),
        "{page}"
    );
    d.shutdown.cancel();
}

#[tokio::test]
async fn a_taken_port_moves_to_the_next_free_one() {
    let first = dashboard::bind("127.0.0.1:0").await.unwrap();
    let taken = first.address.port();
    let next = dashboard::bind(&format!("127.0.0.1:{taken}"))
        .await
        .unwrap();
    assert_ne!(next.address.port(), taken);
    assert!(matches!(
        dashboard::bind("localhost").await,
        Err(dashboard::DashboardError::Address(_))
    ));
}

#[tokio::test]
async fn strangers_holding_connections_cannot_take_more_than_the_cap() {
    let d = start().await;
    let mut held = Vec::new();
    for _ in 0..dashboard::MAX_CONNECTIONS {
        held.push(TcpStream::connect(("127.0.0.1", d.port)).await.unwrap());
    }
    let bearer = [format!("Authorization: Bearer {}", d.token.as_str())];
    let waiting = tokio::spawn(async move { get(d.port, "/health", &bearer).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a connection past the cap was served"
    );
    held.pop(); // one closes: the waiting request gets its place
    let (status, _) = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("served once a place freed")
        .unwrap();
    assert_eq!(status, 200);
    d.shutdown.cancel();
}
