//! The node's one gRPC port: health, reflection, the public services (`recsys.v1`) and the
//! internal API, each behind the check it needs.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tonic_health::pb::health_server::{Health, HealthServer};

use super::{NodeError, NodeHandles};
use crate::api::admin::AdminService;
use crate::api::codes::SpecCodes;
use crate::api::ingest::IngestService;
use crate::api::pb;
use crate::api::recommender::RecommenderService;
use crate::auth::{ClusterKey, Guard};
use crate::cluster::metalog::MetaLog;
use crate::config::Config;
use crate::transport::pb as ipb;
use crate::transport::server::InternalService;

/// Starts serving on `listener` until `rx` turns true. Called before the node has loaded: the
/// services answer UNAVAILABLE (internal: until the ring formed) until `handles` are filled.
#[allow(clippy::too_many_arguments)] // the parts of the node its port needs, named at the one call site
pub(super) fn serve<H: Health>(
    cfg: &Config,
    handles: &NodeHandles,
    meta: Arc<OnceLock<Arc<MetaLog>>>,
    cluster_key: Option<ClusterKey>,
    tls: Option<&crate::transport::tls::NodeTls>,
    listener: tokio::net::TcpListener,
    health_service: HealthServer<H>,
    mut rx: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>, NodeError> {
    let err = |m: String| NodeError::Startup(m);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| err(e.to_string()))?;
    let max_msg = 64 * 1024 * 1024;
    // Internal calls need the cluster secret's MAC; Ingest and Admin the operator token (when
    // configured). Recommender, health and reflection stay open.
    let internal = InternalService {
        transport: handles.transport.clone(),
        pipeline: handles.pipeline.clone(),
        meta,
        key: cluster_key.clone(),
    };
    let token = crate::auth::operator_token(cfg);
    if token.as_deref().is_some_and(|t| !t.chars().all(|c| c.is_ascii_graphic())) {
        return Err(err("RECSYS_OPERATOR_TOKEN must be printable ASCII without spaces".into()));
    }
    if token.is_some() && cluster_key.is_none() {
        // The token guards Ingest and Admin; without the secret the internal API (which can
        // stream, write and page every partition) would stay open beside it.
        return Err(err("refusing to start: an operator token is set but no cluster secret (cluster.secret or \
             RECSYS_CLUSTER_SECRET): the internal API would be open to anyone who can reach the port"
            .into()));
    }
    if token.is_none() {
        tracing::info!("cluster.operator_token is empty: Ingest and Admin calls are not authenticated");
    }
    let operator = || crate::auth::Check::Operator(token.clone().map(String::into_bytes));
    // TLS only when `[tls]` is set (transport/tls.rs).
    let server = crate::transport::tls::server_builder(tls)
        .map_err(|e| err(format!("refusing to start: {e}")))?
        .layer(crate::metrics::GrpcMetricsLayer)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .add_service(health_service)
        .add_service(reflection)
        // SpecCodes: the spec's codes for expired deadlines and undecodable requests (see api::codes).
        .add_service(SpecCodes(
            pb::recommender_server::RecommenderServer::new(RecommenderService { pipeline: handles.pipeline.clone() })
                .max_decoding_message_size(max_msg),
        ))
        .add_service(SpecCodes(Guard::new(
            pb::ingest_server::IngestServer::new(IngestService {
                writer: handles.writer.clone(),
                logger: handles.logger.clone(),
            })
            .max_decoding_message_size(max_msg),
            operator(),
        )))
        .add_service(SpecCodes(Guard::new(
            pb::admin_server::AdminServer::new(AdminService { state: handles.admin.clone() }),
            operator(),
        )))
        // With mutual TLS, an internal call also needs a verified client certificate.
        .add_service(crate::transport::tls::RequireClientCert::new(
            SpecCodes(Guard::new(
                ipb::internal_server::InternalServer::new(internal)
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(max_msg),
                crate::auth::Check::Internal(cluster_key.clone(), cfg.node.node_id.clone()),
            )),
            tls.is_some_and(|t| t.mutual),
        ));
    // Small replies on a persistent connection: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Ok(tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await
    }))
}
