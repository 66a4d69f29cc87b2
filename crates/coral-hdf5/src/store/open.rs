//! Opening: rolling back a killed writer, checking and locking the file, opening it through
//! the journal driver, its groups, and the commit that closes and opens it again.

use std::path::Path;

use coral_store_api::{Result, StoreError};
use hdf5_sys::h5i::hid_t;

use super::{h5err, os_error, Inner, DELTAS, METADATA, MODELS, WEIGHTS};
use crate::h5::{self, Hid, Kind};
use crate::journal;
use crate::options::{HDF5StoreOptions, Mode};

/// Marks the file's descriptor close-on-exec: HDF5 opens it without, so a child process spawned
/// while the store is open would inherit it, and with it the file lock, after we close.
pub(crate) fn set_cloexec(fid: hid_t) {
    let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: for the default (sec2) driver the handle points to the `int` descriptor.
    unsafe {
        if hdf5_sys::h5f::H5Fget_vfd_handle(fid, hdf5_sys::h5p::H5P_DEFAULT, &mut handle) >= 0
            && !handle.is_null()
        {
            let fd = *(handle as *const libc::c_int);
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// The initial name-heap size of group `g` in a new file: room for about a hundred 64-character
/// keys in `weights/`; the other groups start small. HDF5 grows a heap that fills up.
pub(crate) fn heap_hint(g: &str) -> usize {
    if g == WEIGHTS {
        8 << 10
    } else {
        512
    }
}

/// Opens the store's file at `path` as `opts` say (see [`super::HDF5Store::open`]).
pub(crate) fn open_file(path: &Path, opts: &HDF5StoreOptions) -> Result<Inner> {
    open_file_locked(path, opts, None)
}

/// [`open_file`] with the writer lock of `path` already held (a compaction locks its new file
/// before renaming it into place, so that no other writer gets in between).
pub(crate) fn open_file_locked(
    path: &Path,
    opts: &HDF5StoreOptions,
    held: Option<journal::WriterLock>,
) -> Result<Inner> {
    let mode = opts.mode;
    // Roll back what a killed writer left half-done before anything reads the file.
    roll_back(path, mode)?;
    let exists = path.exists();
    check_mode(path, mode, exists)?;
    let open_existing = matches!(mode, Mode::Read | Mode::ReadWrite | Mode::Append) && exists;
    prepare_path(path, open_existing)?;
    // Never silently without crash safety (checked before anything touches the file).
    require_journal(path, opts)?;
    let lock = writer_lock(path, opts, held, open_existing)?;
    // A file a writer created but never committed is empty: it is a new store.
    let create = !open_existing
        || mode == Mode::Truncate
        || lock.as_ref().is_some_and(|l| l.len().is_ok_and(|n| n == 0));
    h5::locked(|| open_store(path, opts, create, lock))
}

/// Rolls the file at `path` back to its last commit from its journal, if a killed writer left
/// one; removes a file that was never committed.
fn roll_back(path: &Path, mode: Mode) -> Result<()> {
    let loc = || path.display().to_string();
    match journal::recover(path) {
        Ok(Some(r)) => {
            tracing::warn!(
                path = %loc(),
                records = r.records,
                size = r.committed,
                "rolled the store back to its last commit"
            );
            if r.committed == 0 {
                // Killed before its first commit: the store never existed.
                std::fs::remove_file(path).map_err(|e| {
                    StoreError::backend(format!("removing the uncommitted {}", loc()), e)
                })?;
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) if mode == Mode::Read && e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(path = %loc(), "cannot roll back a read-only file: {e}");
            Ok(())
        }
        Err(e) => Err(StoreError::backend(
            format!("rolling back {} from its journal", loc()),
            e,
        )),
    }
}

/// Refuses a missing file in `r`/`r+` mode and an existing one in `x` mode.
fn check_mode(path: &Path, mode: Mode, exists: bool) -> Result<()> {
    let loc = || path.display().to_string();
    if matches!(mode, Mode::Read | Mode::ReadWrite) && !exists {
        return Err(StoreError::backend(
            format!("opening {} (mode {})", loc(), mode.as_str()),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    if mode == Mode::CreateNew && exists {
        return Err(StoreError::backend(
            format!("creating {} (mode {})", loc(), mode.as_str()),
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
        ));
    }
    Ok(())
}

/// A file to open must be an HDF5 file ([`StoreError::NotAStore`] otherwise); a file to create
/// gets its directory.
fn prepare_path(path: &Path, open_existing: bool) -> Result<()> {
    let loc = || path.display().to_string();
    let cpath = h5::cstr(&path.to_string_lossy()).map_err(|e| h5err(path, e))?;
    if open_existing {
        if path.is_dir() {
            return Err(StoreError::NotAStore {
                location: loc(),
                reason: "is a directory".to_owned(),
            });
        }
        let is = h5::locked(|| h5::is_hdf5(&cpath));
        if is <= 0 {
            return Err(StoreError::NotAStore {
                location: loc(),
                reason: "not an HDF5 file".to_owned(),
            });
        }
    } else if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::backend(format!("creating the directory of {}", loc()), e)
            })?;
        }
    }
    Ok(())
}

/// Refuses to write without the journal driver on this library, unless the options allow it.
fn require_journal(path: &Path, opts: &HDF5StoreOptions) -> Result<()> {
    if opts.mode.writable() && !opts.allow_unjournaled && h5::locked(|| journal::driver().is_none())
    {
        let (maj, min, rel) = h5::locked(journal::lib_version);
        return Err(StoreError::InvalidConfig(format!(
            "{}: the linked HDF5 is {maj}.{min}.{rel}, and Coral's crash-safe file driver \
                 knows 1.10.8 and later 1.10 releases, 1.14 and 2.x; writing would not survive a \
                 crash (HDF5StoreOptions::allow_unjournaled, or CORAL_ALLOW_UNJOURNALED=1, to \
                 write anyway)",
            path.display()
        )));
    }
    Ok(())
}

/// A writer's lock on `path` (`held` when the caller has it already), the file truncated in
/// `w` mode; `None` for a reader.
fn writer_lock(
    path: &Path,
    opts: &HDF5StoreOptions,
    held: Option<journal::WriterLock>,
    open_existing: bool,
) -> Result<Option<journal::WriterLock>> {
    let mode = opts.mode;
    if !mode.writable() {
        return Ok(None);
    }
    // A writer locks the file before HDF5 opens it (creating it empty when it is new), and
    // keeps the lock while the file is closed and opened again at each commit.
    let lock = match held {
        Some(l) => l,
        None => journal::WriterLock::acquire(path, !open_existing, opts.wait)
            .map_err(|e| os_error(path, &format!("opening (mode {})", mode.as_str()), e))?,
    };
    if mode == Mode::Truncate {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(0))
            .map_err(|e| os_error(path, "truncating", e))?;
    }
    Ok(Some(lock))
}

/// Opens (with `create`, creates) the file through HDF5, checks or lays out its groups, and
/// commits a writer's first open. Call under the HDF5 lock.
fn open_store(
    path: &Path,
    opts: &HDF5StoreOptions,
    create: bool,
    lock: Option<journal::WriterLock>,
) -> Result<Inner> {
    let fid = open_h5(path, opts, create)?;
    let fid_raw = fid.id();
    set_cloexec(fid_raw);
    let writable = opts.mode.writable();
    if writable {
        // Holding the write lock: a `<path>.compact-tmp` now is a killed compaction's.
        crate::compact::remove_stale_tmp(fid_raw, path)?;
    }
    check_layout(path, fid_raw, opts.mode)?;
    if writable {
        create_groups(path, fid_raw)?;
    }
    let (weights, deltas, models) = open_groups(path, fid_raw)?;
    let mut inner = Inner {
        weights,
        deltas,
        models,
        file: fid,
        writable,
        reader: second_reader(path, fid_raw),
        lock,
        closed_by_commit: false,
    };
    if writable {
        commit_reopen(path, opts, &mut inner)?;
    }
    Ok(inner)
}

/// A file without `weights/` is a store only when `mode` may create one: `w`, `x`, or `a` on
/// an empty file.
fn check_layout(path: &Path, fid: hid_t, mode: Mode) -> Result<()> {
    if h5::link_exists(fid, WEIGHTS).map_err(|e| h5err(path, e))? {
        return Ok(());
    }
    let empty = h5::link_names(fid).map_err(|e| h5err(path, e))?.is_empty();
    let may_create = match mode {
        Mode::Read | Mode::ReadWrite => false,
        Mode::Append => empty,
        Mode::Truncate | Mode::CreateNew => true,
    };
    if !may_create {
        return Err(StoreError::NotAStore {
            location: path.display().to_string(),
            reason: "an HDF5 file without the weights/ group".to_owned(),
        });
    }
    Ok(())
}

/// Creates whichever of the store's groups the file lacks.
fn create_groups(path: &Path, fid: hid_t) -> Result<()> {
    for g in [WEIGHTS, METADATA, DELTAS, MODELS] {
        if !h5::link_exists(fid, g).map_err(|e| h5err(path, e))? {
            drop(h5::create_group(fid, g, heap_hint(g)).map_err(|e| h5err(path, e))?);
        }
    }
    Ok(())
}

/// A second descriptor of the file for positional reads of chunks ([`Inner::reader`]): only
/// without a user block, since chunk addresses are file offsets only then.
fn second_reader(path: &Path, fid: hid_t) -> Option<std::fs::File> {
    match h5::userblock_size(fid) {
        Ok(0) => std::fs::File::open(path)
            .map_err(
                |e| tracing::debug!(path = %path.display(), error = %e, "no second descriptor"),
            )
            .ok(),
        _ => None,
    }
}

/// Opens (or, with `create`, creates) the HDF5 file with Coral's property lists and the journal
/// driver. Call under the HDF5 lock.
fn open_h5(path: &Path, opts: &HDF5StoreOptions, create: bool) -> Result<Hid> {
    let loc = || path.display().to_string();
    let cpath = h5::cstr(&path.to_string_lossy()).map_err(|e| h5err(path, e))?;
    let fcpl = h5::make_fcpl(opts.persistent_free_space).map_err(|e| h5err(path, e))?;
    let fapl = h5::make_fapl(opts.mode.writable()).map_err(|e| h5err(path, e))?;
    journal::configure(journal::OpenConfig {
        wait: opts.wait,
        durable: opts.durable,
    });
    journal::take_error();
    // SAFETY: valid C string and property lists.
    let fid = unsafe {
        if create {
            hdf5_sys::h5f::H5Fcreate(
                cpath.as_ptr(),
                hdf5_sys::h5f::H5F_ACC_TRUNC,
                fcpl.id(),
                fapl.id(),
            )
        } else if opts.mode == Mode::Read {
            hdf5_sys::h5f::H5Fopen(cpath.as_ptr(), hdf5_sys::h5f::H5F_ACC_RDONLY, fapl.id())
        } else {
            hdf5_sys::h5f::H5Fopen(cpath.as_ptr(), hdf5_sys::h5f::H5F_ACC_RDWR, fapl.id())
        }
    };
    let fid = Hid::new(fid, Kind::File, || {
        format!("opening {} (mode {})", loc(), opts.mode.as_str())
    })
    .map_err(|e| h5err(path, e))?;
    if opts.mode.writable() {
        h5::use_v110_objects(fid.id()).map_err(|e| h5err(path, e))?;
    }
    Ok(fid)
}

/// The store's groups in an open file: `weights/` (required), `deltas/` and `models/`.
fn open_groups(path: &Path, fid: hid_t) -> Result<(Hid, Option<Hid>, Option<Hid>)> {
    let has = |g: &str| h5::link_exists(fid, g).map_err(|e| h5err(path, e));
    let open = |g: &str| -> Result<Option<Hid>> {
        if has(g)? {
            h5::open_group(fid, g).map(Some).map_err(|e| h5err(path, e))
        } else {
            Ok(None)
        }
    };
    let weights = open(WEIGHTS)?.ok_or_else(|| StoreError::NotAStore {
        location: path.display().to_string(),
        reason: "no weights/ group".to_owned(),
    })?;
    Ok((weights, open(DELTAS)?, open(MODELS)?))
}

/// Commits a writer's changes by closing the file and opening it again. HDF5 writes its
/// persistent free-space managers only when a file closes: a flush leaves the file pointing at
/// free-space records that the open file has already reused, which a crash then turns into a
/// file HDF5 cannot open (seen with HDF5 1.10.8). Closing is the commit (the driver's
/// [`journal`] commit runs as the file closes); the writer lock stays held throughout. When the
/// commit fails, the driver rolls the file back to its last commit, and the store opens that.
/// Call under the HDF5 lock, with no other object of the file open.
pub(crate) fn commit_reopen(path: &Path, opts: &HDF5StoreOptions, inner: &mut Inner) -> Result<()> {
    let closed = commit_close(path, inner);
    reopen(path, opts, inner)?;
    closed
}

/// The first half of [`commit_reopen`]: the file closed (the commit), and marked to open again
/// at the store's next use ([`Inner::ready`]). The writer lock and the reader stay.
pub(crate) fn commit_close(path: &Path, inner: &mut Inner) -> Result<()> {
    if inner.closed_by_commit {
        return Ok(());
    }
    let fid = inner.file.id();
    let weights = std::mem::replace(&mut inner.weights, Hid::closed(Kind::Group));
    drop((weights, inner.deltas.take(), inner.models.take()));
    // SAFETY: valid file id.
    let open = unsafe { hdf5_sys::h5f::H5Fget_obj_count(fid, hdf5_sys::h5f::H5F_OBJ_ALL) };
    let file = std::mem::replace(&mut inner.file, Hid::closed(Kind::File));
    inner.closed_by_commit = true;
    if open > 1 {
        // Something else of the file is still open, so closing would not close it (and not
        // commit): an error in Coral, reported rather than hidden.
        drop(file);
        Err(StoreError::backend(
            format!("committing {}", path.display()),
            std::io::Error::other(format!("{} objects of the file are still open", open - 1)),
        ))
    } else {
        file.close().map_err(|e| h5err(path, e))
    }
}

/// The second half of [`commit_reopen`]: the file and its groups open again, the writer lock
/// and the reader kept. Call under the HDF5 lock.
pub(crate) fn reopen(path: &Path, opts: &HDF5StoreOptions, inner: &mut Inner) -> Result<()> {
    let fid = open_h5(path, opts, false)?;
    let (weights, deltas, models) = open_groups(path, fid.id())?;
    set_cloexec(fid.id());
    *inner = Inner {
        weights,
        deltas,
        models,
        file: fid,
        writable: inner.writable,
        reader: inner.reader.take(),
        lock: inner.lock.take(),
        closed_by_commit: false,
    };
    Ok(())
}
