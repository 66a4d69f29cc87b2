//! Variable-length string attributes read without libhdf5's global-heap code.
//!
//! HDF5 keeps the bytes of a variable-length string attribute in a global heap collection
//! (`GCOL`) and trusts every length in it: a flipped bit in an object's length, in the
//! collection's, or in the attribute's own sequence length makes `H5Aread` copy past its
//! buffers (SIGSEGV) or walk the collection forever. For a store opened read-only, Coral reads
//! these strings itself: it finds the attribute's stored value in the object header (HDF5's
//! object address from `H5Oget_info`), then the object in its collection, walking the
//! collection as HDF5 does but checking every length and offset against the collection and the
//! file. Any inconsistency is an error naming what is wrong, for that attribute only; libhdf5
//! never loads the collection. (`docs/reliability.md`, "No byte can crash Coral".)

use std::os::unix::fs::FileExt;
use std::path::Path;

use hdf5_sys::h5i::hid_t;

/// Largest object header chunk, global heap collection or attribute value read (a length above
/// it is damage: Coral's and h5py's are a few KiB).
const MAX_BLOCK: u64 = 16 << 20;
/// Most object header chunks (continuations) followed in one header.
const MAX_CHUNKS: usize = 64;
/// How the error of a dataset whose object header fails the checks begins.
pub(crate) const DAMAGED: &str = "damaged object header: ";
/// Signature of the superblock.
const SUPERBLOCK: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// A read-only view of an HDF5 file's bytes with what is needed to follow its addresses.
#[derive(Debug)]
pub(crate) struct RawFile {
    file: std::fs::File,
    len: u64,
    /// File offset of address 0 (the superblock's position: after a user block, if any).
    base: u64,
}

impl RawFile {
    /// Opens `path` for reading and finds its superblock (at 0, 512, 1024, ... as HDF5 looks).
    /// Only files with 8-byte addresses and lengths are handled (HDF5's default and h5py's);
    /// others give an error, and their strings are read through libhdf5.
    pub(crate) fn open(path: &Path) -> Result<RawFile, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("opening: {e}"))?;
        let len = file
            .metadata()
            .map_err(|e| format!("reading the size: {e}"))?
            .len();
        let mut raw = RawFile { file, len, base: 0 };
        let mut at = 0u64;
        while at.checked_add(16).is_some_and(|end| end <= len) {
            let sb = raw.read(at, 16)?;
            if sb[..8] == SUPERBLOCK[..] {
                let (offsets, lengths) = match sb[8] {
                    0 | 1 => (sb[13], sb[14]),
                    _ => (sb[9], sb[10]),
                };
                if (offsets, lengths) != (8, 8) {
                    return Err(format!(
                        "superblock at {at}: {offsets}-byte addresses and {lengths}-byte lengths"
                    ));
                }
                raw.base = at;
                return Ok(raw);
            }
            at = if at == 0 { 512 } else { at.saturating_mul(2) };
        }
        Err("no superblock".to_owned())
    }

    /// `n` bytes at file offset `at`, all inside the file.
    fn read(&self, at: u64, n: u64) -> Result<Vec<u8>, String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| format!("{n} bytes at offset {at} run past the end of the file"))?;
        if n > MAX_BLOCK {
            return Err(format!("{n} bytes at offset {at}: too large"));
        }
        let mut buf = vec![0u8; (end - at) as usize];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| format!("reading {n} bytes at offset {at}: {e}"))?;
        Ok(buf)
    }

    /// `n` bytes at HDF5 address `addr`.
    fn read_addr(&self, addr: u64, n: u64) -> Result<Vec<u8>, String> {
        let at = addr
            .checked_add(self.base)
            .ok_or_else(|| format!("address {addr} is past any file"))?;
        self.read(at, n)
    }

    /// Reads the variable-length string attribute `name` of the object `obj` (which must be
    /// open in this file): `Ok(None)` when its header holds no such attribute in a form this
    /// reader knows (the caller then asks libhdf5).
    pub(crate) fn read_vlen_str(&self, obj: hid_t, name: &str) -> Result<Option<String>, String> {
        let addr = crate::h5::object_addr(obj, None)
            .ok_or_else(|| "cannot get the object's address".to_owned())?;
        let Some(value) = self.attribute_value(addr, name)? else {
            return Ok(None);
        };
        // One element: sequence length (4), collection address (8), object index (4).
        let field = |at: usize, n: usize| -> Result<u64, String> {
            let b = value
                .get(at..at + n)
                .ok_or_else(|| format!("its stored value is {} bytes", value.len()))?;
            Ok(b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
        };
        let seq_len = field(0, 4)?;
        let coll = field(4, 8)?;
        let idx = field(12, 4)?;
        if seq_len == 0 {
            return Ok(Some(String::new()));
        }
        let bytes = self.heap_object(coll, idx)?;
        if bytes.len() as u64 != seq_len {
            return Err(format!(
                "its length is {seq_len} but global heap object {idx} at {coll} holds {} bytes",
                bytes.len()
            ));
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Ok(Some(String::from_utf8_lossy(&bytes[..end]).into_owned()))
    }

    /// Opens dataset `name` of `group` once its object header has passed [`check_message`] and the attribute checks
    /// (libhdf5 decodes the layout while opening).
    pub(crate) fn open_dataset(
        &self,
        group: hid_t,
        name: &str,
    ) -> Result<crate::h5::Hid, crate::h5::H5Error> {
        let c = crate::h5::cstr(name)?;
        let Some(addr) = crate::h5::object_addr(group, Some(&c)) else {
            return Err(crate::h5::fail(format!("opening dataset {name}")));
        };
        self.attribute_value(addr, "")
            .map_err(|why| crate::h5::H5Error {
                what: format!("opening dataset {name}"),
                stack: format!("{DAMAGED}{why}"),
            })?;
        crate::h5::open_dataset(group, name)
    }

    /// Checks that every message of the object `obj`'s header, attribute messages included,
    /// lies inside its chunk, before libhdf5 reads its attributes (which trusts their sizes).
    pub(crate) fn check_header(&self, obj: hid_t) -> Result<(), String> {
        let addr = crate::h5::object_addr(obj, None)
            .ok_or_else(|| "cannot get the object's address".to_owned())?;
        // No attribute has an empty name: the walk visits (and checks) every message.
        self.attribute_value(addr, "").map(|_| ())
    }

    /// The stored value of attribute `name` in the object header at `addr` (versions 1 and 2
    /// of the header, 1 to 3 of the attribute message); `None` when not found. Every message
    /// is checked on the way (see [`check_message`]).
    fn attribute_value(&self, addr: u64, name: &str) -> Result<Option<Vec<u8>>, String> {
        let head = self.read_addr(addr, 16)?;
        // (address, length, v2 layout) of each chunk of messages.
        let mut chunks: Vec<(u64, u64)> = Vec::new();
        let v2 = &head[..4] == b"OHDR";
        let mut crt_order = false;
        if v2 {
            let flags = head[5];
            crt_order = flags & 0x04 != 0;
            let mut at = 6u64;
            if flags & 0x20 != 0 {
                at += 16;
            }
            if flags & 0x10 != 0 {
                at += 4;
            }
            let width = 1u64 << (flags & 0x03);
            let b = self.read_addr(addr.saturating_add(at), width)?;
            let size = b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x));
            chunks.push((addr.saturating_add(at + width), size));
        } else if head[0] == 1 {
            let size = u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]));
            chunks.push((addr.saturating_add(16), size));
        } else {
            return Err(format!(
                "object header at {addr}: unknown version {}",
                head[0]
            ));
        }
        let mut i = 0;
        while let Some(&(at, size)) = chunks.get(i) {
            i += 1;
            if i > MAX_CHUNKS {
                return Err(format!(
                    "object header at {addr}: more than {MAX_CHUNKS} chunks"
                ));
            }
            let mut chunk = self.read_addr(at, size)?;
            if v2 && i > 1 {
                // A continuation chunk's length counts its signature and its checksum; the
                // first chunk's size counts only its messages (the checksum follows it).
                if chunk.get(..4) != Some(b"OCHK") {
                    return Err(format!("object header chunk at {at}: no signature"));
                }
                let end = chunk.len().saturating_sub(4);
                chunk = chunk.get(4..end).map(<[u8]>::to_vec).unwrap_or_default();
            }
            let hdr = if v2 {
                4 + 2 * usize::from(crt_order)
            } else {
                8
            };
            let mut p = 0usize;
            while p + hdr <= chunk.len() {
                let (kind, msize) = if v2 {
                    (
                        u16::from(chunk[p]),
                        usize::from(u16::from_le_bytes([chunk[p + 1], chunk[p + 2]])),
                    )
                } else {
                    (
                        u16::from_le_bytes([chunk[p], chunk[p + 1]]),
                        usize::from(u16::from_le_bytes([chunk[p + 2], chunk[p + 3]])),
                    )
                };
                let data = chunk.get(p + hdr..p + hdr + msize).ok_or_else(|| {
                    format!("object header at {addr}: a message runs past its chunk")
                })?;
                match kind {
                    0x10 => {
                        let a = data.get(..8).and_then(|b| b.try_into().ok());
                        let n = data.get(8..16).and_then(|b| b.try_into().ok());
                        let (Some(a), Some(n)) = (a, n) else {
                            return Err(format!("object header at {addr}: short continuation"));
                        };
                        chunks.push((u64::from_le_bytes(a), u64::from_le_bytes(n)));
                    }
                    0x0C => {
                        if let Some(v) = attribute_message(data, name) {
                            return v
                                .map(Some)
                                .map_err(|e| format!("object header at {addr}: {e}"));
                        }
                    }
                    _ => check_message(kind, data)
                        .map_err(|e| format!("object header at {addr}: {e}"))?,
                }
                p += hdr + msize;
            }
        }
        Ok(None)
    }

    /// The bytes of object `idx` of the global heap collection at `addr`. The collection is
    /// walked from its start as HDF5 walks it; an object reached only past a damaged one
    /// (a length that runs past the collection, a zero-length free space) is an error.
    fn heap_object(&self, addr: u64, idx: u64) -> Result<Vec<u8>, String> {
        let at = |what: String| format!("global heap collection at {addr}: {what}");
        let head = self.read_addr(addr, 16)?;
        if &head[..4] != b"GCOL" || head[4] != 1 {
            return Err(at("no collection signature".to_owned()));
        }
        let size = u64::from_le_bytes(head[8..16].try_into().map_err(|_| at("short".into()))?);
        if !(16..=MAX_BLOCK).contains(&size) {
            return Err(at(format!("size {size}")));
        }
        let coll = self.read_addr(addr, size).map_err(at)?;
        let mut p = 16usize;
        while p < coll.len() {
            let Some(h) = coll.get(p..p + 16) else {
                break; // a tail too small for an object header is free space
            };
            let id = u64::from(u16::from_le_bytes([h[0], h[1]]));
            let len = u64::from_le_bytes(h[8..16].try_into().map_err(|_| at("short".into()))?);
            let body = (p as u64).checked_add(16);
            let need = if id == 0 {
                Some(len)
            } else {
                len.checked_add(7).map(|l| 16 + l / 8 * 8)
            };
            let next = need
                .and_then(|n| (p as u64).checked_add(n))
                .filter(|&n| n > p as u64 && n <= size)
                .ok_or_else(|| at(format!("object {id} at {p} has length {len}")))?;
            if id == idx && id != 0 {
                let start = body.map_or(usize::MAX, |b| b as usize);
                let end = start.saturating_add(len as usize);
                return coll
                    .get(start..end)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| at(format!("object {id} runs past the collection")));
            }
            p = next as usize;
        }
        Err(at(format!("no object {idx}")))
    }
}

/// Checks what libhdf5 trusts in a message before it decodes it: a chunked layout (versions 1
/// to 4) has a rank of at least 1 and no chunk dimension of 0 (it divides by them: SIGFPE in
/// `H5Dopen2`), all inside the message.
fn check_message(kind: u16, d: &[u8]) -> Result<(), String> {
    if kind != 0x08 {
        return Ok(());
    }
    // Version 4: class, flags, rank + 1, bytes per dimension (1 to 8), dims, index; version
    // 3: class, rank + 1, address, dims; versions 1 and 2: rank + 1, class, 5 reserved bytes,
    // address, dims (the version itself may be the flipped byte).
    let (n, at, width) = match (d.first(), d.get(1), d.get(2), d.get(3), d.get(4)) {
        (Some(4), Some(2), _, Some(&n), Some(&w)) => {
            if !(1..=8).contains(&w) {
                return Err(format!("a chunked layout with {w}-byte dimensions"));
            }
            (usize::from(n), 5, usize::from(w))
        }
        (Some(3), Some(2), Some(&n), _, _) => (usize::from(n), 11, 4),
        (Some(1 | 2), Some(&n), Some(2), _, _) => (usize::from(n), 16, 4),
        _ => return Ok(()),
    };
    let dims = d.get(at..at + width * n).ok_or_else(|| {
        format!(
            "a layout message of {} bytes for {n} chunk dimensions",
            d.len()
        )
    })?;
    let zero = dims.chunks_exact(width).any(|c| c.iter().all(|&b| b == 0));
    if n < 2 || zero {
        return Err(format!("a chunked layout of {n} dimensions, one of them 0"));
    }
    Ok(())
}

/// The stored value of an attribute message when it is named `name` (`None` otherwise).
fn attribute_message(d: &[u8], name: &str) -> Option<Result<Vec<u8>, String>> {
    let u16_at = |i: usize| {
        d.get(i..i + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let (Some(name_size), Some(dt_size), Some(ds_size)) = (u16_at(2), u16_at(4), u16_at(6)) else {
        return Some(Err("short attribute message".to_owned()));
    };
    let pad = |n: usize| {
        if d.first() == Some(&1) {
            n.div_ceil(8) * 8
        } else {
            n
        }
    };
    let name_at = match d.first() {
        Some(1 | 2) => 8,
        Some(3) => 9,
        other => return Some(Err(format!("attribute message version {other:?}"))),
    };
    // Every attribute message must hold its parts (libhdf5 copies them by these sizes, past the
    // message if they lie: SIGSEGV in H5Aexists).
    let data_at = name_at + pad(name_size) + pad(dt_size) + pad(ds_size);
    if name_size == 0 || data_at > d.len() {
        return Some(Err(format!(
            "an attribute message of {} bytes declares a {name_size}-byte name, a {dt_size}-byte type and a {ds_size}-byte space",
            d.len()
        )));
    }
    let stored = &d[name_at..name_at + name_size];
    let stored = &stored[..stored.iter().position(|&b| b == 0).unwrap_or(stored.len())];
    if stored != name.as_bytes() {
        return None;
    }
    Some(Ok(d[data_at..].to_vec()))
}

impl crate::HDF5Store {
    /// The checked reader of this store's file, when it is opened read-only (a writable store
    /// may hold attributes in HDF5's cache that are not in the file yet: libhdf5 reads those).
    pub(crate) fn raw(&self) -> Option<&RawFile> {
        if self.opts.mode != crate::Mode::Read {
            return None;
        }
        self.raw
            .get_or_init(|| {
                RawFile::open(&self.path)
                    .map_err(|e| {
                        tracing::warn!(path = %self.path.display(), error = %e, "strings are read through libhdf5");
                    })
                    .ok()
            })
            .as_ref()
    }
}

impl crate::HDF5Store {
    /// Opens a dataset for reading: through the checked header walk when the store is opened
    /// read-only ([`RawFile::open_dataset`]), else directly.
    pub(crate) fn open_dataset(
        &self,
        group: hid_t,
        name: &str,
    ) -> Result<crate::h5::Hid, crate::h5::H5Error> {
        match self.raw() {
            Some(raw) => raw.open_dataset(group, name),
            None => crate::h5::open_dataset(group, name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_message;

    /// A chunked layout message of version 4: flags 0, rank 1 + 1, dimensions of `width`
    /// bytes (`dims`), the single-chunk index (1) and an address.
    fn v4(width: u8, dims: &[u64]) -> Vec<u8> {
        let mut m = vec![4, 2, 0, dims.len() as u8, width];
        for d in dims {
            m.extend_from_slice(&d.to_le_bytes()[..usize::from(width).min(8)]);
        }
        m.push(1);
        m.extend_from_slice(&4096u64.to_le_bytes());
        m
    }

    #[test]
    fn version_4_chunked_layouts_are_checked() {
        assert!(check_message(0x08, &v4(1, &[32, 4])).is_ok());
        assert!(check_message(0x08, &v4(2, &[1000, 4])).is_ok());
        let zero = check_message(0x08, &v4(1, &[0, 4])).unwrap_err();
        assert!(zero.contains("one of them 0"), "{zero}");
        assert!(check_message(0x08, &v4(2, &[1000, 0])).is_err());
        // A rank below 1, a dimension width outside 1-8, dimensions past the message's end.
        assert!(check_message(0x08, &v4(1, &[32])).is_err());
        assert!(check_message(0x08, &v4(9, &[32, 4])).is_err());
        assert!(check_message(0x08, &v4(0, &[32, 4])).is_err());
        assert!(check_message(0x08, &v4(8, &[32, 4])[..12]).is_err());
        // Other messages, and contiguous layouts, are not this check's.
        assert!(check_message(0x01, &[4, 2, 0, 0, 0]).is_ok());
        assert!(check_message(0x08, &[4, 1, 0, 0]).is_ok());
    }
}
