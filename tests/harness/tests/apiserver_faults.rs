//! The fake apiserver's fault injection behaves as its docs say, and never kinder than a real outage: a hung
//! request stays unanswered after the hang ends, a reset is a reset, and a silenced watch neither speaks nor
//! closes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use harness::apiserver::{FakeApiServer, TOKEN};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one HTTP/1.1 GET on a new connection and returns the connection.
async fn send_get(api: &FakeApiServer, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(api.addr()).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer {TOKEN}\r\nAccept: application/json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// What arrives on `stream` within `within`: `Ok(bytes)` (empty at EOF) or `Err` on a reset.
async fn read_within(stream: &mut TcpStream, within: Duration) -> Option<std::io::Result<Vec<u8>>> {
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => None,
        Ok(Ok(n)) => Some(Ok(buf[..n].to_vec())),
        Ok(Err(e)) => Some(Err(e)),
    }
}

async fn server_with_node() -> FakeApiServer {
    let api = FakeApiServer::start().await.unwrap();
    api.create("/api/v1/nodes", json!({"metadata": {"name": "n1"}}))
        .unwrap();
    api
}

#[tokio::test]
async fn a_request_caught_in_a_hang_is_never_answered_and_new_ones_are_after_it() {
    let api = server_with_node().await;
    api.set_hung(true);
    let mut caught = send_get(&api, "/api/v1/nodes/n1").await;
    assert!(
        read_within(&mut caught, Duration::from_millis(500))
            .await
            .is_none(),
        "answered while hung"
    );
    api.set_hung(false);
    let mut fresh = send_get(&api, "/api/v1/nodes/n1").await;
    let answer = read_within(&mut fresh, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        read_within(&mut caught, Duration::from_millis(500))
            .await
            .is_none(),
        "the request caught in the hang was answered after it"
    );
    assert_eq!(
        api.count("GET", "/api/v1/nodes/n1"),
        2,
        "both requests were read and recorded"
    );
}

#[tokio::test]
async fn hang_next_and_reset_next_take_one_matching_request_each() {
    let api = server_with_node().await;
    api.hang_next("GET", "/nodes/n1");
    api.reset_next("GET", "/nodes/n1");
    let mut hung = send_get(&api, "/api/v1/nodes/n1").await;
    assert!(
        read_within(&mut hung, Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut reset = send_get(&api, "/api/v1/nodes/n1").await;
    match read_within(&mut reset, Duration::from_secs(5)).await {
        Some(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        other => panic!("expected a reset, got {other:?}"),
    }
    let mut next = send_get(&api, "/api/v1/nodes/n1").await;
    let answer = read_within(&mut next, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn a_silenced_watch_neither_speaks_nor_closes_and_a_new_one_does() {
    let api = server_with_node().await;
    let path = "/api/v1/nodes?watch=true&timeoutSeconds=1";
    let mut old = send_get(&api, path).await;
    // Everything sent before the silence: the head and the node's initial ADDED event.
    let mut before = Vec::new();
    while !String::from_utf8_lossy(&before).contains("\"ADDED\"") {
        let bytes = read_within(&mut old, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(!bytes.is_empty(), "closed early");
        before.extend(bytes);
    }
    assert!(before.starts_with(b"HTTP/1.1 200"));
    // The rest of that event (its line end, the chunk's CRLF) may still be on its way: take it before
    // the silence, so only what the server sends after it counts.
    while let Some(rest) = read_within(&mut old, Duration::from_millis(300)).await {
        assert!(!rest.unwrap().is_empty(), "closed early");
    }
    api.silence_watches();
    api.patch_object(
        "nodes",
        None,
        "n1",
        json!({"metadata": {"annotations": {"a": "b"}}}),
    )
    .unwrap();
    // Past its own timeoutSeconds: a live watch would have sent the change and closed.
    assert!(
        read_within(&mut old, Duration::from_millis(2500))
            .await
            .is_none(),
        "a silenced watch sent something"
    );
    let mut new = send_get(&api, "/api/v1/nodes?watch=true").await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"a\":\"b\"") {
        let bytes = read_within(&mut new, Duration::from_secs(5))
            .await
            .expect("a new watch speaks")
            .unwrap();
        assert!(!bytes.is_empty(), "closed early");
        seen.extend(bytes);
    }
}
