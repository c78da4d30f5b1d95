//! The generator's HTTP/1.1 client: one keep-alive connection, one request at a time.
//!
//! Written over the socket rather than through hyper's client because the generator shares the
//! cores with the server it measures: a request here is its head written into a buffer kept
//! from the last one, one `write`, and reads into another kept buffer until the reply's head
//! (parsed in place by `httparse`) and its `content-length` bytes (or its chunks) are in. No
//! header map, no body type, no channel to a connection task, no allocation once the buffers
//! have grown. Replies carry `content-length` (kabao's do) or are chunked; one with neither is
//! read to the end of the connection, as HTTP/1.1 says.

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most header lines of a reply that are looked at (kabao sends a handful).
const MAX_HEADERS: usize = 64;

/// A keep-alive connection to one `host:port`, (re)opened on demand.
pub struct Client {
    addr: String,
    /// `POST <path> HTTP/1.1`, `host` and `content-type`: the part of every head that never
    /// changes.
    head: Vec<u8>,
    stream: Option<TcpStream>,
    /// The request being written.
    out: Vec<u8>,
    /// What was read of the reply.
    input: Vec<u8>,
    /// The decoded body of a chunked reply.
    chunked: Vec<u8>,
    /// Where the last reply's body is: a range of `input`, or `chunked` when `None`.
    body: Option<(usize, usize)>,
}

/// How a reply's body ends.
enum Framing {
    Length(usize),
    Chunked,
    /// Neither: the body runs to the end of the connection (or is empty, for 1xx, 204, 304).
    Close,
}

impl Client {
    /// A client posting to `path` of `addr` (`host:port`), with `host` as the `Host` header.
    pub fn new(addr: &str, host: &str, path: &str) -> Self {
        let head = format!("POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n").into_bytes();
        Self {
            addr: addr.to_owned(),
            head,
            stream: None,
            out: Vec::with_capacity(512),
            input: Vec::with_capacity(8 * 1024),
            chunked: Vec::new(),
            body: None,
        }
    }

    /// Posts `body` with `authorization: <bearer>` and returns the reply's status; its body is
    /// then [`Client::body`]. A failed exchange drops the connection, so the next post opens a
    /// new one.
    pub async fn post(&mut self, bearer: &str, body: &[u8]) -> anyhow::Result<u16> {
        self.body = Some((0, 0));
        if self.stream.is_none() {
            let stream =
                TcpStream::connect(&self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        self.out.clear();
        self.out.extend_from_slice(&self.head);
        self.out.extend_from_slice(b"authorization: ");
        self.out.extend_from_slice(bearer.as_bytes());
        self.out.extend_from_slice(b"\r\ncontent-length: ");
        write_decimal(&mut self.out, body.len());
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(body);
        match self.exchange().await {
            Ok((status, keep_alive)) => {
                if !keep_alive {
                    self.stream = None;
                }
                Ok(status)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// The body of the last reply (empty after a failed post).
    pub fn body(&self) -> &[u8] {
        match self.body {
            Some((from, to)) => &self.input[from..to],
            None => &self.chunked,
        }
    }

    /// Writes `out` and reads one reply: its status and whether the connection stays open.
    async fn exchange(&mut self) -> anyhow::Result<(u16, bool)> {
        let Some(stream) = self.stream.as_mut() else { bail!("not connected") };
        stream.write_all(&self.out).await?;
        self.input.clear();
        let (status, head_len, framing, keep_alive) = loop {
            fill(stream, &mut self.input).await?;
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut reply = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head_len) = reply.parse(&self.input).context("reading the reply's head")?
            else {
                continue;
            };
            let status = reply.code.context("a reply without a status")?;
            let mut framing = Framing::Close;
            let mut keep_alive = reply.version == Some(1);
            for header in reply.headers.iter() {
                if header.name.eq_ignore_ascii_case("content-length") {
                    let text = std::str::from_utf8(header.value).ok().map(str::trim);
                    let length = text.and_then(|t| t.parse().ok()).context("a content-length that is no number")?;
                    framing = Framing::Length(length);
                } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                    if contains_token(header.value, b"chunked") {
                        framing = Framing::Chunked;
                    }
                } else if header.name.eq_ignore_ascii_case("connection") {
                    if contains_token(header.value, b"close") {
                        keep_alive = false;
                    } else if contains_token(header.value, b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            if matches!(status, 100..=199 | 204 | 304) {
                framing = Framing::Length(0);
            }
            break (status, head_len, framing, keep_alive);
        };
        match framing {
            Framing::Length(length) => {
                while self.input.len() < head_len + length {
                    fill(stream, &mut self.input).await?;
                }
                self.body = Some((head_len, head_len + length));
                Ok((status, keep_alive))
            }
            Framing::Chunked => {
                self.chunked.clear();
                let mut at = head_len;
                loop {
                    let line_end = loop {
                        if let Some(i) = find(&self.input[at..], b"\r\n") {
                            break at + i;
                        }
                        fill(stream, &mut self.input).await?;
                    };
                    let size_text = &self.input[at..line_end];
                    let size_text = size_text.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size_text)
                        .ok()
                        .and_then(|t| usize::from_str_radix(t.trim(), 16).ok())
                        .context("a chunk size that is no number")?;
                    at = line_end + 2;
                    if size == 0 {
                        // Trailers, if any, end with an empty line.
                        loop {
                            if self.input[at..].starts_with(b"\r\n") {
                                break;
                            }
                            if find(&self.input[at..], b"\r\n\r\n").is_some() {
                                break;
                            }
                            fill(stream, &mut self.input).await?;
                        }
                        self.body = None;
                        return Ok((status, keep_alive));
                    }
                    while self.input.len() < at + size + 2 {
                        fill(stream, &mut self.input).await?;
                    }
                    self.chunked.extend_from_slice(&self.input[at..at + size]);
                    at += size + 2;
                }
            }
            Framing::Close => {
                loop {
                    self.input.reserve(8 * 1024);
                    if stream.read_buf(&mut self.input).await? == 0 {
                        break;
                    }
                }
                self.body = Some((head_len, self.input.len()));
                Ok((status, false))
            }
        }
    }
}

/// Reads more of the reply into `input`; the connection ending first is an error.
async fn fill(stream: &mut TcpStream, input: &mut Vec<u8>) -> anyhow::Result<()> {
    input.reserve(8 * 1024);
    if stream.read_buf(input).await? == 0 {
        bail!("the server closed the connection mid-reply");
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive).
fn contains_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

fn write_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A server that answers each request it reads with the next of `replies`, written in
    /// pieces of `piece` bytes, and hands back what it read.
    async fn serve(replies: Vec<&'static [u8]>, piece: usize) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                // One request: its head, then its content-length bytes.
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 1024];
                    let n = socket.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the client went away");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = std::str::from_utf8(&buf[..end]).unwrap().to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map(|v| v.parse().unwrap())
                            .unwrap();
                        if buf.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                seen.extend_from_slice(&buf);
                for part in reply.chunks(piece) {
                    socket.write_all(part).await.unwrap();
                    socket.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
            seen
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_request_goes_out_whole_and_replies_are_read_by_their_framing() {
        let replies: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"accepted\":1}",
            b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        ];
        for piece in [1, 7, 4096] {
            let (addr, server) = serve(replies.clone(), piece).await;
            let mut client = Client::new(&addr, "example:1", "/v1/pings");
            assert_eq!(client.post("Bearer t", b"{\"x\":1}").await.unwrap(), 200);
            assert_eq!(client.body(), b"{\"accepted\":1}");
            assert_eq!(client.post("Bearer t", b"{}").await.unwrap(), 429);
            assert_eq!(client.body(), b"{\"a\":1}");
            assert_eq!(client.post("Bearer t", b"").await.unwrap(), 204);
            assert_eq!(client.body(), b"");
            assert!(client.stream.is_some(), "kept alive");
            assert_eq!(client.post("Bearer u", b"[]").await.unwrap(), 503);
            assert_eq!(client.body(), b"{}");
            assert!(client.stream.is_none(), "closed as the server said");
            let seen = String::from_utf8(server.await.unwrap()).unwrap();
            assert!(seen.starts_with(
                "POST /v1/pings HTTP/1.1\r\nhost: example:1\r\ncontent-type: application/json\r\nauthorization: Bearer t\r\ncontent-length: 7\r\n\r\n{\"x\":1}POST "
            ), "{seen}");
            assert!(seen.ends_with("authorization: Bearer u\r\ncontent-length: 2\r\n\r\n[]"), "{seen}");
        }
    }

    #[tokio::test]
    async fn a_server_gone_mid_reply_is_an_error_and_the_next_post_reconnects() {
        let (addr, server) = serve(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"a\""], 4096).await;
        let mut client = Client::new(&addr, "h", "/p");
        assert!(client.post("Bearer t", b"{}").await.is_err());
        assert!(client.stream.is_none());
        assert_eq!(client.body(), b"");
        server.await.unwrap();
        // Nobody listens there any more.
        assert!(client.post("Bearer t", b"{}").await.is_err());
    }

    #[test]
    fn decimals_and_tokens() {
        let mut out = Vec::new();
        for n in [0, 7, 10, 123_456, usize::MAX] {
            out.clear();
            write_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        assert!(contains_token(b"keep-alive, Close", b"close"));
        assert!(!contains_token(b"closed", b"close"));
    }
}
