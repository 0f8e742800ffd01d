//! Accepting a request whatever its `:authority`, on our unix-socket endpoints.
//!
//! Kubelets before 1.26 dial device plugins with the socket path as the HTTP/2 `:authority` (1.26 sends
//! `localhost`, kubernetes#112597), and gRPC C-core clients (Python `grpcio`, C++), grpc-java and older grpcurl
//! send the path raw or percent-encoded; some clients send it empty. None of these is an authority
//! (`host[:port]`), and h2, under tonic, resets every such stream with `PROTOCOL_ERROR` before a handler runs
//! (hyperium/h2#487): registration succeeds, then `ListAndWatch` fails. [`AnyAuthority`] sits between the
//! accepted socket and tonic and, in the header blocks the client sends, replaces an `:authority` that h2
//! would refuse (the same parser h2 uses decides) with `localhost`. Everything else reaches h2 unchanged.
//!
//! HPACK is stateful, so the adapter cannot patch bytes in place: every header block from the client is
//! decoded, with a decoder whose dynamic table mirrors the client's encoder, and re-encoded without the
//! dynamic table (never-indexed literals, static-table names), so h2's decoder table stays empty and can never
//! disagree with the client's. Padding is dropped, the priority fields are kept, CONTINUATION frames are joined
//! and the block is split again into frames of 16 KiB (the smallest maximum frame size a peer may announce).
//! The server's own SETTINGS are read from what it writes, for the dynamic-table limit the client's encoder
//! works under and the largest frame it accepts. Frames other than HEADERS and CONTINUATION pass through as
//! they arrive, without being buffered whole.
//!
//! It fails closed: a broken HPACK block, a table size update after a field or over the limit, a
//! CONTINUATION out of place, another frame inside a header block, a client PUSH_PROMISE, bad padding, a
//! frame larger than the server allows or a header block over 1 MiB (encoded or decoded) is a connection
//! error: the read fails with [`std::io::ErrorKind::InvalidData`] naming what was wrong, and tonic drops the
//! connection. Nothing here panics on input.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use h2_frames::{
    ACK, CONTINUATION, DEFAULT_HEADER_TABLE_SIZE, DEFAULT_MAX_FRAME_SIZE, END_HEADERS, END_STREAM,
    FRAME_HEAD_LEN, FrameHead, HEADERS, PADDED, PREFACE, PRIORITY, PUSH_PROMISE, SETTINGS,
    SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_FRAME_SIZE, encode_integer, encode_string, frame_head,
};

/// Caps on one header block, far above what h2 itself accepts (16 KiB of headers in at most six 16 KiB
/// frames with hyper's defaults), so they never refuse what h2 would serve and only bound memory.
const MAX_BLOCK_BYTES: usize = 1 << 20;
const MAX_LIST_BYTES: usize = 1 << 20;

/// What replaces an authority h2 would refuse: what kubelets from 1.26 send.
const REPLACEMENT: &[u8] = b"localhost";

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16_384;

/// Why a connection was closed: the client's bytes are not HTTP/2 that h2 would accept either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The connection did not open with the client preface.
    #[error("the connection does not start with the HTTP/2 client preface; got {got:?}")]
    Preface {
        /// The first bytes received.
        got: String,
    },
    /// A CONTINUATION frame with no header block open.
    #[error("a CONTINUATION frame on stream {stream} follows no open header block")]
    ContinuationOutOfPlace {
        /// Its stream.
        stream: u32,
    },
    /// Another frame while a header block was waiting for its CONTINUATION.
    #[error(
        "frame type {kind:#x} on stream {stream} arrived while the header block of stream {open} waits for \
         CONTINUATION; only CONTINUATION frames of that stream may come in between"
    )]
    InterruptedBlock {
        /// The frame's type.
        kind: u8,
        /// The frame's stream.
        stream: u32,
        /// The stream whose block is open.
        open: u32,
    },
    /// A client may not push.
    #[error("a client sent PUSH_PROMISE on stream {stream}; only servers push")]
    PushPromise {
        /// Its stream.
        stream: u32,
    },
    /// HEADERS on stream 0.
    #[error("a HEADERS frame on stream 0; requests need a client stream (odd, > 0)")]
    StreamZero,
    /// The padding or priority fields do not fit the frame.
    #[error(
        "HEADERS on stream {stream}: {pad} bytes of padding and {fields} bytes of pad length and priority do \
         not fit a {len}-byte payload"
    )]
    Padding {
        /// The stream.
        stream: u32,
        /// The pad length it announced.
        pad: usize,
        /// Bytes of pad length and priority fields.
        fields: usize,
        /// The payload length.
        len: usize,
    },
    /// A HEADERS or CONTINUATION frame over the server's SETTINGS_MAX_FRAME_SIZE.
    #[error(
        "a {len}-byte frame of type {kind:#x} on stream {stream}; the server accepts at most {max}"
    )]
    FrameTooLarge {
        /// The frame's type.
        kind: u8,
        /// The stream.
        stream: u32,
        /// Its payload length.
        len: usize,
        /// The server's limit.
        max: usize,
    },
    /// A header block over [`MAX_BLOCK_BYTES`] encoded or [`MAX_LIST_BYTES`] decoded.
    #[error("the header block of stream {stream} is over {max} bytes {what}")]
    BlockTooLarge {
        /// The stream.
        stream: u32,
        /// `encoded` or `decoded`.
        what: &'static str,
        /// The cap.
        max: usize,
    },
    /// The HPACK block cannot be decoded.
    #[error("the header block of stream {stream} is not valid HPACK: {reason}")]
    Hpack {
        /// The stream.
        stream: u32,
        /// What the decoder found.
        reason: String,
    },
}

impl From<Malformed> for io::Error {
    fn from(e: Malformed) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the client's byte stream is.
#[derive(Debug, Clone, Copy)]
enum ReadState {
    Preface,
    Head,
    /// Passing `n` more payload bytes of the current frame through.
    Pass(usize),
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    Block(FrameHead),
}

/// A header block waiting for its CONTINUATION frames.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Follows the frames the server writes, to learn the limits it announces in SETTINGS.
#[derive(Debug, Default)]
struct ServerFrames {
    head: [u8; FRAME_HEAD_LEN],
    head_len: usize,
    remaining: usize,
    /// The payload of a SETTINGS frame being written, when the current frame is one.
    settings: Option<Vec<u8>>,
}

/// A connection's transport with every request `:authority` h2 would refuse replaced by `localhost`.
pub struct AnyAuthority<S> {
    io: S,
    state: ReadState,
    /// Bytes read from the client, not yet looked at.
    raw: BytesMut,
    /// Bytes for h2, in order.
    out: BytesMut,
    chunk: Box<[u8; READ_CHUNK]>,
    open: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
    /// The largest HEADERS or CONTINUATION payload the server accepts.
    max_frame_size: usize,
    server: ServerFrames,
    eof: bool,
    failure: Option<Malformed>,
    rewrote: bool,
}

impl<S> fmt::Debug for AnyAuthority<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyAuthority")
            .field("state", &self.state)
            .field("buffered", &self.raw.len())
            .field("pending", &self.out.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl<S> AnyAuthority<S> {
    /// Wraps an accepted connection.
    pub fn new(io: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(DEFAULT_HEADER_TABLE_SIZE);
        Self {
            io,
            state: ReadState::Preface,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            chunk: Box::new([0; READ_CHUNK]),
            open: None,
            decoder,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            server: ServerFrames::default(),
            eof: false,
            failure: None,
            rewrote: false,
        }
    }

    /// Moves what can be moved from `raw` to `out`.
    fn process(&mut self) -> Result<(), Malformed> {
        loop {
            match self.state {
                ReadState::Preface => {
                    if self.raw.len() < PREFACE.len() {
                        // A prefix of something else is refused as soon as it differs.
                        if !PREFACE.starts_with(&self.raw) {
                            return Err(self.bad_preface());
                        }
                        return Ok(());
                    }
                    if &self.raw[..PREFACE.len()] != PREFACE {
                        return Err(self.bad_preface());
                    }
                    self.out
                        .extend_from_slice(&self.raw.split_to(PREFACE.len()));
                    self.state = ReadState::Head;
                }
                ReadState::Head => {
                    let Some(head) = FrameHead::read(&self.raw) else {
                        return Ok(());
                    };
                    if let Some(open) = &self.open
                        && (head.kind != CONTINUATION || head.stream != open.stream)
                    {
                        return Err(Malformed::InterruptedBlock {
                            kind: head.kind,
                            stream: head.stream,
                            open: open.stream,
                        });
                    }
                    match head.kind {
                        HEADERS | CONTINUATION => {
                            if head.len > self.max_frame_size {
                                return Err(Malformed::FrameTooLarge {
                                    kind: head.kind,
                                    stream: head.stream,
                                    len: head.len,
                                    max: self.max_frame_size,
                                });
                            }
                            self.raw.advance(FRAME_HEAD_LEN);
                            self.state = ReadState::Block(head);
                        }
                        PUSH_PROMISE => {
                            return Err(Malformed::PushPromise {
                                stream: head.stream,
                            });
                        }
                        _ => {
                            self.out
                                .extend_from_slice(&self.raw.split_to(FRAME_HEAD_LEN));
                            self.state = ReadState::Pass(head.len);
                        }
                    }
                }
                ReadState::Pass(0) => self.state = ReadState::Head,
                ReadState::Pass(n) => {
                    if self.raw.is_empty() {
                        return Ok(());
                    }
                    let k = n.min(self.raw.len());
                    self.out.extend_from_slice(&self.raw.split_to(k));
                    self.state = ReadState::Pass(n - k);
                }
                ReadState::Block(head) => {
                    if self.raw.len() < head.len {
                        return Ok(());
                    }
                    let payload = self.raw.split_to(head.len);
                    self.state = ReadState::Head;
                    self.header_frame(head, &payload)?;
                }
            }
        }
    }

    fn bad_preface(&self) -> Malformed {
        let n = self.raw.len().min(PREFACE.len());
        Malformed::Preface {
            got: String::from_utf8_lossy(&self.raw[..n]).into_owned(),
        }
    }

    /// One whole HEADERS or CONTINUATION frame.
    fn header_frame(&mut self, head: FrameHead, payload: &[u8]) -> Result<(), Malformed> {
        let end_headers = head.flags & END_HEADERS != 0;
        if head.kind == CONTINUATION {
            let Some(mut open) = self.open.take() else {
                return Err(Malformed::ContinuationOutOfPlace {
                    stream: head.stream,
                });
            };
            if open.fragment.len() + payload.len() > MAX_BLOCK_BYTES {
                return Err(Malformed::BlockTooLarge {
                    stream: head.stream,
                    what: "encoded",
                    max: MAX_BLOCK_BYTES,
                });
            }
            open.fragment.extend_from_slice(payload);
            if end_headers {
                return self.reencode(&open);
            }
            self.open = Some(open);
            return Ok(());
        }
        if head.stream == 0 {
            return Err(Malformed::StreamZero);
        }
        let padded = head.flags & PADDED != 0;
        let prioritised = head.flags & PRIORITY != 0;
        let fields = usize::from(padded) + if prioritised { 5 } else { 0 };
        let pad = if padded {
            payload.first().map_or(0, |p| usize::from(*p))
        } else {
            0
        };
        // The padding must leave room for the fields, and (RFC 9113 §6.2) be shorter than the rest.
        if fields + pad > payload.len() || (padded && pad >= payload.len()) {
            return Err(Malformed::Padding {
                stream: head.stream,
                pad,
                fields,
                len: payload.len(),
            });
        }
        let priority = prioritised.then(|| {
            let at = usize::from(padded);
            let mut p = [0u8; 5];
            p.copy_from_slice(&payload[at..at + 5]);
            p
        });
        let block = OpenBlock {
            stream: head.stream,
            end_stream: head.flags & END_STREAM != 0,
            priority,
            fragment: payload[fields..payload.len() - pad].to_vec(),
        };
        if end_headers {
            self.reencode(&block)
        } else {
            self.open = Some(block);
            Ok(())
        }
    }

    /// Decodes a whole header block and writes it to `out` as h2 will accept it.
    fn reencode(&mut self, block: &OpenBlock) -> Result<(), Malformed> {
        let stream = block.stream;
        check_size_updates(&block.fragment).map_err(|reason| Malformed::Hpack {
            stream,
            reason: reason.to_owned(),
        })?;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 16);
        let mut list_bytes = 0usize;
        let mut replaced: Option<Vec<u8>> = None;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            // RFC 7541 §4.1: a field's size is its name and value plus 32.
            list_bytes = list_bytes.saturating_add(name.len() + value.len() + 32);
            if list_bytes > MAX_LIST_BYTES {
                return;
            }
            if &name[..] == b":authority" && http::uri::Authority::try_from(&value[..]).is_err() {
                encode_field(&mut encoded, &name, REPLACEMENT);
                replaced = Some(value.into_owned());
            } else {
                encode_field(&mut encoded, &name, &value);
            }
        });
        decoded.map_err(|e| Malformed::Hpack {
            stream,
            reason: e.to_string(),
        })?;
        if list_bytes > MAX_LIST_BYTES {
            return Err(Malformed::BlockTooLarge {
                stream,
                what: "decoded",
                max: MAX_LIST_BYTES,
            });
        }
        if let Some(original) = replaced
            && !self.rewrote
        {
            // Once per connection: a kubelet sends the same authority on every call.
            self.rewrote = true;
            tracing::debug!(
                authority = %String::from_utf8_lossy(&original),
                "the client's :authority is not host[:port]; serving it as localhost"
            );
        }
        self.write_block(block, &encoded);
        Ok(())
    }

    /// HEADERS (with the priority fields it came with, no padding) and as many CONTINUATION as needed.
    fn write_block(&mut self, block: &OpenBlock, encoded: &[u8]) {
        let priority_len = if block.priority.is_some() { 5 } else { 0 };
        let first = encoded.len().min(DEFAULT_MAX_FRAME_SIZE - priority_len);
        let mut flags = 0;
        if block.end_stream {
            flags |= END_STREAM;
        }
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if first == encoded.len() {
            flags |= END_HEADERS;
        }
        // At most DEFAULT_MAX_FRAME_SIZE: three bytes hold every length written here.
        self.out.extend_from_slice(&frame_head(
            priority_len + first,
            HEADERS,
            flags,
            block.stream,
        ));
        if let Some(p) = block.priority {
            self.out.extend_from_slice(&p);
        }
        self.out.extend_from_slice(&encoded[..first]);
        let mut rest = &encoded[first..];
        while !rest.is_empty() {
            let n = rest.len().min(DEFAULT_MAX_FRAME_SIZE);
            let flags = if n == rest.len() { END_HEADERS } else { 0 };
            self.out
                .extend_from_slice(&frame_head(n, CONTINUATION, flags, block.stream));
            self.out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    /// Follows what the server wrote; SETTINGS it announces bound what the client may send.
    fn observe_server(&mut self, mut bytes: &[u8]) {
        let s = &mut self.server;
        while !bytes.is_empty() {
            if s.remaining == 0 && s.head_len < FRAME_HEAD_LEN {
                let n = (FRAME_HEAD_LEN - s.head_len).min(bytes.len());
                s.head[s.head_len..s.head_len + n].copy_from_slice(&bytes[..n]);
                s.head_len += n;
                bytes = &bytes[n..];
                if s.head_len < FRAME_HEAD_LEN {
                    return;
                }
                let head = FrameHead::from_bytes(&s.head);
                s.remaining = head.len;
                s.settings = (head.kind == SETTINGS && head.flags & ACK == 0)
                    .then(|| Vec::with_capacity(head.len));
                if head.len > 0 {
                    continue;
                }
            }
            let n = s.remaining.min(bytes.len());
            if let Some(settings) = &mut s.settings {
                settings.extend_from_slice(&bytes[..n]);
            }
            s.remaining -= n;
            bytes = &bytes[n..];
            if s.remaining == 0 {
                s.head_len = 0;
                if let Some(settings) = s.settings.take() {
                    for entry in settings.chunks_exact(6) {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        let value = usize::try_from(value).unwrap_or(usize::MAX);
                        match id {
                            SETTINGS_HEADER_TABLE_SIZE => {
                                self.decoder.set_max_allowed_table_size(value)
                            }
                            SETTINGS_MAX_FRAME_SIZE => self.max_frame_size = value,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}

/// RFC 7541 §4.2: a dynamic table size update may only open a header block; the decoder we use accepts one
/// anywhere, h2 does not, so this walks the representations (lengths only, no strings decoded) first.
fn check_size_updates(block: &[u8]) -> Result<(), &'static str> {
    let mut at = 0;
    let mut seen_field = false;
    while at < block.len() {
        let first = block[at];
        if first & 0x80 != 0 {
            at += integer(&block[at..], 7)?.1;
            seen_field = true;
        } else if first & 0xe0 == 0x20 {
            if seen_field {
                return Err("a dynamic table size update after a header field");
            }
            at += integer(&block[at..], 5)?.1;
        } else {
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (index, n) = integer(&block[at..], prefix)?;
            at += n;
            if index == 0 {
                at += string_len(block.get(at..).unwrap_or_default())?;
            }
            at += string_len(block.get(at..).unwrap_or_default())?;
            seen_field = true;
        }
    }
    Ok(())
}

/// An HPACK integer (RFC 7541 §5.1): its value and how many bytes it took.
fn integer(b: &[u8], prefix: u8) -> Result<(usize, usize), &'static str> {
    let mask = (1u16 << prefix) as usize - 1;
    let first = *b.first().ok_or("a truncated integer")?;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok((value, 1));
    }
    // Five continuation bytes already exceed any size a header block can have.
    for (i, byte) in b.iter().enumerate().skip(1).take(5) {
        value += usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("a truncated or oversized integer")
}

/// The bytes a string literal takes, length prefix included.
fn string_len(b: &[u8]) -> Result<usize, &'static str> {
    let (len, n) = integer(b, 7)?;
    if len > b.len() - n {
        return Err("a string longer than the block");
    }
    Ok(n + len)
}

/// The static-table index (RFC 7541 Appendix A) of a name, for the names requests carry.
fn static_name(name: &[u8]) -> Option<usize> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b"accept-encoding" => 16,
        b"content-type" => 31,
        b"user-agent" => 58,
        _ => return None,
    })
}

/// A field as a never-indexed literal: it leaves h2's table alone, and re-encoding a field the client marked
/// never-indexed in any other form is forbidden (RFC 7541 §6.2.3), so every field gets this form.
fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match static_name(name) {
        Some(index) => encode_integer(out, index, 4, 0x10),
        None => {
            out.push(0x10);
            encode_string(out, name);
        }
    }
    encode_string(out, value);
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(failure) = &this.failure {
                return Poll::Ready(Err(failure.clone().into()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = ReadBuf::new(&mut this.chunk[..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
            let got = chunk.filled();
            if got.is_empty() {
                this.eof = true;
                continue;
            }
            this.raw.extend_from_slice(got);
            if let Err(e) = this.process() {
                tracing::warn!(error = %e, "closing a connection whose HTTP/2 is malformed");
                this.failure = Some(e);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.observe_server(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            this.observe_server(&b[..k]);
            left -= k;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AnyAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    const SOCKET: &[u8] = b"/var/lib/kubelet/device-plugins/nvidia-vgpu-number.sock";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let len = payload.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn int(out: &mut Vec<u8>, value: usize, prefix: u8, bits: u8) {
        loona_hpack::encoder::encode_integer_into(value, prefix, bits, out).unwrap();
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        int(out, s.len(), 7, 0);
        out.extend_from_slice(s);
    }

    /// A gRPC request block as C-core writes its first one: the authority indexed into the dynamic table.
    fn first_block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        int(&mut b, 4, 4, 0x00); // :path, literal without indexing
        string(&mut b, b"/v1beta1.DevicePlugin/ListAndWatch");
        int(&mut b, 1, 6, 0x40); // :authority, literal with incremental indexing
        string(&mut b, authority);
        int(&mut b, 31, 6, 0x40); // content-type, indexed into the table
        string(&mut b, b"application/grpc");
        b.push(0x00); // te: trailers, new name, without indexing
        string(&mut b, b"te");
        string(&mut b, b"trailers");
        b
    }

    fn feed(chunks: &[&[u8]]) -> Result<Vec<u8>, Malformed> {
        let mut a = AnyAuthority::new(());
        for c in chunks {
            a.raw.extend_from_slice(c);
            a.process()?;
        }
        Ok(a.out.to_vec())
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    }

    /// The frames after the preface: (type, flags, stream, payload).
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut v = Vec::new();
        while !rest.is_empty() {
            let h = FrameHead::parse(&rest[..FRAME_HEAD_LEN]);
            v.push((
                h.kind,
                h.flags,
                h.stream,
                rest[FRAME_HEAD_LEN..FRAME_HEAD_LEN + h.len].to_vec(),
            ));
            rest = &rest[FRAME_HEAD_LEN + h.len..];
        }
        v
    }

    /// Decodes every header block of the output as h2 would, one decoder for the connection.
    fn blocks(out: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut result = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, _, payload) in frames(out) {
            match kind {
                HEADERS => {
                    assert_eq!(flags & PADDED, 0, "no padding reaches h2");
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    block = payload[skip..].to_vec();
                }
                CONTINUATION => block.extend_from_slice(&payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                let list = decoder.decode(&block).unwrap();
                result.push(
                    list.into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
            }
        }
        result
    }

    fn authority(list: &[(String, String)]) -> Option<&str> {
        list.iter()
            .find(|(n, _)| n == ":authority")
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_socket_path_authority_is_served_as_localhost_and_the_rest_is_kept() {
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &first_block(SOCKET))]);
        let out = feed(&[&input]).unwrap();
        let lists = blocks(&out);
        assert_eq!(lists.len(), 1);
        let expected: Vec<(String, String)> = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/v1beta1.DevicePlugin/ListAndWatch"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(lists[0], expected);
    }

    #[test]
    fn every_form_h2_refuses_is_replaced_and_valid_ones_are_kept() {
        let percent = b"%2Fvar%2Flib%2Fkubelet%2Fdevice-plugins%2Fnvidia-vgpu-number.sock";
        for (sent, served) in [
            (SOCKET, "localhost"),
            (&percent[..], "localhost"),
            (&b""[..], "localhost"),
            (&b"localhost"[..], "localhost"),
            (&b"tonic"[..], "tonic"),
            (&b"127.0.0.1:10250"[..], "127.0.0.1:10250"),
        ] {
            let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &first_block(sent))]);
            let lists = blocks(&feed(&[&input]).unwrap());
            assert_eq!(
                authority(&lists[0]),
                Some(served),
                "{}",
                String::from_utf8_lossy(sent)
            );
        }
        // No authority at all is what h2 accepts too: nothing is added.
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &[0x83, 0x86, 0x84])]);
        let lists = blocks(&feed(&[&input]).unwrap());
        assert_eq!(authority(&lists[0]), None);
    }

    #[test]
    fn later_blocks_that_name_the_authority_by_dynamic_index_resolve_and_h2_s_table_stays_empty() {
        // Second request of the connection: everything the first one indexed is sent by index.
        // Dynamic table after the first block: 62 = content-type, 63 = :authority.
        let mut second = vec![0x83, 0x86];
        int(&mut second, 4, 4, 0x00);
        string(&mut second, b"/v1beta1.DevicePlugin/Allocate");
        second.extend_from_slice(&[0x80 | 63, 0x80 | 62]);
        let input = with_preface(&[
            frame(HEADERS, END_HEADERS, 1, &first_block(SOCKET)),
            frame(HEADERS, END_HEADERS, 3, &second),
        ]);
        let out = feed(&[&input]).unwrap();
        let lists = blocks(&out);
        assert_eq!(authority(&lists[1]), Some("localhost"));
        assert!(
            lists[1].contains(&("content-type".into(), "application/grpc".into())),
            "{:?}",
            lists[1]
        );
        // Each block we write stands alone: a fresh decoder reads the second one.
        let second_out = frames(&out).into_iter().find(|f| f.2 == 3).unwrap().3;
        let alone = loona_hpack::Decoder::new().decode(&second_out).unwrap();
        assert_eq!(alone.len(), lists[1].len());
    }

    #[test]
    fn padding_is_dropped_priority_and_end_stream_are_kept_and_continuations_are_joined() {
        let block = first_block(SOCKET);
        let (a, rest) = block.split_at(7);
        let (b, c) = rest.split_at(20);
        let priority = [0x80, 0, 0, 0, 41]; // exclusive on stream 0, weight 42
        let mut payload = vec![4]; // pad length
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0; 4]);
        let input = with_preface(&[
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload),
            frame(CONTINUATION, 0, 5, b),
            frame(CONTINUATION, END_HEADERS, 5, c),
        ]);
        // Byte by byte, as a slow socket delivers it, gives the same result as in one piece.
        let whole = feed(&[&input]).unwrap();
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed(&pieces).unwrap(), whole);
        let f = frames(&whole);
        assert_eq!(f.len(), 1, "one HEADERS frame: {f:?}");
        let (kind, flags, stream, payload) = &f[0];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_STREAM | END_HEADERS, 5)
        );
        assert_eq!(&payload[..5], &priority);
        assert_eq!(authority(&blocks(&whole)[0]), Some("localhost"));
    }

    #[test]
    fn other_frames_pass_through_byte_for_byte() {
        let others = [
            frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]),           // SETTINGS
            frame(0x4, ACK, 0, &[]),                           // SETTINGS ack
            frame(0x8, 0, 0, &[0, 1, 0, 0]),                   // WINDOW_UPDATE
            frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),       // PING
            frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 2, 8, 1]), // DATA
            frame(0xfa, 0, 0, b"unknown frames are ignored by h2"),
            frame(0x3, 0, 1, &[0, 0, 0, 8]), // RST_STREAM
        ];
        let input = with_preface(&others);
        assert_eq!(feed(&[&input]).unwrap(), input);
    }

    #[test]
    fn a_block_over_one_frame_is_split_into_frames_h2_accepts() {
        let mut block = first_block(SOCKET);
        block.push(0x00);
        string(&mut block, b"x-big");
        string(&mut block, &vec![b'a'; 40_000]);
        let mut frames_in = Vec::new();
        for (i, part) in block.chunks(DEFAULT_MAX_FRAME_SIZE).enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let last = (i + 1) * DEFAULT_MAX_FRAME_SIZE >= block.len();
            frames_in.push(frame(kind, if last { END_HEADERS } else { 0 }, 1, part));
        }
        let out = feed(&[&with_preface(&frames_in)]).unwrap();
        let f = frames(&out);
        assert!(f.len() >= 3);
        assert!(
            f.iter()
                .all(|(_, _, _, p)| p.len() <= DEFAULT_MAX_FRAME_SIZE)
        );
        let list = &blocks(&out)[0];
        assert_eq!(list.last().unwrap().1.len(), 40_000);
        assert_eq!(authority(list), Some("localhost"));
    }

    #[test]
    fn the_table_size_limit_follows_the_server_s_settings() {
        // A size update to 8192 opening the block: over the default 4096 limit...
        let mut block = vec![];
        int(&mut block, 8192, 5, 0x20);
        block.extend_from_slice(&first_block(SOCKET));
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        let err = feed(&[&input]).unwrap_err();
        assert!(matches!(err, Malformed::Hpack { stream: 1, .. }), "{err}");
        // ...and within it once the server has announced SETTINGS_HEADER_TABLE_SIZE = 8192.
        let mut a = AnyAuthority::new(());
        a.observe_server(&frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x20, 0]));
        a.raw.extend_from_slice(&input);
        a.process().unwrap();
        assert_eq!(authority(&blocks(&a.out)[0]), Some("localhost"));
    }

    #[test]
    fn the_server_s_max_frame_size_is_followed_across_split_writes() {
        let mut a = AnyAuthority::new(());
        let settings = frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0x80, 0]); // 32768
        let ping = frame(0x6, 0, 0, &[0; 8]);
        let mut written = ping.clone();
        written.extend_from_slice(&settings);
        for b in written.chunks(3) {
            a.observe_server(b);
        }
        assert_eq!(a.max_frame_size, 32_768);
        let err = feed(&[&with_preface(&[frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x82; 16_385],
        )])]);
        assert!(matches!(err, Err(Malformed::FrameTooLarge { .. })));
        a.raw.extend_from_slice(&with_preface(&[frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x82; 16_385],
        )]));
        a.process().unwrap();
    }

    fn refused(frames_in: &[Vec<u8>]) -> Malformed {
        feed(&[&with_preface(frames_in)]).unwrap_err()
    }

    #[test]
    fn malformed_input_is_a_connection_error_naming_what_was_wrong() {
        let ok = first_block(SOCKET);
        let e = feed(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]).unwrap_err();
        assert!(e.to_string().contains("client preface"), "{e}");
        // Refused as soon as the first bytes differ.
        assert!(feed(&[b"GET"]).is_err());

        let e = refused(&[frame(CONTINUATION, END_HEADERS, 1, &ok)]);
        assert_eq!(e, Malformed::ContinuationOutOfPlace { stream: 1 });

        let e = refused(&[frame(HEADERS, 0, 1, &ok[..5]), frame(0x6, 0, 0, &[0; 8])]);
        assert_eq!(
            e,
            Malformed::InterruptedBlock {
                kind: 0x6,
                stream: 0,
                open: 1
            }
        );
        let e = refused(&[
            frame(HEADERS, 0, 1, &ok[..5]),
            frame(CONTINUATION, END_HEADERS, 3, &ok[5..]),
        ]);
        assert!(matches!(e, Malformed::InterruptedBlock { open: 1, .. }));

        let e = refused(&[frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82])]);
        assert_eq!(e, Malformed::PushPromise { stream: 1 });
        assert_eq!(
            refused(&[frame(HEADERS, END_HEADERS, 0, &ok)]),
            Malformed::StreamZero
        );
        // Padding as long as the payload, and priority fields that do not fit.
        assert!(matches!(
            refused(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[3, 0x82, 0x86])]),
            Malformed::Padding { pad: 3, .. }
        ));
        assert!(matches!(
            refused(&[frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0, 0])]),
            Malformed::Padding { .. }
        ));
        assert!(matches!(
            refused(&[frame(HEADERS, END_HEADERS, 1, &[0x82; 16_385])]),
            Malformed::FrameTooLarge {
                len: 16_385,
                max: 16_384,
                ..
            }
        ));
        for (what, block) in [
            ("size update after a field", vec![0x82, 0x3f, 0xe1, 0x1f]),
            ("size update over the limit", vec![0x3f, 0xe2, 0x1f, 0x82]),
            ("size update ending the block", vec![0x82, 0x20]),
            ("index past the tables", vec![0x80 | 62]),
            ("index 0", vec![0x80]),
            ("string longer than the block", vec![0x04, 0x05, b'a']),
            ("bad Huffman padding", vec![0x04, 0x81, 0x00]),
            ("truncated integer", vec![0xff]),
        ] {
            let e = refused(&[frame(HEADERS, END_HEADERS, 1, &block)]);
            assert!(
                matches!(e, Malformed::Hpack { stream: 1, .. }),
                "{what}: {e}"
            );
        }
    }

    #[test]
    fn a_header_block_that_decodes_to_more_than_a_mebibyte_is_refused() {
        // 4000 bytes indexed once, then referenced 300 times: 4 KiB on the wire, 1.2 MB decoded.
        let mut block = vec![0x40];
        string(&mut block, b"x-bomb");
        string(&mut block, &[b'b'; 4000]);
        block.extend(std::iter::repeat_n(0x80 | 62, 300));
        let e = refused(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        assert_eq!(
            e,
            Malformed::BlockTooLarge {
                stream: 1,
                what: "decoded",
                max: MAX_LIST_BYTES
            }
        );
    }

    #[test]
    fn the_read_side_fails_with_invalid_data() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let mut input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &first_block(SOCKET))]);
            input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
            client.write_all(&input).await.unwrap();
            drop(client);
            let mut adapter = AnyAuthority::new(server);
            let mut got = Vec::new();
            let err = adapter.read_to_end(&mut got).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("CONTINUATION"), "{err}");
            // What came before the fault was delivered.
            assert_eq!(authority(&blocks(&got)[0]), Some("localhost"));
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever follows the preface, in whatever pieces, the adapter answers or refuses: it never panics.
        #[test]
        fn arbitrary_frames_never_panic(
            frames_in in proptest::collection::vec(
                (prop_oneof![Just(HEADERS), Just(CONTINUATION), Just(0u8), Just(0x6u8), any::<u8>()],
                 any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..64)),
                0..8),
            split in 1usize..50,
        ) {
            let frames_in: Vec<Vec<u8>> = frames_in
                .into_iter()
                .map(|(kind, flags, stream, payload)| frame(kind, flags, stream, &payload))
                .collect();
            let input = with_preface(&frames_in);
            let pieces: Vec<&[u8]> = input.chunks(split).collect();
            let _ = feed(&pieces);
        }

        /// Arbitrary HPACK in a well-formed HEADERS frame never panics either.
        #[test]
        fn arbitrary_hpack_never_panics(block in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = feed(&[&with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)])]);
        }
    }
}
