//! Two different waits on an HTTP/1.1 connection: idle between requests (allowed to be long, so
//! authenticated NTLM connections survive think time) and a request head trickling in (must be short:
//! slowloris). hyper's own header timer counts both from the end of the previous response, so it
//! gets the idle limit, and this clock starts the head limit at the first byte of a new request.
#![forbid(unsafe_code)]

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    sync::Notify,
    time::Instant,
};

#[derive(Debug)]
pub struct HeadClock {
    epoch: Instant,
    /// Milliseconds since `epoch` (+1) when the first byte of a pending request head arrived; 0: none.
    head_since: AtomicU64,
    in_flight: AtomicUsize,
    started: Notify,
}

impl HeadClock {
    pub fn new() -> Arc<Self> {
        Arc::new(HeadClock {
            epoch: Instant::now(),
            head_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            started: Notify::new(),
        })
    }

    fn on_bytes(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == 0
        {
            let now = self.epoch.elapsed().as_millis() as u64 + 1;
            if self
                .head_since
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.started.notify_one();
            }
        }
    }

    /// The service got a complete head.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
    }

    pub fn request_done(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when a request head has been arriving for longer than `limit`.
    pub async fn head_expired(&self, limit: Duration) {
        loop {
            let since = self.head_since.load(Ordering::Acquire);
            if since == 0 {
                self.started.notified().await;
                continue;
            }
            let deadline = self.epoch + Duration::from_millis(since - 1) + limit;
            tokio::time::sleep_until(deadline).await;
            if self.head_since.load(Ordering::Acquire) == since
                && self.in_flight.load(Ordering::Acquire) == 0
            {
                return;
            }
        }
    }
}

/// A stream that tells the clock when bytes arrive.
pub struct ClockedIo<S> {
    inner: S,
    clock: Arc<HeadClock>,
}

impl<S> ClockedIo<S> {
    pub fn new(inner: S, clock: Arc<HeadClock>) -> Self {
        ClockedIo { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClockedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_bytes();
        }
        polled
    }
}

super::write_through!(ClockedIo);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_head_that_does_not_complete_expires_and_idle_time_does_not_count() {
        let clock = HeadClock::new();
        // Idle for an hour: nothing expires.
        let idle = tokio::time::timeout(
            Duration::from_secs(3600),
            clock.head_expired(Duration::from_secs(1)),
        );
        assert!(idle.await.is_err());
        // First byte of a head, never completed: expires after the limit.
        clock.on_bytes();
        let slow = tokio::time::timeout(
            Duration::from_secs(2),
            clock.head_expired(Duration::from_secs(1)),
        );
        assert!(slow.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_completed_head_stops_the_clock() {
        let clock = HeadClock::new();
        clock.on_bytes();
        clock.request_started();
        // Body bytes while the request is in flight do not start a head.
        clock.on_bytes();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            clock.head_expired(Duration::from_secs(1)),
        );
        assert!(r.await.is_err());
        clock.request_done();
        clock.on_bytes();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            clock.head_expired(Duration::from_secs(1)),
        );
        assert!(r.await.is_ok());
    }
}
