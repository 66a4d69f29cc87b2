//! What a file is, from its first bytes: the formats Coral reads, and the model formats it does
//! not, so that a refusal can say "model.bin is a PyTorch pickle checkpoint" rather than report
//! a safetensors header length that runs beyond the file.
//!
//! | kind | how it is recognised |
//! |---|---|
//! | [`FileKind::Npy`] | the magic `\x93NUMPY` |
//! | [`FileKind::PyTorchZip`] | a ZIP archive with a member named `data.pkl` or `…/data.pkl` (what `torch.save` writes since PyTorch 1.6) |
//! | [`FileKind::Zip`] | any other ZIP archive (`PK\x03\x04`, or `PK\x05\x06` for an empty one): an `.npz` |
//! | [`FileKind::Pickle`] | `\x80` then a protocol byte 2 to 5 (`torch.save` before 1.6, `pickle.dump`) |
//! | [`FileKind::Gguf`] | the magic `GGUF` (llama.cpp) |
//! | [`FileKind::Hdf5`] | the HDF5 signature `\x89HDF\r\n\x1a\n` (Keras `.h5`, a Coral HDF5 store) |
//! | [`FileKind::Safetensors`] | no magic: a little-endian header length that fits the file, followed by `{` |
//!
//! The checks are in that order: a file with a magic is never taken for safetensors.

/// What a file is. See the module doc for how each is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileKind {
    /// Looks like safetensors (a header length that fits, then `{`).
    Safetensors,
    /// NumPy `.npy`.
    Npy,
    /// A ZIP archive that is not a PyTorch checkpoint: an `.npz` if its members are `.npy`.
    Zip,
    /// A PyTorch checkpoint in its ZIP form.
    PyTorchZip,
    /// A Python pickle (a PyTorch checkpoint in its legacy form, or any `pickle.dump`).
    Pickle {
        /// The pickle protocol (2 to 5).
        protocol: u8,
    },
    /// A GGUF file (llama.cpp).
    Gguf {
        /// The format version in its header, when the file is long enough to hold one.
        version: Option<u32>,
    },
    /// An HDF5 file.
    Hdf5,
    /// Nothing Coral recognises.
    Unknown,
}

impl FileKind {
    /// True for the kinds Coral reads models from: safetensors, `.npy`, `.npz`.
    pub fn is_readable(self) -> bool {
        matches!(self, FileKind::Safetensors | FileKind::Npy | FileKind::Zip)
    }

    /// What it is in words, to follow "is": "a PyTorch pickle checkpoint".
    pub fn describe(self) -> String {
        match self {
            FileKind::Safetensors => "a safetensors file".to_owned(),
            FileKind::Npy => "a NumPy .npy file".to_owned(),
            FileKind::Zip => "a ZIP archive".to_owned(),
            FileKind::PyTorchZip => "a PyTorch zip checkpoint".to_owned(),
            FileKind::Pickle { protocol } => {
                format!("a PyTorch pickle checkpoint (Python pickle protocol {protocol})")
            }
            FileKind::Gguf { version: Some(v) } => format!("a GGUF file (llama.cpp, version {v})"),
            FileKind::Gguf { version: None } => "a GGUF file (llama.cpp)".to_owned(),
            FileKind::Hdf5 => "an HDF5 file".to_owned(),
            FileKind::Unknown => "of no format Coral recognises".to_owned(),
        }
    }
}

/// The name PyTorch gives the pickle inside its ZIP checkpoints (`archive/data.pkl`).
fn is_torch_member(name: &[u8]) -> bool {
    name == b"data.pkl" || name.ends_with(b"/data.pkl")
}

/// The name of the first member, read from the first local header.
fn first_member_name(bytes: &[u8]) -> Option<&[u8]> {
    let nlen = usize::from(u16::from_le_bytes([*bytes.get(26)?, *bytes.get(27)?]));
    bytes.get(30..30usize.checked_add(nlen)?)
}

/// What `bytes`, the whole file or at least its first few kilobytes, hold. With only a prefix a
/// PyTorch ZIP checkpoint is still recognised when its first member is its `data.pkl` (as
/// `torch.save` writes it); with the whole file, any member named so is found.
pub fn detect(bytes: &[u8]) -> FileKind {
    if bytes.starts_with(crate::npy::MAGIC) {
        return FileKind::Npy;
    }
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        let torch = first_member_name(bytes).is_some_and(is_torch_member)
            || crate::npz::names(bytes)
                .is_ok_and(|names| names.iter().any(|n| is_torch_member(n.as_bytes())));
        return if torch {
            FileKind::PyTorchZip
        } else {
            FileKind::Zip
        };
    }
    if let [0x80, protocol @ 2..=5, ..] = bytes {
        return FileKind::Pickle {
            protocol: *protocol,
        };
    }
    if bytes.starts_with(b"GGUF") {
        let version = bytes
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes);
        return FileKind::Gguf { version };
    }
    if bytes.starts_with(b"\x89HDF\r\n\x1a\n") {
        return FileKind::Hdf5;
    }
    if let Some(first) = bytes.get(..8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(first);
        let n = u64::from_le_bytes(b);
        if n >= 2 && n <= (bytes.len() as u64).saturating_sub(8) && bytes.get(8) == Some(&b'{') {
            return FileKind::Safetensors;
        }
    }
    FileKind::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn torch_zip(first: &str) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = crate::npz::Writer::new(&mut out);
        w.add(first, b"\x80\x02}q\x00.").unwrap();
        w.add("archive/data/0", &[0u8; 16]).unwrap();
        if first != "archive/data.pkl" {
            w.add("archive/data.pkl", b"\x80\x02}q\x00.").unwrap();
        }
        w.finish().unwrap();
        out.into_inner()
    }

    #[test]
    fn recognises_each_kind() {
        let (st, _) = crate::safetensors::build_header(&[]).unwrap();
        let mut npy =
            crate::npy::header_bytes(coral_core::DType::U8, &[1], crate::npy::NonNumpy::Refuse)
                .unwrap();
        npy.push(0);
        let mut npz = std::io::Cursor::new(Vec::new());
        let mut w = crate::npz::Writer::new(&mut npz);
        w.add("a.npy", &npy).unwrap();
        w.finish().unwrap();
        let empty_npz = {
            let mut c = std::io::Cursor::new(Vec::new());
            crate::npz::Writer::new(&mut c).finish().unwrap();
            c.into_inner()
        };
        let cases: Vec<(Vec<u8>, FileKind)> = vec![
            (st, FileKind::Safetensors),
            (npy, FileKind::Npy),
            (npz.into_inner(), FileKind::Zip),
            (empty_npz, FileKind::Zip),
            (torch_zip("archive/data.pkl"), FileKind::PyTorchZip),
            (torch_zip("archive/version"), FileKind::PyTorchZip),
            (
                b"\x80\x04\x95\x10\x00\x00\x00".to_vec(),
                FileKind::Pickle { protocol: 4 },
            ),
            (
                b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.".to_vec(),
                FileKind::Pickle { protocol: 2 },
            ),
            (b"\x80\x06".to_vec(), FileKind::Unknown),
            (
                b"GGUF\x03\x00\x00\x00\x00".to_vec(),
                FileKind::Gguf { version: Some(3) },
            ),
            (b"GGUF".to_vec(), FileKind::Gguf { version: None }),
            (b"\x89HDF\r\n\x1a\n\x00\x00".to_vec(), FileKind::Hdf5),
            (
                b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec(),
                FileKind::Unknown,
            ),
            (Vec::new(), FileKind::Unknown),
            (b"hello, I am not a model".to_vec(), FileKind::Unknown),
        ];
        for (bytes, want) in cases {
            assert_eq!(detect(&bytes), want, "{:?}", &bytes[..bytes.len().min(16)]);
        }
        assert!(FileKind::Pickle { protocol: 4 }
            .describe()
            .starts_with("a PyTorch pickle checkpoint"));
        assert!(!FileKind::PyTorchZip.is_readable());
        assert!(FileKind::Zip.is_readable());
    }

    #[test]
    fn a_prefix_is_enough_for_torch_zips() {
        let z = torch_zip("archive/data.pkl");
        assert_eq!(detect(&z[..64]), FileKind::PyTorchZip);
        assert_eq!(detect(&torch_zip("archive/version")[..64]), FileKind::Zip);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = detect(&bytes).describe();
        }
    }
}
