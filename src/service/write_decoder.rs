//! Streaming decoder for a ByteStream.Write request body: gRPC length-prefixed messages
//! carrying `google.bytestream.WriteRequest`, decoded as the bytes arrive.
//!
//! tonic would gather each whole message (2 MiB from buildbox-casd) into a growing
//! buffer and copy its `data` into a `Vec` before we see it. Here the `data` field is
//! handed out as slices of the HTTP/2 frames it arrived in, so an upload's bytes are
//! copied once (into an aligned buffer that goes straight to the disk) and the memory a
//! stream holds does not depend on the client's message size. The small fields
//! (`resource_name`, `write_offset`, `finish_write`) are reported when their message
//! ends; fields may come in any order and unknown fields are skipped, as protobuf
//! requires. See docs/adr/0005-bytestream-without-tonic-buffers.md.

use bytes::{Buf, Bytes};

/// Largest `resource_name` (or skipped unknown field) we hold in memory.
pub const MAX_SMALL_FIELD: usize = 64 << 10;

// WriteRequest field numbers (google/bytestream/bytestream.proto).
const RESOURCE_NAME: u32 = 1;
const WRITE_OFFSET: u32 = 2;
const FINISH_WRITE: u32 = 3;
const DATA: u32 = 10;

/// The fields of one WriteRequest other than its data.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MessageHeader {
    pub resource_name: String,
    pub write_offset: i64,
    pub finish_write: bool,
    /// Bytes of `data` the message carried (already handed out as [`Event::Data`]).
    pub data_len: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The next piece of the current message's `data`.
    Data(Bytes),
    /// The current message is complete.
    End(MessageHeader),
}

/// Why a request body could not be decoded; every case is the client's fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Only reachable without a `grpc-encoding` (any other is refused before decoding).
    #[error("protocol error: a message has the compressed flag set but the request has no grpc-encoding")]
    Compressed,
    #[error("malformed WriteRequest: {0}")]
    Malformed(&'static str),
    #[error("the data field appears twice in one WriteRequest")]
    DataTwice,
    #[error("WriteRequest field {field} is {len} bytes, more than the {MAX_SMALL_FIELD} allowed")]
    FieldTooLarge { field: u32, len: u64 },
    #[error("the request body ended in the middle of a message")]
    Truncated,
}

#[derive(Debug)]
enum State {
    /// Reading the 5-byte gRPC message prefix.
    Prefix { buf: [u8; 5], have: usize },
    /// Reading a field key (a varint) or, with nothing left, at the message's end.
    Key,
    /// Reading a varint field's value.
    Varint { field: u32 },
    /// Reading a length-delimited field's length.
    Length { field: u32 },
    /// Handing out `data` bytes.
    Data { left: u64 },
    /// Gathering a small length-delimited field.
    Small {
        field: u32,
        left: usize,
        buf: Vec<u8>,
    },
    /// Skipping an unknown field's bytes.
    Skip { left: u64 },
}

pub struct WriteDecoder {
    state: State,
    /// Bytes of the current message not yet consumed.
    msg_left: u64,
    /// A varint being assembled across input pieces.
    varint: u64,
    shift: u32,
    header: MessageHeader,
}

impl Default for WriteDecoder {
    fn default() -> Self {
        WriteDecoder {
            state: State::Prefix {
                buf: [0; 5],
                have: 0,
            },
            msg_left: 0,
            varint: 0,
            shift: 0,
            header: MessageHeader::default(),
        }
    }
}

impl WriteDecoder {
    /// Consumes bytes from the front of `input` up to and including the next event, or
    /// all of it if it holds none (then `Ok(None)`: feed the next piece).
    pub fn next(&mut self, input: &mut Bytes) -> Result<Option<Event>, DecodeError> {
        loop {
            if let State::Prefix { buf, have } = &mut self.state {
                let n = (5 - *have).min(input.len());
                buf[*have..*have + n].copy_from_slice(&input[..n]);
                input.advance(n);
                *have += n;
                if *have < 5 {
                    return Ok(None);
                }
                match buf[0] {
                    0 => {}
                    1 => return Err(DecodeError::Compressed),
                    _ => return Err(DecodeError::Malformed("unknown gRPC message flag")),
                }
                self.msg_left = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as u64;
                self.state = State::Key;
                self.varint = 0;
                self.shift = 0;
                continue;
            }
            if self.msg_left == 0 {
                return match self.state {
                    State::Key if self.shift == 0 => {
                        self.state = State::Prefix {
                            buf: [0; 5],
                            have: 0,
                        };
                        Ok(Some(Event::End(std::mem::take(&mut self.header))))
                    }
                    _ => Err(DecodeError::Malformed(
                        "a field runs past the end of its message",
                    )),
                };
            }
            if input.is_empty() {
                return Ok(None);
            }
            match &mut self.state {
                State::Prefix { .. } => unreachable!("handled above"),
                State::Key => {
                    let Some(key) = self.take_varint(input)? else {
                        continue;
                    };
                    let field = u32::try_from(key >> 3)
                        .map_err(|_| DecodeError::Malformed("field number out of range"))?;
                    if field == 0 {
                        return Err(DecodeError::Malformed("field number 0"));
                    }
                    self.state = match (key & 7, field) {
                        (0, _) => State::Varint { field },
                        (2, _) => State::Length { field },
                        (1, RESOURCE_NAME | WRITE_OFFSET | FINISH_WRITE | DATA)
                        | (5, RESOURCE_NAME | WRITE_OFFSET | FINISH_WRITE | DATA) => {
                            return Err(DecodeError::Malformed("a known field has the wrong type"))
                        }
                        (1, _) => State::Skip { left: 8 },
                        (5, _) => State::Skip { left: 4 },
                        _ => return Err(DecodeError::Malformed("unsupported wire type")),
                    };
                }
                State::Varint { field } => {
                    let field = *field;
                    let Some(value) = self.take_varint(input)? else {
                        continue;
                    };
                    match field {
                        WRITE_OFFSET => self.header.write_offset = value as i64,
                        FINISH_WRITE => self.header.finish_write = value != 0,
                        RESOURCE_NAME | DATA => {
                            return Err(DecodeError::Malformed("a known field has the wrong type"))
                        }
                        _ => {}
                    }
                    self.state = State::Key;
                }
                State::Length { field } => {
                    let field = *field;
                    let Some(len) = self.take_varint(input)? else {
                        continue;
                    };
                    if len > self.msg_left {
                        return Err(DecodeError::Malformed(
                            "a field runs past the end of its message",
                        ));
                    }
                    self.state = match field {
                        WRITE_OFFSET | FINISH_WRITE => {
                            return Err(DecodeError::Malformed("a known field has the wrong type"))
                        }
                        // Nothing to gather; the last value of a field is the one that counts.
                        RESOURCE_NAME if len == 0 => {
                            self.header.resource_name.clear();
                            State::Key
                        }
                        _ if len == 0 => State::Key,
                        DATA => {
                            if self.header.data_len > 0 {
                                // Protobuf would keep only the last; we have already
                                // passed the first one on.
                                return Err(DecodeError::DataTwice);
                            }
                            State::Data { left: len }
                        }
                        RESOURCE_NAME if len > MAX_SMALL_FIELD as u64 => {
                            return Err(DecodeError::FieldTooLarge { field, len })
                        }
                        RESOURCE_NAME => State::Small {
                            field,
                            left: len as usize,
                            buf: Vec::with_capacity(len as usize),
                        },
                        _ => State::Skip { left: len },
                    };
                }
                State::Data { left } => {
                    let n = (*left).min(input.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Key;
                    }
                    self.msg_left -= n as u64;
                    self.header.data_len += n as u64;
                    return Ok(Some(Event::Data(input.split_to(n))));
                }
                State::Small { field, left, buf } => {
                    let n = (*left).min(input.len());
                    buf.extend_from_slice(&input[..n]);
                    input.advance(n);
                    *left -= n;
                    self.msg_left -= n as u64;
                    if *left == 0 {
                        debug_assert_eq!(*field, RESOURCE_NAME);
                        self.header.resource_name = String::from_utf8(std::mem::take(buf))
                            .map_err(|_| DecodeError::Malformed("resource_name is not UTF-8"))?;
                        self.state = State::Key;
                    }
                }
                State::Skip { left } => {
                    if *left > self.msg_left {
                        return Err(DecodeError::Malformed(
                            "a field runs past the end of its message",
                        ));
                    }
                    let n = (*left).min(input.len() as u64) as usize;
                    input.advance(n);
                    *left -= n as u64;
                    self.msg_left -= n as u64;
                    if *left == 0 {
                        self.state = State::Key;
                    }
                }
            }
        }
    }

    /// The current message's `resource_name`, if it came before the data being decoded
    /// (as every encoder we know puts it), else empty.
    pub fn resource_name(&self) -> &str {
        &self.header.resource_name
    }

    /// The current message's `write_offset` as decoded so far: protobuf's default, 0,
    /// until the field comes (every encoder we know puts it before the data).
    pub fn write_offset(&self) -> i64 {
        self.header.write_offset
    }

    /// Whether the body may end here: between messages.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Prefix { have: 0, .. })
    }

    /// Takes varint bytes from `input` (at least one is there and the message has one
    /// left); the value once its last byte has arrived.
    fn take_varint(&mut self, input: &mut Bytes) -> Result<Option<u64>, DecodeError> {
        while !input.is_empty() && self.msg_left > 0 {
            let b = input[0];
            input.advance(1);
            self.msg_left -= 1;
            if self.shift >= 64 || (self.shift == 63 && b > 1) {
                return Err(DecodeError::Malformed("varint longer than 10 bytes"));
            }
            self.varint |= u64::from(b & 0x7f) << self.shift;
            self.shift += 7;
            if b & 0x80 == 0 {
                let v = self.varint;
                self.varint = 0;
                self.shift = 0;
                return Ok(Some(v));
            }
        }
        if self.msg_left == 0 {
            return Err(DecodeError::Malformed(
                "a varint runs past the end of its message",
            ));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazel_remote_apis::google::bytestream::WriteRequest;
    use prost::Message;

    fn framed(msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    fn req(name: &str, offset: i64, finish: bool, data: &[u8]) -> Vec<u8> {
        WriteRequest {
            resource_name: name.into(),
            write_offset: offset,
            finish_write: finish,
            data: data.to_vec(),
        }
        .encode_to_vec()
    }

    /// Decodes `body` fed in pieces of `piece` bytes; the data and headers seen.
    fn decode(body: &[u8], piece: usize) -> Result<(Vec<u8>, Vec<MessageHeader>), DecodeError> {
        let mut d = WriteDecoder::default();
        let (mut data, mut headers) = (Vec::new(), Vec::new());
        for chunk in body.chunks(piece.max(1)) {
            let mut input = Bytes::copy_from_slice(chunk);
            while let Some(ev) = d.next(&mut input)? {
                match ev {
                    Event::Data(b) => data.extend_from_slice(&b),
                    Event::End(h) => headers.push(h),
                }
            }
            assert!(input.is_empty());
        }
        if !d.at_boundary() {
            return Err(DecodeError::Truncated);
        }
        Ok((data, headers))
    }

    #[test]
    fn messages_decode_alike_whatever_the_pieces() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let body = framed(&[
            req("uploads/u/blobs/abc/70001", 0, false, &payload[..40_000]),
            req("", 40_000, false, &[]),
            req("", 40_000, true, &payload[40_000..]),
        ]);
        for piece in [1, 2, 5, 6, 7, 1000, 16384, body.len()] {
            let (data, headers) = decode(&body, piece).unwrap();
            assert!(data == payload, "piece {piece}");
            assert_eq!(headers.len(), 3);
            assert_eq!(headers[0].resource_name, "uploads/u/blobs/abc/70001");
            assert_eq!(headers[0].data_len, 40_000);
            assert_eq!((headers[1].write_offset, headers[1].data_len), (40_000, 0));
            assert!(headers[2].finish_write && headers[2].resource_name.is_empty());
        }
    }

    #[test]
    fn field_order_and_unknown_fields_do_not_matter() {
        // data first, then unknown fields of every skippable type, then the rest.
        let mut m = Vec::new();
        m.extend_from_slice(&[0x52, 3, b'x', b'y', b'z']); // 10: data
        m.extend_from_slice(&[0x38, 0x96, 0x01]); // 7: varint
        m.extend_from_slice(&[0x41, 1, 2, 3, 4, 5, 6, 7, 8]); // 8: fixed64
        m.extend_from_slice(&[0x4d, 1, 2, 3, 4]); // 9: fixed32
        m.extend_from_slice(&[0x5a, 2, 0, 0]); // 11: bytes
        m.extend_from_slice(&[0x18, 1, 0x10, 5, 0x0a, 1, b'n']); // 3, 2, 1
        let (data, headers) = decode(&framed(&[m]), 1).unwrap();
        assert_eq!(data, b"xyz");
        assert_eq!(
            headers,
            vec![MessageHeader {
                resource_name: "n".into(),
                write_offset: 5,
                finish_write: true,
                data_len: 3,
            }]
        );
    }

    #[test]
    fn an_empty_message_is_all_defaults() {
        let (data, headers) = decode(&framed(&[vec![]]), 3).unwrap();
        assert!(data.is_empty());
        assert_eq!(headers, vec![MessageHeader::default()]);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let bad = |body: Vec<u8>| decode(&body, 4).unwrap_err();
        assert_eq!(bad(vec![1, 0, 0, 0, 0]), DecodeError::Compressed);
        assert!(matches!(
            bad(vec![2, 0, 0, 0, 0]),
            DecodeError::Malformed(_)
        ));
        assert_eq!(bad(vec![0, 0, 0, 0, 9, 0x52]), DecodeError::Truncated);
        // A data field longer than its message.
        assert!(matches!(
            bad(framed(&[vec![0x52, 9, 1]])),
            DecodeError::Malformed(_)
        ));
        // data as a varint; write_offset as bytes.
        assert!(matches!(
            bad(framed(&[vec![0x50, 1]])),
            DecodeError::Malformed(_)
        ));
        assert!(matches!(
            bad(framed(&[vec![0x12, 0]])),
            DecodeError::Malformed(_)
        ));
        // Field 0, a group, an overlong varint, a varint cut by the message end.
        assert!(matches!(
            bad(framed(&[vec![0x00, 0]])),
            DecodeError::Malformed(_)
        ));
        assert!(matches!(
            bad(framed(&[vec![0x1b]])),
            DecodeError::Malformed(_)
        ));
        assert!(matches!(
            bad(framed(&[vec![
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f
            ]])),
            DecodeError::Malformed(_)
        ));
        assert!(matches!(
            bad(framed(&[vec![0x10, 0x80]])),
            DecodeError::Malformed(_)
        ));
        // Two data fields in one message.
        assert_eq!(
            bad(framed(&[vec![0x52, 1, 0, 0x52, 1, 0]])),
            DecodeError::DataTwice
        );
        // A huge resource name, and a name that is not UTF-8.
        let mut m = vec![0x0a, 0x80, 0x80, 0x08];
        m.resize(m.len() + (128 << 10), b'a');
        assert!(matches!(
            bad(framed(&[m])),
            DecodeError::FieldTooLarge { .. }
        ));
        assert!(matches!(
            bad(framed(&[vec![0x0a, 1, 0xff]])),
            DecodeError::Malformed(_)
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A fixed pseudo-random walk over short garbage bodies.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let body: Vec<u8> = (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i < 5 {
                        [0, 0, 0, 0, (len as u8).wrapping_sub(5)][i]
                    } else {
                        x as u8
                    }
                })
                .collect();
            let _ = decode(&body, 1 + len % 7);
        }
    }
}
