//! The `dci` binary as a user runs it: separate processes, real ports, exit codes, SIGKILL.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DCI: &str = env!("CARGO_BIN_EXE_dci");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Send the process `sig` (`-STOP`, `-CONT`, `-TERM`, `-HUP`) as an operator would.
    fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
}

/// Run a server command (its `--listen` may say port 0) and wait until it listens; returns it,
/// its port as its log line tells, and every line it logs from then on (its stderr is drained
/// meanwhile, so that it never blocks).
fn launch(mut cmd: Command) -> (Proc, u16, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = std::io::BufReader::new(child.stderr.take().unwrap());
    let proc = Proc(child);
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in err.lines().map_while(Result::ok) {
            // "... coordinator listening addr=127.0.0.1:PORT ..." (field names may be styled).
            if let Some(at) = line.find("listening").and_then(|i| {
                line[i..]
                    .find("127.0.0.1:")
                    .map(|j| i + j + "127.0.0.1:".len())
            }) {
                let digits: String = line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                let _ = port_tx.send(digits.parse::<u16>().unwrap());
            }
            let _ = lines_tx.send(line);
        }
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the server never said it was listening");
    (proc, port, lines)
}

/// The port a node serves `/metrics` and `/healthz` on, from its log (`lines` of `launch`).
fn metrics_port(lines: &std::sync::mpsc::Receiver<String>) -> u16 {
    let line = std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(20)).ok())
        .find(|l| l.contains("metrics on /metrics"))
        .expect("the node never said where its metrics are");
    let at = line.find("127.0.0.1:").expect("a loopback address") + "127.0.0.1:".len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// `GET path` of loopback's `port` over HTTP/1.1: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: dci\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn start_cmd(cmd: Command) -> (Proc, u16) {
    let (proc, port, _) = launch(cmd);
    (proc, port)
}

fn start(args: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new(DCI);
    cmd.args(args);
    start_cmd(cmd)
}

/// A coordinator command on `port` (0: a port of its own), its log in `dir`: a restart on the
/// same port and log is the same command again (publishers know a coordinator by its address).
fn coordinator_cmd(dir: &std::path::Path, port: u16) -> Command {
    let mut cmd = Command::new(DCI);
    cmd.args([
        "coordinator",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(dir);
    cmd
}

/// A coordinator process on a port of its own, its log in `dir`; and its port.
fn start_coordinator(dir: &std::path::Path) -> (Proc, u16) {
    start_cmd(coordinator_cmd(dir, 0))
}

/// A coordinator (its log in `dir`), a relay following it and an edge following the relay, each
/// a process on a port of its own; and the URLs of the three.
struct Tree {
    _procs: [Proc; 3],
    coord: String,
    relay: String,
    edge: String,
}

fn start_tree(dir: &std::path::Path) -> Tree {
    let (c, cp) = start_coordinator(dir);
    let coord = format!("http://127.0.0.1:{cp}");
    let (r, rp) = start(&["relay", "--listen", "127.0.0.1:0", "--upstream", &coord]);
    let relay = format!("http://127.0.0.1:{rp}");
    let (e, ep) = start(&["edge", "--listen", "127.0.0.1:0", "--relays", &relay]);
    Tree {
        _procs: [c, r, e],
        coord,
        relay,
        edge: format!("http://127.0.0.1:{ep}"),
    }
}

/// An edge process of `region` following the coordinator at `coord` directly; and its port.
fn start_edge_on(coord: &str, region: &str) -> (Proc, u16) {
    start(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        coord,
        "--region",
        region,
    ])
}

/// The seqs `dci publish` printed, one per line ("KEY SEQ").
fn seqs(o: &Output) -> Vec<u64> {
    stdout(o)
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect()
}

fn dci(args: &[&str]) -> Output {
    Command::new(DCI).args(args).output().unwrap()
}

/// `dci` with `input` on its standard input.
fn dci_fed(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(DCI)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Written from a thread: a large input must not wait on output nobody reads yet.
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A command that failed as bad input fails: exit 2 and one line on stderr, saying `says`.
fn one_line_error(o: &Output, says: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(says) && err.lines().count() == 1, "{err}");
}

/// The nodes `dci status --json` reports of `coord`'s tree (none while it fails); `more` are
/// further flags (`--tls-ca`).
fn status_nodes(coord: &str, more: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["status", "--coordinator", coord, "--json"];
    args.extend(more);
    let o = dci(&args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["nodes"].as_array().cloned().unwrap_or_default()
}

/// The highest high-water mark of a node of `role` as `dci status --json` reports it (0 until
/// it is known).
fn hwm(coord: &str, role: &str) -> u64 {
    status_nodes(coord, &[])
        .iter()
        .filter(|n| n["role"] == role)
        .filter_map(|n| n["shards"][0]["hwm"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The lease a `dci get` that missed handed out ("miss (lease L)" on its stderr).
fn lease_in(o: &Output) -> u64 {
    stderr(o)
        .split("lease ")
        .nth(1)
        .and_then(|l| l.split(')').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no lease in {}", stderr(o)))
}

/// Fill `key` on `edge` as a reader that missed would: `set` under the miss's lease. An edge
/// just started flushes as it joins its sender's stream, which voids the leases it handed out
/// before: such a reader loads again.
fn fill(edge: &str, key: &str, value: &str) {
    fill_bytes(edge, key, value.as_bytes());
}

/// [`fill`] with a value of any bytes and size (given on standard input).
fn fill_bytes(edge: &str, key: &str, value: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let miss = dci(&["get", "--edge", edge, key]);
        let lease = lease_in(&miss).to_string();
        let set = dci_fed(&["set", "--edge", edge, "--lease", &lease, key, "-"], value);
        if set.status.success() {
            return;
        }
        assert!(
            stderr(&set).contains("predates a flush") && Instant::now() < deadline,
            "{}",
            stderr(&set)
        );
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keys longer than an edge takes (its `--max-key-len` below the coordinator's): the edge
/// quarantines and counts each one, and warns of them at most once a second, with each key cut
/// short, so that a flood of them cannot flood its log.
#[test]
fn poisoned_entries_are_each_counted_and_logged_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (_c, cp) = start(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--max-key-len",
        "4096",
    ]);
    let coord = format!("http://127.0.0.1:{cp}");
    let (_r, rp) = start(&["relay", "--listen", "127.0.0.1:0", "--upstream", &coord]);
    let mut cmd = Command::new(DCI);
    cmd.args([
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &format!("http://127.0.0.1:{rp}"),
        "--max-key-len",
        "100",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let (_e, _, lines) = launch(cmd);
    let metrics = metrics_port(&lines);
    eventually("the edge in the stream", || {
        http_get(metrics, "/metrics").1.contains("dci_applied_seq{")
    });
    let keys: String = (0..200)
        .map(|i| format!("{i}:{}\n", "k".repeat(2000)))
        .collect();
    let o = dci_fed(&["publish", "--coordinator", &coord, "-"], keys.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    eventually("every entry quarantined and counted", || {
        http_get(metrics, "/metrics")
            .1
            .contains("dci_quarantined_total 200")
    });
    // Whatever was logged by then, and a moment more.
    std::thread::sleep(Duration::from_millis(500));
    let warned: Vec<String> = lines
        .try_iter()
        .filter(|l| l.contains("poison entry quarantined"))
        .collect();
    assert!(
        (1..=3).contains(&warned.len()),
        "{} warnings for 200 entries",
        warned.len()
    );
    assert!(
        warned
            .iter()
            .all(|l| l.len() < 1000 && l.contains(" bytes)")),
        "{warned:?}"
    );
}

#[test]
fn processes_talk_and_errors_are_one_line_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, _r, coord, relay) = coordinator_and_relay_eu(dir.path());
    let (_e, ep) = start(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &relay,
        "--region",
        "eu",
    ]);
    let edge_url = format!("http://127.0.0.1:{ep}");

    let o = dci(&["publish", "--coordinator", &coord, "user:1", "user:2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "user:1 1\nuser:2 2\n");

    // Edge: a miss is exit 1 with "miss" on stderr; a stored value is a hit.
    eventually("edge applied seq 2", || hwm(&coord, "edge") >= 2);
    eventually("edge serving", || {
        let o = dci(&["set", "--edge", &edge_url, "user:1", "hello"]);
        o.status.success() && dci(&["get", "--edge", &edge_url, "user:1"]).status.code() == Some(0)
    });
    let o = dci(&["get", "--edge", &edge_url, "user:1"]);
    assert_eq!(stdout(&o), "hello\n");
    // A value from standard input, not text, comes back byte for byte.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let o = dci_fed(&["set", "--edge", &edge_url, "blob", "-"], &bytes);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dci(&["get", "--edge", &edge_url, "blob"]);
    assert_eq!(o.stdout.len(), bytes.len() + 1);
    assert!(o.stdout.starts_with(&bytes) && o.stdout.ends_with(b"\n"));
    // A value beyond anything the edge decodes: one line naming the size and the setting.
    let o = dci_fed(
        &["set", "--edge", &edge_url, "huge", "-"],
        &vec![b'x'; 12 << 20],
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "dci: value is 12582912 bytes, more than that edge takes (its max_value_len)\n"
    );
    // Standard input is read up to the most `dci set` sends, not on without end.
    let o = dci_fed(
        &["set", "--edge", &edge_url, "huge", "-"],
        &vec![b'x'; (256 << 20) + 1],
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "dci: the value on standard input is more than 256 MiB, the most dci set sends\n"
    );
    let o = dci(&["delete", "--edge", &edge_url, "blob"]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(0), "deleted\n")
    );
    let o = dci(&["delete", "--edge", &edge_url, "blob"]);
    assert_eq!(
        (o.status.code(), stderr(&o).as_str()),
        (Some(1), "absent\n")
    );
    assert_eq!(
        dci(&["get", "--edge", &edge_url, "blob"]).status.code(),
        Some(1)
    );
    let o = dci(&["get", "--edge", &edge_url, "nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("miss"));

    // An invalidation removes it.
    assert!(dci(&["publish", "--coordinator", &coord, "user:1"])
        .status
        .success());
    eventually("invalidation applied", || {
        dci(&["get", "--edge", &edge_url, "user:1"]).status.code() == Some(1)
    });

    // Bad input: one line on stderr, non-zero exit, nothing logged.
    let long = "k".repeat(5000);
    let o = dci(&["publish", "--coordinator", &coord, &long]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("entry 0: key is 5000 bytes, more than the maximum of 1024"),
        "{}",
        stderr(&o)
    );
    let o = dci(&["publish", "--coordinator", &coord, "next"]);
    assert_eq!(stdout(&o), "next 4\n", "the refused publish took no seq");

    // A second coordinator on the same log would hand out seqs the first already gave.
    let o = dci(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    let o = dci(&["publish", "--coordinator", &coord, "after"]);
    assert_eq!(stdout(&o), "after 5\n", "the first coordinator goes on");

    // Everything at once: the edge drops what it holds.
    for k in ["x:1", "y:2"] {
        assert!(dci(&["set", "--edge", &edge_url, k, "v"]).status.success());
        assert_eq!(dci(&["get", "--edge", &edge_url, k]).status.code(), Some(0));
    }
    let o = dci(&["publish", "--coordinator", &coord, "--all"]);
    assert_eq!(stdout(&o), "* 6\n", "{}", stderr(&o));
    eventually("everything dropped", || {
        ["x:1", "y:2"]
            .iter()
            .all(|k| dci(&["get", "--edge", &edge_url, k]).status.code() == Some(1))
    });
    let o = dci(&["publish", "--coordinator", &coord, "--all", "x:1"]);
    assert_eq!(o.status.code(), Some(2), "--all takes no keys");
    let o = dci(&["publish", "--coordinator", &coord, "--prefix", ""]);
    assert_eq!(o.status.code(), Some(2), "an empty prefix is not --all");
    assert!(stderr(&o).contains("--all"), "{}", stderr(&o));
    // A version is a row's: a prefix covers many rows.
    let o = dci(&[
        "publish",
        "--coordinator",
        &coord,
        "--prefix",
        "--version",
        "5",
        "x:",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));

    // A stale lease is refused.
    let o = dci(&["set", "--edge", &edge_url, "user:2", "old", "--lease", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));

    // The wrong kind of node: exit 2, one line that says what was expected.
    let o = dci(&["publish", "--coordinator", &edge_url, "k"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("is it a coordinator?"),
        "{}",
        stderr(&o)
    );
    let o = dci(&["get", "--edge", &coord, "k"]);
    assert!(stderr(&o).contains("is it an edge?"), "{}", stderr(&o));

    // Unreachable node: exit 2, one line that says why.
    let o = dci(&["get", "--edge", "http://127.0.0.1:1", "k"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(stderr(&o).contains("Connection refused"), "{}", stderr(&o));

    // A collector address that is not a URL: refused before anything starts.
    let o = dci(&[
        "relay",
        "--upstream",
        &coord,
        "--listen",
        "127.0.0.1:0",
        "--otlp-endpoint",
        "collector:4317",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("otlp endpoint"), "{}", stderr(&o));
    // The same sender in two groups would deliver its shards twice.
    let o = dci(&[
        "relay",
        "--upstream",
        &coord,
        "--upstream-group",
        &format!("http://127.0.0.1:1,{coord}"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("two groups"), "{}", stderr(&o));
    // A duration past what a clock can add (a fill would have panicked the edge): refused by the
    // flag itself, and clap's usage hint is the second line.
    let o = dci(&[
        "edge",
        "--relays",
        &coord,
        "--listen",
        "127.0.0.1:0",
        "--ttl",
        "18446744073709551615s",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("at most 100 years"), "{}", stderr(&o));

    // A relay pointed at something that is not a sender says so at the default log level, and
    // keeps trying.
    let mut cmd = Command::new(DCI);
    cmd.args(["relay", "--listen", "127.0.0.1:0", "--upstream", &edge_url]);
    let (wrong, _, rx) = launch(cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    let warned = std::iter::from_fn(|| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    })
    .find(|l| l.contains("WARN") && l.contains("could not follow sender"));
    assert!(warned.is_some_and(|l| l.contains(&edge_url)));
    drop(wrong);

    // The tree, as the coordinator learned it from its relay's reports.
    eventually("status shows the edge", || {
        let roles: Vec<String> = status_nodes(&coord, &[])
            .iter()
            .map(|x| x["role"].as_str().unwrap_or("").to_string())
            .collect();
        roles.contains(&"coordinator".into())
            && roles.contains(&"relay".into())
            && roles.contains(&"edge".into())
    });
    let o = dci(&["status", "--coordinator", &coord]);
    assert!(
        stdout(&o).contains("coordinator") && stdout(&o).contains("edge"),
        "{}",
        stdout(&o)
    );
}

/// Keys from standard input, one per line, as many as an operator has: sent in several requests,
/// printed in input order with their seqs.
#[test]
fn publish_takes_keys_from_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let keys: Vec<String> = (0..10_000).map(|i| format!("user:{i}:profile")).collect();
    let input = keys.join("\n") + "\n\n";
    let o = dci_fed(&["publish", "--coordinator", &coord, "-"], input.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    let expected: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{k} {}", i + 1))
        .collect();
    assert_eq!(lines, expected);
    let o = dci_fed(&["publish", "--coordinator", &coord, "-"], b"\n");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no keys"), "{}", stderr(&o));

    // Long keys: 21 MB of them, 4,096 of which are more than one request may carry, go in
    // requests of fewer.
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--max-key-len",
        "8192",
    ]);
    let coord = format!("http://127.0.0.1:{cp}");
    let keys: Vec<String> = (0..5_000).map(|i| format!("{i:04200}")).collect();
    let o = dci_fed(
        &["publish", "--coordinator", &coord, "-"],
        (keys.join("\n") + "\n").as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let seqs: Vec<u64> = seqs(&o);
    assert_eq!(seqs, (1..=5_000).collect::<Vec<u64>>());
    // A key longer than any coordinator takes (the transport refused this one in its own words).
    let o = dci_fed(
        &["publish", "--coordinator", &coord, "-"],
        format!("short\n{}\n", "k".repeat(17 << 20)).as_bytes(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "line 2 of standard input: key is 17825792 bytes, more than the maximum any coordinator takes (65536)"
        ),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stdout(&o),
        "short 5001\n",
        "what came before it was published"
    );
}

/// `--with-versions`: each key carries its writer's version (`KEY VERSION`), on the command
/// line or on standard input, as a feed of row changes would publish them; an edge then skips
/// an older version that arrives after a newer one, and takes a newer one. A line without a
/// version ends the input, what came before it published.
#[test]
fn publish_takes_a_version_with_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let tree = start_tree(dir.path());
    let (coord, edge) = (tree.coord.clone(), tree.edge.clone());
    let publish = |args: &[&str], input: &[u8]| {
        let mut all = vec!["publish", "--coordinator", &coord, "--with-versions"];
        all.extend(args);
        dci_fed(&all, input)
    };

    let o = publish(&["-"], b"user:1 7\nuser 2 x\t9\r\n\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "user:1 1\nuser 2 x 2\n");
    let o = publish(&["user:3 11", "user:4  12"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "user:3 3\nuser:4 4\n");
    let f = follow(
        Command::new(DCI).args(["follow", "--sender", &coord, "--from", "1", "--count", "4"]),
    );
    let lines: Vec<String> = (0..4).map_while(|_| f.line()).collect();
    assert_eq!(
        lines,
        [
            "seq=1 key=user:1 version=7",
            "seq=2 key=user 2 x version=9",
            "seq=3 key=user:3 version=11",
            "seq=4 key=user:4 version=12"
        ]
    );

    // At the edge: an older version of user:1, late, leaves its value; a newer one drops it.
    eventually("the edge at seq 4", || hwm(&coord, "edge") >= 4);
    fill(&edge, "user:1", "row at version 7");
    let o = publish(&["-"], b"user:1 6\n");
    assert_eq!(stdout(&o), "user:1 5\n", "{}", stderr(&o));
    eventually("the edge at seq 5", || hwm(&coord, "edge") >= 5);
    let got = dci(&["get", "--edge", &edge, "user:1"]);
    assert_eq!(stdout(&got), "row at version 7\n", "{}", stderr(&got));
    let o = publish(&["-"], b"user:1 8\n");
    assert_eq!(stdout(&o), "user:1 6\n", "{}", stderr(&o));
    eventually("the edge at seq 6", || hwm(&coord, "edge") >= 6);
    let got = dci(&["get", "--edge", &edge, "user:1"]);
    assert_eq!(got.status.code(), Some(1), "a miss: {}", stdout(&got));

    // A line without a version, or with no number for one, ends the input there.
    let o = publish(&["-"], b"ok 1\nuser:5\nnever 2\n");
    one_line_error(
        &o,
        "line 2 of standard input: no version after the key \"user:5\"",
    );
    assert_eq!(stdout(&o), "ok 7\n", "what came before it was published");
    let o = publish(&["-"], b"user:5 v2\n");
    one_line_error(&o, "line 1 of standard input: \"v2\" is no version");
    let o = publish(&["-"], b" 2\n");
    one_line_error(&o, "no key before the version 2");
    // On the command line, nothing is published when one is bad.
    let o = publish(&["user:6 1", "user:7"], b"");
    one_line_error(&o, "key 2: no version after the key \"user:7\"");
    assert_eq!(stdout(&o), "");
    // A key of the longest length still goes with its version; one byte more is refused.
    let longest = "k".repeat(65_536);
    let o = publish(&["-"], format!("{longest}1 3\n").as_bytes());
    one_line_error(
        &o,
        "line 1 of standard input: key is 65537 bytes, more than the maximum",
    );
    let o = publish(&["-"], format!("{longest}11 3\n").as_bytes());
    one_line_error(
        &o,
        "line 1 of standard input: key is 65538 bytes, more than the maximum",
    );
    // A line longer than any key and version is not read whole.
    let o = publish(
        &["-"],
        format!("{longest}{} 3\n", "1".repeat(30)).as_bytes(),
    );
    one_line_error(
        &o,
        "line 1 of standard input: 65568 bytes, more than the longest key",
    );
    // With what gives no version per key: refused.
    for other in [
        &["--version", "3", "k 1"][..],
        &["--prefix", "k 1"],
        &["--all"],
    ] {
        let o = dci(&[
            &["publish", "--coordinator", &coord, "--with-versions"],
            other,
        ]
        .concat());
        assert_eq!(o.status.code(), Some(2), "{other:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    }
    // Nothing was published after seq 7: the next gets seq 8.
    let o = publish(&["marker 1"], b"");
    assert_eq!(stdout(&o), "marker 8\n", "{}", stderr(&o));
}

/// `dci set --ttl`: the value lives that long on the edge, another as long as the edge's `ttl`.
#[test]
fn set_takes_a_time_to_live() {
    let dir = tempfile::tempdir().unwrap();
    let tree = start_tree(dir.path());
    let edge = tree.edge.as_str();
    let get = |key: &str| dci(&["get", "--edge", edge, key]);
    let set = |args: &[&str]| {
        let o = dci(&[&["set", "--edge", edge][..], args].concat());
        assert!(o.status.success(), "{}", stderr(&o));
    };
    // Once the edge serves (it has joined its sender's stream).
    eventually("the edge to serve a value set", || {
        set(&["short", "lived", "--ttl", "1s"]);
        get("short").status.success()
    });
    set(&["long", "lived"]);
    assert_eq!(stdout(&get("long")), "lived\n");
    eventually("the value set with --ttl 1s to expire", || {
        get("short").status.code() == Some(1)
    });
    assert_eq!(
        stdout(&get("long")),
        "lived\n",
        "the edge's ttl (an hour) is not over"
    );
    let o = dci(&["set", "--edge", edge, "--ttl", "0s", "k", "v"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--ttl"), "{}", stderr(&o));
}

/// A region's edges share keys on a ring: `dci get/set/delete` given them all take each key to
/// its owner, and an edge asked for a key it does not own names the owners.
#[test]
fn get_set_and_delete_find_a_key_on_the_ring_of_a_regions_edges() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let on_ring = |id: &str| {
        start(&[
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--relays",
            &coord,
            "--node-id",
            id,
            "--ring-nodes",
            "e0,e1,e2",
        ])
    };
    let (_e0, p0) = on_ring("e0");
    let (_e1, p1) = on_ring("e1");
    let (_e2, p2) = on_ring("e2");
    let urls = [p0, p1, p2].map(|p| format!("http://127.0.0.1:{p}"));
    let all = urls.join(",");
    let keys: Vec<String> = (0..12).map(|i| format!("ring:{i}")).collect();
    eventually("every edge serves", || {
        keys.iter()
            .all(|k| dci(&["get", "--edge", &all, k]).status.code() == Some(1))
    });
    // Each key is its owner's, which the others refuse, naming it.
    let mut refused_by_one = 0;
    for k in &keys {
        let answered: Vec<Output> = urls.iter().map(|u| dci(&["get", "--edge", u, k])).collect();
        let refusals: Vec<&Output> = answered
            .iter()
            .filter(|o| o.status.code() == Some(2))
            .collect();
        assert_eq!(refusals.len(), 2, "{k}: one owner of three");
        let owner = ["e0", "e1", "e2"][answered
            .iter()
            .position(|o| o.status.code() == Some(1))
            .unwrap()];
        for o in refusals {
            assert!(
                stderr(o).contains(&format!("(its owners: {owner})")),
                "{}",
                stderr(o)
            );
        }
        refused_by_one += 1;
    }
    assert_eq!(refused_by_one, keys.len());
    for k in &keys {
        let lease = lease_in(&dci(&["get", "--edge", &all, k]));
        let o = dci(&[
            "set",
            "--edge",
            &all,
            "--lease",
            &lease.to_string(),
            k,
            &format!("v-{k}"),
        ]);
        assert_eq!(stdout(&o), "stored\n", "{}", stderr(&o));
        let o = dci(&["get", "--edge", &all, k]);
        assert_eq!(stdout(&o), format!("v-{k}\n"), "{}", stderr(&o));
    }
    let o = dci(&["delete", "--edge", &all, &keys[0]]);
    assert_eq!(stdout(&o), "deleted\n", "{}", stderr(&o));
    // An edge that does not answer is left off the ring, said on stderr; the key goes on to its
    // owner among the others, or to an edge that names its owner.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let o = dci(&["get", "--edge", &format!("{all},{dead}"), &keys[1]]);
    assert_eq!(stdout(&o), format!("v-{}\n", keys[1]), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: 1 of 4 edges left off the ring"),
        "{}",
        stderr(&o)
    );
    let o = dci(&["get", "--edge", &format!("{dead},{dead}"), &keys[1]]);
    one_line_error(&o, "no edge said its node id");
    let o = dci(&["get", "--edge", &format!("{},{coord}", urls[0]), &keys[1]]);
    assert!(
        stderr(&o).contains("is a coordinator, not an edge"),
        "{}",
        stderr(&o)
    );
}

/// `dci publish --json-key/--json-tag/--json-version -` reads a CDC feed (Debezium's envelope
/// here): an update and a delete invalidate the row's key with the log position as its version,
/// and its tag; the edge drops both values. An event no template fits stops the feed there,
/// after what came before, unless `--json-skip-unmatched`.
#[test]
fn publish_reads_change_events_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let tree = start_tree(dir.path());
    let (coord, edge) = (tree.coord.as_str(), tree.edge.as_str());
    let publish = |more: &[&str], input: &str| {
        let mut args = vec![
            "publish",
            "--coordinator",
            coord,
            "--json-key",
            "{payload.source.table}:{payload.after.id|payload.before.id}",
            "--json-tag",
            "org:{payload.after.org_id|payload.before.org_id}",
            "--json-version",
            "payload.source.lsn",
        ];
        args.extend(more);
        args.push("-");
        dci_fed(&args, input.as_bytes())
    };
    let event = |op: &str, row: &str, lsn: &str| {
        let (before, after) = match op {
            "d" => (row, "null"),
            _ => ("null", row),
        };
        format!(
            r#"{{"schema":{{}},"payload":{{"op":"{op}","before":{before},"after":{after},"source":{{"table":"users","lsn":{lsn}}}}}}}"#
        )
    };
    eventually("the edge to serve what is set", || {
        dci(&["set", "--edge", edge, "users:42", "row"])
            .status
            .success()
            && dci(&["get", "--edge", edge, "users:42"]).status.success()
    });
    assert!(
        dci(&["set", "--edge", edge, "--tag", "org:7", "page:org7", "p"])
            .status
            .success()
    );
    let o = publish(
        &[],
        &(event("u", r#"{"id":42,"org_id":7}"#, "24023128") + "\n"),
    );
    assert_eq!(stdout(&o), "users:42 1\norg:7 2\n", "{}", stderr(&o));
    eventually("the edge to apply it", || hwm(coord, "edge") >= 2);
    for gone in ["users:42", "page:org7"] {
        assert_eq!(dci(&["get", "--edge", edge, gone]).status.code(), Some(1));
    }
    let f = follow(
        Command::new(DCI).args(["follow", "--sender", coord, "--from", "1", "--count", "2"]),
    );
    assert_eq!(
        f.line().unwrap_or_default(),
        "seq=1 key=users:42 version=24023128"
    );
    assert_eq!(
        f.line().unwrap_or_default(),
        "seq=2 tag=org:7 version=24023128"
    );
    // A delete makes the same key from its `before`; a heartbeat fits no template and ends the
    // feed there, what came before it published.
    let feed = [
        event("d", r#"{"id":42,"org_id":7}"#, r#""16/B374D848""#),
        r#"{"payload":{"ts_ms":1}}"#.to_string(),
        event("c", r#"{"id":43,"org_id":7}"#, "24023300"),
    ]
    .join("\n");
    let o = publish(&[], &feed);
    assert_eq!(stdout(&o), "users:42 3\norg:7 4\n");
    one_line_error(
        &o,
        "line 2 of standard input: no --json-key or --json-tag template finds its fields",
    );
    let o = publish(&["--json-skip-unmatched"], &feed);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "users:42 5\norg:7 6\nusers:43 7\norg:7 8\n");
    let f = follow(
        Command::new(DCI).args(["follow", "--sender", coord, "--from", "3", "--count", "1"]),
    );
    assert_eq!(
        f.line().unwrap_or_default(),
        format!("seq=3 key=users:42 version={}", 0x16_B374_D848u64)
    );
    // Bad input is told by line, and a template by name.
    let o = publish(&[], "user:42\n");
    one_line_error(&o, "line 1 of standard input: not a JSON event");
    let o = publish(&[], &event("u", r#"{"id":{"a":1}}"#, "1"));
    one_line_error(
        &o,
        "payload.after.id|payload.before.id is an object, not a value",
    );
    let o = dci(&[
        "publish",
        "--coordinator",
        coord,
        "--json-key",
        "user:{id",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("a { without its }"), "{}", stderr(&o));
    let o = dci(&[
        "publish",
        "--coordinator",
        coord,
        "--json-key",
        "user:{id}",
        "user:1",
    ]);
    one_line_error(&o, "read change events from standard input: give `-`");
}

/// `dci set --tag` fills a value with tags, and `dci publish --tag` drops every value with one
/// of them, whatever its key; `dci follow` shows the tag. `dci set --version` is refused when
/// older than the version `dci publish --version` invalidated its key with.
#[test]
fn values_set_with_tags_or_a_version_go_as_published() {
    let dir = tempfile::tempdir().unwrap();
    let tree = start_tree(dir.path());
    let (coord, edge) = (tree.coord.as_str(), tree.edge.as_str());
    let set = |key: &str, tags: &[&str]| {
        let mut args = vec!["set", "--edge", edge, key, "v"];
        for t in tags {
            args.extend(["--tag", t]);
        }
        dci(&args)
    };
    eventually("the edge to serve what is set", || {
        set("page:1", &["product:7", "product:8"]).status.success()
            && dci(&["get", "--edge", edge, "page:1"]).status.success()
    });
    assert!(set("page:2", &["product:8"]).status.success());
    assert!(set("page:3", &[]).status.success());
    let o = dci(&["publish", "--coordinator", coord, "--tag", "product:7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seq = seqs(&o)[0];
    eventually("the edge to apply it", || hwm(coord, "edge") >= seq);
    assert_eq!(
        dci(&["get", "--edge", edge, "page:1"]).status.code(),
        Some(1)
    );
    for kept in ["page:2", "page:3"] {
        assert_eq!(stdout(&dci(&["get", "--edge", edge, kept])), "v\n");
    }
    let f = follow(Command::new(DCI).args([
        "follow",
        "--sender",
        coord,
        "--from",
        &seq.to_string(),
        "--count",
        "1",
    ]));
    assert_eq!(
        f.line().unwrap_or_default(),
        format!("seq={seq} tag=product:7")
    );
    let o = dci(&["publish", "--coordinator", coord, "--tag", "--prefix", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = set("page:4", &[""]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("a tag is 1 to"), "{}", stderr(&o));
    // A value read at a version older than its key's invalidation names is refused.
    let o = dci(&[
        "publish",
        "--coordinator",
        coord,
        "--version",
        "8",
        "user:1",
    ]);
    let seq = seqs(&o)[0];
    eventually("the edge to apply it", || hwm(coord, "edge") >= seq);
    let set_at = |version: &str| {
        dci(&[
            "set",
            "--edge",
            edge,
            "--version",
            version,
            "user:1",
            version,
        ])
    };
    let o = set_at("7");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "dci: fill refused: the value's version 7 is older than version 8, which an applied \
         invalidation of this key named\n"
    );
    assert!(set_at("8").status.success());
    assert_eq!(stdout(&dci(&["get", "--edge", edge, "user:1"])), "8\n");
    // A tag invalidation may name a version too (a log position): a value with the tag read
    // at an older one is refused.
    let o = dci(&[
        "publish",
        "--coordinator",
        coord,
        "--tag",
        "--version",
        "30",
        "org:7",
    ]);
    let seq = seqs(&o)[0];
    eventually("the edge to apply it", || hwm(coord, "edge") >= seq);
    let tagged_at = |version: &str| {
        dci(&[
            "set",
            "--edge",
            edge,
            "--tag",
            "org:7",
            "--version",
            version,
            "page:org",
            "p",
        ])
    };
    let o = tagged_at("29");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("version 29 is older than version 30"),
        "{}",
        stderr(&o)
    );
    assert!(tagged_at("30").status.success());
}

/// `dci publish --traceparent` publishes its keys under the writer's trace context, which goes
/// down the stream with them (`dci follow` shows it).
#[test]
fn publish_carries_a_trace_context_down_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, port) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{port}");
    let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let o = dci(&[
        "publish",
        "--coordinator",
        &coord,
        "--traceparent",
        header,
        "a",
        "b",
    ]);
    assert_eq!(stdout(&o), "a 1\nb 2\n", "{}", stderr(&o));
    let o = dci(&["publish", "--coordinator", &coord, "c"]);
    assert_eq!(stdout(&o), "c 3\n", "{}", stderr(&o));
    let f = follow(
        Command::new(DCI).args(["follow", "--sender", &coord, "--from", "1", "--count", "3"]),
    );
    let lines: Vec<String> = (0..3).map_while(|_| f.line()).collect();
    let traced = "trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7";
    assert_eq!(
        lines,
        [
            format!("seq=1 key=a {traced}"),
            format!("seq=2 key=b {traced}"),
            "seq=3 key=c".to_string()
        ]
    );
    let o = dci(&[
        "publish",
        "--coordinator",
        &coord,
        "--traceparent",
        "00-00-00-01",
        "d",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("needs a trace id of 32 hex digits"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "", "nothing published");
}

/// `dci publish -` fed by a writer as keys come publishes each at once (it does not wait for the
/// end of its input), and holds a round of keys at a time, not its whole input.
#[test]
fn publish_from_standard_input_streams_and_holds_a_round_not_the_whole_input() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let mut child = Command::new(DCI)
        .args(["publish", "--coordinator", &coord, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that waits for the end of its input would keep this test waiting on its output
    // for ever: it is killed after a minute, and its output ends.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (done, pid) = (done.clone(), child.id().to_string());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() > until {
                    let _ = Command::new("kill").args(["-9", &pid]).status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for (i, k) in ["first", "second"].into_iter().enumerate() {
        writeln!(stdin, "{k}").unwrap();
        stdin.flush().unwrap();
        line.clear();
        // Answered while its input is still open.
        out.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{k} {}\n", i + 1));
    }

    // 400,000 keys (25 MB) while the input stays open: all published and printed, in order.
    let n = 400_000u64;
    let writer = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::new(&mut stdin);
        for i in 0..n {
            writeln!(w, "user:{i:012}:profile:with:a:longer:name").unwrap();
        }
        w.flush().unwrap();
        drop(w);
        stdin
    });
    for i in 0..n {
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(
            line,
            format!("user:{i:012}:profile:with:a:longer:name {}\n", i + 3)
        );
    }
    let stdin = writer.join().unwrap();
    let peak = status_mib(child.id(), "VmHWM");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watchdog.join().unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Holding every key (as the whole input read at once did) took over 100 MiB here.
    assert!(peak < 64.0, "dci publish peaked at {peak:.1} MiB");

    // Its reader gone (`| head -1`), every key is still published: only the printing stops.
    let o = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; seq 1 100000 | {DCI} publish --coordinator {coord} - | head -1"
            ),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("1 {}\n", n + 3));
    assert_eq!(stderr(&o), "");
    let o = dci(&["publish", "--coordinator", &coord, "last"]);
    assert_eq!(stdout(&o), format!("last {}\n", n + 2 + 100_000 + 1));
}

/// `dci follow`: a process following a sender, its output lines and its stderr lines (each
/// drained by a thread, so that a test waits on them with a timeout, never for ever).
struct Following {
    proc: Proc,
    out: std::sync::mpsc::Receiver<String>,
    err: std::sync::mpsc::Receiver<String>,
}

fn lines_of(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

fn follow(cmd: &mut Command) -> Following {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    Following {
        proc: Proc(child),
        out,
        err,
    }
}

impl Following {
    /// The next line of its output; `None` once the output has ended.
    fn line(&self) -> Option<String> {
        match self.out.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => Some(l),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            Err(_) => panic!("no line from dci follow within 20 s"),
        }
    }

    /// Its exit code, once it has ended by itself (within 20 s).
    fn exit_code(mut self) -> Option<i32> {
        ended(&mut self.proc, || {})
    }
}

/// The exit code of `proc`, once it has ended by itself (within 20 s), doing `meanwhile` while
/// it has not.
fn ended(proc: &mut Proc, mut meanwhile: impl FnMut()) -> Option<i32> {
    let mut code = None;
    eventually("the process to end", || {
        match proc.0.try_wait().unwrap() {
            Some(s) => code = Some(s.code()),
            None => meanwhile(),
        }
        code.is_some()
    });
    code.flatten()
}

/// `dci follow` prints what a relay or coordinator streams, one line per invalidation (a key
/// with its version, a prefix, everything), from its head or from a seq of its ring or log,
/// filtered by prefix; it ends after `--count`, or quietly when its reader goes away; a wrong
/// address or seq is one line and exit 2.
#[test]
fn follow_prints_the_stream_from_the_head_or_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let tree = start_tree(dir.path());
    let (coord, relay) = (tree.coord.clone(), tree.relay.clone());
    let publish = |args: &[&str]| {
        let mut all = vec!["publish", "--coordinator", &coord];
        all.extend(args);
        let o = dci(&all);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    publish(&["a", "b"]);

    // From the head: what is published from then on.
    let f = follow(Command::new(DCI).args(["follow", "--sender", &relay, "--count", "4"]));
    let joined = logged(&f.err, "following from seq");
    assert!(
        joined.contains("shard 0: following from seq 3 of epoch"),
        "{joined}"
    );
    publish(&["c", "--version", "5"]);
    publish(&["--prefix", "user:"]);
    publish(&["--all"]);
    publish(&["x y"]);
    publish(&["past the count"]);
    let lines: Vec<String> = (0..4).map_while(|_| f.line()).collect();
    assert_eq!(
        lines,
        [
            "seq=3 key=c version=5",
            "seq=4 prefix=user:",
            "seq=5 all",
            "seq=6 key=x y"
        ]
    );
    assert_eq!(f.line(), None, "nothing after the count");
    assert_eq!(f.exit_code(), Some(0));

    // From a seq of the coordinator's log, only some prefixes (everything is in every one).
    let f = follow(Command::new(DCI).args([
        "follow",
        "--sender",
        &coord,
        "--from",
        "2",
        "--prefixes",
        "b,user",
        "--count",
        "3",
    ]));
    let lines: Vec<String> = (0..3).map_while(|_| f.line()).collect();
    assert_eq!(lines, ["seq=2 key=b", "seq=4 prefix=user:", "seq=5 all"]);
    assert_eq!(f.exit_code(), Some(0));

    // As JSON lines, for a program.
    publish(&[
        "--version",
        "9",
        "--traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "z",
    ]);
    let f = follow(Command::new(DCI).args([
        "follow", "--sender", &relay, "--from", "3", "--count", "6", "--json",
    ]));
    let events: Vec<serde_json::Value> = (0..6)
        .map_while(|_| f.line())
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let field = |i: usize, name: &str| events[i][name].clone();
    assert_eq!(events.len(), 6);
    assert!(events
        .iter()
        .all(|e| e["event"] == "invalidate" && e["shard"] == 0));
    assert!(events
        .iter()
        .all(|e| e["epoch"].as_u64().is_some_and(|n| n > 0)));
    assert!(events
        .iter()
        .all(|e| e["published_us"].as_u64().is_some_and(|n| n > 0)));
    let seqs: Vec<_> = (0..6).map(|i| field(i, "seq")).collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7, 8]);
    let kinds: Vec<_> = (0..6).map(|i| field(i, "kind")).collect();
    assert_eq!(kinds, ["key", "prefix", "all", "key", "key", "key"]);
    assert_eq!(
        (field(0, "key"), field(0, "version")),
        ("c".into(), 5.into())
    );
    assert_eq!(field(1, "key"), "user:");
    assert!(events[2].get("key").is_none());
    assert_eq!(field(3, "key"), "x y");
    assert_eq!(field(5, "key"), "z");
    assert_eq!(field(5, "version"), 9);
    assert_eq!(field(5, "trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(field(5, "span_id"), "00f067aa0ba902b7");
    assert_eq!(f.exit_code(), Some(0));
    // Joining at the head, it says where it starts: a flush of what came before.
    let f =
        follow(Command::new(DCI).args(["follow", "--sender", &relay, "--count", "1", "--json"]));
    let joined: serde_json::Value = serde_json::from_str(&f.line().unwrap_or_default()).unwrap();
    assert_eq!(
        (&joined["event"], &joined["hwm"]),
        (&"flush".into(), &8.into()),
        "{joined}"
    );
    assert!(
        joined["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{joined}"
    );
    publish(&["after"]);
    let v: serde_json::Value = serde_json::from_str(&f.line().unwrap_or_default()).unwrap();
    assert_eq!((&v["seq"], &v["key"]), (&9.into(), &"after".into()));
    assert_eq!(f.exit_code(), Some(0));

    // The count reached in the middle of a batch (a and b were published together).
    let f = follow(
        Command::new(DCI).args(["follow", "--sender", &relay, "--from", "1", "--count", "1"]),
    );
    assert_eq!(f.line().as_deref(), Some("seq=1 key=a"));
    assert_eq!(f.line(), None);
    assert_eq!(f.exit_code(), Some(0));

    // A reader that goes away (as `| head -1` does) ends it, quietly, even on a quiet stream.
    let mut child = Command::new(DCI)
        .args(["follow", "--sender", &relay, "--from", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut proc = Proc(child);
    // The reader: one line, then it closes the pipe.
    let (tx, first) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        let _ = tx.send(line);
    });
    let first = first.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(first, "seq=1 key=a\n");
    // Nothing more is published: it must not wait for a next line to learn that its reader left.
    let code = ended(&mut proc, || {});
    assert_eq!(code, Some(0), "dci follow ended, and with 0");

    // What cannot be followed: one line, exit 2.
    let edge = tree.edge.clone();
    for (args, says) in [
        (vec!["--sender", edge.as_str()], "is an edge"),
        (vec!["--sender", "http://127.0.0.1:1"], "Connection refused"),
        (
            vec!["--sender", relay.as_str(), "--from", "99"],
            "past the head of shard 0",
        ),
        (
            vec!["--sender", relay.as_str(), "--from", "0"],
            "at least 1",
        ),
    ] {
        let mut all = vec!["follow"];
        all.extend(&args);
        let o = dci(&all);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

/// A sharded tier from the command line: a relay follows both shards' coordinators (one with
/// `--upstream`, one with `--upstream-group`), `dci publish` sends each key to its shard's
/// coordinator, `dci status` merges both trees. When one shard is down, what the other accepted
/// is still printed, then the error.
#[test]
fn a_sharded_tier_from_the_command_line() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (mut procs, ports): (Vec<Proc>, Vec<u16>) = (0..2)
        .map(|s| {
            start(&[
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                dirs[s].path().to_str().unwrap(),
                "--shard",
                &s.to_string(),
                "--shard-count",
                "2",
            ])
        })
        .unzip();
    // Lists as people type them, with a space after each comma.
    let urls = format!(
        "http://127.0.0.1:{}, http://127.0.0.1:{}",
        ports[0], ports[1]
    );
    let (_relay, rp) = start(&[
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://127.0.0.1:{}", ports[0]),
        "--upstream-group",
        &format!(" http://127.0.0.1:{}, http://127.0.0.1:1", ports[1]),
        "--region",
        "eu",
    ]);
    let _edge = start(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &format!("http://127.0.0.1:{rp} , http://127.0.0.1:1"),
        "--region",
        "eu",
        "--shard-count",
        "2",
    ]);
    let keys: Vec<String> = (0..8).map(|i| format!("user:{i}")).collect();
    let map = dci_proto::ring::ShardMap::new(2);
    let mut args = vec!["publish", "--coordinator", &urls];
    args.extend(keys.iter().map(String::as_str));
    let o = dci(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), keys.len());
    let mut next = [1u64, 1];
    for (k, line) in keys.iter().zip(&lines) {
        let s = map.shard_of(k.as_bytes()) as usize;
        assert_eq!(*line, format!("{k} {} shard={s}", next[s]));
        next[s] += 1;
    }
    assert!(next[0] > 1 && next[1] > 1, "both shards used: {lines:?}");
    // The coordinators in another order, or one of them alone: refused, saying what is wanted.
    let k1 = keys
        .iter()
        .find(|k| map.shard_of(k.as_bytes()) == 1)
        .unwrap();
    let swapped = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        ports[1], ports[0]
    );
    for given in [swapped.as_str(), &format!("http://127.0.0.1:{}", ports[0])] {
        let o = dci(&["publish", "--coordinator", given, k1]);
        one_line_error(
            &o,
            "key belongs to shard 1 of 2, this is shard 0: a publisher lists every shard's \
             coordinator, in shard order",
        );
    }
    // Both shards reached the edge through the one relay, as both coordinators tell.
    let rows = |json: &serde_json::Value, role: &str| -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = json["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["role"] == role)
            .flat_map(|n| n["shards"].as_array().cloned().unwrap_or_default())
            .map(|s| (s["shard"].as_u64().unwrap(), s["hwm"].as_u64().unwrap()))
            .collect();
        v.sort();
        v
    };
    let want = vec![(0, next[0] - 1), (1, next[1] - 1)];
    eventually("the edge has both shards, in the merged status", || {
        let o = dci(&["status", "--coordinator", &urls, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        o.status.success() && rows(&v, "edge") == want && rows(&v, "relay") == want
    });

    // One shard of the relay's stream, from its first seq.
    let relay = format!("http://127.0.0.1:{rp}");
    let n = (next[1] - 1).to_string();
    let f = follow(Command::new(DCI).args([
        "follow", "--sender", &relay, "--shard", "1", "--from", "1", "--count", &n,
    ]));
    let lines: Vec<String> = std::iter::from_fn(|| f.line()).collect();
    let want: Vec<String> = keys
        .iter()
        .filter(|k| map.shard_of(k.as_bytes()) == 1)
        .enumerate()
        .map(|(i, k)| format!("seq={} key={k} shard=1", i + 1))
        .collect();
    assert_eq!(lines, want);
    assert_eq!(f.exit_code(), Some(0));
    // From the head, only shard 1's: a key of shard 0 published before one of shard 1 is not
    // printed.
    let f = follow(Command::new(DCI).args(["follow", "--sender", &relay, "--shard", "1"]));
    for _ in 0..2 {
        logged(&f.err, "following from seq");
    }
    let of_shard = |s: u32| {
        (100..)
            .map(|i| format!("user:{i}"))
            .find(|k| map.shard_of(k.as_bytes()) == s)
            .unwrap()
    };
    let (k0, k1) = (of_shard(0), of_shard(1));
    for k in [&k0, &k1] {
        let o = dci(&["publish", "--coordinator", &urls, k]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(
        f.line().unwrap_or_default(),
        format!("seq={} key={k1} shard=1", next[1])
    );
    let o = dci(&["follow", "--sender", &relay, "--shard", "5"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("carries no shard 5 (it carries: 0, 1)"),
        "{}",
        stderr(&o)
    );

    // Waited for on both shards: applied on both once it returns.
    let o = dci(&[
        "publish",
        "--coordinator",
        &urls,
        "--prefix",
        "user:",
        "--wait=20s",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("applied by the only cache (eu) in "),
        "{}",
        stderr(&o)
    );
    let o = dci(&["status", "--coordinator", &urls, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = vec![(0, next[0] + 1), (1, next[1] + 1)];
    assert_eq!(rows(&v, "edge"), want);

    drop(procs.pop()); // shard 1's coordinator is gone
                       // Its log is shard 1's: started there as shard 0 (volumes swapped), the coordinator refuses.
    let o = dci(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dirs[1].path().to_str().unwrap(),
        "--shard-count",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("holds the log of shard 1 of 2"),
        "{}",
        stderr(&o)
    );
    let o = dci(&args);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let accepted = stdout(&o);
    assert_eq!(
        accepted.lines().count() as u64,
        next[0] - 1,
        "shard 0's keys were accepted and printed: {accepted}"
    );
    assert!(accepted.lines().all(|l| l.ends_with("shard=0")));
    // A key of shard 0 is waited for in shard 0's tree only: shard 1 down holds it up no more
    // than it holds up the publish.
    let o = dci(&["publish", "--coordinator", &urls, "--wait=20s", &k0]);
    assert!(stdout(&o).starts_with(&format!("{k0} ")), "{}", stdout(&o));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("applied by the only cache (eu) in "),
        "{}",
        stderr(&o)
    );
    // A prefix goes to both shards: refused by shard 1, and not waited for.
    let o = dci(&[
        "publish",
        "--coordinator",
        &urls,
        "--prefix",
        "--wait=1s",
        "user:",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = dci(&["status", "--coordinator", &urls]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("coordinator-0"),
        "the reachable shard's tree is shown: {}",
        stdout(&o)
    );
}

#[test]
fn a_sigkilled_coordinator_restarts_from_its_log_without_reusing_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let mut acked = Vec::new();
    for i in 0..20 {
        let o = dci(&[
            "publish",
            "--coordinator",
            &coord,
            &format!("k{i}"),
            &format!("j{i}"),
        ]);
        assert!(o.status.success());
        acked.extend(seqs(&o));
    }
    // SIGKILL: no clean shutdown, no chance to flush anything more.
    c.0.kill().unwrap();
    c.0.wait().unwrap();
    let _c = start_cmd(coordinator_cmd(dir.path(), cp));
    let o = dci(&["publish", "--coordinator", &coord, "after"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seq = seqs(&o)[0];
    assert_eq!(
        seq,
        *acked.iter().max().unwrap() + 1,
        "every acknowledged seq survived and none is reused"
    );
}

/// A tier going from one shard to two: the coordinator refuses its log under the new count
/// unless told it is a reshard, then sets the log aside whole and begins a new one under a new
/// epoch, which its receivers take with a flush.
#[test]
fn a_coordinator_sets_its_log_aside_when_the_tier_is_resharded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let (_r, _) = start(&["relay", "--listen", "127.0.0.1:0", "--upstream", &coord]);
    let o = dci(&["publish", "--coordinator", &coord, "a", "b", "c"]);
    assert_eq!(seqs(&o), [1, 2, 3], "{}", stderr(&o));
    eventually("the relay at seq 3", || hwm(&coord, "relay") >= 3);
    let epoch_of = |role: &str| {
        status_nodes(&coord, &[])
            .iter()
            .find(|n| n["role"] == role)
            .and_then(|n| n["shards"][0]["epoch"].as_u64())
            .unwrap_or(0)
    };
    let old = epoch_of("coordinator");
    assert_eq!(epoch_of("relay"), old);
    c.0.kill().unwrap();
    c.0.wait().unwrap();

    let o = coordinator_cmd(dir.path(), cp)
        .args(["--shard-count", "2"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && err.lines().count() == 1, "{err}");
    assert!(
        err.contains("holds the log of shard 0 of 1, not of shard 0 of 2")
            && err.contains("reshard"),
        "{err}"
    );
    let mut cmd = coordinator_cmd(dir.path(), cp);
    cmd.args(["--shard-count", "2", "--reshard"]);
    let (_c0, _, lines) = launch(cmd);
    let line = logged(&lines, "the tier was resharded");
    assert!(line.contains("shard 0 of 1"), "{line}");
    let dir1 = tempfile::tempdir().unwrap();
    let mut cmd = coordinator_cmd(dir1.path(), 0);
    cmd.args(["--shard", "1", "--shard-count", "2"]);
    let (_c1, cp1) = start_cmd(cmd);
    let both = format!("{coord},http://127.0.0.1:{cp1}");
    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let mut args = vec!["publish", "--coordinator", &both];
    args.extend(keys.iter().map(String::as_str));
    let o = dci(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut shard0: Vec<u64> = stdout(&o)
        .lines()
        .filter(|l| l.ends_with(" shard=0"))
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    shard0.sort();
    assert!(!shard0.is_empty(), "{}", stdout(&o));
    assert_eq!(shard0[0], 1, "a new log, its seqs from 1");
    let new = epoch_of("coordinator");
    assert!(new > old);
    eventually(
        "the relay in the new epoch (it flushed what it held)",
        || epoch_of("relay") == new,
    );
    let aside: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let name = aside[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("set-aside-shard-0-of-1-"), "{name}");
    assert!(std::fs::read_dir(&aside[0]).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".seg")));
}

/// A rolling restart under a long `dci publish -`: the coordinator drains (SIGTERM) while
/// requests are in flight, comes back a moment later on the same address and log, and is then
/// SIGKILLed and restarted again. The command resends what was left unanswered and exits 0;
/// every key has its seq, and the seqs are exactly 1..=N: nothing acknowledged was lost and no
/// resend was logged twice. (It ended with "h2 protocol error" at the first restart.)
#[test]
fn dci_publish_rides_out_coordinator_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    const N: u64 = 400_000;
    let keys: String = (0..N).map(|i| format!("key:{i}\n")).collect();
    let publishing = {
        let coord = coord.clone();
        std::thread::spawn(move || {
            dci_fed(
                &[
                    "publish",
                    "--coordinator",
                    &coord,
                    "--retry-for",
                    "30s",
                    "-",
                ],
                keys.as_bytes(),
            )
        })
    };
    eventually("publishing started", || hwm(&coord, "coordinator") > 0);
    c.signal("-TERM");
    let mut c = c;
    assert!(
        c.0.wait().unwrap().success(),
        "a drained coordinator exits 0"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (mut c, _, lines) = launch(coordinator_cmd(dir.path(), cp));
    let recovered = lines
        .recv_timeout(Duration::from_secs(5))
        .into_iter()
        .chain(lines.try_iter())
        .find(|l| l.contains("log recovered"))
        .expect("the restarted coordinator says what it recovered");
    let at: String = recovered[recovered.find("head=").unwrap() + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(
        at.parse::<u64>().unwrap() < N,
        "the restart came while the command was still publishing: {recovered}"
    );
    eventually("publishing went on", || {
        hwm(&coord, "coordinator") > at.parse().unwrap()
    });
    c.0.kill().unwrap();
    c.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _c = start_cmd(coordinator_cmd(dir.path(), cp));
    let o = publishing.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut seen: Vec<u64> = seqs(&o);
    assert_eq!(seen.len() as u64, N);
    for (i, line) in out.lines().enumerate() {
        assert!(line.starts_with(&format!("key:{i} ")), "{line}");
    }
    seen.sort_unstable();
    assert!(
        seen.iter().copied().eq(1..=N),
        "the seqs are exactly 1..=N (first {:?}, last {:?})",
        seen.first(),
        seen.last()
    );
}

/// `dci publish --wait` right after its coordinator restarted on its log holds for the caches
/// that followed it before and may not be back: with less time than the bound, it names them and
/// exits 3; with more, it ends once the bound has passed since the start, exit 0.
#[test]
fn a_wait_right_after_a_coordinator_restart_holds_for_the_caches_of_before() {
    let dir = tempfile::tempdir().unwrap();
    let (c, relay_proc, coord, relay) = coordinator_and_relay_eu(dir.path());
    let cp: u16 = coord.rsplit(':').next().unwrap().parse().unwrap();
    let (_e, _) = edge_eu(&relay, "eu-edge-0");
    eventually("the edge in the tree", || {
        status_nodes(&coord, &[])
            .iter()
            .any(|n| n["role"] == "edge")
    });
    let o = dci(&["publish", "--coordinator", &coord, "--wait=10s", "warm"]);
    assert!(
        stderr(&o).contains("applied by the only cache"),
        "{}",
        stderr(&o)
    );

    c.signal("-TERM");
    let mut c = c;
    assert!(c.0.wait().unwrap().success());
    let (_c, _) = start_cmd(coordinator_cmd(dir.path(), cp));
    let o = dci(&["publish", "--coordinator", &coord, "--wait=1s", "k"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("caches that followed coordinator-0 before its restart (not all back yet)"),
        "{}",
        stderr(&o)
    );
    let began = std::time::Instant::now();
    let o = dci(&["publish", "--coordinator", &coord, "--wait=20s", "k"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("applied by the only cache"),
        "{}",
        stderr(&o)
    );
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "held until the bound had passed since the start: {:?}",
        began.elapsed()
    );
    drop(relay_proc);
}

/// The disk fills under the log (a file-size limit set on the process makes its writes fail as a
/// full disk would): publishes are refused with a clear error from then on, health says
/// NOT_SERVING, and a restart with room again keeps every acknowledged seq and reuses none.
#[test]
fn a_coordinator_whose_disk_fills_refuses_publishes_and_restarts_intact() {
    let dir = tempfile::tempdir().unwrap();
    // SIGXFSZ ignored (kept across exec), so a write past the limit fails with EFBIG.
    let mut limited = Command::new("sh");
    limited
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 2048; exec \"$0\" \"$@\"",
            DCI,
        ])
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ]);
    let (c, cp, lines) = launch(limited);
    let coord = format!("http://127.0.0.1:{cp}");
    let metrics = metrics_port(&lines);
    assert_eq!(http_get(metrics, "/healthz"), (200, "serving\n".into()));

    let mut last_acked = 0u64;
    let mut refused = None;
    for i in 0..200 {
        let keys: Vec<String> = (0..1000)
            .map(|k| format!("user:{k:06}:profile:{i}:{}", "x".repeat(40)))
            .collect();
        let mut a = vec!["publish", "--coordinator", &coord];
        a.extend(keys.iter().map(String::as_str));
        let o = dci(&a);
        if !o.status.success() {
            refused = Some(o);
            break;
        }
        last_acked = *seqs(&o).last().unwrap();
    }
    let o = refused.expect("the log filled up within 200 publishes of 1000 keys");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        last_acked > 0,
        "publishes were acknowledged before the disk filled"
    );
    // Refused from now on, even a small one that would still fit.
    let o = dci(&["publish", "--coordinator", &coord, "small"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("log failed"), "{}", stderr(&o));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let health = |service: &str| {
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(coord.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        })
    };
    eventually("health says NOT_SERVING", || {
        health("") == 2 && health("dci.v1.Publisher") == 2
    });
    let (code, body) = http_get(metrics, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the log failed"), "{body}");

    drop(c);
    let _c = start_cmd(coordinator_cmd(dir.path(), cp));
    let o = dci(&["publish", "--coordinator", &coord, "after"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seq = seqs(&o)[0];
    assert_eq!(
        seq,
        last_acked + 1,
        "every acknowledged seq survived, none is reused, the torn group is gone"
    );
    assert_eq!(health(""), 1, "SERVING again");
}

/// The README's main job, shortened: a whole deployment in one process, a workload, no stale read.
#[test]
fn the_demo_runs_and_sees_no_stale_read() {
    let run = |more: &[&str]| -> String {
        let mut args = vec!["demo", "--rate", "500", "--reads", "2000"];
        args.extend(more);
        let o = dci(&args);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        let out = stdout(&o);
        let done = out
            .lines()
            .find(|l| l.starts_with("dci demo: done after"))
            .unwrap_or_else(|| panic!("no summary in:\n{out}"));
        let numbers: Vec<u64> = done
            .split([' ', ','])
            .filter_map(|w| w.parse().ok())
            .collect();
        // "done after 2.0s: P publishes, R reads, S stale reads"
        let [publishes, reads, stale] = numbers[..] else {
            panic!("{done}")
        };
        assert!(publishes > 100 && reads > 100, "{done}");
        assert_eq!(stale, 0, "{done}");
        assert!(out.contains("t=   1s"), "a line per second: {out}");
        out
    };
    run(&["--duration", "2s"]);
    // An edge, a relay and the coordinator stopped for a second each, in turn: no read is
    // stale, no publish or read fails (the SDK retries, a read with its edge down loads).
    let out = run(&["--duration", "7s", "--chaos", "1s"]);
    for node in ["chaos: edge", "chaos: relay", "chaos: the coordinator"] {
        assert!(out.contains(node), "{node} in:\n{out}");
    }
    let last = out.lines().rfind(|l| l.starts_with("t=")).unwrap();
    assert!(last.contains("errors=0"), "{out}");
    // The same with two shards, each coordinator stopped in its turn, and keys on two edges of
    // their region: the edges serve (they would only miss with the wrong shard count).
    let out = run(&[
        "--duration",
        "7s",
        "--chaos",
        "1s",
        "--shards",
        "2",
        "--replication",
        "2",
    ]);
    assert!(out.contains("chaos: the coordinator of shard 0"), "{out}");
    let hits = |l: &str| -> f64 {
        let at = l.find("hit ratio=").unwrap() + "hit ratio=".len();
        l[at..]
            .trim_start()
            .split('%')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        out.lines()
            .filter(|l| l.starts_with("t="))
            .any(|l| hits(l) > 10.0),
        "{out}"
    );
    let last = out.lines().rfind(|l| l.starts_with("t=")).unwrap();
    assert!(last.contains("errors=0"), "{out}");
    // One publish in ten a prefix of a hundred rows, on every shard of the two, and one read in
    // three of a page of three rows, tagged with them (each write invalidates its rows' tags):
    // no read of a row or a page is stale (the readers check each row's version, each row of a
    // page; a bound of a second, so that a read a second late counts).
    let out = run(&[
        "--duration",
        "4s",
        "--shards",
        "2",
        "--prefixes",
        "10",
        "--pages",
        "3",
        "--max-staleness",
        "1s",
    ]);
    let last = out.lines().rfind(|l| l.starts_with("t=")).unwrap();
    assert!(last.contains("errors=0"), "{out}");
}

#[test]
fn the_bench_runs_end_to_end() {
    // Two edges, 3,000 invalidations of keys "t:000000".."t:999999", no Redis; and `more`.
    let bench = |more: &[&str]| {
        let mut args = vec!["bench", "--edges", "2", "--count", "3000", "--no-redis"];
        args.extend(["--key-format", "t:{}"]);
        args.extend(more);
        dci(&args)
    };
    let o = bench(&["--rate", "200", "--latency-for", "1s", "--receivers", "20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for part in [
        "24-byte invalidations (8-byte keys like \"t:123456\")",
        "saturation",
        "delivered/s",
        "lost 0",
        "latency at 200/s",
        "p99",
        "memory per idle receiver",
        "catch-up (a receiver",
    ] {
        assert!(out.contains(part), "missing {part:?} in:\n{out}");
    }
    // At the rate asked: 200/s for 1 s is about 200 publishes, each applied at both edges
    // (rates below 1,000/s ran at 1,000/s: about 2,000 samples).
    let samples: u64 = out
        .split_once("applied at each edge, ")
        .and_then(|(_, rest)| rest.split_once(" samples"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no sample count in:\n{out}"));
    assert!(
        (2..=2 * 210).contains(&samples),
        "{samples} samples:\n{out}"
    );
    // 20 receivers are too few for a figure of memory per receiver: it says so.
    assert!(
        out.contains("too few receivers to tell from the rest, measure with --receivers 100"),
        "{out}"
    );
    // With a prefix filter, the edges are delivered only the keys they take: about one in ten
    // here ("t:1" of "t:000000".."t:999999"), not every one published.
    let o = bench(&[
        "--latency-for",
        "100ms",
        "--receivers",
        "0",
        "--prefix",
        "t:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let taken: u64 = out
        .split_once("published 3000 in ")
        .and_then(|(_, rest)| rest.split_once(" of them to the edges' prefix"))
        .and_then(|(said, _)| said.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count of the keys taken in:\n{out}"));
    assert!((100..=900).contains(&taken), "{taken} of 3000:\n{out}");
    // Figures are per invalidation delivered: each carries its 8-byte key on the wire at least
    // (uncompressed), which counting every one published would have spread over ten times more.
    let per: f64 = out
        .split_once("wire:")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no wire figure in:\n{out}"));
    assert!(per >= 8.0, "{per} bytes per delivered invalidation:\n{out}");
    assert!(out.contains("prefix filter=\"t:1\""), "{out}");
    let none = dci(&["bench", "--key-format", "t:{}", "--prefix", "u:"]);
    assert_eq!(none.status.code(), Some(2));
    assert_eq!(
        stderr(&none),
        "dci: --prefix \"u:\" matches none of the bench's keys (they look like \"t:123456\")\n"
    );
    let bad = dci(&["bench", "--key-format", "no-placeholder"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("must contain `{}` exactly once"));
    // Nothing to measure: refused before anything starts (it printed infinities and NaNs).
    for (flag, zero) in [
        ("--edges", "0"),
        ("--count", "0"),
        ("--rate", "0"),
        ("--keys", "0"),
        ("--latency-for", "0s"),
    ] {
        let bad = dci(&["bench", flag, zero]);
        assert_eq!(bad.status.code(), Some(2), "{flag} {zero}");
        assert!(stderr(&bad).contains(flag), "{}", stderr(&bad));
    }
    // More receivers than connections can be opened: refused at once, not after minutes.
    let bad = dci(&["bench", "--receivers", "100000000"]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(stderr(&bad).lines().count(), 1, "{}", stderr(&bad));
    assert!(stderr(&bad).contains("open files"), "{}", stderr(&bad));
    // More edges than memory or descriptors allow: refused at once (they were killed for memory
    // a minute in, each edge's tombstone table taking 8 MiB).
    let bad = dci(&["bench", "--edges", "1000000"]);
    assert_eq!(bad.status.code(), Some(2));
    let why = stderr(&bad);
    assert_eq!(why.lines().count(), 1, "{why}");
    assert!(
        why.contains("--edges 1000000 needs about")
            && (why.contains("open files") || why.contains("MiB are available")),
        "{why}"
    );
}

/// `dci` with its standard output a pipe nobody reads: closed before the command starts, so
/// every write fails as it does once `| head` has what it wanted.
fn dci_unread(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(DCI)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// A reader that goes away (`dci status | head -3`) ends what a command prints, not the
/// command with a panic: each one exits as it would have, quietly, and the long runs stop at
/// their next step instead of running on for nobody (they panicked at their next line).
#[test]
fn a_reader_that_goes_away_ends_the_printing_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, cport) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cport}");
    let (_edge, eport) = start_edge_on(&coord, "eu");
    let edge = format!("http://127.0.0.1:{eport}");
    // Past the pipe's buffer, so that the value is not all written before anything fails.
    fill(&edge, "big", &"v".repeat(100_000));
    let quiet = |o: &Output, code: i32, what: &str| {
        assert_eq!(o.status.code(), Some(code), "{what}: {}", stderr(o));
        assert!(stderr(o).is_empty(), "{what}: {}", stderr(o));
    };
    quiet(
        &dci_unread(&["status", "--coordinator", &coord]),
        0,
        "status",
    );
    quiet(
        &dci_unread(&["status", "--coordinator", &coord, "--json"]),
        0,
        "status --json",
    );
    quiet(&dci_unread(&["get", "--edge", &edge, "big"]), 0, "get");
    quiet(
        &dci_unread(&["delete", "--edge", &edge, "big"]),
        0,
        "delete",
    );
    // A miss still says so, on stderr.
    let miss = dci_unread(&["get", "--edge", &edge, "big"]);
    assert_eq!(miss.status.code(), Some(1), "{}", stderr(&miss));
    // Another failure to write is an error, in one line.
    let full = Command::new(DCI)
        .args(["status", "--coordinator", &coord])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    one_line_error(&full, "dci: writing to standard output: ");
    // The runs stop at their next step: the demo long before its duration, the bench before
    // its latency run (either would have run for minutes).
    let started = Instant::now();
    let demo = dci_unread(&[
        "demo",
        "--duration",
        "300s",
        "--rate",
        "100",
        "--reads",
        "100",
    ]);
    assert_eq!(demo.status.code(), Some(0), "{}", stderr(&demo));
    assert!(!stderr(&demo).contains("panicked"), "{}", stderr(&demo));
    let bench = dci_unread(&[
        "bench",
        "--edges",
        "2",
        "--count",
        "1000",
        "--latency-for",
        "300s",
        "--receivers",
        "0",
        "--no-redis",
    ]);
    assert_eq!(bench.status.code(), Some(0), "{}", stderr(&bench));
    assert!(!stderr(&bench).contains("panicked"), "{}", stderr(&bench));
    assert!(
        started.elapsed() < Duration::from_secs(200),
        "the runs went on for nobody: {:?}",
        started.elapsed()
    );
}

/// A rendered chart spreads each region's relays and edges, and the coordinators, over nodes (a
/// preference for nodes without the same pods), and bounds how many of a region's relays and
/// edges an eviction takes at a time (a disruption budget each, over exactly their pods). Every
/// pod runs as a user, not root, and is restarted once its node stops answering /healthz.
fn helm_placement(docs: &[serde_yaml::Value]) {
    let mut budgets = 0;
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
    {
        let spec = &d["spec"]["template"]["spec"];
        // Every node runs unprivileged, and is restarted once it has stopped answering.
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{d:?}");
        let live = &spec["containers"][0]["livenessProbe"];
        assert_eq!(live["httpGet"]["path"], "/healthz", "{d:?}");
        assert_eq!(live["httpGet"]["port"], "metrics", "{d:?}");
        assert!(live["failureThreshold"].as_u64() >= Some(3), "{d:?}");
        let term = &spec["affinity"]["podAntiAffinity"]
            ["preferredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(
            term["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname",
            "{d:?}"
        );
        let spread = &term["podAffinityTerm"]["labelSelector"]["matchLabels"];
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let role = labels["role"].as_str().unwrap();
        if role == "coordinator" {
            assert_eq!(spread["role"], "coordinator");
            assert!(
                spread["shard"].is_null(),
                "every shard's coordinator apart from the others"
            );
            continue;
        }
        assert_eq!(spread, labels, "{d:?}");
        let budget = docs
            .iter()
            .find(|b| {
                b["kind"] == "PodDisruptionBudget" && b["metadata"]["name"] == d["metadata"]["name"]
            })
            .unwrap_or_else(|| panic!("no disruption budget for {:?}", d["metadata"]["name"]));
        assert_eq!(budget["apiVersion"], "policy/v1");
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"],
            d["spec"]["selector"]["matchLabels"]
        );
        assert_eq!(budget["spec"]["maxUnavailable"], 1);
        budgets += 1;
    }
    assert_eq!(budgets, 4, "two regions' relays and edges");
}

/// A file of the Helm chart's `files/`.
fn chart_file(name: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/dci/files");
    std::fs::read_to_string(format!("{dir}/{name}")).unwrap()
}

/// `helm template` of the chart with these settings: the rendered documents, or helm's stderr.
fn helm_template(release: &str, settings: &[&str]) -> Result<Vec<serde_yaml::Value>, String> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/dci");
    let o = Command::new("helm")
        .args(["template", release, chart])
        .args(settings)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(stderr(&o));
    }
    Ok(serde_yaml::Deserializer::from_str(&stdout(&o))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &serde_yaml::Value| !d.is_null())
        .collect())
}

/// The chart's NOTES.txt (what `helm install` prints) as rendered with these settings:
/// `helm template` leaves NOTES.txt out (and takes only YAML), so it renders a copy of the chart
/// in which a template gives the file's text, rendered as NOTES.txt is, as a YAML string.
fn helm_notes(release: &str, settings: &[&str]) -> String {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/dci");
    let copy = tempfile::tempdir().unwrap();
    let o = Command::new("cp")
        .args(["-r", chart])
        .arg(copy.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let root = copy.path().join("dci");
    std::fs::rename(root.join("templates/NOTES.txt"), root.join("notes.tpl")).unwrap();
    std::fs::write(
        root.join("templates/notes.yaml"),
        "notes: |\n{{ tpl (.Files.Get \"notes.tpl\") . | indent 2 }}\n",
    )
    .unwrap();
    let o = Command::new("helm")
        .args(["template", release])
        .arg(&root)
        .args(["--show-only", "templates/notes.yaml"])
        .args(settings)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_yaml::Value = serde_yaml::from_str(&stdout(&o)).unwrap();
    doc["notes"].as_str().unwrap().to_string()
}

/// The Services of rendered documents: name → port.
fn helm_services(docs: &[serde_yaml::Value]) -> std::collections::HashMap<String, u64> {
    docs.iter()
        .filter(|d| d["kind"] == "Service")
        .map(|d| {
            let port = d["spec"]["ports"][0]["port"].as_u64().unwrap();
            (d["metadata"]["name"].as_str().unwrap().to_string(), port)
        })
        .collect()
}

/// A workload's container args.
fn helm_args(d: &serde_yaml::Value) -> Vec<String> {
    d["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The value after `flag` in a command line.
fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
    &args[args.iter().position(|a| a == flag).unwrap() + 1]
}

/// The text of `file` in the ConfigMap that workload `name` mounts at `dir`.
fn mounted_config(docs: &[serde_yaml::Value], name: &str, dir: &str, file: &str) -> String {
    let workload = docs
        .iter()
        .find(|d| d["metadata"]["name"] == name && d["spec"]["template"].is_mapping())
        .unwrap();
    let spec = &workload["spec"]["template"]["spec"];
    let mounts = spec["containers"][0]["volumeMounts"].as_sequence().unwrap();
    let volume = mounts.iter().find(|m| m["mountPath"] == dir).unwrap()["name"].clone();
    let volumes = spec["volumes"].as_sequence().unwrap();
    let map = &volumes.iter().find(|v| v["name"] == volume).unwrap()["configMap"]["name"];
    let doc = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == *map)
        .unwrap_or_else(|| panic!("{name} mounts ConfigMap {map:?}, which the chart lacks"));
    doc["data"][file].as_str().unwrap().to_string()
}

/// Start one pod of every workload of rendered documents, coordinators first, then relays,
/// then edges, each with its command line as rendered but for where things are: `0.0.0.0:PORT`
/// listens on port 0 of loopback, a URL naming a Service (of `services`) points at the port its
/// pod got (`ports`, which learns each workload's), `$(POD_NAME)` is the pod's name (and
/// `$(NODE_NAME)` its node's, `node-0`), `/data` a
/// directory of its own (in `dirs`) and the TLS Secret's files at `/tls` the test certificates.
/// Each pod's probes ask `/healthz` on its metrics port, and get 200 there. Returns the processes.
fn start_pods(
    docs: &[serde_yaml::Value],
    services: &std::collections::HashMap<String, u64>,
    ports: &mut std::collections::HashMap<String, u16>,
    dirs: &mut Vec<tempfile::TempDir>,
) -> Vec<Proc> {
    // (workload name, role, container args, the paths its probes ask).
    let mut pods: Vec<(String, String, Vec<String>, Vec<String>)> = docs
        .iter()
        .filter(|d| {
            ["Deployment", "StatefulSet", "DaemonSet"].contains(&d["kind"].as_str().unwrap_or(""))
        })
        .map(|d| {
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            let args = helm_args(d);
            for (var, field) in [
                ("POD_NAME", "metadata.name"),
                ("NODE_NAME", "spec.nodeName"),
            ] {
                if args.iter().any(|a| a.contains(&format!("$({var})"))) {
                    assert_eq!(c["env"][0]["name"], var);
                    assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], field);
                }
            }
            // The probes ask the port the node serves its metrics on.
            let metrics = c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "metrics")
                .and_then(|p| p["containerPort"].as_u64())
                .expect("a metrics port");
            assert_eq!(
                after(&args, "--metrics-listen"),
                format!("0.0.0.0:{metrics}")
            );
            let role = c["name"].as_str().unwrap().to_string();
            let mut paths = Vec::new();
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                if !c[probe].is_null() {
                    // Readiness of relays and edges: caught up with the coordinator lately
                    // (a stranded relay leaves its Service); everything else: health.
                    let path = if probe == "readinessProbe" && role != "coordinator" {
                        "/readyz"
                    } else {
                        "/healthz"
                    };
                    assert_eq!(c[probe]["httpGet"]["path"], path, "{role}'s {probe}");
                    assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
                    paths.push(path.to_string());
                }
            }
            assert!(!c["readinessProbe"].is_null());
            (
                d["metadata"]["name"].as_str().unwrap().to_string(),
                role,
                args,
                paths,
            )
        })
        .collect();
    let rank = |role: &str| {
        ["coordinator", "relay", "edge"]
            .iter()
            .position(|r| *r == role)
    };
    pods.sort_by_key(|(_, role, ..)| rank(role));
    let mut running = Vec::new();
    for (name, _, args, paths) in &pods {
        let pod = format!("{name}-0");
        let mut local = |flag: &str, arg: &str| -> String {
            if flag == "--metrics-listen" {
                return "127.0.0.1:0".into();
            }
            if let Some(port) = arg.strip_prefix("0.0.0.0:") {
                assert_eq!(
                    services[name].to_string(),
                    port,
                    "{name} listens off its Service's port"
                );
                return "127.0.0.1:0".into();
            }
            if arg == "/data" {
                dirs.push(tempfile::tempdir().unwrap());
                return dirs.last().unwrap().path().to_str().unwrap().into();
            }
            if flag == "--config" {
                // The file as the pod sees it: the ConfigMap its volume mounts there.
                let (dir, file) = arg.rsplit_once('/').unwrap();
                let text = mounted_config(docs, name, dir, file);
                dirs.push(tempfile::tempdir().unwrap());
                let path = dirs.last().unwrap().path().join(file);
                std::fs::write(&path, text).unwrap();
                return path.to_str().unwrap().into();
            }
            if let Some(file) = arg.strip_prefix("/tls/") {
                let test_file = match file {
                    "tls.crt" => "node.pem",
                    "tls.key" => "node.key",
                    "ca.crt" => "ca.pem",
                    other => panic!("no such file in a TLS Secret: {other}"),
                };
                return tls_file(test_file);
            }
            if let Some((scheme, _)) = arg.split_once("://") {
                // Every URL names a Service, at the Service's port.
                let urls: Vec<String> = arg
                    .split(',')
                    .map(|u| {
                        let (host, port) = u[scheme.len() + 3..].split_once(':').unwrap();
                        assert_eq!(services[host].to_string(), port, "{u}");
                        format!("{scheme}://127.0.0.1:{}", ports[host])
                    })
                    .collect();
                return urls.join(",");
            }
            arg.replace("$(POD_NAME)", &pod)
                .replace("$(NODE_NAME)", "node-0")
        };
        let args: Vec<String> = args
            .iter()
            .enumerate()
            .map(|(i, a)| local(if i > 0 { &args[i - 1] } else { "" }, a))
            .collect();
        let mut cmd = Command::new(DCI);
        cmd.args(args);
        let (proc, port, lines) = launch(cmd);
        let metrics = metrics_port(&lines);
        for path in paths {
            eventually(&format!("{name}'s {path} probe passing"), || {
                http_get(metrics, path).0 == 200
            });
        }
        ports.insert(name.clone(), port);
        running.push(proc);
    }
    running
}

/// The edges of `coordinators`' tree (`dci status`, with `more` flags) that have applied each
/// shard up to its head in `heads`.
fn edges_caught_up(coordinators: &str, more: &[&str], heads: &[u64]) -> Vec<String> {
    let mut caught_up: Vec<String> = status_nodes(coordinators, more)
        .iter()
        .filter(|n| n["role"] == "edge")
        .filter(|n| {
            let hwm = |shard: usize| {
                n["shards"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["shard"].as_u64() == Some(shard as u64))
                    .filter_map(|s| s["hwm"].as_u64())
                    .max()
                    .unwrap_or(0)
            };
            heads.iter().enumerate().all(|(shard, &h)| hwm(shard) >= h)
        })
        .filter_map(|n| n["node_id"].as_str().map(str::to_string))
        .collect();
    caught_up.sort();
    caught_up.dedup();
    caught_up
}

/// Test certificates (`tests/tls`): a CA, a node certificate it signed for 127.0.0.1 and
/// localhost, and another CA that signed nothing here.
fn tls_file(name: &str) -> String {
    format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A coordinator (its log in `dir`, `more` flags beside), a relay of region "eu" following it
/// and an edge following the relay, each serving TLS with the test node certificate and
/// trusting the test CA: the processes, and the coordinator's, relay's and edge's URLs.
fn start_tls_tree(dir: &std::path::Path, more: &[&str]) -> (Vec<Proc>, [String; 3]) {
    let (ca, cert, key) = (
        tls_file("ca.pem"),
        tls_file("node.pem"),
        tls_file("node.key"),
    );
    let serve = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca];
    let mut args = vec!["coordinator", "--listen", "127.0.0.1:0", "--data-dir"];
    args.push(dir.to_str().unwrap());
    args.extend(&serve[..4]);
    args.extend(more);
    let (c, cp) = start(&args);
    let coord = format!("https://127.0.0.1:{cp}");
    let mut args = vec!["relay", "--listen", "127.0.0.1:0", "--region", "eu"];
    args.extend(["--upstream", &coord]);
    args.extend(serve);
    let (r, rp) = start(&args);
    let relay = format!("https://127.0.0.1:{rp}");
    let mut args = vec!["edge", "--listen", "127.0.0.1:0", "--region", "eu"];
    args.extend(["--relays", &relay]);
    args.extend(serve);
    let (e, ep) = start(&args);
    (
        vec![c, r, e],
        [coord, relay, format!("https://127.0.0.1:{ep}")],
    )
}

/// A whole tree over TLS: every node serves TLS with its certificate and follows its sender at
/// an `https://` URL trusting the CA; the CLI publishes, reads status and fills and reads an
/// edge the same way. A client that does not trust the node's CA, or speaks plaintext to it, is
/// refused with one line; a certificate without its key is refused at start.
#[test]
fn a_tree_over_tls() {
    let (ca, cert, key) = (
        tls_file("ca.pem"),
        tls_file("node.pem"),
        tls_file("node.key"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (_tree, [coord, relay, edge]) = start_tls_tree(dir.path(), &[]);
    let publish = |key: &str| {
        let o = dci(&["publish", "--coordinator", &coord, "--tls-ca", &ca, key]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let edge_at = |seq: u64| {
        eventually("the edge to apply it (dci status over TLS)", || {
            status_nodes(&coord, &["--tls-ca", &ca])
                .iter()
                .any(|n| n["role"] == "edge" && n["shards"][0]["hwm"].as_u64() == Some(seq))
        })
    };
    // In the stream first: a lease handed out before the edge joins it is void after.
    assert_eq!(publish("warm"), "warm 1\n");
    edge_at(1);

    let o = dci(&["get", "--edge", &edge, "--tls-ca", &ca, "user:1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lease = lease_in(&o);
    let o = dci(&[
        "set",
        "--edge",
        &edge,
        "--tls-ca",
        &ca,
        "--lease",
        &lease.to_string(),
        "user:1",
        "v1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dci(&["get", "--edge", &edge, "--tls-ca", &ca, "user:1"]);
    assert_eq!(stdout(&o), "v1\n", "{}", stderr(&o));
    assert_eq!(publish("user:1"), "user:1 2\n");
    edge_at(2);
    let o = dci(&["get", "--edge", &edge, "--tls-ca", &ca, "user:1"]);
    assert_eq!(o.status.code(), Some(1), "invalidated: {}", stdout(&o));

    // Not trusted, plaintext either way, unreadable: one line each, exit 2.
    let other = tls_file("other-ca.pem");
    let plain_dir = tempfile::tempdir().unwrap();
    let (_plain, pp) = start_coordinator(plain_dir.path());
    let plain = format!("https://127.0.0.1:{pp}");
    for (args, says) in [
        (
            vec![
                "publish",
                "--coordinator",
                &coord,
                "--tls-ca",
                &other,
                "--retry-for",
                "0s",
                "k",
            ],
            "invalid peer certificate",
        ),
        (
            vec![
                "publish",
                "--coordinator",
                &coord.replace("https", "http"),
                "--retry-for",
                "0s",
                "k",
            ],
            "if the node serves TLS, its URL is https://",
        ),
        (
            vec![
                "get",
                "--edge",
                &edge,
                "--tls-ca",
                "/nonexistent/ca.pem",
                "k",
            ],
            "cannot read tls.ca /nonexistent/ca.pem",
        ),
        (
            vec!["status", "--coordinator", &plain, "--tls-ca", &ca],
            "if the node serves plaintext, its URL is http://",
        ),
        (
            vec!["get", "--edge", &edge, "--tls-ca", &key, "k"],
            "holds no PEM certificate",
        ),
    ] {
        let o = dci(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    let o = dci(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &relay,
        "--tls-cert",
        &cert,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("tls.cert needs tls.key"),
        "{}",
        stderr(&o)
    );
}

/// Mutual TLS: a coordinator given `--tls-client-ca` serves only clients presenting a
/// certificate that CA signed. A relay presenting its own follows it and an edge follows the
/// relay; the CLI publishes and reads status with `--tls-cert`/`--tls-key`. Without a
/// certificate, or with one of another CA, a command is refused with one line saying what to
/// check, and a relay says so in its log; a client CA on a node not serving TLS is refused at start.
#[test]
fn mutual_tls_serves_only_clients_presenting_a_certificate_its_ca_signed() {
    let (ca, cert, key) = (
        tls_file("ca.pem"),
        tls_file("node.pem"),
        tls_file("node.key"),
    );
    let (other_cert, other_key) = (tls_file("other-node.pem"), tls_file("other-node.key"));
    let dir = tempfile::tempdir().unwrap();
    let (_tree, [coord, _, _]) = start_tls_tree(dir.path(), &["--tls-client-ca", &ca]);

    let mine = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    // `dci publish` of `key` with `tls` flags, refusals final at once.
    let publish = |tls: &[&str], key: &str| {
        let mut args = vec!["publish", "--coordinator", &coord, "--retry-for", "0s"];
        args.extend(tls);
        args.push(key);
        dci(&args)
    };
    let o = publish(&mine, "k");
    assert_eq!(stdout(&o), "k 1\n", "{}", stderr(&o));
    eventually("the edge to apply it (dci status over mutual TLS)", || {
        status_nodes(&coord, &mine)
            .iter()
            .any(|n| n["role"] == "edge" && n["shards"][0]["hwm"].as_u64() == Some(1))
    });

    let refused = [
        (vec!["--tls-ca", &ca], "give --tls-cert and --tls-key"),
        (
            vec![
                "--tls-ca",
                &ca,
                "--tls-cert",
                &other_cert,
                "--tls-key",
                &other_key,
            ],
            "is this one signed by its --tls-client-ca, for client authentication?",
        ),
    ];
    for (tls, says) in refused {
        let o = publish(&tls, "k");
        assert_eq!(o.status.code(), Some(2), "{tls:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{tls:?}: {}", stderr(&o));
    }

    let mut cmd = Command::new(DCI);
    cmd.args(["relay", "--listen", "127.0.0.1:0", "--region", "eu"])
        .args(["--upstream", &coord, "--tls-ca", &ca]);
    let (_bare, _, lines) = launch(cmd);
    let warned = std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(20)).ok())
        .find(|l| l.contains("could not follow sender"))
        .expect("the relay without a certificate never warned");
    assert!(warned.contains("give --tls-cert and --tls-key"), "{warned}");
    let o = publish(&mine, "after");
    assert_eq!(
        stdout(&o),
        "after 2\n",
        "nothing refused was logged: {}",
        stderr(&o)
    );

    let o = dci(&[
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &coord,
        "--tls-client-ca",
        &ca,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("tls.client_ca needs tls.cert and tls.key"),
        "{}",
        stderr(&o)
    );
    // A key that is not the certificate's: refused before a log is made.
    let fresh = dir.path().join("never-made");
    let o = dci(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        fresh.to_str().unwrap(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &other_key,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not be consistent"), "{}", stderr(&o));
    assert!(
        !fresh.exists(),
        "a log was made for a coordinator that could not start"
    );
}

/// `--tls-allow-*`: each API of a node serves only the certificates named for it. The writer's
/// certificate publishes; the nodes' follows and reads status; each is refused the other's API
/// with one line naming the list to look at, and nothing refused is logged.
#[test]
fn allow_lists_give_each_api_to_the_certificates_named() {
    let (ca, cert, key) = (
        tls_file("ca.pem"),
        tls_file("node.pem"),
        tls_file("node.key"),
    );
    let (writer_cert, writer_key) = (tls_file("writer.pem"), tls_file("writer.key"));
    let dir = tempfile::tempdir().unwrap();
    let allow = [
        "--tls-client-ca",
        &ca,
        "--tls-allow-publish",
        "orders.svc.*,billing.svc.example",
        "--tls-allow-subscribe",
        "localhost",
        "--tls-allow-admin",
        "localhost",
    ];
    let (_tree, [coord, _, _]) = start_tls_tree(dir.path(), &allow);
    let node = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let writer = [
        "--tls-ca",
        &ca,
        "--tls-cert",
        &writer_cert,
        "--tls-key",
        &writer_key,
    ];
    let publish = |tls: &[&str], key: &str| {
        dci(&[&["publish", "--coordinator", &coord][..], tls, &[key]].concat())
    };
    let o = publish(&writer, "k");
    assert_eq!(stdout(&o), "k 1\n", "{}", stderr(&o));
    eventually(
        "the edge to apply it (status read with the nodes' certificate)",
        || {
            status_nodes(&coord, &node)
                .iter()
                .any(|n| n["role"] == "edge" && n["shards"][0]["hwm"].as_u64() == Some(1))
        },
    );
    let o = publish(&node, "k");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("tls.allow.publish"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("its names: localhost"),
        "{}",
        stderr(&o)
    );
    let o = dci(&[&["status", "--coordinator", &coord][..], &writer].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tls.allow.admin")
            && stderr(&o).contains("orders.svc.example, spiffe://example.test/ns/orders/sa/writer"),
        "{}",
        stderr(&o)
    );
    let o = publish(&writer, "after");
    assert_eq!(stdout(&o), "after 2\n", "nothing refused was logged");

    // A list without a client CA to check certificates against cannot work.
    let o = dci(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("never-made").to_str().unwrap(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-allow-publish",
        "orders.svc.example",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tls.allow needs tls.client_ca"),
        "{}",
        stderr(&o)
    );
}

/// A coordinator that is stopped, not gone, takes the connection and answers nothing: `dci
/// publish` waits for it as long as `--retry-for` says, not the whole request timeout.
#[test]
fn publish_gives_up_on_a_silent_coordinator_after_retry_for() {
    // Listening, never accepting: the kernel completes the handshakes, nothing answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let o = dci(&["publish", "--coordinator", &url, "--retry-for", "1s", "k"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{url}: no answer within 1s")),
        "{}",
        stderr(&o)
    );
}

/// Arguments the command line cannot take are errors like any other: one line saying what is
/// wrong, exit 2; help and version still print in full.
#[test]
fn usage_errors_are_one_line() {
    let cases: [(&[&str], &str); 9] = [
        (&["publish", "--bogus"], "unexpected argument '--bogus'"),
        (&["nonsense"], "unrecognized subcommand 'nonsense'"),
        (&["get"], "required arguments were not provided: <KEY>"),
        (
            &["coordinator", "--fsync", "sometimes"],
            "unknown fsync policy \"sometimes\" (always, interval, never)",
        ),
        (&["demo", "--shards", "0"], "'0' for '--shards <SHARDS>'"),
        // It aborted, failing to allocate its "database".
        (
            &["demo", "--keys", "10000000000"],
            "'10000000000' for '--keys <KEYS>': 10000000000 is not in 1..=10000000",
        ),
        (
            &["demo", "--chaos=0s"],
            "'0s' for '--chaos [<EVERY>]': must be more than 0",
        ),
        (
            &["publish", "--wait=0s", "k"],
            "'0s' for '--wait[=<WAIT>]': must be more than 0",
        ),
        (
            &["bench", "--edges", "0"],
            "'0' for '--edges <EDGES>': must be at least 1",
        ),
    ];
    for (args, says) in cases {
        let o = dci(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("dci: "), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    let o = dci(&["publish", "--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("--coordinator"), "{}", stdout(&o));
    let o = dci(&["--version"]);
    assert_eq!(stdout(&o), "dci 0.1.0\n");
}

/// A node raises its open-file limit to the hard limit (a relay holds a descriptor per
/// receiver, and the usual soft limit of 1024 would refuse the thousand-and-first edge).
#[test]
fn a_node_raises_its_open_file_limit() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -Sn 256; exec \"$0\" \"$@\"", DCI])
        .args([
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
        ]);
    let (relay, _) = start_cmd(cmd);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.0.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        numbers[0], numbers[1],
        "soft limit not raised to the hard: {line}"
    );
    assert_ne!(numbers[0], "256", "{line}");
}

/// A coordinator (its log in `dir`) and a relay of region `eu` following it: the processes and
/// their URLs.
fn coordinator_and_relay_eu(dir: &std::path::Path) -> (Proc, Proc, String, String) {
    let (c, cp) = start_coordinator(dir);
    let coord = format!("http://127.0.0.1:{cp}");
    let (r, rp) = start(&[
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &coord,
        "--region",
        "eu",
    ]);
    (c, r, coord, format!("http://127.0.0.1:{rp}"))
}

/// An edge of region `eu` named `id` following `relay`, and its URL.
fn edge_eu(relay: &str, id: &str) -> (Proc, String) {
    let (proc, port) = start(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        relay,
        "--region",
        "eu",
        "--node-id",
        id,
    ]);
    (proc, format!("http://127.0.0.1:{port}"))
}

/// A node's shard-0 progress as `dci status --json` reports it: (hwm, lag_seqs, caught_up_ms).
fn progress(coord: &str, node_id: &str) -> Option<(u64, u64, u64)> {
    let nodes = status_nodes(coord, &[]);
    let n = nodes.iter().find(|n| n["node_id"] == node_id)?;
    let s = &n["shards"][0];
    Some((
        s["hwm"].as_u64()?,
        s["lag_seqs"].as_u64()?,
        s["caught_up_ms"].as_u64()?,
    ))
}

/// An edge that stops (SIGSTOP: a frozen process, a stuck host) stays in `dci status` with
/// what it has not applied and since when it has not been caught up, growing, rather than with
/// its last report's numbers until its relay gives up on it; asked of the relay too. When it
/// runs again, it catches up.
#[test]
fn a_stopped_edge_shows_its_lag_growing_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, _r, coord, relay) = coordinator_and_relay_eu(dir.path());
    let (_running, _) = edge_eu(&relay, "running");
    let (stopped, _) = edge_eu(&relay, "stopped");
    assert!(dci(&["publish", "--coordinator", &coord, "a"])
        .status
        .success());
    eventually("both edges to apply seq 1", || {
        ["running", "stopped"]
            .iter()
            .all(|id| progress(&coord, id).is_some_and(|(hwm, lag, _)| hwm == 1 && lag == 0))
    });
    stopped.signal("-STOP");
    assert!(dci(&["publish", "--coordinator", &coord, "b", "c"])
        .status
        .success());
    // Its last report said it was caught up well under a second before; the relay keeps the
    // link for 10 s of silence.
    for node in [&coord, &relay] {
        eventually("the stopped edge's lag and last catch-up to grow", || {
            progress(node, "stopped")
                .is_some_and(|(hwm, lag, caught_up)| hwm == 1 && lag == 2 && caught_up >= 2_500)
        });
    }
    assert_eq!(
        progress(&coord, "running").map(|(h, l, _)| (h, l)),
        Some((3, 0))
    );
    stopped.signal("-CONT");
    eventually("the edge to catch up once it runs again", || {
        progress(&coord, "stopped").is_some_and(|(hwm, lag, _)| hwm == 3 && lag == 0)
    });
}

/// `dci publish --wait` returns once every cache below the coordinator has applied what it
/// published, so that a read right after finds it gone at every edge; an edge that does not
/// apply it in time is named, and the exit code says so; with no cache, nothing is waited for.
#[test]
fn publish_wait_returns_once_every_cache_applied_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, _r, coord, relay) = coordinator_and_relay_eu(dir.path());
    let edges = [edge_eu(&relay, "running"), edge_eu(&relay, "stopped")];
    let publish = |wait: &str, key: &str| dci(&["publish", "--coordinator", &coord, wait, key]);
    let o = publish("--wait", "warm");
    assert!(o.status.success(), "{}", stderr(&o));
    eventually("both edges in the tree", || {
        ["running", "stopped"]
            .iter()
            .all(|id| progress(&coord, id).is_some_and(|(hwm, _, _)| hwm == 1))
    });

    for (_, url) in &edges {
        fill(url, "user:1", "v1");
    }
    let o = publish("--wait=20s", "user:1");
    assert_eq!(stdout(&o), "user:1 2\n");
    assert!(
        o.status.success() && stderr(&o).starts_with("applied by all 2 caches (eu) in "),
        "{o:?}"
    );
    for (_, url) in &edges {
        let got = dci(&["get", "--edge", url, "user:1"]);
        assert_eq!(got.status.code(), Some(1), "still served: {}", stdout(&got));
    }
    // `--wait 5s` would publish a key "5s": refused, nothing published (the next seq is 3).
    let o = publish("--wait", "5s");
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(2), ""));
    assert_eq!(
        stderr(&o),
        "dci: `--wait 5s` would publish a key named \"5s\" and wait 30s: say --wait=5s (a key \
         that reads as a duration goes before --wait)\n"
    );

    let signal = |sig: &str| edges[1].0.signal(sig);
    signal("-STOP");
    let o = publish("--wait=2s", "user:2");
    assert_eq!(stdout(&o), "user:2 3\n", "published all the same");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "not applied within 2s by 1 of 2 caches: stopped (eu) at seq 2 of 3 on shard 0\n"
    );
    signal("-CONT");
    let o = publish("--wait=20s", "user:3");
    assert!(o.status.success(), "{}", stderr(&o));

    let alone = tempfile::tempdir().unwrap();
    let (_c, port) = start_coordinator(alone.path());
    let o = dci(&[
        "publish",
        "--coordinator",
        &format!("http://127.0.0.1:{port}"),
        "--wait",
        "k",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "no cache follows these coordinators: nothing to wait for\n"
    );
    let o = publish("--wait=soon", "k");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

/// A cache that does not apply a publish (stopped here) is waited for only until its staleness
/// bound has passed since the publish: then it serves none of what was invalidated, so
/// `--wait` ends well before its own time, exit 0, naming it. Run again, it does not serve the
/// value it held (it answers misses until it has caught up, and applied the publish). Cut off
/// from its relay and asked meanwhile, it does not either; and a cache with a longer bound is
/// still waited for.
#[test]
fn publish_wait_ends_once_a_silent_cache_is_past_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, relay_proc, coord, relay) = coordinator_and_relay_eu(dir.path());
    let _running = edge_eu(&relay, "running");
    let (frozen, fp) = start(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &relay,
        "--region",
        "eu",
        "--node-id",
        "frozen",
        "--max-staleness",
        "1s",
    ]);
    let frozen_url = format!("http://127.0.0.1:{fp}");
    let publish = |key: &str| dci(&["publish", "--coordinator", &coord, "--wait=20s", key]);
    assert!(publish("warm").status.success());
    eventually("both edges in the tree", || {
        ["running", "frozen"]
            .iter()
            .all(|id| progress(&coord, id).is_some_and(|(hwm, _, _)| hwm == 1))
    });
    let mut bounds: Vec<(String, serde_json::Value)> = status_nodes(&coord, &[])
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap_or("").to_string(),
                n["max_staleness_ms"].clone(),
            )
        })
        .filter(|(id, _)| id != "coordinator-0" && !id.starts_with("relay-"))
        .collect();
    bounds.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        bounds,
        [
            ("frozen".into(), 1000.into()),
            ("running".into(), 5000.into())
        ],
        "caches report their bounds"
    );
    fill(&frozen_url, "user:1", "v1");

    frozen.signal("-STOP");
    let o = publish("user:1");
    let status = stdout(&dci(&["status", "--coordinator", &coord]));
    // A command to a node that hangs gives up, saying which node.
    let stuck = dci(&["get", "--edge", &frozen_url, "user:1"]);
    frozen.signal("-CONT");
    assert_eq!(stuck.status.code(), Some(2));
    assert_eq!(
        stderr(&stuck),
        format!("dci: {frozen_url}: no answer within 10s\n")
    );
    let row = |id: &str| {
        let line = status.lines().find(|l| l.starts_with(id));
        line.unwrap_or_else(|| panic!("{status}")).to_string()
    };
    assert!(
        row("frozen").contains("s* ") && !row("running").contains('*'),
        "{status}"
    );
    assert!(
        status.ends_with("* a cache past its staleness bound: it answers only misses for the shard until it has caught up\n"),
        "{status}"
    );
    assert_eq!(stdout(&o), "user:1 2\n");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.starts_with("applied by 1 of 2 caches (eu) in "),
        "{err}"
    );
    assert!(
        err.ends_with(
            "; not by frozen (eu) at seq 1 of 2 on shard 0, which is past its staleness \
             bound since: it serves none of it\n"
        ) || err.contains("; not by frozen (eu) no longer reported, which is past"),
        "{err}"
    );
    let took: f64 = err["applied by 1 of 2 caches (eu) in ".len()..]
        .split('s')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(took >= 1.5, "not before its bound and the margin: {err}");
    let got = dci(&["get", "--edge", &frozen_url, "user:1"]);
    assert_eq!(got.status.code(), Some(1), "served: {}", stdout(&got));

    eventually("the edge caught up again", || {
        progress(&coord, "frozen").is_some_and(|(hwm, lag, _)| hwm == 2 && lag == 0)
    });
    fill(&frozen_url, "user:3", "v3");
    relay_proc.signal("-STOP");
    // Its time leaves the frozen edge's bound and margin (1.5 s) to pass after the publish.
    let o = dci(&["publish", "--coordinator", &coord, "--wait=3s", "user:3"]);
    let got = dci(&["get", "--edge", &frozen_url, "user:3"]);
    relay_proc.signal("-CONT");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "not applied within 3s by 1 of 2 caches: running (eu) at seq 2 of 3 on shard 0\n",
        "the frozen edge, with its 1 s bound, is not waited for any more"
    );
    assert_eq!(
        got.status.code(),
        Some(1),
        "served cut off: {}",
        stdout(&got)
    );
}

/// Names come from the nodes (and from any receiver's report of itself): printed, their control
/// characters are escaped, so that none can clear a terminal or forge a line of `dci status`.
#[test]
fn names_with_control_characters_are_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let (_e, _) = start(&[
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &coord,
        "--node-id",
        "evil\x1b[2J\ncoordinator-9 forged",
        "--region",
        "eu\x07",
    ]);
    let mut out = String::new();
    eventually("the edge in dci status", || {
        out = stdout(&dci(&["status", "--coordinator", &coord]));
        out.contains("evil")
    });
    assert!(
        out.contains("evil\\u{1b}[2J\\ncoordinator-9 forged") && out.contains("eu\\u{7}"),
        "{out}"
    );
    assert_eq!(
        out.lines().count(),
        3,
        "a header, the coordinator, the edge: {out}"
    );
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    let o = dci(&["publish", "--coordinator", &coord, "--wait=20s", "k"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("applied by the only cache (eu\\u{7}) in "),
        "{}",
        stderr(&o)
    );
}

/// The Helm chart as a cluster would start it: `helm template` renders it (two shards, two
/// regions), and one pod of every coordinator StatefulSet, relay Deployment and edge StatefulSet
/// is started from its command line as rendered (see `start_pods`). A publish through both
/// shards reaches the edges of both regions, which report under their pods' names (edges on a
/// ring of their pods' names, two owners per key). Then a region in a cluster of its own: a
/// release without coordinators whose relays follow the first release's (`coordinator.enabled:
/// false`, `coordinator.upstreams`), started the same way, has its edge apply both shards too.
///
/// Skipped when `helm` is not on the PATH, unless `DCI_REQUIRE_HELM` is set (CI sets it).
#[test]
fn the_helm_chart_starts_a_working_tree() {
    if !Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            std::env::var_os("DCI_REQUIRE_HELM").is_none(),
            "helm is not on the PATH"
        );
        eprintln!("helm is not on the PATH: the chart is not checked");
        return;
    }
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/dci");
    let o = Command::new("helm").args(["lint", chart]).output().unwrap();
    assert!(o.status.success(), "{}", stdout(&o));
    let settings = &[
        "--set",
        "coordinator.shards=2",
        "--set",
        "edge.replication=2",
        "--set",
        "relay.maxReceivers=100",
        "--set-json",
        r#"coordinator.extraArgs=["--max-key-len","100"]"#,
        "--set-json",
        r#"relay.extraArgs=["--compression"]"#,
        "--set-json",
        r#"edge.extraArgs=["--max-tag-tombstones",16777216]"#,
    ];
    let docs = helm_template("t", settings).unwrap();
    let mut services = helm_services(&docs);
    for d in docs
        .iter()
        .filter(|d| d["spec"]["template"]["spec"]["containers"][0]["name"] == "relay")
    {
        assert_eq!(after(&helm_args(d), "--max-receivers"), "100");
        assert_eq!(after(&helm_args(d), "--ring-bytes"), "64MiB");
        assert!(helm_args(d).iter().any(|a| a == "--compression"));
    }
    // Flags of values' extraArgs go to their component (numbers as digits): the pods started
    // below take them.
    for d in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
        let args = helm_args(d);
        match d["spec"]["template"]["spec"]["containers"][0]["name"].as_str() {
            Some("coordinator") => assert_eq!(after(&args, "--max-key-len"), "100"),
            Some("edge") => assert_eq!(after(&args, "--max-tag-tombstones"), "16777216"),
            _ => {}
        }
    }
    // Sizes with a unit go through as they are; a number stays digits (not 1.34217728e+08).
    let sized = helm_template(
        "s",
        &[
            "--set",
            "edge.capacity=1GiB",
            "--set",
            "relay.ringBytes=134217728",
        ],
    )
    .unwrap();
    for d in &sized {
        match d["spec"]["template"]["spec"]["containers"][0]["name"].as_str() {
            Some("relay") => assert_eq!(after(&helm_args(d), "--ring-bytes"), "134217728"),
            Some("edge") => assert_eq!(after(&helm_args(d), "--capacity"), "1GiB"),
            _ => {}
        }
    }
    // A region's edges share a ring of exactly their pods' names, in a file of a ConfigMap (which
    // they read again when it changes: scaling the region leaves the pods' template alone).
    for d in docs
        .iter()
        .filter(|d| d["spec"]["template"]["spec"]["containers"][0]["name"] == "edge")
    {
        let name = d["metadata"]["name"].as_str().unwrap();
        let args = helm_args(d);
        assert!(!args
            .iter()
            .any(|a| a == "--ring-nodes" || a == "--replication"));
        let config: serde_yaml::Value =
            serde_yaml::from_str(&mounted_config(&docs, name, "/etc/dci", "edge.yaml")).unwrap();
        assert_eq!(after(&args, "--config"), "/etc/dci/edge.yaml");
        let replicas = d["spec"]["replicas"].as_u64().unwrap();
        let pods: Vec<String> = (0..replicas).map(|i| format!("{name}-{i}")).collect();
        let ring: Vec<String> = serde_yaml::from_value(config["ring_nodes"].clone()).unwrap();
        assert_eq!(ring, pods);
        assert_eq!(config["replication"].as_u64(), Some(2));
        // Clients reach edges by name, ready or not; edges start without waiting on each other.
        assert_eq!(d["spec"]["podManagementPolicy"], "Parallel");
        let service = docs
            .iter()
            .find(|s| s["kind"] == "Service" && s["metadata"]["name"] == name)
            .expect("the edges' headless Service");
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    }
    // The log's volume is writable by the user the image runs as.
    let dockerfile = include_str!("../deploy/Dockerfile");
    let user: u64 = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .and_then(|u| u.trim().parse().ok())
        .expect("the image names a numeric user");
    for d in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
        let spec = &d["spec"]["template"]["spec"];
        if spec["containers"][0]["volumeMounts"].is_sequence() {
            assert_eq!(spec["securityContext"]["fsGroup"].as_u64(), Some(user));
            assert_eq!(spec["securityContext"]["runAsUser"].as_u64(), Some(user));
        }
        // A change of coordinator.shards finds each volume holding its shard's log under the
        // old count: set aside, not refused (a pod that could not start again).
        if spec["containers"][0]["name"] == "coordinator" {
            assert!(helm_args(d).iter().any(|a| a == "--reshard"), "{d:?}");
        }
    }
    let workloads = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        .count();
    assert_eq!(workloads, 2 + 2 + 2);
    helm_placement(&docs);
    let placed = helm_template(
        "p",
        &[
            "--set-json",
            r#"edge.nodeSelector={"pool":"cache"}"#,
            "--set-json",
            r#"edge.tolerations=[{"key":"cache","operator":"Exists"}]"#,
            "--set-json",
            r#"relay.affinity={"nodeAffinity":{"preferredDuringSchedulingIgnoredDuringExecution":[{"weight":1,"preference":{"matchExpressions":[{"key":"zone","operator":"In","values":["a"]}]}}]}}"#,
            "--set",
            "relay.maxUnavailable=2",
        ],
    )
    .unwrap();
    for d in placed
        .iter()
        .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
    {
        let spec = &d["spec"]["template"]["spec"];
        match spec["containers"][0]["name"].as_str().unwrap() {
            "edge" => {
                assert_eq!(spec["nodeSelector"]["pool"], "cache");
                assert_eq!(spec["tolerations"][0]["key"], "cache");
            }
            "relay" => {
                assert!(
                    spec["affinity"]["podAntiAffinity"].is_null(),
                    "replaced: {spec:?}"
                );
                assert_eq!(
                    spec["affinity"]["nodeAffinity"]
                        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"],
                    1
                );
            }
            _ => assert!(spec["nodeSelector"].is_null() && spec["tolerations"].is_null()),
        }
    }
    let relay_budgets: Vec<&serde_yaml::Value> = placed
        .iter()
        .filter(|d| {
            d["kind"] == "PodDisruptionBudget"
                && d["spec"]["selector"]["matchLabels"]["role"] == "relay"
        })
        .collect();
    assert_eq!(relay_budgets.len(), 2);
    assert!(relay_budgets
        .iter()
        .all(|b| b["spec"]["maxUnavailable"] == 2));

    let mut dirs = Vec::new();
    let mut ports = std::collections::HashMap::new();
    let mut running = start_pods(&docs, &services, &mut ports, &mut dirs);

    let coordinators = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        ports["t-coordinator-0"], ports["t-coordinator-1"]
    );
    let publish = || {
        let keys: Vec<String> = (0..8).map(|i| format!("user:{i}")).collect();
        let mut args = vec!["publish", "--coordinator", &coordinators];
        args.extend(keys.iter().map(String::as_str));
        let o = dci(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        // (shard, its last seq) from "KEY SEQ shard=N".
        let mut heads = vec![0u64; 2];
        for line in stdout(&o).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let shard: usize = f[2].trim_start_matches("shard=").parse().unwrap();
            heads[shard] = heads[shard].max(f[1].parse().unwrap());
        }
        assert!(heads.iter().all(|&h| h > 0), "both shards used: {heads:?}");
        heads
    };
    let heads = publish();
    eventually("both regions' edges to apply both shards", || {
        edges_caught_up(&coordinators, &[], &heads) == ["t-edge-eu-west-0", "t-edge-us-east-0"]
    });
    // The coordinators took coordinator.extraArgs.
    let long = "k".repeat(101);
    let o = dci(&["publish", "--coordinator", &coordinators, &long]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // What `helm install` tells to do works, and names the edges as they are.
    let notes = helm_notes("t", settings);
    let local = |arg: &str| -> String {
        arg.split(',')
            .map(|u| match u.split_once("://") {
                Some((scheme, rest)) => {
                    let (host, port) = rest.split_once(':').unwrap();
                    // A pod by its name under its headless Service: here, the one pod of it.
                    let host = host.rsplit('.').next().unwrap();
                    assert_eq!(services[host].to_string(), port, "{u}");
                    format!("{scheme}://127.0.0.1:{}", ports[host])
                }
                None => u.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let commands: Vec<Vec<String>> = notes
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(str::trim)
        .filter(|l| l.starts_with("dci ") && !l.contains("127.0.0.1"))
        .map(|l| l.split_whitespace().skip(1).map(local).collect())
        .collect();
    let ran: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(
        ran,
        ["publish", "status", "follow", "get", "follow", "get"],
        "{notes}"
    );
    for c in &commands {
        if c[0] == "follow" {
            let f = follow(
                Command::new(DCI)
                    .args(c)
                    .args(["--from", "1", "--count", "1"]),
            );
            let line = f.line().unwrap_or_default();
            assert!(line.starts_with("seq=1 key=user:"), "{c:?}: {line}");
            assert_eq!(f.exit_code(), Some(0), "{c:?}");
            continue;
        }
        if c[0] == "get" {
            // Only the first pod of each workload runs here, so a region's ring of edges has
            // one: a key it does not own is refused, naming its owners; one it owns, a miss.
            let key_of_its_own = (0..100).map(|i| format!("user:{i}")).find_map(|k| {
                let mut args: Vec<&str> = c.iter().map(String::as_str).collect();
                *args.last_mut().unwrap() = &k;
                let o = dci(&args);
                (o.status.code() != Some(2) || !stderr(&o).contains("(its owners: ")).then_some(o)
            });
            let o = key_of_its_own.expect("a key the running edge owns");
            assert_eq!(o.status.code(), Some(1), "{c:?}: {}", stderr(&o));
            assert!(stderr(&o).starts_with("miss (lease "), "{}", stderr(&o));
            continue;
        }
        let o = dci(&c.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{c:?}: {}", stderr(&o));
        match c[0].as_str() {
            "publish" => {
                assert!(stdout(&o).starts_with("user:42:profile "), "{}", stdout(&o));
                assert!(
                    stderr(&o).starts_with("applied by all 2 caches (eu-west, us-east) in "),
                    "{}",
                    stderr(&o)
                );
            }
            _ => assert!(stdout(&o).contains("t-edge-us-east-0"), "{}", stdout(&o)),
        }
    }
    for region in ["eu-west", "us-east"] {
        let edge = format!("t-edge-{region}-0 http://t-edge-{region}-0.t-edge-{region}:7600");
        assert!(notes.contains(&edge), "{notes}");
        assert!(notes.contains(".with_replication(2)"), "{notes}");
    }

    // A region of its own, following the first release's coordinators as another cluster would
    // (here by their in-cluster names; across clusters, by what `coordinator.exposeAs` gives).
    let region = [
        "--set",
        "coordinator.enabled=false",
        "--set",
        "coordinator.upstreams={http://t-coordinator-0:7400,http://t-coordinator-1:7400}",
        "--set-json",
        r#"regions=[{"name":"ap-south","relays":1,"edges":1}]"#,
    ];
    let docs = helm_template("u", &region).unwrap();
    assert!(
        !docs.iter().any(|d| d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.contains("coordinator"))),
        "a release without coordinators makes none"
    );
    let kinds = |docs: &[serde_yaml::Value], kind: &str| -> Vec<Vec<String>> {
        docs.iter()
            .filter(|d| d["kind"] == kind)
            .map(helm_args)
            .collect()
    };
    let edge = &kinds(&docs, "StatefulSet")[0];
    assert_eq!(after(edge, "--shard-count"), "2", "{edge:?}");
    services.extend(helm_services(&docs));
    running.extend(start_pods(&docs, &services, &mut ports, &mut dirs));
    let heads = publish();
    eventually("the other cluster's edge to apply both shards", || {
        edges_caught_up(&coordinators, &[], &heads).contains(&"u-edge-ap-south-0".to_string())
    });
    // Edges as a DaemonSet: one on each node, named after it, behind a Service that sends an
    // application to its own node's edge (no ring, which names its edges).
    let per_node = [
        region.as_slice(),
        &[
            "--set",
            "edge.kind=DaemonSet",
            "--set-json",
            r#"regions=[{"name":"ap-east","relays":1}]"#,
        ],
    ]
    .concat();
    let docs = helm_template("d", &per_node).unwrap();
    let edges = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the edges' DaemonSet");
    assert_eq!(
        after(&helm_args(edges), "--node-id"),
        "d-edge-ap-east-$(NODE_NAME)"
    );
    let service = docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "d-edge-ap-east")
        .unwrap();
    assert_eq!(service["spec"]["internalTrafficPolicy"], "Local");
    assert!(service["spec"]["clusterIP"].is_null(), "{service:?}");
    assert!(!docs
        .iter()
        .any(|d| d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == "d-edge-ap-east"));
    services.extend(helm_services(&docs));
    running.extend(start_pods(&docs, &services, &mut ports, &mut dirs));
    let heads = publish();
    eventually("the node's edge to apply both shards", || {
        edges_caught_up(&coordinators, &[], &heads).contains(&"d-edge-ap-east-node-0".to_string())
    });
    let notes = helm_notes("d", &per_node);
    let get: Vec<String> = notes
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("dci get --edge "))
        .unwrap_or_else(|| panic!("{notes}"))
        .split_whitespace()
        .skip(1)
        .map(|a| {
            a.replace(
                "d-edge-ap-east:7600",
                &format!("127.0.0.1:{}", ports["d-edge-ap-east"]),
            )
        })
        .collect();
    let o = dci(&get.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(1), "{get:?}: {}", stderr(&o));
    assert!(stderr(&o).starts_with("miss (lease "), "{}", stderr(&o));
    let err = helm_template("d", &["--set", "edge.kind=DaemonSet,edge.replication=2"]).unwrap_err();
    assert!(
        err.contains("edge.replication needs edge.kind StatefulSet"),
        "{err}"
    );
    drop(running);

    // Failover lists per shard, and what cannot work is refused with a message.
    let docs = helm_template(
        "v",
        &[
            "--set",
            "coordinator.enabled=false",
            "--set",
            r"coordinator.upstreams={http://a:7400\,http://b:7400,http://c:7400}",
        ],
    )
    .unwrap();
    for relay in kinds(&docs, "Deployment") {
        assert_eq!(after(&relay, "--upstream"), "http://a:7400,http://b:7400");
        assert_eq!(after(&relay, "--upstream-group"), "http://c:7400");
    }
    let err = helm_template("v", &["--set", "coordinator.enabled=false"]).unwrap_err();
    assert!(err.contains("coordinator.upstreams"), "{err}");
    let err = helm_template("v", &["--set", "coordinator.upstreams={http://a:7400}"]).unwrap_err();
    assert!(err.contains("coordinator.enabled=false"), "{err}");
    // Coordinators reachable from other clusters: one more Service per shard, of the type asked.
    let docs = helm_template(
        "w",
        &[
            "--set",
            "coordinator.shards=2",
            "--set",
            "coordinator.exposeAs=LoadBalancer",
            "--set-json",
            r#"coordinator.exposeAnnotations={"example.com/internal":"true"}"#,
        ],
    )
    .unwrap();
    for shard in 0..2 {
        let name = format!("w-coordinator-{shard}-external");
        let s = docs
            .iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"].as_str() == Some(&name))
            .unwrap_or_else(|| panic!("no Service {name}"));
        assert_eq!(s["spec"]["type"], "LoadBalancer");
        assert_eq!(s["spec"]["selector"]["shard"], shard.to_string().as_str());
        assert_eq!(s["spec"]["ports"][0]["port"].as_u64(), Some(7400));
        assert_eq!(s["metadata"]["annotations"]["example.com/internal"], "true");
    }

    // Mutual TLS from a Secret: every node serves its files and follows at https:// URLs
    // presenting its certificate; a publish with a certificate reaches the edge.
    let docs = helm_template(
        "x",
        &[
            "--set",
            "tls.secret=dci-tls",
            "--set",
            "tls.mutual=true",
            "--set-json",
            r#"tls.allow={"publish":["orders.svc.*","localhost"],"subscribe":["localhost"]}"#,
            "--set-json",
            r#"regions=[{"name":"eu","relays":1,"edges":1}]"#,
        ],
    )
    .unwrap();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
    {
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(spec["volumes"][0]["secret"]["secretName"], "dci-tls");
        let mounts = spec["containers"][0]["volumeMounts"].as_sequence().unwrap();
        assert!(mounts
            .iter()
            .any(|m| m["mountPath"] == "/tls" && m["readOnly"] == true));
        let args = helm_args(d);
        assert_eq!(after(&args, "--tls-client-ca"), "/tls/ca.crt");
        assert_eq!(
            after(&args, "--tls-allow-publish"),
            "orders.svc.*,localhost"
        );
        assert_eq!(after(&args, "--tls-allow-subscribe"), "localhost");
        assert!(!args.iter().any(|a| a == "--tls-allow-cache"), "{args:?}");
    }
    let services = helm_services(&docs);
    let running = start_pods(&docs, &services, &mut ports, &mut dirs);
    let coordinator = format!("https://127.0.0.1:{}", ports["x-coordinator-0"]);
    let (ca, cert, key) = (
        tls_file("ca.pem"),
        tls_file("node.pem"),
        tls_file("node.key"),
    );
    let mine = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let o = dci(&[
        &["publish", "--coordinator", &coordinator][..],
        &mine,
        &["k"],
    ]
    .concat());
    assert_eq!(stdout(&o), "k 1\n", "{}", stderr(&o));
    eventually("the edge to apply it over mutual TLS", || {
        edges_caught_up(&coordinator, &mine, &[1]) == ["x-edge-eu-0"]
    });
    drop(running);
    let err = helm_template("x", &["--set", "tls.mutual=true"]).unwrap_err();
    assert!(err.contains("tls.mutual needs tls.secret"), "{err}");
    let err = helm_template(
        "x",
        &[
            "--set",
            "tls.secret=dci-tls",
            "--set",
            "tls.allow.cache={a}",
        ],
    )
    .unwrap_err();
    assert!(err.contains("tls.allow.cache needs tls.mutual"), "{err}");

    // Values the nodes would refuse at start, or that the chart would pass over (a misspelt key),
    // are refused by helm itself, naming the value (the chart's values.schema.json).
    for (set, says) in [
        (
            "edge.capcity=1GiB",
            "edge: Additional property capcity is not allowed",
        ),
        (
            "coordinator.shards=0",
            "coordinator.shards: Must be greater than or equal to 1",
        ),
        (
            "relay.ringBytes=64MiBs",
            "relay.ringBytes: Does not match pattern",
        ),
        (
            "relay.ringBytes=100",
            "relay.ringBytes: Must be greater than or equal to 4096",
        ),
        ("edge.maxStaleness=5", "edge.maxStaleness: Invalid type"),
        (
            "coordinator.fsync=sometimes",
            "coordinator.fsync must be one of the following",
        ),
        (
            "regions[0].name=EU_West",
            "regions.0.name: Does not match pattern",
        ),
        (
            "regions[0].relays=0",
            "regions.0.relays: Must be greater than or equal to 1",
        ),
        // A region by its name alone would get Kubernetes' one relay and one edge, and with
        // replication an empty ring.
        ("regions[0].name=eu", "regions.0: relays is required"),
    ] {
        let err = helm_template("y", &["--set", set]).unwrap_err();
        assert!(err.contains(says), "{set}: {err}");
    }
    // The alerting rules, for the Prometheus Operator when asked: the file's, whole.
    let kinds = |docs: &[serde_yaml::Value]| -> Vec<String> {
        docs.iter()
            .filter_map(|d| d["kind"].as_str().map(String::from))
            .collect()
    };
    let plain = helm_template("y", &[]).unwrap();
    assert!(!kinds(&plain).contains(&"PrometheusRule".to_string()));
    let docs = helm_template(
        "y",
        &[
            "--set",
            "prometheusRule.enabled=true,prometheusRule.labels.release=kps",
        ],
    )
    .unwrap();
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .unwrap_or_else(|| panic!("no PrometheusRule in {:?}", kinds(&docs)));
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let file: serde_yaml::Value = serde_yaml::from_str(&chart_file("alerts.yaml")).unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    // The Grafana dashboard, for Grafana's sidecar: the file as it is, under its labels.
    assert!(!plain
        .iter()
        .any(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "y-dci-dashboard"));
    let docs = helm_template(
        "y",
        &[
            "--set",
            "grafanaDashboard.enabled=true,grafanaDashboard.annotations.grafana_folder=dci",
        ],
    )
    .unwrap();
    let board = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "y-dci-dashboard")
        .expect("the dashboard's ConfigMap");
    assert_eq!(board["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(board["metadata"]["annotations"]["grafana_folder"], "dci");
    let json: serde_json::Value =
        serde_json::from_str(board["data"]["dci.json"].as_str().unwrap()).unwrap();
    let file: serde_json::Value = serde_json::from_str(&chart_file("dashboard.json")).unwrap();
    assert_eq!(json, file);
    // As people write them: sizes with any unit the nodes take, durations, percentages.
    helm_template(
        "y",
        &[
            "--set",
            "relay.ringBytes=1.5GiB,edge.capacity=256Mi,edge.maxStaleness=1m 30s",
            "--set",
            "relay.maxUnavailable=50%,edge.maxUnavailable=2,coordinator.shards=4",
        ],
    )
    .unwrap();
}

/// Every key of every config file is also a flag, and a flag overrides the file.
#[test]
fn every_config_key_is_also_a_flag() {
    fn keys<T: serde::Serialize>(config: T) -> Vec<String> {
        match serde_yaml::to_value(config).unwrap() {
            serde_yaml::Value::Mapping(m) => {
                m.keys().map(|k| k.as_str().unwrap().to_string()).collect()
            }
            other => panic!("{other:?}"),
        }
    }
    for (role, keys) in [
        (
            "coordinator",
            keys(dci_coordinator::CoordinatorConfig::default()),
        ),
        ("relay", keys(dci_relay::RelayConfig::default())),
        ("edge", keys(dci_edge_cache::EdgeConfig::default())),
    ] {
        let help = stdout(&dci(&[role, "--help"]));
        for key in keys {
            let flags = match key.as_str() {
                "otlp" => vec!["--otlp-endpoint".to_string(), "--otlp-interval".into()],
                "tls" => [
                    "cert",
                    "key",
                    "ca",
                    "client-ca",
                    "allow-publish",
                    "allow-subscribe",
                    "allow-cache",
                    "allow-admin",
                ]
                .iter()
                .map(|f| format!("--tls-{f}"))
                .collect(),
                "upstream_groups" => vec!["--upstream-group".into()],
                k => vec![format!("--{}", k.replace('_', "-"))],
            };
            for flag in flags {
                assert!(
                    help.contains(&format!("{flag} ")),
                    "dci {role}: no {flag} for `{key}`"
                );
            }
        }
    }

    // The file says one thing, the flags another: the flags win.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.yaml");
    std::fs::write(
        &file,
        "relays: [http://127.0.0.1:1]\nprefixes: [\"item:\"]\ncompression: true\n",
    )
    .unwrap();
    let (_edge, port) = start(&[
        "edge",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--prefixes",
        "user:,session:",
        "--compression=false",
    ]);
    let url = format!("http://127.0.0.1:{port}");
    let o = dci(&["get", "--edge", &url, "item:1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("\"user:\", \"session:\""),
        "{}",
        stderr(&o)
    );
    let o = dci(&["get", "--edge", &url, "session:1"]);
    assert_eq!(o.status.code(), Some(1), "a miss: {}", stderr(&o));
}

/// The first line of `lines` (a node's log, from `launch`) that says `what`.
fn logged(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(20)).ok())
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("the node never logged {what:?}"))
}

/// Edges of a region come and go (DESIGN §9: no restart for membership changes): an edge takes
/// new relays and a new ring from its config file while it runs, when the file changes (as a
/// mounted ConfigMap does) or on SIGHUP, and keeps running on its config when the new one
/// cannot work.
#[test]
fn an_edge_reloads_its_relays_and_ring_from_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let relay = || start(&["relay", "--listen", "127.0.0.1:0", "--upstream", &coord]);
    let ((_r1, p1), (_r2, p2)) = (relay(), relay());
    let file = dir.path().join("edge.yaml");
    let write = |relay: u16, ring: &str, more: &str| {
        let yaml = format!(
            "listen: 127.0.0.1:0\nnode_id: e0\nrelays: [http://127.0.0.1:{relay}]\n\
             ring_nodes: [{ring}]\n{more}"
        );
        // As a ConfigMap is updated: the new file swapped in whole.
        let tmp = dir.path().join("edge.yaml.new");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(p1, "e0, e1", "");
    let mut cmd = Command::new(DCI);
    cmd.args(["edge", "--config"]).arg(&file);
    let (e, ep, lines) = launch(cmd);
    let edge = format!("http://127.0.0.1:{ep}");
    logged(
        &lines,
        &format!("following sender sender=http://127.0.0.1:{p1}"),
    );
    // A key the other edge of the ring owns is refused here.
    let theirs = (0..)
        .map(|i| format!("k:{i}"))
        .find(|k| dci(&["get", "--edge", &edge, k]).status.code() == Some(2))
        .unwrap();
    let refused = dci(&["get", "--edge", &edge, &theirs]);
    assert!(
        stderr(&refused).contains("not followed by this edge"),
        "{refused:?}"
    );

    // Alone on the ring, following the other relay: taken while it runs.
    write(p2, "e0", "capacity: 1000000\n");
    let line = logged(&lines, "config reloaded");
    assert!(
        line.contains("relays") && line.contains("ring_nodes"),
        "{line}"
    );
    let line = logged(&lines, "take effect only at a restart");
    assert!(line.contains("capacity"), "{line}");
    // Taken between two links, moments after it was read.
    let mut o = None;
    eventually("the key is served there: a miss now, not refused", || {
        let got = dci(&["get", "--edge", &edge, &theirs]);
        let miss = got.status.code() == Some(1);
        o = Some(got);
        miss
    });
    let o = o.unwrap();
    let lease = lease_in(&o);
    let set = dci(&[
        "set",
        "--edge",
        &edge,
        &theirs,
        "v",
        "--lease",
        &lease.to_string(),
    ]);
    assert!(set.status.success(), "{set:?}");
    let pubd = dci(&["publish", "--coordinator", &coord, &theirs]);
    assert!(pubd.status.success(), "{pubd:?}");
    eventually(
        "the invalidation reaches the edge through its new relay",
        || dci(&["get", "--edge", &edge, &theirs]).status.code() == Some(1),
    );

    // A config it cannot run with: said, and nothing changes.
    write(p1, "e1", "capacity: 1000000\n");
    let line = logged(&lines, "config not reloaded");
    assert!(line.contains("not one of ring_nodes"), "{line}");
    assert_eq!(
        dci(&["get", "--edge", &edge, &theirs]).status.code(),
        Some(1)
    );
    // SIGHUP reads it again whether or not it changed; the edge runs on.
    write(p2, "e0", "capacity: 1000000\n");
    std::thread::sleep(Duration::from_millis(100));
    e.signal("-HUP");
    logged(&lines, "config reloaded: nothing to change");
    assert_eq!(
        dci(&["get", "--edge", &edge, &theirs]).status.code(),
        Some(1)
    );

    // An edge without a config file only says so: SIGHUP does not stop it.
    let mut cmd = Command::new(DCI);
    cmd.args(["edge", "--listen", "127.0.0.1:0", "--relays"])
        .arg(format!("http://127.0.0.1:{p1}"));
    let (plain, pp, plain_lines) = launch(cmd);
    plain.signal("-HUP");
    logged(&plain_lines, "no --config file to reload");
    let o = dci(&["get", "--edge", &format!("http://127.0.0.1:{pp}"), "k"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
}

/// A relay takes a new upstream from its config file while it runs, as an edge does: `dci
/// status` shows it under its new sender, and a change it cannot take is said and ignored.
#[test]
fn a_relay_reloads_its_upstream_from_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let (_tier, tp) = start(&["relay", "--listen", "127.0.0.1:0", "--upstream", &coord]);
    let file = dir.path().join("relay.yaml");
    let write = |yaml: String| {
        let tmp = dir.path().join("relay.yaml.new");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(format!(
        "listen: 127.0.0.1:0\nnode_id: x\nupstream: [{coord}]\n"
    ));
    let mut cmd = Command::new(DCI);
    cmd.args(["relay", "--config"]).arg(&file);
    let (_x, _, lines) = launch(cmd);
    let parent_of_x = || {
        status_nodes(&coord, &[])
            .iter()
            .find(|n| n["node_id"] == "x")
            .map(|n| n["parent"].as_str().unwrap_or_default().to_string())
    };
    eventually("x under the coordinator", || {
        parent_of_x().as_deref() == Some(coord.as_str())
    });
    let tier = format!("http://127.0.0.1:{tp}");
    write(format!(
        "listen: 127.0.0.1:0\nnode_id: x\nupstream: [{tier}]\n"
    ));
    let line = logged(&lines, "config reloaded");
    assert!(line.contains("upstream"), "{line}");
    eventually("x under the other relay", || {
        parent_of_x().as_deref() == Some(tier.as_str())
    });
    write(format!(
        "listen: 127.0.0.1:0\nnode_id: x\nupstream: [{tier}]\nupstream_groups: [[{coord}]]\n"
    ));
    let line = logged(&lines, "config not reloaded");
    assert!(line.contains("only at a restart"), "{line}");
    assert_eq!(parent_of_x().as_deref(), Some(tier.as_str()));
}

/// `/readyz` says whether a node can vouch for what it serves (caught up with its coordinator
/// recently enough: a relay within three `peer_timeout`s, an edge within its `max_staleness`), and
/// why not; `/healthz` (restart me?) stays 200 all along. The coordinator SIGKILLed: both turn
/// 503 naming the shard; restarted on the same log and port: both ready again.
#[test]
fn readiness_follows_the_way_to_the_coordinator_and_health_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, cp) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cp}");
    let mut cmd = Command::new(DCI);
    cmd.args([
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &coord,
        "--peer-timeout",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let (_r, rp, lines) = launch(cmd);
    let relay_metrics = metrics_port(&lines);
    let mut cmd = Command::new(DCI);
    cmd.args([
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        &format!("http://127.0.0.1:{rp}"),
        "--max-staleness",
        "1s",
        "--peer-timeout",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let (_e, ep, edge_log) = launch(cmd);
    let edge_metrics = metrics_port(&edge_log);
    let get = || dci(&["get", "--edge", &format!("http://127.0.0.1:{ep}"), "user:1"]);
    for (name, port) in [("relay", relay_metrics), ("edge", edge_metrics)] {
        eventually(&format!("the {name} ready"), || {
            http_get(port, "/readyz") == (200, "ready\n".into())
        });
    }

    c.0.kill().unwrap();
    c.0.wait().unwrap();
    for (name, port) in [("relay", relay_metrics), ("edge", edge_metrics)] {
        eventually(&format!("the {name} not ready"), || {
            http_get(port, "/readyz").0 == 503
        });
        let (_, why) = http_get(port, "/readyz");
        assert!(
            why.starts_with("not ready: not caught up with its coordinator")
                && why.contains("shard 0"),
            "{name}: {why}"
        );
        assert_eq!(http_get(port, "/healthz"), (200, "serving\n".into()));
    }
    // A read is told why it missed, whether the edge held the key or not.
    let o = get();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("miss (lease ")
            && stderr(&o).contains(
                "): the edge serves only misses for now: not caught up with its coordinator \
                 within 1s"
            )
            && stderr(&o).contains("shard 0"),
        "{}",
        stderr(&o)
    );
    lease_in(&o);
    // Meanwhile the edge leaves its relay, cut off, every `peer_timeout` (its one URL could be a
    // Service with other relays behind it), and says so once, not at each reconnection.
    std::thread::sleep(Duration::from_millis(3_500));
    let log: Vec<String> = edge_log.try_iter().collect();
    let left: Vec<&String> = log.iter().filter(|l| l.contains("moving on")).collect();
    assert_eq!(left.len(), 1, "{log:#?}");
    assert!(
        left[0].contains("WARN") && left[0].contains("cut off"),
        "{}",
        left[0]
    );
    let mut after = log.iter().skip_while(|l| !l.contains("moving on"));
    assert!(
        !after.any(|l| l.contains("link to sender lost") || l.contains("following sender")),
        "{log:#?}"
    );
    // It told when it turned to misses, and why.
    let misses = log
        .iter()
        .find(|l| l.contains("serving only misses"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    assert!(
        misses.contains("WARN") && misses.contains("shard 0"),
        "{misses}"
    );
    let relay_log: Vec<String> = lines.try_iter().collect();
    assert!(
        relay_log
            .iter()
            .filter(|l| l.contains("receiver connected"))
            .count()
            >= 3,
        "the edge reconnected: {relay_log:#?}"
    );

    let _c = start_cmd(coordinator_cmd(dir.path(), cp));
    for (name, port) in [("relay", relay_metrics), ("edge", edge_metrics)] {
        eventually(&format!("the {name} ready again"), || {
            http_get(port, "/readyz").0 == 200
        });
    }
    logged(&edge_log, "serving hits");
    let o = get();
    assert_eq!(stderr(&o), format!("miss (lease {})\n", lease_in(&o)));
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS")
}

/// A memory figure (`VmRSS`, `VmHWM`: the peak) of a running process, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib / 1024.0
}

/// `each(i)` for every `i` of `range`, eight calls at a time, on `rt`.
fn eight_at_a_time<F, Fut>(rt: &tokio::runtime::Runtime, range: std::ops::Range<u64>, each: F)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (each, range) = (each.clone(), range.clone());
                tokio::spawn(async move {
                    for i in (range.start + t..range.end).step_by(8) {
                        each(i).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
}

/// An edge's memory stays near its `capacity`, with small values too. Each value it stored
/// used to be a slice of its request's buffer (8 KiB or more), which it kept alive: 30,000 Sets
/// of 200 bytes into 8 MiB took ~130 MiB more; and it counted 64 bytes of bookkeeping per entry
/// where about 200 are taken (11 MiB).
#[test]
fn an_edge_holds_about_its_capacity_in_memory_with_small_values() {
    let mut cmd = Command::new(DCI);
    cmd.args([
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--relays",
        "http://127.0.0.1:1",
        "--capacity",
        "8388608",
    ]);
    let (edge, port, _lines) = launch(cmd);
    let pid = edge.0.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let cache = dci_sdk::CacheClient::from_urls(vec![format!("http://127.0.0.1:{port}")]).unwrap();
    let set = |from: u64, to: u64| {
        let cache = cache.clone();
        eight_at_a_time(&rt, from..to, move |i| {
            let cache = cache.clone();
            async move {
                let value = bytes::Bytes::from(vec![b'v'; 200]);
                let key = format!("user:{i:06}:profile");
                assert!(cache.set(key, value, None).await.unwrap());
            }
        })
    };
    // What the process holds with a few values, before the store fills.
    set(0, 1_000);
    let base = rss_mib(pid);
    set(1_000, 30_000);
    let grew = rss_mib(pid) - base;
    assert!(
        grew < 16.0,
        "an edge of 8 MiB capacity grew by {grew:.1} MiB over 29,000 values of 200 bytes"
    );
}

/// A coordinator's memory stays near what its tail of recent batches counts when every request
/// carries one key. Each entry it kept was a slice of its request's buffer (8 KiB or more),
/// keeping all of it alive: 30,000 such publishes took ~140 MiB more, not ~20.
#[test]
fn a_coordinator_holds_about_its_tail_in_memory_with_one_key_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = coordinator_cmd(dir.path(), 0);
    cmd.args(["--fsync", "never"]);
    let (coordinator, port, _lines) = launch(cmd);
    let pid = coordinator.0.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = rt.block_on(async {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let publish = |from: u64, to: u64| {
        let channel = channel.clone();
        eight_at_a_time(&rt, from..to, move |i| {
            let mut client = dci_proto::pb::publisher_client::PublisherClient::new(channel.clone());
            async move {
                let entry = dci_proto::pb::Invalidation {
                    key: format!("user:{i:06}:profile").into(),
                    kind: dci_proto::pb::Kind::Key as i32,
                    ..Default::default()
                };
                client
                    .publish(dci_proto::pb::PublishRequest {
                        entries: vec![entry],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
    };
    publish(0, 1_000);
    let base = rss_mib(pid);
    publish(1_000, 30_000);
    let grew = rss_mib(pid) - base;
    assert!(
        grew < 48.0,
        "a coordinator grew by {grew:.1} MiB over 29,000 publishes of one key"
    );
}

/// Sizes are said as `--help` prints their defaults ("64 MiB"), in flags and config files alike:
/// only plain byte counts were taken, and `--capacity 64MiB` was an error.
#[test]
fn sizes_take_units_in_flags_and_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = coordinator_cmd(&log, 0);
    cmd.args(["--segment-bytes", "64KiB", "--memory-tail-bytes", "64 KiB"]);
    let (_coord, cport) = start_cmd(cmd);
    let coord = format!("http://127.0.0.1:{cport}");
    // A group is written whole into one segment: three publishes, three groups.
    for round in 0..3 {
        let keys: String = (0..1000)
            .map(|i| format!("user:{round}{i:05}:profile\n"))
            .collect();
        let o = dci_fed(&["publish", "--coordinator", &coord, "-"], keys.as_bytes());
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let segments = std::fs::read_dir(&log)
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "seg")
        })
        .count();
    assert!(
        segments >= 2,
        "{segments} segment(s) of 64 KiB for 3,000 keys"
    );

    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, "capacity: 2 MiB\nmax_value_len: 1.5MiB\n").unwrap();
    let mut cmd = Command::new(DCI);
    cmd.args(["edge", "--config"]).arg(&file);
    cmd.args(["--listen", "127.0.0.1:0", "--relays", &coord]);
    let (_edge, eport) = start_cmd(cmd);
    let edge = format!("http://127.0.0.1:{eport}");
    fill_bytes(&edge, "big", &vec![b'v'; 1_500_000]);
    let o = dci(&["get", "--edge", &edge, "big"]);
    assert_eq!(o.stdout.len(), 1_500_001, "{}", stderr(&o));
    let o = dci_fed(
        &["set", "--edge", &edge, "bigger", "-"],
        &vec![b'v'; 1_600_000],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("1572864"), "{}", stderr(&o));

    for (args, names) in [
        (vec!["edge", "--capacity", "64parsecs"], "--capacity"),
        (
            vec!["coordinator", "--segment-bytes", "1.5"],
            "--segment-bytes",
        ),
        (
            vec!["relay", "--ring-bytes", "99999999999999GiB"],
            "64 bits",
        ),
    ] {
        one_line_error(&dci(&args), names);
    }
    std::fs::write(&file, "capacity: 64 parsecs\n").unwrap();
    let o = Command::new(DCI)
        .args(["edge", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    one_line_error(&o, "capacity: \"64 parsecs\" is not a size in bytes");
}

/// The defaults `--help` prints are the ones a node runs with: flags are options over a config
/// file, so each default is written out by hand in its help, and must follow the config's.
#[test]
fn the_defaults_help_prints_are_the_configs() {
    fn check<C: serde::de::DeserializeOwned + serde::Serialize + Default>(command: &str) {
        let help = stdout(&dci(&[command, "--help"]));
        let defaults = serde_yaml::to_value(C::default()).unwrap();
        let mut flag = String::new();
        let mut checked = 0;
        for line in help.lines() {
            if let Some(rest) = line.trim_start().strip_prefix("--") {
                flag = rest.split([' ', '=']).next().unwrap().to_string();
                continue;
            }
            let Some((_, said)) = line.split_once("[default: ") else {
                continue;
            };
            // "0, no limit": the value, then what it means.
            let said = said.split([']', ',']).next().unwrap().trim();
            let key = flag.replace('-', "_");
            let (yaml, path): (String, Vec<&str>) = match key.strip_prefix("otlp_") {
                Some(sub) => (format!("otlp: {{ {sub}: {said} }}"), vec!["otlp", sub]),
                None => (format!("{key}: {said}"), vec![key.as_str()]),
            };
            let parsed: C = serde_yaml::from_str(&yaml)
                .unwrap_or_else(|e| panic!("{command} --{flag}: [default: {said}]: {e}"));
            let parsed = serde_yaml::to_value(parsed).unwrap();
            let (mut got, mut want) = (&parsed, &defaults);
            for p in &path {
                (got, want) = (&got[p], &want[p]);
            }
            assert_eq!(got, want, "{command} --{flag} says [default: {said}]");
            checked += 1;
        }
        assert!(checked >= 5, "{command}: {checked} defaults in:\n{help}");
    }
    check::<dci_coordinator::CoordinatorConfig>("coordinator");
    check::<dci_relay::RelayConfig>("relay");
    check::<dci_edge_cache::EdgeConfig>("edge");
}

/// `dci status` lines its columns up whatever the names: a default name carries the region and
/// the host, past the 28 characters the node column had.
#[test]
fn status_columns_line_up_with_long_names() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, cport) = start_coordinator(dir.path());
    let coord = format!("http://127.0.0.1:{cport}");
    let region = "eu-west-1-frankfurt-am-main";
    let (_edge, _) = start_edge_on(&coord, region);
    eventually("the edge in the tree", || {
        stdout(&dci(&["status", "--coordinator", &coord])).contains(region)
    });
    let status = stdout(&dci(&["status", "--coordinator", &coord]));
    let rows: Vec<&str> = status.lines().collect();
    let at = |line: &str, word: &str| line.find(word).unwrap_or_else(|| panic!("{status}"));
    let role = at(rows[0], "role");
    let shard = at(rows[0], "shard") + "shard".len();
    for row in &rows[1..] {
        let word = if row.starts_with("coordinator") {
            "coordinator"
        } else {
            "edge"
        };
        // The role column starts where its heading does; the shard column ends where its does.
        assert_eq!(row[role..].split(' ').next(), Some(word), "{status}");
        assert_eq!(&row[shard - 1..shard], "0", "{status}");
    }
}
