//! Warnings that input from the network sets off once per message (a poisoned entry, a batch
//! that does not decode): at most one goes to the log per second, saying how many were held
//! back, so that a flood of bad input cannot flood the log (and fill its disk). Counters still
//! count every one.

use std::time::{Duration, Instant};

/// How often such a warning is let through.
pub const EVERY: Duration = Duration::from_secs(1);

/// Most bytes of a key a warning shows.
const KEY_SHOWN: usize = 64;

/// One kind of warning's pace.
#[derive(Debug, Default, Clone)]
pub struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// May a warning go out at `now`? `Some(n)`: yes, and `n` like it were held back since the
    /// last one that went out.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < EVERY => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// A key as a warning shows it: its first bytes, escaped, and its length when longer (keys are
/// up to 64 KiB).
pub fn key_shown(key: &[u8]) -> String {
    let shown = key.len().min(KEY_SHOWN);
    let head = bytes::Bytes::copy_from_slice(&key[..shown]);
    if shown < key.len() {
        format!("{head:?}… ({} bytes)", key.len())
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One warning per second goes out, and the next one says how many were held back.
    #[test]
    fn one_warning_a_second_goes_out_and_tells_how_many_were_held() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.allow(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(t.allow(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_millis(1000)), Some(4));
        assert_eq!(t.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(60)), Some(1));
        assert_eq!(t.allow(t0 + Duration::from_secs(61)), Some(0));
    }

    #[test]
    fn a_long_key_is_shown_by_its_first_bytes_and_its_length() {
        assert_eq!(key_shown(b"user:1"), "b\"user:1\"");
        let long = vec![b'k'; 70_000];
        let shown = key_shown(&long);
        assert!(shown.ends_with("… (70000 bytes)"), "{shown}");
        assert!(shown.len() < 100, "{shown}");
        assert_eq!(key_shown(b"\xff\n"), "b\"\\xff\\n\"");
    }
}
