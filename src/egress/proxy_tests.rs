//! The proxy end to end: real origins on 127.0.0.1, the proxy on a real Unix
//! socket, a hyper client or raw bytes from the "guest". The attacks are
//! written as attacks: each says what the guest tries and what it gets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;

/// An origin server on 127.0.0.1 that answers fixed routes and remembers
/// every request head it was sent.
struct Origin {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl Origin {
    fn start(routes: Vec<(&'static str, u16, Vec<u8>)>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let routes = Arc::new(routes);
        let (seen2, closed2, connections2) = (seen.clone(), closed.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if closed2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                connections2.fetch_add(1, Ordering::SeqCst);
                let (routes, seen) = (routes.clone(), seen2.clone());
                std::thread::spawn(move || Origin::answer(stream, &routes, &seen));
            }
        });
        Origin { port, seen, connections, closed }
    }

    fn answer(mut stream: TcpStream, routes: &[(&str, u16, Vec<u8>)], seen: &Mutex<Vec<String>>) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        seen.lock().unwrap().push(head.clone());
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let (status, body) = routes.iter().find(|r| r.0 == path).map_or((404, &b"no such route"[..]), |r| (r.1, &r.2[..]));
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: text/x-test\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if method != "HEAD" {
            let _ = stream.write_all(body);
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Stops listening: later connections are refused.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn hosts(list: &[&str]) -> Vec<AllowedHost> {
    list.iter().map(|h| h.parse().unwrap()).collect()
}

fn policy(allow: &[&str], allow_private: &[&str], mode: EgressMode) -> EgressPolicy {
    EgressPolicy { allow: hosts(allow), allow_private: hosts(allow_private), mode, download_limit: DEFAULT_DOWNLOAD_LIMIT }
}

static SOCKETS: AtomicUsize = AtomicUsize::new(0);

/// The proxy on a fresh Unix socket in `dir`.
fn start(dir: &Path, policy: EgressPolicy, cache: &DownloadCache) -> (Proxy, PathBuf) {
    let sock = dir.join(format!("proxy-{}.sock", SOCKETS.fetch_add(1, Ordering::SeqCst)));
    let listener = UnixListener::bind(&sock).unwrap();
    (Proxy::start(listener, policy, cache.clone()), sock)
}

/// A request through the proxy with a real HTTP client: the status and the
/// body (`None` if the body was cut).
async fn request(sock: &Path, method: &str, url: &str) -> (u16, Option<Vec<u8>>) {
    let stream = UnixStream::connect(sock).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let host = url.split('/').nth(2).unwrap_or("").to_string();
    let req = Request::builder().method(method).uri(url).header("host", host).body(Empty::<Bytes>::new()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok().map(|b| b.to_bytes().to_vec());
    (status, body)
}

async fn get(sock: &Path, url: &str) -> (u16, Vec<u8>) {
    let (status, body) = request(sock, "GET", url).await;
    (status, body.expect("a complete body"))
}

/// Raw bytes from the guest; what came back before the proxy closed (or 10 s).
async fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(sock).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn tmp_cache(dir: &Path, name: &str) -> DownloadCache {
    DownloadCache::at(dir.join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_export_import_replay_without_the_origin() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec()), ("/gone", 404, b"nope".to_vec()), ("/same", 304, Vec::new())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "recorded");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    assert_eq!(get(&sock, &origin.url("/a")).await, (200, b"alpha".to_vec()));
    assert_eq!(get(&sock, &origin.url("/gone")).await, (404, b"nope".to_vec()));
    assert_eq!(get(&sock, &origin.url("/same")).await.0, 304);
    assert_eq!(request(&sock, "HEAD", &origin.url("/a")).await.0, 200);
    let seen = origin.seen.lock().unwrap().clone();
    assert!(seen[0].starts_with("GET /a HTTP/1.1\r\n"), "origin form upstream: {seen:?}");
    assert!(seen[0].to_ascii_lowercase().contains(&format!("host: {}", origin.host())), "{seen:?}");
    let report = proxy.finish().await;
    let summary: Vec<(&str, &str, u16, u64)> =
        report.downloads.iter().map(|d| (d.method.as_str(), d.url.as_str(), d.status, d.size)).collect();
    let (a, gone, same) = (origin.url("/a"), origin.url("/gone"), origin.url("/same"));
    assert_eq!(
        summary,
        vec![("GET", a.as_str(), 200, 5), ("GET", gone.as_str(), 404, 4), ("GET", same.as_str(), 304, 0), ("HEAD", a.as_str(), 200, 0)]
    );
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    for d in &report.downloads {
        cache.verify(d).unwrap();
    }

    let file = tmp.path().join("downloads.tar");
    export(&cache, &report.downloads, &file).unwrap();
    let fresh = tmp_cache(tmp.path(), "fresh");
    let manifest = import(&fresh, &file).unwrap();
    origin.close();
    let before = origin.requests();

    // No allow list at all: in replay the recorded requests are the list.
    let mode = EgressMode::Replay { downloads: manifest.clone(), fetch_missing: false };
    let (proxy, sock) = start(tmp.path(), policy(&[], &[], mode), &fresh);
    assert_eq!(get(&sock, &origin.url("/a")).await, (200, b"alpha".to_vec()));
    assert_eq!(get(&sock, &origin.url("/gone")).await, (404, b"nope".to_vec()));
    let (status, body) = get(&sock, &origin.url("/never")).await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (403, format!("reprovm egress: replay: {} was not recorded\n", origin.url("/never")))
    );
    let connect = raw(&sock, format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.host()).as_bytes()).await;
    assert!(connect.starts_with("HTTP/1.1 403"), "{connect}");
    let report = proxy.finish().await;
    assert_eq!(origin.requests(), before, "replay never touched the network");
    assert_eq!(report.downloads, manifest[..2], "the replayed build records what it was served");
    assert_eq!(report.refused.len(), 2, "{:?}", report.refused);
    report.check_hashes().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_tampered_cache_entry_is_a_hash_mismatch() {
    use std::os::unix::fs::PermissionsExt;
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    get(&sock, &origin.url("/a")).await;
    let downloads = proxy.finish().await.downloads;
    let entry = cache.path_of(&downloads[0].sha256).unwrap();
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&entry, b"alpHa").unwrap();

    let mode = EgressMode::Replay { downloads: downloads.clone(), fetch_missing: true };
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], mode), &cache);
    let (status, body) = get(&sock, &origin.url("/a")).await;
    assert_eq!(status, 502);
    assert!(String::from_utf8(body).unwrap().contains("hash mismatch"));
    let report = proxy.finish().await;
    match report.check_hashes() {
        Err(e @ EgressError::HashMismatch { .. }) => {
            assert_eq!(crate::ExitCode::exit(&e), crate::Exit::PinMismatch);
            assert!(e.to_string().contains(&origin.url("/a")) && e.to_string().contains(&downloads[0].sha256), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_missing_stores_right_bytes_and_refuses_wrong_ones() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let recorded = tmp_cache(tmp.path(), "recorded");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &recorded);
    get(&sock, &origin.url("/a")).await;
    let good = proxy.finish().await.downloads;

    // Missing, not fetched: 502 naming the hash.
    let empty = tmp_cache(tmp.path(), "empty");
    let mode = EgressMode::Replay { downloads: good.clone(), fetch_missing: false };
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], mode), &empty);
    let (status, body) = get(&sock, &origin.url("/a")).await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (502, format!("reprovm egress: missing from the download cache: {}\n", good[0].sha256))
    );
    proxy.finish().await.check_hashes().unwrap();

    // Missing, but its host is on no allow list: not fetched.
    let before = origin.requests();
    let mode = EgressMode::Replay { downloads: good.clone(), fetch_missing: true };
    let (proxy, sock) = start(tmp.path(), policy(&[], &[], mode), &empty);
    assert_eq!(get(&sock, &origin.url("/a")).await.0, 403);
    proxy.finish().await;
    assert_eq!(origin.requests(), before, "a host off the lists is never contacted");

    // Missing, fetched, right bytes: served and stored.
    let mode = EgressMode::Replay { downloads: good.clone(), fetch_missing: true };
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], mode), &empty);
    assert_eq!(get(&sock, &origin.url("/a")).await, (200, b"alpha".to_vec()));
    let report = proxy.finish().await;
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    empty.verify(&good[0]).unwrap();

    // Missing, fetched, wrong bytes: 502, a hash mismatch, nothing stored.
    let wrong = vec![Download { sha256: "0".repeat(64), ..good[0].clone() }];
    let other = tmp_cache(tmp.path(), "other");
    let mode = EgressMode::Replay { downloads: wrong, fetch_missing: true };
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], mode), &other);
    assert_eq!(get(&sock, &origin.url("/a")).await.0, 502);
    let report = proxy.finish().await;
    assert!(matches!(report.check_hashes(), Err(EgressError::HashMismatch { .. })), "{report:?}");
    assert_eq!(std::fs::read_dir(other.dir()).unwrap().count(), 0, "nothing enters the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_outside_the_allow_list_and_names_for_loopback_reach_nothing() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let localhost = format!("localhost:{}", origin.port);
    let (proxy, sock) = start(tmp.path(), policy(&[&localhost, &origin.host()], &[], EgressMode::Record), &cache);

    let (status, body) = get(&sock, "http://example.org/x").await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (403, "reprovm egress: example.org:80 is not in the build's allow list (build.network.allow)\n".to_string())
    );
    // A recipe naming `localhost` or the loopback address itself.
    for url in [format!("http://localhost:{}/a", origin.port), origin.url("/a")] {
        let (status, body) = get(&sock, &url).await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(status, 403, "{url}: {body}");
        assert!(body.contains("127.0.0.1") || body.contains("::1"), "the reason names the address: {body}");
    }
    let connect = raw(&sock, format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.host()).as_bytes()).await;
    assert!(connect.starts_with("HTTP/1.1 403"), "{connect}");
    let connect = raw(&sock, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n").await;
    assert!(connect.starts_with("HTTP/1.1 403"), "{connect}");
    let report = proxy.finish().await;
    assert_eq!(origin.connections.load(Ordering::SeqCst), 0, "nothing connected to the local origin");
    assert!(report.downloads.is_empty() && report.tunnels.is_empty());
    assert_eq!(report.refused.len(), 5, "{:?}", report.refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_an_allowed_host_are_counted_not_recorded() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    let mut stream = UnixStream::connect(&sock).await.unwrap();
    stream.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.host()).as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let inner = b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(inner).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(answer.ends_with(b"alpha"), "{}", String::from_utf8_lossy(&answer));
    drop(stream);
    let report = proxy.finish().await;
    assert!(report.downloads.is_empty());
    assert_eq!(
        report.tunnels,
        vec![Tunnel { host: "127.0.0.1".into(), port: origin.port, bytes_up: inner.len() as u64, bytes_down: answer.len() as u64 }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unproxied_requests_are_refused() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    let host = origin.host();
    for (request, status) in [
        (format!("GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"), "400"),
        (format!("POST http://{host}/a HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc"), "405"),
        (format!("DELETE http://{host}/a HTTP/1.1\r\nHost: {host}\r\n\r\n"), "405"),
        (format!("GET https://{host}/a HTTP/1.1\r\nHost: {host}\r\n\r\n"), "400"),
        (format!("GET http://user@{host}/a HTTP/1.1\r\nHost: {host}\r\n\r\n"), "400"),
        (format!("GET ftp://{host}/a HTTP/1.1\r\nHost: {host}\r\n\r\n"), "400"),
    ] {
        let answer = raw(&sock, request.as_bytes()).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{request:?} -> {answer}");
    }
    proxy.finish().await;
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_huge_headers_get_431_and_the_next_client_is_served() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    let attack = format!("GET {} HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n", origin.url("/a"), origin.host(), "a".repeat(100 << 10));
    let answer = raw(&sock, attack.as_bytes()).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(origin.requests(), 0);
    assert_eq!(get(&sock, &origin.url("/a")).await, (200, b"alpha".to_vec()));
    proxy.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_request_bodies_announced_huge_or_endless_are_refused_unread() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    let (url, host) = (origin.url("/a"), origin.host());

    let ten_gib = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n", 10u64 << 30);
    let answer = raw(&sock, ten_gib.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // An endless chunked body: the proxy answers and closes; the guest's writes then fail.
    let stream = UnixStream::connect(&sock).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = format!("POST {url} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let flood = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
        let mut sent = 0u64;
        loop {
            writer.write_all(chunk.as_bytes()).await?;
            sent += 0x1000;
            if sent > 1 << 30 {
                return Ok::<u64, std::io::Error>(sent);
            }
        }
    });
    let mut answer = Vec::new();
    // The proxy closes with the flood unread: the end may be a reset, after the answer.
    let _ = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut answer)).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    drop(reader);
    let flooded = tokio::time::timeout(Duration::from_secs(20), flood).await.unwrap().unwrap();
    assert!(flooded.is_err(), "the proxy stopped reading: {flooded:?}");
    proxy.finish().await;
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_request_smuggling_is_refused_and_nothing_reaches_the_origin() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec()), ("/smuggled", 200, b"gotcha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    let (url, host) = (origin.url("/a"), origin.host());
    let smuggled = format!("GET {} HTTP/1.1\r\nHost: {host}\r\n\r\n", origin.url("/smuggled"));
    for framing in [
        format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", smuggled.len() + 5),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {}\r\n", smuggled.len() + 5),
        format!("Content-Length: 0\r\nContent-Length: {}\r\n", smuggled.len()),
        format!("Content-Length: {0}\r\nContent-Length: {0}\r\n", smuggled.len()),
        format!("Content-Length: {}\r\n", smuggled.len()),
        "Transfer-Encoding: gzip\r\n".to_string(),
    ] {
        let body = if framing.contains("chunked") { format!("0\r\n\r\n{smuggled}") } else { smuggled.clone() };
        let attack = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n{body}");
        let answer = raw(&sock, attack.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing:?} -> {answer}");
        assert!(!answer.contains("gotcha") && !answer.contains("alpha"), "{framing:?} -> {answer}");
    }
    proxy.finish().await;
    assert_eq!(origin.connections.load(Ordering::SeqCst), 0, "the origin saw no connection: {:?}", origin.seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_the_download_limit_stops_a_big_body() {
    let origin = Origin::start(vec![("/big", 200, vec![7u8; 4 << 20])]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let mut limited = policy(&[], &[&origin.host()], EgressMode::Record);
    limited.download_limit = 256 << 10;
    let (proxy, sock) = start(tmp.path(), limited, &cache);
    let (status, body) = request(&sock, "GET", &origin.url("/big")).await;
    assert_eq!(status, 200);
    assert!(body.is_none(), "the body is cut, not ended cleanly");
    assert_eq!(get(&sock, &origin.url("/big")).await.0, 507, "no budget left");
    let report = proxy.finish().await;
    assert!(report.downloads.is_empty());
    assert!(report.refused.iter().all(|r| r.status == 507 && r.reason.contains("download limit")), "{:?}", report.refused);
    assert_eq!(report.refused.len(), 2, "{:?}", report.refused);
    assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 0, "nothing partial enters the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_hundred_concurrent_clients_and_idle_connections_do_not_stop_it() {
    let origin = Origin::start(vec![("/a", 200, b"alpha".to_vec())]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    // Connections that never finish their request hold slots until finish.
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"GET http://").await.unwrap();
        idle.push(s);
    }
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let (sock, url) = (sock.clone(), origin.url("/a"));
            tokio::spawn(async move { get(&sock, &url).await })
        })
        .collect();
    for client in clients {
        assert_eq!(tokio::time::timeout(Duration::from_secs(60), client).await.unwrap().unwrap(), (200, b"alpha".to_vec()));
    }
    let report = tokio::time::timeout(Duration::from_secs(10), proxy.finish()).await.expect("finish ends idle connections");
    assert_eq!(report.downloads.len(), 1, "one URL, one download: {:?}", report.downloads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_guest_abandons_is_recorded_incomplete_not_as_a_download() {
    let origin = Origin::start(vec![("/big", 200, vec![7u8; 8 << 20])]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp_cache(tmp.path(), "c");
    let (proxy, sock) = start(tmp.path(), policy(&[], &[&origin.host()], EgressMode::Record), &cache);
    let mut stream = UnixStream::connect(&sock).await.unwrap();
    stream.write_all(format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", origin.url("/big"), origin.host()).as_bytes()).await.unwrap();
    let mut some = vec![0u8; 4096];
    stream.read_exact(&mut some).await.unwrap();
    assert!(some.starts_with(b"HTTP/1.1 200"));
    drop(stream);
    let report = tokio::time::timeout(Duration::from_secs(20), proxy.finish()).await.unwrap();
    assert!(report.downloads.is_empty(), "{:?}", report.downloads);
    assert_eq!(report.refused.len(), 1, "{:?}", report.refused);
    assert!(report.refused[0].reason.starts_with("incomplete:"), "{:?}", report.refused);
    assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 0, "nothing partial enters the cache");
}
