//! `HDF5Store::compact`: rewrites the store into `<store>.compact-tmp` next to it, then renames
//! that over the store.
//!
//! HDF5 1.10 does not give freed space back to the file: deleted weights, replaced manifests and
//! interrupted writes leave holes that only a rewrite removes. The new file is created with the
//! same creation and access property lists as a new store, gets the same groups, and receives
//! every committed object of each group with `H5Ocopy`, which copies a chunked dataset's chunks
//! as they are stored (filtered bytes, filter masks and all: HDF5 only runs the filters when
//! the datatype holds variable-length data or references, which Coral's datasets never do)
//! together with its attributes. The copy is synced, closed and renamed into place; the rename
//! is the commit point: before it the old file is the store, untouched and still locked by this
//! process, after it the new one is.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use coral_core::{ContentHash, ModelName};
use coral_store_api::{Result, StoreError};
use hdf5_sys::h5i::hid_t;

use crate::h5::{self, H5Error, Hid, Kind};
use crate::journal;
use crate::options::Mode;
use crate::store::{self, HDF5Store, Inner, DELTAS, METADATA, MODELS, WEIGHTS};

/// What [`HDF5Store::compact`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// The store's path.
    pub path: PathBuf,
    /// Size of the file before (after the flush that starts the compaction).
    pub bytes_before: u64,
    /// Size of the new file.
    pub bytes_after: u64,
    /// Weights copied (`weights/`).
    pub weights: usize,
    /// Deltas copied (`deltas/`).
    pub deltas: usize,
    /// Manifests copied (`models/`).
    pub manifests: usize,
    /// Entries of `metadata/` copied.
    pub metadata: usize,
    /// Links left behind, as `group/name: reason` (interrupted writes, names that are not keys,
    /// manifest leftovers).
    pub skipped: Vec<String>,
    /// Time the compaction took, flush to reopen.
    pub elapsed: Duration,
}

impl CompactReport {
    /// Objects copied, over every group.
    pub fn objects(&self) -> usize {
        self.weights + self.deltas + self.manifests + self.metadata
    }

    /// Bytes given back (0 when the file grew).
    pub fn reclaimed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

/// The temporary file a compaction of `path` writes: `<path>.compact-tmp`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".compact-tmp");
    PathBuf::from(s)
}

/// Removes what a killed compaction of `path` left (`<path>.compact-tmp`, and its journal had
/// one been started), when `fid`, open for writing and so holding the write lock, is the file
/// `path` names now. A compaction in progress holds that lock until its rename, so a temporary
/// file found then is dead. A process that got the lock of a file already compacted away (a
/// dead inode) leaves the temporary file alone: it may be a live compaction's of the new file.
/// Call under the HDF5 lock.
pub(crate) fn remove_stale_tmp(fid: hid_t, path: &Path) -> Result<()> {
    if !names_file(fid, path) {
        return Ok(());
    }
    let tmp = tmp_path(path);
    for p in [journal::journal_path(&tmp), tmp] {
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::warn!(path = %p.display(), "removed the leftover of a compaction that did not finish");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::backend(
                    format!("removing the stale {}", p.display()),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// True when `path` names the file open as `fid` (same device and inode); false when that
/// cannot be told.
fn names_file(fid: hid_t, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(at_path) = std::fs::metadata(path) else {
        return false;
    };
    let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: for the journal and sec2 drivers the handle points to the `int` descriptor; the
    // stat buffer is a local.
    unsafe {
        if hdf5_sys::h5f::H5Fget_vfd_handle(fid, hdf5_sys::h5p::H5P_DEFAULT, &mut handle) < 0
            || handle.is_null()
        {
            return false;
        }
        let fd = *(handle as *const libc::c_int);
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) < 0 {
            return false;
        }
        st.st_dev == at_path.dev() && st.st_ino == at_path.ino()
    }
}

/// Which links of a group are copied.
#[derive(Clone, Copy)]
enum Rule {
    /// Name is a content hash and the dataset has this commit attribute.
    Keyed(&'static str),
    /// Name is a model name, not a `.tmp` leftover, and the dataset opens.
    Manifest,
    /// Any object that opens.
    Any,
}

/// Counts of one compaction's copy.
#[derive(Default)]
struct Copied {
    /// Objects copied, in the order of the groups in a new file: weights, metadata, deltas, models.
    per_group: [usize; 4],
    skipped: Vec<String>,
}

impl HDF5Store {
    /// Rewrites the store into a new file next to it and renames that into place, giving back
    /// the space of deleted and replaced objects (HDF5 never reuses it across closes by itself).
    ///
    /// Every committed weight, delta, manifest and `metadata/` entry is copied with its
    /// attributes; chunks are copied as stored (not decoded). Links that are not committed
    /// (interrupted writes) or whose names are not valid keys are left behind and listed in
    /// [`CompactReport::skipped`].
    ///
    /// Crash-safe: the old file stays valid and locked by this process until the new one,
    /// synced, is renamed over it; a process killed at any moment leaves one valid store at the
    /// path (a leftover `<store>.compact-tmp` is removed by the next compaction or open for
    /// writing). The store's mutex is held throughout, so no other call of this process
    /// interleaves; afterwards `self` works on the new file.
    ///
    /// Errors: [`StoreError::ReadOnly`] on a store opened read-only, [`StoreError::Closed`]
    /// after close; I/O and HDF5 failures name the path. On a failure before the rename the old
    /// file is the store and stays open; if the new file, renamed into place, then fails to
    /// open, the store is closed (reopen it). A failure to sync the directory after the rename
    /// is returned with the store already on the new file.
    pub fn compact(&self) -> Result<CompactReport> {
        let t0 = Instant::now();
        let loc = || self.path.display().to_string();
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let size = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| StoreError::backend(format!("compacting {}", loc()), e))
        };
        let io = |what: &str| {
            let what = format!("compacting {}: {what}", loc());
            move |e: std::io::Error| StoreError::backend(what, e)
        };
        let tmp = tmp_path(&self.path);
        h5::locked(|| {
            let (bytes_before, copied) = {
                let Some(inner) = guard.as_mut() else {
                    return Err(StoreError::Closed { location: loc() });
                };
                if !inner.writable {
                    return Err(StoreError::ReadOnly { location: loc() });
                }
                inner.ready(&self.path, &self.opts)?;
                if !names_file(inner.file.id(), &self.path) {
                    return Err(StoreError::backend(
                        format!("compacting {}", loc()),
                        std::io::Error::other(
                            "the path no longer names the file this store has open",
                        ),
                    ));
                }
                self.commit_now(inner)?;
                let old_meta = std::fs::metadata(&self.path)
                    .map_err(|e| StoreError::backend(format!("compacting {}", loc()), e))?;
                let bytes_before = old_meta.len();
                remove_stale_tmp(inner.file.id(), &self.path)?;
                let copied = self.write_copy(inner, &tmp).and_then(|c| {
                    // The new file gets the old one's permission bits.
                    std::fs::set_permissions(&tmp, old_meta.permissions())
                        .map_err(io(&format!("setting the permissions of {}", tmp.display())))?;
                    File::open(&tmp)
                        .and_then(|f| f.sync_all())
                        .map_err(io(&format!("syncing {}", tmp.display())))?;
                    // Nothing may reach the old file's journal from here on: once the new
                    // file has the path, `<path>.journal` is the new file's, and old bytes
                    // played back there would wreck it. The old file is committed (nothing
                    // was written to it since the flush) and its driver stops journaling;
                    // it is only read until it is closed below.
                    journal::retire(inner.file.id())
                        .map_err(io("retiring the old file's journal"))?;
                    Ok(c)
                });
                match copied {
                    Ok(c) => (bytes_before, c),
                    Err(e) => {
                        // The old file is still the store; the partial copy is of no use.
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            };
            // The new file is locked before it takes the path, so that no other writer gets
            // in between the rename and the open below.
            let new_lock = match journal::WriterLock::acquire(&tmp, false, self.opts.wait) {
                Ok(l) => l,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    if let Some(inner) = guard.as_mut() {
                        let _ = store::commit_reopen(&self.path, &self.opts, inner);
                    }
                    return Err(io(&format!("locking {}", tmp.display()))(e));
                }
            };
            // Loads that located chunks in the old file must not read them from the new one.
            self.space_epoch.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = std::fs::rename(&tmp, &self.path) {
                drop(new_lock);
                let _ = std::fs::remove_file(&tmp);
                // The old file is still the store: opened again, it is journaled again.
                if let Some(inner) = guard.as_mut() {
                    if let Err(e) = store::commit_reopen(&self.path, &self.opts, inner) {
                        tracing::warn!(path = %loc(), error = %e, "resuming the journal");
                        drop(guard.take());
                    }
                }
                return Err(io(&format!("renaming {} into place", tmp.display()))(e));
            }
            // The rename is the commit point; make it durable. (A failure here is reported
            // once the store is on the new file.)
            let dir = match self.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let dir_synced = File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&format!("syncing the directory {}", dir.display())));
            // Open the new file before closing the old one, so that this process holds a lock
            // on the store at every moment.
            let opts = self.opts.clone().mode(Mode::ReadWrite);
            let old = match store::open_file_locked(&self.path, &opts, Some(new_lock)) {
                Ok(new) => guard.replace(new),
                Err(e) => {
                    drop(guard.take());
                    return Err(e);
                }
            };
            if let Some(mut old) = old {
                // The last descriptor of the old, unlinked file is its reader's: closing it
                // frees the file's blocks and pages (about 0.25 s per GB), which need not hold
                // up the caller, so it is closed on a thread of its own.
                let reader = old.reader.take();
                if let Err(e) = old.close() {
                    tracing::warn!(path = %loc(), error = %e, "closing the file compacted away");
                }
                if let Some(reader) = reader {
                    // If no thread can be started, the closure (and the file) drops right here.
                    let _ = std::thread::Builder::new()
                        .name("coral-hdf5-release".to_owned())
                        .spawn(move || drop(reader));
                }
            }
            dir_synced?;
            let bytes_after = size(&self.path)?;
            let [weights, metadata, deltas, manifests] = copied.per_group;
            Ok(CompactReport {
                path: self.path.clone(),
                bytes_before,
                bytes_after,
                weights,
                deltas,
                manifests,
                metadata,
                skipped: copied.skipped,
                elapsed: t0.elapsed(),
            })
        })
    }

    /// Creates `tmp` as a new store and copies every committed object of `inner` into it;
    /// closes it. Call under the lock.
    fn write_copy(&self, inner: &Inner, tmp: &Path) -> Result<Copied> {
        let tmp_err = |e: H5Error| {
            StoreError::backend(
                format!(
                    "compacting {}: writing {}",
                    self.path.display(),
                    tmp.display()
                ),
                e,
            )
        };
        let ctmp = h5::cstr(&tmp.to_string_lossy()).map_err(tmp_err)?;
        let fcpl = h5::make_fcpl(self.opts.persistent_free_space).map_err(tmp_err)?;
        let fapl = h5::make_fapl(true).map_err(tmp_err)?;
        // SAFETY: valid C string and property lists.
        let fid = unsafe {
            hdf5_sys::h5f::H5Fcreate(
                ctmp.as_ptr(),
                hdf5_sys::h5f::H5F_ACC_EXCL,
                fcpl.id(),
                fapl.id(),
            )
        };
        let file =
            Hid::new(fid, Kind::File, || format!("creating {}", tmp.display())).map_err(tmp_err)?;
        store::set_cloexec(file.id());
        h5::use_v110_objects(file.id()).map_err(tmp_err)?;
        // The groups of a new store, in the same order, with the same name heaps.
        let mut dst = Vec::with_capacity(4);
        for g in [WEIGHTS, METADATA, DELTAS, MODELS] {
            dst.push(h5::create_group(file.id(), g, store::heap_hint(g)).map_err(tmp_err)?);
        }
        // SAFETY: a new property list of the object-copy class (default flags: attributes
        // copied, nothing expanded).
        let ocpypl = Hid::new(
            unsafe { hdf5_sys::h5p::H5Pcreate(*hdf5_sys::h5p::H5P_CLS_OBJECT_COPY) },
            Kind::Plist,
            || "object copy properties".to_owned(),
        )
        .map_err(tmp_err)?;
        let metadata_src = if h5::link_exists(inner.file.id(), METADATA).map_err(|e| self.err(e))? {
            Some(h5::open_group(inner.file.id(), METADATA).map_err(|e| self.err(e))?)
        } else {
            None
        };
        let sources: [(&str, Option<hid_t>, Rule); 4] = [
            (WEIGHTS, Some(inner.weights.id()), Rule::Keyed("hash")),
            (METADATA, metadata_src.as_ref().map(Hid::id), Rule::Any),
            (
                DELTAS,
                inner.deltas.as_ref().map(Hid::id),
                Rule::Keyed("metadata"),
            ),
            (MODELS, inner.models.as_ref().map(Hid::id), Rule::Manifest),
        ];
        let mut copied = Copied::default();
        for (i, (group, src, rule)) in sources.into_iter().enumerate() {
            let Some(src) = src else { continue };
            let names = h5::link_names(src).map_err(|e| self.err(e))?;
            for name in names {
                if let Some(reason) = self.skip_reason(src, &name, rule)? {
                    copied.skipped.push(format!("{group}/{name}: {reason}"));
                    continue;
                }
                copy_object(src, &name, dst[i].id(), ocpypl.id()).map_err(&tmp_err)?;
                copied.per_group[i] += 1;
            }
        }
        drop((ocpypl, metadata_src, dst));
        file.close().map_err(tmp_err)?;
        if !copied.skipped.is_empty() {
            tracing::info!(path = %self.path.display(), skipped = ?copied.skipped, "compaction left links behind");
        }
        Ok(copied)
    }

    /// Why `group/name` is not copied (`None`: it is). Call under the lock.
    fn skip_reason(&self, group: hid_t, name: &str, rule: Rule) -> Result<Option<&'static str>> {
        Ok(match rule {
            Rule::Keyed(marker) => {
                if ContentHash::parse(name).is_err() {
                    Some("not a key")
                } else if !self.committed(group, name, marker)? {
                    Some("not committed (an interrupted write)")
                } else {
                    None
                }
            }
            Rule::Manifest => {
                if name.ends_with(".tmp") {
                    Some("leftover of a manifest write")
                } else if ModelName::new(name).is_err() {
                    Some("not a model name")
                } else if h5::open_dataset(group, name).is_err() {
                    Some("does not open (an interrupted write)")
                } else {
                    None
                }
            }
            Rule::Any => {
                if object_opens(group, name) {
                    None
                } else {
                    Some("does not open")
                }
            }
        })
    }
}

/// True when `group/name` names an object that opens.
fn object_opens(group: hid_t, name: &str) -> bool {
    let Ok(c) = h5::cstr(name) else {
        return false;
    };
    // SAFETY: valid group id and C string; the object is closed right away.
    unsafe {
        let o = hdf5_sys::h5o::H5Oopen(group, c.as_ptr(), hdf5_sys::h5p::H5P_DEFAULT);
        if o < 0 {
            return false;
        }
        hdf5_sys::h5o::H5Oclose(o);
    }
    true
}

/// Copies `src/name` (with its attributes; chunks as stored) to `dst/name`.
fn copy_object(
    src: hid_t,
    name: &str,
    dst: hid_t,
    ocpypl: hid_t,
) -> std::result::Result<(), H5Error> {
    let c = h5::cstr(name)?;
    // SAFETY: valid ids and C string.
    h5::check(
        unsafe {
            hdf5_sys::h5o::H5Ocopy(
                src,
                c.as_ptr(),
                dst,
                c.as_ptr(),
                ocpypl,
                hdf5_sys::h5p::H5P_DEFAULT,
            )
        },
        || format!("copying {name}"),
    )
}
