//! The second S3 engine of the tests: a Garage cluster of 3 nodes on 127.0.0.1, replication
//! factor 3, set up with Garage's own CLI.
//!
//! - The binary: `cargo install --locked garage@2.5.0 --no-default-features --features
//!   lmdb,sqlite,bundled-libs` into `target/garage` (about 20 minutes the first time on 2 cores;
//!   kept there afterwards). Garage is AGPL-licensed: it is a test server only, installed as a
//!   program, never a dependency of our crates (so `cargo deny` never sees it).
//! - Each node gets a folder `target/garage-run/nodeN` with its `garage.toml` (sqlite metadata,
//!   RPC, S3 API with region `garage` and an admin API, all on free loopback ports), its data,
//!   its log and a `pid` file. A test that kills and restarts a node writes the new pid there;
//!   [`Garage`]'s drop stops whatever the pid files name.
//! - Then: connect the nodes, assign each a zone and a capacity, apply the layout, import a fixed
//!   test key and allow it to create buckets.
//!
//! Nothing contacts anything but the crate registry (for the install) and loopback.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup::{self, Paths};

/// The Garage release the tests run against.
pub const VERSION: &str = "2.5.0";
/// The test key: Garage key ids are `GK` and 24 hex digits, secrets 64 hex digits.
pub const KEY_ID: &str = "GK0c0a1c0de5eed0123456789a";
/// The test key's secret.
pub const SECRET: &str = "c0a1c0de5eed0123456789abcdef0123456789abcdef0123456789abcdef0123";
/// The S3 region Garage signs with.
pub const REGION: &str = "garage";
/// The cluster's RPC secret (32 bytes, hex).
const RPC_SECRET: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
/// Nodes in the cluster (and the replication factor).
pub const NODES: usize = 3;

/// `target/garage/bin/garage`, installed when missing.
pub fn ensure_binary(paths: &Paths) -> Result<PathBuf> {
    let root = paths.target.join("garage");
    let bin = root.join("bin").join("garage");
    let stamp = root.join("version");
    if bin.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(VERSION) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing Garage {VERSION} (a test server; about 20 minutes the first time)"
    );
    setup::run(setup::cargo().args([
        "install",
        "--locked",
        &format!("garage@{VERSION}"),
        "--no-default-features",
        "--features",
        "lmdb,sqlite,bundled-libs",
        "--root",
        &root.to_string_lossy(),
    ]))?;
    fs::write(&stamp, VERSION).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin)
}

/// One node: its folder, config and ports.
#[derive(Debug, Clone)]
pub struct Node {
    /// `target/garage-run/nodeN`.
    pub dir: PathBuf,
    /// Its `garage.toml`.
    pub config: PathBuf,
    /// The S3 API port.
    pub s3_port: u16,
}

impl Node {
    /// `http://127.0.0.1:PORT` of its S3 API.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("garage.log")
    }
}

/// The running cluster; every node is stopped when it drops.
#[derive(Debug)]
pub struct Garage {
    /// The binary.
    pub bin: PathBuf,
    /// The nodes, in order.
    pub nodes: Vec<Node>,
    keep_logs: bool,
}

/// Starts node `node` in the background (its own process group, dying with xtask) and writes
/// its pid file.
pub fn start_node(bin: &Path, node: &Node) -> Result<()> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.log())
        .with_context(|| format!("opening {}", node.log().display()))?;
    let err = log.try_clone().context("cloning the log handle")?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&node.config)
        .arg("server")
        .env("RUST_LOG", "garage=warn")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    setup::as_test_server(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} -c {}", bin.display(), node.config.display()))?;
    fs::write(node.pid_file(), child.id().to_string())
        .with_context(|| format!("writing {}", node.pid_file().display()))?;
    // The child is not waited for here: Drop stops it by its pid file.
    std::mem::forget(child);
    Ok(())
}

fn config_text(dir: &Path, rpc: u16, s3: u16, admin: u16) -> String {
    format!(
        r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = {NODES}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{RPC_SECRET}"
bootstrap_peers = []

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
    )
}

fn garage_cli(bin: &Path, node: &Node) -> Command {
    let mut c = Command::new(bin);
    c.arg("-c").arg(&node.config).env("RUST_LOG", "garage=warn");
    c
}

/// Runs a Garage CLI command against `node` and returns its stdout; retries for `patience` while
/// the cluster comes up.
fn cli_ok(bin: &Path, node: &Node, args: &[&str], patience: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let out = garage_cli(bin, node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running garage {}", args.join(" ")))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if start.elapsed() > patience || setup::interrupted() {
            bail!(
                "garage {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Garage {
    /// Installs the binary when missing, makes a new cluster of [`NODES`] nodes under
    /// `target/garage-run` (whatever was there is removed), and sets it up.
    pub fn start(paths: &Paths) -> Result<Self> {
        let bin = ensure_binary(paths)?;
        let run = paths.target.join("garage-run");
        if run.exists() {
            fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
        }
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let dir = run.join(format!("node{i}"));
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let (rpc, s3, admin) = (
                setup::free_port()?,
                setup::free_port()?,
                setup::free_port()?,
            );
            let config = dir.join("garage.toml");
            fs::write(&config, config_text(&dir, rpc, s3, admin))
                .with_context(|| format!("writing {}", config.display()))?;
            nodes.push(Node {
                dir,
                config,
                s3_port: s3,
            });
        }
        let mut garage = Garage {
            bin,
            nodes,
            keep_logs: false,
        };
        for n in &garage.nodes {
            start_node(&garage.bin, n)?;
        }
        if let Err(e) = garage.set_up() {
            garage.keep_logs = true;
            return Err(e);
        }
        eprintln!(
            "xtask: Garage {VERSION} up: {NODES} nodes, S3 at {} (logs in {})",
            garage
                .nodes
                .iter()
                .map(Node::endpoint)
                .collect::<Vec<_>>()
                .join(", "),
            run.display()
        );
        Ok(garage)
    }

    fn set_up(&self) -> Result<()> {
        let patience = Duration::from_secs(60);
        let first = &self.nodes[0];
        // Every node's id, then all connected to the first.
        let mut ids = Vec::new();
        for n in &self.nodes {
            let id = cli_ok(&self.bin, n, &["node", "id", "-q"], patience)?;
            let id = id.trim().to_owned();
            if id.is_empty() {
                bail!("garage node id printed nothing for {}", n.config.display());
            }
            ids.push(id);
        }
        for id in ids.iter().skip(1) {
            cli_ok(&self.bin, first, &["node", "connect", id], patience)?;
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or(id);
            let zone = format!("z{}", i + 1);
            cli_ok(
                &self.bin,
                first,
                &["layout", "assign", "-z", &zone, "-c", "1G", short],
                patience,
            )?;
        }
        cli_ok(
            &self.bin,
            first,
            &["layout", "apply", "--version", "1"],
            patience,
        )?;
        cli_ok(
            &self.bin,
            first,
            &["key", "import", "--yes", "-n", "coral-test", KEY_ID, SECRET],
            patience,
        )?;
        cli_ok(
            &self.bin,
            first,
            &["key", "allow", "--create-bucket", KEY_ID],
            patience,
        )?;
        // Every node's S3 API answers.
        for n in &self.nodes {
            let start = Instant::now();
            while !setup::answers_http(n.s3_port) {
                if start.elapsed() > patience {
                    bail!("Garage's S3 API did not answer at {}", n.endpoint());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// The tests' environment for this cluster (see `coral_store_api::testenv`).
    pub fn env(&self) -> Vec<(String, String)> {
        let join =
            |f: &dyn Fn(&Node) -> String| self.nodes.iter().map(f).collect::<Vec<_>>().join(",");
        vec![
            (
                "CORAL_TEST_GARAGE_ENDPOINT".into(),
                self.nodes[0].endpoint(),
            ),
            (
                "CORAL_TEST_GARAGE_ENDPOINTS".into(),
                join(&|n| n.endpoint()),
            ),
            ("CORAL_TEST_GARAGE_KEY".into(), KEY_ID.into()),
            ("CORAL_TEST_GARAGE_SECRET".into(), SECRET.into()),
            ("CORAL_TEST_GARAGE_REGION".into(), REGION.into()),
            (
                "CORAL_TEST_GARAGE_BIN".into(),
                self.bin.display().to_string(),
            ),
            (
                "CORAL_TEST_GARAGE_NODES".into(),
                join(&|n| n.dir.display().to_string()),
            ),
        ]
    }

    /// Says where the nodes' logs are when the cluster stops (a failed run).
    pub fn keep_logs(&mut self) {
        self.keep_logs = true;
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in &self.nodes {
            let Some(pid) = fs::read_to_string(n.pid_file())
                .ok()
                .and_then(|p| p.trim().parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: kill(2) on a node we (or a test) started; its own process group.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let start = Instant::now();
            // SAFETY: kill(pid, 0) only probes.
            while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(5) {
                // Reap it when it is ours.
                // SAFETY: a non-blocking wait for that pid.
                unsafe {
                    libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
        if self.keep_logs {
            if let Some(n) = self.nodes.first() {
                eprintln!(
                    "xtask: Garage's logs are in {}",
                    n.dir.parent().unwrap_or(&n.dir).display()
                );
            }
        }
        eprintln!("xtask: Garage stopped");
    }
}
