//! Bytes between numpy and Rust, without copies.
//!
//! **Out:** [`Buffer`] holds the bytes a load produced and shows them to numpy through the
//! array interface (`__array_interface__`, version 3): `numpy.asarray(buffer)` makes an array
//! over Rust's memory whose `base` is the buffer, so the bytes live as long as the array. The
//! buffer protocol (`__getbuffer__`) would do the same, but it is in the stable ABI only from
//! Python 3.11, and this module is built for 3.9 and later (abi3-py39). Bytes that nothing else
//! shares are handed over writable (numpy arrays from `load` can be modified in place, as
//! coral-ml's can); shared ones (a memory map, bytes a cache also holds) read-only. When numpy
//! frees the last array over an unshared buffer, a large one goes back to the process's pool
//! ([`coral_core::pool`], at most 256 MiB, `CORAL_BUFFER_CACHE_MB`), so that a process that
//! loads again and again decodes into memory it has faulted in already.
//!
//! **In:** the Python side passes a C-contiguous array with its data address and length
//! (`arr.__array_interface__["data"][0]`, `arr.nbytes`); [`borrowed`] wraps them in [`Bytes`]
//! that keep a reference to the array, so the array cannot be freed or resized (numpy refuses
//! to resize an array something else references) while Rust reads it. Writing to the array
//! from another thread while a store reads it is a data race the caller must avoid, as with any
//! buffer handed to native code with the GIL released: the bytes stored would not match the
//! key computed, and the next load would say so (`IntegrityError`).

use bytes::{Bytes, BytesMut};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Bytes owned by Rust, readable (and, when unshared, writable) by numpy.
#[pyclass(module = "coral_rs._native", frozen)]
pub struct Buffer {
    // Held only to keep `ptr..ptr+len` alive and in place; numpy reads and writes through
    // `ptr`.
    _keep: Keep,
    ptr: usize,
    len: usize,
    writable: bool,
}

enum Keep {
    Shared(#[allow(dead_code)] Bytes),
    Unique(BytesMut),
    Gone,
}

impl Drop for Buffer {
    /// numpy freed the last array over these bytes: a large unshared buffer goes back to the
    /// process's pool, for the next load to decode into memory already faulted in.
    fn drop(&mut self) {
        if let Keep::Unique(mut b) = std::mem::replace(&mut self._keep, Keep::Gone) {
            b.clear(); // nothing to keep: the conversion then moves no bytes
            coral_core::pool::recycle(Vec::from(b));
        }
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Buffer {
    /// Takes the bytes, writable when nothing else shares them.
    pub fn new(bytes: Bytes) -> Self {
        match bytes.try_into_mut() {
            Ok(mut unique) => Buffer {
                ptr: unique.as_mut_ptr() as usize,
                len: unique.len(),
                _keep: Keep::Unique(unique),
                writable: true,
            },
            Err(shared) => Buffer {
                ptr: shared.as_ptr() as usize,
                len: shared.len(),
                _keep: Keep::Shared(shared),
                writable: false,
            },
        }
    }
}

#[pymethods]
impl Buffer {
    /// The array interface: one-dimensional `uint8` over the bytes.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", 3)?;
        d.set_item("shape", (self.len,))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.ptr, !self.writable))?;
        Ok(d)
    }

    /// Bytes held.
    fn __len__(&self) -> usize {
        self.len
    }

    /// True when numpy may write to the bytes.
    #[getter]
    fn writable(&self) -> bool {
        self.writable
    }
}

/// An array's memory, kept alive by a reference to the array.
struct Borrowed {
    ptr: *const u8,
    len: usize,
    _owner: Py<PyAny>,
}

// SAFETY: the memory is numpy's, allocated outside any thread-local arena and kept alive (and at
// its address: numpy does not resize a referenced array) by `_owner`; `Py<PyAny>` itself is Send
// and Sync. Concurrent writes by the caller are the caller's data race (see the module doc).
unsafe impl Send for Borrowed {}
unsafe impl Sync for Borrowed {}

impl AsRef<[u8]> for Borrowed {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr+len` is the array's data (checked by the caller of `borrowed`
        // against the array's own interface), alive while `_owner` is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The bytes of `owner` (a C-contiguous numpy array) at `ptr`, `len` long, without a copy.
///
/// The address and length are checked against the array's own `__array_interface__` and
/// `nbytes`, so a wrong pair from Python is a `ValueError`, not a wild read.
pub fn borrowed(owner: &Bound<'_, PyAny>, ptr: usize, len: usize) -> PyResult<Bytes> {
    let iface = owner.getattr("__array_interface__")?;
    let data = iface.get_item("data")?;
    let actual: usize = data.get_item(0)?.extract()?;
    let nbytes: usize = owner.getattr("nbytes")?.extract()?;
    let strides = iface.get_item("strides")?;
    if actual != ptr || nbytes != len || !strides.is_none() {
        return Err(crate::errors::value(
            "internal: the array's address, length or layout changed before the store read it",
        ));
    }
    if len > 0 && ptr == 0 {
        return Err(crate::errors::value("internal: an array without data"));
    }
    Ok(Bytes::from_owner(Borrowed {
        ptr: ptr as *const u8,
        len,
        _owner: owner.clone().unbind(),
    }))
}
