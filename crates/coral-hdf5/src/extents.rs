//! Where a store's raw data lies in its file (test support for fault injection: everything
//! outside these extents is HDF5 metadata).

use coral_store_api::Result;

use crate::h5;
use crate::store::{HDF5Store, Inner};

impl HDF5Store {
    /// The file extents `(offset, length)` of every dataset's raw data (each chunk of a chunked
    /// dataset, the whole of a contiguous one) in `weights/`, `deltas/` and `models/`, sorted.
    /// Test support: what a fault-injection test needs to tell data from metadata.
    #[doc(hidden)]
    pub fn raw_data_extents(&self) -> Result<Vec<(u64, u64)>> {
        self.with(|inner| {
            let e = |e| self.err(e);
            let base = h5::userblock_size(inner.file.id()).map_err(e)?;
            let mut out = Vec::new();
            for g in groups(inner) {
                for name in h5::link_names(g.id()).map_err(e)? {
                    let Ok(d) = h5::open_dataset(g.id(), &name) else {
                        continue;
                    };
                    let mut n: u64 = 0;
                    // HDF5 1.10 mishandles H5S_ALL here: it wants the dataset's own space.
                    let space = h5::dataset_space(d.id()).map_err(e)?;
                    // SAFETY: valid dataset and dataspace ids; out pointer valid.
                    let chunked =
                        unsafe { hdf5_sys::h5d::H5Dget_num_chunks(d.id(), space.id(), &mut n) }
                            >= 0;
                    if chunked {
                        for i in 0..n {
                            let (mut mask, mut addr, mut size) = (0u32, 0u64, 0u64);
                            let mut offset = [0u64; 32];
                            // SAFETY: as above; `offset` has room for any rank HDF5 allows.
                            let r = unsafe {
                                hdf5_sys::h5d::H5Dget_chunk_info(
                                    d.id(),
                                    space.id(),
                                    i,
                                    offset.as_mut_ptr(),
                                    &mut mask,
                                    &mut addr,
                                    &mut size,
                                )
                            };
                            h5::check(r, || format!("chunk {i} of {name}")).map_err(e)?;
                            if addr != u64::MAX && size > 0 {
                                out.push((addr.saturating_add(base), size));
                            }
                        }
                    } else {
                        // SAFETY: valid dataset id.
                        let (addr, size) = unsafe {
                            (
                                hdf5_sys::h5d::H5Dget_offset(d.id()),
                                hdf5_sys::h5d::H5Dget_storage_size(d.id()),
                            )
                        };
                        if addr != u64::MAX && size > 0 {
                            out.push((addr.saturating_add(base), size));
                        }
                    }
                }
            }
            out.sort_unstable();
            Ok(out)
        })
    }
}

fn groups(inner: &Inner) -> impl Iterator<Item = &h5::Hid> {
    std::iter::once(&inner.weights)
        .chain(inner.deltas.as_ref())
        .chain(inner.models.as_ref())
}
