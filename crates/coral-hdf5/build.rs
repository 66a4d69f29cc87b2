//! Tells the code which HDF5 API generation `hdf5-metno-sys` found: `cfg(hdf5_1_12)` from 1.12
//! on (objects are named by tokens, `H5Oget_info2` and `H5Fis_hdf5` are deprecated and absent
//! from builds without deprecated symbols), `cfg(hdf5_2)` for 2.x (`H5Dread_chunk` takes the
//! buffer's size), `cfg(hdf5_file_locking)` when `H5Pset_file_locking` exists.
//!
//! `hdf5-metno-sys` (`links = "hdf5"`) exports one `DEP_HDF5_VERSION_X_Y_Z` variable per
//! release at or below the one it links to (`hdf5-metno`'s build script reads them the same
//! way), and `DEP_HDF5_INCLUDE`, the folder of the library's headers.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hdf5_1_12)");
    println!("cargo::rustc-check-cfg=cfg(hdf5_2)");
    println!("cargo::rustc-check-cfg=cfg(hdf5_file_locking)");
    let has = |v: &str| std::env::var_os(format!("DEP_HDF5_VERSION_{v}")).is_some();
    // `H5Pset_file_locking`: 1.10.7 and later 1.10 releases, and 1.12.1 on.
    if (has("1_10_7") && !has("1_12_0")) || has("1_12_1") {
        println!("cargo::rustc-cfg=hdf5_file_locking");
    }
    if std::env::var_os("DEP_HDF5_VERSION_1_12_0").is_some() {
        println!("cargo::rustc-cfg=hdf5_1_12");
    }
    // The linked library's headers, for the test that checks the journal driver's structures
    // against them.
    if let Ok(inc) = std::env::var("DEP_HDF5_INCLUDE") {
        println!("cargo::rustc-env=CORAL_HDF5_INCLUDE={inc}");
    }
    if std::env::var_os("DEP_HDF5_VERSION_2_0_0").is_some() {
        println!("cargo::rustc-cfg=hdf5_2");
    }
}
