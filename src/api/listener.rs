//! The API's TCP listener: connections whose client stops reading are closed.
//!
//! hyper writes a response, or the next server-sent event, only as fast as the client reads,
//! and has no write timeout of its own. A client that stops reading would hold its
//! connection, and an event stream, open for as long as the socket lives. Here a write that
//! cannot make progress for [`WRITE_STALL_LIMIT`] fails, and hyper closes the connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// Far above any healthy client's pause, far below TCP's own give-up time (minutes).
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(30);

pub struct ApiListener {
    inner: TcpListener,
}

impl ApiListener {
    pub fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = StallGuard<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop logs and retries errors.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Events are small writes that must not wait for Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        (StallGuard::new(stream, WRITE_STALL_LIMIT), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
