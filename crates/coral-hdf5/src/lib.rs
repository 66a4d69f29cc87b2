//! # coral-hdf5
//!
//! Coral's local store: one HDF5 file holding weights by content hash (`HDF5Store`), in the
//! seed's layout, readable by h5py and the Python Coral.
