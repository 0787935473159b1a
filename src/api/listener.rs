//! The API's server loop: it accepts connections, serves HTTP/1 on them, and bounds what a
//! client can hold.
//!
//! - At most `server.max_connections` connections are served at once. A slot is taken before
//!   `accept`, so beyond the limit new connections wait in the kernel's backlog while the
//!   connections already accepted, and the monitors' own, keep their file descriptors.
//! - A request's headers must arrive within `server.header_timeout` (hyper's header read
//!   timeout, which also ends idle keep-alive connections), its body within
//!   `server.request_timeout`. A client that was part-way through a request is told so with a
//!   408 before its connection closes.
//! - hyper writes a response, or the next server-sent event, only as fast as the client reads,
//!   and has no write timeout of its own: a write that cannot make progress for
//!   [`WRITE_STALL_LIMIT`] fails, and the connection is closed ([`StallGuard`]).
//!
//! axum's own `axum::serve` offers none of the first two, hence this loop.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Sleep;

use super::ApiError;

/// Far above any healthy client's pause, far below TCP's own give-up time (minutes).
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(30);
/// How long a client that stopped sending its request is given to take the 408.
const LATE_ANSWER_LIMIT: Duration = Duration::from_secs(1);
/// How often "every connection slot is taken" may be logged while it stays true.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// What the API's connections may hold and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once, event streams included.
    pub max_connections: usize,
    /// Time to send a request's headers, and the longest an idle connection stays open.
    pub header_timeout: Duration,
    /// Time to send a request's body, counted from the end of its headers.
    pub request_timeout: Duration,
}

/// The API's TCP listener.
pub struct ApiListener {
    inner: TcpListener,
}

impl ApiListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener) -> Self {
        Self { inner }
    }

    /// The next connection, with its writes guarded against a client that stops reading.
    async fn accept(&mut self) -> (StallGuard<TcpStream>, SocketAddr) {
        // axum's accept retries, logs and backs off from errors such as running out of file
        // descriptors.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Events are small writes that must not wait for Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        (StallGuard::new(stream, WRITE_STALL_LIMIT), addr)
    }
}

/// Serves `app` on `listener` until `stop` turns true, then stops accepting, lets every open
/// connection finish the request it is serving, and returns once the last one has closed.
/// Handlers see the client's address as axum's `ConnectInfo<SocketAddr>`.
pub async fn serve(
    mut listener: ApiListener,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let slot_count = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(slot_count as usize));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut warned_full: Option<Instant> = None;
    loop {
        if slots.available_permits() == 0
            && warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_INTERVAL)
        {
            tracing::warn!(
                max_connections = limits.max_connections,
                "every API connection slot is taken; new connections wait until one closes"
            );
            warned_full = Some(Instant::now());
        }
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
            () = stopping(&mut stop) => break,
        };
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopping(&mut stop) => break,
        };
        let service = ApiService {
            app: app.clone(),
            remote,
            request_timeout: limits.request_timeout,
        };
        let connection = http.serve_connection(TokioIo::new(io), service);
        tokio::spawn(serve_connection(connection, remote, stop.clone(), slot));
    }
    // Refuse new connections while the open ones finish.
    drop(listener);
    // Every slot free again means every connection has closed.
    let _ = slots.acquire_many(slot_count).await;
}

/// Resolves once the daemon is stopping; never, if the sender is dropped without saying so.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}

type ApiConnection = http1::Connection<TokioIo<StallGuard<TcpStream>>, ApiService>;

/// Drives one connection to its end; its slot is freed when this returns.
async fn serve_connection(
    mut connection: ApiConnection,
    remote: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let mut draining = false;
    let ended = loop {
        tokio::select! {
            ended = &mut connection => break ended,
            // Finishes the request in progress, then closes; an idle connection closes now.
            // Polling the connection again polls the answer of the request in progress: a
            // deferred answer learns of the stop that way, without a waiter of its own.
            () = stopping(&mut stop), if !draining => {
                Pin::new(&mut connection).graceful_shutdown();
                draining = true;
            }
        }
    };
    match ended {
        Ok(()) => {}
        Err(error) if error.is_timeout() => {
            let parts = connection.into_parts();
            // Bytes of a request that never completed; none for an idle keep-alive connection,
            // which is just closed.
            let began_a_request = !parts.read_buf.is_empty();
            tracing::debug!(
                %remote,
                began_a_request,
                "closing a connection whose request headers did not arrive in time"
            );
            if began_a_request {
                answer_late_request(parts.io.into_inner()).await;
            }
        }
        Err(error) => tracing::debug!(%remote, %error, "API connection failed"),
    }
}

/// Sends the 408 to a client whose request headers stopped arriving, then closes. Bounded: such a
/// client may read nothing.
async fn answer_late_request(mut io: StallGuard<TcpStream>) {
    let answer = late_request_answer().await;
    let _ = tokio::time::timeout(LATE_ANSWER_LIMIT, async {
        io.write_all(&answer).await?;
        io.shutdown().await
    })
    .await;
}

/// The error table's 408 as raw HTTP/1.1: hyper has given up on the connection, so nothing else
/// will frame it.
async fn late_request_answer() -> Vec<u8> {
    let (parts, body) = ApiError::RequestTimeout.into_response().into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or_default()
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        answer.extend_from_slice(name.as_str().as_bytes());
        answer.extend_from_slice(b": ");
        answer.extend_from_slice(value.as_bytes());
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    answer.extend_from_slice(&body);
    answer
}

/// The router as hyper calls it for one connection.
#[derive(Clone)]
struct ApiService {
    app: Router,
    remote: SocketAddr,
    request_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for ApiService {
    type Response = Response;
    type Error = Infallible;
    type Future = ApiFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        // Where axum's `into_make_service_with_connect_info` would put it.
        parts.extensions.insert(ConnectInfo(self.remote));
        // Most requests (every GET) have no body: no deadline, no flag to allocate.
        let (body, late) = if body.is_end_stream() {
            (Body::new(body), None)
        } else {
            let late = Arc::new(AtomicBool::new(false));
            let body = DeadlineBody::new(body, self.request_timeout, Arc::clone(&late));
            (Body::new(body), Some(late))
        };
        let router = TowerToHyperService::new(self.app.clone());
        let request = Request::from_parts(parts, body);
        let routing = hyper::service::Service::call(&router, request);
        ApiFuture {
            stage: Stage::Routing(Box::pin(async move {
                let Ok(response) = routing.await;
                response
            })),
            late,
            remote: self.remote,
        }
    }
}

/// A boxed answer to one request.
type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// One request's answer as hyper awaits it: the router's, or, when that is [`Deferred`], the
/// deferred one. Not an `async` block: hyper keeps this in a box per connection, and the
/// router's state, boxed on its own, is freed as soon as it has answered, so a request that
/// waits long holds only what its deferred answer needs.
struct ApiFuture {
    stage: Stage,
    /// Set when the request body did not arrive in time.
    late: Option<Arc<AtomicBool>>,
    remote: SocketAddr,
}

enum Stage {
    Routing(Answer),
    Deferred(Answer),
}

impl Future for ApiFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let response = match &mut this.stage {
                Stage::Routing(routing) => {
                    let mut response = ready!(routing.as_mut().poll(cx));
                    if let Some(answer) = Deferred::take(&mut response) {
                        this.stage = Stage::Deferred(answer);
                        continue;
                    }
                    response
                }
                Stage::Deferred(answer) => ready!(answer.as_mut().poll(cx)),
            };
            return Poll::Ready(Ok(this.checked_for_a_late_body(response)));
        }
    }
}

impl ApiFuture {
    /// Whatever the handler made of a failed body (a JSON error, most likely), the client is
    /// told why, and the connection is not kept for a body still on its way.
    fn checked_for_a_late_body(&self, response: Response) -> Response {
        if !self
            .late
            .as_ref()
            .is_some_and(|late| late.load(Ordering::Relaxed))
        {
            return response;
        }
        tracing::debug!(remote = %self.remote, "a request body did not arrive in time");
        let mut response = ApiError::RequestTimeout.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// An answer a handler gives later, after the router and its middleware have let go of the
/// request: the response that carries it as an extension is a placeholder, and the connection
/// awaits the deferred answer in its place. A request that waits long (a blocking query) then
/// holds only its own small state, not the request, the middleware's and the handler's futures.
/// Middleware that acts on the response does so through [`Deferred::map`]. The connection
/// polls the answer again when the daemon starts to stop, so an answer that must end then can
/// check for the stop when polled rather than wait for it.
#[derive(Clone)]
pub struct Deferred(Arc<Mutex<Option<Answer>>>);

impl Deferred {
    /// `placeholder`, standing for `answer`: what the client gets should nothing await the
    /// deferred answer (e.g. the router served without [`serve`]). A panic in `answer` is
    /// answered like one in a handler.
    pub fn respond(
        mut placeholder: Response,
        answer: impl Future<Output = Response> + Send + 'static,
    ) -> Response {
        let answer = AssertUnwindSafe(answer).catch_unwind().map(|answer| {
            answer.unwrap_or_else(|_| {
                ApiError::Internal("a request handler panicked".into()).into_response()
            })
        });
        placeholder
            .extensions_mut()
            .insert(Self(Arc::new(Mutex::new(Some(Box::pin(answer))))));
        placeholder
    }

    /// Applies `finish` to the answer `response` stands for, once it is given; `Err` gives
    /// `finish` back when `response` is the answer itself.
    pub fn map<F>(response: &mut Response, finish: F) -> Result<(), F>
    where
        F: FnOnce(Response) -> Response + Send + 'static,
    {
        let Some(answer) = Self::take(response) else {
            return Err(finish);
        };
        let mapped: Answer = Box::pin(answer.map(finish));
        response
            .extensions_mut()
            .insert(Self(Arc::new(Mutex::new(Some(mapped)))));
        Ok(())
    }

    /// The deferred answer `response` stands for, if it is a placeholder.
    fn take(response: &mut Response) -> Option<Answer> {
        let Self(slot) = response.extensions_mut().remove::<Self>()?;
        // Poisoned only by a panic while taking or putting the answer, which cannot happen;
        // the answer is still there then.
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.take()
    }
}

/// The request body took longer than `server.request_timeout` to arrive.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyTooSlow(Duration);

/// A request body that fails once its deadline passes before its end arrived, and says so in
/// `late`.
struct DeadlineBody {
    inner: Incoming,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    late: Arc<AtomicBool>,
}

impl DeadlineBody {
    fn new(inner: Incoming, limit: Duration, late: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            late,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        ready!(this.deadline.as_mut().poll(cx));
        this.late.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(BodyTooSlow(this.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Fails writes that make no progress for `limit`.
pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    /// Running while a write is pending; reset by any progress.
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    /// Guards `inner`'s writes with `limit`.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled_since: None,
        }
    }

    /// Maps a pending write to an error once it has been pending for `limit`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled_since = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Serves `app` on a loopback port until the returned sender says stop.
    async fn serve_on_loopback(
        app: Router,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (stop_tx, stop_rx) = watch::channel(false);
        let limits = ConnectionLimits {
            max_connections: 4,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        };
        let server = tokio::spawn(serve(ApiListener::new(listener), app, limits, stop_rx));
        (addr, stop_tx, server)
    }

    #[tokio::test]
    async fn handlers_see_the_client_address_and_stopping_ends_the_server() {
        let app = Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.to_string()
            }),
        );
        let (addr, stop, server) = serve_on_loopback(app).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let local = client.local_addr().expect("client address");
        client
            .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut response = String::new();
        client
            .read_to_string(&mut response)
            .await
            .expect("read the response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with(&local.to_string()), "{response}");

        // An idle connection does not hold the server up once it stops.
        let _idle = TcpStream::connect(addr).await.expect("connect");
        stop.send(true).expect("the server listens for stop");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server ends once its connections have")
            .expect("the server task did not panic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_the_write_after_the_limit() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(near, Duration::from_secs(30));
        // Fills the pipe; the peer reads nothing.
        let error = guarded
            .write_all(&[0u8; 1024])
            .await
            .expect_err("the write must give up");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let mut received = vec![0u8; 64];
        assert_eq!(far.read(&mut received).await.expect("read"), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_reading_peer_is_served() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(near, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut chunk = [0u8; 64];
            while total < 4096 {
                // Pauses well under the limit between reads.
                tokio::time::sleep(Duration::from_secs(10)).await;
                total += far.read(&mut chunk).await.expect("read");
            }
            total
        });
        guarded.write_all(&[1u8; 4096]).await.expect("all written");
        assert_eq!(reader.await.expect("reader"), 4096);
    }
}
