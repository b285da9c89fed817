//! Change events as JSON (a CDC feed: Debezium, Maxwell, wal2json… one event per line) turned
//! into invalidations: `dci publish --json-key 'user:{after.id|before.id}' -`.
//!
//! A template is text with fields in braces. A field is a path into the event (names separated
//! by dots, a number indexing an array), or several separated by `|`: the first that is present
//! and not null is taken, so an update's `after` and a delete's `before` both give the row's key.
//! `{{` and `}}` are literal braces.

use serde_json::Value;

/// A path into an event, with alternatives: `after.id|before.id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Path(Vec<Vec<String>>);

impl std::str::FromStr for Path {
    type Err = String;
    fn from_str(s: &str) -> Result<Path, String> {
        let alternatives = s
            .split('|')
            .map(|alt| {
                let names: Vec<String> = alt.trim().split('.').map(str::to_string).collect();
                if names.iter().any(String::is_empty) {
                    Err(format!(
                        "{s:?} is no path (names separated by dots, alternatives by |)"
                    ))
                } else {
                    Ok(names)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Path(alternatives))
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let alts: Vec<String> = self.0.iter().map(|names| names.join(".")).collect();
        f.write_str(&alts.join("|"))
    }
}

impl Path {
    /// The value of the first alternative present and not null.
    fn find<'v>(&self, event: &'v Value) -> Option<&'v Value> {
        self.0.iter().find_map(|names| {
            let v = names.iter().try_fold(event, |v, name| match v {
                Value::Object(m) => m.get(name),
                Value::Array(a) => name.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            })?;
            (!v.is_null()).then_some(v)
        })
    }

    /// The text of the value at the path: `None` when absent or null, an error when it is an
    /// object or an array (no key is made of a whole row by mistake).
    fn text(&self, event: &Value) -> Result<Option<String>, String> {
        match self.find(event) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            Some(Value::Array(_)) => Err(format!("{self} is an array, not a value")),
            Some(_) => Err(format!("{self} is an object, not a value")),
        }
    }

    /// The version at the path: a whole number, one in a string, or a PostgreSQL log position
    /// (`16/B374D848`, as wal2json and pg_current_wal_lsn() write it). `None` when absent.
    pub(crate) fn version(&self, event: &Value) -> Result<Option<u64>, String> {
        let Some(v) = self.find(event) else {
            return Ok(None);
        };
        let parsed = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok().or_else(|| lsn(s)),
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| {
            format!(
                "{self} is {v}, not a version (a whole number, or a log position like 16/B374D848)"
            )
        })
    }
}

/// A PostgreSQL log position, `X/Y` in hex: X is its upper 32 bits.
fn lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Path),
}

/// A key (or tag) template: `user:{after.id|before.id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    source: String,
    parts: Vec<Part>,
}

impl std::str::FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut field = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        field.push(c);
                    }
                    if !closed {
                        return Err(format!("{s:?}: a {{ without its }}"));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(field.parse()?));
                }
                '}' => return Err(format!("{s:?}: a }} without its {{ (}}}} is a brace)")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(format!(
                "{s:?} has no {{field}}: every event would make the same key"
            ));
        }
        Ok(Template {
            source: s.to_string(),
            parts,
        })
    }
}

impl Template {
    /// The key this event makes, or `None` when a field of it is absent (or null) in the event.
    pub(crate) fn render(&self, event: &Value) -> Result<Option<String>, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(path) => match path.text(event)? {
                    Some(t) => out.push_str(&t),
                    None => return Ok(None),
                },
            }
        }
        Ok(Some(out))
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// What one event says to invalidate.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Invalidations {
    /// Keys, each invalidated with `version`.
    pub keys: Vec<String>,
    /// Tags, each invalidated with `version` too.
    pub tags: Vec<String>,
    /// The event's version, when it makes something and `--json-version` finds one.
    pub version: Option<u64>,
}

/// The templates and version path of `dci publish --json-key/--json-tag/--json-version`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Changes {
    pub keys: Vec<Template>,
    pub tags: Vec<Template>,
    pub version: Option<Path>,
}

impl Changes {
    /// What an event (a line of JSON) invalidates. Each template whose fields the event has
    /// makes one key or tag; an event none of them fits makes nothing (`Ok` and empty).
    pub(crate) fn of(&self, line: &str) -> Result<Invalidations, String> {
        let event: Value =
            serde_json::from_str(line).map_err(|e| format!("not a JSON event: {e}"))?;
        if !event.is_object() {
            return Err("not a JSON event: an object is one, this is not".into());
        }
        let render = |templates: &[Template]| -> Result<Vec<String>, String> {
            let mut out = Vec::new();
            for t in templates {
                if let Some(k) = t.render(&event).map_err(|why| format!("{t}: {why}"))? {
                    if k.is_empty() {
                        return Err(format!("{t} makes an empty key"));
                    }
                    if !out.contains(&k) {
                        out.push(k);
                    }
                }
            }
            Ok(out)
        };
        let keys = render(&self.keys)?;
        let tags = render(&self.tags)?;
        let version = match &self.version {
            Some(path) if !keys.is_empty() || !tags.is_empty() => path.version(&event)?,
            _ => None,
        };
        Ok(Invalidations {
            keys,
            tags,
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(keys: &[&str], tags: &[&str], version: Option<&str>) -> Changes {
        Changes {
            keys: keys.iter().map(|k| k.parse().unwrap()).collect(),
            tags: tags.iter().map(|k| k.parse().unwrap()).collect(),
            version: version.map(|v| v.parse().unwrap()),
        }
    }

    /// Debezium's envelope: an update and a delete give the same row key (the delete from its
    /// `before`), with the log position as the version; a heartbeat of the same topic fits no
    /// template and makes nothing.
    #[test]
    fn debezium_updates_and_deletes_make_the_rows_key_and_version() {
        let c = changes(
            &["{payload.source.table}:{payload.after.id|payload.before.id}"],
            &["org:{payload.after.org_id|payload.before.org_id}"],
            Some("payload.source.lsn"),
        );
        let update = r#"{"schema":{},"payload":{"op":"u","before":{"id":42,"org_id":7},
            "after":{"id":42,"org_id":7,"name":"x"},"source":{"table":"users","lsn":24023128}}}"#;
        let delete = r#"{"payload":{"op":"d","before":{"id":42,"org_id":7},"after":null,
            "source":{"table":"users","lsn":24023200}}}"#;
        for (line, lsn) in [(update, 24023128), (delete, 24023200)] {
            let line = line.replace('\n', "");
            assert_eq!(
                c.of(&line).unwrap(),
                Invalidations {
                    keys: vec!["users:42".into()],
                    tags: vec!["org:7".into()],
                    version: Some(lsn),
                }
            );
        }
        assert_eq!(
            c.of(r#"{"ts_ms":1700000000000}"#).unwrap(),
            Invalidations::default()
        );
        // Tags alone take the event's version too.
        let tags_only = changes(&[], &["org:{org}"], Some("lsn"));
        assert_eq!(
            tags_only.of(r#"{"org":7,"lsn":9}"#).unwrap(),
            Invalidations {
                keys: vec![],
                tags: vec!["org:7".into()],
                version: Some(9),
            }
        );
    }

    #[test]
    fn versions_are_numbers_digits_or_postgres_log_positions() {
        let p: Path = "v|lsn".parse().unwrap();
        let v = |s: &str| p.version(&serde_json::from_str(s).unwrap());
        assert_eq!(v(r#"{"v":7}"#), Ok(Some(7)));
        assert_eq!(v(r#"{"v":"18446744073709551615"}"#), Ok(Some(u64::MAX)));
        assert_eq!(v(r#"{"lsn":"16/B374D848"}"#), Ok(Some(0x16_B374_D848)));
        assert_eq!(v(r#"{"v":null,"lsn":3}"#), Ok(Some(3)), "null is absent");
        assert_eq!(v(r#"{}"#), Ok(None));
        for bad in [
            r#"{"v":-1}"#,
            r#"{"v":1.5}"#,
            r#"{"v":"x/1"}"#,
            r#"{"v":{}}"#,
        ] {
            let err = v(bad).unwrap_err();
            assert!(err.starts_with("v|lsn is "), "{bad}: {err}");
            assert!(err.contains("not a version"), "{bad}: {err}");
        }
    }

    #[test]
    fn templates_take_text_numbers_array_items_and_literal_braces() {
        let t: Template = "{{t}}:{a.0}:{b}:{c}".parse().unwrap();
        let e = serde_json::json!({"a": ["x", "y"], "b": 12, "c": true});
        assert_eq!(t.render(&e), Ok(Some("{t}:x:12:true".into())));
        assert_eq!(t.render(&serde_json::json!({"a": []})), Ok(None));
        let row = serde_json::json!({"a": ["x"], "b": {"id": 1}, "c": 1});
        assert_eq!(t.render(&row), Err("b is an object, not a value".into()));
        for bad in ["user:{id", "user:id}", "user", "{}", "{a..b}", "{a|}"] {
            assert!(bad.parse::<Template>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_line_that_is_no_json_object_is_refused_by_name() {
        let c = changes(&["{id}"], &[], None);
        assert!(c.of("user:42").unwrap_err().starts_with("not a JSON event"));
        assert!(c.of("[1]").unwrap_err().starts_with("not a JSON event"));
        assert_eq!(c.of(r#"{"id":""}"#).unwrap_err(), "{id} makes an empty key");
        assert_eq!(c.of(r#"{"id":"1"}"#).unwrap().keys, ["1"]);
    }

    proptest::proptest! {
        /// Whatever the line, an answer and no panic.
        #[test]
        fn any_line_is_answered(line in ".{0,200}") {
            let c = changes(&["k:{a.b|c}"], &["t:{d}"], Some("v"));
            let _ = c.of(&line);
        }
    }
}
