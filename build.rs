//! Generates the protobuf types from `proto/` with a pure-Rust proto compiler
//! (protox), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time; without this, a
    // new migration is not seen by an incremental build.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile(["proto/order_event.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    config.btree_map(["."]);
    // The kind messages double as the JSON form of the contract: same field
    // names, every field optional (proto3 defaults), prices as strings.
    for message in [
        "OrderPlaced",
        "StopLossAdded",
        "TakeProfitAdded",
        "StopLossCancelled",
        "TakeProfitCancelled",
        "CloseRequested",
        "PendingCancelled",
        "PendingModified",
        "ProviderConfirmation",
        "LegacyIdImported",
    ] {
        config.type_attribute(
            format!(".orderlifecycle.v1.{message}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        );
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
