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
    let c = c.validate().unwrap();
    let r: dci_relay::RelayConfig = serde_yaml::from_str(&read("relay.yaml")).unwrap();
    let r = r.validate().unwrap();
    let e: dci_edge_cache::EdgeConfig = serde_yaml::from_str(&read("edge.yaml")).unwrap();
    let e = e.validate().unwrap();
    // Sizes as people write them.
    assert_eq!(c.retention_bytes, 1 << 30);
    assert_eq!(r.ring_bytes, 64 << 20);
    assert_eq!(e.capacity, 256 << 20);
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    assert!(serde_yaml::from_str::<dci_coordinator::CoordinatorConfig>("fsink: always").is_err());
    let c: dci_coordinator::CoordinatorConfig =
        serde_yaml::from_str("shard: 3\nshard_count: 2").unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("shard 3"));
    // No window: nothing could ever be sent, though heartbeats would still flow.
    let c: dci_coordinator::CoordinatorConfig = serde_yaml::from_str("window_bytes: 0").unwrap();
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("window_bytes"));
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
    // Shorter than two heartbeats: every healthy sender would be dropped as silent, over and over.
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://127.0.0.1:1]\npeer_timeout: 0s").unwrap();
    assert!(e
        .validate()
        .unwrap_err()
        .to_string()
        .contains("peer_timeout"));
    let r: dci_relay::RelayConfig =
        serde_yaml::from_str("upstream: [http://127.0.0.1:1]\npeer_timeout: 500ms").unwrap();
    assert!(r
        .validate()
        .unwrap_err()
        .to_string()
        .contains("peer_timeout"));
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://127.0.0.1:1]\nmax_tag_tombstones: 0").unwrap();
    assert!(e
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_tag_tombstones"));
    // A bound shorter than two heartbeats: an idle edge would answer misses most of the time.
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://127.0.0.1:1]\nmax_staleness: 200ms").unwrap();
    assert!(e
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_staleness"));
}

/// Longer than any clock can be moved by: a fill would have panicked the edge, the demo's
/// bookkeeping too. A key length of 0 would refuse every key; a tombstone table too large to
/// allocate took the edge down at its first invalidation.
#[test]
fn durations_beyond_a_century_and_sizes_that_cannot_work_are_refused() {
    let huge = "18446744073709551615s";
    for key in ["ttl", "max_staleness", "peer_timeout"] {
        let e: dci_edge_cache::EdgeConfig =
            serde_yaml::from_str(&format!("relays: [http://127.0.0.1:1]\n{key}: {huge}")).unwrap();
        let err = e.validate().unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("100 years"), "{err}");
    }
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://127.0.0.1:1]\nttl: 99years").unwrap();
    e.validate().unwrap();
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://127.0.0.1:1]\nmax_key_len: 0").unwrap();
    assert!(e
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_key_len"));
    // 2^30 slots asked for 32 GiB at the first invalidation, and the edge aborted then.
    for (n, ok) in [
        (0, false),
        (1 << 24, true),
        (1 << 25, false),
        (u64::MAX, false),
    ] {
        let e: dci_edge_cache::EdgeConfig = serde_yaml::from_str(&format!(
            "relays: [http://127.0.0.1:1]\nmax_tombstones: {n}"
        ))
        .unwrap();
        assert_eq!(e.validate().is_ok(), ok, "max_tombstones {n}");
    }
    // Shard ids from the network are below 65,536; a tier of more could not be followed.
    for (n, ok) in [(0u64, false), (1, true), (65_536, true), (65_537, false)] {
        let e: dci_edge_cache::EdgeConfig =
            serde_yaml::from_str(&format!("relays: [http://127.0.0.1:1]\nshard_count: {n}"))
                .unwrap();
        assert_eq!(e.validate().is_ok(), ok, "edge shard_count {n}");
        let c: dci_coordinator::CoordinatorConfig =
            serde_yaml::from_str(&format!("shard_count: {n}")).unwrap();
        match c.validate() {
            Ok(_) => assert!(ok, "coordinator shard_count {n}"),
            Err(e) => assert!(!ok && e.to_string().contains("shard_count"), "{n}: {e}"),
        }
    }
    for key in ["fsync_interval", "retention_age"] {
        let c: dci_coordinator::CoordinatorConfig =
            serde_yaml::from_str(&format!("{key}: {huge}")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains(key));
    }
    let r: dci_relay::RelayConfig = serde_yaml::from_str(&format!(
        "upstream: [http://127.0.0.1:1]\npeer_timeout: {huge}"
    ))
    .unwrap();
    assert!(r
        .validate()
        .unwrap_err()
        .to_string()
        .contains("peer_timeout"));
    let r: dci_relay::RelayConfig =
        serde_yaml::from_str("upstream: [http://127.0.0.1:1]\nmax_key_len: 0").unwrap();
    assert!(r
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_key_len"));
    let r: dci_relay::RelayConfig = serde_yaml::from_str(&format!(
        "upstream: [http://127.0.0.1:1]\notlp: {{ interval: {huge} }}"
    ))
    .unwrap();
    assert!(r
        .validate()
        .unwrap_err()
        .to_string()
        .contains("otlp interval"));
}

#[test]
fn a_relay_takes_one_failover_list_per_shard_group() {
    let yaml = "upstream: [http://c0a:7400, http://c0b:7400]\nupstream_groups: [[http://c1:7400]]";
    let r: dci_relay::RelayConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(
        r.clone().validate().unwrap().groups(),
        vec![
            vec!["http://c0a:7400".to_string(), "http://c0b:7400".to_string()],
            vec!["http://c1:7400".to_string()],
        ]
    );
    let twice = "upstream: [http://c0:7400]\nupstream_groups: [[http://c0:7400]]";
    let r: dci_relay::RelayConfig = serde_yaml::from_str(twice).unwrap();
    assert!(r.validate().unwrap_err().to_string().contains("two groups"));
    let empty = "upstream: [http://c0:7400]\nupstream_groups: [[]]";
    let r: dci_relay::RelayConfig = serde_yaml::from_str(empty).unwrap();
    assert!(r.validate().unwrap_err().to_string().contains("empty"));
    let bad = "upstream: [http://c0:7400]\nupstream_groups: [[c1:7400]]";
    let r: dci_relay::RelayConfig = serde_yaml::from_str(bad).unwrap();
    assert!(r.validate().unwrap_err().to_string().contains("http(s)"));
}

/// A list in a config file may be written as it is on the command line: one string, its items
/// comma-separated (`upstream: http://c0:7400` is one URL, not an error).
#[test]
fn a_list_may_be_one_string_of_comma_separated_items() {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let yaml = "upstream: http://c0a:7400\nupstream_groups: [\"http://c1a:7400, http://c1b:7400\", [http://c2:7400]]";
    let r: dci_relay::RelayConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(
        r.validate().unwrap().groups(),
        vec![
            strings(&["http://c0a:7400"]),
            strings(&["http://c1a:7400", "http://c1b:7400"]),
            strings(&["http://c2:7400"]),
        ]
    );
    let yaml =
        "relays: http://r0:7500,http://r1:7500\nprefixes: \"user:\"\nring_nodes: \"e0, e1,\"\n\
                tls: { allow: { cache: \"spiffe://prod/*\" } }";
    let e: dci_edge_cache::EdgeConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(e.relays, strings(&["http://r0:7500", "http://r1:7500"]));
    assert_eq!(e.prefixes, strings(&["user:"]));
    assert_eq!(e.ring_nodes, strings(&["e0", "e1"]));
    assert_eq!(e.tls.allow.cache, strings(&["spiffe://prod/*"]));
    // Lists stay lists; what is neither is refused, naming what was expected.
    let e: dci_edge_cache::EdgeConfig =
        serde_yaml::from_str("relays: [http://r0:7500, http://r1:7500]\nprefixes:").unwrap();
    assert_eq!(e.relays.len(), 2);
    assert!(e.prefixes.is_empty());
    let err = serde_yaml::from_str::<dci_edge_cache::EdgeConfig>("relays: {a: 1}").unwrap_err();
    assert!(
        err.to_string()
            .contains("a list, or a string of comma-separated items"),
        "{err}"
    );
}
