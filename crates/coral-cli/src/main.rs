//! The `coral` command: models in, models out, byte for byte, between any two stores.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};
use coral_cli::duration::{format_duration, parse_duration};
use coral_cli::guard;
use coral_core::{ContentHash, ModelName};
use coral_models::{self as ops, AddOptions};
use coral_open::{self as store, Address, Mode, S3Options};
use coral_store_api::{Lease, LeaseKind, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Bytes of tensors handled at once by add, per worker thread.
const GROUP_BYTES_PER_WORKER: usize = 16 << 20;

/// Bytes of tensors export loads at once, per worker thread: small, so that the buffers of the
/// tensors written out come back (`coral_core::pool`) for the groups after them, and the
/// writer waits less for the first group. With 16 MiB, every byte of all-MiniLM-L6-v2's
/// export went to fresh memory.
const EXPORT_GROUP_BYTES_PER_WORKER: usize = 4 << 20;

/// Exit status of a failed command.
const EXIT_FAILURE: u8 = 1;
/// Exit status of a command line that does not parse (clap's).
const EXIT_USAGE: u8 = 2;
/// Exit status when standard output was closed before everything was written (128 + SIGPIPE,
/// as a shell reports a command that a closed pipe killed).
const EXIT_STDOUT_CLOSED: u8 = 141;

const AFTER_LONG_HELP: &str = "\
Exit status:
  0    success
  1    the command failed (one line on stderr: \"error: ...\")
  2    the command line does not parse (the line names what is wrong and the usage)
  130  interrupted by Ctrl-C (SIGINT); 128 + N after signal N (143 for SIGTERM): an add
       that is interrupted rolls back and stores nothing
  141  standard output was closed early (as by `coral ls | head -1`): the command stops
       at once and says nothing

With --json, results are one JSON document on stdout, and an error is one JSON object on
stderr (one line): {\"error\": \"the message\", \"causes\": [\"each layer of it\", ...],
\"exit_code\": 1}.

`coral show` takes a model name, a full content hash, or a prefix of at least 8 hex digits
of one (a model of that name comes first).";

#[derive(Debug, Parser)]
#[command(
    name = "coral",
    version,
    about = "Store neural-network weights by content, deduplicated and delta-coded",
    after_long_help = AFTER_LONG_HELP
)]
struct Cli {
    /// The store: a path (HDF5 file) or s3://bucket/prefix.
    #[arg(long, global = true, env = "CORAL_STORE", default_value = "coral.h5")]
    store: String,
    /// Endpoint of an S3-compatible service.
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// S3 access key id.
    #[arg(long, global = true, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    access_key: Option<String>,
    /// S3 secret access key.
    #[arg(
        long,
        global = true,
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    secret_key: Option<String>,
    /// S3 region.
    #[arg(long, global = true, env = "AWS_REGION")]
    region: Option<String>,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// The codec of new weights in a local store: zstd (default, the fastest), coral (the float
    /// codec, the most compact; h5py reads it through the coral-h5plugin plugin), gzip, lzf,
    /// none. Existing weights keep theirs.
    #[arg(long, global = true, env = "CORAL_COMPRESSION")]
    compression: Option<String>,
    /// Seconds to wait for another writer of a local store (and, when writing, for the
    /// readers a commit waits for), or on an S3 store for the leases in the way (a writer for
    /// `coral gc`'s, gc for the writers'), before giving up.
    #[arg(long, global = true, value_name = "SECS", default_value = "10", value_parser = wait_arg)]
    wait: std::time::Duration,
    /// Set on the child process that does the reading for the parent (see `coral_cli::guard`).
    #[arg(long = "guarded-child", global = true, hide = true)]
    guarded_child: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Store a model file (.safetensors, .npy, .npz) or a model folder under a name.
    Add {
        /// The model file, or a folder (its .safetensors files as tensors, every other file
        /// kept byte for byte).
        file: PathBuf,
        /// The model's name (default: the file or folder name without extension).
        #[arg(long)]
        name: Option<String>,
        /// A model in the store to delta-code changed tensors against, or `none` (default:
        /// the stored model whose tensors best match, chosen automatically).
        #[arg(long)]
        reference: Option<String>,
    },
    /// Write a model back to a file or folder (the same bytes as were added), or some of its
    /// tensors.
    Export {
        /// The model.
        model: String,
        /// Output file (.safetensors, .npy or .npz), or folder for a folder model.
        out: PathBuf,
        /// Only this tensor (repeatable; `FILE:NAME` in a folder model when a name is in
        /// several files): OUT is then a .safetensors file, or .npy for one tensor.
        #[arg(long = "tensor", value_name = "NAME")]
        tensors: Vec<String>,
        /// Replace OUT when it is a folder that is not empty.
        #[arg(long)]
        force: bool,
    },
    /// List models (or weights, or deltas).
    Ls {
        /// List weights instead.
        #[arg(long)]
        weights: bool,
        /// List deltas instead.
        #[arg(long)]
        deltas: bool,
    },
    /// Show a model, or a weight or delta by its hash (or a unique prefix of 8+ hex digits).
    Show {
        /// Model name, content hash, or a prefix of at least 8 hex digits of one.
        id: String,
    },
    /// The store's figures.
    Info,
    /// Compare two models tensor by tensor.
    Diff {
        /// First model.
        a: String,
        /// Second model.
        b: String,
    },
    /// Check every weight, delta and manifest; exit non-zero on any failure.
    Verify,
    /// Copy everything that still verifies into a new store OUT, and list what was lost.
    Repair {
        /// The new store (a path that does not exist yet or is empty, or an empty s3:// prefix).
        out: String,
    },
    /// Remove a model's manifest (its weights go with `coral gc`).
    Rm {
        /// The model.
        model: String,
    },
    /// Remove weights and deltas no model needs (on S3: under an exclusive lease, sparing what
    /// is younger than the grace period, and aborting abandoned multipart uploads).
    Gc {
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// On an S3 store, keep weights and deltas committed less than DURATION ago, and leave
        /// unfinished uploads younger than that alone: 0, 90s, 30m, 6h, 2d. Does not apply to
        /// an HDF5 store, which has one writer at a time (under its lock).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = grace_arg)]
        grace: std::time::Duration,
        /// Never compact a local store afterwards (by default it is compacted once a quarter
        /// of the file is free space).
        #[arg(long)]
        no_compact: bool,
    },
    /// Rewrite the HDF5 store without the space of removed weights (after `coral gc`).
    Compact,
    /// Copy what DST lacks from SRC (weights, deltas, manifests).
    Sync {
        /// Source store.
        src: String,
        /// Destination store.
        dst: String,
        /// Only report what would be copied.
        #[arg(long)]
        dry_run: bool,
        /// Not for sync (its stores are SRC and DST): the global option, hidden here, so that
        /// giving it is refused with a clear line rather than ignored.
        #[arg(long = "store", id = "store", hide = true)]
        store: Option<String>,
    },
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let msg = msg.lines().next().unwrap_or("").to_owned();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        say(&format!("error: internal error: {msg}{at}"));
    }));
    let (cli, store_on_command_line) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => return usage_error(&e),
    };
    if let (Cmd::Sync { .. }, true) = (&cli.cmd, store_on_command_line) {
        let e = anyhow!(
            "--store does not apply to sync, which copies from SRC to DST: give the two stores \
             as `coral sync SRC DST`"
        );
        report(cli.json, &e, EXIT_USAGE);
        return ExitCode::from(EXIT_USAGE);
    }
    init_logging(&cli);
    if let Some(c) = &cli.compression {
        // coral-open reads the codec from the environment (so a relayed child has it too):
        // set before any thread starts.
        std::env::set_var("CORAL_COMPRESSION", c);
    }
    if !cli.guarded_child && uses_a_file_store(&cli) {
        if let Some(code) = relay(&cli) {
            return code;
        }
    }
    match run(&cli) {
        Ok(code) => code,
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(e) => {
            // After Ctrl-C or SIGTERM (an add stops and rolls back), 128 + the signal, as a
            // shell reports a command the signal killed.
            let code = match SIGNAL.load(Ordering::Relaxed) {
                0 => EXIT_FAILURE,
                sig => u8::try_from(128 + sig.clamp(0, 127)).unwrap_or(EXIT_FAILURE),
            };
            report(cli.json, &e, code);
            ExitCode::from(code)
        }
    }
}

/// Parses the command line; also says whether `--store` was given on it (rather than taken
/// from `$CORAL_STORE` or the default), which `sync` refuses.
fn parse_args() -> std::result::Result<(Cli, bool), clap::Error> {
    let matches = Cli::command().try_get_matches()?;
    let cli = Cli::from_arg_matches(&matches)?;
    let given = |m: &clap::ArgMatches| {
        m.try_get_raw("store").is_ok() && m.value_source("store") == Some(ValueSource::CommandLine)
    };
    let store_given = given(&matches) || matches.subcommand().is_some_and(|(_, m)| given(m));
    Ok((cli, store_given))
}

/// A command line that does not parse: help and version as clap prints them, any other error
/// as one line naming what is wrong (clap's first paragraph, with its tips) and the usage;
/// exit status 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed stdout (`coral --help | head -1`) is not an error.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        _ => {}
    }
    let (message, usage) = usage_error_parts(&e.render().to_string());
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if json {
        say(&json!({"error": message, "usage": usage, "exit_code": EXIT_USAGE}).to_string());
    } else {
        let mut line = format!("error: {message}");
        match &usage {
            Some(u) => {
                let command: Vec<&str> = u
                    .split_whitespace()
                    .take_while(|w| !w.starts_with(['[', '<', '-']))
                    .collect();
                line.push_str(&format!(" (usage: {u}; see {} --help)", command.join(" ")));
            }
            None => line.push_str(" (see coral --help)"),
        }
        say(&line);
    }
    ExitCode::from(EXIT_USAGE)
}

/// clap's rendered error as one message (its first paragraph, then its tips, each paragraph's
/// lines joined) and the usage line.
fn usage_error_parts(text: &str) -> (String, Option<String>) {
    let mut message = String::new();
    let mut usage = None;
    for para in text.split("\n\n") {
        let joined = para
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if joined.is_empty() || joined.starts_with("For more information") {
            continue;
        }
        if let Some(u) = joined.strip_prefix("Usage:") {
            usage = Some(u.trim().to_owned());
        } else if message.is_empty() {
            message = joined
                .strip_prefix("error:")
                .unwrap_or(&joined)
                .trim()
                .to_owned();
        } else {
            message.push_str(&format!("; {joined}"));
        }
    }
    if message.is_empty() {
        message = "bad arguments".to_owned();
    }
    (message, usage)
}

/// Standard output went away (a reader such as `head` stopped reading): the command ends at
/// once and quietly, with [`EXIT_STDOUT_CLOSED`].
#[derive(Debug)]
struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes one line to stdout; a closed stdout is [`StdoutClosed`], any other failure an error
/// (`println!` would panic on either).
fn emit(args: fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// `println!` that returns the failure to write (see [`emit`]) from the enclosing function.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))?
    };
}

/// One line on stderr; a stderr that cannot be written to is left alone (there is nowhere
/// else to say anything).
fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err
        .write_all(line.as_bytes())
        .and_then(|()| err.write_all(b"\n"));
}

/// Prints a failure: `error: ...` on one line, or with `--json` one JSON object (one line).
fn report(json: bool, e: &anyhow::Error, code: u8) {
    if json {
        let mut causes: Vec<String> = Vec::new();
        for c in e.chain() {
            let text = c.to_string().replace('\n', " ");
            if !causes.contains(&text) {
                causes.push(text);
            }
        }
        say(&json!({"error": one_line(e), "causes": causes, "exit_code": code}).to_string());
    } else {
        say(&format!("error: {}", one_line(e)));
    }
}

/// The error and its causes on one line, each cause once: library errors often show their
/// source in their own message already ("writing X: No space left on device"), and anyhow's
/// chain would repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let e: &(dyn std::error::Error + 'static) = e.as_ref();
    coral_core::one_line(e)
}

/// True for the commands on a local HDF5 store (any of a sync's two): they run in a child
/// process. Readers and writers alike: libhdf5 reads what a writer opens too, and a writer
/// that crashes leaves its journal, which the next open rolls back.
fn uses_a_file_store(cli: &Cli) -> bool {
    let file = |a: &str| matches!(Address::parse(a), Ok(Address::File(_)));
    match &cli.cmd {
        Cmd::Sync { src, dst, .. } => file(src) || file(dst),
        _ => file(&cli.store),
    }
}

/// Runs this command in a child process (a fork of this one, else this binary again with the
/// hidden flag) and relays how it ended; `None` in the forked child, which runs the command,
/// and when no child could be started (the command then runs here).
fn relay(cli: &Cli) -> Option<ExitCode> {
    let outcome = match guard::fork_child() {
        Ok(None) => return None,
        Ok(Some(outcome)) => outcome,
        Err(e) => {
            tracing::debug!(error = %e, "not forking; running the binary again");
            let exe = std::env::current_exe()
                .map_err(|e| tracing::debug!(error = %e, "running unguarded"))
                .ok()?;
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            guard::run_child(&exe, &args)
                .map_err(|e| tracing::debug!(error = %e, "running unguarded"))
                .ok()?
        }
    };
    if let Some(m) = outcome.message(&cli.store) {
        report(cli.json, &anyhow!(m), outcome.exit_status());
    }
    // A child that did not finish its export cleanly may have left its temporary file (it is
    // dead now, so only files of live exports remain).
    if let (Cmd::Export { out, .. }, false) = (&cli.cmd, outcome == guard::Outcome::Exited(0)) {
        ops::clean_stale_tmp(out);
    }
    Some(ExitCode::from(outcome.exit_status()))
}

fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn s3_options(cli: &Cli) -> S3Options {
    S3Options {
        endpoint_url: cli.endpoint_url.clone(),
        access_key: cli.access_key.clone(),
        secret_key: cli.secret_key.clone(),
        region: cli.region.clone(),
    }
}

fn open(cli: &Cli, addr: &str, mode: Mode) -> Result<Box<dyn Store>> {
    let addr = Address::parse(addr)?;
    Ok(store::open(&addr, &s3_options(cli), mode, cli.wait)?)
}

/// `--grace`'s value.
fn grace_arg(s: &str) -> std::result::Result<std::time::Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// `--wait`'s value: a number of seconds.
fn wait_arg(s: &str) -> std::result::Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Ok(std::time::Duration::from_secs_f64(secs.min(1e9)))
        }
        _ => Err(format!("--wait takes a number of seconds, got {s:?}")),
    }
}

/// Gives a lease back; one that cannot be given back goes stale (the work is done either way).
fn release(store: &dyn Store, lease: Lease) {
    if let Err(e) = store.release_lease(lease) {
        tracing::warn!("releasing a lease: {e} (it goes stale and is then ignored)");
    }
}

fn close(mut store: Box<dyn Store>) -> Result<()> {
    store.close().context("closing the store")
}

fn model_name(s: &str) -> Result<ModelName> {
    ModelName::new(s).map_err(|e| anyhow!(e))
}

/// The name of a model about to be stored: also not one that reads as a content hash.
fn new_model_name(s: &str) -> Result<ModelName> {
    ModelName::for_new_model(s).map_err(|e| anyhow!(e))
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

fn progress_bar(cli: &Cli, len: u64, bytes: bool) -> ProgressBar {
    if cli.json || cli.quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let tpl = if bytes {
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len}"
    };
    if let Ok(style) = ProgressStyle::with_template(tpl) {
        pb.set_style(style);
    }
    pb
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The signal that set [`INTERRUPTED`] (0: none): the exit status is then 128 + it.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_interrupt(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::Relaxed);
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// From now on, Ctrl-C (SIGINT) or SIGTERM sets a flag that long work checks, so it can stop
/// cleanly (an add rolls back) instead of dying half-way; the command then fails with
/// 128 + the signal (130 for Ctrl-C).
fn on_interrupt() -> &'static AtomicBool {
    // SAFETY: the handler only stores to atomics, which is async-signal-safe.
    let handler = note_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    &INTERRUPTED
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Add {
            file,
            name,
            reference,
        } => add(cli, file, name.as_deref(), reference.as_deref())?,
        Cmd::Export {
            model,
            out,
            tensors,
            force,
        } => export(cli, model, out, tensors, *force)?,
        Cmd::Ls { weights, deltas } => {
            let store = open(cli, &cli.store, Mode::Read)?;
            ls(cli, &*store, *weights, *deltas)?;
        }
        Cmd::Show { id } => {
            let store = open(cli, &cli.store, Mode::Read)?;
            show(cli, &*store, id)?;
        }
        Cmd::Info => info(cli)?,
        Cmd::Diff { a, b } => diff(cli, a, b)?,
        Cmd::Verify => verify(cli)?,
        Cmd::Repair { out } => repair(cli, out)?,
        Cmd::Rm { model } => rm(cli, model)?,
        Cmd::Gc {
            dry_run,
            no_compact,
            grace,
        } => gc(cli, *dry_run, *no_compact, *grace)?,
        Cmd::Compact => compact(cli)?,
        Cmd::Sync {
            src, dst, dry_run, ..
        } => sync(cli, src, dst, *dry_run)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn group_bytes() -> usize {
    GROUP_BYTES_PER_WORKER * workers()
}

/// A progress callback for bytes done over a list of files (path, size) in order: the bar
/// says which file it is in ("3/12 config.json").
fn file_progress<'a>(pb: &'a ProgressBar, files: Vec<(String, u64)>) -> impl Fn(u64) + Sync + 'a {
    let count = files.len();
    let mut ends = Vec::with_capacity(count);
    let mut end = 0u64;
    for (path, size) in files {
        end = end.saturating_add(size);
        ends.push((end, path));
    }
    move |n| {
        pb.inc(n);
        if count > 0 {
            let pos = pb.position();
            let i = ends.partition_point(|(e, _)| *e <= pos).min(count - 1);
            pb.set_message(format!("{}/{count} {}", i + 1, ends[i].1));
        }
    }
}

fn add(
    cli: &Cli,
    file: &std::path::Path,
    name: Option<&str>,
    reference: Option<&str>,
) -> Result<()> {
    let group_bytes = group_bytes();
    let cancel = on_interrupt();
    let name = match name {
        Some(n) => new_model_name(n)?,
        None => new_model_name(
            &ops::default_model_name(file)
                .ok_or_else(|| anyhow!("give the model a name with --name"))?,
        )
        .context("the file name is not a valid model name; give one with --name")?,
    };
    let reference = match reference {
        None => ops::Reference::Auto,
        Some("none") => ops::Reference::None,
        Some(r) => ops::Reference::Model(model_name(r)?),
    };
    let src = ops::Source::open(file)?;
    let store = open(cli, &cli.store, Mode::Write)?;
    let source = ops::SourceRef::from(&src);
    let pb = progress_bar(cli, source.progress_total(), true);
    let files = match &src {
        ops::Source::Folder(f) => f
            .entries()
            .iter()
            .filter(|e| e.size > 0)
            .map(|e| (e.path.clone(), e.size))
            .collect(),
        ops::Source::File(_) => Vec::new(),
    };
    let opts = AddOptions {
        name,
        reference,
        group_bytes,
        cancel: Some(cancel),
        wait: cli.wait,
    };
    let r = ops::add(&*store, source, &opts, &file_progress(&pb, files));
    pb.finish_and_clear();
    let r = r?;
    close(store)?;
    if cli.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        let what = if r.files.is_empty() {
            format!("{}, {}", r.format, count(r.tensors, "tensor"))
        } else {
            format!(
                "folder, {}, {}",
                count(r.files.iter().filter(|f| f.kind != "dir").count(), "file"),
                count(r.tensors, "tensor")
            )
        };
        out!(
            "added {} ({what}): {} new, {} reused, {} delta-coded; {} in, {} stored",
            r.name,
            r.new,
            r.reused,
            r.delta_coded,
            human_bytes(r.bytes_in),
            human_bytes(r.bytes_stored)
        );
        if let Some(reference) = &r.reference {
            if r.delta_coded > 0 || r.reference_auto {
                out!(
                    "delta-coded against {reference}{}",
                    if r.reference_auto {
                        ", chosen automatically (--reference none to turn off)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}

fn export(
    cli: &Cli,
    model: &str,
    out: &std::path::Path,
    tensors: &[String],
    force: bool,
) -> Result<()> {
    let name = model_name(model)?;
    let store = open(cli, &cli.store, Mode::Read)?;
    let m = store.get_manifest(&name)?;
    let (total, files) = match &m {
        Some(m) if tensors.is_empty() => (
            m.file_size,
            m.files
                .iter()
                .filter(|f| f.size() > 0)
                .map(|f| (f.path.clone(), f.size()))
                .collect(),
        ),
        Some(m) => (
            m.tensors
                .iter()
                .filter(|t| tensors.contains(&t.name))
                .map(|t| t.nbytes().unwrap_or(0))
                .sum(),
            Vec::new(),
        ),
        None => (0, Vec::new()),
    };
    let pb = progress_bar(cli, total, true);
    let mut opts = ops::ExportOptions::new(EXPORT_GROUP_BYTES_PER_WORKER * workers());
    opts.force = force;
    opts.tensors = tensors.to_vec();
    let n = ops::export_with(&*store, &name, out, &opts, &file_progress(&pb, files));
    pb.finish_and_clear();
    let n = n?;
    if cli.json {
        // A folder: what each entry is, and its size.
        let files: Vec<serde_json::Value> = match &m {
            Some(m) if tensors.is_empty() => m
                .files
                .iter()
                .map(|f| json!({"path": f.path, "kind": f.kind(), "bytes": f.size()}))
                .collect(),
            _ => Vec::new(),
        };
        print_json(&json!({
            "model": name, "out": out, "bytes": n, "tensors": tensors, "files": files
        }))?;
    } else if tensors.is_empty() {
        out!("exported {name} to {} ({})", out.display(), human_bytes(n));
    } else {
        out!(
            "exported {} of {name} to {} ({})",
            count(tensors.len(), "tensor"),
            out.display(),
            human_bytes(n)
        );
    }
    Ok(())
}

fn info(cli: &Cli) -> Result<()> {
    let store = open(cli, &cli.store, Mode::Read)?;
    let info = store.storage_info()?;
    let models = store.list_manifests()?.len();
    if cli.json {
        let mut v = serde_json::to_value(&info)?;
        v["models"] = json!(models);
        print_json(&v)?;
    } else {
        out!("store        {} ({})", info.location, info.backend);
        if info.reclaimable_bytes > 0 {
            out!(
            "size         {} ({} live, {} free for later writes: `coral compact` gives it back)",
            human_bytes(info.file_size),
            human_bytes(info.file_size.saturating_sub(info.reclaimable_bytes)),
            human_bytes(info.reclaimable_bytes)
        );
        } else {
            out!("size         {}", human_bytes(info.file_size));
        }
        out!("models       {models}");
        out!(
            "weights      {} ({} raw, {} stored, {:.1}% saved, {})",
            info.total_weights,
            human_bytes(info.total_bytes),
            human_bytes(info.compressed_bytes),
            info.compression_ratio * 100.0,
            info.compression
        );
        out!(
            "deltas       {} ({} stored for {} of weights)",
            info.deltas.total_deltas,
            human_bytes(info.deltas.total_delta_bytes),
            human_bytes(info.deltas.total_original_bytes)
        );
    }
    Ok(())
}

fn diff(cli: &Cli, a: &str, b: &str) -> Result<()> {
    let store = open(cli, &cli.store, Mode::Read)?;
    let r = ops::diff(&*store, &model_name(a)?, &model_name(b)?)?;
    if cli.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        out!(
            "{} equal, {} changed, {} added, {} removed",
            r.equal.len(),
            r.changed.len(),
            r.added.len(),
            r.removed.len()
        );
        for c in &r.changed {
            match (c.relative_change, &c.note) {
                (Some(x), _) => out!("changed  {}  {x:.3e}", c.name),
                (None, Some(n)) => out!("changed  {}  ({n})", c.name),
                (None, None) => out!("changed  {}", c.name),
            }
        }
        for n in &r.added {
            out!("added    {n}");
        }
        for n in &r.removed {
            out!("removed  {n}");
        }
        if let Some(f) = &r.files {
            out!(
                "files: {} equal, {} changed, {} added, {} removed",
                f.equal.len(),
                f.changed.len(),
                f.added.len(),
                f.removed.len()
            );
            for (what, list) in [
                ("changed ", &f.changed),
                ("added   ", &f.added),
                ("removed ", &f.removed),
            ] {
                for p in list {
                    out!("{what} file {p}");
                }
            }
        }
    }
    Ok(())
}

fn verify(cli: &Cli) -> Result<()> {
    let store = open(cli, &cli.store, Mode::Read)?;
    let total = store.list_weights()?.len() + store.list_manifests()?.len();
    let pb = progress_bar(cli, total as u64, false);
    let r = ops::verify(&*store, &|n| pb.inc(n));
    pb.finish_and_clear();
    let r = r?;
    if cli.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        for f in &r.failures {
            out!("FAILED {} {}: {}", f.kind, f.id, f.error);
        }
        out!(
            "checked {}, {}, {}: {}",
            count(r.weights, "weight"),
            count(r.deltas, "delta"),
            count(r.manifests, "manifest"),
            if r.failures.is_empty() {
                "all ok".to_owned()
            } else {
                format!("{} failed", r.failures.len())
            }
        );
    }
    if !r.failures.is_empty() {
        bail!("{} failed verification", count(r.failures.len(), "item"));
    }
    Ok(())
}

fn rm(cli: &Cli, model: &str) -> Result<()> {
    let name = model_name(model)?;
    let store = open(cli, &cli.store, Mode::Write)?;
    if !store.delete_manifest(&name)? {
        bail!("model {name} is not in the store");
    }
    close(store)?;
    if cli.json {
        print_json(&json!({"removed": name}))?;
    } else {
        out!("removed {name} (run `coral gc` to free its weights)");
    }
    Ok(())
}

fn gc(cli: &Cli, dry_run: bool, no_compact: bool, grace: std::time::Duration) -> Result<()> {
    let store = open(
        cli,
        &cli.store,
        if dry_run { Mode::Read } else { Mode::Write },
    )?;
    let opts = ops::GcOptions {
        dry_run,
        grace,
        wait: cli.wait,
    };
    let r = ops::gc_with(&*store, &opts)?;
    close(store)?;
    // Free space is reused by later writes; once it is a quarter of the file, the
    // file is rewritten without it (`coral compact`), unless told not to.
    let compacted = if !r.dry_run && !no_compact && ops::worth_compacting(&r) {
        Some(store::compact(&Address::parse(&cli.store)?, cli.wait)?)
    } else {
        None
    };
    if cli.json {
        let mut v = serde_json::to_value(&r)?;
        v["compacted"] = serde_json::to_value(&compacted)?;
        print_json(&v)?;
    } else {
        let mut line = format!(
            "{} {} and {} ({}",
            if r.dry_run { "would remove" } else { "removed" },
            count(r.weights.len(), "weight"),
            count(r.deltas.len(), "delta"),
            human_bytes(r.bytes),
        );
        if r.weight_bytes > 0 && r.delta_bytes > 0 {
            line.push_str(&format!(
                ": {} of weights, {} of deltas",
                human_bytes(r.weight_bytes),
                human_bytes(r.delta_bytes)
            ));
        }
        line.push_str(if r.dry_run { ", estimated)" } else { ")" });
        if let Some(g) = r.grace_secs {
            line.push_str(&format!(
                "; kept {} younger than the grace period ({})",
                r.kept,
                format_duration(std::time::Duration::from_secs(g))
            ));
        }
        if r.uploads_aborted > 0 {
            line.push_str(&format!(
                "; {} {}",
                if r.dry_run { "would abort" } else { "aborted" },
                count(r.uploads_aborted, "abandoned multipart upload")
            ));
        }
        if r.leftovers_removed > 0 {
            line.push_str(&format!(
                "; {} {} of unfinished writes",
                if r.dry_run { "would remove" } else { "removed" },
                count(r.leftovers_removed, "leftover")
            ));
        }
        out!("{line}");
        match &compacted {
            Some(c) => out!(
                "compacted {}: {} -> {} ({} reclaimed) in {:.2} s",
                c.store,
                human_bytes(c.bytes_before),
                human_bytes(c.bytes_after),
                human_bytes(c.reclaimed),
                c.seconds
            ),
            None if r.reclaimable_bytes > 0 => out!(
                "{} of the {} file is free for later writes; `coral compact` gives it back",
                human_bytes(r.reclaimable_bytes),
                human_bytes(r.store_bytes)
            ),
            None => {}
        }
    }
    Ok(())
}

fn compact(cli: &Cli) -> Result<()> {
    let r = store::compact(&Address::parse(&cli.store)?, cli.wait)?;
    if cli.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        out!(
            "compacted {}: {} -> {} ({} reclaimed) in {:.2} s",
            r.store,
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
            human_bytes(r.reclaimed),
            r.seconds
        );
    }
    Ok(())
}

/// Lists models (or weights, or deltas). An entry that does not read (a damaged store) is listed
/// with its error, the others as usual, and the command then fails with one line.
fn ls(cli: &Cli, store: &dyn Store, weights: bool, deltas: bool) -> Result<()> {
    let mut out = serde_json::Map::new();
    let mut damaged = 0usize;
    let mut failed = |field: &str, id: String, e: anyhow::Error| {
        damaged += 1;
        json!({ field: id, "error": format!("{e:#}") })
    };
    if weights {
        let delta_keys: std::collections::HashSet<ContentHash> =
            store.list_deltas()?.into_iter().collect();
        let mut rows = Vec::new();
        for k in store.list_weights()? {
            if delta_keys.contains(&k) {
                continue;
            }
            rows.push(match store.get_metadata(&k) {
                Ok(m) => json!({
                    "key": k.to_hex(),
                    "name": m.as_ref().map(|m| m.name.clone()),
                    "dtype": m.as_ref().map(|m| m.dtype.name()),
                    "shape": m.as_ref().map(|m| m.shape.clone()),
                }),
                Err(e) => failed("key", k.to_hex(), e.into()),
            });
        }
        out.insert("weights".into(), json!(rows));
    }
    if deltas {
        let mut rows = Vec::new();
        for k in store.list_deltas()? {
            match store.load_delta(&k) {
                Ok(Some(d)) => rows.push(json!({
                    "key": k.to_hex(),
                    "type": d.delta_type.name(),
                    "reference": d.reference_hash.to_hex(),
                    "bytes": d.nbytes(),
                    "dtype": d.original_dtype.name(),
                    "shape": d.original_shape,
                })),
                Ok(None) => {}
                Err(e) => rows.push(failed("key", k.to_hex(), e.into())),
            }
        }
        out.insert("deltas".into(), json!(rows));
    }
    if !weights && !deltas {
        let mut rows = Vec::new();
        let names = store.list_manifests()?;
        let present: std::collections::HashSet<&ModelName> = names.iter().collect();
        for n in &names {
            match store.get_manifest(n) {
                Ok(Some(m)) => rows.push(json!({
                    "name": n,
                    "format": m.format,
                    "tensors": m.tensors.len(),
                    "files": files_of(&m),
                    "file_size": m.file_size,
                    "parent": m.parent,
                    // The reference model may have been removed since (its deltas' references
                    // are kept: the model still exports).
                    "parent_in_store": m.parent.as_ref().map(|p| present.contains(p)),
                })),
                Ok(None) => {}
                Err(e) => rows.push(failed("name", n.to_string(), e.into())),
            }
        }
        out.insert("models".into(), json!(rows));
    }
    let done = || -> Result<()> {
        if damaged > 0 {
            bail!("could not read {damaged} of the entries (listed with their errors)");
        }
        Ok(())
    };
    if cli.json {
        print_json(&serde_json::Value::Object(out))?;
        return done();
    }
    for (kind, rows) in &out {
        for r in rows.as_array().into_iter().flatten() {
            if let Some(e) = r["error"].as_str() {
                let id = r["name"].as_str().or(r["key"].as_str()).unwrap_or("");
                out!("{id}\tDAMAGED: {e}");
                continue;
            }
            let line = match kind.as_str() {
                "models" => format!(
                    "{}\t{}\t{}\t{}{}",
                    r["name"].as_str().unwrap_or(""),
                    r["format"].as_str().unwrap_or(""),
                    count(
                        usize::try_from(r["tensors"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX),
                        "tensor"
                    ) + &match r["files"].as_u64() {
                        Some(n) => format!(
                            ", {}",
                            count(usize::try_from(n).unwrap_or(usize::MAX), "file")
                        ),
                        None => String::new(),
                    },
                    human_bytes(r["file_size"].as_u64().unwrap_or(0)),
                    match (r["parent"].as_str(), r["parent_in_store"].as_bool()) {
                        (Some(p), Some(false)) => format!("\tfrom {p} (removed)"),
                        (Some(p), _) => format!("\tfrom {p}"),
                        (None, _) => String::new(),
                    }
                ),
                "weights" => format!(
                    "{}\t{}\t{}\t{}",
                    r["key"].as_str().unwrap_or(""),
                    r["dtype"].as_str().unwrap_or("?"),
                    r["shape"],
                    r["name"].as_str().unwrap_or("")
                ),
                _ => format!(
                    "{}\t{}\t{} B\tref {}",
                    r["key"].as_str().unwrap_or(""),
                    r["type"].as_str().unwrap_or(""),
                    r["bytes"],
                    r["reference"].as_str().unwrap_or("")
                ),
            };
            out!("{line}");
        }
    }
    done()
}

/// `coral show ID`: a full content hash names the weight or delta with that key when the store
/// has one; then a model of that name; then a prefix of at least [`ops::MIN_PREFIX_DIGITS`]
/// hex digits names the one weight or delta whose key starts with it, git-style.
fn show(cli: &Cli, store: &dyn Store, id: &str) -> Result<()> {
    let hex = id.to_ascii_lowercase();
    let is_hex = !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if let Ok(key) = ContentHash::parse(&hex) {
        if store.delta_exists(&key)? || store.exists(&key)? {
            return show_key(cli, store, &key);
        }
    }
    // (A model named by 64 hex digits, from before such names were refused, comes second.)
    if let Ok(name) = ModelName::new(id) {
        if let Some(m) = store.get_manifest(&name)? {
            return show_model(cli, store, &m);
        }
    }
    if !is_hex {
        bail!("{id:?} is neither a model in the store nor a content hash");
    }
    if hex.len() >= 64 {
        match ContentHash::parse(&hex) {
            Ok(key) => bail!("no weight or delta {key} in the store"),
            Err(_) => bail!("{id:?} is neither a model in the store nor a content hash"),
        }
    }
    if hex.len() < ops::MIN_PREFIX_DIGITS {
        bail!(
            "{id:?} is not a model in the store, and too short for a hash prefix: give at least \
             {} hex digits",
            ops::MIN_PREFIX_DIGITS
        );
    }
    match ops::keys_with_prefix(store, &hex)?.as_slice() {
        [] => bail!("no model, weight or delta matches {id:?}"),
        [key] => show_key(cli, store, key),
        many => bail!(
            "hash prefix {hex} is ambiguous: {} weights and deltas start with it (give more \
             digits)",
            many.len()
        ),
    }
}

/// How a model's tensors are stored, for people: "(104 weights)", "(93 weights, 11 deltas)";
/// "(4 distinct: ...)" when some tensors share a key.
fn stored_as(kinds: &std::collections::BTreeMap<&'static str, usize>, tensors: usize) -> String {
    let mut parts = Vec::new();
    for kind in ["weight", "delta", "missing"] {
        match kinds.get(kind) {
            Some(n) if kind == "missing" => parts.push(format!("{n} missing")),
            Some(n) => parts.push(count(*n, kind)),
            None => {}
        }
    }
    let distinct: usize = kinds.values().sum();
    match (parts.is_empty(), distinct == tensors) {
        (true, _) => String::new(),
        (false, true) => format!(" ({})", parts.join(", ")),
        (false, false) => format!(" ({distinct} distinct: {})", parts.join(", ")),
    }
}

fn show_model(cli: &Cli, store: &dyn Store, m: &coral_core::ModelManifest) -> Result<()> {
    let kinds = ops::key_kinds(store, m)?;
    let parent_in_store = match &m.parent {
        Some(p) => Some(store.get_manifest(p)?.is_some()),
        None => None,
    };
    if cli.json {
        let mut v = serde_json::to_value(m)?;
        v["stored_as"] = json!(kinds);
        v["parent_in_store"] = json!(parent_in_store);
        return print_json(&v);
    }
    out!("model    {}", m.name);
    out!("format   {}", m.format);
    out!("size     {}", human_bytes(m.file_size));
    out!(
        "tensors  {}{}",
        m.tensors.len(),
        stored_as(&kinds, m.tensors.len())
    );
    if let Some(p) = &m.parent {
        let removed = if parent_in_store == Some(false) {
            " (removed)"
        } else {
            ""
        };
        out!("parent   {p}{removed}");
    }
    if m.files.is_empty() {
        for t in &m.tensors {
            out!("  {}\t{}\t{:?}\t{}", t.name, t.dtype, t.shape, t.key);
        }
        return Ok(());
    }
    let chunks = m.blob_chunks().count();
    out!(
        "files    {} ({} in blobs)",
        files_of(m).unwrap_or(0),
        count(chunks, "chunk")
    );
    for f in &m.files {
        match &f.content {
            coral_core::FileContent::Dir => out!("  {}/", f.path),
            coral_core::FileContent::Symlink { target } => out!("  {} -> {target}", f.path),
            coral_core::FileContent::Blob { size, chunks, .. } => out!(
                "  {}\t{:o}\t{}\t{}",
                f.path,
                f.mode,
                human_bytes(*size),
                count(chunks.len(), "chunk")
            ),
            coral_core::FileContent::Safetensors { size, .. } => {
                let tensors = m.file_tensors(f);
                out!(
                    "  {}\t{:o}\t{}\t{}",
                    f.path,
                    f.mode,
                    human_bytes(*size),
                    count(tensors.len(), "tensor")
                );
                for t in tensors {
                    out!("    {}\t{}\t{:?}\t{}", t.name, t.dtype, t.shape, t.key);
                }
            }
        }
    }
    Ok(())
}

/// A folder model's files and links (not its directories); `None` for a model of one file.
fn files_of(m: &coral_core::ModelManifest) -> Option<usize> {
    (m.format == coral_core::ModelFormat::Folder).then(|| {
        m.files
            .iter()
            .filter(|f| !matches!(f.content, coral_core::FileContent::Dir))
            .count()
    })
}

/// `coral show` of a weight or delta.
fn show_key(cli: &Cli, store: &dyn Store, key: &ContentHash) -> Result<()> {
    let form = store.stored_form(key)?.unwrap_or_default();
    let stored = form.stored_bytes.map(human_bytes);
    if let Some(d) = store.load_delta(key)? {
        let v = json!({
            "key": key.to_hex(),
            "kind": "delta",
            "type": d.delta_type.name(),
            "reference": d.reference_hash.to_hex(),
            "bytes": d.nbytes(),
            "stored_bytes": form.stored_bytes,
            "dtype": d.original_dtype.name(),
            "shape": d.original_shape,
            "compression_ratio": d.compression_ratio,
            "metadata": d.metadata,
        });
        if cli.json {
            return print_json(&v);
        }
        out!(
            "delta {key}: {} {:?} {}, {} B against {}{}",
            d.original_dtype,
            d.original_shape,
            d.delta_type,
            d.nbytes(),
            d.reference_hash,
            stored.map(|s| format!("; {s} stored")).unwrap_or_default()
        );
        return Ok(());
    }
    let meta = store
        .get_metadata(key)?
        .ok_or_else(|| anyhow!("no weight or delta {key} in the store"))?;
    if cli.json {
        let mut v = serde_json::to_value(&meta)?;
        v["key"] = json!(key.to_hex());
        v["kind"] = json!("weight");
        v["codec"] = json!(form.codec);
        v["stored_bytes"] = json!(form.stored_bytes);
        return print_json(&v);
    }
    let raw = meta.checked_nbytes().unwrap_or(0) as u64;
    out!(
        "weight {key}: {} {} {:?}, {} raw{}{}",
        meta.name,
        meta.dtype,
        meta.shape,
        human_bytes(raw),
        match (&stored, form.stored_bytes) {
            (Some(s), Some(n)) if raw > 0 && n < raw => format!(
                ", {s} stored ({:.1}% saved)",
                100.0 * (1.0 - n as f64 / raw as f64)
            ),
            (Some(s), _) => format!(", {s} stored"),
            _ => String::new(),
        },
        form.codec.map(|c| format!(", {c}")).unwrap_or_default()
    );
    if !meta.compression_info.is_empty() {
        out!(
            "compression_info {}",
            serde_json::Value::Object(meta.compression_info.clone())
        );
    }
    Ok(())
}

/// `coral repair OUT`: everything of the store that verifies, copied into the new store OUT.
fn repair(cli: &Cli, out: &str) -> Result<()> {
    let out_addr = Address::parse(out)?;
    if let Address::File(p) = &out_addr {
        if let Address::File(src) = Address::parse(&cli.store)? {
            let same = match (std::fs::canonicalize(&src), std::fs::canonicalize(p)) {
                (Ok(a), Ok(b)) => a == b,
                _ => src == *p,
            };
            if same {
                bail!("coral repair writes a new store: {out} is the store itself");
            }
        }
        match std::fs::metadata(p) {
            Ok(m) if m.len() > 0 || !m.is_file() => {
                bail!("{out} exists: coral repair writes a new store (give a path that does not exist)")
            }
            _ => {}
        }
    }
    let src = open(cli, &cli.store, Mode::Read)?;
    let total = src.list_weights()?.len() + src.list_manifests()?.len();
    let dst = open(cli, out, Mode::Write)?;
    if !dst.list_weights()?.is_empty() || !dst.list_manifests()?.is_empty() {
        bail!("{out} is not empty: coral repair writes a new store");
    }
    let lease = dst.acquire_lease(LeaseKind::Shared, "repair", cli.wait)?;
    let pb = progress_bar(cli, total as u64, false);
    let r = ops::repair(&*src, &*dst, &|n| pb.inc(n));
    pb.finish_and_clear();
    release(&*dst, lease);
    let r = r.with_context(|| format!("repairing {} into {out}", cli.store))?;
    close(dst)?;
    if cli.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        for f in &r.lost {
            out!("LOST {} {}: {}", f.kind, f.id, f.error);
        }
        out!(
            "copied {}, {}, {} to {out}: {}",
            count(r.weights, "weight"),
            count(r.deltas, "delta"),
            count(r.manifests, "manifest"),
            if r.lost.is_empty() {
                "nothing lost".to_owned()
            } else {
                format!("{} lost", r.lost.len())
            }
        );
    }
    Ok(())
}

fn sync(cli: &Cli, src: &str, dst: &str, dry_run: bool) -> Result<()> {
    let s = open(cli, src, Mode::Read)?;
    let d = open(cli, dst, if dry_run { Mode::Read } else { Mode::Write })?;
    // Weights go up before the manifests that name them: a gc on a shared store must wait.
    let lease = if dry_run {
        Lease::none(LeaseKind::Shared)
    } else {
        d.acquire_lease(LeaseKind::Shared, "sync", cli.wait)?
    };
    let pb = progress_bar(cli, 0, false);
    let bar = pb.clone();
    let opts = coral_sync::SyncOptions::default()
        .with_dry_run(dry_run)
        .with_progress(move |p| {
            bar.set_length(p.total);
            bar.set_position(p.done);
        });
    let stats = coral_sync::sync(&*s, &*d, &opts);
    pb.finish_and_clear();
    release(&*d, lease);
    let stats = stats.with_context(|| format!("syncing {src} to {dst}"))?;
    close(d)?;
    if cli.json {
        print_json(&serde_json::to_value(stats)?)?;
    } else {
        let k = |k: &coral_sync::KindStats| {
            format!(
                "{} moved ({}), {} skipped",
                k.moved,
                human_bytes(k.bytes),
                k.skipped
            )
        };
        out!(
            "{}weights {}; deltas {}; manifests {}",
            if dry_run { "dry run: " } else { "" },
            k(&stats.weights),
            k(&stats.deltas),
            k(&stats.manifests)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_keep_what_clap_names() {
        let text = "error: the following required arguments were not provided:\n  <FILE>\n\n\
                    Usage: coral add <FILE>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_error_parts(text),
            (
                "the following required arguments were not provided: <FILE>".to_owned(),
                Some("coral add <FILE>".to_owned())
            )
        );
        let text = "error: unexpected argument '--nme' found\n\n  tip: a similar argument \
                    exists: '--name'\n\nUsage: coral add --name <NAME> <FILE>\n";
        let (m, u) = usage_error_parts(text);
        assert_eq!(
            m,
            "unexpected argument '--nme' found; tip: a similar argument exists: '--name'"
        );
        assert_eq!(u.as_deref(), Some("coral add --name <NAME> <FILE>"));
        assert_eq!(usage_error_parts(""), ("bad arguments".to_owned(), None));
    }

    #[test]
    fn counts_and_kinds_read_as_english() {
        assert_eq!(count(1, "tensor"), "1 tensor");
        assert_eq!(count(0, "tensor"), "0 tensors");
        assert_eq!(count(104, "weight"), "104 weights");
        let kinds = |pairs: &[(&'static str, usize)]| pairs.iter().copied().collect();
        assert_eq!(stored_as(&kinds(&[("weight", 104)]), 104), " (104 weights)");
        assert_eq!(
            stored_as(&kinds(&[("delta", 11), ("weight", 93)]), 104),
            " (93 weights, 11 deltas)"
        );
        assert_eq!(
            stored_as(&kinds(&[("weight", 1), ("missing", 2)]), 3),
            " (1 weight, 2 missing)"
        );
        assert_eq!(
            stored_as(&kinds(&[("weight", 2)]), 3),
            " (2 distinct: 2 weights)"
        );
        assert_eq!(stored_as(&kinds(&[]), 0), "");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
