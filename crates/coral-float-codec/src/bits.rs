//! Bit-level I/O: LSB-first bit packing for table headers and raw fields.

/// Writes bits LSB-first into bytes.
#[derive(Debug, Default)]
pub(crate) struct BitWriter {
    pub(crate) bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends the low `width` bits of `v` (`width` ≤ 32).
    #[inline]
    pub(crate) fn put(&mut self, v: u32, width: u32) {
        debug_assert!(width <= 32);
        if width == 0 {
            return;
        }
        let v = u64::from(v) & ((1u64 << width) - 1);
        self.acc |= v << self.n;
        self.n += width;
        while self.n >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// Elias-gamma code of `v` ≥ 1: `floor(log2 v)` zero bits, then `v` in that many bits + 1.
    pub(crate) fn gamma(&mut self, v: u32) {
        let nb = 31 - v.max(1).leading_zeros();
        self.put(0, nb);
        // The top bit (1) first, then the rest LSB-first: written as one field with the
        // marker bit lowest, so the reader sees the 1 that ends the zeros.
        self.put(1, 1);
        self.put(v, nb);
    }

    /// Pads to a whole byte and returns the bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

/// Reads what [`BitWriter`] wrote. Reading past the end yields zero bits and sets
/// [`BitReader::overrun`]: callers check it once, so the hot loops carry no branch per read.
#[derive(Debug)]
pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    pub(crate) overrun: bool,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            acc: 0,
            n: 0,
            overrun: false,
        }
    }

    #[inline]
    fn refill(&mut self) {
        if self.pos + 8 <= self.data.len() && self.n <= 32 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&self.data[self.pos..self.pos + 8]);
            let take = (63 - self.n) / 8;
            let v = u64::from_le_bytes(w) & ((1u64 << (take * 8)) - 1);
            self.acc |= v << self.n;
            self.n += take * 8;
            self.pos += take as usize;
            return;
        }
        while self.n <= 56 {
            match self.data.get(self.pos) {
                Some(&b) => {
                    self.acc |= u64::from(b) << self.n;
                    self.pos += 1;
                    self.n += 8;
                }
                None => break,
            }
        }
    }

    /// The next `width` bits (`width` ≤ 32).
    #[inline]
    pub(crate) fn get(&mut self, width: u32) -> u32 {
        if width == 0 {
            return 0;
        }
        if self.n < width {
            self.refill();
            if self.n < width {
                self.overrun = true;
                self.n = width;
            }
        }
        let v = (self.acc & ((1u64 << width) - 1)) as u32;
        self.acc >>= width;
        self.n -= width;
        v
    }

    /// An Elias-gamma value of at most `max_bits` + 1 bits; `None` when longer (corrupt).
    pub(crate) fn gamma(&mut self, max_bits: u32) -> Option<u32> {
        let mut zeros = 0;
        while self.get(1) == 0 {
            zeros += 1;
            if zeros > max_bits || self.overrun {
                return None;
            }
        }
        Some(1 << zeros | self.get(zeros))
    }
}
