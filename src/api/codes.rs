//! Status codes tonic picks below our handlers, corrected to what the gRPC spec gives a client:
//! - a `grpc-timeout` that expires on the server: tonic's own timer answers CANCELLED; the spec
//!   (and client retry logic) expects DEADLINE_EXCEEDED. Each call runs under the same deadline
//!   here, a moment earlier, so this answer wins.
//! - a request body that is not the declared message: tonic answers INTERNAL (undecodable) or
//!   OUT_OF_RANGE (larger than the limit); the client sent it, so INVALID_ARGUMENT and
//!   RESOURCE_EXHAUSTED.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// Wraps one generated gRPC service.
#[derive(Clone)]
pub struct SpecCodes<S>(pub S);

impl<S: NamedService> NamedService for SpecCodes<S> {
    const NAME: &'static str = S::NAME;
}

/// Our deadline fires this much before tonic's (same header, its timer started first).
const AHEAD: Duration = Duration::from_millis(1);

impl<S, B> Service<http::Request<B>> for SpecCodes<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(super::parse_timeout);
        let expired = || {
            metrics::counter!("recsys_deadline_exceeded_total").increment(1);
            Status::deadline_exceeded("the call's deadline (grpc-timeout) expired on the server before it finished")
                .into_http()
        };
        // A deadline shorter than our margin has expired on arrival: answered without running it.
        if timeout.is_some_and(|t| t <= AHEAD) {
            return Box::pin(async move { Ok(expired()) });
        }
        let call = self.0.call(req);
        Box::pin(async move {
            let resp = match timeout {
                None => call.await?,
                Some(t) => match tokio::time::timeout(t - AHEAD, call).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(expired()),
                },
            };
            Ok(remap(resp))
        })
    }
}

/// Rewrites tonic's decode failures (a trailers-only reply: the status is in the headers).
fn remap(resp: http::Response<Body>) -> http::Response<Body> {
    let Some(st) = Status::from_header_map(resp.headers()) else { return resp };
    let msg = st.message();
    let fixed = match st.code() {
        Code::Internal if msg.starts_with("failed to decode Protobuf message") || msg.starts_with("protocol error") => {
            Status::invalid_argument(format!("request: not a valid message of this method ({msg})"))
        }
        Code::OutOfRange if msg.contains("message length too large") => {
            Status::resource_exhausted(format!("request: larger than this method accepts ({msg})"))
        }
        _ => return resp,
    };
    fixed.into_http()
}
