//! The last line of defence against a damaged store: a command on a local store runs in a
//! child process (a fork of this one, [`fork_child`]; or, where this process already has
//! threads, the `coral` binary itself, re-executed with [`CHILD_FLAG`]), so a crash inside
//! libhdf5 on bytes it trusts becomes a one-line report instead of a signal. A writing command
//! that crashes leaves its journal behind, and the next open rolls the store back to its last
//! commit, as after any killed writer.
//!
//! The child inherits stdin, stdout and stderr (its output, progress bar included, goes straight
//! to the user) and its exit status becomes the parent's. SIGINT, SIGTERM and SIGHUP sent to
//! the parent are passed on to the child (which stops cleanly: an add rolls back), and the
//! parent waits for it. Only when the child dies by a signal (other than SIGPIPE) does the
//! parent speak: [`Outcome::message`]. The parent writes nothing to stdout, so a closed stdout
//! concerns only the child, which then stops quietly with status 141 (`src/main.rs`).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};

/// The hidden argument that marks the child (which then runs the command itself).
pub const CHILD_FLAG: &str = "--guarded-child";

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this status.
    Exited(u8),
    /// It was killed by this signal.
    Signaled(i32),
}

impl Outcome {
    /// True when the signal is one a crash raises (a bad memory access, an abort, a bad
    /// instruction), as opposed to one sent from outside (Ctrl-C, `kill`).
    pub fn is_crash(&self) -> bool {
        matches!(
            self,
            Outcome::Signaled(
                libc::SIGSEGV
                    | libc::SIGBUS
                    | libc::SIGABRT
                    | libc::SIGFPE
                    | libc::SIGILL
                    | libc::SIGSYS
                    | libc::SIGTRAP
            )
        )
    }

    /// The one line to print for a child killed by a signal (`None` when it exited, or when
    /// SIGPIPE killed it: its stdout was closed early, as by `coral ls | head -1`, which is no
    /// error to speak of; the status is then 141, as a shell reports it).
    pub fn message(&self, store: &str) -> Option<String> {
        let Outcome::Signaled(sig) = *self else {
            return None;
        };
        if sig == libc::SIGPIPE {
            return None;
        }
        Some(if self.is_crash() {
            format!(
                "the store {store} is damaged: reading it crashed libhdf5 (signal {sig}); \
                 run `coral verify` to see what still reads, and `coral repair NEW` to copy \
                 it into a new store"
            )
        } else {
            format!("interrupted by signal {sig}")
        })
    }

    /// The exit status for the parent: the child's own, 1 after a crash, 128 + N after signal
    /// N from outside (as a shell reports it).
    pub fn exit_status(&self) -> u8 {
        match *self {
            Outcome::Exited(c) => c,
            Outcome::Signaled(_) if self.is_crash() => 1,
            Outcome::Signaled(s) => u8::try_from(128 + s.clamp(0, 127)).unwrap_or(u8::MAX),
        }
    }
}

/// The child being waited for (0: none), for [`forward`].
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Forks: the child returns `Ok(None)` and runs the command itself; the parent waits for it
/// (passing SIGINT, SIGTERM and SIGHUP on) and returns how it ended. Only while this process
/// has one thread (a fork copies the calling thread alone, so a lock another thread held would
/// stay held in the child for ever), which `/proc/self/task` tells; `Err` otherwise, or when
/// the fork fails, and the caller then runs the binary again with [`run_child`]. A fork costs
/// a fraction of a millisecond; running the binary again, 6 to 10 ms here (libhdf5 and the
/// libraries it links are loaded and relocated a second time), on every command.
pub fn fork_child() -> Result<Option<Outcome>> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("counting this process's threads")?
        .count();
    if threads != 1 {
        anyhow::bail!("{threads} threads: not forking");
    }
    // Nothing buffered may be written twice.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: this process has one thread (checked above), so the child gets every lock in
    // the state this thread left it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("forking");
    }
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(wait_forwarding(pid)))
}

/// Waits for the child `pid`, passing SIGINT, SIGTERM and SIGHUP on to it.
fn wait_forwarding(pid: libc::pid_t) -> Outcome {
    CHILD.store(pid, Ordering::SeqCst);
    forward_signals();
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waiting for our own child, with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            CHILD.store(0, Ordering::SeqCst);
            return Outcome::Exited(1);
        }
    }
    CHILD.store(0, Ordering::SeqCst);
    if libc::WIFEXITED(status) {
        Outcome::Exited(u8::try_from(libc::WEXITSTATUS(status)).unwrap_or(1))
    } else {
        Outcome::Signaled(libc::WTERMSIG(status))
    }
}

/// Installs [`forward`] for SIGINT, SIGTERM and SIGHUP.
fn forward_signals() {
    let handler = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only reads an atomic and calls kill(2), both async-signal-safe.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, handler);
        }
    }
}

/// Runs `exe` with [`CHILD_FLAG`] and then `args` (the parent's own arguments), with the
/// parent's stdio and environment, and waits for it, passing SIGINT, SIGTERM and SIGHUP on.
pub fn run_child(exe: &Path, args: &[OsString]) -> Result<Outcome> {
    let mut child = Command::new(exe)
        .arg(CHILD_FLAG)
        .args(args)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    CHILD.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    forward_signals();
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    let status = status.with_context(|| format!("waiting for {}", exe.display()))?;
    if let Some(code) = status.code() {
        return Ok(Outcome::Exited(u8::try_from(code).unwrap_or(1)));
    }
    Ok(Outcome::Signaled(status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_messages_and_statuses() {
        assert_eq!(Outcome::Exited(0).message("s.h5"), None);
        assert_eq!(Outcome::Exited(3).exit_status(), 3);
        let segv = Outcome::Signaled(libc::SIGSEGV);
        assert!(segv.is_crash());
        assert_eq!(segv.exit_status(), 1);
        let m = segv.message("s.h5").unwrap_or_default();
        assert!(
            m.contains("s.h5 is damaged") && m.contains("signal 11"),
            "{m}"
        );
        let int = Outcome::Signaled(libc::SIGINT);
        assert!(!int.is_crash());
        assert_eq!(int.exit_status(), 130);
        assert_eq!(
            int.message("s.h5").as_deref(),
            Some("interrupted by signal 2")
        );
        let pipe = Outcome::Signaled(libc::SIGPIPE);
        assert_eq!((pipe.message("s.h5"), pipe.exit_status()), (None, 141));
    }

    /// The test harness runs tests on threads of their own, so this process has several
    /// threads here: the fork is refused (the caller runs the binary again instead). A forked
    /// child of a one-thread process is tested end to end in `tests/tests/cli.rs`.
    #[test]
    fn no_fork_with_other_threads() {
        let t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        let e = fork_child()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("threads"), "{e}");
        let _ = t.join();
    }

    #[test]
    fn a_child_killed_by_a_signal_is_reported() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("child.sh");
        // The script ignores its arguments (the flag) and dies like a crashed reader, or exits.
        std::fs::write(
            &script,
            "#!/bin/sh\nif [ \"$3\" = crash ]; then kill -SEGV $$; fi\nexit 4\n",
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        let crash = run_child(&script, &["x".into(), "crash".into()])?;
        assert_eq!(crash, Outcome::Signaled(libc::SIGSEGV));
        assert_eq!(
            run_child(&script, &["x".into(), "y".into()])?,
            Outcome::Exited(4)
        );
        Ok(())
    }
}
