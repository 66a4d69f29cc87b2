//! Helpers for Coral's end-to-end tests: the real `coral` binary, the real model, the test
//! servers, and a fine-tune made on the spot.
//!
//! The tests in `tests/tests/` drive the built `coral` command the way a user does. Run them with
//! `cargo xtask test`, which installs what they need, starts the S3-compatible server on
//! loopback and sets the environment (see [`testenv`]); under a plain `cargo test` the tests
//! that need a resource say why they skip.
//!
//! ```
//! use coral_tests::{coral, run_ok, workspace_root};
//!
//! let root = workspace_root();
//! assert!(root.join("Cargo.toml").exists());
//! // Any test can run the real binary (built on first use unless CORAL_BIN names it):
//! let out = run_ok(coral().arg("--version"));
//! assert!(String::from_utf8_lossy(&out.stdout).contains("coral"));
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Where the test environment is (the real model, the venv's Python, the S3 endpoint).
pub use coral_store_api::testenv;

/// The fine-tune the demo makes: one float tensor in ten slightly changed, the rest identical.
/// (The same source file as xtask's, so tests and demo make the same bytes.)
#[path = "../../xtask/src/finetune.rs"]
pub mod finetune;

/// The workspace root (the folder of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The `coral` binary to test.
///
/// `CORAL_BIN` when set (`cargo xtask test` sets it to the binary it built with every feature);
/// otherwise the binary is built once per test process with `cargo build -p coral-cli`, in the
/// current target dir, so a plain `cargo test` never runs a stale one.
pub fn coral_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match locate_coral_bin() {
        Ok(p) => p,
        Err(e) => panic!("cannot find the coral binary: {e:#}"),
    })
    .clone()
}

fn locate_coral_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CORAL_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("CORAL_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "-p",
            "coral-cli",
            "--bin",
            "coral",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} build -p coral-cli", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!("`cargo build -p coral-cli` failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = None;
    for line in text.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "coral" {
            if let Some(exe) = msg["executable"].as_str() {
                found = Some(PathBuf::from(exe));
            }
        }
    }
    found.context("cargo built no `coral` executable")
}

/// A `coral` command with a clean environment for stores: no `CORAL_STORE` inherited from the
/// caller, no colours. Add `--store` and the subcommand.
pub fn coral() -> Command {
    let mut cmd = Command::new(coral_bin());
    cmd.env_remove("CORAL_STORE")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

fn describe(cmd: &Command, out: &Output) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "`{} {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        cmd.get_program().to_string_lossy(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command and returns its output; panics, showing both streams, unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(out.status.success(), "{}", describe(cmd, &out));
    out
}

/// Runs a command that must fail: panics if it succeeded or was killed by a signal (a crash is
/// not a clean failure). Returns its output.
pub fn run_fail(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        describe(cmd, &out)
    );
    assert!(
        out.status.code().is_some(),
        "expected an exit code, not a signal: {}",
        describe(cmd, &out)
    );
    out
}

/// A command's standard output as text.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's standard output parsed as JSON (for `--json`).
pub fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).context("read past the buffer")?);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Whether two files hold the same bytes.
pub fn files_identical(a: &Path, b: &Path) -> Result<bool> {
    let x = std::fs::read(a).with_context(|| format!("reading {}", a.display()))?;
    let y = std::fs::read(b).with_context(|| format!("reading {}", b.display()))?;
    Ok(x == y)
}

/// A name no other test in this run uses (S3 bucket names: lowercase letters, digits, dashes).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Sets the credentials and endpoint of the S3 test server on a `coral` command (dummy keys:
/// the test server takes any).
pub fn with_s3_env<'a>(cmd: &'a mut Command, endpoint: &str) -> &'a mut Command {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "coral-test")
        .env("AWS_SECRET_ACCESS_KEY", "coral-test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// Sets the endpoint, key and region of `engine` on a `coral` command.
pub fn with_engine_env<'a>(cmd: &'a mut Command, engine: &testenv::S3Engine) -> &'a mut Command {
    cmd.env("AWS_ENDPOINT_URL", &engine.endpoint)
        .env("AWS_ACCESS_KEY_ID", &engine.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &engine.secret_key)
        .env("AWS_REGION", &engine.region)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// Creates a bucket on `engine`: moto takes an unsigned `PUT` ([`create_bucket`]); Garage gets
/// a signed one from boto3 (the venv's Python).
pub fn create_bucket_on(engine: &testenv::S3Engine, bucket: &str) -> Result<()> {
    if engine.name == "moto" {
        return create_bucket(&engine.endpoint, bucket);
    }
    let python = testenv::python().context("no Python in the test environment")?;
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url={ep:?}, aws_access_key_id={k:?}, aws_secret_access_key={s:?}, region_name={r:?})\ns3.create_bucket(Bucket={bucket:?}, CreateBucketConfiguration={{'LocationConstraint': {r:?}}})\n",
        ep = engine.endpoint,
        k = engine.access_key,
        s = engine.secret_key,
        r = engine.region,
    );
    let out = Command::new(python)
        .args(["-c", &script])
        .output()
        .context("running boto3")?;
    if !out.status.success() {
        bail!(
            "creating bucket {bucket} on {}: {}",
            engine.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates a bucket on the S3 test server (an unsigned `PUT /bucket`, which the loopback test
/// server accepts). Only loopback endpoints are allowed: a test never reaches anything else.
pub fn create_bucket(endpoint: &str, bucket: &str) -> Result<()> {
    let hostport = endpoint
        .strip_prefix("http://")
        .context("the test endpoint must be http://")?
        .trim_end_matches('/');
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    if !(host == "localhost" || host == "[::1]" || host.starts_with("127.")) {
        bail!("refusing to create a bucket on {endpoint}: not a loopback address");
    }
    if bucket.is_empty()
        || !bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        bail!("{bucket:?} is not a valid bucket name");
    }
    let mut stream =
        TcpStream::connect(hostport).with_context(|| format!("connecting to {endpoint}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending to {endpoint}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading from {endpoint}"))?;
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        bail!("creating bucket {bucket} on {endpoint}: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_unique_and_valid_buckets() {
        let a = unique_name("coral-e2e");
        let b = unique_name("coral-e2e");
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
        assert!(a.len() <= 63, "{a}");
    }

    #[test]
    fn create_bucket_refuses_anything_but_loopback() {
        assert!(create_bucket("http://10.0.0.1:9000", "b").is_err());
        assert!(create_bucket("http://example.invalid", "b").is_err());
        assert!(create_bucket("https://127.0.0.1:9000", "b").is_err());
        assert!(create_bucket("http://127.0.0.1:9", "Bad_Name").is_err());
    }

    #[test]
    fn create_bucket_on_the_test_server() {
        let Some(endpoint) = testenv::s3_endpoint() else {
            return;
        };
        let bucket = unique_name("coral-lib");
        create_bucket(&endpoint, &bucket).unwrap();
        // Creating it again is fine for the test server (it owns it already) or an error, but
        // never a hang; a listing shows it.
        let _ = create_bucket(&endpoint, &bucket);
        let hostport = endpoint.trim_start_matches("http://");
        let mut s = TcpStream::connect(hostport).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.contains(&bucket), "{body}");
    }

    #[test]
    fn sha256_and_identity_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, b"abc").unwrap();
        std::fs::write(&b, b"abc").unwrap();
        std::fs::write(&c, b"abd").unwrap();
        assert_eq!(
            sha256_file(&a).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(files_identical(&a, &b).unwrap());
        assert!(!files_identical(&a, &c).unwrap());
        assert!(files_identical(&a, &dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_real_model_makes_a_fine_tune_with_a_tenth_changed() {
        let Some(model) = testenv::model_path() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ft.safetensors");
        let report = finetune::make_finetune(&model, &out, finetune::DEFAULT_SEED).unwrap();
        assert!(report.tensors > 50, "{report:?}");
        assert_eq!(
            report.changed.len(),
            report.tensors.div_ceil(finetune::CHANGE_EVERY)
        );
        assert!(report.bytes_changed > 0 && report.bytes_changed < report.bytes_total);
        assert!(!files_identical(&model, &out).unwrap());
    }
}
