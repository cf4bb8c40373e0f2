//! The connection's socket and its two buffers, sized so that an idle device costs little
//! memory and a busy publisher still reads in large chunks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::types::Close;
use crate::mqtt::codec::reason;
use crate::mqtt::delivery::Stats;

/// Read buffer sizing: a connection starts with a small buffer and doubles what it reads at
/// once while reads fill it, so an idle device costs little memory and a busy publisher
/// still reads in large chunks.
pub(super) const READ_CHUNK_MIN: usize = 1024;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// A read this long after the previous one finds a mostly idle connection (a device that
/// pings or reports now and then): it gives its buffers back once that read is handled. A
/// connection that keeps sending keeps them.
pub(super) const IDLE_AFTER: Duration = Duration::from_secs(1);
/// Write buffers larger than this are released after they are flushed.
const WRITE_BUFFER_KEEP: usize = 64 * 1024;

/// The two halves of the stream, what was read and not yet decoded, and what is to be
/// written.
pub(super) struct Socket<R, W> {
    reader: R,
    writer: W,
    /// Bytes read and not yet decoded.
    pub(super) rbuf: BytesMut,
    /// The connection is idle and `rbuf` holds no allocation: the next read goes through a
    /// buffer on the stack, and only bytes that arrive take a buffer.
    read_idle: bool,
    /// After a read that came after a quiet spell: the write buffer (and the connection's
    /// commit channel) are given back once everything is written and nothing is pending.
    give_back: bool,
    /// Bytes reserved for the next read, at most `READ_CHUNK_MAX` (a `u32`, so that it shares
    /// a word with the flags: every connection holds one).
    read_chunk: u32,
    /// Packets waiting to be written.
    pub(super) wbuf: BytesMut,
    /// The writer took all of `wbuf` but may still hold some of it (TLS records buffered in
    /// rustls): it must be flushed before the peer sees everything.
    unflushed: bool,
    /// When the socket last gave bytes.
    last_read: Instant,
}

impl<R, W> Socket<R, W> {
    /// `rbuf`: bytes read past the CONNECT; `wbuf`: the CONNACK; `at`: when the connection
    /// started.
    pub(super) fn new(reader: R, writer: W, rbuf: BytesMut, wbuf: BytesMut, at: Instant) -> Self {
        Socket {
            reader,
            writer,
            read_idle: rbuf.is_empty(),
            give_back: true,
            // An empty buffer is given back: the next read takes one.
            rbuf: if rbuf.is_empty() {
                BytesMut::new()
            } else {
                rbuf
            },
            read_chunk: READ_CHUNK_MIN as u32,
            wbuf,
            unflushed: false,
            last_read: at,
        }
    }
}

impl<R, W> Socket<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Something is left to write or to flush.
    pub(super) fn unwritten(&self) -> bool {
        !self.wbuf.is_empty() || self.unflushed
    }

    /// The next read into `rbuf` and the next write of `wbuf`, to wait for together; neither
    /// takes or gives bytes unless it resolves.
    pub(super) fn read_and_write(
        &mut self,
    ) -> (
        impl Future<Output = std::io::Result<usize>> + '_,
        impl Future<Output = std::io::Result<usize>> + '_,
    ) {
        (
            read_some(
                &mut self.reader,
                &mut self.rbuf,
                self.read_idle,
                self.read_chunk as usize,
            ),
            write_some(&mut self.writer, &self.wbuf),
        )
    }

    /// Bytes arrived at `now`; returns whether they came after a quiet spell.
    pub(super) fn read_arrived(&mut self, now: Instant) -> bool {
        let quiet = now.duration_since(self.last_read) >= IDLE_AFTER;
        self.last_read = now;
        // TLS may have records to send in answer to what was read (a key update); a flush
        // sends them. Plain TCP has nothing to flush.
        self.unflushed = true;
        quiet
    }

    /// Writes (and flushes) what the writer takes without waiting: polled once with a waker
    /// that does nothing, as the run loop's next write registers the real one. Returns
    /// whether the connection went idle (see [`Socket::release_written`]).
    pub(super) fn try_flush(
        &mut self,
        stats: &Stats,
        nothing_pending: bool,
    ) -> Result<bool, Close> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.writer).poll_write(&mut cx, &self.wbuf) {
                Poll::Ready(Ok(n)) => self.wrote(n, stats)?,
                Poll::Ready(Err(e)) => {
                    return Err(Close::new(
                        reason::UNSPECIFIED,
                        format!("write failed: {e}"),
                    ))
                }
                Poll::Pending => return Ok(false),
            }
        }
        let idle = self.release_written(nothing_pending);
        if self.unflushed {
            match Pin::new(&mut self.writer).poll_flush(&mut cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => {
                    return Err(Close::new(
                        reason::UNSPECIFIED,
                        format!("write failed: {e}"),
                    ))
                }
                Poll::Pending => {}
            }
        }
        Ok(idle)
    }

    /// Accounts for `n` bytes of `wbuf` taken by the writer (0 with `wbuf` empty: a flush
    /// completed).
    pub(super) fn wrote(&mut self, n: usize, stats: &Stats) -> Result<(), Close> {
        if self.wbuf.is_empty() {
            self.unflushed = false;
            return Ok(());
        }
        if n == 0 {
            return Err(Close::new(
                reason::UNSPECIFIED,
                "write failed: the connection takes no more bytes",
            ));
        }
        stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        let _ = self.wbuf.split_to(n);
        self.unflushed = true;
        Ok(())
    }

    /// Writes all of `wbuf` and flushes. Returns whether the connection went idle (see
    /// [`Socket::release_written`]).
    pub(super) async fn flush(
        &mut self,
        stats: &Stats,
        nothing_pending: bool,
    ) -> Result<bool, Close> {
        let mut idle = false;
        if !self.wbuf.is_empty() {
            stats
                .bytes_sent
                .fetch_add(self.wbuf.len() as u64, Ordering::Relaxed);
            self.writer
                .write_all(&self.wbuf)
                .await
                .map_err(|e| Close::new(reason::UNSPECIFIED, format!("write failed: {e}")))?;
            idle = self.release_written(nothing_pending);
        }
        self.writer
            .flush()
            .await
            .map_err(|e| Close::new(reason::UNSPECIFIED, format!("write failed: {e}")))?;
        self.unflushed = false;
        Ok(idle)
    }

    /// Shuts the writing half down (over TLS, with a close_notify).
    pub(super) async fn shutdown(&mut self) -> std::io::Result<()> {
        self.writer.shutdown().await
    }

    /// Reads and discards what the client still sends, within bounds (see [`linger`]).
    pub(super) async fn linger(&mut self) {
        linger(&mut self.reader).await
    }

    /// Empties the write buffer once all of it was written, giving back a large one, and any
    /// one when the connection is idle with `nothing_pending`. Returns whether it is idle:
    /// then the connection gives its commit channel back too.
    fn release_written(&mut self, nothing_pending: bool) -> bool {
        let idle = self.give_back && nothing_pending;
        if idle {
            self.give_back = false;
        }
        if self.wbuf.capacity() > WRITE_BUFFER_KEEP || idle {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        idle
    }

    /// Makes room for the next read; returns the spare capacity offered to it.
    pub(super) fn prepare_read(&mut self) -> usize {
        if self.read_idle {
            return READ_CHUNK_MIN;
        }
        let chunk = self.read_chunk as usize;
        if self.rbuf.capacity() - self.rbuf.len() < chunk / 2 {
            self.rbuf.reserve(chunk);
        }
        self.rbuf.capacity() - self.rbuf.len()
    }

    /// Grows the read size while reads fill the buffer; after a small read that left nothing
    /// buffered, goes back to the minimum and gives a large buffer back. After a small read
    /// that came after a quiet spell (an idle device's PINGREQ, say), gives any buffer back
    /// until bytes arrive again.
    pub(super) fn adapt_read_buffer(&mut self, read: usize, offered: usize, quiet: bool) {
        self.read_idle = false;
        self.give_back = quiet;
        if read >= offered {
            self.read_chunk = (self.read_chunk * 2).min(READ_CHUNK_MAX as u32);
        } else if read < READ_CHUNK_MIN / 2 && self.rbuf.is_empty() {
            self.read_chunk = READ_CHUNK_MIN as u32;
            if quiet || self.rbuf.capacity() > 4 * READ_CHUNK_MIN {
                self.rbuf = BytesMut::new();
                self.read_idle = quiet;
            }
        }
    }
}

/// How long a connection the edge closes goes on reading (and discarding) what its client
/// still sends, after its last packet was written and its writing half shut down.
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// How many bytes it reads and discards in that time at most.
pub(super) const LINGER_BYTES: usize = 1 << 20;

/// Reads and discards what the client still sends until it closes its side, `LINGER` has
/// passed or `LINGER_BYTES` were read. A socket closed with input it has not read (or that
/// receives more afterwards) makes the kernel answer with a reset: the client's next write
/// fails, and a client library then drops the connection without reading the DISCONNECT or
/// refusing CONNACK that the edge wrote last. Servers that mean their last word to be heard
/// close this way (a "lingering close"); the bounds keep a client that never stops sending
/// from holding its connection.
pub(super) async fn linger<R: AsyncRead + Unpin>(reader: &mut R) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut discard = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match reader.read(&mut discard).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Writes some of `wbuf`, or flushes the writer when `wbuf` is empty; resolves with the bytes
/// taken (0 for a flush) once the writer makes progress. Nothing is written unless it
/// resolves, so it may be dropped unfinished.
fn write_some<'a, W: AsyncWrite + Unpin>(
    writer: &'a mut W,
    wbuf: &'a [u8],
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        if wbuf.is_empty() {
            Pin::new(&mut *writer).poll_flush(cx).map_ok(|()| 0)
        } else {
            Pin::new(&mut *writer).poll_write(cx, wbuf)
        }
    })
}

/// Reads into `rbuf`. While the connection is idle (`rbuf` given back), the read goes through
/// a buffer on the stack and `rbuf` takes `chunk` bytes only once bytes have arrived, so a
/// connection waiting for its next packet holds no read buffer.
pub(super) async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    idle: bool,
    chunk: usize,
) -> std::io::Result<usize> {
    if !idle {
        return reader.read_buf(rbuf).await;
    }
    std::future::poll_fn(move |cx| {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK_MIN];
        let mut buf = tokio::io::ReadBuf::uninit(&mut stack);
        std::task::ready!(Pin::new(&mut *reader).poll_read(cx, &mut buf))?;
        let read = buf.filled();
        rbuf.reserve(chunk.max(read.len()));
        rbuf.extend_from_slice(read);
        Poll::Ready(Ok(read.len()))
    })
    .await
}
