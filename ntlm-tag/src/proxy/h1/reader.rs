//! The read side of a client connection: the stream and the bytes read ahead of the parser.
//!
//! An idle connection holds no buffer: the wait for the next request reads into the stack, and
//! only bytes that arrived are copied to the heap. After a request the buffer is let go unless
//! the next (pipelined) request is already in it.
#![forbid(unsafe_code)]

use std::{
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

/// The read half of a client stream: a plain TCP connection's own half, or any other stream
/// (TLS, or one that replays bytes read ahead) boxed. A plain connection's halves share the
/// stream and nothing else: no lock, and no box per half.
pub enum ReadIo {
    Tcp(OwnedReadHalf),
    Boxed(Box<dyn AsyncRead + Send + Unpin>),
}

/// The write half of a client stream, as [`ReadIo`].
pub enum WriteIo {
    Tcp(TcpWriteHalf),
    Boxed(Box<dyn AsyncWrite + Send + Unpin>),
}

impl WriteIo {
    /// The write half of a plain TCP connection.
    pub fn tcp(half: OwnedWriteHalf) -> Self {
        WriteIo::Tcp(TcpWriteHalf(Some(half)))
    }

    /// Nothing: writes go nowhere (in the place of a writer handed to a tunnel).
    pub fn sink() -> Self {
        // `Sink` has no size: boxing it allocates nothing.
        WriteIo::Boxed(Box::new(tokio::io::sink()))
    }
}

/// Tokio's write half of a TCP stream shuts the connection's write side down when it is dropped
/// (a system call); this one leaves that to an explicit shutdown, as the stream itself does: the
/// socket closes, FIN and all, when both halves are gone.
pub struct TcpWriteHalf(Option<OwnedWriteHalf>);

impl Drop for TcpWriteHalf {
    fn drop(&mut self) {
        if let Some(half) = self.0.take() {
            half.forget();
        }
    }
}

impl AsyncRead for ReadIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadIo::Tcp(half) => Pin::new(half).poll_read(cx, buf),
            ReadIo::Boxed(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

/// One call on whichever stream a [`WriteIo`] holds (a dropped TCP half only after it is gone).
macro_rules! on_writer {
    ($io:expr, $half:ident => $call:expr) => {
        match $io {
            WriteIo::Tcp(TcpWriteHalf(Some($half))) => $call,
            WriteIo::Tcp(TcpWriteHalf(None)) => {
                Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
            }
            WriteIo::Boxed($half) => $call,
        }
    };
}

impl AsyncWrite for WriteIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_writer!(self.get_mut(), half => Pin::new(half).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_writer!(self.get_mut(), half => Pin::new(half).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_writer!(self.get_mut(), half => Pin::new(half).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_writer!(self.get_mut(), half => Pin::new(half).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteIo::Tcp(TcpWriteHalf(Some(half))) => half.is_write_vectored(),
            WriteIo::Tcp(TcpWriteHalf(None)) => false,
            WriteIo::Boxed(io) => io.is_write_vectored(),
        }
    }
}

/// Bytes asked of the stream per read once a request is under way.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes the idle wait can take in one read (on the stack, not kept).
const FIRST_READ: usize = 4 * 1024;

pub struct Reader {
    io: ReadIo,
    pub buf: BytesMut,
}

impl Reader {
    pub fn new(io: ReadIo, buf: BytesMut) -> Self {
        Reader { io, buf }
    }

    /// A reader with no stream, in the place of the real one while a request body has it.
    pub fn detached() -> Self {
        // `Empty` has no size: boxing it allocates nothing.
        Reader::new(ReadIo::Boxed(Box::new(tokio::io::empty())), BytesMut::new())
    }

    /// Waits for the first bytes of the next request without a heap buffer; `Ok(0)`: the client
    /// closed the connection. Returns at once when bytes are buffered already.
    pub async fn wait_for_request(&mut self) -> io::Result<usize> {
        if self.buf.is_empty() {
            self.buf = first_bytes(&mut self.io).await?;
        }
        Ok(self.buf.len())
    }

    /// Reads more bytes into the buffer; `Ok(0)`: the client closed the connection.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    pub async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Lets the buffer go when nothing is left in it (the connection goes idle).
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }
}

/// Waits for the first bytes a stream sends, reading into the stack: only bytes that arrived go to
/// the heap. Empty: the stream closed.
pub async fn first_bytes<R: AsyncRead + Unpin + ?Sized>(io: &mut R) -> io::Result<BytesMut> {
    poll_fn(|cx| {
        // Uninitialised: zeroing 4 KiB for every wait costs more than the read (tokio never reads
        // from the unfilled part).
        let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut read = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(BytesMut::from(read.filled())))
    })
    .await
}

/// A connection after `101 Switching Protocols`: what was read ahead first, then the stream.
pub struct Upgraded {
    reader: Reader,
    writer: WriteIo,
}

impl Upgraded {
    pub fn new(reader: Reader, writer: WriteIo) -> Self {
        Upgraded { reader, writer }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let reader = &mut self.reader;
        if !reader.buf.is_empty() {
            let n = reader.buf.len().min(out.remaining());
            out.put_slice(&reader.buf.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut reader.io).poll_read(cx, out)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}
