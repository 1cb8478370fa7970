//! The generated gRPC code (from `proto/`): the public API and the internal one between nodes.
//! Low in the layering so that modules below the services (the ingest validator, the metadata
//! log) can name messages; `api::pb` and `transport::pb` re-export these.
pub mod public {
    tonic::include_proto!("recsys.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("recsys_descriptor");
}

pub mod internal {
    tonic::include_proto!("recsys.internal.v1");
}
