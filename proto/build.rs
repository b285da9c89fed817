//! Generates the protobuf and gRPC code of `proto/dci.proto` at build time.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a crate so a fresh machine needs no system package.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(
            std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("dci_descriptor.bin"),
        )
        .compile_protos(&["proto/dci.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/dci.proto");
    Ok(())
}
