//! A rollback journal, durable commits and reader/writer locks under HDF5: the `coral-journal`
//! virtual file driver.
//!
//! HDF5 1.10 rewrites metadata (object headers, B-tree nodes, local heaps, the superblock) in
//! place when it flushes, so a process killed or a machine losing power inside `H5Fflush` could
//! leave a half-updated file. This driver does plain POSIX I/O like HDF5's `sec2` driver, with
//! three differences.
//!
//! **Writes below the committed size wait for the commit.** `committed_eof` is the file's size
//! at the last commit. A metadata write that would change bytes below it is kept in memory
//! (`pending`, read back by later reads) until [`commit`]. Raw data (chunks) goes straight to
//! the file: Coral never rewrites a stored chunk, so a chunk below `committed_eof` lands in
//! space that was free at the last commit, which no committed object refers to. After a delete
//! in the same transaction ([`note_free`]) that no longer holds, and such raw writes are
//! journaled (old bytes saved, and synced, before the write) like a rollback journal.
//!
//! **A commit has an order.** The store commits by closing the file (and opening it again:
//! HDF5's persistent free-space records are written only then), and the driver commits when
//! HDF5 closes it, after HDF5 has written everything:
//! 1. write the journal `<file>.journal`: the current (committed) bytes of every pending region,
//!    then `fsync` it and the folder;
//! 2. wait for readers to leave (below), write the pending regions in place, `fdatasync` the
//!    file: this makes the in-place bytes durable together with every byte written past
//!    `committed_eof` since the last commit (new chunks, new metadata), which nothing
//!    committed refers to until then;
//! 3. remove the journal and `fsync` the folder: **the commit point**; a cut before it finds
//!    the journal, synced in step 1, and rolls back;
//! 4. cut the file to HDF5's end of allocation when that shrank (the cut bytes are free in the
//!    new committed state, so this needs no journal).
//!
//! No sync of the new bytes is needed before step 1: until the journal is gone, a power cut
//! rolls back, whatever of them reached the disk. `tests/powercut.rs` checks the order by
//! rebuilding the disk as cuts would leave it (and fails when the journal's sync is skipped).
//!
//! With durability off ([`OpenConfig::durable`]) the syncs are skipped and the order is the same, which
//! still survives the death of the process (the kernel keeps every completed `write()`).
//!
//! [`recover`] (run when a file is opened) plays a journal back and cuts the file to the
//! committed size, which brings it back to its last commit. A torn journal (power lost before
//! step 2's sync) holds records whose bytes still equal the file's: restoring them is harmless.
//!
//! **Locks.** A writer holds `flock(LOCK_EX)` on the file for as long as it is open (h5py's
//! HDF5 takes the same lock, so h5py readers and writers are kept out too); a second writer
//! waits for it, up to the open's wait time. Coral's readers take no `flock`: they hold a shared
//! open-file-description lock on byte [`READERS`] while open, taken through byte [`PENDING`]
//! (SQLite's scheme). A committing writer takes both exclusively for steps 3 and 4 only, so a
//! reader sees the last committed state whatever the writer is doing, and a writer's commit
//! waits for the readers open at that moment (new readers queue behind it). Who holds a lock
//! is read from `/proc/*/fdinfo` for the messages.
//!
//! Journal layout (little endian): header `b"CORALJ01"`, `u64` committed size; then records
//! `u64` offset, `u64` length, the old bytes, `u64` FNV-1a checksum of offset, length and bytes.
//!
//! **Libraries.** The driver's structures are declared here, from HDF5's headers, in two
//! layouts: that of 1.10.8's `H5FDpublic.h` (which differs from `hdf5-metno-sys`'s declarations
//! for 1.10: `terminate`, `get_eof(file, type)`, `lock(file, rw)`,
//! `H5FD_t::access_flags`/`paged_aggr`), and that of `H5FDdevelop.h` in 1.14 and 2.x (class
//! version 1; `hdf5-metno-sys` lacks its `version` field and the vector and selection
//! callbacks). [`driver`] picks the layout from the version the linked library reports, so one
//! build is right for whichever libhdf5 it is linked to, and returns `None` for a release it
//! does not know (1.12, before 1.10.8, 3.x): the store then refuses to write unless allowed.
//! `H5FD_t` is the same in all of them.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_uint, c_ulong, c_void};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdf5_sys::h5::{haddr_t, herr_t, hsize_t};
use hdf5_sys::h5fd::H5FD_mem_t;
use hdf5_sys::h5i::hid_t;

const MAGIC: &[u8; 8] = b"CORALJ01";
/// Bytes written between two requests to start writeback ([`JFile::start_writeback`]).
const WRITEBACK_BYTES: u64 = 8 << 20;
const HEADER: usize = 16;

/// The byte a reader locks shared while it holds the file open (an open-file-description lock,
/// far past any real file's end, so it never overlaps data).
pub(crate) const READERS: i64 = 1 << 62;
/// The byte a new reader passes through, and a committing writer holds, so that a writer
/// waiting for readers is not starved by new ones.
pub(crate) const PENDING: i64 = READERS + 1;

/// A `repr(C)` struct with the list of its field names in order (`FIELDS`), which a test
/// compares with the C declaration in the headers of the linked HDF5.
macro_rules! c_struct {
    ($(#[$m:meta])* struct $name:ident { $($(#[$fm:meta])* $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        #[repr(C)]
        struct $name { $($(#[$fm])* $f: $t,)* }
        impl $name {
            #[cfg(test)]
            const FIELDS: &'static [&'static str] = &[$(stringify!($f)),*];
        }
    };
}

c_struct! {
    /// `H5FD_t` of HDF5 1.10.8.
    struct FdT {
        driver_id: hid_t,
        cls: *const ClassT,
        fileno: c_ulong,
        access_flags: c_uint,
        feature_flags: c_ulong,
        maxaddr: haddr_t,
        base_addr: haddr_t,
        threshold: hsize_t,
        alignment: hsize_t,
        paged_aggr: u8,
    }
}

type Unused = Option<unsafe extern "C" fn()>;

c_struct! {
    /// `H5FD_class_t` of HDF5 1.10.8.
    struct ClassT {
        name: *const c_char,
        maxaddr: haddr_t,
        fc_degree: c_int,
        terminate: Unused,
        sb_size: Unused,
        sb_encode: Unused,
        sb_decode: Unused,
        fapl_size: usize,
        fapl_get: Unused,
        fapl_copy: Unused,
        fapl_free: Unused,
        dxpl_size: usize,
        dxpl_copy: Unused,
        dxpl_free: Unused,
        open: Option<unsafe extern "C" fn(*const c_char, c_uint, hid_t, haddr_t) -> *mut FdT>,
        close: Option<unsafe extern "C" fn(*mut FdT) -> herr_t>,
        cmp: Option<unsafe extern "C" fn(*const FdT, *const FdT) -> c_int>,
        query: Option<unsafe extern "C" fn(*const FdT, *mut c_ulong) -> herr_t>,
        get_type_map: Unused,
        alloc: Unused,
        free: Unused,
        get_eoa: Option<unsafe extern "C" fn(*const FdT, H5FD_mem_t) -> haddr_t>,
        set_eoa: Option<unsafe extern "C" fn(*mut FdT, H5FD_mem_t, haddr_t) -> herr_t>,
        get_eof: Option<unsafe extern "C" fn(*const FdT, H5FD_mem_t) -> haddr_t>,
        get_handle: Option<unsafe extern "C" fn(*mut FdT, hid_t, *mut *mut c_void) -> herr_t>,
        read: Option<
            unsafe extern "C" fn(*mut FdT, H5FD_mem_t, hid_t, haddr_t, usize, *mut c_void) -> herr_t,
        >,
        write: Option<
            unsafe extern "C" fn(*mut FdT, H5FD_mem_t, hid_t, haddr_t, usize, *const c_void) -> herr_t,
        >,
        flush: Option<unsafe extern "C" fn(*mut FdT, hid_t, u8) -> herr_t>,
        truncate: Option<unsafe extern "C" fn(*mut FdT, hid_t, u8) -> herr_t>,
        lock: Option<unsafe extern "C" fn(*mut FdT, u8) -> herr_t>,
        unlock: Option<unsafe extern "C" fn(*mut FdT) -> herr_t>,
        fl_map: [H5FD_mem_t; 7],
    }
}

c_struct! {
    /// `H5FD_class_t` of HDF5 1.14 and 2.x (`H5FDdevelop.h`, class version 1): 1.10.8's with a
    /// version and a driver number first, the vector and selection I/O callbacks after `write`,
    /// and `del` and `ctl` before the free-list map. Checked against the headers of HDF5 1.14.6
    /// and of the 2.2.0 that `hdf5-metno-src` builds (`tests/driver_layout.rs`).
    struct ClassT2 {
        version: c_uint,
        value: c_int,
        name: *const c_char,
        maxaddr: haddr_t,
        fc_degree: c_int,
        terminate: Unused,
        sb_size: Unused,
        sb_encode: Unused,
        sb_decode: Unused,
        fapl_size: usize,
        fapl_get: Unused,
        fapl_copy: Unused,
        fapl_free: Unused,
        dxpl_size: usize,
        dxpl_copy: Unused,
        dxpl_free: Unused,
        open: Option<unsafe extern "C" fn(*const c_char, c_uint, hid_t, haddr_t) -> *mut FdT>,
        close: Option<unsafe extern "C" fn(*mut FdT) -> herr_t>,
        cmp: Option<unsafe extern "C" fn(*const FdT, *const FdT) -> c_int>,
        query: Option<unsafe extern "C" fn(*const FdT, *mut c_ulong) -> herr_t>,
        get_type_map: Unused,
        alloc: Unused,
        free: Unused,
        get_eoa: Option<unsafe extern "C" fn(*const FdT, H5FD_mem_t) -> haddr_t>,
        set_eoa: Option<unsafe extern "C" fn(*mut FdT, H5FD_mem_t, haddr_t) -> herr_t>,
        get_eof: Option<unsafe extern "C" fn(*const FdT, H5FD_mem_t) -> haddr_t>,
        get_handle: Option<unsafe extern "C" fn(*mut FdT, hid_t, *mut *mut c_void) -> herr_t>,
        read: Option<
            unsafe extern "C" fn(*mut FdT, H5FD_mem_t, hid_t, haddr_t, usize, *mut c_void) -> herr_t,
        >,
        write: Option<
            unsafe extern "C" fn(*mut FdT, H5FD_mem_t, hid_t, haddr_t, usize, *const c_void) -> herr_t,
        >,
        /// HDF5 falls back to `read`/`write` per piece when these four are null.
        read_vector: Unused,
        write_vector: Unused,
        read_selection: Unused,
        write_selection: Unused,
        flush: Option<unsafe extern "C" fn(*mut FdT, hid_t, u8) -> herr_t>,
        truncate: Option<unsafe extern "C" fn(*mut FdT, hid_t, u8) -> herr_t>,
        lock: Option<unsafe extern "C" fn(*mut FdT, u8) -> herr_t>,
        unlock: Option<unsafe extern "C" fn(*mut FdT) -> herr_t>,
        del: Unused,
        ctl: Unused,
        fl_map: [H5FD_mem_t; 7],
    }
}

/// `H5FD_CLASS_VERSION` of HDF5 1.14 and 2.x.
const CLASS_VERSION: c_uint = 1;
/// The driver's number: HDF5 keeps 0-255 for its own drivers (`H5_VFD_RESERVED`).
const CLASS_VALUE: c_int = 0x0c07;

/// The class as the linked library lays it out.
enum Class {
    V110(ClassT),
    V114(ClassT2),
}
// SAFETY: the class is immutable after construction; its pointers are 'static.
unsafe impl Sync for Class {}
unsafe impl Send for Class {}

impl Class {
    /// The class for HDF5 `maj.min.rel`, or `None` for a release whose layout this driver
    /// does not know (1.12, anything before 1.10.8, 3.x and later).
    fn for_version(maj: c_uint, min: c_uint, rel: c_uint) -> Option<Class> {
        let fc_degree = hdf5_sys::h5f::H5F_close_degree_t::H5F_CLOSE_WEAK as c_int;
        let fl_map = hdf5_sys::h5fd::H5FD_FLMAP_DICHOTOMY;
        let name = c"coral-journal".as_ptr();
        match (maj, min) {
            (1, 10) if rel >= 8 => Some(Class::V110(ClassT {
                name,
                maxaddr: MAXADDR,
                fc_degree,
                terminate: None,
                sb_size: None,
                sb_encode: None,
                sb_decode: None,
                fapl_size: 0,
                fapl_get: None,
                fapl_copy: None,
                fapl_free: None,
                dxpl_size: 0,
                dxpl_copy: None,
                dxpl_free: None,
                open: Some(j_open),
                close: Some(j_close),
                cmp: Some(j_cmp),
                query: Some(j_query),
                get_type_map: None,
                alloc: None,
                free: None,
                get_eoa: Some(j_get_eoa),
                set_eoa: Some(j_set_eoa),
                get_eof: Some(j_get_eof),
                get_handle: Some(j_get_handle),
                read: Some(j_read),
                write: Some(j_write),
                flush: None,
                truncate: Some(j_truncate),
                lock: Some(j_lock),
                unlock: Some(j_unlock),
                fl_map,
            })),
            (1, 14) | (2, _) => Some(Class::V114(ClassT2 {
                version: CLASS_VERSION,
                value: CLASS_VALUE,
                name,
                maxaddr: MAXADDR,
                fc_degree,
                terminate: None,
                sb_size: None,
                sb_encode: None,
                sb_decode: None,
                fapl_size: 0,
                fapl_get: None,
                fapl_copy: None,
                fapl_free: None,
                dxpl_size: 0,
                dxpl_copy: None,
                dxpl_free: None,
                open: Some(j_open),
                close: Some(j_close),
                cmp: Some(j_cmp),
                query: Some(j_query),
                get_type_map: None,
                alloc: None,
                free: None,
                get_eoa: Some(j_get_eoa),
                set_eoa: Some(j_set_eoa),
                get_eof: Some(j_get_eof),
                get_handle: Some(j_get_handle),
                read: Some(j_read),
                write: Some(j_write),
                read_vector: None,
                write_vector: None,
                read_selection: None,
                write_selection: None,
                flush: None,
                truncate: Some(j_truncate),
                lock: Some(j_lock),
                unlock: Some(j_unlock),
                del: None,
                ctl: None,
                fl_map,
            })),
            _ => None,
        }
    }

    fn as_ptr(&self) -> *const c_void {
        match self {
            Class::V110(c) => c as *const ClassT as *const c_void,
            Class::V114(c) => c as *const ClassT2 as *const c_void,
        }
    }
}

/// One open file: HDF5's public part first, then ours.
#[repr(C)]
struct JFile {
    public: FdT,
    fd: c_int,
    eoa: u64,
    /// The file's size as HDF5 sees it: a cut waiting for the commit is already applied here.
    eof: u64,
    /// The file's size on disk: at least `committed_eof` until the commit (committed bytes are
    /// never cut before it), and at least `eof`; above `eof` by a cut waiting for the commit.
    len: u64,
    dev: u64,
    ino: u64,
    writable: bool,
    /// A write, sync or commit failed: nothing more is written or committed through this file,
    /// and closing it rolls it back to its last commit.
    failed: bool,
    /// This open holds the file's lock (an open that HDF5 will find shared with an earlier one
    /// of this process takes none).
    locked: bool,
    /// Sync in the documented order ([`set_durable`]).
    durable: bool,
    /// How long to wait for readers at a commit.
    wait: Duration,
    path: PathBuf,
    journal_path: PathBuf,
    journal: Option<File>,
    /// Bytes written to the open journal.
    journal_len: u64,
    committed_eof: u64,
    /// Metadata writes below `committed_eof`, in order; applied at the commit.
    pending: Vec<(u64, Vec<u8>)>,
    /// Bytes were written to the file since the last commit.
    dirty: bool,
    /// Bytes written since the kernel was last asked to start writing the file back
    /// ([`JFile::start_writeback`]).
    unstarted: u64,
}

const ACC_RDWR: c_uint = 0x1;
const ACC_TRUNC: c_uint = 0x2;
const ACC_EXCL: c_uint = 0x4;
const ACC_CREAT: c_uint = 0x10;
const MAXADDR: u64 = (1u64 << 63) - 1;

/// How the next file this thread opens waits and syncs: set by the store just before
/// `H5Fopen`/`H5Fcreate` (the driver takes no per-file info of its own).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenConfig {
    /// How long an open waits for another writer, and a commit for readers.
    pub wait: Duration,
    /// Sync in the documented order.
    pub durable: bool,
}

impl Default for OpenConfig {
    fn default() -> Self {
        OpenConfig {
            wait: Duration::from_secs(10),
            durable: true,
        }
    }
}

thread_local! {
    static CONFIG: RefCell<OpenConfig> = RefCell::new(OpenConfig::default());
    static LAST_ERROR: RefCell<Option<std::io::Error>> = const { RefCell::new(None) };
}

/// Sets how the files this thread opens next wait and sync.
pub(crate) fn configure(c: OpenConfig) {
    CONFIG.with(|x| *x.borrow_mut() = c);
}

/// The operating-system error behind the last failure of a driver call on this thread (a
/// failed write, sync or lock), taken: HDF5's own error stack does not carry `errno`.
pub(crate) fn take_error() -> Option<std::io::Error> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

fn set_error(e: std::io::Error) {
    LAST_ERROR.with(|x| *x.borrow_mut() = Some(e));
}

/// Inodes this process holds a driver lock on: a second open of one of them is a duplicate
/// that HDF5 shares with the first (and closes), so it must not wait for our own lock.
fn held() -> &'static Mutex<HashSet<(u64, u64)>> {
    static HELD: OnceLock<Mutex<HashSet<(u64, u64)>>> = OnceLock::new();
    HELD.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The journal file of `path`: `<path>.journal`.
pub(crate) fn journal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".journal");
    PathBuf::from(s)
}

/// The linked HDF5's version.
pub(crate) fn lib_version() -> (c_uint, c_uint, c_uint) {
    let (mut maj, mut min, mut rel) = (0, 0, 0);
    // SAFETY: out-pointers to locals.
    if unsafe { hdf5_sys::h5::H5get_libversion(&mut maj, &mut min, &mut rel) } < 0 {
        return (0, 0, 0);
    }
    (maj, min, rel)
}

/// The driver's id, registered on first use; `None` when the linked HDF5 is a release whose
/// driver class layout this driver does not know (see [`Class::for_version`]), or when
/// registering failed. Call under the HDF5 lock.
pub(crate) fn driver() -> Option<hid_t> {
    static ID: OnceLock<Option<hid_t>> = OnceLock::new();
    static CLASS: OnceLock<Option<Class>> = OnceLock::new();
    #[cfg(feature = "testing")]
    if record::without_driver() {
        return None;
    }
    *ID.get_or_init(|| {
        let (maj, min, rel) = lib_version();
        let Some(cls) = CLASS
            .get_or_init(|| Class::for_version(maj, min, rel))
            .as_ref()
        else {
            tracing::warn!(
                "HDF5 {maj}.{min}.{rel}: the journal driver knows 1.10.8+, 1.14 and 2.x; \
                 writes are not crash-safe"
            );
            return None;
        };
        // SAFETY: the class lives for the whole process, laid out as this release expects
        // (`Class::for_version`); HDF5 copies it.
        let id = unsafe { hdf5_sys::h5fd::H5FDregister(cls.as_ptr() as *const _) };
        if id < 0 {
            tracing::warn!("HDF5 {maj}.{min}.{rel}: registering the journal driver failed");
        }
        (id >= 0).then_some(id)
    })
}

/// Sets the journal driver on a file access property list (no-op without the driver).
pub(crate) fn set_driver(fapl: hid_t) -> bool {
    match driver() {
        // SAFETY: a valid fapl; the driver takes no info.
        Some(id) => unsafe { hdf5_sys::h5p::H5Pset_driver(fapl, id, std::ptr::null()) >= 0 },
        None => true,
    }
}

/// True when a write, sync or commit through `fid` failed: the file is rolled back to its last
/// commit when it closes, and flushing it again only fails again. Call under the HDF5 lock.
pub(crate) fn is_failed(fid: hid_t) -> bool {
    // SAFETY: the pointer comes from our driver's open file, alive while `fid` is open; the
    // HDF5 lock serialises every callback.
    file_of(fid).is_some_and(|jf| unsafe { (*jf).failed })
}

/// Commits `fid` (what the driver still holds for it) and stops journaling it: later writes go to
/// the file unrecorded. For a file about to be replaced by a rename over its path (a
/// compaction): from then on `<path>.journal` belongs to the new file, so nothing of the old
/// one may be written there, not even by the writes HDF5 makes when it closes the old file.
/// The file opened again is journaled again. Files on other drivers are left alone. Call
/// under the HDF5 lock.
pub(crate) fn retire(fid: hid_t) -> std::io::Result<()> {
    let Some(jf) = file_of(fid) else {
        return Ok(());
    };
    // SAFETY: the pointer comes from our driver's open file, alive while `fid` is open; the
    // HDF5 lock serialises every callback.
    let jf = unsafe { &mut *jf };
    jf.commit()?;
    // `save` journals only bytes below the committed size.
    jf.committed_eof = 0;
    Ok(())
}

fn file_of(fid: hid_t) -> Option<*mut JFile> {
    let id = driver()?;
    // SAFETY: plain HDF5 calls on a file id; the handle of our driver points to `JFile::fd`.
    unsafe {
        let fapl = hdf5_sys::h5f::H5Fget_access_plist(fid);
        if fapl < 0 {
            return None;
        }
        let drv = hdf5_sys::h5p::H5Pget_driver(fapl);
        hdf5_sys::h5p::H5Pclose(fapl);
        if drv != id {
            return None;
        }
        let mut handle: *mut c_void = std::ptr::null_mut();
        if hdf5_sys::h5f::H5Fget_vfd_handle(fid, hdf5_sys::h5p::H5P_DEFAULT, &mut handle) < 0
            || handle.is_null()
        {
            return None;
        }
        let off = std::mem::offset_of!(JFile, fd);
        Some((handle as *mut u8).sub(off) as *mut JFile)
    }
}

impl JFile {
    fn commit(&mut self) -> std::io::Result<()> {
        if self.failed {
            return Err(std::io::Error::other(
                "an earlier write to this file failed; it is rolled back to its last commit when closed",
            ));
        }
        let r = self.commit_inner();
        if let Err(e) = &r {
            self.failed = true;
            set_error(std::io::Error::new(e.kind(), e.to_string()));
        }
        r
    }

    fn commit_inner(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() && !self.dirty && self.journal.is_none() && self.len == self.eof
        {
            self.committed_eof = self.eof;
            return Ok(());
        }
        // 1. The committed bytes of every pending region, durable before any is overwritten.
        let pending = std::mem::take(&mut self.pending);
        for (off, data) in &pending {
            let end = off.saturating_add(data.len() as u64);
            self.save(*off, end)?;
        }
        if let Some(j) = &self.journal {
            if self.durable {
                fsync_journal(j, &self.journal_path)?;
                sync_dir(&self.journal_path)?;
            }
        }
        // 2. Readers out, the new bytes in place (with the bytes written since the last
        //    commit, made durable by the same sync).
        let guard = lock_out_readers(self.fd, self.wait, &self.path)?;
        for (off, data) in &pending {
            pwrite_full(self.fd, data, *off)?;
        }
        if self.durable && (self.dirty || !pending.is_empty()) {
            fdatasync(self.fd)?;
        }
        // 3. The commit point.
        if self.journal.take().is_some() {
            remove_journal(&self.journal_path)?;
            if self.durable {
                sync_dir(&self.journal_path)?;
            }
        }
        drop(guard);
        // 4. Space HDF5 gave back at the end is free in the new state: cut it. (To HDF5's size
        //    now, not to where it first gave space back: 2.x gives space at the end back, then
        //    allocates and writes it again before a close, and those bytes are in the new
        //    state.)
        if self.len > self.eof {
            set_len_fd(self.fd, self.eof)?;
            self.len = self.eof;
        }
        self.dirty = false;
        self.committed_eof = self.eof;
        Ok(())
    }

    /// With durability on, asks the kernel to start writing the file's dirty pages back once
    /// [`WRITEBACK_BYTES`] were written since the last ask (`sync_file_range` with
    /// `SYNC_FILE_RANGE_WRITE`: it waits for no write to finish). The commit's `fdatasync`
    /// then finds most of a large add on the disk already instead of writing it all while the
    /// add waits (75 MB took 36 ms here). It changes nothing the commit relies on: the pages
    /// the file has are the ones any crash may find written; metadata waiting for the commit
    /// is not in them. A failure is ignored: the commit's sync still writes everything.
    fn start_writeback(&mut self, written: u64) {
        if !self.durable {
            return;
        }
        self.unstarted = self.unstarted.saturating_add(written);
        if self.unstarted < WRITEBACK_BYTES {
            return;
        }
        self.unstarted = 0;
        #[cfg(target_os = "linux")]
        // SAFETY: a valid descriptor; offset 0 and length 0 name the whole file.
        unsafe {
            libc::sync_file_range(self.fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Appends the bytes of the file in `[addr, end)` (clipped to the committed size) to the
    /// journal, before they are overwritten.
    fn save(&mut self, addr: u64, end: u64) -> std::io::Result<()> {
        let end = end.min(self.committed_eof);
        if addr >= end {
            return Ok(());
        }
        let len = usize::try_from(end - addr).map_err(std::io::Error::other)?;
        let mut rec = Vec::with_capacity(len + 24);
        rec.extend_from_slice(&addr.to_le_bytes());
        rec.extend_from_slice(&(len as u64).to_le_bytes());
        rec.resize(16 + len, 0);
        let got = pread_full(self.fd, &mut rec[16..], addr)?;
        rec.truncate(16 + got);
        rec[8..16].copy_from_slice(&(got as u64).to_le_bytes());
        let sum = fnv(&rec);
        rec.extend_from_slice(&sum.to_le_bytes());
        if self.journal.is_none() {
            record::op(|| record::DiskOp::Create {
                path: self.journal_path.clone(),
            });
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.journal_path)?;
            let mut h = Vec::with_capacity(HEADER);
            h.extend_from_slice(MAGIC);
            h.extend_from_slice(&self.committed_eof.to_le_bytes());
            pwrite_full(f.as_raw_fd(), &h, 0)?;
            self.journal_len = HEADER as u64;
            self.journal = Some(f);
        }
        match self.journal.as_ref() {
            Some(f) => {
                pwrite_full(f.as_raw_fd(), &rec, self.journal_len)?;
                self.journal_len += rec.len() as u64;
                Ok(())
            }
            None => Err(std::io::Error::other("journal not open")),
        }
    }

    /// Journals and writes raw bytes that land below the committed size. The region may hold
    /// committed bytes (a global heap collection HDF5 rewrites, space a delete in this
    /// transaction freed), so the old bytes reach the journal, and with durability the disk,
    /// before the new ones reach the file.
    fn write_journaled(&mut self, addr: u64, b: &[u8]) -> std::io::Result<()> {
        let end = addr.saturating_add(b.len() as u64);
        self.save(addr, end)?;
        if self.durable {
            if let Some(j) = &self.journal {
                fsync_journal(j, &self.journal_path)?;
                sync_dir(&self.journal_path)?;
            }
        }
        pwrite_full(self.fd, b, addr)
    }

    /// Keeps a metadata write below the committed size for the commit.
    fn defer(&mut self, addr: u64, b: &[u8]) {
        if let Some(slot) = self
            .pending
            .iter_mut()
            .find(|(o, d)| *o == addr && d.len() == b.len())
        {
            slot.1.copy_from_slice(b);
        } else {
            self.pending.push((addr, b.to_vec()));
        }
    }

    /// Rolls the file back to its last commit (closing after a failure): plays back the
    /// journal when there is one, then cuts what was written past the committed size.
    fn roll_back(&mut self) -> std::io::Result<()> {
        self.pending.clear();
        self.journal = None;
        if self.journal_path.exists() {
            rollback_fd(self.fd, &self.journal_path, self.wait, &self.path)?;
        } else {
            set_len_fd(self.fd, self.committed_eof)?;
            self.len = self.committed_eof;
        }
        Ok(())
    }
}

fn fdatasync(fd: c_int) -> std::io::Result<()> {
    record::op(|| record::DiskOp::Sync {
        path: record::path_of(fd),
    });
    // SAFETY: a valid descriptor.
    if unsafe { libc::fdatasync(fd) } < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Syncs a journal's contents.
fn fsync_journal(j: &File, path: &Path) -> std::io::Result<()> {
    record::op(|| record::DiskOp::Sync {
        path: path.to_path_buf(),
    });
    j.sync_all()
}

/// Sets the size of the file behind `fd`.
fn set_len_fd(fd: c_int, len: u64) -> std::io::Result<()> {
    record::op(|| record::DiskOp::SetLen {
        path: record::path_of(fd),
        len,
    });
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: a valid descriptor.
    if unsafe { libc::ftruncate(fd, len) } < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes a journal.
fn remove_journal(path: &Path) -> std::io::Result<()> {
    record::op(|| record::DiskOp::Remove {
        path: path.to_path_buf(),
    });
    std::fs::remove_file(path)
}

/// Syncs the folder holding `path`, so that a file created or removed there stays so.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    record::op(|| record::DiskOp::SyncDir {
        dir: dir.to_path_buf(),
    });
    File::open(dir)?.sync_all()
}

/// A record of every change the driver makes to files, in order, for the power-cut simulation
/// (`tests/powercut.rs`): with the `testing` feature, [`record::start`] turns it on for the
/// whole process. Without the feature every hook is empty.
pub(crate) mod record {
    use std::path::PathBuf;

    /// One change to the disk's state, as the kernel sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub enum DiskOp {
        /// Bytes written at an offset.
        Write {
            /// The file.
            path: PathBuf,
            /// Where.
            off: u64,
            /// What.
            data: Vec<u8>,
        },
        /// The file cut or grown to a size.
        SetLen {
            /// The file.
            path: PathBuf,
            /// The new size.
            len: u64,
        },
        /// `fsync`/`fdatasync`: every earlier change to the file is durable.
        Sync {
            /// The file.
            path: PathBuf,
        },
        /// A file created empty (or emptied).
        Create {
            /// The file.
            path: PathBuf,
        },
        /// A file removed.
        Remove {
            /// The file.
            path: PathBuf,
        },
        /// A folder synced: every earlier creation and removal in it is durable.
        SyncDir {
            /// The folder.
            dir: PathBuf,
        },
        /// A mark of the caller's ("batch 3 returned").
        Mark(String),
    }

    #[cfg(feature = "testing")]
    static LOG: std::sync::Mutex<Option<Vec<DiskOp>>> = std::sync::Mutex::new(None);

    /// Records `op()` when recording is on.
    #[cfg(feature = "testing")]
    pub(crate) fn op(op: impl FnOnce() -> DiskOp) {
        let mut g = LOG.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = g.as_mut() {
            log.push(op());
        }
    }

    #[cfg(not(feature = "testing"))]
    #[inline(always)]
    pub(crate) fn op(_op: impl FnOnce() -> DiskOp) {}

    /// The path behind a descriptor (only ever asked while recording).
    pub(crate) fn path_of(fd: std::os::raw::c_int) -> PathBuf {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default()
    }

    #[cfg(feature = "testing")]
    static WITHOUT_DRIVER: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    /// Makes this process behave as if the linked HDF5 had no journal driver (`true`), as on a
    /// release whose driver layout Coral does not know: the refusal to write, and writing
    /// without the journal when allowed, are tested on any library this way.
    #[cfg(feature = "testing")]
    pub fn without_journal(on: bool) {
        WITHOUT_DRIVER.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(feature = "testing")]
    pub(crate) fn without_driver() -> bool {
        WITHOUT_DRIVER.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts recording (dropping what was recorded before).
    #[cfg(feature = "testing")]
    pub fn start() {
        *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Adds a mark of the caller's to the record.
    #[cfg(feature = "testing")]
    pub fn mark(text: impl Into<String>) {
        let text = text.into();
        op(move || DiskOp::Mark(text));
    }

    /// Stops recording and returns the record.
    #[cfg(feature = "testing")]
    pub fn stop() -> Vec<DiskOp> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }
}

/// An open-file-description lock on one byte: `F_RDLCK`, `F_WRLCK` or `F_UNLCK`. Returns
/// `Ok(false)` when another open holds a conflicting lock.
fn ofd_lock(fd: c_int, byte: i64, kind: c_int) -> std::io::Result<bool> {
    // SAFETY: an all-zero flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: a valid descriptor and lock description.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

/// Polls `attempt` until it succeeds or `wait` has passed.
fn wait_for(
    wait: Duration,
    mut attempt: impl FnMut() -> std::io::Result<bool>,
) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(2);
    loop {
        if attempt()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Who else holds a lock on the file behind `fd`, as "writer (pid 12)" or "reader (pid 34)".
fn holders(fd: c_int) -> String {
    // SAFETY: a valid descriptor and an out struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return "another process".to_owned();
    }
    let me = std::process::id();
    let mut found = Vec::new();
    for (pid, line) in lock_lines(st.st_dev, st.st_ino) {
        if pid == me {
            continue;
        }
        // "1: FLOCK  ADVISORY  WRITE 123 08:01:456 0 EOF" or "...OFDLCK ADVISORY READ -1 ..."
        let role = if line.contains("FLOCK") && line.contains("WRITE") {
            "writer"
        } else if line.contains("OFDLCK") && line.contains("WRITE") {
            "committing writer"
        } else {
            "reader"
        };
        let s = format!("{role} (pid {pid})");
        if !found.contains(&s) {
            found.push(s);
        }
    }
    if found.is_empty() {
        "another process".to_owned()
    } else {
        found.join(", ")
    }
}

/// The `lock:` lines of every process's open files that name this inode, with the pid.
fn lock_lines(dev: u64, ino: u64) -> Vec<(u32, String)> {
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    let tag = format!("{major:02x}:{minor:02x}:{ino} ");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for f in fds.flatten() {
            let Ok(text) = std::fs::read_to_string(f.path()) else {
                continue;
            };
            for line in text
                .lines()
                .filter(|l| l.starts_with("lock:") && l.contains(&tag))
            {
                out.push((pid, line.to_owned()));
            }
        }
    }
    out
}

/// Holds bytes [`PENDING`] and [`READERS`] exclusively while a commit writes in place.
struct ReadersOut(c_int);

impl Drop for ReadersOut {
    fn drop(&mut self) {
        let _ = ofd_lock(self.0, READERS, libc::F_UNLCK);
        let _ = ofd_lock(self.0, PENDING, libc::F_UNLCK);
    }
}

/// Takes [`PENDING`] (new readers wait), then [`READERS`] once the readers open now are gone.
fn lock_out_readers(fd: c_int, wait: Duration, path: &Path) -> std::io::Result<ReadersOut> {
    let busy = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "held by {}: {what} for {:.0} s ({})",
                holders(fd),
                wait.as_secs_f64(),
                path.display()
            ),
        )
    };
    if !wait_for(wait, || ofd_lock(fd, PENDING, libc::F_WRLCK))? {
        return Err(busy("waited to commit"));
    }
    let guard = ReadersOut(fd);
    if !wait_for(wait, || ofd_lock(fd, READERS, libc::F_WRLCK))? {
        return Err(busy("waited for its readers to close it"));
    }
    Ok(guard)
}

/// Takes the reader locks on `fd`: through [`PENDING`], then [`READERS`] shared, held until the
/// descriptor closes.
fn lock_as_reader(fd: c_int, wait: Duration) -> std::io::Result<()> {
    let busy = || {
        std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "being committed by {}: waited {:.0} s to read it",
                holders(fd),
                wait.as_secs_f64()
            ),
        )
    };
    if !wait_for(wait, || ofd_lock(fd, PENDING, libc::F_RDLCK))? {
        return Err(busy());
    }
    let got = wait_for(wait, || ofd_lock(fd, READERS, libc::F_RDLCK));
    let _ = ofd_lock(fd, PENDING, libc::F_UNLCK);
    if !got? {
        return Err(busy());
    }
    Ok(())
}

/// Takes the writer lock (`flock(LOCK_EX)`) on `fd`, waiting up to `wait`.
fn lock_as_writer(fd: c_int, wait: Duration) -> std::io::Result<()> {
    let got = wait_for(wait, || {
        // SAFETY: our descriptor.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(false),
            _ => Err(e),
        }
    })?;
    if got {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "held by {}: waited {:.0} s to write it",
                holders(fd),
                wait.as_secs_f64()
            ),
        ))
    }
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Runs `f` on `fd` as a `File` without taking ownership of the descriptor.
fn with_fd<R>(fd: c_int, f: impl FnOnce(&File) -> R) -> R {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an open descriptor owned by the caller for the whole call; ManuallyDrop
    // keeps the File from closing it.
    let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    f(&file)
}

/// Reads from `off` until `buf` is full or the end of the file; returns the bytes read.
fn pread_full(fd: c_int, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    with_fd(fd, |file| {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    })
}

/// Writes all of `buf` at `off`.
fn pwrite_full(fd: c_int, buf: &[u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    record::op(|| record::DiskOp::Write {
        path: record::path_of(fd),
        off,
        data: buf.to_vec(),
    });
    // In pieces of 1 MiB: one write of megabytes into the page cache costs several times the
    // system time of the same bytes in smaller pieces (`dd bs=64M` against `bs=1M`: 2.5 s
    // against 0.4 s of system time for 1.1 GB on the bench machine).
    with_fd(fd, |file| {
        let mut at = off;
        for piece in buf.chunks(1 << 20) {
            file.write_all_at(piece, at)?;
            at += piece.len() as u64;
        }
        Ok(())
    })
}

fn fstat_fd(fd: c_int) -> std::io::Result<libc::stat> {
    // SAFETY: a valid descriptor and an out struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Opens `name` for the driver and takes its lock: a writer's `flock`, waiting for another
/// writer, then checks that the path still names the file it locked (a `compact` may have
/// renamed a new file over it meanwhile) and rolls back a journal a dead writer left; a
/// reader's shared lock. Returns the descriptor and whether it holds a lock.
fn open_locked(
    cname: &std::ffi::CStr,
    flags: c_uint,
    path: &Path,
) -> std::io::Result<(c_int, bool)> {
    let writable = flags & ACC_RDWR != 0;
    let cfg = CONFIG.with(|c| *c.borrow());
    for _ in 0..5 {
        let mut o = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        } | libc::O_CLOEXEC;
        if flags & ACC_CREAT != 0 {
            o |= libc::O_CREAT;
        }
        if flags & ACC_EXCL != 0 {
            o |= libc::O_EXCL;
        }
        // SAFETY: a valid C string. O_TRUNC waits for the lock (below): truncating first
        // would destroy a file another writer is using.
        let fd = unsafe { libc::open(cname.as_ptr(), o, 0o666 as c_uint) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let close = |e: std::io::Error| {
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            e
        };
        let st = fstat_fd(fd).map_err(close)?;
        let id = (st.st_dev, st.st_ino);
        let duplicate = held()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id);
        if duplicate {
            return Ok((fd, false));
        }
        if writable {
            lock_as_writer(fd, cfg.wait).map_err(close)?;
            // The path must still name what we locked.
            match std::fs::metadata(path) {
                Ok(m) if (m.dev(), m.ino()) == id => {}
                _ => {
                    // SAFETY: our descriptor (closing it releases the lock).
                    unsafe { libc::close(fd) };
                    continue;
                }
            }
            if flags & ACC_TRUNC != 0 {
                let _ = remove_journal(&journal_path(path));
                set_len_fd(fd, 0).map_err(close)?;
            } else if journal_path(path).exists() {
                rollback_fd(fd, &journal_path(path), cfg.wait, path).map_err(close)?;
            }
        } else {
            lock_as_reader(fd, cfg.wait).map_err(close)?;
            // A journal with no live writer: a writer died while committing, and the file may
            // be half written. Roll it back (which needs the readers' lock) and start again.
            if journal_path(path).exists() && !writer_alive(fd) {
                // SAFETY: our descriptor (closing it releases the reader lock).
                unsafe { libc::close(fd) };
                recover(path)?;
                continue;
            }
        }
        held().lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        return Ok((fd, true));
    }
    Err(std::io::Error::other(format!(
        "{} kept changing while it was being opened",
        path.display()
    )))
}

/// The writer lock of a store, held by the store itself for as long as it is open, so that it
/// stays held while the store closes and reopens its file at each commit: `flock(LOCK_EX)` on a
/// descriptor of the file, which the driver then recognises as this process's own.
#[derive(Debug)]
pub(crate) struct WriterLock {
    file: File,
    id: (u64, u64),
}

impl WriterLock {
    /// Opens (creating it when `create`) and locks `path`, waiting up to `wait` for another
    /// writer; checks that the path still names the file locked (a compact may rename a new
    /// file over it meanwhile), then rolls back a journal a dead writer left.
    pub(crate) fn acquire(
        path: &Path,
        create: bool,
        wait: Duration,
    ) -> std::io::Result<WriterLock> {
        for _ in 0..5 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)?;
            let fd = file.as_raw_fd();
            lock_as_writer(fd, wait)?;
            let m = file.metadata()?;
            let id = (m.dev(), m.ino());
            match std::fs::metadata(path) {
                Ok(now) if (now.dev(), now.ino()) == id => {}
                _ => continue,
            }
            if journal_path(path).exists() {
                rollback_fd(fd, &journal_path(path), wait, path)?;
            }
            held().lock().unwrap_or_else(|e| e.into_inner()).insert(id);
            return Ok(WriterLock { file, id });
        }
        Err(std::io::Error::other(format!(
            "{} kept changing while it was being opened",
            path.display()
        )))
    }

    /// The locked file's size.
    pub(crate) fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        held()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// True when some process holds the writer lock (`flock`) on the file behind `fd`.
fn writer_alive(fd: c_int) -> bool {
    // SAFETY: our descriptor; a lock we get is released at once.
    unsafe {
        if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
            libc::flock(fd, libc::LOCK_UN);
            false
        } else {
            true
        }
    }
}

unsafe extern "C" fn j_open(
    name: *const c_char,
    flags: c_uint,
    _fapl: hid_t,
    maxaddr: haddr_t,
) -> *mut FdT {
    if name.is_null() || maxaddr == 0 || maxaddr > MAXADDR {
        return std::ptr::null_mut();
    }
    // SAFETY: HDF5 passes a NUL-terminated name.
    let cname = unsafe { std::ffi::CStr::from_ptr(name) };
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(cname.to_bytes())).to_path_buf();
    let (fd, locked) = match open_locked(cname, flags, &path) {
        Ok(x) => x,
        Err(e) => {
            set_error(e);
            return std::ptr::null_mut();
        }
    };
    let st = match fstat_fd(fd) {
        Ok(st) => st,
        Err(e) => {
            set_error(e);
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            return std::ptr::null_mut();
        }
    };
    let cfg = CONFIG.with(|c| *c.borrow());
    let eof = st.st_size as u64;
    let jf = Box::new(JFile {
        // SAFETY: all-zero is a valid FdT (HDF5 fills it in after open).
        public: unsafe { std::mem::zeroed() },
        fd,
        eoa: 0,
        eof,
        len: eof,
        dev: st.st_dev,
        ino: st.st_ino,
        writable: flags & ACC_RDWR != 0,
        failed: false,
        locked,
        durable: cfg.durable,
        wait: cfg.wait,
        journal_path: journal_path(&path),
        path,
        journal: None,
        journal_len: 0,
        committed_eof: eof,
        pending: Vec::new(),
        dirty: false,
        unstarted: 0,
    });
    Box::into_raw(jf) as *mut FdT
}

unsafe extern "C" fn j_close(f: *mut FdT) -> herr_t {
    // SAFETY: `f` was made by `j_open` and HDF5 closes it once.
    let mut jf = unsafe { Box::from_raw(f as *mut JFile) };
    // HDF5 has written everything by now; unless a write failed, the file is consistent.
    let done = if !jf.writable {
        Ok(())
    } else if jf.failed {
        jf.roll_back()
    } else {
        // A commit that fails part way leaves its journal: roll back to the last commit.
        jf.commit().inspect_err(|_| {
            let _ = jf.roll_back();
        })
    };
    if jf.locked {
        held()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(jf.dev, jf.ino));
    }
    // SAFETY: our descriptor; closing it releases its locks.
    let r = unsafe { libc::close(jf.fd) };
    match done {
        Err(e) => {
            set_error(e);
            -1
        }
        Ok(()) if r < 0 => -1,
        Ok(()) => 0,
    }
}

unsafe extern "C" fn j_cmp(a: *const FdT, b: *const FdT) -> c_int {
    // SAFETY: both are our files.
    let (a, b) = unsafe { (&*(a as *const JFile), &*(b as *const JFile)) };
    match (a.dev, a.ino).cmp(&(b.dev, b.ino)) {
        std::cmp::Ordering::Less => -1,
        std::cmp::Ordering::Equal => 0,
        std::cmp::Ordering::Greater => 1,
    }
}

unsafe extern "C" fn j_query(_f: *const FdT, flags: *mut c_ulong) -> herr_t {
    if !flags.is_null() {
        let v = hdf5_sys::h5fd::H5FD_FEAT_AGGREGATE_METADATA
            | hdf5_sys::h5fd::H5FD_FEAT_ACCUMULATE_METADATA
            | hdf5_sys::h5fd::H5FD_FEAT_DATA_SIEVE
            | hdf5_sys::h5fd::H5FD_FEAT_AGGREGATE_SMALLDATA
            | hdf5_sys::h5fd::H5FD_FEAT_POSIX_COMPAT_HANDLE
            | hdf5_sys::h5fd::H5FD_FEAT_DEFAULT_VFD_COMPATIBLE;
        // SAFETY: HDF5's out-pointer.
        unsafe { *flags = v as c_ulong };
    }
    0
}

unsafe extern "C" fn j_get_eoa(f: *const FdT, _t: H5FD_mem_t) -> haddr_t {
    // SAFETY: our file.
    unsafe { (*(f as *const JFile)).eoa }
}

unsafe extern "C" fn j_set_eoa(f: *mut FdT, _t: H5FD_mem_t, addr: haddr_t) -> herr_t {
    // SAFETY: our file.
    unsafe { (*(f as *mut JFile)).eoa = addr };
    0
}

unsafe extern "C" fn j_get_eof(f: *const FdT, _t: H5FD_mem_t) -> haddr_t {
    // SAFETY: our file.
    unsafe { (*(f as *const JFile)).eof }
}

unsafe extern "C" fn j_get_handle(f: *mut FdT, _fapl: hid_t, h: *mut *mut c_void) -> herr_t {
    if h.is_null() {
        return -1;
    }
    // SAFETY: our file; the handle is the descriptor, as with sec2.
    unsafe {
        let jf = &mut *(f as *mut JFile);
        *h = &mut jf.fd as *mut c_int as *mut c_void;
    }
    0
}

unsafe extern "C" fn j_read(
    f: *mut FdT,
    _t: H5FD_mem_t,
    _dxpl: hid_t,
    addr: haddr_t,
    size: usize,
    buf: *mut c_void,
) -> herr_t {
    // SAFETY: our file.
    let jf = unsafe { &mut *(f as *mut JFile) };
    let Some(end) = addr.checked_add(size as u64) else {
        return -1;
    };
    if end > jf.eoa || buf.is_null() && size > 0 {
        return -1;
    }
    if size == 0 {
        return 0;
    }
    // SAFETY: HDF5 passes a buffer of `size` bytes.
    let b = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, size) };
    match pread_full(jf.fd, b, addr) {
        Ok(n) => {
            // Past the end of the file reads as zeros, like sec2.
            b[n..].fill(0);
        }
        Err(e) => {
            set_error(e);
            return -1;
        }
    }
    // Writes waiting for the commit, in order.
    for (off, data) in &jf.pending {
        let dend = off.saturating_add(data.len() as u64);
        let (lo, hi) = (addr.max(*off), end.min(dend));
        if lo < hi {
            let (lo, hi) = ((lo - addr) as usize, (hi - addr) as usize);
            let from = (addr + lo as u64 - off) as usize;
            b[lo..hi].copy_from_slice(&data[from..from + (hi - lo)]);
        }
    }
    0
}

unsafe extern "C" fn j_write(
    f: *mut FdT,
    t: H5FD_mem_t,
    _dxpl: hid_t,
    addr: haddr_t,
    size: usize,
    buf: *const c_void,
) -> herr_t {
    // SAFETY: our file.
    let jf = unsafe { &mut *(f as *mut JFile) };
    let Some(end) = addr.checked_add(size as u64) else {
        return -1;
    };
    if !jf.writable || jf.failed || end > jf.eoa || buf.is_null() && size > 0 {
        return -1;
    }
    if size == 0 {
        return 0;
    }
    // SAFETY: HDF5 passes a buffer of `size` bytes.
    let b = unsafe { std::slice::from_raw_parts(buf as *const u8, size) };
    let split = end.min(jf.committed_eof).max(addr);
    let head = (split - addr) as usize;
    // Bytes that reach the file now (metadata below the committed size waits in memory).
    let to_file = if head == 0 || t == H5FD_mem_t::H5FD_MEM_DRAW {
        size
    } else {
        size - head
    };
    let r = if head == 0 {
        pwrite_full(jf.fd, b, addr)
    } else if t == H5FD_mem_t::H5FD_MEM_DRAW {
        // Raw data (and global heaps, which HDF5 hands over as raw data) straight to the file,
        // journaled when it lands below the committed size.
        jf.write_journaled(addr, b)
    } else {
        // Metadata below the committed size waits for the commit; the rest goes to the file.
        jf.defer(addr, &b[..head]);
        if head < size {
            pwrite_full(jf.fd, &b[head..], split)
        } else {
            Ok(())
        }
    };
    if let Err(e) = r {
        jf.failed = true;
        set_error(e);
        return -1;
    }
    jf.dirty = true;
    jf.eof = jf.eof.max(end);
    jf.len = jf.len.max(end);
    jf.start_writeback(to_file as u64);
    0
}

unsafe extern "C" fn j_truncate(f: *mut FdT, _dxpl: hid_t, _closing: u8) -> herr_t {
    // SAFETY: our file.
    let jf = unsafe { &mut *(f as *mut JFile) };
    if !jf.writable || jf.eoa == jf.eof {
        return 0;
    }
    if jf.failed {
        return -1;
    }
    // Growing (HDF5 allocated space it has not written yet) happens now. So does a cut of
    // what lies past the committed size; below it, the bytes may be committed ones, so that
    // cut waits until after the commit (step 4). Measured against the file's size on disk, not
    // HDF5's: after a cut that waits, HDF5's size is below the committed one while the file
    // still holds the committed bytes.
    let now = jf.eoa.max(jf.committed_eof.min(jf.len));
    if now != jf.len {
        if let Err(e) = set_len_fd(jf.fd, now) {
            jf.failed = true;
            set_error(e);
            return -1;
        }
        jf.len = now;
    }
    jf.eof = jf.eoa;
    jf.dirty = true;
    0
}

/// HDF5's lock call: the driver took its lock when it opened the file (so that it holds one
/// whatever `HDF5_USE_FILE_LOCKING` says), so there is nothing left to do.
unsafe extern "C" fn j_lock(_f: *mut FdT, _rw: u8) -> herr_t {
    0
}

unsafe extern "C" fn j_unlock(_f: *mut FdT) -> herr_t {
    0
}

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Journal records played back.
    pub records: usize,
    /// The size the file was truncated to.
    pub committed: u64,
}

/// Rolls `path` back to its last commit if it has a journal: restores the journaled bytes in
/// reverse order, truncates the file to the committed size, syncs it, then removes the journal.
/// Does nothing when another process holds the writer lock (a live writer owns the journal).
/// A torn or damaged tail of the journal is ignored.
pub(crate) fn recover(path: &Path) -> std::io::Result<Option<Recovered>> {
    let jpath = journal_path(path);
    match std::fs::metadata(&jpath) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A journal without its file: nothing to restore.
            remove_journal(&jpath)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // SAFETY: our descriptor; released when `file` is dropped.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return Ok(None);
    }
    let wait = CONFIG.with(|c| c.borrow().wait);
    rollback_fd(file.as_raw_fd(), &jpath, wait, path)
}

/// Plays the journal `jpath` back into `fd` (whose writer lock the caller holds), with the
/// readers locked out: restores, cuts to the committed size, syncs, removes the journal.
fn rollback_fd(
    fd: c_int,
    jpath: &Path,
    wait: Duration,
    path: &Path,
) -> std::io::Result<Option<Recovered>> {
    let _out = lock_out_readers(fd, wait, path)?;
    let mut buf = Vec::new();
    match File::open(jpath) {
        Ok(mut j) => j.read_to_end(&mut buf)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (committed, records) = parse(&buf);
    let Some(committed) = committed else {
        // Killed while writing the header: no write in place had started.
        remove_journal(jpath)?;
        sync_dir(jpath)?;
        return Ok(None);
    };
    for &(off, ref data) in records.iter().rev() {
        pwrite_full(fd, data, off)?;
    }
    if fstat_fd(fd)?.st_size as u64 > committed {
        set_len_fd(fd, committed)?;
    }
    fdatasync(fd)?;
    remove_journal(jpath)?;
    sync_dir(jpath)?;
    Ok(Some(Recovered {
        records: records.len(),
        committed,
    }))
}

/// The committed size and the complete, intact records of a journal.
fn parse(buf: &[u8]) -> (Option<u64>, Vec<(u64, Vec<u8>)>) {
    let u64_at = |i: usize| -> Option<u64> {
        let b: [u8; 8] = buf.get(i..i.checked_add(8)?)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    };
    if buf.get(..8) != Some(&MAGIC[..]) {
        return (None, Vec::new());
    }
    let Some(committed) = u64_at(8) else {
        return (None, Vec::new());
    };
    let mut recs = Vec::new();
    let mut i = HEADER;
    while let (Some(off), Some(len)) = (u64_at(i), u64_at(i + 8)) {
        let Ok(len) = usize::try_from(len) else { break };
        let Some(data_end) = (i + 16).checked_add(len) else {
            break;
        };
        let (Some(rec), Some(sum)) = (buf.get(i..data_end), u64_at(data_end)) else {
            break;
        };
        if fnv(rec) != sum {
            break;
        }
        recs.push((off, rec[16..].to_vec()));
        i = data_end + 8;
    }
    (Some(committed), recs)
}

#[cfg(test)]
mod tests {

    /// The field names of the C struct `name` in the header text `h`, in order.
    fn c_fields(h: &str, open: &str, close: &str) -> Vec<String> {
        let start = h
            .find(open)
            .unwrap_or_else(|| panic!("{open} in the header"));
        let body = &h[start + open.len()..];
        let body = &body[..body.find(close).unwrap_or_else(|| panic!("{close}"))];
        // Comments out.
        let mut text = String::new();
        let mut rest = body;
        while let Some(a) = rest.find("/*") {
            text.push_str(&rest[..a]);
            rest = rest[a..].find("*/").map_or("", |b| &rest[a + b + 2..]);
        }
        text.push_str(rest);
        text.split(';')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                if let Some(a) = d.find("(*") {
                    let n = &d[a + 2..];
                    n[..n.find(')').expect("a function pointer")]
                        .trim()
                        .to_owned()
                } else {
                    let d = d.split('[').next().unwrap_or(d).trim();
                    d.rsplit(|c: char| c.is_whitespace() || c == '*')
                        .next()
                        .unwrap_or(d)
                        .to_owned()
                }
            })
            .collect()
    }

    /// The structures the driver declares are those of the linked library's headers, field
    /// for field (a field missing, added or moved shifts every callback after it).
    #[test]
    fn the_driver_structs_match_the_linked_librarys_headers() {
        let inc = std::path::Path::new(env!("CORAL_HDF5_INCLUDE"));
        let (maj, min, _) = crate::h5::locked(lib_version);
        let (header, class): (&str, &[&str]) = match (maj, min) {
            (1, 10) => ("H5FDpublic.h", ClassT::FIELDS),
            _ => ("H5FDdevelop.h", ClassT2::FIELDS),
        };
        let h = std::fs::read_to_string(inc.join(header)).expect("the linked library's header");
        assert_eq!(
            c_fields(&h, "typedef struct H5FD_class_t {", "} H5FD_class_t;"),
            class,
            "H5FD_class_t in {}",
            inc.join(header).display()
        );
        let fd = c_fields(&h, "struct H5FD_t {", "};");
        assert_eq!(fd, FdT::FIELDS, "H5FD_t in {}", inc.join(header).display());
        assert!(crate::h5::locked(driver).is_some(), "the driver registers");
    }
    use super::*;
    use proptest::prelude::*;

    fn record(off: u64, data: &[u8]) -> Vec<u8> {
        let mut r = off.to_le_bytes().to_vec();
        r.extend_from_slice(&(data.len() as u64).to_le_bytes());
        r.extend_from_slice(data);
        let s = fnv(&r);
        r.extend_from_slice(&s.to_le_bytes());
        r
    }

    fn journal(committed: u64, recs: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut j = MAGIC.to_vec();
        j.extend_from_slice(&committed.to_le_bytes());
        for (o, d) in recs {
            j.extend(record(*o, d));
        }
        j
    }

    proptest! {
        /// Every prefix of a journal parses to the records it holds completely.
        #[test]
        fn torn_journals_keep_complete_records(
            recs in proptest::collection::vec((0u64..1 << 20, proptest::collection::vec(any::<u8>(), 0..64)), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let j = journal(77, &recs);
            let at = cut.index(j.len() + 1);
            let (c, got) = parse(&j[..at]);
            if at < HEADER {
                prop_assert_eq!(c, None);
            } else {
                prop_assert_eq!(c, Some(77));
                let mut end = HEADER;
                let mut n = 0;
                for (_, d) in &recs {
                    end += 24 + d.len();
                    if end <= at { n += 1; }
                }
                prop_assert_eq!(&got[..], &recs[..n]);
            }
        }
    }

    #[test]
    fn recovery_restores_bytes_in_reverse_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.h5");
        std::fs::write(&p, b"AAAAzzzzNEWTAIL").unwrap();
        // Two overwrites of the same bytes: the oldest ("BBBB") must win.
        let j = journal(8, &[(0, b"BBBB".to_vec()), (0, b"CCCC".to_vec())]);
        let mut j = j;
        j.extend_from_slice(&[1, 2, 3]); // torn tail
        std::fs::write(journal_path(&p), &j).unwrap();
        let r = recover(&p).unwrap().unwrap();
        assert_eq!(r.records, 2);
        assert_eq!(std::fs::read(&p).unwrap(), b"BBBBzzzz");
        assert!(!journal_path(&p).exists());
        assert_eq!(recover(&p).unwrap(), None);
    }

    /// HDF5 gives space at the end back below the committed size, then takes part of it again:
    /// the committed bytes past its new end stay on disk until the commit (a crash before it
    /// rolls back to them), and the commit cuts the file to HDF5's size.
    #[test]
    fn committed_bytes_are_not_cut_before_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.h5");
        let committed: Vec<u8> = (0..100u8).collect();
        std::fs::write(&p, &committed).unwrap();
        let name = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: the driver's callbacks on a file of its own, as HDF5 calls them.
        unsafe {
            let f = j_open(name.as_ptr(), ACC_RDWR, 0, MAXADDR);
            assert!(!f.is_null());
            let meta = H5FD_mem_t::H5FD_MEM_SUPER;
            assert_eq!(j_set_eoa(f, meta, 80), 0);
            assert_eq!(j_truncate(f, 0, 0), 0);
            assert_eq!(j_set_eoa(f, meta, 95), 0);
            let new = [0xEEu8; 10];
            assert_eq!(
                j_write(f, meta, 0, 80, 10, new.as_ptr() as *const c_void),
                0
            );
            assert_eq!(j_truncate(f, 0, 0), 0);
            assert_eq!(std::fs::read(&p).unwrap(), committed, "before the commit");
            assert_eq!(j_close(f), 0);
        }
        let mut want = committed[..95].to_vec();
        want[80..90].fill(0xEE);
        assert_eq!(std::fs::read(&p).unwrap(), want, "after the commit");
    }

    #[test]
    fn a_torn_header_is_dropped_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.h5");
        std::fs::write(&p, b"0123456789").unwrap();
        std::fs::write(journal_path(&p), &MAGIC[..5]).unwrap();
        assert_eq!(recover(&p).unwrap(), None);
        assert_eq!(std::fs::read(&p).unwrap(), b"0123456789");
        assert!(!journal_path(&p).exists());
    }
}
