//! Static rANS (range asymmetric numeral systems) with 12-bit probabilities, interleaved 32-bit
//! states and 16-bit renormalisation, after Fabian Giesen's `ryg_rans`: one stream of 16-bit
//! words that every state reads from as its symbols come. Frames of version 4 have eight states,
//! one per lane of eight consecutive values (so a decoder can run the lanes side by side);
//! earlier versions have four, one per field.
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
/// Interleaved states of frames of versions 1 to 3.
pub const STATES: usize = 4;
/// Interleaved states (lanes) of frames of version 4.
pub const LANES: usize = 8;

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
    let mut bits = 0.0;
    for (&c, &f) in counts.iter().zip(&norm) {
        if c > 0 {
            bits += c as f64 * (f64::from(tb) - log2(f));
        }
    }
    bits + table_header_bits(&norm, tb) as f64
}

/// `log2(f)` for a frequency up to [`PROB_SCALE`], from a table made once per process (the
/// encoder weighs dozens of candidate tables per frame).
#[inline(always)]
pub fn log2(f: u32) -> f64 {
    static LOG2: std::sync::LazyLock<Box<[f64]>> = std::sync::LazyLock::new(|| {
        (0..=PROB_SCALE)
            .map(|f| f64::from(f.max(1)).log2())
            .collect()
    });
    LOG2.get(f as usize)
        .copied()
        .unwrap_or_else(|| f64::from(f).log2())
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
            // c <= total < 2^52 (a frame holds under 2^32 values) and target <= 2^12: no u128.
            let v = match c.checked_mul(target) {
                Some(p) => p / total,
                None => ((c as u128 * target as u128) / total as u128) as u64,
            };
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

    /// The decoding lookup, into `lut` (of [`PROB_SCALE`] entries): per slot,
    /// `symbol | (freq - 1) << 8 | start << 20`.
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

/// A symbol prepared for [`Encoder::put_sym`]: its start, frequency and the reciprocal of the
/// frequency. (`ryg_rans`'s 32-bit reciprocal is exact only below 2^31, and these states reach
/// 2^32: the quotient is taken through a 64 × 64-bit product instead.)
#[derive(Debug, Clone, Copy, Default)]
pub struct EncSymbol {
    rcp: u64,
    start: u32,
    freq: u32,
}

/// `ceil(2^44 / f)`: for every `x < 2^32` and `f` from 1 to 4096, `(x · rcp(f)) >> 44` is
/// `x / f` rounded down (the product overshoots `x / f` by less than `x / 2^44 < 2^-12 <= 1 / f`,
/// and the fraction of `x / f` is at most `1 - 1 / f`).
#[inline(always)]
const fn rcp(f: u32) -> u64 {
    (1u64 << 44).div_ceil(f as u64)
}

impl EncSymbol {
    /// The symbol's start and frequency, packed as `start | freq << 16` (what
    /// `crate::avx2::EncGroups::put` gathers).
    pub(crate) fn packed(&self) -> u32 {
        self.start | self.freq << 16
    }

    pub fn new(start: u32, freq: u32) -> Self {
        EncSymbol {
            rcp: rcp(freq.max(1)),
            start,
            freq,
        }
    }
}

/// [`rcp`] of every frequency up to [`PROB_SCALE`], for [`Encoder::put_bit`]: made once per
/// process, not per frame (a frame of 64 values would otherwise pay 4096 divisions).
static RCP: std::sync::LazyLock<Box<[u64]>> =
    std::sync::LazyLock::new(|| (0..=PROB_SCALE).map(|f| rcp(f.max(1))).collect());

/// The encoder: symbols go in in reverse order of decoding.
#[derive(Debug)]
pub struct Encoder {
    x: [u32; LANES],
    /// States in use (the first `used` of `x`).
    used: usize,
    /// Words in reverse decoding order: the first `len` are written.
    words: Vec<u16>,
    len: usize,
}

impl Encoder {
    /// An encoder of `states` states (at most [`LANES`]) for at most `symbols` symbols (each
    /// emits at most one word).
    pub fn new(states: usize, symbols: usize) -> Self {
        Encoder {
            x: [RANS_L; LANES],
            used: states.min(LANES),
            words: vec![0; symbols + LANES],
            len: 0,
        }
    }

    /// Codes a symbol on state `state` (below the encoder's states).
    #[inline(always)]
    pub fn put_sym(&mut self, state: usize, s: &EncSymbol) {
        let x = &mut self.x[state % LANES];
        // Branch-free renormalisation: the word is always written, and kept when it is due
        // (when `x >= 2^20 · freq`, the bound that keeps the next state below 2^32).
        let out = (*x >> 20) >= s.freq;
        if let Some(w) = self.words.get_mut(self.len) {
            *w = *x as u16;
        }
        self.len += usize::from(out);
        *x >>= 16 * u32::from(out);
        let q = ((u128::from(*x) * u128::from(s.rcp)) >> 44) as u32;
        *x = (q << PROB_BITS) + (*x - q * s.freq) + s.start;
    }

    /// Codes a binary symbol `bit` on state `state`, 1 having frequency `f1` (1 to
    /// [`PROB_SCALE`] - 1) and coming after 0 in the table.
    #[inline(always)]
    pub fn put_bit(&mut self, state: usize, bit: u32, f1: u32) {
        let f0 = PROB_SCALE - f1;
        let (start, freq) = if bit != 0 { (f0, f1) } else { (0, f0) };
        let s = EncSymbol {
            rcp: RCP[freq as usize],
            start,
            freq,
        };
        self.put_sym(state, &s);
    }

    /// The states, the word buffer and the count of words written in it, for an encoder that
    /// runs the lanes side by side (`crate::avx2`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn lanes(&mut self) -> (&mut [u32; LANES], &mut [u16], &mut usize) {
        (&mut self.x, &mut self.words, &mut self.len)
    }

    /// The final states (as many as the encoder has) and the words in decoding order.
    pub fn finish(mut self) -> (Vec<u32>, Vec<u16>) {
        self.words.truncate(self.len);
        self.words.reverse();
        (self.x[..self.used].to_vec(), self.words)
    }
}

/// The decoder over a word stream.
#[derive(Debug)]
pub struct Decoder<'a> {
    pub x: [u32; LANES],
    /// States in use (the first `used` of `x`).
    used: usize,
    words: &'a [u8],
    pos: usize,
    pub overrun: bool,
}

impl<'a> Decoder<'a> {
    /// States `states` (at most [`LANES`]), `words` the 16-bit words, little-endian, in
    /// decoding order.
    pub fn new(states: &[u32], words: &'a [u8]) -> Self {
        let mut x = [RANS_L; LANES];
        let used = states.len().min(LANES);
        x[..used].copy_from_slice(&states[..used]);
        Decoder {
            x,
            used,
            words,
            pos: 0,
            overrun: false,
        }
    }

    /// The word stream and the position of the next word, for a decoder that runs the lanes
    /// side by side (`crate::avx2`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn stream(&mut self) -> (&'a [u8], &mut usize) {
        (self.words, &mut self.pos)
    }

    /// Decodes one symbol with lookup `lut` on state `state` (below the decoder's states).
    #[inline(always)]
    pub fn get(&mut self, state: usize, lut: &[u32; PROB_SCALE as usize]) -> u32 {
        let x = &mut self.x[state % LANES];
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
        let x = &mut self.x[state % LANES];
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
        let x = &mut self.x[state % LANES];
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
        !self.overrun
            && self.pos == self.words.len()
            && self.x[..self.used].iter().all(|&x| x == RANS_L)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reciprocal_divides_exactly() {
        for f in 1..=PROB_SCALE {
            let r = rcp(f);
            // The quotients' edges, where a rounding error would show, and the top of the range.
            let top = (1u64 << 20) * u64::from(f);
            let xs = [
                0u64,
                1,
                u64::from(f) - 1,
                u64::from(f),
                u64::from(f) + 1,
                top.min(1 << 32) - 1,
                top.min(1 << 32) - u64::from(f),
                (1 << 32) - 1,
                (1 << 32) - u64::from(f),
                0xdead_beef,
            ];
            for x in xs {
                let x = x.min(u64::from(u32::MAX)) as u32;
                let q = ((u128::from(x) * u128::from(r)) >> 44) as u32;
                assert_eq!(q, x / f, "x {x} f {f}");
            }
            // Every multiple of f near the top, and the value just below it.
            for k in ((u64::from(u32::MAX) / u64::from(f)).saturating_sub(64))
                ..=u64::from(u32::MAX) / u64::from(f)
            {
                for x in [k * u64::from(f), (k * u64::from(f)).saturating_sub(1)] {
                    let x = x as u32;
                    let q = ((u128::from(x) * u128::from(r)) >> 44) as u32;
                    assert_eq!(q, x / f, "x {x} f {f}");
                }
            }
        }
    }
}
