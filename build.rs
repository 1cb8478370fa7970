// Compiles proto/ into tonic services with a vendored protoc (none is installed on the build machines),
// and writes a descriptor set so the node can serve gRPC reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("recsys_descriptor.bin"))
        .compile_protos(&["proto/recsys/v1/recsys.proto", "proto/recsys/internal/v1/internal.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
