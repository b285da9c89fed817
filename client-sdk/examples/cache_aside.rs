//! Cache-aside with dci: read through an edge (loading from the database on a miss), write the
//! database, invalidate the key with the row's version, wait until every cache has applied it,
//! and read the write back.
//!
//! Against a running tier (the README's "Running the components"):
//!
//! ```sh
//! cargo run -p dci-sdk --example cache_aside -- http://127.0.0.1:7400 http://127.0.0.1:7600
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dci_sdk::{CacheClient, Fill, Lookup, Publisher};

/// The "database": a row per key, with its version.
type Database = Arc<Mutex<HashMap<String, (u64, String)>>>;

/// What a miss loads: the row as it is now, with its version, so that the edge refuses the
/// fill if it already applied an invalidation of a newer one (a row read from a replica behind
/// the write).
async fn load(db: Database, key: &str) -> Result<Fill, String> {
    let rows = db.lock().map_err(|e| e.to_string())?;
    let (version, row) = rows.get(key).ok_or(format!("no row {key}"))?;
    Ok(Fill::new(row.clone()).version(*version))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let coordinator = args.next().unwrap_or("http://127.0.0.1:7400".into());
    let edge = args.next().unwrap_or("http://127.0.0.1:7600".into());
    run(coordinator, edge).await
}

/// The walk-through, against the coordinator and the edge at these URLs.
pub async fn run(coordinator: String, edge: String) -> Result<(), Box<dyn std::error::Error>> {
    let key = "user:42:profile";
    let db: Database = Arc::default();
    db.lock().unwrap().insert(key.into(), (1, "Ada".into()));

    let publisher = Publisher::connect(vec![coordinator]).await?;
    let cache = CacheClient::from_urls(vec![edge])?;

    let read = cache.get_or_load(key, || load(db.clone(), key)).await?;
    println!("read {key}: {}", String::from_utf8_lossy(&read));
    // The miss was filled: the edge holds the row now.
    if let Lookup::Hit(cached) = cache.get(key).await? {
        println!("cached at the edge: {}", String::from_utf8_lossy(&cached));
    }

    // A write: the database first, then the invalidation, with the row's new version (an
    // older version arriving late never undoes a newer one).
    db.lock()
        .unwrap()
        .insert(key.into(), (2, "Ada Lovelace".into()));
    let seq = publisher.invalidate_version(key, 2).await?;
    // Read-your-writes: once every cache below the coordinator has applied the invalidation,
    // none serves the old row, and a read that misses loads the new one.
    let applied = publisher.wait_applied(Duration::from_secs(10)).await?;
    println!(
        "wrote {key} (version 2, seq {seq}); applied by all {} caches",
        applied.caches
    );

    let read = cache.get_or_load(key, || load(db.clone(), key)).await?;
    println!("read {key}: {}", String::from_utf8_lossy(&read));
    if read != "Ada Lovelace" {
        return Err(format!("read {read:?} after the write").into());
    }
    Ok(())
}
