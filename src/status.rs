//! `dci status`: the tree every coordinator of a tier reports, merged, as a table or JSON.

use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use dci_proto::pb;
use dci_proto::types::printable;

use crate::{connect, status_line, url_item, ClientTlsArgs};

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Coordinator (or any node) URL; with a sharded tier, every shard's, comma-separated (the
    /// trees are merged: a node appears once per sender it follows).
    #[arg(long, value_delimiter = ',', value_parser = url_item, default_value = "http://127.0.0.1:7400")]
    coordinator: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

/// The tree below every coordinator of a tier, merged; an error if any does not answer (a
/// part of the tree would be missing).
pub(crate) async fn tier_tree(
    urls: &[String],
    tls: &dci_proto::tls::ClientTls,
) -> anyhow::Result<Vec<pb::NodeStatus>> {
    let mut nodes = Vec::new();
    for url in urls {
        merge_tree(&mut nodes, node_tree(url, tls).await?);
    }
    Ok(nodes)
}

/// The tree one node reports: itself first, then every node below it.
pub(crate) async fn node_tree(
    url: &str,
    tls: &dci_proto::tls::ClientTls,
) -> anyhow::Result<Vec<pb::NodeStatus>> {
    // A tree of tens of thousands of nodes is more than the default 4 MiB.
    let mut client = pb::admin_client::AdminClient::new(connect(url, tls).await?)
        .max_decoding_message_size(64 << 20);
    let r = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow!("{url}: {}", status_line(&s, "a dci node", url, tls)))?;
    Ok(r.into_inner().nodes)
}

/// Add `more` to `nodes`: a node seen again under the same parent (an edge that every shard's
/// tree reports) is one row per shard, the freshest report of each.
pub(crate) fn merge_tree(nodes: &mut Vec<pb::NodeStatus>, more: Vec<pb::NodeStatus>) {
    for n in more {
        let Some(m) = nodes
            .iter_mut()
            .find(|m| m.node_id == n.node_id && m.parent == n.parent)
        else {
            nodes.push(n);
            continue;
        };
        for s in n.shards {
            match m.shards.iter_mut().find(|x| x.shard == s.shard) {
                Some(x) if x.hwm >= s.hwm => {}
                Some(x) => *x = s,
                None => m.shards.push(s),
            }
        }
        m.shards.sort_by_key(|s| s.shard);
    }
}

pub(crate) async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let tls = a.tls.client()?;
    let mut nodes = Vec::new();
    let mut failed = None;
    for url in &a.coordinator {
        match node_tree(url, &tls).await {
            Ok(more) => merge_tree(&mut nodes, more),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    // With one shard unreachable, the others' trees are still worth seeing before the error.
    if nodes.is_empty() {
        return Err(failed.unwrap_or_else(|| anyhow!("no node answered")));
    }
    let r = pb::StatusResponse { nodes };
    if a.json {
        let nodes: Vec<_> = r
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node_id": n.node_id, "role": n.role, "region": n.region, "parent": n.parent,
                    "connected_ms": n.connected_ms,
                    // A cache's staleness bound; null for the other roles.
                    "max_staleness_ms": (n.max_staleness_ms > 0).then_some(n.max_staleness_ms),
                    // How many nodes a summary stands for (a report had no room for them): of
                    // each shard, the least progress among them; null for a node.
                    "left_out": (n.left_out > 0).then_some(n.left_out),
                    // Why the node refuses its work until it is restarted; null for one that does it.
                    "failure": (!n.failure.is_empty()).then_some(&n.failure),
                    "shards": n.shards.iter().map(shard_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        crate::out::say!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes }))?
        )?;
        return failed.map_or(Ok(()), Err);
    }
    // Columns as wide as the longest name in them (a default name carries region and host).
    fn shown(n: &pb::NodeStatus) -> std::borrow::Cow<'_, str> {
        match n.left_out {
            0 => printable(&n.node_id),
            more => format!("{more} {}", printable(&n.node_id)).into(),
        }
    }
    let node_w = r
        .nodes
        .iter()
        .map(|n| shown(n).chars().count())
        .fold(28, usize::max);
    let region_w = r
        .nodes
        .iter()
        .map(|n| printable(&n.region).chars().count())
        .fold(10, usize::max);
    crate::out::say!(
        "{:<node_w$} {:<12} {:<region_w$} {:>6} {:>12} {:>10} {:>8} {:>10} {:>12}  parent",
        "node",
        "role",
        "region",
        "shard",
        "hwm",
        "lag_seqs",
        "lag_ms",
        "caught_up",
        "connected"
    )?;
    let mut past_bound = false;
    for n in &r.nodes {
        // Names come from the nodes themselves, any receiver's report included.
        let (node_id, role, region, parent) = (
            shown(n),
            printable(&n.role),
            printable(&n.region),
            printable(&n.parent),
        );
        let connected =
            humantime::format_duration(Duration::from_secs(n.connected_ms / 1000)).to_string();
        if n.shards.is_empty() {
            crate::out::say!(
                "{:<node_w$} {:<12} {:<region_w$} {:>6} {:>12} {:>10} {:>8} {:>10} {:>12}  {}",
                node_id,
                role,
                region,
                "-",
                "-",
                "-",
                "-",
                "-",
                connected,
                parent
            )?;
        }
        for s in &n.shards {
            // Seconds ago, all the way to the coordinator: what the staleness bound looks at.
            let mut caught_up = match s.caught_up_ms {
                u64::MAX => "never".to_string(),
                ms => format!("{:.1}s", ms as f64 / 1000.0),
            };
            if n.max_staleness_ms > 0 && s.caught_up_ms > n.max_staleness_ms {
                past_bound = true;
                caught_up.push('*');
            }
            crate::out::say!(
                "{:<node_w$} {:<12} {:<region_w$} {:>6} {:>12} {:>10} {:>8} {:>10} {:>12}  {}",
                node_id,
                role,
                region,
                s.shard,
                s.hwm,
                s.lag_seqs,
                s.lag_ms,
                caught_up,
                connected,
                parent
            )?;
        }
    }
    if past_bound {
        crate::out::say!("* a cache past its staleness bound: it answers only misses for the shard until it has caught up")?;
    }
    for n in r.nodes.iter().filter(|n| !n.failure.is_empty()) {
        crate::out::say!("! {}: {}", printable(&n.node_id), printable(&n.failure))?;
    }
    failed.map_or(Ok(()), Err)
}

/// One shard of a node in `dci status --json`; `caught_up_ms` is null for a node never caught up.
fn shard_json(s: &pb::ShardProgress) -> serde_json::Value {
    serde_json::json!({
        "shard": s.shard, "epoch": s.epoch, "hwm": s.hwm, "lag_seqs": s.lag_seqs, "lag_ms": s.lag_ms,
        "caught_up_ms": (s.caught_up_ms != u64::MAX).then_some(s.caught_up_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::{pb, shard_json};

    #[test]
    fn a_node_never_caught_up_has_no_caught_up_time_in_json() {
        let mut s = pb::ShardProgress {
            hwm: 7,
            caught_up_ms: 1500,
            ..Default::default()
        };
        assert_eq!(shard_json(&s)["caught_up_ms"], 1500);
        s.caught_up_ms = u64::MAX;
        assert!(shard_json(&s)["caught_up_ms"].is_null());
        assert_eq!(shard_json(&s)["hwm"], 7);
    }
}
