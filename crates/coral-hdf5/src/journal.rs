//! A rollback journal under HDF5: the `coral-journal` virtual file driver.
//!
//! HDF5 1.10 rewrites metadata (object headers, B-tree nodes, local heaps, the superblock) in
//! place when it flushes, so a process killed inside `H5Fflush` can leave a half-updated file.
//! This driver does plain POSIX I/O like HDF5's `sec2` driver, and before any write (or
//! truncation) that would change bytes below `committed_eof` (the file size at the last commit)
//! it appends the old bytes to a sidecar file `<file>.journal`; the journal record is written
//! (`write()` returned) before the data write starts. The store calls [`commit`] after each
//! `H5Fflush` returns: the journal is emptied and removed and `committed_eof` becomes the current
//! size. [`recover`], run before HDF5 opens a file, plays a non-empty journal back in reverse and
//! truncates the file to the committed size, which brings the file back to its state at the
//! last commit. A torn last record (killed while appending it) is ignored: its data write had
//! not started.
//!
//! Journal layout (little endian): header `b"CORALJ01"`, `u64` committed size; then records
//! `u64` offset, `u64` length, the old bytes, `u64` FNV-1a checksum of offset, length and bytes.
//!
//! This protects against the death of the process (SIGKILL, abort, OOM kill): the kernel keeps
//! every completed `write()`. It does not `fsync`, so it does not order writes for power loss.
//!
//! The driver's structures follow HDF5 1.10.8's `H5FDpublic.h` (which differs from
//! `hdf5-metno-sys`'s declarations for 1.10: `terminate`, `get_eof(file, type)`,
//! `lock(file, rw)`, `H5FD_t::access_flags`/`paged_aggr`); [`driver`] registers it only when the
//! linked library is 1.10.8 or a later 1.10 release, and returns `None` otherwise.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_uint, c_ulong, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hdf5_sys::h5::{haddr_t, herr_t, hsize_t};
use hdf5_sys::h5fd::H5FD_mem_t;
use hdf5_sys::h5i::hid_t;

const MAGIC: &[u8; 8] = b"CORALJ01";
const HEADER: usize = 16;

/// `H5FD_t` of HDF5 1.10.8.
#[repr(C)]
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

type Unused = Option<unsafe extern "C" fn()>;

/// `H5FD_class_t` of HDF5 1.10.8.
#[repr(C)]
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

struct Class(ClassT);
// SAFETY: the class is immutable after construction; its pointers are 'static.
unsafe impl Sync for Class {}
unsafe impl Send for Class {}

/// One open file: HDF5's public part first, then ours.
#[repr(C)]
struct JFile {
    public: FdT,
    fd: c_int,
    eoa: u64,
    eof: u64,
    dev: u64,
    ino: u64,
    writable: bool,
    failed: bool,
    journal_path: PathBuf,
    journal: Option<File>,
    committed_eof: u64,
}

const ACC_RDWR: c_uint = 0x1;
const ACC_TRUNC: c_uint = 0x2;
const ACC_EXCL: c_uint = 0x4;
const ACC_CREAT: c_uint = 0x10;
const MAXADDR: u64 = (1u64 << 63) - 1;

/// The journal file of `path`: `<path>.journal`.
pub(crate) fn journal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".journal");
    PathBuf::from(s)
}

/// The driver's id, registered on first use; `None` when the linked HDF5 is not a 1.10 release
/// from 1.10.8 on (the class layout is that of 1.10.8). Call under the HDF5 lock.
pub(crate) fn driver() -> Option<hid_t> {
    static ID: OnceLock<Option<hid_t>> = OnceLock::new();
    static CLASS: OnceLock<Class> = OnceLock::new();
    *ID.get_or_init(|| {
        let (mut maj, mut min, mut rel) = (0, 0, 0);
        // SAFETY: out-pointers to locals.
        if unsafe { hdf5_sys::h5::H5get_libversion(&mut maj, &mut min, &mut rel) } < 0
            || (maj, min) != (1, 10)
            || rel < 8
        {
            tracing::warn!(
                "HDF5 {maj}.{min}.{rel}: the journal driver needs 1.10.8+ (1.10 series); \
                 writes are not crash-safe"
            );
            return None;
        }
        let cls = CLASS.get_or_init(|| {
            Class(ClassT {
                name: c"coral-journal".as_ptr(),
                maxaddr: MAXADDR,
                fc_degree: hdf5_sys::h5f::H5F_close_degree_t::H5F_CLOSE_WEAK as c_int,
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
                fl_map: hdf5_sys::h5fd::H5FD_FLMAP_DICHOTOMY,
            })
        });
        // SAFETY: the class lives for the whole process; HDF5 copies it.
        let id = unsafe { hdf5_sys::h5fd::H5FDregister(&cls.0 as *const ClassT as *const _) };
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

/// Marks the state after a completed `H5Fflush` of `fid` as committed: empties and removes the
/// journal. Returns an error when the journal cannot be removed (the next open would roll back
/// to the previous commit). Files on other drivers are left alone. Call under the HDF5 lock.
pub(crate) fn commit(fid: hid_t) -> std::io::Result<()> {
    let Some(jf) = file_of(fid) else {
        return Ok(());
    };
    // SAFETY: the pointer comes from our driver's open file, alive while `fid` is open; the
    // HDF5 lock serialises every callback.
    let jf = unsafe { &mut *jf };
    jf.commit()
}

/// Commits `fid` (see [`commit`]) and stops journaling it: later writes and truncations go to
/// the file unrecorded. For a file about to be replaced by a rename over its path (a
/// compaction): from then on `<path>.journal` belongs to the new file, so nothing of the old
/// one may be written there, not even by the writes HDF5 makes when it closes the old file.
/// A later [`commit`] journals the file again. Files on other drivers are left alone. Call
/// under the HDF5 lock.
pub(crate) fn retire(fid: hid_t) -> std::io::Result<()> {
    let Some(jf) = file_of(fid) else {
        return Ok(());
    };
    // SAFETY: as in `commit`.
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
        if self.journal.take().is_some() {
            std::fs::remove_file(&self.journal_path)?;
        }
        self.committed_eof = self.eof;
        Ok(())
    }

    /// Appends the bytes of the file in `[addr, end)` (clipped to the committed size and the
    /// current size) to the journal, before they are overwritten or truncated away.
    fn save(&mut self, addr: u64, end: u64) -> std::io::Result<()> {
        let end = end.min(self.committed_eof).min(self.eof);
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
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.journal_path)?;
            let mut h = Vec::with_capacity(HEADER);
            h.extend_from_slice(MAGIC);
            h.extend_from_slice(&self.committed_eof.to_le_bytes());
            f.write_all(&h)?;
            self.journal = Some(f);
        }
        match self.journal.as_mut() {
            Some(f) => f.write_all(&rec),
            None => Err(std::io::Error::other("journal not open")),
        }
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
    with_fd(fd, |file| file.write_all_at(buf, off))
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
    let writable = flags & ACC_RDWR != 0;
    let mut o = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    } | libc::O_CLOEXEC;
    if flags & ACC_TRUNC != 0 {
        o |= libc::O_TRUNC;
    }
    if flags & ACC_CREAT != 0 {
        o |= libc::O_CREAT;
    }
    if flags & ACC_EXCL != 0 {
        o |= libc::O_EXCL;
    }
    // SAFETY: a valid C string.
    let fd = unsafe { libc::open(cname.as_ptr(), o, 0o666 as c_uint) };
    if fd < 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: a valid descriptor and an out struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        return std::ptr::null_mut();
    }
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(cname.to_bytes()));
    let eof = st.st_size as u64;
    let jf = Box::new(JFile {
        // SAFETY: all-zero is a valid FdT (HDF5 fills it in after open).
        public: unsafe { std::mem::zeroed() },
        fd,
        eoa: 0,
        eof,
        dev: st.st_dev,
        ino: st.st_ino,
        writable,
        failed: false,
        journal_path: journal_path(path),
        journal: None,
        committed_eof: eof,
    });
    Box::into_raw(jf) as *mut FdT
}

unsafe extern "C" fn j_close(f: *mut FdT) -> herr_t {
    // SAFETY: `f` was made by `j_open` and HDF5 closes it once.
    let mut jf = unsafe { Box::from_raw(f as *mut JFile) };
    // HDF5 has written everything by now; unless a write failed, the file is consistent.
    let committed = if jf.writable && !jf.failed {
        jf.commit().is_ok()
    } else {
        true
    };
    // SAFETY: our descriptor.
    let r = unsafe { libc::close(jf.fd) };
    if r < 0 || !committed {
        -1
    } else {
        0
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
    if addr.checked_add(size as u64).is_none_or(|e| e > jf.eoa) || buf.is_null() && size > 0 {
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
            0
        }
        Err(_) => -1,
    }
}

unsafe extern "C" fn j_write(
    f: *mut FdT,
    _t: H5FD_mem_t,
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
    if !jf.writable || end > jf.eoa || buf.is_null() && size > 0 {
        return -1;
    }
    if size == 0 {
        return 0;
    }
    // The old bytes reach the journal before the new ones reach the file.
    if jf.save(addr, end).is_err() {
        jf.failed = true;
        return -1;
    }
    // SAFETY: HDF5 passes a buffer of `size` bytes.
    let b = unsafe { std::slice::from_raw_parts(buf as *const u8, size) };
    if pwrite_full(jf.fd, b, addr).is_err() {
        jf.failed = true;
        return -1;
    }
    jf.eof = jf.eof.max(end);
    0
}

unsafe extern "C" fn j_truncate(f: *mut FdT, _dxpl: hid_t, _closing: u8) -> herr_t {
    // SAFETY: our file.
    let jf = unsafe { &mut *(f as *mut JFile) };
    if !jf.writable || jf.eoa == jf.eof {
        return 0;
    }
    if jf.save(jf.eoa, jf.eof).is_err() {
        jf.failed = true;
        return -1;
    }
    // SAFETY: our descriptor.
    if unsafe { libc::ftruncate(jf.fd, jf.eoa as libc::off_t) } < 0 {
        jf.failed = true;
        return -1;
    }
    jf.eof = jf.eoa;
    0
}

unsafe extern "C" fn j_lock(f: *mut FdT, rw: u8) -> herr_t {
    // SAFETY: our file.
    let jf = unsafe { &*(f as *const JFile) };
    let op = if rw != 0 {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: our descriptor.
    if unsafe { libc::flock(jf.fd, op) } < 0 {
        -1
    } else {
        0
    }
}

unsafe extern "C" fn j_unlock(f: *mut FdT) -> herr_t {
    // SAFETY: our file.
    let jf = unsafe { &*(f as *const JFile) };
    // SAFETY: our descriptor.
    if unsafe { libc::flock(jf.fd, libc::LOCK_UN) } < 0 {
        -1
    } else {
        0
    }
}

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Journal records played back.
    pub records: usize,
    /// The size the file was truncated to.
    pub committed: u64,
}

/// Rolls `path` back to its last commit if its journal is non-empty: restores the journaled
/// bytes in reverse order, truncates the file to the committed size, syncs it, then removes
/// the journal. Does nothing when another process holds the file's lock (a live writer owns
/// the journal). A torn or damaged tail of the journal is ignored.
pub(crate) fn recover(path: &Path) -> std::io::Result<Option<Recovered>> {
    let jpath = journal_path(path);
    let jlen = match std::fs::metadata(&jpath) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A journal without its file: nothing to restore.
            std::fs::remove_file(&jpath)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // SAFETY: our descriptor; released when `file` is dropped.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return Ok(None);
    }
    if jlen == 0 {
        std::fs::remove_file(&jpath)?;
        return Ok(None);
    }
    let mut buf = Vec::new();
    File::open(&jpath)?.read_to_end(&mut buf)?;
    let (committed, records) = parse(&buf);
    let Some(committed) = committed else {
        // Killed while writing the header: no data write had started.
        std::fs::remove_file(&jpath)?;
        return Ok(None);
    };
    for &(off, ref data) in records.iter().rev() {
        pwrite_full(file.as_raw_fd(), data, off)?;
    }
    file.set_len(committed)?;
    file.sync_all()?;
    std::fs::remove_file(&jpath)?;
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
