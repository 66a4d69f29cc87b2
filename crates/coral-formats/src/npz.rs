//! NumPy `.npz`: ZIP archives of `.npy` members, read and written with the `zip` crate, ZIP64
//! included.
//!
//! - [`read`] and [`read_member`] read any archive NumPy or Python's `zipfile` writes: stored or
//!   deflated members, data descriptors, ZIP64 end records and extra fields (an archive or a
//!   member over 4 GiB, or one written with `force_zip64=True`). Each member's size is checked
//!   against its header and its CRC-32 against its data; encrypted members, other compression
//!   methods and names given twice are refused.
//! - [`Writer`] writes stored members as `numpy.savez` does, switching a member to ZIP64 when it
//!   is 4 GiB or more (and the archive's end records when its offsets or count need it). Its
//!   output is deterministic: every time is 1980-01-01 00:00.
//!
//! # What stays hand-written: [`compact`]
//!
//! coral-s3 keeps weights and deltas as small ZIP archives whose bytes `docs/format.md` fixes
//! (version 2.0, no extra fields, no data descriptors, MS-DOS date 1980-01-01, no ZIP64). The
//! `zip` crate cannot write them, for two reasons:
//!
//! - it has no way to add a member from data that is already compressed, with its CRC computed
//!   elsewhere (only `raw_copy_file`, from another archive's member), and coral-s3 deflates a
//!   large weight in pieces on several threads ([`compact::deflate_parallel`]) that concatenate
//!   into one deflate stream;
//! - it writes other header bytes (version made by 4.6 on Unix, file permissions in the external
//!   attributes). Those bytes matter: a weight's object is put under its content hash and its
//!   metadata records the object's size and ETag, so two writers of different Coral versions
//!   putting the same weight must put the same bytes, or one's metadata could name the other's
//!   object.
//!
//! So [`compact`] writes those archives by hand; the `zip` crate reads them back like any other
//! (they are plain ZIP).

use std::io::{Read, Seek, SeekFrom, Write};

/// Members of 4 GiB or more (and archives whose offsets reach it) need ZIP64: `0xFFFF_FFFF` in a
/// 32-bit field means "see the ZIP64 extra field".
pub const ZIP64_THRESHOLD: u64 = u32::MAX as u64;

/// Bytes reserved up front for a member's data when its header claims more: a lying header
/// cannot make the reader allocate more than this before data arrives.
const RESERVE_LIMIT: u64 = 64 << 20;

/// Why an archive cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NpzError {
    /// No end-of-central-directory record.
    #[error("not a zip archive (no end of central directory)")]
    NotZip,
    /// A structure that runs outside the file, has a bad signature, a bad size or CRC.
    #[error("corrupt zip archive: {0}")]
    Corrupt(String),
    /// Encryption, an unsupported compression method, a member too large for the writer.
    #[error("unsupported zip archive: {0}")]
    Unsupported(String),
    /// The member asked for is not in the archive.
    #[error("no member {0:?} in the zip archive")]
    Missing(String),
    /// Writing failed.
    #[error("writing zip: {0}")]
    Io(#[from] std::io::Error),
}

/// The `zip` crate's error as one of ours, `what` saying where it happened.
fn from_zip(e: zip::result::ZipError, what: &str) -> NpzError {
    use zip::result::ZipError as Z;
    match e {
        Z::InvalidArchive(m) => NpzError::Corrupt(format!("{what}{m}")),
        Z::UnsupportedArchive(m) => NpzError::Unsupported(format!("{what}{m}")),
        Z::Io(e) => NpzError::Corrupt(format!("{what}{e}")),
        Z::FileNotFound => NpzError::Missing(what.trim_end_matches(": ").to_owned()),
        other => NpzError::Unsupported(format!("{what}{other}")),
    }
}

/// True when the last 64 KiB + 22 bytes hold an end-of-central-directory signature.
fn has_end_record(file: &[u8]) -> bool {
    let tail = &file[file.len().saturating_sub(22 + 65535)..];
    tail.windows(4).any(|w| w == b"PK\x05\x06")
}

fn open(file: &[u8]) -> Result<zip::ZipArchive<std::io::Cursor<&[u8]>>, NpzError> {
    zip::ZipArchive::new(std::io::Cursor::new(file)).map_err(|e| {
        if has_end_record(file) {
            from_zip(e, "")
        } else {
            NpzError::NotZip
        }
    })
}

/// How many central-directory headers follow each other from `start`: more than the `zip`
/// crate lists means names given twice (it keeps one of each name).
fn central_headers(file: &[u8], start: u64) -> usize {
    let u16_at = |at: usize| -> Option<usize> {
        let b = file.get(at..at.checked_add(2)?)?;
        Some(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let mut at = usize::try_from(start).unwrap_or(usize::MAX);
    let mut n = 0;
    while file.get(at..at.saturating_add(4)) == Some(&b"PK\x01\x02"[..]) {
        let next = (|| {
            let var = u16_at(at.checked_add(28)?)?
                .checked_add(u16_at(at.checked_add(30)?)?)?
                .checked_add(u16_at(at.checked_add(32)?)?)?;
            at.checked_add(46)?.checked_add(var)
        })();
        let Some(next) = next else { break };
        at = next;
        n += 1;
    }
    n
}

/// Reads one member whole, checking its size and CRC; `expected`, when given, is the size the
/// caller needs, checked against the header before anything is read.
fn read_file<R: Read>(
    mut f: zip::read::ZipFile<'_, R>,
    name: &str,
    expected: Option<u64>,
) -> Result<Vec<u8>, NpzError> {
    if f.encrypted() {
        return Err(NpzError::Unsupported(format!(
            "member {name:?} is encrypted"
        )));
    }
    match f.compression() {
        zip::CompressionMethod::Stored | zip::CompressionMethod::Deflated => {}
        m => {
            return Err(NpzError::Unsupported(format!(
                "member {name:?} uses compression method {m:?}"
            )))
        }
    }
    let size = f.size();
    if let Some(want) = expected.filter(|&w| w != size) {
        return Err(NpzError::Corrupt(format!(
            "member {name:?} holds {size} bytes, expected {want}"
        )));
    }
    let mut out = Vec::new();
    let reserve = usize::try_from(size.min(RESERVE_LIMIT))
        .map_err(|_| NpzError::Unsupported(format!("member {name:?} is too large")))?;
    out.try_reserve_exact(reserve)
        .map_err(|_| NpzError::Unsupported(format!("member {name:?}: cannot allocate")))?;
    (&mut f)
        .take(size.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            if e.to_string().contains("checksum") {
                NpzError::Corrupt(format!("member {name:?} fails its CRC-32 check"))
            } else {
                NpzError::Corrupt(format!("member {name:?}: {e}"))
            }
        })?;
    if out.len() as u64 != size {
        return Err(NpzError::Corrupt(format!(
            "member {name:?} has {} bytes but its header says {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// A member's name: UTF-8 bytes as stored (NumPy writes ASCII).
fn member_name<R: Read>(f: &zip::read::ZipFile<'_, R>) -> Result<String, NpzError> {
    String::from_utf8(f.name_raw().to_vec())
        .map_err(|_| NpzError::Corrupt("a member name is not UTF-8".into()))
}

/// Every member's name, in central-directory order.
pub fn names(file: &[u8]) -> Result<Vec<String>, NpzError> {
    let mut z = open(file)?;
    let mut out = Vec::with_capacity(z.len().min(4096));
    for i in 0..z.len() {
        let f = z
            .by_index_raw(i)
            .map_err(|e| from_zip(e, &format!("member {i}: ")))?;
        out.push(member_name(&f)?);
    }
    Ok(out)
}

/// Every member as (name, uncompressed bytes), in central-directory order.
pub fn read(file: &[u8]) -> Result<Vec<(String, Vec<u8>)>, NpzError> {
    let mut z = open(file)?;
    if central_headers(file, z.central_directory_start()) > z.len() {
        return Err(NpzError::Corrupt("a member name is given twice".into()));
    }
    let mut out = Vec::with_capacity(z.len().min(4096));
    let mut seen = std::collections::HashSet::new();
    for i in 0..z.len() {
        let f = z
            .by_index(i)
            .map_err(|e| from_zip(e, &format!("member {i}: ")))?;
        let name = member_name(&f)?;
        if !seen.insert(name.clone()) {
            return Err(NpzError::Corrupt(format!("duplicate member {name:?}")));
        }
        let data = read_file(f, &name, None)?;
        out.push((name, data));
    }
    Ok(out)
}

/// One member's uncompressed bytes; `expected`, when given, is the size it must have (checked
/// before anything is inflated).
pub fn read_member(file: &[u8], name: &str, expected: Option<u64>) -> Result<Vec<u8>, NpzError> {
    let mut z = open(file)?;
    let f = z
        .by_name(name)
        .map_err(|e| from_zip(e, &format!("{name}: ")))?;
    read_file(f, name, expected)
}

/// A writer that, after its first error, writes nothing more and reports success: the `zip`
/// crate finishes an archive it drops unfinished, and would print to stderr when that fails.
/// The error itself has already gone to the caller, whose file is abandoned.
struct Fuse<W> {
    inner: W,
    blown: bool,
    pos: u64,
    len: u64,
}

impl<W: Write + Seek> Fuse<W> {
    fn blow<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        if r.is_err() {
            self.blown = true;
        }
        r
    }
}

impl<W: Write + Seek> Write for Fuse<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = if self.blown {
            buf.len()
        } else {
            let r = self.inner.write(buf);
            self.blow(r)?
        };
        self.pos = self.pos.saturating_add(n as u64);
        self.len = self.len.max(self.pos);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.blown {
            return Ok(());
        }
        let r = self.inner.flush();
        self.blow(r)
    }
}

impl<W: Write + Seek> Seek for Fuse<W> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        if !self.blown {
            let r = self.inner.seek(to);
            self.pos = self.blow(r)?;
            self.len = self.len.max(self.pos);
            return Ok(self.pos);
        }
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range");
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(bad)?,
            SeekFrom::End(d) => self.len.checked_add_signed(d).ok_or_else(bad)?,
        };
        Ok(self.pos)
    }
}

/// Writes stored members one after another, as `numpy.savez` does, with ZIP64 where needed.
pub struct Writer<W: Write + Seek> {
    zip: zip::ZipWriter<Fuse<W>>,
    force_zip64: bool,
}

impl<W: Write + Seek> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("force_zip64", &self.force_zip64)
            .finish_non_exhaustive()
    }
}

impl<W: Write + Seek> Writer<W> {
    /// A writer onto `w`, from its current position.
    pub fn new(mut w: W) -> Self {
        let pos = w.stream_position().unwrap_or(0);
        Writer {
            zip: zip::ZipWriter::new(Fuse {
                inner: w,
                blown: false,
                pos,
                len: pos,
            }),
            force_zip64: false,
        }
    }

    /// Writes every member with ZIP64 fields, however small (for tests of readers).
    pub fn force_zip64(mut self, on: bool) -> Self {
        self.force_zip64 = on;
        self
    }

    /// Adds a stored member.
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<(), NpzError> {
        let large = self.force_zip64 || data.len() as u64 >= ZIP64_THRESHOLD;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(0o644)
            .large_file(large);
        self.zip
            .start_file(name, options)
            .map_err(|e| from_zip(e, &format!("member {name:?}: ")))?;
        self.zip.write_all(data)?;
        Ok(())
    }

    /// Writes the central directory; returns the archive's size.
    pub fn finish(self) -> Result<u64, NpzError> {
        let mut fuse = self
            .zip
            .finish()
            .map_err(|e| from_zip(e, "finishing the archive: "))?;
        fuse.inner.flush()?;
        Ok(fuse.inner.stream_position()?)
    }
}

pub mod compact {
    //! The archives coral-s3 writes, byte for byte as it always has (see the parent module for
    //! why these are not written with the `zip` crate): version 2.0, no extra fields, no data
    //! descriptors, no comment, every time 1980-01-01 00:00, no ZIP64 (a caller with more data
    //! than that stores it another way).

    use std::io::Write;

    use super::NpzError;

    const LOCAL_SIG: u32 = 0x0403_4b50;
    const CENTRAL_SIG: u32 = 0x0201_4b50;
    const END_SIG: u32 = 0x0605_4b50;
    /// 1980-01-01 00:00 in MS-DOS format: members carry no time, so equal content gives equal
    /// bytes.
    const DOS_DATE: u16 = (1 << 5) | 1;

    /// Input above this is deflated in independent pieces on several threads (see
    /// [`deflate_parallel`]).
    pub const DEFLATE_PIECE: usize = 4 << 20;

    /// A member to write, its body already compressed.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Member<'a> {
        /// Its name.
        pub name: &'a str,
        /// Method 8 (deflate) when true, 0 (stored) when false.
        pub deflate: bool,
        /// CRC-32 of the uncompressed data.
        pub crc: u32,
        /// Bytes of uncompressed data.
        pub uncompressed: u64,
        /// The bytes as stored in the archive.
        pub body: Vec<u8>,
    }

    impl<'a> Member<'a> {
        /// A stored member holding `body`.
        pub fn stored(name: &'a str, body: Vec<u8>) -> Self {
            Member {
                name,
                deflate: false,
                crc: crc32(&[&body]),
                uncompressed: body.len() as u64,
                body,
            }
        }
    }

    /// CRC-32 of the concatenated parts.
    pub fn crc32(parts: &[&[u8]]) -> u32 {
        let mut c = flate2::Crc::new();
        for p in parts {
            c.update(p);
        }
        c.sum()
    }

    fn too_large(what: &str) -> NpzError {
        NpzError::Unsupported(format!("{what} too large for a ZIP without ZIP64"))
    }

    /// The whole archive.
    pub fn write(members: &[Member<'_>]) -> Result<Vec<u8>, NpzError> {
        let count = u16::try_from(members.len()).map_err(|_| too_large("member count"))?;
        let mut total = 22usize;
        for m in members {
            total = m
                .body
                .len()
                .checked_add(30 + 46)
                .and_then(|n| n.checked_add(m.name.len().checked_mul(2)?))
                .and_then(|n| n.checked_add(total))
                .ok_or_else(|| too_large("archive"))?;
        }
        let mut out = Vec::new();
        out.try_reserve_exact(total)
            .map_err(|_| NpzError::Unsupported("cannot allocate the archive".into()))?;
        let mut central = Vec::new();
        let fits = |n: u64| u32::try_from(n).ok().filter(|&v| v != u32::MAX);
        for m in members {
            let (Some(offset), Some(csize), Some(usize_)) = (
                fits(out.len() as u64),
                fits(m.body.len() as u64),
                fits(m.uncompressed),
            ) else {
                return Err(too_large(&format!("member {:?}", m.name)));
            };
            let nlen = u16::try_from(m.name.len()).map_err(|_| too_large("member name"))?;
            let method: u16 = if m.deflate { 8 } else { 0 };
            let common = |buf: &mut Vec<u8>| {
                buf.extend_from_slice(&20u16.to_le_bytes()); // version needed
                buf.extend_from_slice(&0u16.to_le_bytes()); // flags
                buf.extend_from_slice(&method.to_le_bytes());
                buf.extend_from_slice(&0u16.to_le_bytes()); // time
                buf.extend_from_slice(&DOS_DATE.to_le_bytes());
                buf.extend_from_slice(&m.crc.to_le_bytes());
                buf.extend_from_slice(&csize.to_le_bytes());
                buf.extend_from_slice(&usize_.to_le_bytes());
                buf.extend_from_slice(&nlen.to_le_bytes());
                buf.extend_from_slice(&0u16.to_le_bytes()); // extra length
            };
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            common(&mut out);
            out.extend_from_slice(m.name.as_bytes());
            out.extend_from_slice(&m.body);

            central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            central.extend_from_slice(&20u16.to_le_bytes()); // version made by
            common(&mut central);
            central.extend_from_slice(&0u16.to_le_bytes()); // comment length
            central.extend_from_slice(&0u16.to_le_bytes()); // disk number
            central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(m.name.as_bytes());
        }
        let (Some(cd_offset), Some(cd_size), Some(_)) = (
            fits(out.len() as u64),
            fits(central.len() as u64),
            fits(out.len() as u64 + central.len() as u64),
        ) else {
            return Err(too_large("archive"));
        };
        out.extend_from_slice(&central);
        out.extend_from_slice(&END_SIG.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        Ok(out)
    }

    /// Deflated pieces with their index.
    type Pieces = Vec<(usize, Vec<u8>)>;

    /// Raw deflate (RFC 1951) of `header` followed by `data`, at `level` (0-9), as one stream.
    ///
    /// Input above [`DEFLATE_PIECE`] is deflated in independent pieces on several threads, as
    /// `pigz` does: each piece but the last ends with a sync flush (an empty stored block), so
    /// the pieces concatenate into one valid deflate stream. The output depends only on the
    /// input and the level, not on the number of threads.
    pub fn deflate_parallel(header: &[u8], data: &[u8], level: u32) -> Result<Vec<u8>, NpzError> {
        let nomem = || NpzError::Unsupported("cannot allocate".into());
        // The first piece is the (small) header and the start of the data; the rest are slices
        // of the data itself, never copied.
        let split = DEFLATE_PIECE.saturating_sub(header.len()).min(data.len());
        let (head, rest) = data.split_at(split);
        let mut first = Vec::new();
        first
            .try_reserve_exact(header.len() + head.len())
            .map_err(|_| nomem())?;
        first.extend_from_slice(header);
        first.extend_from_slice(head);
        let pieces: Vec<&[u8]> = std::iter::once(first.as_slice())
            .chain(rest.chunks(DEFLATE_PIECE))
            .collect();
        let last = pieces.len().saturating_sub(1);
        let level = level.min(9);
        let deflate = |i: usize, piece: &[u8]| -> Result<Vec<u8>, NpzError> {
            let mut enc = flate2::write::DeflateEncoder::new(
                Vec::with_capacity(piece.len()),
                flate2::Compression::new(level),
            );
            enc.write_all(piece)?;
            if i == last {
                Ok(enc.finish()?)
            } else {
                enc.flush()?;
                Ok(std::mem::take(enc.get_mut()))
            }
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(pieces.len())
            .max(1);
        if threads == 1 {
            let mut out = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                out.extend_from_slice(&deflate(i, p)?);
            }
            return Ok(out);
        }
        let results: Vec<Result<Pieces, NpzError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let pieces = &pieces;
                    let deflate = &deflate;
                    s.spawn(move || {
                        pieces
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % threads == t)
                            .map(|(i, p)| deflate(i, p).map(|b| (i, b)))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(NpzError::Unsupported("a deflate thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut done: Pieces = Vec::with_capacity(pieces.len());
        for r in results {
            done.extend(r?);
        }
        done.sort_by_key(|(i, _)| *i);
        let mut out = Vec::new();
        out.try_reserve_exact(done.iter().map(|(_, b)| b.len()).sum())
            .map_err(|_| nomem())?;
        for (_, b) in done {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::io::Read;

        #[test]
        fn parallel_deflate_is_one_valid_stream() {
            let n = DEFLATE_PIECE * 2 + 12345;
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (i / 7919) as u8).collect();
            let header = b"header bytes";
            let packed = deflate_parallel(header, &data, 1).unwrap();
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(&packed[..])
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(&out[..header.len()], header);
            assert_eq!(&out[header.len()..], &data[..]);
            // And through the archive and the zip crate's reader.
            let z = write(&[Member {
                name: "weight.npy",
                deflate: true,
                crc: crc32(&[header, &data]),
                uncompressed: (header.len() + n) as u64,
                body: packed,
            }])
            .unwrap();
            let back = super::super::read_member(&z, "weight.npy", Some(out.len() as u64)).unwrap();
            assert_eq!(back, out);
        }

        /// The exact bytes of a one-member stored archive, as docs/format.md describes them.
        #[test]
        fn stored_archive_bytes() {
            let z = write(&[Member::stored("a", vec![1, 2, 3])]).unwrap();
            let crc = crc32(&[&[1, 2, 3]]).to_le_bytes();
            let mut want = Vec::new();
            want.extend_from_slice(b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00");
            want.extend_from_slice(&crc);
            want.extend_from_slice(
                b"\x03\x00\x00\x00\x03\x00\x00\x00\x01\x00\x00\x00a\x01\x02\x03",
            );
            want.extend_from_slice(b"PK\x01\x02\x14\x00\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00");
            want.extend_from_slice(&crc);
            want.extend_from_slice(b"\x03\x00\x00\x00\x03\x00\x00\x00\x01\x00\x00\x00");
            want.extend_from_slice(&[0; 14]);
            want.extend_from_slice(b"a");
            want.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00\x01\x00\x01\x00\x2f\x00\x00\x00\x22\x00\x00\x00\x00\x00");
            assert_eq!(z, want);
        }

        #[test]
        fn refuses_what_needs_zip64() {
            let m = Member {
                name: "big",
                deflate: false,
                crc: 0,
                uncompressed: u64::from(u32::MAX),
                body: Vec::new(),
            };
            let err = write(&[m]).unwrap_err().to_string();
            assert!(err.contains("without ZIP64"), "{err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn archive(members: &[(String, Vec<u8>)], zip64: bool) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut w = Writer::new(&mut out).force_zip64(zip64);
        for (n, d) in members {
            w.add(n, d).unwrap();
        }
        let size = w.finish().unwrap();
        let out = out.into_inner();
        assert_eq!(size as usize, out.len());
        out
    }

    #[test]
    fn reads_deflated_members() {
        let data = vec![7u8; 1000];
        let header = b"\x93NUMPY";
        let body = compact::deflate_parallel(header, &data, 6).unwrap();
        let z = compact::write(&[compact::Member {
            name: "a.npy",
            deflate: true,
            crc: compact::crc32(&[header, &data]),
            uncompressed: 1006,
            body,
        }])
        .unwrap();
        let r = read(&z).unwrap();
        let mut want = header.to_vec();
        want.extend_from_slice(&data);
        assert_eq!(r, vec![("a.npy".to_string(), want)]);
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(read(b"hello"), Err(NpzError::NotZip)));
        assert!(matches!(read(b""), Err(NpzError::NotZip)));
        let mut z = archive(&[("x".into(), vec![1, 2, 3])], false);
        let at = z.windows(3).position(|w| w == [1, 2, 3]).unwrap();
        z[at + 1] ^= 0xff; // corrupt the data
        let err = read(&z).unwrap_err().to_string();
        assert!(err.contains("CRC"), "{err}");
        assert!(!err.contains('\n'));
        let z = archive(&[("x".into(), vec![1, 2, 3])], false);
        let err = read_member(&z, "x", Some(4)).unwrap_err().to_string();
        assert!(err.contains("expected 4"), "{err}");
        let err = read_member(&z, "y", None).unwrap_err().to_string();
        assert_eq!(err, "no member \"y\" in the zip archive");
    }

    #[test]
    fn refuses_duplicate_members() {
        let z = compact::write(&[
            compact::Member::stored("a.npy", vec![1]),
            compact::Member::stored("a.npy", vec![2]),
        ])
        .unwrap();
        let err = read(&z).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("given twice"), "{err}");
    }

    #[test]
    fn zip64_members_are_marked_and_read() {
        let members = vec![("a.npy".to_string(), vec![5u8; 100])];
        let plain = archive(&members, false);
        let z64 = archive(&members, true);
        // The ZIP64 extra field's header id, 0x0001, with its size.
        assert!(!plain.windows(2).any(|w| w == [0x01, 0x00]) || plain.len() < z64.len());
        assert!(z64.len() > plain.len());
        assert_eq!(read(&z64).unwrap(), members);
        assert_eq!(read(&plain).unwrap(), members);
    }

    #[test]
    fn writes_are_deterministic() {
        let members = vec![("w.npy".to_string(), vec![1u8; 10])];
        assert_eq!(archive(&members, false), archive(&members, false));
    }

    /// A writer that fails after `budget` bytes.
    struct Failing {
        budget: usize,
        pos: u64,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if buf.len() > self.budget {
                return Err(std::io::Error::other("disk full"));
            }
            self.budget -= buf.len();
            self.pos += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Seek for Failing {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            if let SeekFrom::Start(p) = to {
                self.pos = p;
            }
            Ok(self.pos)
        }
    }

    #[test]
    fn write_errors_are_returned() {
        for budget in [0, 10, 40, 200] {
            let mut w = Writer::new(Failing { budget, pos: 0 });
            let r = w
                .add("a.npy", &[0u8; 100])
                .and_then(|_| w.add("b.npy", &[1u8; 100]));
            let r = r.and_then(|_| w.finish().map(|_| ()));
            assert!(r.is_err(), "budget {budget}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(
            members in proptest::collection::btree_map("[a-z]{1,8}\\.npy", proptest::collection::vec(any::<u8>(), 0..100), 0..5),
            zip64 in any::<bool>(),
        ) {
            let members: Vec<(String, Vec<u8>)> = members.into_iter().collect();
            let z = archive(&members, zip64);
            prop_assert_eq!(read(&z).unwrap(), members.clone());
            let names: Vec<String> = members.iter().map(|(n, _)| n.clone()).collect();
            prop_assert_eq!(super::names(&z).unwrap(), names);
            for (n, d) in &members {
                prop_assert_eq!(&read_member(&z, n, Some(d.len() as u64)).unwrap(), d);
            }
        }

        #[test]
        fn mutated_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), zip64 in any::<bool>()) {
            let mut z = archive(&[("a.npy".into(), vec![1; 40]), ("b.npy".into(), vec![2; 10])], zip64);
            for (i, b) in flips { let i = i.index(z.len()); z[i] = b; }
            let _ = read(&z);
            let _ = names(&z);
            let _ = read_member(&z, "a.npy", Some(40));
        }
    }
}
