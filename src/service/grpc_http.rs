//! gRPC over HTTP/2 by hand, for the one service whose payloads are large enough for it
//! to matter (ByteStream): request bodies read frame by frame, response bodies made of
//! our own buffers, statuses in trailers. Everything else goes through tonic's
//! generated servers. See docs/adr/0005-bytestream-without-tonic-buffers.md.

use super::MAX_MESSAGE_BYTES;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use std::convert::Infallible;
use tonic::body::Body;
use tonic::Status;

pub type HttpRequest = http::Request<Body>;
pub type HttpResponse = http::Response<Body>;

/// What a streaming response body is made of.
pub type BodyFrame = http_body::Frame<Bytes>;

const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// Refuses compressed requests: we advertise no compression, and a client that
/// compresses anyway must be told so clearly.
pub fn check_encoding(req: &HttpRequest) -> Result<(), Status> {
    match req.headers().get("grpc-encoding") {
        None => Ok(()),
        Some(v) if v.as_bytes() == b"identity" => Ok(()),
        Some(v) => Err(Status::unimplemented(format!(
            "the request is compressed with {:?}; this server takes no compressed messages",
            String::from_utf8_lossy(v.as_bytes())
        ))),
    }
}

/// Reads a unary request's one message.
pub async fn unary_request<M: prost::Message + Default>(
    mut body: Body,
    what: &str,
) -> Result<M, Status> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if buf.len() + data.len() > 5 + MAX_MESSAGE_BYTES {
            return Err(Status::out_of_range(format!(
                "{what} is larger than the {MAX_MESSAGE_BYTES} bytes allowed"
            )));
        }
        buf.extend_from_slice(&data);
    }
    // INTERNAL for a body that is not a message, as tonic answers (and gRPC's status code
    // specification has it).
    let truncated = || {
        Status::internal(format!(
            "failed to decode Protobuf message: the request body ended in the middle of a {what}"
        ))
    };
    match buf.len() {
        0 => {
            return Err(Status::invalid_argument(format!(
                "the request carried no {what}"
            )))
        }
        1..5 => return Err(truncated()),
        _ => {}
    }
    match buf[0] {
        0 => {}
        // check_encoding has refused every grpc-encoding but identity, and gRPC's
        // compression specification requires INTERNAL for a compressed flag without one.
        1 => {
            return Err(Status::internal(
                "protocol error: the message has the compressed flag set but the request \
                 has no grpc-encoding",
            ))
        }
        _ => {
            return Err(Status::internal(format!(
                "failed to decode Protobuf message: unknown gRPC message flag in a {what}"
            )))
        }
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(Status::out_of_range(format!(
            "{what} is larger than the {MAX_MESSAGE_BYTES} bytes allowed"
        )));
    }
    if buf.len() < 5 + len {
        return Err(truncated());
    }
    if buf.len() > 5 + len {
        return Err(Status::invalid_argument(format!(
            "a unary call must carry exactly one {what} ({} bytes after a {len}-byte message)",
            buf.len() - 5 - len
        )));
    }
    M::decode(&buf[5..])
        .map_err(|e| Status::internal(format!("failed to decode Protobuf message: {what}: {e}")))
}

/// A message with its gRPC length prefix.
pub fn message_frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf)
        .expect("the buffer was sized for the message");
    buf.freeze()
}

/// The prefix of a message whose only field is `bytes` field `field` of `len` bytes,
/// to be followed by those bytes: lets a large payload go out without being copied
/// into an encoded message.
pub fn bytes_message_prefix(field: u32, len: usize) -> Bytes {
    let key = u64::from(field << 3 | 2);
    let msg_len = prost::encoding::encoded_len_varint(key)
        + prost::encoding::encoded_len_varint(len as u64)
        + len;
    let mut buf = BytesMut::with_capacity(5 + 20);
    buf.put_u8(0);
    buf.put_u32(msg_len as u32);
    prost::encoding::encode_varint(key, &mut buf);
    prost::encoding::encode_varint(len as u64, &mut buf);
    buf.freeze()
}

/// The trailers that end a response with `status` (OK included).
pub fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if let Err(e) = status.add_header(&mut trailers) {
        // Only a message that cannot be a header value gets here; the code still can.
        let fallback = Status::new(status.code(), "");
        let _ = fallback.add_header(&mut trailers);
        tracing::warn!(error = %e, "status message could not be sent");
    }
    trailers
}

/// A response that is only a status (how gRPC reports an error before any message).
pub fn status_response(status: Status) -> HttpResponse {
    let mut response = http::Response::new(Body::empty());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    let trailers = status_trailers(&status);
    response.headers_mut().extend(trailers);
    response
}

/// A unary call's successful response.
pub fn unary_response(msg: &impl prost::Message) -> HttpResponse {
    let frames = [
        BodyFrame::data(message_frame(msg)),
        BodyFrame::trailers(status_trailers(&Status::ok(""))),
    ];
    body_response(Body::new(http_body_util::StreamBody::new(
        futures::stream::iter(frames.map(Ok::<_, Infallible>)),
    )))
}

pub fn body_response(body: Body) -> HttpResponse {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazel_remote_apis::google::bytestream::ReadResponse;
    use prost::Message;

    #[test]
    fn a_bytes_message_prefix_and_its_payload_decode_as_the_message() {
        for len in [0usize, 1, 127, 128, 16383, 16384, 1 << 20] {
            let payload = vec![0xabu8; len];
            let mut wire = bytes_message_prefix(10, len).to_vec();
            wire.extend_from_slice(&payload);
            let msg_len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
            assert_eq!(msg_len, wire.len() - 5);
            let decoded = ReadResponse::decode(&wire[5..]).unwrap();
            assert_eq!(decoded.data, payload);
            let mut encoded = message_frame(&ReadResponse { data: payload }).to_vec();
            if len == 0 {
                // An empty field is left out of the encoded message; both decode alike.
                encoded = wire.clone();
            }
            assert_eq!(wire, encoded);
        }
    }
}
