//! Thin, safe wrappers over the HDF5 C API (through `hdf5-sys`): owned ids, error stacks turned
//! into messages, attributes as h5py writes them, datatypes for every Coral dtype, dataset
//! creation property lists with the filter pipeline, and the zstd filter (id 32015).
//!
//! Every function here must be called inside [`locked`]: the HDF5 library is not reentrant.

use std::ffi::{c_char, c_uint, c_void, CStr, CString};
use std::ptr;

use coral_core::DType;
use hdf5_sys::h5::{herr_t, htri_t};
use hdf5_sys::h5a::{
    H5Aclose, H5Acreate2, H5Aexists, H5Aget_space, H5Aget_type, H5Aopen, H5Aread, H5Awrite,
};
use hdf5_sys::h5d::{H5Dclose, H5Dget_create_plist, H5Dget_space, H5Dget_type, H5Dopen2};
use hdf5_sys::h5e::{H5E_error2_t, H5Eset_auto2, H5Ewalk2, H5E_DEFAULT, H5E_WALK_DOWNWARD};
use hdf5_sys::h5i::hid_t;
use hdf5_sys::h5p::H5P_DEFAULT;
use hdf5_sys::h5p::{
    H5Pclose, H5Pcreate, H5Pget_chunk, H5Pget_filter2, H5Pget_layout, H5Pget_nfilters,
    H5Pset_chunk, H5Pset_deflate, H5Pset_filter, H5Pset_obj_track_times, H5Pset_shuffle,
    H5P_CLS_DATASET_CREATE,
};
use hdf5_sys::h5s::{
    H5S_class_t, H5Sclose, H5Screate, H5Screate_simple, H5Sget_simple_extent_dims,
    H5Sget_simple_extent_ndims, H5Sget_simple_extent_type,
};
use hdf5_sys::h5t::{
    H5T_class_t, H5T_cset_t, H5T_order_t, H5T_str_t, H5Tclose, H5Tcopy, H5Tenum_create,
    H5Tenum_insert, H5Tget_class, H5Tget_order, H5Tget_size, H5Tis_variable_str, H5Tset_cset,
    H5Tset_ebias, H5Tset_fields, H5Tset_size, H5Tset_strpad, H5T_C_S1, H5T_IEEE_F32LE,
    H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, H5T_NATIVE_INT64, H5T_NATIVE_INT8, H5T_STD_I16LE,
    H5T_STD_I32LE, H5T_STD_I64LE, H5T_STD_I8LE, H5T_STD_U16LE, H5T_STD_U32LE, H5T_STD_U64LE,
    H5T_STD_U8LE, H5T_VARIABLE,
};
use hdf5_sys::h5z::{H5Z_class2_t, H5Z_filter_t, H5Zregister, H5Z_FLAG_OPTIONAL};

/// HDF5 filter id of deflate (gzip).
pub const FILTER_DEFLATE: H5Z_filter_t = 1;
/// HDF5 filter id of shuffle.
pub const FILTER_SHUFFLE: H5Z_filter_t = 2;
/// Registered HDF5 filter id of LZF (h5py's).
pub const FILTER_LZF: H5Z_filter_t = 32000;
/// Registered HDF5 filter id of Zstandard.
pub const FILTER_ZSTD: H5Z_filter_t = 32015;
/// Coral's float codec (`coral-float-codec`; HDF5's range for unregistered filters).
pub const FILTER_CORAL: H5Z_filter_t = coral_float_codec::FILTER_ID as H5Z_filter_t;

/// An HDF5 failure: what was being done and the library's error stack.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {stack}")]
pub struct H5Error {
    /// What was being done.
    pub what: String,
    /// The HDF5 error stack, innermost first ("unable to lock the file; ...").
    pub stack: String,
}

impl H5Error {
    /// True when the HDF5 stack says the file is locked by someone else.
    pub fn is_lock_error(&self) -> bool {
        let s = self.stack.to_ascii_lowercase();
        s.contains("unable to lock") || s.contains("lock the file")
    }
}

#[cfg(hdf5_1_12)]
unsafe extern "C" {
    // `H5VLnative.h` since 1.12; not declared by `hdf5-metno-sys`.
    fn H5VLnative_token_to_addr(
        loc_id: hid_t,
        token: hdf5_sys::h5o::H5O_token_t,
        addr: *mut hdf5_sys::h5::haddr_t,
    ) -> herr_t;
}

/// The file address of the object header of `obj`, or of the object `name` in it when `name`
/// is given: `H5Oget_info2`'s address on 1.10, the native token turned into an address from
/// 1.12 on. `None` when HDF5 cannot tell. Call under the HDF5 lock.
pub fn object_addr(obj: hid_t, name: Option<&std::ffi::CStr>) -> Option<u64> {
    #[cfg(hdf5_1_12)]
    {
        // SAFETY: a plain C struct, all zeros a valid value.
        let mut info: hdf5_sys::h5o::H5O_info2_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid object id, C string and out pointer; only the basic fields are
        // filled.
        let r = unsafe {
            match name {
                Some(n) => hdf5_sys::h5o::H5Oget_info_by_name3(
                    obj,
                    n.as_ptr(),
                    &mut info,
                    hdf5_sys::h5o::H5O_INFO_BASIC,
                    hdf5_sys::h5p::H5P_DEFAULT,
                ),
                None => hdf5_sys::h5o::H5Oget_info3(obj, &mut info, hdf5_sys::h5o::H5O_INFO_BASIC),
            }
        };
        if r < 0 {
            return None;
        }
        let mut addr: hdf5_sys::h5::haddr_t = 0;
        // SAFETY: a token HDF5 just gave for an object of the file `obj` is in.
        let r = unsafe { H5VLnative_token_to_addr(obj, info.token, &mut addr) };
        (r >= 0).then_some(addr)
    }
    #[cfg(not(hdf5_1_12))]
    {
        let mut info = hdf5_sys::h5o::H5O_info1_t::default();
        // SAFETY: a valid object id, C string and out pointer; only the basic fields are
        // filled.
        let r = unsafe {
            match name {
                Some(n) => hdf5_sys::h5o::H5Oget_info_by_name2(
                    obj,
                    n.as_ptr(),
                    &mut info,
                    hdf5_sys::h5o::H5O_INFO_BASIC,
                    hdf5_sys::h5p::H5P_DEFAULT,
                ),
                None => hdf5_sys::h5o::H5Oget_info2(obj, &mut info, hdf5_sys::h5o::H5O_INFO_BASIC),
            }
        };
        (r >= 0).then_some(info.addr)
    }
}

/// True when HDF5 recognises the file at `path` as HDF5 (`H5Fis_hdf5`, `H5Fis_accessible` from
/// 1.12 on); negative on error. Call under the HDF5 lock.
pub fn is_hdf5(path: &std::ffi::CStr) -> htri_t {
    // SAFETY: a C string; the default file access list.
    #[cfg(hdf5_1_12)]
    unsafe {
        hdf5_sys::h5f::H5Fis_accessible(path.as_ptr(), hdf5_sys::h5p::H5P_DEFAULT)
    }
    // SAFETY: a C string.
    #[cfg(not(hdf5_1_12))]
    unsafe {
        hdf5_sys::h5f::H5Fis_hdf5(path.as_ptr())
    }
}

/// Switches HDF5's own file locking off on `fapl` (the store's writer lock stands in for it).
#[cfg(hdf5_file_locking)]
fn set_no_file_locking(fapl: hid_t) -> Result<(), H5Error> {
    // SAFETY: a valid fapl.
    check(
        unsafe { hdf5_sys::h5p::H5Pset_file_locking(fapl, 0, 1) },
        || "file locking".into(),
    )
}

/// `H5Pset_file_locking` came with 1.10.7 and 1.12.1: before them, HDF5's lock stays, and a
/// writer without the journal driver fails to open against the store's own lock (saying so).
#[cfg(not(hdf5_file_locking))]
fn set_no_file_locking(_fapl: hid_t) -> Result<(), H5Error> {
    Ok(())
}

/// Reads one stored chunk as it is on disk (filters not applied) into `buf`, which holds its
/// stored size: `H5Dread_chunk` of 1.10 and 1.14, `H5Dread_chunk2` (which is told the buffer's
/// size) of 2.x.
///
/// # Safety
/// `dset` is an open chunked dataset and `offset` has one entry per dimension. Call under the
/// HDF5 lock.
pub unsafe fn read_chunk(dset: hid_t, offset: &[u64], filters: &mut u32, buf: &mut [u8]) -> herr_t {
    #[cfg(hdf5_2)]
    {
        let mut size = buf.len();
        // SAFETY: the caller's dataset and offset; `buf` holds `size` bytes.
        unsafe {
            hdf5_sys::h5d::H5Dread_chunk(
                dset,
                hdf5_sys::h5p::H5P_DEFAULT,
                offset.as_ptr(),
                filters,
                buf.as_mut_ptr() as *mut _,
                &mut size,
            )
        }
    }
    #[cfg(not(hdf5_2))]
    // SAFETY: the caller's dataset and offset; `buf` holds the chunk's stored size.
    unsafe {
        hdf5_sys::h5d::H5Dread_chunk(
            dset,
            hdf5_sys::h5p::H5P_DEFAULT,
            offset.as_ptr(),
            filters,
            buf.as_mut_ptr() as *mut _,
        )
    }
}

/// Runs `f` holding the process-wide HDF5 lock (shared with `hdf5-metno`), with automatic error
/// printing off for this thread.
pub fn locked<T>(f: impl FnOnce() -> T) -> T {
    init();
    let _g = hdf5_sys::LOCK.lock();
    // SAFETY: turns automatic error printing off for the calling thread's default stack.
    unsafe {
        H5Eset_auto2(H5E_DEFAULT, None, ptr::null_mut());
    }
    f()
}

fn init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        // hdf5-metno's init: H5open, and the LZF filter (feature `lzf`).
        hdf5::sync::sync(|| ());
        let _g = hdf5_sys::LOCK.lock();
        register_zstd_filter();
        register_coral_filter();
    });
}

/// Collects the current thread's HDF5 error stack as text.
pub fn error_stack() -> String {
    unsafe extern "C" fn walk(_n: c_uint, err: *const H5E_error2_t, data: *mut c_void) -> herr_t {
        // SAFETY: `data` is the `Vec<String>` passed below; `err` is valid during the callback.
        unsafe {
            let out = &mut *(data as *mut Vec<String>);
            if let Some(e) = err.as_ref() {
                if !e.desc.is_null() {
                    let d = CStr::from_ptr(e.desc).to_string_lossy().into_owned();
                    let f = if e.func_name.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(e.func_name).to_string_lossy().into_owned()
                    };
                    out.push(format!("{f}: {d}"));
                }
            }
        }
        0
    }
    let mut msgs: Vec<String> = Vec::new();
    // SAFETY: walking the default stack with a callback that only reads.
    unsafe {
        H5Ewalk2(
            H5E_DEFAULT,
            H5E_WALK_DOWNWARD,
            Some(walk),
            &mut msgs as *mut Vec<String> as *mut c_void,
        );
    }
    if msgs.is_empty() {
        "unknown HDF5 error".to_owned()
    } else {
        msgs.join("; ")
    }
}

/// An error for a failed call.
pub fn fail(what: impl Into<String>) -> H5Error {
    H5Error {
        what: what.into(),
        stack: error_stack(),
    }
}

/// Checks an `herr_t`.
pub fn check(ret: herr_t, what: impl FnOnce() -> String) -> Result<(), H5Error> {
    if ret < 0 {
        Err(fail(what()))
    } else {
        Ok(())
    }
}

/// Checks an `htri_t`.
pub fn check_tri(ret: htri_t, what: impl FnOnce() -> String) -> Result<bool, H5Error> {
    if ret < 0 {
        Err(fail(what()))
    } else {
        Ok(ret > 0)
    }
}

/// What kind of object an id is, for closing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// File.
    File,
    /// Group.
    Group,
    /// Dataset.
    Dataset,
    /// Attribute.
    Attr,
    /// Dataspace.
    Space,
    /// Datatype.
    Type,
    /// Property list.
    Plist,
}

/// An owned HDF5 id, closed on drop (call drop with the lock held).
#[derive(Debug)]
pub struct Hid {
    id: hid_t,
    kind: Kind,
}

impl Hid {
    /// Wraps an id returned by a call; a negative id is the call's failure.
    pub fn new(id: hid_t, kind: Kind, what: impl FnOnce() -> String) -> Result<Hid, H5Error> {
        if id < 0 {
            Err(fail(what()))
        } else {
            Ok(Hid { id, kind })
        }
    }

    /// An id already closed: a placeholder while a file is closed and opened again.
    pub fn closed(kind: Kind) -> Hid {
        Hid { id: -1, kind }
    }

    /// The raw id.
    pub fn id(&self) -> hid_t {
        self.id
    }

    /// Closes now, reporting failure (a file close can fail when flushing).
    pub fn close(mut self) -> Result<(), H5Error> {
        let r = self.close_inner();
        self.id = -1;
        check(r, || "closing".to_owned())
    }

    fn close_inner(&mut self) -> herr_t {
        if self.id < 0 {
            return 0;
        }
        // SAFETY: the id is owned and valid; it is closed exactly once.
        unsafe {
            match self.kind {
                Kind::File => hdf5_sys::h5f::H5Fclose(self.id),
                Kind::Group => hdf5_sys::h5g::H5Gclose(self.id),
                Kind::Dataset => H5Dclose(self.id),
                Kind::Attr => H5Aclose(self.id),
                Kind::Space => H5Sclose(self.id),
                Kind::Type => H5Tclose(self.id),
                Kind::Plist => H5Pclose(self.id),
            }
        }
    }
}

impl Drop for Hid {
    fn drop(&mut self) {
        let _g = hdf5_sys::LOCK.lock();
        self.close_inner();
        self.id = -1;
    }
}

/// A C string; names here are hex keys, model names and attribute names (no NUL).
pub fn cstr(s: &str) -> Result<CString, H5Error> {
    CString::new(s).map_err(|_| H5Error {
        what: format!("name {s:?}"),
        stack: "contains a NUL byte".to_owned(),
    })
}

/// True when `name` is a link in group `loc`.
pub fn link_exists(loc: hid_t, name: &str) -> Result<bool, H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid id and C string.
    check_tri(
        unsafe { hdf5_sys::h5l::H5Lexists(loc, c.as_ptr(), H5P_DEFAULT) },
        || format!("checking link {name}"),
    )
}

/// The names of a group's links, in name order.
pub fn link_names(group: hid_t) -> Result<Vec<String>, H5Error> {
    let mut info = hdf5_sys::h5g::H5G_info_t::default();
    // SAFETY: valid group id and out pointer.
    check(
        unsafe { hdf5_sys::h5g::H5Gget_info(group, &mut info) },
        || "group info".to_owned(),
    )?;
    let dot = cstr(".")?;
    let mut out = Vec::with_capacity(info.nlinks as usize);
    for i in 0..info.nlinks {
        // SAFETY: querying the size first (null buffer), then filling a buffer of that size + 1.
        let n = unsafe {
            hdf5_sys::h5l::H5Lget_name_by_idx(
                group,
                dot.as_ptr(),
                hdf5_sys::h5::H5_index_t::H5_INDEX_NAME,
                hdf5_sys::h5::H5_iter_order_t::H5_ITER_INC,
                i,
                ptr::null_mut(),
                0,
                H5P_DEFAULT,
            )
        };
        if n < 0 {
            return Err(fail(format!("link name {i}")));
        }
        let mut buf = vec![0u8; n as usize + 1];
        // SAFETY: buffer of n + 1 bytes.
        let m = unsafe {
            hdf5_sys::h5l::H5Lget_name_by_idx(
                group,
                dot.as_ptr(),
                hdf5_sys::h5::H5_index_t::H5_INDEX_NAME,
                hdf5_sys::h5::H5_iter_order_t::H5_ITER_INC,
                i,
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
                H5P_DEFAULT,
            )
        };
        if m < 0 {
            return Err(fail(format!("link name {i}")));
        }
        buf.truncate(m as usize);
        out.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(out)
}

/// Opens a group.
pub fn open_group(loc: hid_t, name: &str) -> Result<Hid, H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid id and C string.
    Hid::new(
        unsafe { hdf5_sys::h5g::H5Gopen2(loc, c.as_ptr(), H5P_DEFAULT) },
        Kind::Group,
        || format!("opening group {name}"),
    )
}

/// Creates a group whose name heap starts at `heap_hint` bytes (it grows as names are added).
pub fn create_group(loc: hid_t, name: &str, heap_hint: usize) -> Result<Hid, H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid id, C string and a new property list.
    unsafe {
        let gcpl = Hid::new(
            H5Pcreate(*hdf5_sys::h5p::H5P_CLS_GROUP_CREATE),
            Kind::Plist,
            || "gcpl".into(),
        )?;
        check(
            hdf5_sys::h5p::H5Pset_local_heap_size_hint(gcpl.id(), heap_hint),
            || "heap size hint".into(),
        )?;
        // No timestamps (HDF5 1.10's group headers would carry four): the same store is the
        // same bytes whenever it is written.
        check(H5Pset_obj_track_times(gcpl.id(), 0), || {
            "track times".into()
        })?;
        Hid::new(
            hdf5_sys::h5g::H5Gcreate2(loc, c.as_ptr(), H5P_DEFAULT, gcpl.id(), H5P_DEFAULT),
            Kind::Group,
            || format!("creating group {name}"),
        )
    }
}

/// A file creation property list with wide symbol-table nodes (128 links per leaf instead of
/// 8), so groups split their nodes, a multi-node metadata update, far less often; narrow
/// chunk-index nodes (4 chunks per node instead of 64): most weights have one to a few chunks,
/// and HDF5 allocates every node whole (about 2.6 KiB per weight saved; against 8 per node,
/// 140 bytes a weight, 14.6 KB of all-MiniLM-L6-v2's store). Not 2 per node (K = 1): HDF5
/// 1.10.8 fails to split such nodes ("unable to encode node level") past a few hundred
/// chunks; K = 2 was tested to 12,000 (`tests/slices.rs`). And persistent
/// free-space tracking (`H5F_FSPACE_STRATEGY_FSM_AGGR`, persist, threshold 1): space freed by a
/// delete is recorded in the file when it closes and reused by later writes after it is opened
/// again (without it HDF5 forgets free space at close, and the file only grows). HDF5 writes
/// those records only at close, so the store commits by closing ([`crate::store`]). The
/// free-space managers need a version 2 superblock, and HDF5 then writes version 2 object
/// headers (with checksums) too; h5py and coral-ml read both. `persistent_free_space` off gives
/// the older layout.
pub fn make_fcpl(persistent_free_space: bool) -> Result<Hid, H5Error> {
    // SAFETY: a new property list.
    unsafe {
        let p = Hid::new(
            H5Pcreate(*hdf5_sys::h5p::H5P_CLS_FILE_CREATE),
            Kind::Plist,
            || "fcpl".into(),
        )?;
        check(hdf5_sys::h5p::H5Pset_sym_k(p.id(), 16, 16), || {
            "sym_k".into()
        })?;
        check(hdf5_sys::h5p::H5Pset_istore_k(p.id(), 2), || {
            "istore_k".into()
        })?;
        if persistent_free_space {
            check(
                hdf5_sys::h5p::H5Pset_file_space_strategy(
                    p.id(),
                    hdf5_sys::h5f::H5F_fspace_strategy_t::H5F_FSPACE_STRATEGY_FSM_AGGR,
                    1,
                    1,
                ),
                || "file space strategy".into(),
            )?;
        }
        Ok(p)
    }
}

/// A file access property list with the journal driver (`crate::journal`).
/// The file access list of every open: the journal driver (when the library has it) and the
/// format bounds. `writable`: the open is a writer's, which holds the store's own writer lock
/// (`journal::WriterLock`); without the journal driver, HDF5's `sec2` driver would then try the
/// same `flock` again and fail against it, so its file locking is switched off for writers.
/// Objects created after the open may take newer formats: [`use_v110_objects`].
pub fn make_fapl(writable: bool) -> Result<Hid, H5Error> {
    // SAFETY: a new property list.
    unsafe {
        let p = Hid::new(
            H5Pcreate(*hdf5_sys::h5p::H5P_CLS_FILE_ACCESS),
            Kind::Plist,
            || "fapl".into(),
        )?;
        if !crate::journal::set_driver(p.id()) {
            return Err(H5Error {
                what: "setting the journal driver".into(),
                stack: String::new(),
            });
        }
        if writable && crate::journal::driver().is_none() {
            set_no_file_locking(p.id())?;
        }
        // The earliest format that holds each object, and nothing newer than 1.10's: what
        // HDF5 1.10.8 writes by default, written the same on 1.14 and 2.x (whose defaults
        // differ), so a store stays readable by every library from 1.10 on. What the file is
        // created with: a higher low bound would give the superblock extension (written again
        // at every writer's close) a header with timestamps, so that an open that changed
        // nothing would change the file's bytes, and 1.10 a version 3 superblock (see
        // `use_v110_objects`).
        check(
            hdf5_sys::h5p::H5Pset_libver_bounds(
                p.id(),
                hdf5_sys::h5f::H5F_libver_t::H5F_LIBVER_EARLIEST,
                hdf5_sys::h5f::H5F_libver_t::H5F_LIBVER_V110,
            ),
            || "library version bounds".into(),
        )?;
        Ok(p)
    }
}

// Not declared by `hdf5-sys` 0.12; in every HDF5 from 1.10.2 on (Coral needs 1.10.8).
unsafe extern "C" {
    fn H5Fset_libver_bounds(
        file_id: hid_t,
        low: hdf5_sys::h5f::H5F_libver_t,
        high: hdf5_sys::h5f::H5F_libver_t,
    ) -> herr_t;
}

/// The version of an open file's superblock.
fn superblock_version(fid: hid_t) -> Result<u32, H5Error> {
    let mut info = hdf5_sys::h5f::H5F_info2_t::default();
    // SAFETY: valid file id; out pointer valid.
    check(
        unsafe { hdf5_sys::h5f::H5Fget_info2(fid, &mut info) },
        || "reading the file's superblock version".into(),
    )?;
    Ok(info.super_.version)
}

/// In a file with a version 2 superblock (Coral's stores with persistent free space), objects
/// created from now on take HDF5 1.10's formats, which need less metadata: a chunk index in the
/// layout message for a one-chunk dataset (a fixed array for more chunks) instead of a version
/// 1 B-tree, and a group's links in its object header or in a fractal heap instead of a symbol
/// table. Every library that reads the version 2 superblock (1.10.1 on) reads these.
///
/// The file keeps its version 2 superblock: creating it with 1.10 as the low bound would write a
/// version 3 one, whose "open for writing" flag, left set by a writer that dies, makes every
/// later open fail until `h5clear` is run. Files with older superblocks (versions 0 and 1:
/// h5py's and coral-ml's defaults, Coral's `persistent_free_space(false)`) keep the earliest
/// formats.
pub fn use_v110_objects(fid: hid_t) -> Result<(), H5Error> {
    if superblock_version(fid)? != 2 {
        return Ok(());
    }
    // SAFETY: valid file id.
    check(
        unsafe {
            H5Fset_libver_bounds(
                fid,
                hdf5_sys::h5f::H5F_libver_t::H5F_LIBVER_V110,
                hdf5_sys::h5f::H5F_libver_t::H5F_LIBVER_V110,
            )
        },
        || "setting the file's format bounds".into(),
    )
}

/// The size of the file's user block (0 for Coral's files and h5py's defaults).
pub fn userblock_size(fid: hid_t) -> Result<u64, H5Error> {
    // SAFETY: valid file id; the returned list is closed by Hid.
    let fcpl = Hid::new(
        unsafe { hdf5_sys::h5f::H5Fget_create_plist(fid) },
        Kind::Plist,
        || "reading the file creation properties".to_owned(),
    )?;
    let mut size: hdf5_sys::h5::hsize_t = 0;
    // SAFETY: valid property list; out pointer valid.
    check(
        unsafe { hdf5_sys::h5p::H5Pget_userblock(fcpl.id(), &mut size) },
        || "reading the user block size".to_owned(),
    )?;
    Ok(size)
}

pub fn open_dataset(loc: hid_t, name: &str) -> Result<Hid, H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid id and C string.
    Hid::new(
        unsafe { H5Dopen2(loc, c.as_ptr(), H5P_DEFAULT) },
        Kind::Dataset,
        || format!("opening dataset {name}"),
    )
}

/// Deletes a link.
pub fn delete_link(loc: hid_t, name: &str) -> Result<(), H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid id and C string.
    check(
        unsafe { hdf5_sys::h5l::H5Ldelete(loc, c.as_ptr(), H5P_DEFAULT) },
        || format!("deleting {name}"),
    )
}

/// Links an (anonymous) object into a group under `name`.
pub fn link_object(obj: hid_t, group: hid_t, name: &str) -> Result<(), H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid ids and C string.
    check(
        unsafe { hdf5_sys::h5o::H5Olink(obj, group, c.as_ptr(), H5P_DEFAULT, H5P_DEFAULT) },
        || format!("linking {name}"),
    )
}

/// A simple dataspace with `dims` (rank 0 gives a scalar dataspace).
pub fn simple_space(dims: &[u64]) -> Result<Hid, H5Error> {
    // SAFETY: dims pointer valid for its length.
    let id = unsafe {
        if dims.is_empty() {
            H5Screate(H5S_class_t::H5S_SCALAR)
        } else {
            H5Screate_simple(dims.len() as i32, dims.as_ptr(), ptr::null())
        }
    };
    Hid::new(id, Kind::Space, || format!("dataspace {dims:?}"))
}

/// The dimensions of a dataspace (empty for scalar and null spaces).
pub fn space_dims(space: hid_t) -> Result<Vec<u64>, H5Error> {
    space_extent(space, false)
}

/// The maximum dimensions of a simple dataspace (empty for scalar and null spaces;
/// `u64::MAX` for an unlimited one).
pub fn space_max_dims(space: hid_t) -> Result<Vec<u64>, H5Error> {
    space_extent(space, true)
}

/// The current (or, with `max`, the maximum) dimensions of a simple dataspace.
fn space_extent(space: hid_t, max: bool) -> Result<Vec<u64>, H5Error> {
    // SAFETY: valid dataspace id.
    let class = unsafe { H5Sget_simple_extent_type(space) };
    if class != H5S_class_t::H5S_SIMPLE {
        return Ok(Vec::new());
    }
    // SAFETY: valid id; buffer of ndims entries.
    let n = unsafe { H5Sget_simple_extent_ndims(space) };
    if n < 0 {
        return Err(fail("dataspace rank"));
    }
    let mut dims = vec![0u64; n as usize];
    let (cur, mx) = if max {
        (ptr::null_mut(), dims.as_mut_ptr())
    } else {
        (dims.as_mut_ptr(), ptr::null_mut())
    };
    // SAFETY: the buffer has n entries; the other pointer is null.
    check(unsafe { H5Sget_simple_extent_dims(space, cur, mx) }, || {
        "dataspace dims".to_owned()
    })?;
    Ok(dims)
}

fn copy_type(t: hid_t) -> Result<Hid, H5Error> {
    // SAFETY: copying a valid predefined type.
    Hid::new(unsafe { H5Tcopy(t) }, Kind::Type, || {
        "copying a type".to_owned()
    })
}

/// The file datatype Coral writes for a dtype: the standard little-endian types; float16 as h5py
/// builds it; bool as h5py's enum; bfloat16 and float8 as unsigned integers of their size (the
/// bits unchanged; the `dtype` attribute names them).
pub fn file_type(dtype: DType) -> Result<Hid, H5Error> {
    // SAFETY: the predefined type globals are valid after H5open (done in `lock`).
    unsafe {
        let base = match dtype {
            DType::U8 | DType::F8E4M3 | DType::F8E5M2 => *H5T_STD_U8LE,
            DType::U16 | DType::BF16 => *H5T_STD_U16LE,
            DType::U32 => *H5T_STD_U32LE,
            DType::U64 => *H5T_STD_U64LE,
            DType::I8 => *H5T_STD_I8LE,
            DType::I16 => *H5T_STD_I16LE,
            DType::I32 => *H5T_STD_I32LE,
            DType::I64 => *H5T_STD_I64LE,
            DType::F32 => *H5T_IEEE_F32LE,
            DType::F64 => *H5T_IEEE_F64LE,
            DType::F16 => {
                let t = copy_type(*H5T_IEEE_F32LE)?;
                check(H5Tset_fields(t.id(), 15, 10, 5, 0, 10), || {
                    "f16 fields".into()
                })?;
                check(H5Tset_size(t.id(), 2), || "f16 size".into())?;
                check(H5Tset_ebias(t.id(), 15), || "f16 bias".into())?;
                return Ok(t);
            }
            DType::Bool => {
                let t = Hid::new(H5Tenum_create(*H5T_NATIVE_INT8), Kind::Type, || {
                    "bool enum".into()
                })?;
                for (name, v) in [(c"FALSE", 0i8), (c"TRUE", 1i8)] {
                    check(
                        H5Tenum_insert(t.id(), name.as_ptr(), &v as *const i8 as *const c_void),
                        || "bool enum member".into(),
                    )?;
                }
                return Ok(t);
            }
        };
        copy_type(base)
    }
}

/// The memory type to read a dataset's bytes with, little-endian and `size` bytes per element:
/// the file type itself when it is little-endian (no conversion), else an error.
pub fn check_readable_type(ftype: hid_t, size: usize) -> Result<(), String> {
    // SAFETY: valid type id.
    let (tsize, order, class) =
        unsafe { (H5Tget_size(ftype), H5Tget_order(ftype), H5Tget_class(ftype)) };
    if tsize != size {
        return Err(format!("stored element size {tsize}, dtype needs {size}"));
    }
    if order == H5T_order_t::H5T_ORDER_BE {
        return Err("big-endian data is not supported".to_owned());
    }
    match class {
        H5T_class_t::H5T_INTEGER
        | H5T_class_t::H5T_FLOAT
        | H5T_class_t::H5T_ENUM
        | H5T_class_t::H5T_BITFIELD
        | H5T_class_t::H5T_OPAQUE => Ok(()),
        other => Err(format!("unsupported datatype class {other:?}")),
    }
}

/// A dataset's type.
pub fn dataset_type(dset: hid_t) -> Result<Hid, H5Error> {
    // SAFETY: valid dataset id.
    Hid::new(unsafe { H5Dget_type(dset) }, Kind::Type, || {
        "dataset type".into()
    })
}

/// A dataset's space.
pub fn dataset_space(dset: hid_t) -> Result<Hid, H5Error> {
    // SAFETY: valid dataset id.
    Hid::new(unsafe { H5Dget_space(dset) }, Kind::Space, || {
        "dataset space".into()
    })
}

/// A dataset's creation property list.
pub fn dataset_dcpl(dset: hid_t) -> Result<Hid, H5Error> {
    // SAFETY: valid dataset id.
    Hid::new(unsafe { H5Dget_create_plist(dset) }, Kind::Plist, || {
        "dataset dcpl".into()
    })
}

/// One filter of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterInfo {
    /// The filter id.
    pub id: H5Z_filter_t,
    /// Its client values.
    pub cd: Vec<u32>,
}

/// The filter pipeline and chunk dims of a dataset creation property list (chunk dims empty when
/// the layout is not chunked).
pub fn dcpl_layout(dcpl: hid_t) -> Result<(Vec<FilterInfo>, Vec<u64>), H5Error> {
    // SAFETY: valid plist; buffers sized as declared.
    unsafe {
        let layout = H5Pget_layout(dcpl);
        let mut chunk = Vec::new();
        if layout == hdf5_sys::h5d::H5D_layout_t::H5D_CHUNKED {
            let mut dims = [0u64; 32];
            let n = H5Pget_chunk(dcpl, 32, dims.as_mut_ptr());
            if n < 0 {
                return Err(fail("chunk dims"));
            }
            chunk = dims[..(n as usize).min(32)].to_vec();
        }
        let nf = H5Pget_nfilters(dcpl);
        if nf < 0 {
            return Err(fail("filter count"));
        }
        let mut filters = Vec::with_capacity(nf as usize);
        for i in 0..nf as c_uint {
            let mut flags = 0;
            let mut n: usize = 16;
            let mut cd = [0 as c_uint; 16];
            let id = H5Pget_filter2(
                dcpl,
                i,
                &mut flags,
                &mut n,
                cd.as_mut_ptr(),
                0,
                ptr::null_mut(),
                ptr::null_mut(),
            );
            if id < 0 {
                return Err(fail("filter info"));
            }
            filters.push(FilterInfo {
                id,
                cd: cd[..n.min(16)].to_vec(),
            });
        }
        Ok((filters, chunk))
    }
}

/// A dataset creation property list: chunked with `chunk` dims (when given) and the pipeline
/// shuffle (if `shuffle`) then the codec, as h5py would declare them. Times are not tracked so
/// identical content gives identical files.
pub fn make_dcpl(chunk: Option<&[u64]>, pipeline: &[FilterInfo]) -> Result<Hid, H5Error> {
    // SAFETY: creating and configuring a new plist.
    unsafe {
        let p = Hid::new(H5Pcreate(*H5P_CLS_DATASET_CREATE), Kind::Plist, || {
            "dcpl".into()
        })?;
        check(H5Pset_obj_track_times(p.id(), 0), || "track times".into())?;
        if let Some(c) = chunk {
            check(H5Pset_chunk(p.id(), c.len() as i32, c.as_ptr()), || {
                format!("chunk {c:?}")
            })?;
            for f in pipeline {
                match f.id {
                    FILTER_SHUFFLE => check(H5Pset_shuffle(p.id()), || "shuffle".into())?,
                    FILTER_DEFLATE => {
                        let level = f.cd.first().copied().unwrap_or(4);
                        check(H5Pset_deflate(p.id(), level), || "deflate".into())?
                    }
                    id => check(
                        H5Pset_filter(p.id(), id, H5Z_FLAG_OPTIONAL, f.cd.len(), f.cd.as_ptr()),
                        || format!("filter {id}"),
                    )?,
                }
            }
        }
        Ok(p)
    }
}

/// Creates an anonymous dataset (linked later with [`link_object`]).
pub fn create_anon_dataset(
    file: hid_t,
    ftype: hid_t,
    space: hid_t,
    dcpl: hid_t,
) -> Result<Hid, H5Error> {
    // SAFETY: valid ids.
    Hid::new(
        unsafe { hdf5_sys::h5d::H5Dcreate_anon(file, ftype, space, dcpl, H5P_DEFAULT) },
        Kind::Dataset,
        || "creating dataset".into(),
    )
}

fn vlen_str_type() -> Result<Hid, H5Error> {
    // SAFETY: building a variable-length UTF-8 string type.
    unsafe {
        let t = copy_type(*H5T_C_S1)?;
        check(H5Tset_size(t.id(), H5T_VARIABLE), || "vlen size".into())?;
        check(H5Tset_cset(t.id(), H5T_cset_t::H5T_CSET_UTF8), || {
            "cset".into()
        })?;
        check(H5Tset_strpad(t.id(), H5T_str_t::H5T_STR_NULLTERM), || {
            "strpad".into()
        })?;
        Ok(t)
    }
}

fn create_attr(obj: hid_t, name: &str, ty: hid_t, space: hid_t) -> Result<Hid, H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid ids; an existing attribute of the name is replaced.
    unsafe {
        if H5Aexists(obj, c.as_ptr()) > 0 {
            hdf5_sys::h5a::H5Adelete(obj, c.as_ptr());
        }
        Hid::new(
            H5Acreate2(obj, c.as_ptr(), ty, space, H5P_DEFAULT, H5P_DEFAULT),
            Kind::Attr,
            || format!("creating attribute {name}"),
        )
    }
}

/// Writes a scalar variable-length UTF-8 string attribute, as h5py writes a Python `str`.
pub fn write_str_attr(obj: hid_t, name: &str, value: &str) -> Result<(), H5Error> {
    let t = vlen_str_type()?;
    let s = simple_space(&[])?;
    let a = create_attr(obj, name, t.id(), s.id())?;
    let c = cstr(value)?;
    let p: *const c_char = c.as_ptr();
    // SAFETY: a vlen string attribute is written from an array of `char*`.
    check(
        unsafe { H5Awrite(a.id(), t.id(), &p as *const *const c_char as *const c_void) },
        || format!("writing attribute {name}"),
    )
}

/// Writes a 1-D int64 attribute, as h5py writes a tuple of ints.
pub fn write_i64s_attr(obj: hid_t, name: &str, values: &[i64]) -> Result<(), H5Error> {
    // SAFETY: predefined type valid after H5open.
    let t = copy_type(*H5T_STD_I64LE)?;
    let s = simple_space(&[values.len() as u64])?;
    let a = create_attr(obj, name, t.id(), s.id())?;
    // SAFETY: buffer of values.len() native int64 (little-endian host).
    check(
        unsafe { H5Awrite(a.id(), *H5T_NATIVE_INT64, values.as_ptr() as *const c_void) },
        || format!("writing attribute {name}"),
    )
}

/// Writes a 1-D uint8 attribute (stored in the object header itself: no global heap).
pub fn write_u8s_attr(obj: hid_t, name: &str, values: &[u8]) -> Result<(), H5Error> {
    // SAFETY: predefined type valid after H5open.
    let t = copy_type(*H5T_STD_U8LE)?;
    let s = simple_space(&[values.len() as u64])?;
    let a = create_attr(obj, name, t.id(), s.id())?;
    // SAFETY: buffer of values.len() bytes in the attribute's own type.
    check(
        unsafe { H5Awrite(a.id(), t.id(), values.as_ptr() as *const c_void) },
        || format!("writing attribute {name}"),
    )
}

/// Writes a scalar float64 attribute.
pub fn write_f64_attr(obj: hid_t, name: &str, value: f64) -> Result<(), H5Error> {
    // SAFETY: predefined type valid after H5open.
    let t = copy_type(*H5T_IEEE_F64LE)?;
    let s = simple_space(&[])?;
    let a = create_attr(obj, name, t.id(), s.id())?;
    // SAFETY: one native double.
    check(
        unsafe {
            H5Awrite(
                a.id(),
                *H5T_NATIVE_DOUBLE,
                &value as *const f64 as *const c_void,
            )
        },
        || format!("writing attribute {name}"),
    )
}

/// True when the object has the attribute.
pub fn attr_exists(obj: hid_t, name: &str) -> Result<bool, H5Error> {
    let c = cstr(name)?;
    // SAFETY: valid id and C string.
    check_tri(unsafe { H5Aexists(obj, c.as_ptr()) }, || {
        format!("checking attribute {name}")
    })
}

fn open_attr(obj: hid_t, name: &str) -> Result<Option<Hid>, H5Error> {
    if !attr_exists(obj, name)? {
        return Ok(None);
    }
    let c = cstr(name)?;
    // SAFETY: valid id and C string.
    Hid::new(
        unsafe { H5Aopen(obj, c.as_ptr(), H5P_DEFAULT) },
        Kind::Attr,
        || format!("opening attribute {name}"),
    )
    .map(Some)
}

/// The number of elements of an attribute's dataspace `dims` (read from the file: checked).
fn elements(dims: &[u64], name: &str) -> Result<u64, H5Error> {
    dims.iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| H5Error {
            what: format!("attribute {name}"),
            stack: format!("dimensions {dims:?} overflow"),
        })
}

/// Reads a string attribute (variable- or fixed-length, scalar or one element); `None` when absent.
/// With `raw` (a store opened read-only), a variable-length string is read from the file's bytes
/// with every length checked ([`crate::vlen`]) instead of through libhdf5's global heap, which
/// trusts them.
pub fn read_str_attr(
    obj: hid_t,
    name: &str,
    raw: Option<&crate::vlen::RawFile>,
) -> Result<Option<String>, H5Error> {
    let Some(a) = open_attr(obj, name)? else {
        return Ok(None);
    };
    // SAFETY: valid attribute; buffers sized from its type.
    unsafe {
        let ft = Hid::new(H5Aget_type(a.id()), Kind::Type, || "attr type".into())?;
        if H5Tget_class(ft.id()) != H5T_class_t::H5T_STRING {
            return Err(H5Error {
                what: format!("attribute {name}"),
                stack: "is not a string".to_owned(),
            });
        }
        let space = Hid::new(H5Aget_space(a.id()), Kind::Space, || "attr space".into())?;
        let n = elements(&space_dims(space.id())?, name)?;
        if n > 1 {
            return Err(H5Error {
                what: format!("attribute {name}"),
                stack: format!("holds {n} strings, expected one"),
            });
        }
        if H5Tis_variable_str(ft.id()) > 0 {
            if let Some(raw) = raw {
                match raw.read_vlen_str(obj, name) {
                    Ok(Some(s)) => return Ok(Some(s)),
                    // Not in a form the checked reader knows: libhdf5 reads it.
                    Ok(None) => {}
                    Err(why) => {
                        return Err(H5Error {
                            what: format!("attribute {name}"),
                            stack: format!("damaged: {why}"),
                        })
                    }
                }
            }
            let mt = copy_type(ft.id())?;
            let mut p: *mut c_char = ptr::null_mut();
            check(
                H5Aread(a.id(), mt.id(), &mut p as *mut *mut c_char as *mut c_void),
                || format!("reading attribute {name}"),
            )?;
            if p.is_null() {
                return Ok(Some(String::new()));
            }
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            hdf5_sys::h5::H5free_memory(p as *mut c_void);
            Ok(Some(s))
        } else {
            let size = H5Tget_size(ft.id());
            let mut buf = vec![0u8; size.max(1)];
            let mt = copy_type(ft.id())?;
            check(
                H5Aread(a.id(), mt.id(), buf.as_mut_ptr() as *mut c_void),
                || format!("reading attribute {name}"),
            )?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
        }
    }
}

/// Reads a numeric attribute as int64 values (converted by HDF5); `None` when absent.
pub fn read_i64s_attr(obj: hid_t, name: &str) -> Result<Option<Vec<i64>>, H5Error> {
    let Some(a) = open_attr(obj, name)? else {
        return Ok(None);
    };
    // SAFETY: valid attribute; buffer sized from its space.
    unsafe {
        let space = Hid::new(H5Aget_space(a.id()), Kind::Space, || "attr space".into())?;
        let n = elements(&space_dims(space.id())?, name)?;
        let class = H5Sget_simple_extent_type(space.id());
        let n = match class {
            H5S_class_t::H5S_NULL => 0,
            H5S_class_t::H5S_SCALAR => 1,
            _ => n,
        };
        if n > 64 {
            return Err(H5Error {
                what: format!("attribute {name}"),
                stack: format!("{n} values is too many"),
            });
        }
        let mut out = vec![0i64; n as usize];
        if n > 0 {
            check(
                H5Aread(a.id(), *H5T_NATIVE_INT64, out.as_mut_ptr() as *mut c_void),
                || format!("reading attribute {name}"),
            )?;
        }
        Ok(Some(out))
    }
}

/// Reads a scalar float attribute as f64; `None` when absent.
pub fn read_f64_attr(obj: hid_t, name: &str) -> Result<Option<f64>, H5Error> {
    let Some(a) = open_attr(obj, name)? else {
        return Ok(None);
    };
    let mut v = 0f64;
    // SAFETY: reading one double.
    check(
        unsafe {
            H5Aread(
                a.id(),
                *H5T_NATIVE_DOUBLE,
                &mut v as *mut f64 as *mut c_void,
            )
        },
        || format!("reading attribute {name}"),
    )?;
    Ok(Some(v))
}

// ---------------------------------------------------------------------------------------------
// The zstd filter (32015), so HDF5's own pipeline reads and writes what we write directly.

static ZSTD_NAME: &CStr = c"zstd";

struct SyncClass(H5Z_class2_t);
// SAFETY: the class is immutable static data (a name pointer to a static C string).
unsafe impl Sync for SyncClass {}

static ZSTD_CLASS: SyncClass = SyncClass(H5Z_class2_t {
    version: 1,
    id: FILTER_ZSTD,
    encoder_present: 1,
    decoder_present: 1,
    name: ZSTD_NAME.as_ptr(),
    can_apply: None,
    set_local: None,
    filter: Some(zstd_filter),
});

fn register_zstd_filter() {
    // SAFETY: registering a static filter class.
    unsafe {
        if hdf5_sys::h5z::H5Zfilter_avail(FILTER_ZSTD) <= 0 {
            H5Zregister(&ZSTD_CLASS.0 as *const H5Z_class2_t as *const c_void);
        }
    }
}

/// Registers Coral's float codec (the class of the `coral-h5plugin` plugin) in this process, so
/// HDF5's own pipeline reads and writes its datasets without `HDF5_PLUGIN_PATH`.
fn register_coral_filter() {
    // SAFETY: registering a static filter class laid out as `H5Z_class2_t`.
    unsafe {
        if hdf5_sys::h5z::H5Zfilter_avail(FILTER_CORAL) <= 0 {
            H5Zregister(
                &coral_h5plugin::CLASS.0 as *const coral_h5plugin::H5ZClass2 as *const c_void,
            );
        }
    }
}

/// HDF5's filter callback for zstd: level in `cd_values[0]` (3 when absent). The buffer
/// hand-over is `coral_h5plugin::run_filter`'s. Returns 0 on failure.
unsafe extern "C" fn zstd_filter(
    flags: c_uint,
    cd_nelmts: usize,
    cd_values: *const c_uint,
    nbytes: usize,
    buf_size: *mut usize,
    buf: *mut *mut c_void,
) -> usize {
    let zstd = |reverse: bool, cd: &[u32], input: &[u8]| -> Option<Vec<u8>> {
        if reverse {
            let size = match zstd::zstd_safe::get_frame_content_size(input) {
                Ok(Some(s)) if s <= (1u64 << 34) => s as usize,
                _ => return None,
            };
            zstd::bulk::decompress(input, size).ok()
        } else {
            let level = cd.first().map_or(3, |&l| l as i32);
            zstd::bulk::compress(input, level).ok()
        }
    };
    // SAFETY: HDF5's filter contract, passed on.
    unsafe { coral_h5plugin::run_filter(flags, cd_nelmts, cd_values, nbytes, buf_size, buf, zstd) }
}
