//! Accepted sockets, counted and timed out, for both ports.
//!
//! Every open socket holds a slot from the moment it is accepted, whether or not it ever
//! sends a request: past the limit, a new one is answered `503` and closed, so a flood of
//! idle connections cannot use up the process's file descriptors (the rest are kept for
//! the other port, the store and Git). A socket on which nothing arrives for a while is
//! closed: the first bytes of a request must come within `first_within`, and after that
//! nothing may be silent for `silent_within` (a WebSocket's heartbeats reset it).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a socket may stay open and silent.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accepting it to its first bytes.
    pub first_within: Duration,
    /// Between any two reads after that.
    pub silent_within: Duration,
}

/// A listener whose sockets are counted against `limit` and closed when silent.
pub struct Limited<L> {
    inner: L,
    open: Arc<AtomicUsize>,
    limit: usize,
    timeouts: Timeouts,
}

impl<L> Limited<L> {
    pub fn new(inner: L, limit: usize, timeouts: Timeouts) -> Self {
        Self { inner, open: Arc::default(), limit, timeouts }
    }
}

impl<L> axum::serve::Listener for Limited<L>
where
    L: axum::serve::Listener,
{
    type Io = Socket<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, address) = self.inner.accept().await;
            let taken = self
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < self.limit).then_some(open + 1));
            if taken.is_ok() {
                return (Socket::new(io, Arc::clone(&self.open), self.timeouts), address);
            }
            tokio::spawn(refuse(io));
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Tells a socket over the limit to come back later, and closes it.
async fn refuse<Io: AsyncWrite + Unpin>(mut io: Io) {
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n\
Content-Length: 35\r\nConnection: close\r\n\r\ntoo many connections; retry later\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(ANSWER).await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// An accepted socket: gives its slot back when dropped, and fails a read once it has been
/// silent too long.
pub struct Socket<Io> {
    io: Io,
    open: Arc<AtomicUsize>,
    timeouts: Timeouts,
    /// When the last bytes arrived; `None` before the first.
    heard: Option<Instant>,
    /// Fires at the deadline it was last set to; moved on lazily, when it fires.
    alarm: Pin<Box<Sleep>>,
}

impl<Io> Socket<Io> {
    fn new(io: Io, open: Arc<AtomicUsize>, timeouts: Timeouts) -> Self {
        let alarm = Box::pin(tokio::time::sleep(timeouts.first_within));
        Self { io, open, timeouts, heard: None, alarm }
    }

    /// Whether the socket has been silent too long, re-arming the alarm if it has not.
    fn silent_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.alarm.as_mut().poll(cx).is_pending() {
                return false;
            }
            let Some(heard) = self.heard else { return true };
            let deadline = heard + self.timeouts.silent_within;
            if deadline <= Instant::now() {
                return true;
            }
            self.alarm.as_mut().reset(deadline);
        }
    }
}

impl<Io> Drop for Socket<Io> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Socket<Io> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    // The first bytes: the alarm moves from the first deadline to the
                    // silence one once, rather than waking every socket when it fires.
                    if this.heard.replace(now).is_none() {
                        this.alarm.as_mut().reset(now + this.timeouts.silent_within);
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending if this.silent_too_long(cx) => {
                let waited =
                    if this.heard.is_some() { this.timeouts.silent_within } else { this.timeouts.first_within };
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("nothing received for {waited:?}"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Socket<Io> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// How long the head of a request may take to arrive, from when the connection starts
/// waiting for it: a client that sends its headers a byte at a time is closed after it. It
/// is also how long a kept-alive connection may wait idle for its next request.
pub const HEAD_WITHIN: Duration = Duration::from_secs(10);

/// Serves `router` over HTTP/1.1 (with upgrades) on every connection `listener` accepts,
/// until `cancel`; then lets the requests under way finish. axum's own `serve` gives hyper
/// no timer, so a request head could take forever.
pub async fn serve_http1<L: axum::serve::Listener>(
    mut listener: L,
    router: axum::Router,
    cancel: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (io, _) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let cancel = cancel.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEAD_WITHIN);
            let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::trace!(%error, "connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const SHORT: Timeouts =
        Timeouts { first_within: Duration::from_millis(100), silent_within: Duration::from_millis(200) };

    #[tokio::test]
    async fn a_socket_must_speak_first_within_its_time_and_never_go_silent_too_long() {
        let open = Arc::new(AtomicUsize::new(1));
        let (mut client, server) = tokio::io::duplex(64);
        let mut socket = Socket::new(server, Arc::clone(&open), SHORT);
        let mut buf = [0u8; 8];

        // Bytes in time, then more within the silence allowed, keep it open.
        for _ in 0..4 {
            client.write_all(b"x").await.expect("write");
            assert_eq!(socket.read(&mut buf).await.expect("read"), 1);
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        client.write_all(b"x").await.expect("write");
        assert_eq!(socket.read(&mut buf).await.expect("read"), 1);
        let started = Instant::now();
        let silent = socket.read(&mut buf).await.expect_err("silent too long");
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(190), "{:?}", started.elapsed());
        drop(socket);
        assert_eq!(open.load(Ordering::Acquire), 0, "the slot is given back");

        // A socket that never speaks.
        let (_client, server) = tokio::io::duplex(64);
        let mut socket = Socket::new(server, Arc::new(AtomicUsize::new(1)), SHORT);
        let started = Instant::now();
        assert_eq!(socket.read(&mut buf).await.expect_err("never spoke").kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(190), "the first deadline is the shorter one");
    }
}
