//! The `:authority` the fake kubelet's dial-back calls carry, in each form real kubelets and gRPC clients send.
//!
//! tonic's own client only sends an authority that `http::uri::Authority` accepts, so the three other forms are
//! written onto the wire by [`RewriteAuthority`]: it sits under tonic's client connection, decodes every header
//! block the client writes (HPACK, mirroring the client's dynamic table) and encodes it again with the chosen
//! `:authority`, the way C-core clients do: the first block opens with a dynamic table size update, the
//! authority goes into the dynamic table once and is sent by index afterwards, and each block travels in a
//! padded, prioritised HEADERS frame and two CONTINUATION frames. Everything else passes unchanged. This is the
//! test side; it trusts its own h2 client and panics on nothing, but it does not defend against it.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How the kubelet's dial-back names the plugin's socket in `:authority`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum AuthorityForm {
    /// `localhost`: kubelets from 1.26 (kubernetes#112597), grpc-go from 1.31.
    #[default]
    Localhost,
    /// The socket path as it is, e.g. `/var/lib/kubelet/device-plugins/nvidia-vgpu-number.sock`: kubelets
    /// before 1.26, grpc-java, older grpcurl.
    RawPath,
    /// The socket path percent-encoded (`%2Fvar%2Flib%2F…`): gRPC C-core from 1.57 (Python `grpcio`, C++).
    PercentEncodedPath,
    /// An empty `:authority`: older grpc-go with a custom dialer.
    Empty,
}

impl AuthorityForm {
    /// Every form, for tests that run under each.
    pub const ALL: [Self; 4] = [
        Self::Localhost,
        Self::RawPath,
        Self::PercentEncodedPath,
        Self::Empty,
    ];

    /// The bytes sent for a socket, or `None` when tonic's client sends this form itself.
    pub fn value(self, socket: &Path) -> Option<Vec<u8>> {
        let path = socket.as_os_str().as_encoded_bytes();
        match self {
            Self::Localhost => None,
            Self::RawPath => Some(path.to_vec()),
            Self::PercentEncodedPath => Some(percent_encode(path)),
            Self::Empty => Some(Vec::new()),
        }
    }
}

/// Every byte but RFC 3986's unreserved ones as `%XX`, so `/` becomes `%2F` as C-core writes it.
fn percent_encode(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() * 2);
    for &b in path {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

use h2_frames::{
    CONTINUATION, END_HEADERS, END_STREAM, FRAME_HEAD_LEN as HEAD_LEN, FrameHead, HEADERS, PADDED,
    PREFACE, PRIORITY, encode_integer as encode_int, encode_string as encode_str, frame_head,
};

const PREFACE_LEN: usize = PREFACE.len();
/// The dynamic-table index of the one entry this encoder ever inserts (the first after the 61 static ones).
const AUTHORITY_INDEX: u8 = 62;

/// A client connection whose request header blocks carry `authority` (all traffic passes when `None`).
pub(crate) struct RewriteAuthority<S> {
    io: S,
    authority: Option<Vec<u8>>,
    /// Bytes the client wrote, not yet parsed.
    written: BytesMut,
    /// Bytes ready for the socket.
    wire: BytesMut,
    preface_done: bool,
    /// Payload bytes of the current pass-through frame still to come.
    passing: usize,
    /// A header block being collected: stream, END_STREAM, fragment.
    open: Option<(u32, bool, Vec<u8>)>,
    decoder: loona_hpack::Decoder<'static>,
    first_block: bool,
    authority_indexed: bool,
}

impl<S> std::fmt::Debug for RewriteAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewriteAuthority")
            .field(
                "authority",
                &self.authority.as_deref().map(String::from_utf8_lossy),
            )
            .finish_non_exhaustive()
    }
}

impl<S> RewriteAuthority<S> {
    pub(crate) fn new(io: S, authority: Option<Vec<u8>>) -> Self {
        Self {
            io,
            authority,
            written: BytesMut::new(),
            wire: BytesMut::new(),
            preface_done: false,
            passing: 0,
            open: None,
            decoder: loona_hpack::Decoder::new(),
            first_block: true,
            authority_indexed: false,
        }
    }

    fn process(&mut self) -> io::Result<()> {
        let Some(authority) = self.authority.clone() else {
            let all = self.written.split();
            self.wire.extend_from_slice(&all);
            return Ok(());
        };
        loop {
            if !self.preface_done {
                if self.written.len() < PREFACE_LEN {
                    return Ok(());
                }
                self.wire
                    .extend_from_slice(&self.written.split_to(PREFACE_LEN));
                self.preface_done = true;
            }
            if self.passing > 0 {
                let n = self.passing.min(self.written.len());
                if n == 0 {
                    return Ok(());
                }
                self.wire.extend_from_slice(&self.written.split_to(n));
                self.passing -= n;
                continue;
            }
            if self.written.len() < HEAD_LEN {
                return Ok(());
            }
            let FrameHead {
                len,
                kind,
                flags,
                stream,
            } = FrameHead::parse(&self.written);
            if kind != HEADERS && kind != CONTINUATION {
                self.wire
                    .extend_from_slice(&self.written.split_to(HEAD_LEN));
                self.passing = len;
                continue;
            }
            if self.written.len() < HEAD_LEN + len {
                return Ok(());
            }
            self.written.advance(HEAD_LEN);
            let payload = self.written.split_to(len);
            if kind == HEADERS {
                // tonic's client sends neither padding nor priority; anything else is a harness bug.
                if flags & (PADDED | PRIORITY) != 0 {
                    return Err(io::Error::other("the h2 client sent padding or priority"));
                }
                self.open = Some((stream, flags & END_STREAM != 0, Vec::new()));
            }
            let Some((stream, end_stream, mut fragment)) = self.open.take() else {
                return Err(io::Error::other("the h2 client sent a stray CONTINUATION"));
            };
            fragment.extend_from_slice(&payload);
            if flags & END_HEADERS == 0 {
                self.open = Some((stream, end_stream, fragment));
                continue;
            }
            let block = self.reencode(&fragment, &authority)?;
            self.write_block(stream, end_stream, &block);
        }
    }

    fn reencode(&mut self, fragment: &[u8], authority: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        if self.first_block {
            self.first_block = false;
            // A size update to the default, as C-core opens its first block.
            encode_int(&mut out, 4096, 5, 0x20);
        }
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(fragment, |n, v| {
                fields.push((n.into_owned(), v.into_owned()))
            })
            .map_err(|e| io::Error::other(format!("harness HPACK decode: {e}")))?;
        for (name, value) in &fields {
            if name == b":authority" {
                if self.authority_indexed {
                    encode_int(&mut out, usize::from(AUTHORITY_INDEX), 7, 0x80);
                } else {
                    // Literal with incremental indexing, name from the static table (index 1).
                    encode_int(&mut out, 1, 6, 0x40);
                    encode_str(&mut out, authority);
                    self.authority_indexed = true;
                }
                continue;
            }
            // Literal without indexing, so the dynamic table only ever holds the authority.
            out.push(0x00);
            encode_str(&mut out, name);
            encode_str(&mut out, value);
        }
        Ok(out)
    }

    /// A padded, prioritised HEADERS frame and two CONTINUATION frames.
    fn write_block(&mut self, stream: u32, end_stream: bool, block: &[u8]) {
        let first = block.len().min(8);
        let middle = (block.len() - first) / 2;
        let (a, rest) = block.split_at(first);
        let (b, c) = rest.split_at(middle);
        let pad = [0u8; 3];
        let priority = [0, 0, 0, 0, 15];
        let mut flags = PADDED | PRIORITY;
        if end_stream {
            flags |= END_STREAM;
        }
        head(
            &mut self.wire,
            1 + priority.len() + a.len() + pad.len(),
            HEADERS,
            flags,
            stream,
        );
        self.wire.extend_from_slice(&[pad.len() as u8]);
        self.wire.extend_from_slice(&priority);
        self.wire.extend_from_slice(a);
        self.wire.extend_from_slice(&pad);
        head(&mut self.wire, b.len(), CONTINUATION, 0, stream);
        self.wire.extend_from_slice(b);
        head(&mut self.wire, c.len(), CONTINUATION, END_HEADERS, stream);
        self.wire.extend_from_slice(c);
    }
}

fn head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&frame_head(len, kind, flags, stream));
}

impl<S: AsyncWrite + Unpin> RewriteAuthority<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wire.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wire))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wire.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RewriteAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RewriteAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        this.written.extend_from_slice(buf);
        this.process()?;
        // What is not on the socket yet goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
