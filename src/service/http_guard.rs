//! Refuses HTTP requests that are not gRPC calls before any service sees them.
//!
//! Neither tonic's generated servers nor our ByteStream look at the method or the
//! content type. A web page can make a browser send a cross-origin POST whose content
//! type is `text/plain` (or a form encoding) without asking the server first (no CORS
//! preflight): on a push port without client certificates such a request, carrying a
//! gRPC-framed body, would be decoded and stored. A browser cannot send
//! `application/grpc` without a preflight, which this server never answers, so
//! requiring it closes that door. The gRPC HTTP/2 specification asks servers to answer
//! a content type that is not gRPC with HTTP 415, so that no HTTP client takes a gRPC
//! error (HTTP 200) for success; a wrong method gets 405 for the same reason.

use futures::future::Either;
use std::future::Ready;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::Service;

/// Wraps a service so that only gRPC requests reach it.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcOnlyLayer;

impl<S> tower_layer::Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> GrpcOnly<S> {
        GrpcOnly(inner)
    }
}

#[derive(Clone, Debug)]
pub struct GrpcOnly<S>(S);

impl<S> Service<http::Request<Body>> for GrpcOnly<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match refusal(&req) {
            None => Either::Left(self.0.call(req)),
            Some(response) => Either::Right(std::future::ready(Ok(response))),
        }
    }
}

/// The media types of gRPC with protobuf messages, the only encoding our services
/// decode (`application/grpc+json` and gRPC-Web are other protocols).
fn is_grpc_content_type(value: &http::HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let media_type = value.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("application/grpc")
        || media_type.eq_ignore_ascii_case("application/grpc+proto")
}

/// The HTTP error for a request that is not a gRPC call, or None for a gRPC call.
fn refusal(req: &http::Request<Body>) -> Option<http::Response<Body>> {
    let (status, why) = if req.method() != http::Method::POST {
        (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "this is a gRPC server: calls are POST requests\n",
        )
    } else if !req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(is_grpc_content_type)
    {
        (
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this is a gRPC server: calls have content-type application/grpc\n",
        )
    } else {
        return None;
    };
    tracing::debug!(
        method = %req.method(),
        path = req.uri().path(),
        content_type = ?req.headers().get(http::header::CONTENT_TYPE),
        status = status.as_u16(),
        "refused a request that is not a gRPC call"
    );
    // A response to HEAD has no body: the HTTP/2 client treats one as a protocol error.
    let body = if req.method() == http::Method::HEAD {
        Body::empty()
    } else {
        Body::new(http_body_util::Full::new(bytes::Bytes::from_static(
            why.as_bytes(),
        )))
    };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == http::StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        for good in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
            "application/grpc; charset=utf-8",
        ] {
            assert!(
                is_grpc_content_type(&http::HeaderValue::from_static(good)),
                "{good}"
            );
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc+json",
            "application/grpcx",
            "",
        ] {
            assert!(
                !is_grpc_content_type(&http::HeaderValue::from_static(bad)),
                "{bad}"
            );
        }
    }
}
