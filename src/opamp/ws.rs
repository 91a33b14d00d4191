//! Server-side WebSocket framing (RFC 6455) for OpAMP, kept small for idle connections:
//! no buffer outlives a message. A frame's payload is read into a `Vec` of exactly its size
//! and dropped once the message is handled, where a general-purpose library keeps its read
//! and write buffers at the size of the largest message ever seen, for every connection.
//!
//! Only what OpAMP needs: binary messages (fragmented or not), ping/pong, close. Text
//! frames are reported so the session can refuse them. Client frames must be masked.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Binary(Vec<u8>),
    Text,
    Ping(Vec<u8>),
    /// The peer's close frame, with its status code if it gave one.
    Close(Option<u16>),
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    #[error("WebSocket protocol violation: {0}")]
    Protocol(&'static str),
    /// Messages being received on every connection together hold the whole budget.
    #[error("too many large messages are arriving at once")]
    Busy,
    /// A message began and did not end within the time allowed.
    #[error("a message was not completed within {0:?}")]
    Unfinished(Duration),
}

/// The memory every connection together may hold in messages still arriving. A frame's
/// payload is reserved before it is read and given back once its message is handed on.
#[derive(Clone, Debug)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self { used: Arc::default(), limit }
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes held now, by every connection.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// A frame's header: its first 2 bytes, then 4 to 12 more (extended length and mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    pub opcode: u8,
    pub length: u64,
    pub mask: [u8; 4],
}

impl Head {
    /// Checks a frame's first two bytes and says how many header bytes follow them.
    pub fn rest_len(first: [u8; 2]) -> Result<usize, WsError> {
        if first[0] & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        if first[1] & 0x80 == 0 {
            return Err(WsError::Protocol("client frames must be masked"));
        }
        Ok(4 + match first[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        })
    }

    /// The header from its first two bytes and the `rest_len` bytes after them.
    pub fn decode(first: [u8; 2], rest: &[u8]) -> Result<Head, WsError> {
        if rest.len() != Self::rest_len(first)? {
            return Err(WsError::Protocol("truncated frame header"));
        }
        let (length, mask) = rest.split_at(rest.len() - 4);
        let length = match *length {
            [] => u64::from(first[1] & 0x7F),
            [a, b] => u64::from(u16::from_be_bytes([a, b])),
            _ => u64::from_be_bytes(length.try_into().expect("8 bytes, from rest_len")),
        };
        let head = Head {
            fin: first[0] & 0x80 != 0,
            opcode: first[0] & 0x0F,
            length,
            mask: mask.try_into().expect("4 bytes"),
        };
        if head.is_control() && (!head.fin || head.length > 125) {
            return Err(WsError::Protocol("control frames must be whole and short"));
        }
        Ok(head)
    }

    fn is_control(&self) -> bool {
        self.opcode >= 0x8
    }
}

/// What a data frame costs beyond its payload while its message arrives: the `Vec` that
/// holds it, and what the allocator rounds up. A message sent a byte a frame costs that
/// much per byte, so the budget counts it.
pub const FRAGMENT_COST: usize = 64;

/// Assembles messages from frames, with no I/O: the part of reading a connection that a
/// fuzzer can drive. Holds the partial message while a fragmented one is arriving, as its
/// fragments (one `Vec` that grew with each would hold up to twice its size), joined once
/// it is whole.
#[derive(Debug)]
pub struct Assembler {
    /// The fragments of the message under way, and their length in all.
    partial: Option<(Vec<Vec<u8>>, usize)>,
    max_message: usize,
}

impl Assembler {
    pub fn new(max_message: usize) -> Self {
        Self { partial: None, max_message }
    }

    /// Whether a fragmented message is under way.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Checks a frame before its payload is read, and says how many bytes of memory it
    /// holds while the message arrives (control frames hold none).
    pub fn admit(&self, head: &Head) -> Result<usize, WsError> {
        if head.is_control() {
            return Ok(0);
        }
        let so_far = self.partial.as_ref().map_or(0, |(_, length)| *length) as u64;
        if so_far.saturating_add(head.length) > self.max_message as u64 {
            return Err(WsError::TooBig(self.max_message));
        }
        let length = usize::try_from(head.length).map_err(|_| WsError::TooBig(self.max_message))?;
        Ok(length + FRAGMENT_COST)
    }

    /// Takes an admitted frame's payload, still masked; returns a message once one is whole.
    pub fn accept(&mut self, head: &Head, mut payload: Vec<u8>) -> Result<Option<Incoming>, WsError> {
        for (index, byte) in payload.iter_mut().enumerate() {
            *byte ^= head.mask[index % 4];
        }
        match head.opcode {
            BINARY => {
                if self.partial.is_some() {
                    return Err(WsError::Protocol("a new message began inside a fragmented one"));
                }
                if head.fin {
                    return Ok(Some(Incoming::Binary(payload)));
                }
                let length = payload.len();
                self.partial = Some((vec![payload], length));
            }
            CONTINUATION => {
                let Some((mut fragments, length)) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                let length = length + payload.len();
                fragments.push(payload);
                if head.fin {
                    return Ok(Some(Incoming::Binary(fragments.concat())));
                }
                self.partial = Some((fragments, length));
            }
            TEXT => return Ok(Some(Incoming::Text)),
            CLOSE => {
                let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return Ok(Some(Incoming::Close(code)));
            }
            PING => return Ok(Some(Incoming::Ping(payload))),
            PONG => {}
            _ => return Err(WsError::Protocol("unknown opcode")),
        }
        Ok(None)
    }
}

/// Reads messages from one connection: the bytes come from `reader`, the frames are
/// understood by an [`Assembler`]. A partial message is held only within the shared
/// budget, and must be complete within `finish_within` of its first byte.
pub struct FrameReader<R> {
    reader: R,
    frames: Assembler,
    budget: Budget,
    /// Bytes this reader holds of the budget.
    held: usize,
    finish_within: Duration,
    /// When the message being received must be complete.
    deadline: Option<Instant>,
}

impl<R> Drop for FrameReader<R> {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, max_message: usize, budget: Budget, finish_within: Duration) -> Self {
        Self { reader, frames: Assembler::new(max_message), budget, held: 0, finish_within, deadline: None }
    }

    /// Reads exactly `buf`, by the deadline of the message under way if there is one.
    async fn fill(&mut self, buf: &mut [u8]) -> Result<(), WsError> {
        match self.deadline {
            None => self.reader.read_exact(buf).await.map(drop).map_err(WsError::from),
            Some(deadline) => match tokio::time::timeout_at(deadline, self.reader.read_exact(buf)).await {
                Ok(read) => read.map(drop).map_err(WsError::from),
                Err(_) => Err(WsError::Unfinished(self.finish_within)),
            },
        }
    }

    /// The budget this reader holds goes back, and no message is under way.
    fn settle(&mut self) {
        if !self.frames.in_message() {
            self.budget.give(std::mem::take(&mut self.held));
            self.deadline = None;
        }
    }

    /// The next message. Control frames in the middle of a fragmented message are returned
    /// as they come; the partial message is kept.
    pub async fn read_message(&mut self) -> Result<Incoming, WsError> {
        let incoming = self.next_message().await;
        self.settle();
        incoming
    }

    async fn next_message(&mut self) -> Result<Incoming, WsError> {
        loop {
            let mut first = [0u8; 2];
            self.fill(&mut first).await?;
            // From its first byte on, a frame (and the message it begins) has a deadline.
            self.deadline.get_or_insert_with(|| Instant::now() + self.finish_within);
            let mut rest = [0u8; 12];
            let rest = &mut rest[..Head::rest_len(first)?];
            self.fill(rest).await?;
            let head = Head::decode(first, rest)?;
            let holds = self.frames.admit(&head)?;
            if !self.budget.take(holds) {
                return Err(WsError::Busy);
            }
            self.held += holds;
            let mut payload = vec![0u8; head.length as usize];
            self.fill(&mut payload).await?;
            match self.frames.accept(&head, payload)? {
                Some(incoming) => return Ok(incoming),
                // A pong is not a message: between messages, the connection is idle again.
                None if !self.frames.in_message() => self.deadline = None,
                None => {}
            }
        }
    }
}

/// One unmasked, unfragmented frame (servers do not mask), written and flushed.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        short @ 0..=125 => frame.push(short as u8),
        medium @ 126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(medium as u16).to_be_bytes());
        }
        long => {
            frame.push(127);
            frame.extend_from_slice(&(long as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// The payload of a close frame: status code and reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    payload
}

/// A frame as a client sends it (RFC 6455 §5.2: masked with `mask`), for the tests and
/// the benches that play clients.
pub fn masked_frame(fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        short @ 0..=125 => frame.push(0x80 | short as u8),
        medium @ 126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(medium as u16).to_be_bytes());
        }
        long => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(long as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ mask[i % 4]));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser or opamp-go would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        masked_frame(fin, opcode, [0x12, 0x34, 0x56, 0x78], payload)
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<Incoming, String>> {
        let mut reader = FrameReader::new(bytes.as_slice(), max, Budget::new(usize::MAX), Duration::from_secs(5));
        let mut out = Vec::new();
        loop {
            match reader.read_message().await {
                Ok(message) => out.push(Ok(message)),
                Err(WsError::Io(_)) => return out,
                Err(error) => {
                    out.push(Err(error.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn whole_and_fragmented_binary_messages_with_control_frames_between() {
        let big = vec![7u8; 70_000];
        let mut bytes = client_frame(true, BINARY, b"\x00hello");
        bytes.extend(client_frame(false, BINARY, b"ab"));
        bytes.extend(client_frame(true, PING, b"are you there"));
        bytes.extend(client_frame(false, CONTINUATION, b"cd"));
        bytes.extend(client_frame(true, CONTINUATION, b"ef"));
        bytes.extend(client_frame(true, PONG, b""));
        bytes.extend(client_frame(true, BINARY, &big));
        bytes.extend(client_frame(true, CLOSE, &close_payload(1000, "bye")));
        assert_eq!(
            read_all(bytes, 100_000).await,
            vec![
                Ok(Incoming::Binary(b"\x00hello".to_vec())),
                Ok(Incoming::Ping(b"are you there".to_vec())),
                Ok(Incoming::Binary(b"abcdef".to_vec())),
                Ok(Incoming::Binary(big)),
                Ok(Incoming::Close(Some(1000))),
            ]
        );
    }

    #[tokio::test]
    async fn violations_and_limits() {
        let too_big = client_frame(true, BINARY, &[0; 2000]);
        assert_eq!(read_all(too_big, 1000).await, vec![Err("message larger than 1000 bytes".into())]);
        let mut fragmented = client_frame(false, BINARY, &[0; 600]);
        fragmented.extend(client_frame(true, CONTINUATION, &[0; 600]));
        assert_eq!(read_all(fragmented, 1000).await, vec![Err("message larger than 1000 bytes".into())]);
        let mut unmasked = client_frame(true, BINARY, b"x");
        unmasked[1] &= 0x7F;
        unmasked.truncate(2);
        assert_eq!(
            read_all(unmasked, 1000).await,
            vec![Err("WebSocket protocol violation: client frames must be masked".into())]
        );
        assert_eq!(
            read_all(client_frame(true, CONTINUATION, b"x"), 1000).await,
            vec![Err("WebSocket protocol violation: continuation without a message".into())]
        );
        assert_eq!(read_all(client_frame(true, TEXT, b"hi"), 1000).await, vec![Ok(Incoming::Text)]);
        let mut reserved = client_frame(true, BINARY, b"x");
        reserved[0] |= 0x40;
        assert_eq!(read_all(reserved, 1000).await, vec![Err("WebSocket protocol violation: reserved bits set".into())]);
    }

    #[tokio::test]
    async fn messages_still_arriving_share_one_budget_and_give_it_back() {
        let budget = Budget::new(1000);
        let (mut first_client, first_server) = tokio::io::duplex(4096);
        let (mut second_client, second_server) = tokio::io::duplex(4096);
        let mut first = FrameReader::new(first_server, 1000, budget.clone(), Duration::from_secs(5));
        let mut second = FrameReader::new(second_server, 1000, budget.clone(), Duration::from_secs(5));

        // The first connection's message is half there, with a ping in between.
        first_client.write_all(&client_frame(false, BINARY, &[1; 600])).await.expect("write");
        first_client.write_all(&client_frame(true, PING, b"")).await.expect("write");
        assert_eq!(first.read_message().await.expect("the ping"), Incoming::Ping(Vec::new()));
        assert_eq!(budget.used(), 600 + FRAGMENT_COST, "the partial message holds its bytes");

        // The second cannot take 600 more.
        second_client.write_all(&client_frame(true, BINARY, &[2; 600])).await.expect("write");
        assert!(matches!(second.read_message().await, Err(WsError::Busy)));
        drop(second);
        assert_eq!(budget.used(), 600 + FRAGMENT_COST);

        first_client.write_all(&client_frame(true, CONTINUATION, &[1; 100])).await.expect("write");
        assert_eq!(first.read_message().await.expect("the whole message"), Incoming::Binary(vec![1; 700]));
        assert_eq!(budget.used(), 0, "given back once the message is handed on");

        // A reader dropped halfway through a message gives its share back too.
        first_client.write_all(&client_frame(false, BINARY, &[1; 300])).await.expect("write");
        first_client.write_all(&client_frame(true, PING, b"")).await.expect("write");
        first.read_message().await.expect("the ping");
        assert_eq!(budget.used(), 300 + FRAGMENT_COST);
        drop(first);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_message_a_byte_a_frame_pays_for_each_frame() {
        let budget = Budget::new(1000);
        let mut bytes = client_frame(false, BINARY, b"a");
        for _ in 0..100 {
            bytes.extend(client_frame(false, CONTINUATION, b"b"));
        }
        let mut reader = FrameReader::new(bytes.as_slice(), 1000, budget.clone(), Duration::from_secs(5));
        assert!(matches!(reader.read_message().await, Err(WsError::Busy)), "101 bytes, but 101 frames");
        assert_eq!(budget.used(), (1000 / (1 + FRAGMENT_COST)) * (1 + FRAGMENT_COST));
        drop(reader);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_message_must_finish_in_time_but_an_idle_connection_may_wait() {
        let within = Duration::from_millis(100);
        let (mut client, server) = tokio::io::duplex(4096);
        let mut reader = FrameReader::new(server, 1000, Budget::new(1000), within);

        // Idle, and idle again after a pong: no deadline.
        client.write_all(&client_frame(true, PONG, b"")).await.expect("write");
        let idle = tokio::time::timeout(within * 3, reader.read_message()).await;
        assert!(idle.is_err(), "still waiting for a message: {idle:?}");

        // A message that starts and stalls.
        client.write_all(&client_frame(false, BINARY, &[1; 10])).await.expect("write");
        let started = Instant::now();
        let stalled = tokio::time::timeout(within * 10, reader.read_message()).await.expect("ends by itself");
        assert!(matches!(stalled, Err(WsError::Unfinished(_))), "{stalled:?}");
        assert!(started.elapsed() >= within);

        // So does a frame whose payload stops halfway.
        let (mut client, server) = tokio::io::duplex(4096);
        let mut reader = FrameReader::new(server, 1000, Budget::new(1000), within);
        let frame = client_frame(true, BINARY, &[1; 50]);
        client.write_all(&frame[..20]).await.expect("write");
        let stalled = tokio::time::timeout(within * 10, reader.read_message()).await.expect("ends by itself");
        assert!(matches!(stalled, Err(WsError::Unfinished(_))), "{stalled:?}");
    }

    #[tokio::test]
    async fn server_frames_are_unmasked_with_the_right_length_encoding() {
        for size in [0usize, 125, 126, 65_535, 65_536] {
            let payload = vec![3u8; size];
            let mut out = Vec::new();
            write_frame(&mut out, BINARY, &payload).await.expect("write");
            assert_eq!(out[0], 0x82, "FIN + binary");
            assert_eq!(out[1] & 0x80, 0, "servers do not mask");
            let header = match size {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), header + size);
        }
    }
}
