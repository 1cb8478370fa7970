//! gRPC services of a node (recsys.v1) and the mapping from module errors to status codes.
pub mod admin;
pub mod codes;
pub mod ingest;
pub mod recommender;

use std::time::Duration;

use tonic::Status;

pub use crate::proto::public as pb;

use crate::ingest::IngestError;
use crate::pipeline::PipelineError;

impl From<PipelineError> for Status {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::InvalidArgument(m) => Status::invalid_argument(m),
            PipelineError::NotFound(m) => Status::not_found(m),
            PipelineError::DeadlineExceeded { .. } => Status::deadline_exceeded(e.to_string()),
            PipelineError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            PipelineError::Unavailable(m) => Status::unavailable(m),
            PipelineError::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
            IngestError::Invalid(m) => Status::invalid_argument(m),
            IngestError::Store(_) | IngestError::Internal(_) => Status::internal(e.to_string()),
            IngestError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// Parses the client's `grpc-timeout` header ("100m", "2S", ...).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    parse_timeout(meta.get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value: at most 8 digits and a unit (the spec's limit; longer is ignored).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", "150m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(150)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
