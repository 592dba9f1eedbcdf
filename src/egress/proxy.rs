//! The HTTP forward proxy the guest uses (`http_proxy`): absolute-form GET
//! and HEAD to allowed hosts are fetched (record), recorded ones are served
//! from the cache whatever the allow list (replay; a missing entry is
//! fetched only from an allowed host), CONNECT to allowed hosts is
//! tunnelled unrecorded (record only),
//! everything else is refused with a one-line reason and recorded. The guest
//! is hostile: headers, bodies, connections and downloads are capped, and a
//! name is resolved once and the vetted address itself is connected to.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::egress::cache::{CacheWriter, DownloadCache};
use crate::egress::policy::{canonical_host, forbidden_reason, Allowed, EgressMode, EgressPolicy};
use crate::egress::report::{mismatch_reason, Download, EgressReport, Recorder, Tunnel};
use crate::egress::EgressError;
use crate::escape::escape;

/// The most bytes of request line and headers read from the guest: 64 KiB (then 431).
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Request bodies announced larger than this (1 MiB) are refused (413) unread.
pub const MAX_REQUEST_BODY: u64 = 1 << 20;
/// Guest connections served at once (tunnels included); more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// How long resolving a name or connecting to an address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upstream server may take to send its response head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the guest may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes read from a cache entry at a time.
const READ_CHUNK: usize = 64 << 10;
/// How long [`Proxy::finish`] lets open connections end by themselves.
pub const FINISH_GRACE: Duration = Duration::from_secs(5);

/// A response body to the guest.
type Body = UnsyncBoxBody<Bytes, io::Error>;
/// A refusal before a response was sent: the status and the reason.
type Refused = (StatusCode, String);

/// State shared by the accept loop and every connection.
struct Shared {
    policy: EgressPolicy,
    /// In replay: the recorded download for each (method, URL), the first in sort order.
    replay: BTreeMap<(String, String), Download>,
    fetch_missing: bool,
    cache: DownloadCache,
    recorder: Recorder,
    downloaded: AtomicU64,
    stop: watch::Receiver<bool>,
}

impl Shared {
    /// Counts `n` more downloaded bytes; false once past the limit.
    fn charge(&self, n: u64) -> bool {
        self.downloaded.fetch_add(n, Ordering::Relaxed).saturating_add(n) <= self.policy.download_limit
    }

    /// Whether no download budget is left.
    fn exhausted(&self) -> bool {
        self.downloaded.load(Ordering::Relaxed) >= self.policy.download_limit
    }

    fn limit_reason(&self) -> String {
        format!("the run's download limit of {} bytes is reached", self.policy.download_limit)
    }

    /// Resolves once when the proxy is told to stop.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// Records the refusal and answers it with a one-line plain-text body.
    fn refuse(&self, method: &Method, target: &str, (status, reason): Refused) -> Response<Body> {
        let body = format!("reprovm egress: {reason}\n");
        self.recorder.refuse(method.as_str(), target, status.as_u16(), reason);
        let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// One guest connection's context: what its tasks hold so that the
/// connection cap and [`Proxy::finish`] account for them.
#[derive(Clone)]
struct Conn {
    shared: Arc<Shared>,
    _permit: Arc<OwnedSemaphorePermit>,
    _alive: mpsc::Sender<()>,
}

/// A running proxy; [`Proxy::finish`] stops it and returns its report.
pub struct Proxy {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    alive: mpsc::Receiver<()>,
}

impl Proxy {
    /// Serves the proxy on `listener` (a Unix socket: each accepted
    /// connection is one guest TCP connection) until [`Proxy::finish`].
    /// Must be called inside a Tokio runtime.
    pub fn start(listener: UnixListener, policy: EgressPolicy, cache: DownloadCache) -> Proxy {
        let (replay, fetch_missing) = match &policy.mode {
            EgressMode::Record => (BTreeMap::new(), false),
            EgressMode::Replay { downloads, fetch_missing } => {
                let mut sorted = downloads.clone();
                sorted.sort();
                let mut replay = BTreeMap::new();
                for d in sorted {
                    replay.entry((d.method.clone(), d.url.clone())).or_insert(d);
                }
                (replay, *fetch_missing)
            }
        };
        let (stop_tx, stop) = watch::channel(false);
        let (alive_tx, alive) = mpsc::channel(1);
        let shared =
            Arc::new(Shared { policy, replay, fetch_missing, cache, recorder: Recorder::default(), downloaded: AtomicU64::new(0), stop });
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), alive_tx));
        Proxy { shared, stop: stop_tx, accept, alive }
    }

    /// Stops accepting, lets the connections end as the guest's did (a body
    /// the guest received whole is still being hashed and committed) for up
    /// to [`FINISH_GRACE`], then ends the rest (a body cut short is recorded
    /// as an incomplete refusal, not a download) and returns what happened.
    pub async fn finish(mut self) -> EgressReport {
        self.accept.abort();
        let _ = (&mut self.accept).await;
        // Every connection and task holds a sender: recv() is None once all are gone.
        let alive = &mut self.alive;
        if tokio::time::timeout(FINISH_GRACE, async { while alive.recv().await.is_some() {} }).await.is_err() {
            let _ = self.stop.send(true);
            while self.alive.recv().await.is_some() {}
        }
        self.shared.recorder.take()
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, alive: mpsc::Sender<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shared.stopped() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.stopped() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let conn = Conn { shared: shared.clone(), _permit: Arc::new(permit), _alive: alive.clone() };
                tokio::spawn(serve(conn, stream));
            }
            Err(e) => {
                // Out of descriptors or similar: do not spin.
                tracing::warn!("egress proxy: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(conn: Conn, stream: UnixStream) {
    let stopped = conn.shared.stopped();
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = service_conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(2 * MAX_HEADER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        result = connection => if let Err(e) = result {
            tracing::debug!("egress proxy: guest connection ended: {}", escape(&e.to_string()));
        },
        () = stopped => {}
    }
}

/// `host` as it goes into a URL or `host:port`: IPv6 in brackets.
fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

async fn handle(conn: Conn, req: Request<Incoming>) -> Response<Body> {
    let shared = &conn.shared;
    let method = req.method().clone();
    let target = req.uri().to_string();
    let refuse = |refused: Refused| shared.refuse(&method, &target, refused);
    if method == Method::CONNECT {
        return connect(conn.clone(), req).await;
    }
    // Framing: only GET and HEAD are proxied, and they carry no body. A body
    // is never read, so none can be smuggled in as a second request.
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        return refuse((StatusCode::BAD_REQUEST, "request bodies with Transfer-Encoding are not accepted".into()));
    }
    let length = match req.headers().get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok())) {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return refuse((StatusCode::BAD_REQUEST, "malformed Content-Length".into())),
    };
    if length > MAX_REQUEST_BODY {
        return refuse((StatusCode::PAYLOAD_TOO_LARGE, format!("request body of {length} bytes refused (at most {MAX_REQUEST_BODY})")));
    }
    if method != Method::GET && method != Method::HEAD {
        return refuse((StatusCode::METHOD_NOT_ALLOWED, format!("{} is not proxied: only GET, HEAD and CONNECT", escape(method.as_str()))));
    }
    if length > 0 {
        return refuse((StatusCode::BAD_REQUEST, format!("{method} with a request body is not proxied")));
    }
    let uri = req.uri();
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(a)) if !a.as_str().contains('@') => a.clone(),
        (Some("https"), _) => return refuse((StatusCode::BAD_REQUEST, "https:// URLs go through CONNECT".into())),
        _ => return refuse((StatusCode::BAD_REQUEST, "requests must name an http:// URL (absolute form, as to a proxy)".into())),
    };
    let Some(host) = canonical_host(authority.host()) else {
        return refuse((StatusCode::BAD_REQUEST, "not a valid host name".into()));
    };
    let port = authority.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let port_part = if port == 80 { String::new() } else { format!(":{port}") };
    let url = format!("http://{}{port_part}{path}", url_host(&host));
    let refuse = |refused: Refused| shared.refuse(&method, &url, refused);
    // In replay the recorded requests are the allow list: the network is
    // not used (except by `fetch`, which checks the lists itself).
    let allowed = shared.policy.allowed(&host, port, false);
    if allowed == Allowed::No && matches!(shared.policy.mode, EgressMode::Record) {
        return refuse(not_allowed(&host, port));
    }
    let upstream = Upstream { host, port, allowed, authority: authority.as_str().to_string(), path };
    let mut headers = req.headers().clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    match &shared.policy.mode {
        EgressMode::Record => match forward(&conn, &method, &url, &upstream, headers).await {
            Ok(response) => response,
            Err(refused) => refuse(refused),
        },
        EgressMode::Replay { .. } => match replay(&conn, &method, &url, &upstream).await {
            Ok(response) => response,
            Err(refused) => refuse(refused),
        },
    }
}

fn not_allowed(host: &str, port: u16) -> Refused {
    (StatusCode::FORBIDDEN, format!("{}:{port} is not in the build's allow list (build.network.allow)", url_host(host)))
}

/// Removes the hop-by-hop headers (and those `Connection` names) and every `Proxy-*` header.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let proxy: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    let fixed = [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
    ];
    for name in named.into_iter().chain(proxy).chain(fixed) {
        headers.remove(name);
    }
}

/// Where a request goes.
struct Upstream {
    /// Canonical host.
    host: String,
    port: u16,
    allowed: Allowed,
    /// The authority as requested: the upstream `Host` header.
    authority: String,
    /// Path and query.
    path: String,
}

/// Resolves `host` once, skips every forbidden address unless the host is
/// allowed private, and connects to a vetted address itself.
async fn vet_connect(host: &str, port: u16, allowed: Allowed) -> Result<TcpStream, Refused> {
    let bad_gateway = |reason: String| (StatusCode::BAD_GATEWAY, reason);
    let addrs: Vec<SocketAddr> = match timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return Err(bad_gateway(format!("cannot resolve {host}: {e}"))),
        Err(_) => return Err(bad_gateway(format!("resolving {host} timed out"))),
    };
    let mut forbidden = None;
    let mut failed = None;
    for addr in addrs {
        if allowed != Allowed::Private {
            if let Some(why) = forbidden_reason(addr.ip()) {
                forbidden.get_or_insert_with(|| {
                    format!("{host} resolves to {}, {why}: only hosts allowed on the command line may reach it", addr.ip())
                });
                continue;
            }
        }
        match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => failed = Some(format!("cannot connect to {addr}: {e}")),
            Err(_) => failed = Some(format!("connecting to {addr} timed out")),
        }
    }
    Err(match (failed, forbidden) {
        (Some(failed), _) => bad_gateway(failed),
        (None, Some(forbidden)) => (StatusCode::FORBIDDEN, forbidden),
        (None, None) => bad_gateway(format!("{host} has no address")),
    })
}

/// Sends `method` for `up` with `headers` (hop-by-hop ones already removed)
/// on a fresh connection to a vetted address.
async fn send(conn: &Conn, method: &Method, up: &Upstream, mut headers: HeaderMap) -> Result<Response<Incoming>, Refused> {
    let stream = vet_connect(&up.host, up.port, up.allowed).await?;
    let bad_gateway = |e: hyper::Error| (StatusCode::BAD_GATEWAY, format!("upstream {}: {e}", url_host(&up.host)));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(bad_gateway)?;
    let stopped = conn.shared.stopped();
    tokio::spawn(async move {
        tokio::select! {
            _ = connection => {}
            () = stopped => {}
        }
    });
    let host = HeaderValue::from_str(&up.authority).map_err(|_| (StatusCode::BAD_REQUEST, "not a valid host".to_string()))?;
    headers.insert(header::HOST, host);
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.method_mut() = method.clone();
    *request.uri_mut() = up.path.parse().map_err(|_| (StatusCode::BAD_REQUEST, "not a valid path".to_string()))?;
    *request.headers_mut() = headers;
    match timeout(RESPONSE_TIMEOUT, sender.send_request(request)).await {
        Ok(result) => result.map_err(bad_gateway),
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream {} sent no response in {} s", url_host(&up.host), RESPONSE_TIMEOUT.as_secs()),
        )),
    }
}

/// A body that did not complete: the status to record and why.
type Cut = (u16, String);

/// Copies `body` into the cache `writer` (and to the guest through `guest`,
/// if given), charging the download limit. On failure the guest's body gets
/// an error, so its connection is cut rather than ended cleanly.
async fn pump(
    shared: &Shared,
    mut body: Incoming,
    mut writer: CacheWriter,
    guest: Option<&mpsc::Sender<io::Result<Frame<Bytes>>>>,
    status: u16,
) -> Result<CacheWriter, Cut> {
    let cut = |reason: String| async move {
        if let Some(guest) = guest {
            let _ = guest.send(Err(io::Error::other(reason.clone()))).await;
        }
        Err((status, reason))
    };
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = shared.stopped() => return cut("incomplete: the proxy stopped".into()).await,
        };
        let data = match frame {
            None => return Ok(writer),
            Some(Err(e)) => return cut(format!("incomplete: upstream: {e}")).await,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers
            },
        };
        if !shared.charge(data.len() as u64) {
            return cut(format!("incomplete: {}", shared.limit_reason())).await.map_err(|(_, r)| (507, r));
        }
        // The guest gets the chunk first: sending it (a buffered channel)
        // overlaps with hashing and writing it into the cache.
        if let Some(guest) = guest {
            if guest.send(Ok(Frame::data(data.clone()))).await.is_err() {
                return cut("incomplete: the guest closed the connection".into()).await;
            }
        }
        let written = blocking(move || {
            let result = writer.write(&data);
            (writer, result)
        })
        .await;
        writer = match written {
            Ok((writer, Ok(()))) => writer,
            Ok((_, Err(e))) => return cut(format!("incomplete: download cache: {e}")).await,
            Err(e) => return cut(format!("incomplete: {e}")).await,
        };
    }
}

/// Record mode: forwards the request, streams the response to the guest and
/// records it once its body is complete.
async fn forward(conn: &Conn, method: &Method, url: &str, up: &Upstream, headers: HeaderMap) -> Result<Response<Body>, Refused> {
    let shared = &conn.shared;
    if shared.exhausted() {
        return Err((StatusCode::INSUFFICIENT_STORAGE, shared.limit_reason()));
    }
    let writer = shared.cache.writer().map_err(|e| (StatusCode::BAD_GATEWAY, format!("download cache: {e}")))?;
    let response = send(conn, method, up, headers).await?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let (tx, rx) = mpsc::channel(16);
    let task = (conn.clone(), method.to_string(), url.to_string(), parts.status.as_u16());
    tokio::spawn(async move {
        let (conn, method, url, status) = task;
        let shared = &conn.shared;
        match pump(shared, body, writer, Some(&tx), status).await {
            Ok(writer) => {
                let (sha256, size) = (writer.sha256(), writer.size());
                match blocking(move || writer.commit()).await {
                    Ok(Ok(())) => shared.recorder.download(Download { method, url, status, size, sha256 }),
                    Ok(Err(e)) => shared.recorder.refuse(&method, &url, status, format!("download cache: {e}")),
                    Err(e) => shared.recorder.refuse(&method, &url, status, e),
                }
            }
            Err((status, reason)) => shared.recorder.refuse(&method, &url, status, reason),
        }
        // The guest sees the end of the body only now, after the download is recorded.
        drop(tx);
    });
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Replay mode: serves the recorded download from the cache, re-hashed.
async fn replay(conn: &Conn, method: &Method, url: &str, up: &Upstream) -> Result<Response<Body>, Refused> {
    let shared = &conn.shared;
    let Some(download) = shared.replay.get(&(method.to_string(), url.to_string())).cloned() else {
        return Err((StatusCode::FORBIDDEN, format!("replay: {url} was not recorded")));
    };
    let status = StatusCode::from_u16(download.status)
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| (StatusCode::BAD_GATEWAY, format!("replay: recorded status {} cannot be served", download.status)))?;
    let file = match open_verified(&shared.cache, &download).await? {
        Err(EgressError::NotCached { .. }) if shared.fetch_missing => {
            fetch(conn, method, &download, up).await?;
            open_verified(&shared.cache, &download).await?
        }
        other => other,
    };
    let file = file.map_err(|e| match e {
        EgressError::HashMismatch { expected, actual, .. } => (StatusCode::BAD_GATEWAY, mismatch_reason(&expected, &actual)),
        EgressError::NotCached { sha256, .. } => (StatusCode::BAD_GATEWAY, format!("missing from the download cache: {sha256}")),
        other => (StatusCode::BAD_GATEWAY, format!("download cache: {other}")),
    })?;
    let file = tokio::fs::File::from_std(file);
    let body = StreamBody::new(futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let n = file.read_buf(&mut buf).await?;
        Ok((n > 0).then(|| (Frame::data(buf.freeze()), file)))
    }));
    let mut response = Response::new(body.boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(download.size));
    // The replayed build's result lists what it was served, as a recording
    // build's does (so it can itself be replayed and compared).
    shared.recorder.download(download);
    Ok(response)
}

/// Runs blocking cache work (hashing, writing, renaming) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("download cache: {e}"))
}

/// The cache entry for `download`, re-hashed (see [`DownloadCache::open_verified`]).
async fn open_verified(cache: &DownloadCache, download: &Download) -> Result<Result<std::fs::File, EgressError>, Refused> {
    let (cache, download) = (cache.clone(), download.clone());
    blocking(move || cache.open_verified(&download)).await.map_err(|e| (StatusCode::BAD_GATEWAY, e))
}

/// Replay with `fetch_missing`: fetches a recorded download that is missing
/// from the cache (from an allowed host only), and stores it only if it
/// hashes as recorded.
async fn fetch(conn: &Conn, method: &Method, download: &Download, up: &Upstream) -> Result<(), Refused> {
    let shared = &conn.shared;
    if up.allowed == Allowed::No {
        return Err(not_allowed(&up.host, up.port));
    }
    let writer = shared.cache.writer().map_err(|e| (StatusCode::BAD_GATEWAY, format!("download cache: {e}")))?;
    let response = send(conn, method, up, HeaderMap::new()).await?;
    let writer = pump(shared, response.into_body(), writer, None, 502)
        .await
        .map_err(|(status, reason)| (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), reason))?;
    let actual = writer.sha256();
    if actual != download.sha256 {
        return Err((StatusCode::BAD_GATEWAY, mismatch_reason(&download.sha256, &actual)));
    }
    match blocking(move || writer.commit()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("download cache: {e}"))),
        Err(e) => Err((StatusCode::BAD_GATEWAY, e)),
    }
}

/// CONNECT: a tunnel to an allowed host in record mode, refused in replay.
async fn connect(conn: Conn, req: Request<Incoming>) -> Response<Body> {
    let shared = conn.shared.clone();
    let target = req.uri().to_string();
    let refuse = |refused: Refused| shared.refuse(&Method::CONNECT, &target, refused);
    let (Some(authority), None) = (req.uri().authority(), req.uri().scheme()) else {
        return refuse((StatusCode::BAD_REQUEST, "CONNECT needs host:port".into()));
    };
    let (Some(host), Some(port)) = (canonical_host(authority.host()), authority.port_u16()) else {
        return refuse((StatusCode::BAD_REQUEST, "CONNECT needs host:port".into()));
    };
    let target = format!("{}:{port}", url_host(&host));
    let refuse = |refused: Refused| shared.refuse(&Method::CONNECT, &target, refused);
    if let EgressMode::Replay { .. } = shared.policy.mode {
        return refuse((StatusCode::FORBIDDEN, format!("replay: CONNECT {target} cannot be replayed (HTTPS is not recorded)")));
    }
    let allowed = shared.policy.allowed(&host, port, true);
    if allowed == Allowed::No {
        return refuse(not_allowed(&host, port));
    }
    if shared.exhausted() {
        return refuse((StatusCode::INSUFFICIENT_STORAGE, shared.limit_reason()));
    }
    let upstream = match vet_connect(&host, port, allowed).await {
        Ok(stream) => stream,
        Err(refused) => return refuse(refused),
    };
    let stopped = shared.stopped();
    tokio::spawn(async move {
        let shared = &conn.shared;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!("egress proxy: CONNECT {target} not upgraded: {e}"),
        };
        let mut guest = TokioIo::new(upgraded);
        let mut upstream = Metered { inner: upstream, shared: shared.clone(), up: 0, down: 0 };
        let result = tokio::select! {
            result = tokio::io::copy_bidirectional(&mut guest, &mut upstream) => result.map(drop),
            () = stopped => Ok(()),
        };
        if let Err(e) = result {
            if shared.exhausted() {
                shared.recorder.refuse("CONNECT", &target, 507, format!("tunnel cut: {}", shared.limit_reason()));
            } else {
                tracing::debug!("egress proxy: tunnel to {target} ended: {e}");
            }
        }
        shared.recorder.tunnel(Tunnel { host, port, bytes_up: upstream.up, bytes_down: upstream.down });
        drop(conn);
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
}

/// The upstream side of a tunnel: counts the bytes both ways, charges those
/// read from it to the download limit, and fails reads past it.
struct Metered {
    inner: TcpStream,
    shared: Arc<Shared>,
    up: u64,
    down: u64,
}

impl AsyncRead for Metered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        this.down += n;
        if n > 0 && !this.shared.charge(n) {
            return Poll::Ready(Err(io::Error::other(this.shared.limit_reason())));
        }
        poll
    }
}

impl AsyncWrite for Metered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.up += n as u64;
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
