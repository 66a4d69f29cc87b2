//! Just enough ZIP for NumPy's `.npz`: reading stored or deflated members, writing stored ones
//! (as `numpy.savez` does). ZIP64 archives are refused.

use std::io::{Read, Write};

/// Why an archive cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NpzError {
    /// No end-of-central-directory record.
    #[error("not a zip archive (no end of central directory)")]
    NotZip,
    /// A structure that runs outside the file or has a bad signature.
    #[error("corrupt zip archive: {0}")]
    Corrupt(String),
    /// ZIP64 or an unsupported compression method.
    #[error("unsupported zip archive: {0}")]
    Unsupported(String),
    /// Writing failed.
    #[error("writing zip: {0}")]
    Io(#[from] std::io::Error),
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, NpzError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| NpzError::Corrupt(format!("truncated at {at}")))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, NpzError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| NpzError::Corrupt(format!("truncated at {at}")))
}

/// Every member as (name, uncompressed bytes), in central-directory order.
pub fn read(file: &[u8]) -> Result<Vec<(String, Vec<u8>)>, NpzError> {
    const EOCD: u32 = 0x0605_4b50;
    let min = file.len().saturating_sub(22 + 65535);
    let eocd = (min..=file.len().saturating_sub(22))
        .rev()
        .find(|&i| u32_at(file, i).ok() == Some(EOCD))
        .ok_or(NpzError::NotZip)?;
    let entries = u16_at(file, eocd + 10)? as usize;
    let cd_size = u32_at(file, eocd + 12)?;
    let cd_off = u32_at(file, eocd + 16)?;
    if entries == 0xffff || cd_size == u32::MAX || cd_off == u32::MAX {
        return Err(NpzError::Unsupported("ZIP64".into()));
    }
    let mut out = Vec::with_capacity(entries.min(4096));
    let mut p = cd_off as usize;
    let mut names = std::collections::HashSet::new();
    for _ in 0..entries {
        if u32_at(file, p)? != 0x0201_4b50 {
            return Err(NpzError::Corrupt("bad central directory entry".into()));
        }
        let method = u16_at(file, p + 10)?;
        let crc = u32_at(file, p + 16)?;
        let csize = u32_at(file, p + 20)? as usize;
        let usize_ = u32_at(file, p + 24)? as usize;
        let nlen = u16_at(file, p + 28)? as usize;
        let elen = u16_at(file, p + 30)? as usize;
        let clen = u16_at(file, p + 32)? as usize;
        let local = u32_at(file, p + 42)? as usize;
        let name = file
            .get(p + 46..p + 46 + nlen)
            .ok_or_else(|| NpzError::Corrupt("truncated name".into()))?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| NpzError::Corrupt("member name is not UTF-8".into()))?;
        if !names.insert(name.clone()) {
            return Err(NpzError::Corrupt(format!("duplicate member {name:?}")));
        }
        p += 46 + nlen + elen + clen;
        if u32_at(file, local)? != 0x0403_4b50 {
            return Err(NpzError::Corrupt(format!("bad local header of {name:?}")));
        }
        let start =
            local + 30 + u16_at(file, local + 26)? as usize + u16_at(file, local + 28)? as usize;
        let raw = start
            .checked_add(csize)
            .and_then(|end| file.get(start..end))
            .ok_or_else(|| NpzError::Corrupt(format!("member {name:?} runs past the end")))?;
        let data = match method {
            0 => raw.to_vec(),
            8 => {
                let mut v = Vec::with_capacity(usize_.min(64 << 20));
                flate2::read::DeflateDecoder::new(raw)
                    .take(usize_ as u64 + 1)
                    .read_to_end(&mut v)
                    .map_err(|e| NpzError::Corrupt(format!("member {name:?}: {e}")))?;
                v
            }
            m => return Err(NpzError::Unsupported(format!("compression method {m}"))),
        };
        if data.len() != usize_ {
            return Err(NpzError::Corrupt(format!(
                "member {name:?} has the wrong size"
            )));
        }
        let mut c = flate2::Crc::new();
        c.update(&data);
        if c.sum() != crc {
            return Err(NpzError::Corrupt(format!("member {name:?} fails its CRC")));
        }
        out.push((name, data));
    }
    Ok(out)
}

/// Writes stored members one after another.
pub struct Writer<'a> {
    w: &'a mut dyn Write,
    pos: u64,
    central: Vec<u8>,
    count: u16,
}

impl std::fmt::Debug for Writer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("pos", &self.pos).finish()
    }
}

fn too_big(what: &str) -> NpzError {
    NpzError::Unsupported(format!("{what} needs ZIP64"))
}

impl<'a> Writer<'a> {
    /// A writer onto `w`.
    pub fn new(w: &'a mut dyn Write) -> Self {
        Writer {
            w,
            pos: 0,
            central: Vec::new(),
            count: 0,
        }
    }

    /// Adds a stored member.
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<(), NpzError> {
        let size = u32::try_from(data.len()).map_err(|_| too_big(name))?;
        let offset = u32::try_from(self.pos).map_err(|_| too_big("archive"))?;
        let nlen = u16::try_from(name.len()).map_err(|_| too_big(name))?;
        self.count = self
            .count
            .checked_add(1)
            .ok_or_else(|| too_big("member count"))?;
        let mut c = flate2::Crc::new();
        c.update(data);
        let crc = c.sum();
        let mut local = Vec::with_capacity(30 + name.len());
        local.extend(0x0403_4b50u32.to_le_bytes());
        local.extend(20u16.to_le_bytes()); // version needed
        local.extend(0u16.to_le_bytes()); // flags
        local.extend(0u16.to_le_bytes()); // stored
        local.extend(0u16.to_le_bytes()); // time
        local.extend(0x21u16.to_le_bytes()); // date 1980-01-01
        local.extend(crc.to_le_bytes());
        local.extend(size.to_le_bytes());
        local.extend(size.to_le_bytes());
        local.extend(nlen.to_le_bytes());
        local.extend(0u16.to_le_bytes());
        local.extend(name.as_bytes());
        self.w.write_all(&local)?;
        self.w.write_all(data)?;
        let c = &mut self.central;
        c.extend(0x0201_4b50u32.to_le_bytes());
        c.extend(20u16.to_le_bytes()); // made by
        c.extend(20u16.to_le_bytes()); // needed
        c.extend(0u16.to_le_bytes());
        c.extend(0u16.to_le_bytes());
        c.extend(0u16.to_le_bytes());
        c.extend(0x21u16.to_le_bytes());
        c.extend(crc.to_le_bytes());
        c.extend(size.to_le_bytes());
        c.extend(size.to_le_bytes());
        c.extend(nlen.to_le_bytes());
        c.extend([0u8; 12]); // extra, comment, disk, internal attrs, external attrs (4)
        c.extend(offset.to_le_bytes());
        c.extend(name.as_bytes());
        self.pos += local.len() as u64 + data.len() as u64;
        Ok(())
    }

    /// Writes the central directory; returns the archive's size.
    pub fn finish(self) -> Result<u64, NpzError> {
        let cd_off = u32::try_from(self.pos).map_err(|_| too_big("archive"))?;
        let cd_size = u32::try_from(self.central.len()).map_err(|_| too_big("directory"))?;
        self.w.write_all(&self.central)?;
        let mut e = Vec::with_capacity(22);
        e.extend(0x0605_4b50u32.to_le_bytes());
        e.extend([0u8; 4]);
        e.extend(self.count.to_le_bytes());
        e.extend(self.count.to_le_bytes());
        e.extend(cd_size.to_le_bytes());
        e.extend(cd_off.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        self.w.write_all(&e)?;
        Ok(self.pos + self.central.len() as u64 + 22)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn archive(members: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        for (n, d) in members {
            w.add(n, d).unwrap();
        }
        let size = w.finish().unwrap();
        assert_eq!(size as usize, out.len());
        out
    }

    #[test]
    fn reads_deflated_members() {
        let data = vec![7u8; 1000];
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let packed = enc.finish().unwrap();
        let mut z = archive(&[("a.npy".into(), packed.clone())]);
        // Patch method, crc and uncompressed size in both headers.
        let mut c = flate2::Crc::new();
        c.update(&data);
        for (hdr, m, crc, us) in [(0usize, 8, 14, 22), (30 + 5 + packed.len(), 10, 16, 24)] {
            z[hdr + m..hdr + m + 2].copy_from_slice(&8u16.to_le_bytes());
            z[hdr + crc..hdr + crc + 4].copy_from_slice(&c.sum().to_le_bytes());
            z[hdr + us..hdr + us + 4].copy_from_slice(&1000u32.to_le_bytes());
        }
        let r = read(&z).unwrap();
        assert_eq!(r, vec![("a.npy".to_string(), data)]);
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(read(b"hello"), Err(NpzError::NotZip)));
        let mut z = archive(&[("x".into(), vec![1, 2, 3])]);
        z[31 + 1] ^= 0xff; // corrupt the data
        assert!(read(&z).unwrap_err().to_string().contains("CRC"));
    }

    proptest! {
        #[test]
        fn round_trip(members in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..100), 0..5)) {
            let members: Vec<(String, Vec<u8>)> = members.into_iter().collect();
            prop_assert_eq!(read(&archive(&members)).unwrap(), members);
        }

        #[test]
        fn mutated_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut z = archive(&[("a.npy".into(), vec![1; 40]), ("b.npy".into(), vec![2; 10])]);
            for (i, b) in flips { let i = i.index(z.len()); z[i] = b; }
            let _ = read(&z);
        }
    }
}
