//! The HDF5 filter plugin of Coral's float codec ([`coral_float_codec`], filter id
//! [`coral_float_codec::FILTER_ID`]). Built as `libcoral_h5plugin.so`, it is what h5py and any
//! HDF5 program load to read (and write) Coral's float datasets:
//!
//! ```text
//! cargo build --release -p coral-h5plugin
//! HDF5_PLUGIN_PATH=target/release python -c "import h5py; print(h5py.File('store.h5')['weights'])"
//! ```
//!
//! It exports HDF5's two plugin entry points (`H5PLget_plugin_type`, `H5PLget_plugin_info`) and
//! links no HDF5 of its own: the class structure is declared here as HDF5 1.8-2.x lay it out
//! (`H5Z_class2_t`). `coral-hdf5` registers the same [`CLASS`] in its process.
//!
//! `cd_values`: `[format version, kind, row values]`: the version the writer codes (4; 3 in
//! datasets written before lanes, 2 before binned mantissa tables, 1 before the codec modelled
//! columns), the kind as
//! [`coral_float_codec::Kind::code`] (1 bf16, 2 f16, 3 f32), and the values in one row of a
//! chunk (the product of the dataset's dimensions after the first; absent in version 1, read as
//! 1). Decoding needs none of them: every frame names its kind and row length.
//!
//! ```
//! // The filter's callback, as HDF5 calls it: code 4 KiB of f32 in place, then decode it.
//! let data: Vec<u8> = (0..1024u32).flat_map(|i| (i as f32 * 1e-3).to_le_bytes()).collect();
//! let coded = coral_h5plugin::apply(false, &[3, 3, 32], &data).unwrap();
//! assert_eq!(coral_h5plugin::apply(true, &[], &coded).unwrap(), data);
//! ```

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use coral_float_codec::{CodecError, Kind, FILTER_ID};

/// HDF5's `H5Z_class2_t`.
#[repr(C)]
#[derive(Debug)]
pub struct H5ZClass2 {
    pub version: c_int,
    pub id: c_int,
    pub encoder_present: c_uint,
    pub decoder_present: c_uint,
    pub name: *const c_char,
    pub can_apply: Option<unsafe extern "C" fn(i64, i64, i64) -> c_int>,
    pub set_local: Option<unsafe extern "C" fn(i64, i64, i64) -> c_int>,
    pub filter: Option<
        unsafe extern "C" fn(
            c_uint,
            usize,
            *const c_uint,
            usize,
            *mut usize,
            *mut *mut c_void,
        ) -> usize,
    >,
}

/// The class HDF5 registers.
#[derive(Debug)]
pub struct SyncClass(pub H5ZClass2);
// SAFETY: immutable static data; the name points to a static C string.
unsafe impl Sync for SyncClass {}

static NAME: &CStr = c"coral-float";

/// The filter's class (version 1 of `H5Z_class2_t`).
pub static CLASS: SyncClass = SyncClass(H5ZClass2 {
    version: 1,
    id: FILTER_ID as c_int,
    encoder_present: 1,
    decoder_present: 1,
    name: NAME.as_ptr(),
    can_apply: None,
    set_local: None,
    filter: Some(filter),
});

/// HDF5's flag for the read direction.
const H5Z_FLAG_REVERSE: c_uint = 0x0100;

/// The filter's `cd_values` for values of `kind` in rows of `row_values`: `[format version,
/// kind code, row values]` (row values above `u32::MAX` are written as 1: the codec models rows
/// of at most 2^20 values).
pub fn cd_values(kind: Kind, row_values: usize) -> Vec<u32> {
    vec![
        u32::from(coral_float_codec::VERSION),
        u32::from(kind.code()),
        u32::try_from(row_values).unwrap_or(1),
    ]
}

/// The row length `cd_values` name ([`cd_values`]); 1 when they name none.
pub fn rows_of(cd: &[u32]) -> usize {
    cd.get(2).map_or(1, |&r| r as usize)
}

/// Codes one chunk as the filter does on write: the kind and row length from `cd`.
pub fn encode_chunk(cd: &[u32], data: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    coral_float_codec::encode_rows(kind_of(cd), data, rows_of(cd), out)
}

/// The kind `cd_values` name ([`cd_values`]); opaque bytes when they name none.
pub fn kind_of(cd: &[u32]) -> Kind {
    cd.get(1)
        .and_then(|&k| u8::try_from(k).ok())
        .and_then(Kind::from_code)
        .unwrap_or(Kind::Bytes)
}

/// What the filter does to one chunk, without HDF5: decodes when `reverse`, else codes `input`
/// as the kind `cd[1]` names. `None` on any failure (HDF5 then fails the read, or stores the
/// chunk unfiltered on write, the filter being optional).
pub fn apply(reverse: bool, cd: &[u32], input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if reverse {
        coral_float_codec::decode(input, &mut out).ok()?;
    } else {
        encode_chunk(cd, input, &mut out).ok()?;
    }
    Some(out)
}

/// HDF5's filter callback for this codec ([`apply`] through [`run_filter`]).
///
/// # Safety
/// As [`run_filter`].
pub unsafe extern "C" fn filter(
    flags: c_uint,
    cd_nelmts: usize,
    cd_values: *const c_uint,
    nbytes: usize,
    buf_size: *mut usize,
    buf: *mut *mut c_void,
) -> usize {
    // SAFETY: the caller's (HDF5's) contract, passed on.
    unsafe { run_filter(flags, cd_nelmts, cd_values, nbytes, buf_size, buf, apply) }
}

/// The glue of an HDF5 filter callback around `f(reverse, cd_values, input)`: `*buf` (`nbytes`
/// valid bytes, `*buf_size` allocated) is replaced with a `malloc`'d buffer holding `f`'s
/// result, as the filter contract requires. Returns the result's length, 0 on failure (`f`
/// gave `None`, or no memory). coral-hdf5's zstd filter uses it too.
///
/// # Safety
/// HDF5's contract: `buf` and `buf_size` are valid, `*buf` holds `nbytes` readable bytes and
/// was allocated with `malloc`, and `cd_values` holds `cd_nelmts` values (or is null).
pub unsafe fn run_filter(
    flags: c_uint,
    cd_nelmts: usize,
    cd_values: *const c_uint,
    nbytes: usize,
    buf_size: *mut usize,
    buf: *mut *mut c_void,
    f: impl FnOnce(bool, &[u32], &[u8]) -> Option<Vec<u8>>,
) -> usize {
    // SAFETY: as the function's contract says; the result goes into a fresh malloc'd buffer
    // and the old one is freed only once that succeeded.
    unsafe {
        if buf.is_null() || (*buf).is_null() || buf_size.is_null() {
            return 0;
        }
        let input = std::slice::from_raw_parts(*buf as *const u8, nbytes);
        let cd = if cd_values.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(cd_values, cd_nelmts)
        };
        let Some(out) = f(flags & H5Z_FLAG_REVERSE != 0, cd, input) else {
            return 0;
        };
        let p = libc::malloc(out.len().max(1)) as *mut u8;
        if p.is_null() {
            return 0;
        }
        std::ptr::copy_nonoverlapping(out.as_ptr(), p, out.len());
        libc::free(*buf);
        *buf = p as *mut c_void;
        *buf_size = out.len().max(1);
        out.len()
    }
}

/// HDF5's plugin entry point: this is a filter (`H5PL_TYPE_FILTER`).
#[no_mangle]
pub extern "C" fn H5PLget_plugin_type() -> c_int {
    0
}

/// HDF5's plugin entry point: the filter's class.
#[no_mangle]
pub extern "C" fn H5PLget_plugin_info() -> *const c_void {
    &CLASS.0 as *const H5ZClass2 as *const c_void
}
