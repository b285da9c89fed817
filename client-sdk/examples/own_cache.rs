//! An application's own cache kept coherent by the stream: a map of typed rows the SDK's caches
//! do not hold, from which a `Subscription` drops what each invalidation names. It keeps its
//! position, so that a later run goes on where this one stopped.
//!
//! Against a running tier (the README's "Running the components"), with some publishes:
//!
//! ```sh
//! cargo run -p dci-sdk --example own_cache -- http://127.0.0.1:7500
//! dci publish --coordinator http://127.0.0.1:7400 user:1 user:2   # in another shell
//! ```

use std::collections::BTreeMap;

use dci_sdk::{Event, Kind, Subscription, SubscriptionOptions};

/// A row as the application holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    /// The user's name.
    pub name: String,
}

/// The application's cache: rows by key, sorted so that a prefix's keys sit together.
pub type Users = BTreeMap<String, User>;

/// Drop from `users` what one event says is stale.
pub fn apply(users: &mut Users, event: &Event) {
    match event {
        Event::Invalidations { entries, .. } => {
            for e in entries {
                let key = String::from_utf8_lossy(&e.key).to_string();
                match e.kind {
                    Kind::Key => {
                        users.remove(&key);
                    }
                    Kind::Prefix => users.retain(|k, _| !k.starts_with(&key)),
                    // Every value of the stream's keys (this map keeps no tags, and a tag
                    // may name any of its rows).
                    Kind::All | Kind::Tag => users.clear(),
                }
            }
        }
        // The stream could not be kept whole, or it is joined (at the head, the first event):
        // nothing held from before can be vouched for.
        Event::Flush { .. } => users.clear(),
        // Told for the record; its batch carries what stands in for it.
        Event::Quarantined { key, why, .. } => {
            eprintln!("poison in the stream ({why}): {}", key.escape_ascii());
        }
    }
}

/// Follow `relay` from `resume`, dropping from `users`, until some shard's position reaches
/// `until` (none: for ever); returns where it stopped, to resume from.
pub async fn run(
    relay: String,
    users: &mut Users,
    resume: Vec<(u32, u64, u64)>,
    until: Option<u64>,
) -> Result<Vec<(u32, u64, u64)>, dci_sdk::Error> {
    let mut sub = Subscription::start(SubscriptionOptions {
        senders: vec![relay],
        resume,
        ..Default::default()
    })?;
    let reached = |position: &[(u32, u64, u64)]| {
        until.is_some_and(|seq| position.iter().any(|&(_, _, s)| s >= seq))
    };
    while !reached(&sub.position()) {
        let Some(event) = sub.next().await else { break };
        apply(users, &event);
        println!(
            "at {:?}: holding {:?}",
            sub.position(),
            users.keys().collect::<Vec<_>>()
        );
    }
    Ok(sub.position())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let relay = std::env::args()
        .nth(1)
        .unwrap_or("http://127.0.0.1:7500".into());
    let mut users: Users = (1..=3)
        .map(|i| {
            (
                format!("user:{i}"),
                User {
                    name: format!("user {i}"),
                },
            )
        })
        .collect();
    println!("holding {:?}", users.keys().collect::<Vec<_>>());
    run(relay, &mut users, Vec::new(), None).await?;
    Ok(())
}
