//! Leases under `{prefix}locks/`: how many writers and a garbage collector share one prefix.
//!
//! The protocol (see `docs/format.md`, "Leases"): a process writes its lease object, then lists
//! `locks/`. On a service whose listings show every completed write (S3, Garage, MinIO), of two
//! processes that do this at the same time at least the later one sees the other's lease. So a
//! lease is held once the listing after its write shows no live conflicting lease:
//!
//! - a **shared** lease (writers that add references) that sees a live exclusive one puts up
//!   a `waiting` mark instead, waits for the exclusive one to go, and tries again;
//! - an **exclusive** lease (gc) first lets writers with a `waiting` mark go first (for as long
//!   as it may wait: they are not at work), then goes up; if it sees only shared leases it stays
//!   up, so no new writer starts, and waits for them to end; one that sees another exclusive
//!   lease goes, and tries again after a random pause.
//!
//! So a gc run in a loop and a stream of writers take turns: neither starves the other.
//!
//! A held lease is refreshed in the background every fifteenth of its stale period. A lease
//! whose object is older than the stale period its holder declared (by the service's clock), or
//! whose holder is a process of this machine that no longer runs, is ignored, and removed by
//! whoever takes an exclusive lease. A process that finds its own lease gone, or could not
//! refresh it for half the stale period, refuses to write manifests or to delete through it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use coral_core::ContentHash;
use coral_store_api::{Lease, LeaseKind, Leftovers, Result, StoreError};

use crate::clock::{format_age, format_unix, unix_ms};
use crate::signed::Signed;
use crate::store::Inner;
use crate::uploads;

/// The `format` of a lease object.
pub(crate) const LEASE_FORMAT: &str = "coral.s3.lease.v1";

/// The folder of lease objects, under the prefix.
pub(crate) const LOCKS_DIR: &str = "locks";

/// Differences between the service's clock and ours smaller than this are taken for the
/// precision of its timestamps (whole seconds on some services), not for a skew.
const CLOCK_NOISE_MS: i64 = 2000;

/// The body of `{prefix}locks/{kind}-{token}.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    pub format: String,
    pub kind: String,
    pub id: String,
    pub operation: String,
    pub host: String,
    pub pid: u32,
    pub started_unix: i64,
    pub refreshed_unix: i64,
    pub stale_after_secs: u64,
    /// `/proc/sys/kernel/random/boot_id`, with `pid_ns` and `proc_start`: lets a process of the
    /// same machine tell that the holder no longer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_start: Option<u64>,
}

impl LeaseRecord {
    fn new(kind: LeaseKind, id: &str, operation: &str, stale_after: Duration) -> Self {
        let now = unix_ms() / 1000;
        let pid = std::process::id();
        LeaseRecord {
            format: LEASE_FORMAT.to_owned(),
            kind: kind.name().to_owned(),
            id: id.to_owned(),
            operation: operation.to_owned(),
            host: host_name(),
            pid,
            started_unix: now,
            refreshed_unix: now,
            stale_after_secs: stale_after.as_secs().max(1),
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
            proc_start: process_start(pid).map(|(start, _)| start),
        }
    }

    /// True when the holder is a process of this machine (same boot, same pid namespace) that
    /// no longer runs: its id is free, a zombie, or another process's (another start time).
    fn holder_gone_here(&self) -> bool {
        let (Some(b), Some(ns), Some(start)) = (&self.boot_id, &self.pid_ns, self.proc_start)
        else {
            return false;
        };
        if boot_id().as_ref() != Some(b) || pid_namespace().as_ref() != Some(ns) {
            return false;
        }
        match process_start(self.pid) {
            Some((s, alive)) => s != start || !alive,
            None => true,
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.len() < 256)
}

fn host_name() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn boot_id() -> Option<String> {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// A process's start time (field 22 of `/proc/PID/stat`, in clock ticks since boot) and
/// whether it still runs (not a zombie); `None` when there is no such process.
fn process_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses; fields 3.. follow the
    // last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, !matches!(state, "Z" | "X" | "x")))
}

/// 32 random hex characters (std's randomly keyed hasher over the pid, the time and a counter).
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    (0..2u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            h.write_u64(n);
            h.write_u32(std::process::id());
            h.write_u128(nanos);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// A random pause of up to `max_ms` milliseconds.
fn jitter(max_ms: u64) -> Duration {
    let token = random_token();
    let n = u64::from_str_radix(token.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    Duration::from_millis(n % max_ms.max(1))
}

/// What a lease object is, by its name: a held lease of either kind, or the mark of a writer
/// that waits for an exclusive lease to go (and that a garbage collector about to start lets
/// go first, so that writers are not starved by a gc run in a loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjKind {
    Held(LeaseKind),
    Waiting,
}

impl ObjKind {
    fn name(self) -> &'static str {
        match self {
            ObjKind::Held(k) => k.name(),
            ObjKind::Waiting => "waiting",
        }
    }

    fn parse(s: &str) -> Option<ObjKind> {
        match s {
            "waiting" => Some(ObjKind::Waiting),
            _ => LeaseKind::parse(s).map(ObjKind::Held),
        }
    }

    fn is(self, kind: LeaseKind) -> bool {
        self == ObjKind::Held(kind)
    }
}

/// A lease object in a listing of `locks/`.
#[derive(Debug, Clone)]
struct Seen {
    rel: String,
    kind: ObjKind,
    modified_ms: i64,
}

/// A live lease in the way, with what its object says.
#[derive(Debug, Clone)]
struct Holder {
    seen: Seen,
    record: Option<LeaseRecord>,
}

impl Holder {
    /// `coral gc holds an exclusive lease (host h, pid 42, since ..., refreshed 3 s ago)`.
    fn describe(&self, now_ms: i64) -> String {
        let age = format_age(now_ms - self.seen.modified_ms);
        match &self.record {
            Some(r) => format!(
                "`coral {}` holds {} lease (host {}, pid {}, since {}, refreshed {age} ago)",
                r.operation,
                a_kind(self.seen.kind),
                r.host,
                r.pid,
                format_unix(r.started_unix)
            ),
            None => format!(
                "{} lease {} (unreadable) was written {age} ago",
                a_kind(self.seen.kind),
                self.seen.rel
            ),
        }
    }
}

/// "a shared", "an exclusive", "a waiting".
fn a_kind(kind: ObjKind) -> &'static str {
    match kind {
        ObjKind::Held(LeaseKind::Shared) => "a shared",
        ObjKind::Held(LeaseKind::Exclusive) => "an exclusive",
        ObjKind::Waiting => "a waiting",
    }
}

/// Seconds as `1 s`, `0.5 s`.
fn format_wait(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 || s >= 10.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

enum LeaseRead {
    Gone,
    Unreadable,
    Record(Box<LeaseRecord>),
}

/// This process's state of one lease it holds.
#[derive(Debug)]
pub(crate) struct LeaseState {
    kind: LeaseKind,
    rel: String,
    record: Mutex<LeaseRecord>,
    /// When the lease object was last written (local clock, ms).
    last_ok_ms: AtomicI64,
    /// Found removed by another process.
    lost: AtomicBool,
}

/// A lease this store holds: its state and its refresh task.
#[derive(Debug)]
pub(crate) struct HeldLease {
    state: Arc<LeaseState>,
    refresh: tokio::task::AbortHandle,
}

/// The leases a store holds, by id.
pub(crate) type HeldLeases = Mutex<std::collections::HashMap<String, HeldLease>>;

/// Sleeps that grow from 50 ms to 250 ms, with some jitter.
struct Poll(u64);

impl Poll {
    async fn sleep(&mut self) {
        tokio::time::sleep(Duration::from_millis(self.0) + jitter(self.0 / 2 + 1)).await;
        self.0 = (self.0 * 3 / 2).min(250);
    }
}

fn lease_rel(id: &str) -> String {
    format!("{LOCKS_DIR}/{id}.json")
}

/// `(kind, id)` of a lease object's file name `{kind}-{token}.json`.
fn parse_lease_name(file: &str) -> Option<(ObjKind, &str)> {
    let id = file.strip_suffix(".json")?;
    let (kind, token) = id.split_once('-')?;
    let ok = (8..=64).contains(&token.len()) && token.bytes().all(|c| c.is_ascii_hexdigit());
    ok.then_some(())?;
    Some((ObjKind::parse(kind)?, id))
}

impl Inner {
    fn stale_ms(&self) -> i64 {
        i64::try_from(self.config.lease_stale_after.as_millis()).unwrap_or(i64::MAX)
    }

    fn refresh_interval(&self) -> Duration {
        (self.config.lease_stale_after / 15).max(Duration::from_millis(50))
    }

    fn refresh_ms(&self) -> i64 {
        i64::try_from(self.refresh_interval().as_millis()).unwrap_or(i64::MAX)
    }

    /// Now by the service's clock, as far as this process knows it (its own clock when the two
    /// agree within the service's timestamp precision).
    pub(crate) fn server_now_ms(&self) -> i64 {
        unix_ms().saturating_add(self.clock_offset_ms.load(Ordering::Relaxed))
    }

    fn note_clock(&self, server_ms: i64, local_ms: i64) {
        let offset = server_ms - local_ms;
        let offset = if offset.abs() < CLOCK_NOISE_MS {
            0
        } else {
            offset
        };
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
    }

    async fn put_lease(&self, rel: &str, record: &LeaseRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| StoreError::backend(format!("encoding lease {rel}"), e))?;
        self.put_rel(rel, Bytes::from(json)).await.map(|_| ())
    }

    async fn list_leases(&self) -> Result<Vec<Seen>> {
        Ok(self
            .list_rel(LOCKS_DIR)
            .await?
            .into_iter()
            .filter_map(|o| {
                let (kind, id) = parse_lease_name(o.location.filename()?)?;
                Some(Seen {
                    rel: lease_rel(id),
                    kind,
                    modified_ms: o.last_modified.timestamp_millis(),
                })
            })
            .collect())
    }

    async fn read_lease(&self, rel: &str) -> Result<LeaseRead> {
        Ok(match self.get_opt(rel).await? {
            None => LeaseRead::Gone,
            Some(b) => match serde_json::from_slice::<LeaseRecord>(&b) {
                Ok(r) if r.format == LEASE_FORMAT => LeaseRead::Record(Box::new(r)),
                _ => LeaseRead::Unreadable,
            },
        })
    }

    /// The live lease objects of `seen` of the kinds `wanted` takes (except `own`). Stale
    /// ones are skipped, and deleted when `remove_stale`.
    async fn live(
        &self,
        wanted: impl Fn(ObjKind) -> bool,
        own: Option<&str>,
        seen: &[Seen],
        now_ms: i64,
        remove_stale: bool,
    ) -> Result<Vec<Holder>> {
        let mut out = Vec::new();
        for s in seen {
            if Some(s.rel.as_str()) == own || !wanted(s.kind) {
                continue;
            }
            let record = match self.read_lease(&s.rel).await? {
                LeaseRead::Gone => continue,
                LeaseRead::Unreadable => None,
                LeaseRead::Record(r) => Some(*r),
            };
            let stale_ms = record.as_ref().map_or(self.stale_ms(), |r| {
                i64::try_from(r.stale_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
            });
            let age = now_ms - s.modified_ms;
            let gone = record.as_ref().is_some_and(LeaseRecord::holder_gone_here);
            if age > stale_ms || gone {
                let holder = Holder {
                    seen: s.clone(),
                    record,
                };
                let why = if gone {
                    "its process no longer runs"
                } else {
                    "not refreshed for longer than its stale period"
                };
                if remove_stale {
                    self.delete_rel(&s.rel).await?;
                    tracing::warn!(lease = %s.rel, "removed a stale lease ({why}): {}", holder.describe(now_ms));
                } else {
                    tracing::info!(lease = %s.rel, "ignoring a stale lease ({why})");
                }
                continue;
            }
            out.push(Holder {
                seen: s.clone(),
                record,
            });
        }
        Ok(out)
    }

    /// The listing after writing `own`, and now by the service's clock (the time stamp of
    /// `own`). A listing that does not show `own` is retried briefly; a service whose listings
    /// never show a completed write cannot host leases.
    async fn list_after_write(&self, own: &str, written_ms: i64) -> Result<(Vec<Seen>, i64)> {
        for attempt in 0..4 {
            let seen = self.list_leases().await?;
            if let Some(o) = seen.iter().find(|s| s.rel == own) {
                let now = o.modified_ms;
                self.note_clock(now, written_ms);
                return Ok((seen, now.max(self.server_now_ms())));
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        Err(StoreError::backend(
            format!("taking a lease in {}", self.location),
            format!(
                "the listing of {}{LOCKS_DIR}/ does not show the lease {own} just written: this \
                 service's listings are not strongly consistent, and leases cannot protect \
                 concurrent writers on it",
                self.config.prefix
            ),
        ))
    }

    fn busy(&self, operation: &str, holders: &[Holder], waited: Duration) -> StoreError {
        let now = self.server_now_ms();
        let holder = holders
            .iter()
            .find(|h| h.seen.kind.is(LeaseKind::Exclusive))
            .or_else(|| holders.first());
        let who = holder.map_or_else(|| "another process".to_owned(), |h| h.describe(now));
        let more = holders.len().saturating_sub(1);
        let more = if more > 0 {
            format!(" and {more} other lease(s)")
        } else {
            String::new()
        };
        StoreError::Locked {
            location: self.location.clone(),
            reason: format!(
                "{who}{more}; `coral {operation}` gave up after waiting {}",
                format_wait(waited)
            ),
        }
    }

    /// Takes a lease (see the module's documentation).
    pub(crate) async fn acquire_lease(
        self: &Arc<Self>,
        kind: LeaseKind,
        operation: &str,
        wait: Duration,
    ) -> Result<Lease> {
        let deadline = tokio::time::Instant::now() + wait;
        let token = random_token();
        let id = format!("{}-{token}", kind.name());
        let rel = lease_rel(&id);
        let record = LeaseRecord::new(kind, &id, operation, self.config.lease_stale_after);
        match kind {
            LeaseKind::Shared => {
                let waiting = lease_rel(&format!("{}-{token}", ObjKind::Waiting.name()));
                let mut marked = false;
                let r = self
                    .acquire_shared(
                        operation,
                        wait,
                        deadline,
                        &rel,
                        &waiting,
                        record,
                        &mut marked,
                    )
                    .await;
                // However it ended, the mark of our waiting goes.
                if marked {
                    if let Err(e) = self.delete_rel(&waiting).await {
                        if r.is_ok() {
                            let _ = self.delete_rel(&rel).await;
                        }
                        return Err(e);
                    }
                }
                let (record, written) = r?;
                Ok(self.hold(kind, id, rel, record, written))
            }
            LeaseKind::Exclusive => {
                let (record, written) = self
                    .acquire_exclusive(operation, wait, deadline, &rel, record)
                    .await?;
                Ok(self.hold(kind, id, rel, record, written))
            }
        }
    }

    /// A writer's lease: up unless an exclusive one is; while one is, the writer's `waiting`
    /// mark is up instead (`marked` says it was written). Returns the record and when it was
    /// written.
    #[allow(clippy::too_many_arguments)]
    async fn acquire_shared(
        &self,
        operation: &str,
        wait: Duration,
        deadline: tokio::time::Instant,
        rel: &str,
        waiting: &str,
        mut record: LeaseRecord,
        was_marked: &mut bool,
    ) -> Result<(LeaseRecord, i64)> {
        let exclusive = |k: ObjKind| k.is(LeaseKind::Exclusive);
        let mut poll = Poll(50);
        let mut marked: Option<i64> = None;
        loop {
            record.refreshed_unix = unix_ms() / 1000;
            self.put_lease(rel, &record).await?;
            let written = unix_ms();
            let (seen, now) = self.list_after_write(rel, written).await?;
            let mut holders = self.live(exclusive, Some(rel), &seen, now, false).await?;
            if holders.is_empty() {
                return Ok((record, written));
            }
            // Back off: our waiting mark goes up (so the next gc lets us go first), our lease
            // goes, and we wait for the exclusive lease to go.
            if marked.is_none() {
                let mut mark = record.clone();
                mark.kind = ObjKind::Waiting.name().to_owned();
                *was_marked = true;
                self.put_lease(waiting, &mark).await?;
                marked = Some(unix_ms());
            }
            self.delete_rel(rel).await?;
            while !holders.is_empty() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(self.busy(operation, &holders, wait));
                }
                poll.sleep().await;
                if marked.is_some_and(|t| unix_ms() - t > self.refresh_ms()) {
                    let mut mark = record.clone();
                    mark.kind = ObjKind::Waiting.name().to_owned();
                    mark.refreshed_unix = unix_ms() / 1000;
                    self.put_lease(waiting, &mark).await?;
                    marked = Some(unix_ms());
                }
                let seen = self.list_leases().await?;
                let now = self.server_now_ms();
                holders = self.live(exclusive, None, &seen, now, false).await?;
            }
        }
    }

    /// gc's lease: once no writer waits for an earlier gc (as long as `wait` allows), up; held
    /// once no live lease of any kind is in the way, waiting (with it up, so no new writer
    /// starts) for the writers at work to finish. Returns the record and when it was written.
    async fn acquire_exclusive(
        &self,
        operation: &str,
        wait: Duration,
        deadline: tokio::time::Instant,
        rel: &str,
        mut record: LeaseRecord,
    ) -> Result<(LeaseRecord, i64)> {
        let held = |k: ObjKind| matches!(k, ObjKind::Held(_));
        let exclusive = |k: ObjKind| k.is(LeaseKind::Exclusive);
        let mut poll = Poll(50);
        // Writers that wait for an earlier gc go first; they are not at work, so once `wait`
        // is over we go ahead of them.
        loop {
            let seen = self.list_leases().await?;
            let now = self.server_now_ms();
            let waiting = self
                .live(|k| k == ObjKind::Waiting, None, &seen, now, true)
                .await?;
            if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            poll.sleep().await;
        }
        loop {
            record.refreshed_unix = unix_ms() / 1000;
            self.put_lease(rel, &record).await?;
            let mut written = unix_ms();
            let (seen, now) = self.list_after_write(rel, written).await?;
            let mut holders = self.live(held, Some(rel), &seen, now, true).await?;
            // Only writers in the way: our lease stays, so that no new writer starts, and we
            // wait for those at work to finish.
            while !holders.is_empty() && !holders.iter().any(|h| exclusive(h.seen.kind)) {
                if tokio::time::Instant::now() >= deadline {
                    self.delete_rel(rel).await?;
                    return Err(self.busy(operation, &holders, wait));
                }
                poll.sleep().await;
                if unix_ms() - written > self.refresh_ms() {
                    record.refreshed_unix = unix_ms() / 1000;
                    self.put_lease(rel, &record).await?;
                    written = unix_ms();
                }
                let (seen, now) = self.list_after_write(rel, written).await?;
                holders = self.live(held, Some(rel), &seen, now, true).await?;
            }
            if holders.is_empty() {
                return Ok((record, written));
            }
            // Another gc: ours goes, we wait for it to finish, and try again after a random
            // pause (two that saw each other).
            self.delete_rel(rel).await?;
            while !holders.is_empty() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(self.busy(operation, &holders, wait));
                }
                poll.sleep().await;
                let seen = self.list_leases().await?;
                let now = self.server_now_ms();
                holders = self.live(exclusive, None, &seen, now, false).await?;
            }
            tokio::time::sleep(jitter(300)).await;
        }
    }

    fn hold(
        self: &Arc<Self>,
        kind: LeaseKind,
        id: String,
        rel: String,
        record: LeaseRecord,
        written_ms: i64,
    ) -> Lease {
        let state = Arc::new(LeaseState {
            kind,
            rel,
            record: Mutex::new(record),
            last_ok_ms: AtomicI64::new(written_ms),
            lost: AtomicBool::new(false),
        });
        let refresh = tokio::spawn(refresh_loop(
            Arc::downgrade(self),
            state.clone(),
            self.refresh_interval(),
        ))
        .abort_handle();
        tracing::debug!(lease = %state.rel, "lease taken");
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), HeldLease { state, refresh });
        Lease::held(kind, id)
    }

    /// Rewrites the lease object, unless another process removed it (then the lease is lost).
    /// A rewrite that comes more than half the stale period after the last one loses the lease
    /// too: someone may have judged it stale in between, even if the rewrite (sent after a
    /// `HEAD` that still found it) put the object back.
    async fn refresh_once(&self, state: &LeaseState) -> Result<()> {
        if state.lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        let previous = state.last_ok_ms.load(Ordering::Relaxed);
        if !self.head_exists(&state.rel).await? {
            state.lost.store(true, Ordering::Relaxed);
            tracing::warn!(lease = %state.rel, "this process's lease was removed by another process, which judged it stale");
            return Ok(());
        }
        let record = {
            let mut r = state.record.lock().unwrap_or_else(|p| p.into_inner());
            r.refreshed_unix = unix_ms() / 1000;
            r.clone()
        };
        self.put_lease(&state.rel, &record).await?;
        let now = unix_ms();
        if now - previous > self.stale_ms() / 2 {
            state.lost.store(true, Ordering::Relaxed);
            tracing::warn!(lease = %state.rel, "this process's lease went unrefreshed for longer than half its stale period");
            return Ok(());
        }
        state.last_ok_ms.store(now, Ordering::Relaxed);
        Ok(())
    }

    /// Fails when a lease this store holds is no longer safe to act under: removed by another
    /// process, or not rewritten for half its stale period. Called before writing a manifest
    /// and before deleting. Makes no request.
    pub(crate) async fn check_leases(&self) -> Result<()> {
        let held: Vec<Arc<LeaseState>> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|h| h.state.clone())
            .collect();
        for state in held {
            // Not rewritten for half its stale period: someone may have judged it stale.
            if unix_ms() - state.last_ok_ms.load(Ordering::Relaxed) > self.stale_ms() / 2 {
                state.lost.store(true, Ordering::Relaxed);
            }
            if state.lost.load(Ordering::Relaxed) {
                return Err(StoreError::Locked {
                    location: self.location.clone(),
                    reason: format!(
                        "this process's {} lease {} was lost (not refreshed for longer than half \
                         its stale period of {} s, or removed by another process): nothing more is \
                         written or deleted under it",
                        state.kind,
                        state.rel,
                        self.config.lease_stale_after.as_secs()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Gives a lease back: stops its refresh and deletes its object. Unknown ids are ignored.
    pub(crate) async fn release_lease(&self, id: &str) -> Result<()> {
        let held = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(h) = held {
            // From here a garbage collector may run: what we committed must be asked again.
            self.committed_under_lease
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            h.refresh.abort();
            self.delete_rel(&h.state.rel).await?;
            tracing::debug!(lease = %h.state.rel, "lease released");
        }
        Ok(())
    }

    /// Releases every lease still held (when the store closes).
    pub(crate) async fn release_all_leases(&self) -> Result<()> {
        let ids: Vec<String> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut first_error = None;
        for id in ids {
            if let Err(e) = self.release_lease(&id).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub(crate) fn holds_leases(&self) -> bool {
        !self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Keys whose commit object (metadata or delta object) is younger than `age`.
    pub(crate) async fn committed_within(&self, age: Duration) -> Result<BTreeSet<ContentHash>> {
        let mut out = BTreeSet::new();
        if age.is_zero() {
            return Ok(out);
        }
        // Some services stamp objects to the second: a second more, to be sure.
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self
            .server_now_ms()
            .saturating_sub(age_ms.saturating_add(1000));
        for (dir, ext) in [("metadata", ".json"), ("deltas", ".npz")] {
            for o in self.list_rel(dir).await? {
                if o.last_modified.timestamp_millis() <= cutoff {
                    continue;
                }
                let key = o
                    .location
                    .filename()
                    .and_then(|f| f.strip_suffix(ext))
                    .and_then(|h| ContentHash::parse(h).ok());
                if let Some(k) = key {
                    out.insert(k);
                }
            }
        }
        Ok(out)
    }

    /// What writes that never finished left, older than `older_than`; removed unless `dry_run`.
    pub(crate) async fn remove_leftovers(
        &self,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<Leftovers> {
        let margin = if older_than.is_zero() { 0 } else { 1000 };
        let older_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self
            .server_now_ms()
            .saturating_sub(older_ms.saturating_add(margin));
        let orphans = self.orphans(cutoff, dry_run).await?;
        let bucket = format!("bucket {:?} ({})", self.config.bucket, self.location);
        let signed = Signed::new(
            &self.s3,
            &self.config,
            &self.region,
            &self.client_options,
            &bucket,
        )
        .await?;
        let mut aborted = 0;
        for u in uploads::list(&signed, &self.config.prefix, &self.location).await? {
            // An upload whose start the service did not say is left alone.
            if u.initiated_ms.is_none_or(|t| t > cutoff) {
                continue;
            }
            if dry_run || uploads::abort(&signed, &u, &self.location).await? {
                tracing::info!(key = %u.key, "aborted an abandoned multipart upload");
                aborted += 1;
            }
        }
        Ok(Leftovers {
            data_objects: orphans.data_objects.len(),
            markers: orphans.reference_markers.len(),
            uploads: aborted,
        })
    }
}

async fn refresh_loop(inner: Weak<Inner>, state: Arc<LeaseState>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = inner.refresh_once(&state).await {
            tracing::warn!(lease = %state.rel, error = %e, "could not refresh the lease (trying again)");
        }
        if state.lost.load(Ordering::Relaxed) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_records() {
        let t = random_token();
        assert_eq!(t.len(), 32);
        assert_ne!(t, random_token());
        let name = format!("shared-{t}.json");
        assert_eq!(
            parse_lease_name(&name),
            Some((ObjKind::Held(LeaseKind::Shared), &name[..name.len() - 5]))
        );
        assert_eq!(
            parse_lease_name("exclusive-0123abcd.json").map(|x| x.0),
            Some(ObjKind::Held(LeaseKind::Exclusive))
        );
        assert_eq!(
            parse_lease_name("waiting-0123abcd.json").map(|x| x.0),
            Some(ObjKind::Waiting)
        );
        for bad in [
            "shared-xyz.json",
            "shared-0123abcd.txt",
            "other-0123abcd.json",
            "shared.json",
            "shared-.json",
        ] {
            assert_eq!(parse_lease_name(bad), None, "{bad}");
        }
        let r = LeaseRecord::new(
            LeaseKind::Shared,
            "shared-00",
            "add",
            Duration::from_secs(60),
        );
        let back: LeaseRecord =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("encodes")).expect("decodes");
        assert_eq!(back, r);
        assert_eq!(r.pid, std::process::id());
        // This process runs.
        assert!(!r.holder_gone_here());
        // One that ended does not, on Linux.
        let dead = {
            let mut c = std::process::Command::new("true").spawn().expect("spawns");
            let pid = c.id();
            c.wait().expect("waits");
            pid
        };
        let mut d = r.clone();
        d.pid = dead;
        assert_eq!(d.holder_gone_here(), r.proc_start.is_some());
        // Another machine's holder is never judged here.
        d.boot_id = Some("another-boot".into());
        assert!(!d.holder_gone_here());
    }
}
