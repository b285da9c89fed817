//! What the commands print on standard output. `println!` panics once nothing reads it any more
//! (`dci status | head -3`, `dci demo | grep -m1 stale`); here a reader that went away ends only
//! the printing: the command finishes quietly and exits as it would have, and the long-running
//! ones (`dci demo`, `dci bench`) stop at their next step, since nobody reads what they find.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static GONE: AtomicBool = AtomicBool::new(false);

/// The reader of standard output went away.
pub fn gone() -> bool {
    GONE.load(Ordering::Relaxed)
}

/// Write `bytes` to standard output as they are. A reader that went away is no error; any other
/// failure to write (a full disk under `> file`) is.
pub fn bytes(bytes: &[u8]) -> anyhow::Result<()> {
    if gone() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {
            GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}

/// `println!` for the commands: see [`bytes()`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::out::bytes(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}
pub(crate) use say;
