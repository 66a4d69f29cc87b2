//! The float model: fields, contexts, table choice, and the coding passes (`docs/format.md`,
//! "The Coral float codec", is the normative description).
//!
//! A value is split into sign `s`, exponent `e`, the top [`MT`] mantissa bits `m` and the low
//! mantissa bits `r` (16 for f32, 3 for f16, none for bf16). Signs are coded with an adaptive
//! estimate per column, or kept as a bitmap; `e` is coded with a table chosen by a mean of the
//! exponents before it in its row (from version 4 moved once per group of [`LANES`] values) and
//! its column; `m` with a table per exponent bucket (from
//! version 3 either a full table or a binned one: a frequency per eight mantissa values); `r`,
//! per block of [`BLOCK`] values, after a block level that says which of its low bits are all
//! zero, coded or kept as raw bytes. Version 4 codes the values of a group on [`LANES`] states,
//! value `k` of a group on state `k` (`decode_lanes`); versions 1 to 3 coded each field on a
//! state of its own, value after value (`decode_fields`), and version 1 frames (no columns,
//! signs as a bitmap) decode there with one column.

use crate::bits::{BitReader, BitWriter};
use crate::rans::{self, Decoder, EncSymbol, Encoder, Table, LANES, PROB_SCALE};
use crate::{CodecError, Kind};

/// Fewer values than this are stored: tables would cost more than they save.
pub(crate) const MIN_VALUES: usize = 64;
/// Values per block of the low-bits levels.
pub(crate) const BLOCK: usize = 128;
/// Exponent contexts before merging: the running mean's distance from the base in half
/// exponents, -16..=15.
const E_CTX_FULL: usize = 32;
/// Mantissa bits modelled per exponent bucket.
const MT: u32 = 7;
/// Bins of a binned mantissa table (version 3): one frequency for each value of the top three of
/// the [`MT`] bits, shared by the sixteen mantissas under it.
const BINS: usize = 8;
/// Mantissas per bin.
const PER_BIN: usize = (1 << MT) / BINS;
/// Precision of a binned table: its frequencies sum to `1 << BIN_BITS`, so that every mantissa
/// taking its bin's frequency gives a table summing to [`PROB_SCALE`].
const BIN_BITS: u32 = 8;
const _: () = assert!(PER_BIN << BIN_BITS == PROB_SCALE as usize);
/// Columns the column models track at most (version 2): longer rows are one column.
pub(crate) const MAX_COLS: usize = 1 << 20;

/// How a frame keeps its signs (version 2; version 1 has only the first two, as a flag).
pub(crate) const SIGNS_NONE: u32 = 0;
pub(crate) const SIGNS_RAW: u32 = 1;
pub(crate) const SIGNS_CODED: u32 = 2;

/// The bit layout of a kind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub width: u32,
    pub ebits: u32,
    pub mbits: u32,
    /// Low mantissa bits below the top [`MT`].
    pub rb: u32,
}

impl Layout {
    fn of(kind: Kind) -> Layout {
        let (width, ebits, mbits) = match kind {
            Kind::Bf16 => (16, 8, 7),
            Kind::F16 => (16, 5, 10),
            Kind::F32 | Kind::Bytes => (32, 8, 23),
        };
        Layout {
            width,
            ebits,
            mbits,
            rb: mbits - MT,
        }
    }
    pub(crate) fn bytes(self) -> usize {
        (self.width / 8) as usize
    }
    pub(crate) fn e_alpha(self) -> usize {
        1 << self.ebits
    }
    /// f32: the low bits are two bytes, R1 (high) and R0.
    pub(crate) fn two_bytes(self) -> bool {
        self.rb == 16
    }
    fn r1_alpha(self) -> usize {
        if self.two_bytes() {
            256
        } else {
            1 << self.rb
        }
    }
    #[inline(always)]
    fn store(self, dst: &mut [u8], i: usize, v: u32) {
        if self.width == 16 {
            dst[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_le_bytes());
        } else {
            dst[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    #[inline(always)]
    fn exp(self, v: u32) -> u32 {
        (v >> self.mbits) & ((1 << self.ebits) - 1)
    }
    #[inline(always)]
    fn man(self, v: u32) -> u32 {
        (v >> self.rb) & ((1 << MT) - 1)
    }
    #[inline(always)]
    fn rest(self, v: u32) -> u32 {
        v & ((1 << self.rb) - 1)
    }
    /// The level of a block's low bits: 2 all zero, 1 the low byte zero (f32), 0 otherwise.
    fn level(self, rest_or: u32) -> u32 {
        if rest_or == 0 {
            2
        } else if self.two_bytes() && rest_or & 0xff == 0 {
            1
        } else {
            0
        }
    }
}

/// The table slots of a frame, in header order: Z, E × ne, M × nb, R1 × 2, R0.
#[derive(Debug, Clone, Copy)]
struct Slots {
    ne: usize,
    nb: usize,
}

impl Slots {
    const Z: usize = 0;
    fn e(self, c: usize) -> usize {
        1 + c
    }
    fn m(self, b: usize) -> usize {
        1 + self.ne + b
    }
    fn r1(self, z: usize) -> usize {
        1 + self.ne + self.nb + z
    }
    /// True for a mantissa slot (M₀..M₍nb−1₎).
    fn is_m(self, slot: usize) -> bool {
        (self.m(0)..self.r1(0)).contains(&slot)
    }
    fn r0(self) -> usize {
        3 + self.ne + self.nb
    }
    fn count(self) -> usize {
        4 + self.ne + self.nb
    }
    /// The alphabet of a slot, and whether it may be raw (whole bytes only).
    fn alphabet(self, l: Layout, slot: usize) -> (usize, bool) {
        if slot == Self::Z {
            (3, false)
        } else if slot <= self.ne {
            (l.e_alpha(), false)
        } else if slot < self.r1(0) {
            (1 << MT, false)
        } else if slot < self.r0() {
            (l.r1_alpha(), l.two_bytes())
        } else {
            (256, true)
        }
    }
}

/// The exponent context of a running mean `a` (in sixteenths) around `e_base`.
#[inline(always)]
fn e_ctx_full(a: i32, e_base: i32) -> usize {
    (((a + 4) >> 3) - 2 * e_base + 16).clamp(0, E_CTX_FULL as i32 - 1) as usize
}

#[cfg(test)]
mod ctx_tests {
    use super::*;

    #[test]
    fn mantissas_take_the_cheapest_table() {
        // A density falling smoothly across the binade: binned.
        let smooth: Vec<u64> = (0..128u64).map(|m| 4000 - 20 * m).collect();
        assert_eq!(mantissa_code(&smooth).0, MantissaCode::Binned);
        // Every value equally likely: no table at all.
        assert_eq!(mantissa_code(&[1000u64; 128]).0, MantissaCode::Flat);
        // Four values only (weights rounded to two mantissa bits): a full table.
        let coarse: Vec<u64> = (0..128u64)
            .map(|m| if m % 32 == 0 { 5000 } else { 0 })
            .collect();
        assert_eq!(mantissa_code(&coarse).0, MantissaCode::Full);
        // A binned table expands to one of PROB_SCALE, each mantissa at its bin's frequency.
        let f = rans::normalize(&bin_counts(&smooth), BIN_BITS);
        let full = expand_bins(&f);
        assert_eq!(full.iter().sum::<u32>(), PROB_SCALE);
        assert!(full[..PER_BIN].iter().all(|&x| x == f[0]));
    }

    /// Values like weights, with specials and low-precision stretches; with `lean`, each
    /// column of rows of `lean` values keeps one sign nine times in ten (coded signs); with
    /// `few_low`, f32 low bits take four values (coded low bytes).
    fn sample(kind: Kind, n: usize, seed: u64, lean: usize, few_low: bool) -> Vec<u8> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..n)
            .flat_map(|i| {
                let r = next();
                let scale = [1e-3f32, 0.02, 0.5, 3.0][(i / 300) % 4];
                let mut g = ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.45) as f32 * scale;
                if lean > 0 {
                    let col_sign = ((i % lean) as u64).wrapping_mul(0x9E37_79B9) >> 13 & 1 == 1;
                    g = g.abs() * if col_sign ^ (r >> 60 == 0) { -1.0 } else { 1.0 };
                }
                let mut bits = match r % 97 {
                    0 => f32::NAN.to_bits() | (r as u32 & 0x3f_ffff),
                    1 => f32::INFINITY.to_bits(),
                    2 => 0x8000_0000,
                    3 => 1,
                    _ => g.to_bits(),
                };
                if few_low {
                    bits = bits & 0xffff_0000
                        | [0x1234, 0x8001, 0x00ff, 0x4000][(r >> 40) as usize % 4];
                }
                if (i / 1000) % 3 == 1 {
                    bits &= 0xffff_ff00;
                }
                match kind {
                    Kind::F32 => bits.to_le_bytes().to_vec(),
                    _ => ((bits >> 16) as u16).to_le_bytes().to_vec(),
                }
            })
            .collect()
    }

    #[test]
    fn the_lanes_code_alike_with_and_without_avx2() {
        for kind in [Kind::Bf16, Kind::F32, Kind::F16] {
            let (mut coded_signs, mut coded_low) = (0, 0);
            for (n, cols) in [
                (5000, 1),
                (4999, 7),
                (6000, 8),
                (6007, 24),
                (9000, 300),
                (777, 13),
                (64, 64),
            ] {
                for (seed, lean, few_low) in [
                    (1u64, 0, false),
                    (2, 0, true),
                    (3, cols, false),
                    (4, cols, true),
                ] {
                    let data = sample(kind, n, seed ^ cols as u64, lean, few_low);
                    let mut frame = Vec::new();
                    crate::encode_rows(kind, &data, cols, &mut frame).unwrap();
                    if frame[3] != 1 {
                        continue;
                    }
                    let body = &frame[crate::HEADER_BYTES..];
                    // The table header's signs mode: bits 17 and 18 of its bit stream.
                    let hdr = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                    coded_signs += usize::from((hdr >> 17) & 3 == SIGNS_CODED);
                    // A frame whose raw part is shorter than a byte a value codes low bytes.
                    let hlen = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                    let signs = if (hdr >> 17) & 3 == SIGNS_RAW {
                        n.div_ceil(8)
                    } else {
                        0
                    };
                    let at = 4 + hlen + signs;
                    let rlen =
                        u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
                    coded_low += usize::from((rlen as usize) < n);
                    // The encoder writes the same frame value by value.
                    let mut scalar = frame[..crate::HEADER_BYTES].to_vec();
                    encode_with(kind, &data, cols.min(n), &mut scalar, false);
                    assert!(scalar == frame, "{kind:?} n {n} cols {cols}: frames differ");
                    for simd in [false, true] {
                        let mut out = vec![0u8; data.len()];
                        decode_with(kind, frame[2], body, &mut out, simd).unwrap();
                        assert!(out == data, "{kind:?} n {n} cols {cols} simd {simd}");
                    }
                    // A flipped byte in the coded words: both ways the same answer.
                    let mut bad = body.to_vec();
                    let at = bad.len() - 1 - (seed as usize * 31) % (bad.len() / 3);
                    bad[at] ^= 0x21;
                    let (mut a, mut b) = (vec![0u8; data.len()], vec![0u8; data.len()]);
                    let ra = decode_with(kind, frame[2], &bad, &mut a, false).map(|_| a);
                    let rb = decode_with(kind, frame[2], &bad, &mut b, true).map(|_| b);
                    assert_eq!(ra.is_ok(), rb.is_ok(), "{kind:?} n {n} cols {cols}");
                    if let (Ok(a), Ok(b)) = (ra, rb) {
                        assert!(a == b);
                    }
                }
            }
            assert!(
                coded_signs >= 4,
                "{kind:?}: {coded_signs} frames code their signs"
            );
            if kind == Kind::F32 {
                assert!(coded_low >= 4, "{coded_low} frames code their low bytes");
            }
        }
    }

    #[test]
    fn a_sample_of_noise_keeps_the_low_bytes_raw() {
        // Flat counts (noise): raw, without counting the rest.
        let flat = vec![100u64; 256];
        assert!(!low_bits_pay(&[flat.clone(), flat.clone()].concat(), &flat));
        // Any of the three skewed: count them all.
        let mut skewed = flat.clone();
        skewed[7] = 20_000;
        assert!(low_bits_pay(
            &[flat.clone(), flat.clone()].concat(),
            &skewed
        ));
        assert!(low_bits_pay(&[flat.clone(), skewed].concat(), &flat));
        // Levels without values say nothing.
        assert!(!low_bits_pay(&vec![0; 512], &[0; 256]));
    }

    #[test]
    fn the_group_mean_moves_a_quarter_of_the_way_per_group() {
        // Eight values of exponent 120 from a mean of 100 (in sixteenths): 1/64 of the way per
        // value, so 8/64 of the distance.
        assert_eq!(
            group_mean(100 << 4, 8 * 120, 8),
            (100 << 4) + (((20 << 4) * 8) >> 6)
        );
        // A short last group moves it less; a steady exponent leaves it where it is.
        assert_eq!(
            group_mean(100 << 4, 3 * 120, 3),
            (100 << 4) + (((20 << 4) * 3) >> 6)
        );
        assert_eq!(group_mean(77 << 4, 8 * 77, 8), 77 << 4);
    }

    #[test]
    fn the_v2_context_is_the_mixed_means_context() {
        for e_base in [0, 1, 60, 120, 127, 200, 255] {
            for a in (0..=255 << 4).step_by(7) {
                for col in (0..=255 << 4).step_by(13) {
                    let mean = (5 * a + 3 * col) >> 3;
                    assert_eq!(
                        e_ctx_v2(a, col_term(col, e_base)),
                        e_ctx_full(mean, e_base),
                        "a {a} col {col} base {e_base}"
                    );
                }
            }
        }
    }
}

/// The full contexts merged into `ne`, centred on the base.
fn merge_map(ne: usize) -> [u8; E_CTX_FULL] {
    let mut m = [0u8; E_CTX_FULL];
    for (c, v) in m.iter_mut().enumerate() {
        *v = (c as i32 - 16 + (ne / 2) as i32).clamp(0, ne as i32 - 1) as u8;
    }
    m
}

/// The running mean of the exponents, in sixteenths: 1/32 of the way to each new one.
#[inline(always)]
fn ema(a: i32, e: u32) -> i32 {
    a + ((((e as i32) << 4) - a) >> 5)
}

/// The row's running mean of version 4, moved once per group of [`LANES`] values after the
/// group: `cnt` values of exponent sum `sum` take it 1/64 of the way to each
/// (`a += (16 sum - cnt a) >> 6`), so that every value of a group is coded with the same mean.
#[inline(always)]
pub(crate) fn group_mean(a: i32, sum: i32, cnt: i32) -> i32 {
    a + (((sum << 4) - cnt * a) >> 6)
}

/// The exponent context of version 2: [`e_ctx_full`] of a mean five eighths the row's
/// running mean `a` and three eighths the column's `col` (a weight matrix's columns differ in
/// scale as its rows do), `e_ctx_full(((5 * a + 3 * col) >> 3), e_base)`.
///
/// Computed as `(5a + k) >> 6` with `k` = [`col_term`], the same value (nested floor divisions
/// compose): the column's part is ready long before `a` is, so the decoder's chain from one
/// exponent to the next is no longer than version 1's.
#[inline(always)]
fn e_ctx_v2(a: i32, k: i32) -> usize {
    ((5 * a + k) >> 6).clamp(0, E_CTX_FULL as i32 - 1) as usize
}

/// The column's part of [`e_ctx_v2`]: `3 * col + 32 + 64 * (16 - 2 * e_base)`.
#[inline(always)]
pub(crate) fn col_term(col: i32, e_base: i32) -> i32 {
    3 * col + 32 + 64 * (16 - 2 * e_base)
}

/// The running mean of a column's exponents, in sixteenths: 1/16 of the way to each new one.
#[inline(always)]
fn col_ema(a: i32, e: u32) -> i32 {
    a + ((((e as i32) << 4) - a) >> 4)
}

/// A column's sign model (version 2): two running estimates of P(sign = 1) in 1/65536, one
/// fast (1/32 of the way to each sign) and one slow (1/256); their mean is the probability.
#[derive(Debug, Clone, Copy)]
struct SignModel {
    fast: i32,
    slow: i32,
}

impl SignModel {
    const START: SignModel = SignModel {
        fast: 1 << 15,
        slow: 1 << 15,
    };

    /// The frequency of sign 1 out of [`PROB_SCALE`].
    #[inline(always)]
    fn f1(self) -> u32 {
        (((self.fast + self.slow) >> 5) as u32).clamp(1, PROB_SCALE - 1)
    }

    /// Moves both estimates towards sign `s` (0 or 1): `p += (t - p) >> k`, `t` being 0 or
    /// 65535 and the shift arithmetic (rounding down), so each stays within 0..=65535.
    #[inline(always)]
    fn update(&mut self, s: u32) {
        let t = -(s as i32) & 0xffff;
        self.fast += (t - self.fast) >> 5;
        self.slow += (t - self.slow) >> 8;
    }
}

/// The cost of a binary symbol of frequency `f` (out of [`PROB_SCALE`]), in 1/65536 bits: made
/// once per process, not per frame.
static BIT_COSTS: std::sync::LazyLock<Box<[u32]>> = std::sync::LazyLock::new(|| {
    (0..=PROB_SCALE)
        .map(|f| (-(f.max(1) as f64 / f64::from(PROB_SCALE)).log2() * 65536.0) as u32)
        .collect()
});

/// The bin totals of mantissa counts.
fn bin_counts(c: &[u64]) -> Vec<u64> {
    c.chunks(PER_BIN).map(|b| b.iter().sum()).collect()
}

/// The full table of a binned one: each mantissa takes its bin's frequency.
fn expand_bins(f: &[u32]) -> Vec<u32> {
    (0..1usize << MT).map(|m| f[m / PER_BIN]).collect()
}

/// Bits to code mantissa counts `c` with a binned table (its own size included): the bin with
/// the table, then four bits for the mantissa within it.
fn binned_cost_bits(c: &[u64]) -> f64 {
    let bins = bin_counts(c);
    let total: u64 = bins.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let f = rans::normalize(&bins, BIN_BITS);
    let mut bits = total as f64 * f64::from(PER_BIN.trailing_zeros());
    for (&n, &f) in bins.iter().zip(&f) {
        if n > 0 {
            bits += n as f64 * (f64::from(BIN_BITS) - rans::log2(f));
        }
    }
    bits + rans::table_header_bits(&f, BIN_BITS) as f64
}

/// How a mantissa slot is best coded, and its cost in bits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MantissaCode {
    Flat,
    Full,
    Binned,
}

fn mantissa_code(c: &[u64]) -> (MantissaCode, f64) {
    let total: u64 = c.iter().sum();
    let flat = total as f64 * f64::from(MT);
    let full = rans::cost_bits(c);
    let binned = binned_cost_bits(c);
    if binned < full && binned < flat {
        (MantissaCode::Binned, binned)
    } else if full >= flat {
        (MantissaCode::Flat, flat)
    } else {
        (MantissaCode::Full, full)
    }
}

/// How the encoder codes a slot.
#[derive(Debug, Clone)]
enum SlotCode {
    Unused,
    Raw,
    Coded(Vec<EncSymbol>),
}

/// The block count and the values of block `b` (one block of all values without low bits).
#[inline(always)]
fn block(b: usize, n: usize, blocks: bool) -> (usize, usize) {
    if blocks {
        (b * BLOCK, ((b + 1) * BLOCK).min(n))
    } else {
        (0, n)
    }
}

/// Whether a sample of f32 low bytes (R1 of both levels, R0) says coding them could pay: an
/// order-0 entropy under 7.95 bits a byte in any of them. When none is, the encoder keeps them
/// raw without counting the rest (coding would save under 0.6% of them).
fn low_bits_pay(h_r1: &[u64], h_r0: &[u64]) -> bool {
    let (r1z0, r1z1) = h_r1.split_at(h_r1.len() / 2);
    [r1z0, r1z1, h_r0].iter().any(|c| {
        let total: u64 = c.iter().sum();
        total > 0 && entropy_bits(c) < 7.95 * total as f64
    })
}

/// The order-0 entropy of `counts`, in bits.
fn entropy_bits(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let t = total as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| c as f64 * (t / c as f64).log2())
        .sum()
}

/// Codes `data` (whole values of `kind`, any tail bytes kept raw, rows of `cols` values, 1 to
/// [`MAX_COLS`]) as a float body of the current version, after the frame header.
pub(crate) fn encode(kind: Kind, data: &[u8], cols: usize, out: &mut Vec<u8>) {
    encode_with(kind, data, cols, out, crate::avx2::available());
}

/// [`encode`], whole groups through [`crate::avx2`] only when `simd` (and the CPU has AVX2):
/// the tests check that both ways write the same frame.
fn encode_with(kind: Kind, data: &[u8], cols: usize, out: &mut Vec<u8>, simd: bool) {
    let l = Layout::of(kind);
    // bf16 and f32 (f16's five exponent bits and three low bits go value by value).
    let simd = simd && l.ebits == 8 && crate::avx2::available();
    let n = data.len() / l.bytes();
    let tail = &data[n * l.bytes()..];
    let ea = l.e_alpha();
    let blocks = l.rb > 0;
    let outer = if blocks { n.div_ceil(BLOCK) } else { 1 };

    // The values as words, once (every pass reads them).
    let vals: Vec<u32> = if l.width == 16 {
        data.chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };

    // Pass 0: the base exponent (the most common) and the signs.
    // Four copies of the exponent counts, by value: a run of equal exponents then adds to
    // different counters instead of waiting on the last addition.
    let mut eh4 = vec![0u32; 4 * ea];
    let mut signs = vec![0u8; n.div_ceil(8)];
    for (s, v8) in signs.iter_mut().zip(vals.chunks(8)) {
        let mut byte = 0u8;
        for (j, &v) in v8.iter().enumerate() {
            eh4[(j & 3) * ea + l.exp(v) as usize] += 1;
            byte |= ((v >> (l.width - 1)) as u8) << j;
        }
        *s = byte;
    }
    let eh: Vec<u64> = (0..ea)
        .map(|e| (0..4).map(|q| u64::from(eh4[q * ea + e])).sum())
        .collect();
    let e_base = (0..ea)
        .max_by_key(|&e| (eh[e], usize::MAX - e))
        .unwrap_or(0);
    // No bitmap when every sign is 0 (differences, magnitudes, all-positive scales).
    let any_sign = signs.iter().any(|&b| b != 0);

    // Pass 1: contexts and histograms, a group of LANES values at a time. The exponent and
    // mantissa histograms have four and two copies, by value: a run of equal exponents then
    // adds to different counters instead of waiting on the last addition.
    let mut levels = vec![2u8; outer];
    let mut ctx = vec![0u8; n];
    let ectx = E_CTX_FULL * ea;
    let mut h_e4 = vec![0u32; 4 * ectx];
    let mut h_me2 = vec![0u32; 2 << (l.ebits + MT)];
    let mut h_z = [0u64; 3];
    let r1a = l.r1_alpha();
    // The low bits of f32 are mostly noise: every 16th value is counted first, and the whole
    // block only when that sample says coding them could pay (`low_bits_pay`).
    let sample_low = l.two_bytes();
    let mut h_r1 = vec![0u64; 2 * r1a];
    let mut h_r0 = vec![0u64; 256];
    let mut a = (e_base as i32) << 4;
    let mut colm = vec![(e_base as i32) << 4; cols];
    // The sign model's frequency of sign 1 for each value, and what coding them would cost.
    let models = if any_sign { cols } else { 0 };
    let mut sm_fast = vec![SignModel::START.fast; models];
    let mut sm_slow = vec![SignModel::START.slow; models];
    let mut sf = vec![0u16; if any_sign { n } else { 0 }];
    let costs = &*BIT_COSTS;
    let mut sign_cost = 0u64;
    let mut col = 0usize;
    let sign_shift = l.width - 1;
    // The low bits of a group in a block that keeps them: a sample of f32's, all of f16's.
    let mut count_low = |z: u32, gv: &[u32], g_lo: usize| {
        if sample_low {
            if g_lo % 16 == 0 {
                let r = l.rest(gv[0]);
                h_r1[z as usize * r1a + (r >> 8) as usize] += 1;
                if z == 0 {
                    h_r0[(r & 0xff) as usize] += 1;
                }
            }
        } else {
            for &v in gv {
                h_r1[l.rest(v) as usize] += 1;
            }
        }
    };
    for (b, level) in levels.iter_mut().enumerate() {
        let (lo, hi) = block(b, n, blocks);
        let z = if blocks {
            let or = vals[lo..hi].iter().fold(0, |or, &v| or | l.rest(v));
            let z = l.level(or);
            *level = z as u8;
            h_z[z as usize] += 1;
            z
        } else {
            2
        };
        // Blocks start at a multiple of LANES, so groups never straddle two.
        for g_lo in (lo..hi).step_by(LANES) {
            let g_hi = (g_lo + LANES).min(hi);
            let gv = &vals[g_lo..g_hi];
            // A whole group in columns that do not wrap: side by side.
            if simd && g_hi - g_lo == LANES && col + LANES <= cols {
                let signs = any_sign.then(|| {
                    (
                        &mut sm_fast[col..col + LANES],
                        &mut sm_slow[col..col + LANES],
                    )
                });
                let sfg = if any_sign {
                    &mut sf[g_lo..g_hi]
                } else {
                    &mut [][..]
                };
                if let Some(f) = crate::avx2::contexts(
                    gv,
                    &mut colm[col..col + LANES],
                    signs,
                    a,
                    (l, e_base as i32),
                    costs,
                    &mut ctx[g_lo..g_hi],
                    sfg,
                ) {
                    for k in 0..LANES {
                        let (e, m, cx) = (f.e[k] as usize, f.m[k] as usize, f.cx[k] as usize);
                        h_e4[(k & 3) * ectx + cx * ea + e] += 1;
                        h_me2[((k & 1) << (l.ebits + MT)) + (e << MT) + m] += 1;
                    }
                    a = group_mean(a, f.sum, LANES as i32);
                    sign_cost += f.sign_cost;
                    col = if col + LANES == cols { 0 } else { col + LANES };
                    if z < 2 {
                        count_low(z, gv, g_lo);
                    }
                    continue;
                }
            }
            let mut sum = 0i32;
            let mut c = col;
            for (k, (slot, &v)) in ctx[g_lo..g_hi].iter_mut().zip(gv).enumerate() {
                let (e, m) = (l.exp(v) as usize, l.man(v) as usize);
                let cm = &mut colm[c];
                let cx = e_ctx_v2(a, col_term(*cm, e_base as i32));
                *slot = cx as u8;
                h_e4[(k & 3) * ectx + cx * ea + e] += 1;
                h_me2[((k & 1) << (l.ebits + MT)) + (e << MT) + m] += 1;
                *cm = col_ema(*cm, e as u32);
                sum += e as i32;
                c += 1;
                if c == cols {
                    c = 0;
                }
            }
            // The row's mean moves once per group, after it.
            a = group_mean(a, sum, gv.len() as i32);
            if any_sign {
                let mut c = col;
                for (f, &v) in sf[g_lo..g_hi].iter_mut().zip(gv) {
                    let s = v >> sign_shift;
                    let mut model = SignModel {
                        fast: sm_fast[c],
                        slow: sm_slow[c],
                    };
                    let f1 = model.f1();
                    *f = f1 as u16;
                    // f1 for sign 1, PROB_SCALE - f1 for sign 0, without a branch.
                    let fs = (PROB_SCALE - f1) ^ ((f1 ^ (PROB_SCALE - f1)) & s.wrapping_neg());
                    sign_cost += u64::from(costs[fs as usize]);
                    model.update(s);
                    (sm_fast[c], sm_slow[c]) = (model.fast, model.slow);
                    c += 1;
                    if c == cols {
                        c = 0;
                    }
                }
            }
            col = c;
            if z < 2 {
                count_low(z, gv, g_lo);
            }
        }
    }
    let mut h_e = vec![0u64; ectx];
    for (x, y) in h_e.iter_mut().enumerate() {
        *y = (0..4).map(|q| u64::from(h_e4[q * ectx + x])).sum();
    }
    let me_len = ea << MT;
    let h_me: Vec<u64> = (0..me_len)
        .map(|x| u64::from(h_me2[x]) + u64::from(h_me2[me_len + x]))
        .collect();
    if sample_low && low_bits_pay(&h_r1, &h_r0) {
        // Count every value of the blocks that keep low bits.
        h_r1.iter_mut().chain(h_r0.iter_mut()).for_each(|x| *x = 0);
        for (b, &z) in levels.iter().enumerate() {
            let (lo, hi) = block(b, n, blocks);
            if z < 2 {
                for &v in &vals[lo..hi] {
                    let r = l.rest(v);
                    h_r1[z as usize * r1a + (r >> 8) as usize] += 1;
                    if z == 0 {
                        h_r0[(r & 0xff) as usize] += 1;
                    }
                }
            }
        }
    }

    // Exponent contexts: the count whose tables cost least.
    let mut best_ne = (f64::INFINITY, 1usize, Vec::new());
    for ne in [1usize, 2, 4, 6, 8, 12, 16, 24, 32] {
        let map = merge_map(ne);
        let mut t = vec![vec![0u64; ea]; ne];
        for c in 0..E_CTX_FULL {
            for (x, &v) in t[map[c] as usize]
                .iter_mut()
                .zip(&h_e[c * ea..(c + 1) * ea])
            {
                *x += v;
            }
        }
        let cost: f64 = t.iter().map(|t| rans::cost_bits(t)).sum();
        if cost < best_ne.0 {
            best_ne = (cost, ne, t);
        }
    }
    let (_, ne, e_tables) = best_ne;
    let e_map = merge_map(ne);
    // Signs: coded by column where that beats the bitmap by more than a word.
    let sign_mode = if !any_sign {
        SIGNS_NONE
    } else if (sign_cost >> 16) + 32 < n as u64 {
        SIGNS_CODED
    } else {
        SIGNS_RAW
    };

    // Mantissa buckets: the most common exponents each get one, the rest share the last.
    let mut by_freq: Vec<usize> = (0..ea).filter(|&e| eh[e] > 0).collect();
    by_freq.sort_by(|&x, &y| eh[y].cmp(&eh[x]).then(x.cmp(&y)));
    let me = |e: usize| &h_me[e << MT..(e + 1) << MT];
    let mut total_m = vec![0u64; 1 << MT];
    for e in 0..ea {
        for (t, &v) in total_m.iter_mut().zip(me(e)) {
            *t += v;
        }
    }
    let mut best_nb = (f64::INFINITY, 1usize);
    for nb in [1usize, 2, 3, 4, 6, 8, 12, 16] {
        if nb > 1 && nb - 1 > by_freq.len() {
            break;
        }
        let mut rest = total_m.clone();
        let mut cost = ((nb - 1) as u32 * l.ebits) as f64;
        for &e in by_freq.iter().take(nb - 1) {
            cost += mantissa_code(me(e)).1;
            for (r, &v) in rest.iter_mut().zip(me(e)) {
                *r -= v;
            }
        }
        cost += mantissa_code(&rest).1;
        if cost < best_nb.0 {
            best_nb = (cost, nb);
        }
    }
    let nb = best_nb.1;
    let owners: Vec<usize> = by_freq.iter().take(nb - 1).copied().collect();
    let mut m_map = vec![(nb - 1) as u8; ea];
    for (b, &e) in owners.iter().enumerate() {
        m_map[e] = b as u8;
    }

    // Every slot: unused, raw or coded, whichever is smallest.
    let slots = Slots { ne, nb };
    let mut counts: Vec<Vec<u64>> = vec![Vec::new(); slots.count()];
    counts[Slots::Z] = if blocks { h_z.to_vec() } else { vec![0; 3] };
    for (c, t) in e_tables.into_iter().enumerate() {
        counts[slots.e(c)] = t;
    }
    for b in 0..nb {
        counts[slots.m(b)] = vec![0; 1 << MT];
    }
    for e in 0..ea {
        for (t, &v) in counts[slots.m(m_map[e] as usize)].iter_mut().zip(me(e)) {
            *t += v;
        }
    }
    counts[slots.r1(0)] = h_r1[..r1a].to_vec();
    counts[slots.r1(1)] = h_r1[r1a..].to_vec();
    counts[slots.r0()] = h_r0;
    let mut codes = Vec::with_capacity(slots.count());
    let mut hdr = BitWriter::new();
    hdr.put(e_base as u32, l.ebits);
    hdr.put((ne - 1) as u32, 5);
    hdr.put((nb - 1) as u32, 4);
    hdr.put(sign_mode, 2);
    hdr.gamma(cols as u32);
    for &e in &owners {
        hdr.put(e as u32, l.ebits);
    }
    let mut coded_symbols = if sign_mode == SIGNS_CODED {
        n as u64
    } else {
        0
    };
    for (slot, c) in counts.iter().enumerate() {
        let total: u64 = c.iter().sum();
        let (alpha, may_be_raw) = slots.alphabet(l, slot);
        if total == 0 {
            hdr.put(0, 2);
            codes.push(SlotCode::Unused);
        } else if slots.is_m(slot) && mantissa_code(c).0 == MantissaCode::Binned {
            hdr.put(1, 2);
            let f = rans::normalize(&bin_counts(c), BIN_BITS);
            rans::write_table(&mut hdr, &f, BIN_BITS);
            codes.push(SlotCode::Coded(
                Table::from_freq(expand_bins(&f)).enc_symbols(),
            ));
            coded_symbols += total;
        } else if may_be_raw && rans::cost_bits(c) >= total as f64 * 8.0 {
            hdr.put(1, 2);
            codes.push(SlotCode::Raw);
        } else if alpha.is_power_of_two()
            && rans::cost_bits(c) >= total as f64 * f64::from(alpha.trailing_zeros())
        {
            // Flat: every symbol equally likely, no table sent.
            hdr.put(3, 2);
            codes.push(SlotCode::Coded(Table::uniform(alpha).enc_symbols()));
            coded_symbols += total;
        } else {
            let tb = rans::table_bits(total);
            hdr.put(2, 2);
            let freq = rans::normalize(c, tb);
            rans::write_table(&mut hdr, &freq, tb);
            let scaled = freq
                .into_iter()
                .map(|f| f << (rans::PROB_BITS - tb))
                .collect();
            codes.push(SlotCode::Coded(Table::from_freq(scaled).enc_symbols()));
            coded_symbols += total;
        }
    }
    let hdr = hdr.finish();

    // Pass 2 (forward): raw low bytes (f32 only).
    let mut raw = Vec::new();
    if codes.iter().any(|c| matches!(c, SlotCode::Raw)) {
        let is_raw = |slot: usize| matches!(codes[slot], SlotCode::Raw);
        let (r1_raw, r0_raw) = (
            [is_raw(slots.r1(0)), is_raw(slots.r1(1))],
            is_raw(slots.r0()),
        );
        raw.reserve(2 * n);
        for (b, &z) in levels.iter().enumerate() {
            if z == 2 {
                continue;
            }
            let (lo, hi) = block(b, n, blocks);
            let vals = &vals[lo..hi];
            match (r1_raw[z as usize], z == 0 && r0_raw) {
                (true, true) => {
                    let at = raw.len();
                    raw.resize(at + 2 * vals.len(), 0);
                    for (o, &v) in raw[at..].chunks_exact_mut(2).zip(vals) {
                        o.copy_from_slice(&(v as u16).to_be_bytes());
                    }
                }
                (true, false) => raw.extend(vals.iter().map(|&v| (v >> 8) as u8)),
                (false, true) => raw.extend(vals.iter().map(|&v| v as u8)),
                (false, false) => {}
            }
        }
    }

    // Pass 3 (backward): the rANS stream, in the reverse of the decoder's order: groups of
    // LANES values, last first; in each, the steps S, R0, R1, M, E (and Z at a block's start),
    // each over the group's lanes from the last to the first.
    let mut enc = Encoder::new(LANES, coded_symbols as usize);
    let code = |slot: usize| match &codes[slot] {
        SlotCode::Coded(t) => Some(t.as_slice()),
        _ => None,
    };
    let (r1_code, r0_code) = ([code(slots.r1(0)), code(slots.r1(1))], code(slots.r0()));
    let e_code: Vec<Option<&[EncSymbol]>> = (0..E_CTX_FULL)
        .map(|c| code(slots.e(e_map[c] as usize)))
        .collect();
    let m_code: Vec<Option<&[EncSymbol]>> =
        (0..ea).map(|e| code(slots.m(m_map[e] as usize))).collect();
    // For the AVX2 groups: every coded table as `start | freq << 16` a symbol, 256 entries
    // each (table 0 all zeros, for contexts no value has), and where each context's starts.
    let mut packed = vec![0u32; if simd { 256 } else { 0 }];
    let mut at = vec![0u32; codes.len()];
    if simd {
        for (slot, c) in codes.iter().enumerate() {
            if let SlotCode::Coded(t) = c {
                at[slot] = packed.len() as u32;
                packed.extend(t.iter().map(EncSymbol::packed));
                packed.resize(at[slot] as usize + t.len().max(256), 0);
            }
        }
    }
    let e_at: [u32; E_CTX_FULL] = std::array::from_fn(|c| at[slots.e(e_map[c] as usize)]);
    let m_at: Vec<u32> = (0..ea).map(|e| at[slots.m(m_map[e] as usize)]).collect();
    let groups = crate::avx2::EncGroups::new(&packed, e_at, &m_at, l);
    let simd = simd && groups.usable();
    for g in (0..n.div_ceil(LANES)).rev() {
        let lo = g * LANES;
        let hi = (lo + LANES).min(n);
        let z = if blocks {
            u32::from(levels[lo / BLOCK])
        } else {
            2
        };
        // Coded low bytes (rare: f32 low bits are mostly noise, kept raw) go value by value.
        let low_coded = z < 2
            && (r1_code[z as usize & 1].is_some()
                || (z == 0 && l.two_bytes() && r0_code.is_some()));
        let side_by_side = simd && !low_coded && {
            let sf = (sign_mode == SIGNS_CODED).then(|| &sf[lo..hi]);
            groups.put(&mut enc, &vals[lo..hi], &ctx[lo..hi], sf)
        };
        if !side_by_side {
            if sign_mode == SIGNS_CODED {
                for i in (lo..hi).rev() {
                    let v = vals[i];
                    enc.put_bit(i - lo, v >> (l.width - 1), u32::from(sf[i]));
                }
            }
            if z == 0 && l.two_bytes() {
                if let Some(t) = r0_code {
                    for i in (lo..hi).rev() {
                        enc.put_sym(i - lo, &t[(l.rest(vals[i]) & 0xff) as usize]);
                    }
                }
            }
            if z < 2 {
                if let Some(t) = r1_code[z as usize & 1] {
                    let shift = if l.two_bytes() { 8 } else { 0 };
                    for i in (lo..hi).rev() {
                        enc.put_sym(i - lo, &t[(l.rest(vals[i]) >> shift) as usize]);
                    }
                }
            }
            for i in (lo..hi).rev() {
                let v = vals[i];
                if let Some(t) = m_code[l.exp(v) as usize] {
                    enc.put_sym(i - lo, &t[l.man(v) as usize]);
                }
            }
            for i in (lo..hi).rev() {
                if let Some(t) = e_code[ctx[i] as usize] {
                    enc.put_sym(i - lo, &t[l.exp(vals[i]) as usize]);
                }
            }
        }
        if blocks && lo % BLOCK == 0 {
            if let Some(t) = code(Slots::Z) {
                enc.put_sym(0, &t[z as usize]);
            }
        }
    }
    let (states, words) = enc.finish();

    out.reserve(hdr.len() + signs.len() + raw.len() + tail.len() + words.len() * 2 + 32);
    out.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
    out.extend_from_slice(&hdr);
    if sign_mode == SIGNS_RAW {
        out.extend_from_slice(&signs);
    }
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&raw);
    out.push(tail.len() as u8);
    out.extend_from_slice(tail);
    for x in states {
        out.extend_from_slice(&x.to_le_bytes());
    }
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Takes `n` bytes from `body` at `*pos`.
fn take<'a>(body: &'a [u8], pos: &mut usize, n: usize, what: &str) -> Result<&'a [u8], CodecError> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= body.len())
        .ok_or_else(|| CodecError::corrupt(format!("{what}: {n} bytes past the frame's end")))?;
    let s = &body[*pos..end];
    *pos = end;
    Ok(s)
}

fn take_u32(body: &[u8], pos: &mut usize, what: &str) -> Result<u32, CodecError> {
    let b = take(body, pos, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

type Lut = [u32; PROB_SCALE as usize];

/// How the decoder reads one slot.
#[derive(Clone, Copy)]
enum Src<'t> {
    Unused,
    Raw,
    Coded(&'t Lut),
}

/// Raw low bytes, read in order; reading past the end yields zeros and is flagged.
struct RawBytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl RawBytes<'_> {
    #[inline(always)]
    fn next(&mut self) -> u32 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        u32::from(v)
    }
}

/// One field of one value.
#[inline(always)]
fn get(
    src: Src<'_>,
    state: usize,
    bad: &mut bool,
    raw: &mut RawBytes<'_>,
    dec: &mut Decoder<'_>,
) -> u32 {
    match src {
        Src::Coded(lut) => dec.get(state, lut),
        Src::Raw => raw.next(),
        Src::Unused => {
            *bad = true;
            0
        }
    }
}

/// A float body's parts, as its header declares them.
struct Body<'a> {
    e_base: i32,
    ne: usize,
    nb: usize,
    sign_mode: u32,
    cols: usize,
    signs: &'a [u8],
    raw: &'a [u8],
    tail: &'a [u8],
    states: Vec<u32>,
    words: &'a [u8],
    /// Each exponent's mantissa bucket.
    m_map: Vec<u8>,
    /// Each slot's mode (0 unused, 1 raw, 2 coded) and, when coded, its table's index in
    /// `luts`.
    modes: Vec<(u8, usize)>,
    /// The decoding lookups, one after the other, [`PROB_SCALE`] entries each; table 0 is
    /// [`idle_lut`], for slots that must not be read.
    luts: Vec<u32>,
}

impl Body<'_> {
    fn slots(&self) -> Slots {
        Slots {
            ne: self.ne,
            nb: self.nb,
        }
    }

    /// Lookup table `i`.
    fn lut(&self, i: usize) -> Option<&Lut> {
        let at = i.checked_mul(PROB_SCALE as usize)?;
        self.luts.get(at..)?.first_chunk()
    }

    fn src(&self) -> Vec<Src<'_>> {
        self.modes
            .iter()
            .map(|&(m, i)| match (m, self.lut(i)) {
                (1, _) => Src::Raw,
                (2, Some(lut)) => Src::Coded(lut),
                _ => Src::Unused,
            })
            .collect()
    }
}

/// Appends `t`'s decoding lookup to `luts`, and returns its index.
fn push_lut(luts: &mut Vec<u32>, t: &Table) -> usize {
    let at = luts.len();
    luts.resize(at + PROB_SCALE as usize, 0);
    t.lookup_into(&mut luts[at..]);
    at / PROB_SCALE as usize
}

/// Reads a float body of frame version `version` (1 to 4) for `n` values and `tail_len` tail
/// bytes: its table header, parts and coder states.
fn parse(
    l: Layout,
    version: u8,
    body: &[u8],
    n: usize,
    tail_len: usize,
) -> Result<Body<'_>, CodecError> {
    let ea = l.e_alpha();
    let mut pos = 0;
    let hlen = take_u32(body, &mut pos, "table header length")? as usize;
    let hdr = take(body, &mut pos, hlen, "table header")?;
    let v2 = version >= 2;
    let v3 = version >= 3;
    let mut h = BitReader::new(hdr);
    let e_base = h.get(l.ebits) as i32;
    let ne = h.get(5) as usize + 1;
    let nb = h.get(4) as usize + 1;
    // Version 1: a flag, the signs kept raw or all 0. Version 2: a mode, and the row length.
    let (sign_mode, cols) = if v2 {
        let mode = h.get(2);
        let cols = h.gamma(20).unwrap_or(0) as usize;
        if mode > SIGNS_CODED || cols == 0 || cols > MAX_COLS {
            return Err(CodecError::corrupt(format!(
                "sign mode {mode}, rows of {cols} values"
            )));
        }
        (mode, cols)
    } else {
        (h.get(1), 1)
    };
    // The bitmap, when the signs are one (mode 0 has every sign 0, mode 2 codes them).
    let signs = if sign_mode == SIGNS_RAW {
        take(body, &mut pos, n.div_ceil(8), "signs")?
    } else {
        &[][..]
    };
    let rlen = take_u32(body, &mut pos, "raw bytes length")? as usize;
    let raw = take(body, &mut pos, rlen, "raw bytes")?;
    let tlen = take(body, &mut pos, 1, "tail length")?[0] as usize;
    let tail = take(body, &mut pos, tlen, "tail")?;
    if tlen != tail_len {
        return Err(CodecError::corrupt(format!(
            "tail of {tlen} bytes, expected {tail_len}"
        )));
    }
    let count = if version >= 4 { LANES } else { rans::STATES };
    let mut states = Vec::with_capacity(count);
    for _ in 0..count {
        let x = take_u32(body, &mut pos, "coder states")?;
        if x < rans::RANS_L {
            return Err(CodecError::corrupt("coder state below its bound"));
        }
        states.push(x);
    }
    let words = &body[pos..];
    if words.len() % 2 != 0 {
        return Err(CodecError::corrupt("odd length of the coded words"));
    }

    let mut m_map = vec![(nb - 1) as u8; ea];
    for b in 0..nb - 1 {
        let e = h.get(l.ebits) as usize;
        if m_map[e] != (nb - 1) as u8 {
            return Err(CodecError::corrupt(format!(
                "exponent {e} owns two mantissa buckets"
            )));
        }
        m_map[e] = b as u8;
    }
    let slots = Slots { ne, nb };
    let mut luts: Vec<u32> = idle_lut().to_vec();
    let mut modes: Vec<(u8, usize)> = Vec::with_capacity(slots.count());
    for slot in 0..slots.count() {
        let (alpha, may_be_raw) = slots.alphabet(l, slot);
        match h.get(2) {
            0 => modes.push((0, 0)),
            1 if may_be_raw => modes.push((1, 0)),
            1 if v3 && slots.is_m(slot) => {
                // A binned table, written at BIN_BITS: scaled to PROB_BITS, every bin's
                // frequency is a multiple of PER_BIN.
                let t = rans::read_table(&mut h, BINS)?;
                if t.freq.iter().any(|&f| f % PER_BIN as u32 != 0) {
                    return Err(CodecError::corrupt(format!(
                        "slot {slot}: a binned table not at {BIN_BITS} bits"
                    )));
                }
                let per: Vec<u32> = t.freq.iter().map(|&f| f / PER_BIN as u32).collect();
                let t = Table::from_freq(expand_bins(&per));
                modes.push((2, push_lut(&mut luts, &t)));
            }
            2 => {
                let t = rans::read_table(&mut h, alpha)?;
                modes.push((2, push_lut(&mut luts, &t)));
            }
            3 if alpha.is_power_of_two() => {
                modes.push((2, push_lut(&mut luts, &Table::uniform(alpha))));
            }
            m => return Err(CodecError::corrupt(format!("slot {slot}: mode {m}"))),
        }
    }
    if h.overrun {
        return Err(CodecError::corrupt("table header ends early"));
    }
    Ok(Body {
        e_base,
        ne,
        nb,
        sign_mode,
        cols,
        signs,
        raw,
        tail,
        states,
        words,
        m_map,
        modes,
        luts,
    })
}

/// Decodes a float body of frame version `version` (1 to 4) into `dst`.
pub(crate) fn decode(
    kind: Kind,
    version: u8,
    body: &[u8],
    dst: &mut [u8],
) -> Result<(), CodecError> {
    decode_with(kind, version, body, dst, crate::avx2::available())
}

/// [`decode`], the groups of version 4 through [`crate::avx2`] only when `simd` (and the CPU
/// has AVX2): the tests decode every frame both ways.
fn decode_with(
    kind: Kind,
    version: u8,
    body: &[u8],
    dst: &mut [u8],
    simd: bool,
) -> Result<(), CodecError> {
    let l = Layout::of(kind);
    let n = dst.len() / l.bytes();
    let b = parse(l, version, body, n, dst.len() - n * l.bytes())?;
    let (values, tail) = dst.split_at_mut(n * l.bytes());
    tail.copy_from_slice(b.tail);
    let mut dec = Decoder::new(&b.states, b.words);
    let (bad, raw_read) = if version >= 4 {
        decode_lanes(l, &b, &mut dec, values, simd)
    } else {
        decode_fields(l, version, &b, &mut dec, values)
    };
    if bad {
        return Err(CodecError::corrupt(
            "a value reads a table the frame does not have",
        ));
    }
    if raw_read != b.raw.len() || !dec.finished() {
        return Err(CodecError::corrupt(
            "coded data does not end where it should",
        ));
    }
    Ok(())
}

/// The decoding loop of versions 1 to 3: value after value, each field on its state. Returns
/// whether a value read an unused slot, and how many raw bytes were read.
fn decode_fields(
    l: Layout,
    version: u8,
    b: &Body<'_>,
    dec: &mut Decoder<'_>,
    dst: &mut [u8],
) -> (bool, usize) {
    let n = dst.len() / l.bytes();
    let ea = l.e_alpha();
    let blocks = l.rb > 0;
    let v2 = version >= 2;
    let (e_base, cols, sign_mode, signs) = (b.e_base, b.cols, b.sign_mode, b.signs);
    let slots = b.slots();
    let src = b.src();
    let e_map = merge_map(b.ne);
    let e_src: Vec<Src<'_>> = (0..E_CTX_FULL)
        .map(|c| src[slots.e(e_map[c] as usize)])
        .collect();
    let m_src: Vec<Src<'_>> = (0..ea).map(|e| src[slots.m(b.m_map[e] as usize)]).collect();
    let (r1_src, r0_src) = ([src[slots.r1(0)], src[slots.r1(1)]], src[slots.r0()]);

    let mut rb = RawBytes {
        data: b.raw,
        pos: 0,
    };
    let mut bad = false;
    let mut a = e_base << 4;
    let mut colm = vec![e_base << 4; if v2 { cols } else { 0 }];
    let mut sm = vec![SignModel::START; if sign_mode == SIGNS_CODED { cols } else { 0 }];
    let mut col = 0usize;
    let outer = if blocks { n.div_ceil(BLOCK) } else { 1 };
    let shift_s = l.width - 1;
    for blk in 0..outer {
        let (lo, hi) = block(blk, n, blocks);
        let z = if blocks {
            let z = get(src[Slots::Z], 0, &mut bad, &mut rb, dec);
            bad |= z > 2 || (z == 1 && !l.two_bytes());
            z.min(2)
        } else {
            2
        };
        for i in lo..hi {
            let ctx = if v2 {
                e_ctx_v2(a, col_term(colm[col], e_base))
            } else {
                e_ctx_full(a, e_base)
            };
            let e = get(e_src[ctx], 0, &mut bad, &mut rb, dec) & (ea as u32 - 1);
            a = ema(a, e);
            if v2 {
                colm[col] = col_ema(colm[col], e);
            }
            let m = get(m_src[e as usize], 1, &mut bad, &mut rb, dec) & 0x7f;
            let r = if z == 2 {
                0
            } else if l.two_bytes() {
                let r1 = get(r1_src[z as usize], 2, &mut bad, &mut rb, dec);
                let r0 = if z == 0 {
                    get(r0_src, 3, &mut bad, &mut rb, dec)
                } else {
                    0
                };
                (r1 << 8 | r0) & 0xffff
            } else {
                get(r1_src[0], 2, &mut bad, &mut rb, dec) & ((1 << l.rb) - 1)
            };
            let s = match sign_mode {
                SIGNS_CODED => {
                    let model = &mut sm[col];
                    let s = dec.get_bit(3, model.f1());
                    model.update(s);
                    s
                }
                SIGNS_RAW => u32::from(signs[i >> 3] >> (i & 7)) & 1,
                _ => 0,
            };
            col += 1;
            if col == cols {
                col = 0;
            }
            l.store(dst, i, s << shift_s | e << l.mbits | m << l.rb | r);
        }
    }
    (bad, rb.pos)
}

/// The lookup of a slot that must not be read: every entry symbol 0, frequency 4096, start 0,
/// so reading it leaves the state as it is (the lanes loop flags the read instead of branching).
fn idle_lut() -> Box<Lut> {
    Box::new([(PROB_SCALE - 1) << 8; PROB_SCALE as usize])
}

/// How the lanes loop reads a low-bits slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RSrc {
    Unused,
    Raw,
    /// Coded with table `i` of [`Lanes::luts`].
    Coded(u32),
}

/// What the lanes loop of a version 4 frame reads, fixed for the frame: the tables as indices
/// into one buffer of lookups (table 0 the idle one, for slots that must not be read) and which
/// of them are errors to read, and the frame's parts.
pub(crate) struct Lanes<'b> {
    /// The CPU has AVX2 and the frame suits [`crate::avx2::group`] (bf16 or f32, every table
    /// index inside `luts`: [`crate::avx2::frame_fits`]): groups may take it.
    pub simd: bool,
    pub l: Layout,
    pub e_base: i32,
    pub cols: usize,
    pub sign_mode: u32,
    pub signs: &'b [u8],
    pub raw: &'b [u8],
    pub luts: &'b [u32],
    /// Each exponent context's table, and (bit `c`) whether context `c` reads an unused slot.
    pub e_idx: [u32; E_CTX_FULL],
    pub e_bad: u32,
    /// Each exponent's mantissa table, and 1 where it is an unused slot.
    pub m_idx: Vec<u32>,
    pub m_bad: Vec<u32>,
    pub r1: [RSrc; 2],
    pub r0: RSrc,
}

impl Lanes<'_> {
    /// Lookup tables in `luts`.
    pub(crate) fn tables(&self) -> usize {
        self.luts.len() / PROB_SCALE as usize
    }
}

/// What the lanes loop carries from group to group.
pub(crate) struct LaneState {
    /// The row's mean, in sixteenths of an exponent.
    pub a: i32,
    /// Each column's mean, and its sign model's fast and slow estimates.
    pub colm: Vec<i32>,
    pub fast: Vec<i32>,
    pub slow: Vec<i32>,
    /// The column of the next group's first value.
    pub col: usize,
    /// Raw bytes read.
    pub rpos: usize,
    /// A value read a slot the frame does not have.
    pub bad: bool,
}

/// The decoding loop of version 4: groups of [`LANES`] values, value `k` of a group on state
/// `k`, field by field (`docs/format.md`, "Order"). Returns whether a value read an unused slot,
/// and how many raw bytes were read. Groups go through [`crate::avx2`] where the CPU has AVX2
/// and the group allows it, else through [`group_scalar`]; both follow the same steps.
fn decode_lanes(
    l: Layout,
    b: &Body<'_>,
    dec: &mut Decoder<'_>,
    dst: &mut [u8],
    simd: bool,
) -> (bool, usize) {
    let ea = l.e_alpha();
    let blocks = l.rb > 0;
    let slots = b.slots();
    let table = |slot: usize| match b.modes.get(slot).copied() {
        Some((2, i)) => (i as u32, false),
        _ => (0, true),
    };
    let e_map = merge_map(b.ne);
    let mut e_idx = [0u32; E_CTX_FULL];
    let mut e_bad = 0u32;
    for (c, x) in e_idx.iter_mut().enumerate() {
        let (i, unused) = table(slots.e(e_map[c] as usize));
        *x = i;
        e_bad |= u32::from(unused) << c;
    }
    let (m_idx, m_bad): (Vec<u32>, Vec<u32>) = (0..ea)
        .map(|e| {
            let (i, unused) = table(slots.m(b.m_map[e] as usize));
            (i, u32::from(unused))
        })
        .unzip();
    let rsrc = |slot: usize| match b.modes.get(slot).copied() {
        Some((1, _)) => RSrc::Raw,
        Some((2, i)) => RSrc::Coded(i as u32),
        _ => RSrc::Unused,
    };
    let mut t = Lanes {
        simd: false,
        l,
        e_base: b.e_base,
        cols: b.cols,
        sign_mode: b.sign_mode,
        signs: b.signs,
        raw: b.raw,
        luts: &b.luts,
        e_idx,
        e_bad,
        m_idx,
        m_bad,
        r1: [rsrc(slots.r1(0)), rsrc(slots.r1(1))],
        r0: rsrc(slots.r0()),
    };
    let tabs: Vec<&Lut> = b
        .luts
        .chunks_exact(PROB_SCALE as usize)
        .filter_map(|c| c.first_chunk())
        .collect();
    let (z_i, z_unused) = table(Slots::Z);
    let z_lut = tabs.get(z_i as usize).copied();
    let coded_signs = b.sign_mode == SIGNS_CODED;
    let mut st = LaneState {
        a: b.e_base << 4,
        colm: vec![b.e_base << 4; b.cols],
        fast: vec![SignModel::START.fast; if coded_signs { b.cols } else { 0 }],
        slow: vec![SignModel::START.slow; if coded_signs { b.cols } else { 0 }],
        col: 0,
        rpos: 0,
        bad: false,
    };
    // bf16 and f32 (f16's five exponent bits and three low bits take the scalar steps).
    t.simd = simd && l.ebits == 8 && crate::avx2::frame_fits(&t);
    let mut z = 2;
    for (g, out) in dst.chunks_mut(LANES * l.bytes()).enumerate() {
        let lo = g * LANES;
        if blocks && lo % BLOCK == 0 {
            st.bad |= z_unused;
            let y = match z_lut {
                Some(lut) => dec.get(0, lut),
                None => {
                    st.bad = true;
                    0
                }
            };
            st.bad |= y > 2 || (y == 1 && !l.two_bytes());
            z = y.min(2);
        }
        if !(t.simd && crate::avx2::group(&t, &mut st, dec, out, lo, z)) {
            group_scalar(&t, &tabs, &mut st, dec, out, lo, z);
        }
    }
    (st.bad, st.rpos.min(b.raw.len() + 1))
}

/// One group of the lanes loop, value by value within each step.
fn group_scalar(
    t: &Lanes<'_>,
    tabs: &[&Lut],
    st: &mut LaneState,
    dec: &mut Decoder<'_>,
    out: &mut [u8],
    lo: usize,
    z: u32,
) {
    let l = t.l;
    let bytes = l.bytes();
    let cnt = out.len() / bytes;
    let cols = t.cols;
    let lut = |i: u32, bad: &mut bool| -> &Lut {
        match tabs.get(i as usize) {
            Some(l) => l,
            None => {
                *bad = true;
                tabs[0]
            }
        }
    };
    let mut v = [0u32; LANES];
    // E: each value's context from the row's mean at the group's start and its column's.
    let mut sum = 0;
    let mut c = st.col;
    for (k, v) in v.iter_mut().enumerate().take(cnt) {
        let cm = &mut st.colm[c];
        let cx = e_ctx_v2(st.a, col_term(*cm, t.e_base));
        st.bad |= (t.e_bad >> cx) & 1 != 0;
        let e = dec.get(k, lut(t.e_idx[cx], &mut st.bad)) & (l.e_alpha() as u32 - 1);
        *cm = col_ema(*cm, e);
        sum += e as i32;
        *v = e;
        c += 1;
        if c == cols {
            c = 0;
        }
    }
    st.a = group_mean(st.a, sum, cnt as i32);
    // M: from the bucket of the value's exponent.
    for (k, v) in v.iter_mut().enumerate().take(cnt) {
        let e = *v as usize;
        st.bad |= t.m_bad[e] != 0;
        let m = dec.get(k, lut(t.m_idx[e], &mut st.bad)) & 0x7f;
        *v = *v << l.mbits | m << l.rb;
    }
    // R1 then R0: coded, or raw bytes in value order (each value's R1 byte, then its R0).
    if z < 2 {
        let r1 = t.r1[z as usize];
        let r0 = if z == 0 && l.two_bytes() {
            t.r0
        } else {
            RSrc::Unused
        };
        let r1_raw = r1 == RSrc::Raw;
        let r0_raw = r0 == RSrc::Raw;
        let stride = usize::from(r1_raw) + usize::from(r0_raw);
        let raw = t.raw;
        let rpos = st.rpos;
        let at =
            |k: usize, o: usize| u32::from(raw.get(rpos + k * stride + o).copied().unwrap_or(0));
        let (shift, mask) = if l.two_bytes() {
            (8, 0xff)
        } else {
            (0, (1 << l.rb) - 1)
        };
        // Each field coded, or raw bytes at `o` in each value's `stride` of them.
        let mut field = |r: RSrc, o: usize, shift: u32, mask: u32, v: &mut [u32]| match r {
            RSrc::Coded(i) => {
                let l = lut(i, &mut st.bad);
                for (k, v) in v.iter_mut().enumerate() {
                    *v |= (dec.get(k, l) & mask) << shift;
                }
            }
            RSrc::Raw => {
                for (k, v) in v.iter_mut().enumerate() {
                    *v |= at(k, o) << shift;
                }
            }
            RSrc::Unused => st.bad = true,
        };
        field(r1, 0, shift, mask, &mut v[..cnt]);
        if z == 0 && l.two_bytes() {
            field(r0, usize::from(r1_raw), 0, 0xff, &mut v[..cnt]);
        }
        st.rpos += cnt * stride;
    }
    // S.
    let shift_s = l.width - 1;
    match t.sign_mode {
        SIGNS_CODED => {
            let mut c = st.col;
            for (k, v) in v.iter_mut().enumerate().take(cnt) {
                let mut model = SignModel {
                    fast: st.fast[c],
                    slow: st.slow[c],
                };
                let s = dec.get_bit(k, model.f1());
                model.update(s);
                (st.fast[c], st.slow[c]) = (model.fast, model.slow);
                *v |= s << shift_s;
                c += 1;
                if c == cols {
                    c = 0;
                }
            }
        }
        SIGNS_RAW => {
            for (k, v) in v.iter_mut().enumerate().take(cnt) {
                let i = lo + k;
                let byte = t.signs.get(i >> 3).copied().unwrap_or(0);
                *v |= (u32::from(byte >> (i & 7)) & 1) << shift_s;
            }
        }
        _ => {}
    }
    st.col = c;
    if bytes == 2 {
        for (o, &v) in out.chunks_exact_mut(2).zip(&v) {
            o.copy_from_slice(&(v as u16).to_le_bytes());
        }
    } else {
        for (o, &v) in out.chunks_exact_mut(4).zip(&v) {
            o.copy_from_slice(&v.to_le_bytes());
        }
    }
}
