# The recsys node image: FROM scratch, built offline from files this machine already has.
#
# Build it with scripts/image.sh (not `docker build .` from the repository root): the script stages
# the build context, rootfs/ and data/, from the release binary (target/release/recsys), the ONNX
# Runtime library scripts/setup.sh fetched (.cache/onnxruntime/libonnxruntime.so.1.32.0), the
# models (models/), the config (config/node.toml) and every shared library the binary and the
# library link, as `ldd` lists them (the dynamic loader included), at the paths ldd names. No base
# image is pulled: no registry is reachable from these machines, and nothing else is needed.
#
# Layout (the Kubernetes manifests and cluster/compose.yaml rely on it):
#   /usr/local/bin/recsys                      the binary (also the client: recsys health|status|load|recommend)
#   /opt/recsys/lib/libonnxruntime.so.1.32.0   ONNX Runtime, found through ORT_DYLIB_PATH
#   /opt/recsys/models                         manifest.json + ONNX files
#   /etc/recsys/node.toml                      config/node.toml; flags override its [node] keys
#   /data                                      the node's data dir (sled, cluster.json, logs): a volume
#   /etc/passwd, /etc/group                    user and group recsys, 10001:10001 (no shell)
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /data/
ENV ORT_DYLIB_PATH=/opt/recsys/lib/libonnxruntime.so.1.32.0 \
    RECSYS_ADDR=127.0.0.1:7400
WORKDIR /opt/recsys
USER 10001:10001
VOLUME ["/data"]
# gRPC (TCP) and gossip (UDP) share 7400; Prometheus metrics and the status page on 9400.
EXPOSE 7400/tcp 7400/udp 9400/tcp
# Healthy = the node's gRPC health is SERVING (data replayed, models loaded, first ring formed).
# A node waiting for the other initial nodes is NOT_SERVING, so the start period is generous.
HEALTHCHECK --interval=5s --timeout=4s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/recsys", "health", "--addr", "127.0.0.1:7400"]
ENTRYPOINT ["/usr/local/bin/recsys"]
# One node alone; a cluster passes --node-id, --advertise-addr, --seeds and --initial-nodes too
# (see cluster/compose.yaml and cluster/k8s/).
CMD ["node", "--config", "/etc/recsys/node.toml", "--listen", "0.0.0.0:7400", "--advertise-addr", "127.0.0.1:7400", \
     "--data-dir", "/data", "--metrics-listen", "0.0.0.0:9400", "--models-dir", "/opt/recsys/models"]
