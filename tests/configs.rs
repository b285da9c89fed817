//! The example configs in deploy/ parse and validate with the real config types.

#[test]
fn example_configs_are_valid() {
    let read = |p: &str| {
        std::fs::read_to_string(format!(
            "{}/deploy/examples/{p}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let c: dci_coordinator::CoordinatorConfig =
        serde_yaml::from_str(&read("coordinator.yaml")).unwrap();
    c.validate().unwrap();
    let r: dci_relay::RelayConfig = serde_yaml::from_str(&read("relay.yaml")).unwrap();
    r.validate().unwrap();
    let e: dci_edge_cache::EdgeConfig = serde_yaml::from_str(&read("edge.yaml")).unwrap();
    e.validate().unwrap();
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    assert!(serde_yaml::from_str::<dci_coordinator::CoordinatorConfig>("fsink: always").is_err());
    let c: dci_coordinator::CoordinatorConfig =
        serde_yaml::from_str("shard: 3\nshard_count: 2").unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("shard 3"));
    let r: dci_relay::RelayConfig = serde_yaml::from_str("upstream: [localhost:1]").unwrap();
    assert!(r.validate().is_err());
    let with_otlp =
        "upstream: [http://127.0.0.1:1]\notlp: { endpoint: http://127.0.0.1:4317, interval: 2s }";
    let r: dci_relay::RelayConfig = serde_yaml::from_str(with_otlp).unwrap();
    assert_eq!(r.otlp.interval, std::time::Duration::from_secs(2));
    r.validate().unwrap();
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://127.0.0.1:1]\notlp: { endpoint: collector }")
            .unwrap();
    assert!(e
        .validate()
        .unwrap_err()
        .to_string()
        .contains("otlp endpoint"));
    assert!(serde_yaml::from_str::<dci_edge_cache::EdgeConfig>("otlp: { endpiont: x }").is_err());
}
