//! A node's config read again while it runs: which keys changed, which of them it takes now and
//! which need a restart.

use std::collections::BTreeMap;

use serde::Serialize;

/// What a node did with a config read again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconfigured {
    /// Changed keys it took.
    pub taken: Vec<&'static str>,
    /// Changed keys it did not take: they need a restart.
    pub need_restart: Vec<String>,
}

/// The keys whose values differ between `old` and `new`, parted into those in `reloadable` and
/// the others. Compared as they serialize, so a key added to a config is never missed here.
pub fn diff<T: Serialize>(old: &T, new: &T, reloadable: &[&'static str]) -> Reconfigured {
    let (old, new) = (fields(old), fields(new));
    let mut out = Reconfigured::default();
    for (key, value) in &new {
        if old.get(key) == Some(value) {
            continue;
        }
        match reloadable.iter().find(|r| **r == key.as_str()) {
            Some(r) => out.taken.push(r),
            None => out.need_restart.push(key.clone()),
        }
    }
    out
}

fn fields<T: Serialize>(cfg: &T) -> BTreeMap<String, serde_yaml::Value> {
    match serde_yaml::to_value(cfg) {
        Ok(serde_yaml::Value::Mapping(m)) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Cfg {
        a: Vec<String>,
        b: u32,
        c: Option<String>,
    }

    #[test]
    fn changed_keys_are_parted_by_what_reloads() {
        let old = Cfg {
            a: vec!["x".into()],
            b: 1,
            c: None,
        };
        let same = diff(&old, &old, &["a"]);
        assert_eq!(same, Reconfigured::default());
        let new = Cfg {
            a: vec!["x".into(), "y".into()],
            b: 2,
            c: Some("z".into()),
        };
        let r = diff(&old, &new, &["a"]);
        assert_eq!(r.taken, ["a"]);
        assert_eq!(r.need_restart, ["b", "c"]);
    }
}
