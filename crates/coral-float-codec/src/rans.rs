//! Static rANS (range asymmetric numeral systems) with 12-bit probabilities, four interleaved
//! 32-bit states and 16-bit renormalisation, after Fabian Giesen's `ryg_rans`: one stream of
//! 16-bit words that every state reads from as its symbols come (the float model gives each
//! field its own state, so the decoder keeps them in registers).
//!
//! Written here rather than taken from a crate: the well-kept Rust coders (`constriction`) drive
//! one state through generic model objects, where this codec switches among dozens of tables
//! per element and needs the word layout fixed in `docs/format.md` so that other decoders (the
//! HDF5 filter plugin, a reader in another language) can follow it.

use crate::bits::{BitReader, BitWriter};
use crate::CodecError;

/// Probability precision: every table's frequencies sum to `1 << PROB_BITS`.
pub const PROB_BITS: u32 = 12;
/// Total of a table.
pub const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Lower bound of a normalised state.
pub const RANS_L: u32 = 1 << 16;
/// Interleaved states.
pub const STATES: usize = 4;

/// One coding table: per symbol its frequency and cumulative start, at [`PROB_BITS`].
#[derive(Debug, Clone)]
pub struct Table {
    /// Frequency of each symbol (0 for absent symbols), summing to [`PROB_SCALE`].
    pub freq: Vec<u32>,
    /// Cumulative start of each symbol.
    pub start: Vec<u32>,
}

/// Cost in bits of coding `counts` with a table normalised from them, and the table's own
/// serialised size: what the encoder compares when choosing contexts.
pub fn cost_bits(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let tb = table_bits(total);
    let norm = normalize(counts, tb);
    let scale = f64::from(1u32 << tb);
    let mut bits = 0.0;
    for (&c, &f) in counts.iter().zip(&norm) {
        if c > 0 {
            bits += c as f64 * (scale / f64::from(f)).log2();
        }
    }
    bits + table_header_bits(&norm, tb) as f64
}

/// The precision a table over `total` symbols is sent at: coarser for few symbols, where the
/// table's own size matters more than its accuracy.
pub fn table_bits(total: u64) -> u32 {
    let lg = 64 - total.max(1).leading_zeros();
    lg.saturating_sub(4).clamp(8, PROB_BITS)
}

/// Scales `counts` to frequencies summing to `1 << tb`, every present symbol at least 1.
pub fn normalize(counts: &[u64], tb: u32) -> Vec<u32> {
    let target = 1u64 << tb;
    let total: u64 = counts.iter().sum();
    let mut f = vec![0u32; counts.len()];
    if total == 0 {
        return f;
    }
    let mut sum = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 {
            let v = ((c as u128 * target as u128) / total as u128) as u64;
            f[i] = v.max(1) as u32;
            sum += u64::from(f[i]);
        }
    }
    // Fix the total: take from or give to the largest frequencies, which costs the least.
    let mut order: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    if sum < target {
        f[order[0]] += (target - sum) as u32;
    } else {
        // Every present symbol can give down to 1, and there are at most 256 of them
        // against a target of at least 256: this ends.
        let mut excess = sum - target;
        while excess > 0 {
            for &i in &order {
                let can = u64::from(f[i] - 1);
                let take = (u64::from(f[i]) / 16).max(1).min(can).min(excess);
                f[i] -= take as u32;
                excess -= take;
                if excess == 0 {
                    break;
                }
            }
        }
    }
    f
}

/// Serialised size of a table in bits ([`write_table`]).
pub fn table_header_bits(freq: &[u32], _tb: u32) -> u64 {
    let w = alphabet_width(freq.len());
    let (lo, hi) = span(freq);
    let mut bits = 3 + 2 * u64::from(w);
    for &f in &freq[lo..=hi] {
        bits += gamma_len(f + 1);
    }
    bits
}

fn gamma_len(v: u32) -> u64 {
    let nb = 31 - v.max(1).leading_zeros();
    u64::from(2 * nb + 1)
}

fn span(freq: &[u32]) -> (usize, usize) {
    let lo = freq.iter().position(|&f| f > 0).unwrap_or(0);
    let hi = freq.iter().rposition(|&f| f > 0).unwrap_or(0);
    (lo, hi)
}

/// Bits that hold a symbol of an alphabet of `n` symbols.
pub fn alphabet_width(n: usize) -> u32 {
    usize::BITS - n.saturating_sub(1).leading_zeros()
}

/// Writes a table normalised at `tb` bits: `tb - 8` (3 bits), the first and last present
/// symbols, then each frequency from first to last as an Elias-gamma code of `freq + 1`.
pub fn write_table(w: &mut BitWriter, freq: &[u32], tb: u32) {
    let aw = alphabet_width(freq.len());
    let (lo, hi) = span(freq);
    w.put(tb - 8, 3);
    w.put(lo as u32, aw);
    w.put(hi as u32, aw);
    for &f in &freq[lo..=hi] {
        w.gamma(f + 1);
    }
}

/// Reads a table of an alphabet of `n` symbols and scales it to [`PROB_BITS`].
pub fn read_table(r: &mut BitReader<'_>, n: usize) -> Result<Table, CodecError> {
    let aw = alphabet_width(n);
    let tb = r.get(3) + 8;
    if tb > PROB_BITS {
        return Err(CodecError::corrupt(format!("table precision {tb} bits")));
    }
    let lo = r.get(aw) as usize;
    let hi = r.get(aw) as usize;
    if lo > hi || hi >= n {
        return Err(CodecError::corrupt(format!(
            "table span {lo}..={hi} outside an alphabet of {n}"
        )));
    }
    let shift = PROB_BITS - tb;
    let mut freq = vec![0u32; n];
    let mut sum = 0u32;
    for f in &mut freq[lo..=hi] {
        let g = r
            .gamma(tb + 1)
            .ok_or_else(|| CodecError::corrupt("table frequency code too long"))?;
        *f = (g - 1) << shift;
        sum = sum.saturating_add(*f);
    }
    if r.overrun || sum != PROB_SCALE {
        return Err(CodecError::corrupt(format!(
            "table frequencies sum to {sum}, not {PROB_SCALE}"
        )));
    }
    Ok(Table::from_freq(freq))
}

impl Table {
    /// A table from frequencies summing to [`PROB_SCALE`].
    pub fn from_freq(freq: Vec<u32>) -> Self {
        let mut start = vec![0u32; freq.len()];
        let mut acc = 0;
        for (s, &f) in start.iter_mut().zip(&freq) {
            *s = acc;
            acc += f;
        }
        Table { freq, start }
    }

    /// Every symbol of an alphabet of `n` (a power of two up to [`PROB_SCALE`]) equally likely.
    pub fn uniform(n: usize) -> Self {
        Table::from_freq(vec![PROB_SCALE / n as u32; n])
    }

    /// The decoding lookup: per slot of [`PROB_SCALE`], `symbol | (freq - 1) << 8 | start << 20`.
    pub fn lookup(&self) -> Box<[u32; PROB_SCALE as usize]> {
        let mut lut = Box::new([0u32; PROB_SCALE as usize]);
        self.lookup_into(&mut lut[..]);
        lut
    }

    /// Every symbol prepared for the encoder.
    pub fn enc_symbols(&self) -> Vec<EncSymbol> {
        self.freq
            .iter()
            .zip(&self.start)
            .map(|(&f, &s)| {
                if f == 0 {
                    EncSymbol::default()
                } else {
                    EncSymbol::new(s, f)
                }
            })
            .collect()
    }

    /// [`Table::lookup`] into `lut` (of [`PROB_SCALE`] entries).
    pub fn lookup_into(&self, lut: &mut [u32]) {
        for (s, (&f, &st)) in self.freq.iter().zip(&self.start).enumerate() {
            if f == 0 {
                continue;
            }
            let v = s as u32 | (f - 1) << 8 | st << 20;
            for slot in &mut lut[st as usize..(st + f) as usize] {
                *slot = v;
            }
        }
    }
}

/// A symbol prepared for [`Encoder::put_sym`]: its start, frequency and renormalisation bound.
/// (`ryg_rans`'s integer reciprocal is exact only below 2^31, and these states reach 2^32: the
/// quotient is taken through a double instead.)
#[derive(Debug, Clone, Copy, Default)]
pub struct EncSymbol {
    x_max: u64,
    inv: f64,
    start: u32,
    freq: u32,
}

impl EncSymbol {
    pub fn new(start: u32, freq: u32) -> Self {
        Self::with_inv(start, freq, 1.0 / f64::from(freq.max(1)))
    }

    /// A symbol whose `1 / freq` the caller has at hand ([`Encoder::put_bit`]'s table).
    #[inline(always)]
    fn with_inv(start: u32, freq: u32, inv: f64) -> Self {
        EncSymbol {
            x_max: u64::from((RANS_L >> PROB_BITS) << 16) * u64::from(freq),
            inv,
            start,
            freq,
        }
    }
}

/// `1 / f` for every frequency `f` up to [`PROB_SCALE`], for [`Encoder::put_bit`]: made once
/// per process, not per frame (a frame of 64 values would otherwise pay 4096 divisions).
static INV: std::sync::LazyLock<Box<[f64]>> = std::sync::LazyLock::new(|| {
    (0..=PROB_SCALE)
        .map(|f| 1.0 / f64::from(f.max(1)))
        .collect()
});

/// The encoder: symbols go in in reverse order of decoding.
#[derive(Debug)]
pub struct Encoder {
    x: [u32; STATES],
    /// Words in reverse decoding order: the first `len` are written.
    words: Vec<u16>,
    len: usize,
}

impl Encoder {
    /// An encoder for at most `symbols` symbols (each emits at most one word).
    pub fn new(symbols: usize) -> Self {
        Encoder {
            x: [RANS_L; STATES],
            words: vec![0; symbols + STATES],
            len: 0,
        }
    }

    /// Codes a symbol on state `state` (below [`STATES`]).
    #[inline(always)]
    pub fn put_sym(&mut self, state: usize, s: &EncSymbol) {
        let x = &mut self.x[state % STATES];
        // Branch-free renormalisation: the word is always written, and kept when it is due.
        let out = u64::from(*x) >= s.x_max;
        if let Some(w) = self.words.get_mut(self.len) {
            *w = *x as u16;
        }
        self.len += usize::from(out);
        *x >>= 16 * u32::from(out);
        // The quotient through f64: x < 2^32 and freq <= 2^12, so x * (1/freq) is within 2^-19
        // of x / freq, while a quotient that is not whole is at least 2^-12 below the next
        // whole number; the 2^-14 nudge makes whole quotients exact.
        let q = (f64::from(*x) * s.inv + 1.0 / 16384.0) as u32;
        *x = (q << PROB_BITS) + (*x - q * s.freq) + s.start;
    }

    /// Codes a binary symbol `bit` on state `state`, 1 having frequency `f1` (1 to
    /// [`PROB_SCALE`] - 1) and coming after 0 in the table.
    #[inline(always)]
    pub fn put_bit(&mut self, state: usize, bit: u32, f1: u32) {
        let f0 = PROB_SCALE - f1;
        let (start, freq) = if bit != 0 { (f0, f1) } else { (0, f0) };
        let s = EncSymbol::with_inv(start, freq, INV[freq as usize]);
        self.put_sym(state, &s);
    }

    /// The final states and the words in decoding order.
    pub fn finish(mut self) -> ([u32; STATES], Vec<u16>) {
        self.words.truncate(self.len);
        self.words.reverse();
        (self.x, self.words)
    }
}

/// The decoder over a word stream.
#[derive(Debug)]
pub struct Decoder<'a> {
    pub x: [u32; STATES],
    words: &'a [u8],
    pos: usize,
    pub overrun: bool,
}

impl<'a> Decoder<'a> {
    /// `words`: the 16-bit words, little-endian, in decoding order.
    pub fn new(x: [u32; STATES], words: &'a [u8]) -> Self {
        Decoder {
            x,
            words,
            pos: 0,
            overrun: false,
        }
    }

    /// Decodes one symbol with lookup `lut` on state `state` (below [`STATES`]).
    #[inline(always)]
    pub fn get(&mut self, state: usize, lut: &[u32; PROB_SCALE as usize]) -> u32 {
        let x = &mut self.x[state % STATES];
        let slot = *x & (PROB_SCALE - 1);
        let v = lut[slot as usize];
        let freq = ((v >> 8) & 0xfff) + 1;
        let start = v >> 20;
        *x = freq * (*x >> PROB_BITS) + slot - start;
        self.renormalise(state);
        v & 0xff
    }

    /// Decodes a binary symbol on state `state`, as [`Encoder::put_bit`] coded it.
    #[inline(always)]
    pub fn get_bit(&mut self, state: usize, f1: u32) -> u32 {
        let x = &mut self.x[state % STATES];
        let slot = *x & (PROB_SCALE - 1);
        let f0 = PROB_SCALE - f1;
        let bit = u32::from(slot >= f0);
        // (f0, f1) for 1, (0, f0) for 0, without a branch (the bit is a coin toss).
        let mask = bit.wrapping_neg();
        let (start, freq) = (f0 & mask, f0 ^ ((f0 ^ f1) & mask));
        *x = freq * (*x >> PROB_BITS) + slot - start;
        self.renormalise(state);
        bit
    }

    /// Branch-free renormalisation: the next word is always read, and taken when due.
    #[inline(always)]
    fn renormalise(&mut self, state: usize) {
        let x = &mut self.x[state % STATES];
        let w = match self.words.get(self.pos..self.pos + 2) {
            Some(b) => u32::from(u16::from_le_bytes([b[0], b[1]])),
            None => 0,
        };
        let due = *x < RANS_L;
        self.overrun |= due & (self.pos + 2 > self.words.len());
        self.pos += 2 * usize::from(due);
        *x = if due { (*x << 16) | w } else { *x };
    }

    /// True when every word was read and every state is back at its start: the stream was
    /// decoded exactly as it was coded.
    pub fn finished(&self) -> bool {
        !self.overrun && self.pos == self.words.len() && self.x.iter().all(|&x| x == RANS_L)
    }
}
