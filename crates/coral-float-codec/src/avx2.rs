//! The lanes of version 4 frames with AVX2: a group's eight values coded and decoded side by
//! side, one 32-bit lane per value. The value-by-value steps in `float` are the reference: the
//! unit test `the_lanes_code_alike_with_and_without_avx2` checks that both write the same
//! frames and read them alike.
//!
//! Decoding, each step gathers the eight values' table entries, updates the eight rANS states
//! with one multiplication, and renormalises them from the shared word stream: the lanes that
//! need a word take the next ones in lane order (a permutation chosen by the mask of those
//! lanes), exactly as the scalar loop reads them one lane after the other. Encoding runs the
//! same steps backwards, storing the word of every lane that emits one in the order the scalar
//! encoder would (from the last lane to the first), and takes the encoder's first pass
//! (contexts, column means, sign models) side by side too.
//!
//! A group takes these paths when it has eight values in eight distinct columns that do not
//! wrap around the row, its low bits (f32) are raw (or, decoding, coded), and the buffers hold
//! the most the group can read or write; anything else goes value by value.
//!
//! Written with `std::arch` intrinsics: the gathers and the mask-driven permutations that make
//! the lanes read one stream are not in a portable SIMD crate.

use crate::float::{LaneState, Lanes, Layout, RSrc};
use crate::rans::{Decoder, Encoder};

/// What the encoder's AVX2 groups read, fixed for a frame: every coded table as
/// `start | freq << 16` a symbol (256 entries each), and where each exponent context's and each
/// exponent's mantissa table starts.
#[derive(Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct EncGroups<'p> {
    packed: &'p [u32],
    e_at: [u32; 32],
    m_at: &'p [u32],
    l: Layout,
    /// The CPU has AVX2 and every table start leaves 256 entries inside `packed` (the gathers
    /// read there): checked once, in [`EncGroups::new`].
    ok: bool,
}

/// One group's contexts in the encoder's first pass (eight values in eight columns that do not
/// wrap): what `float::encode`'s value-by-value loop works out, side by side.
#[derive(Debug, Default)]
pub(crate) struct GroupFields {
    /// Each value's exponent, top mantissa bits and exponent context.
    pub e: [u32; 8],
    pub m: [u32; 8],
    pub cx: [u32; 8],
    /// The sum of the exponents.
    pub sum: i32,
    /// What coding the signs would cost, in 1/65536 bits (0 without sign models).
    pub sign_cost: u64,
}

/// The encoder's first pass over a whole group: reads `vals`, moves the columns' means `colm`
/// (eight, from the group's first column) and, with `signs = Some((fast, slow))`, their sign
/// models, and writes each value's context to `ctx` and its sign-1 frequency to `sf`. `a` is
/// the row's mean at the group's start, `lay` the values' layout and the frame's base exponent,
/// `costs` the bit costs of `float::BIT_COSTS`. `None`
/// (nothing changed) when the slices are not eight long or the CPU lacks AVX2.
#[allow(clippy::too_many_arguments)]
pub(crate) fn contexts(
    vals: &[u32],
    colm: &mut [i32],
    signs: Option<(&mut [i32], &mut [i32])>,
    a: i32,
    lay: (Layout, i32),
    costs: &[u32],
    ctx: &mut [u8],
    sf: &mut [u16],
) -> Option<GroupFields> {
    #[cfg(target_arch = "x86_64")]
    {
        let vals = vals.first_chunk::<8>()?;
        let colm = colm.first_chunk_mut::<8>()?;
        let ctx = ctx.first_chunk_mut::<8>()?;
        let signs = match signs {
            Some((f, s)) => Some((
                f.first_chunk_mut::<8>()?,
                s.first_chunk_mut::<8>()?,
                sf.first_chunk_mut::<8>()?,
            )),
            None => None,
        };
        if costs.len() <= 4096 || !available() {
            return None;
        }
        // SAFETY: the CPU has AVX2 (checked above); every slice is eight long and `costs` has
        // an entry for every frequency up to 4096.
        Some(unsafe { imp::contexts(vals, colm, signs, a, lay, costs, ctx) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (vals, colm, signs, a, lay, costs, ctx, sf);
        None
    }
}

impl<'p> EncGroups<'p> {
    /// The groups of a frame of values laid out as `l`.
    pub(crate) fn new(packed: &'p [u32], e_at: [u32; 32], m_at: &'p [u32], l: Layout) -> Self {
        let ok = available()
            && m_at.len() == 256
            && e_at.iter().chain(m_at).all(|&a| {
                (a as usize)
                    .checked_add(256)
                    .is_some_and(|end| end <= packed.len())
            });
        EncGroups {
            packed,
            e_at,
            m_at,
            l,
            ok,
        }
    }

    /// Whether [`EncGroups::put`] can take groups at all.
    pub(crate) fn usable(&self) -> bool {
        self.ok
    }

    /// Puts a whole group of eight values (`vals`, their exponent contexts `ctx`, and their
    /// signs' frequencies `sf` when the signs are coded) in reverse: S, M, E (the caller puts Z,
    /// and leaves groups with coded low bits to the scalar steps). Says whether it did; when not,
    /// nothing has changed.
    pub(crate) fn put(
        &self,
        enc: &mut Encoder,
        vals: &[u32],
        ctx: &[u8],
        sf: Option<&[u16]>,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let (Some(vals), Some(ctx)) = (vals.first_chunk::<8>(), ctx.first_chunk::<8>()) else {
                return false;
            };
            let sf = match sf {
                Some(s) => match s.first_chunk::<8>() {
                    Some(s) => Some(s),
                    None => return false,
                },
                None => None,
            };
            let (_, words, len) = enc.lanes();
            // Three steps of at most eight words, each stored as eight.
            if !self.ok
                || len
                    .checked_add(3 * 8 + 8)
                    .is_none_or(|end| end > words.len())
            {
                return false;
            }
            // SAFETY: the CPU has AVX2 and the tables are inside `packed` (`self.ok`), the group
            // is whole and the words fit (checked above).
            unsafe { imp::put(self, enc, vals, ctx, sf) };
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (enc, vals, ctx, sf);
            false
        }
    }
}

/// Whether this CPU runs [`group`] (checked once; `std` caches the answer).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Decodes the group of `out` (values `lo..` of the frame, `z` its block's level) when it can
/// (see the module's doc), and says whether it did; when not, nothing has changed.
pub(crate) fn group(
    t: &Lanes<'_>,
    st: &mut LaneState,
    dec: &mut Decoder<'_>,
    out: &mut [u8],
    lo: usize,
    z: u32,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !ready(t, st, dec, out, z) {
            return false;
        }
        // SAFETY: `ready` checked `Lanes::simd` (the CPU has AVX2, the tables are inside the
        // lookups: `frame_fits`) and every bound the steps rely on.
        unsafe { imp::group(t, st, dec, out, lo, z) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, st, dec, out, lo, z);
        false
    }
}

/// Words a group reads at most: one per lane for each of E, M, R1, R0 and S.
#[cfg(target_arch = "x86_64")]
const MOST_WORDS: usize = 5 * 8;

/// Whether the group can take the AVX2 steps.
#[cfg(target_arch = "x86_64")]
fn ready(t: &Lanes<'_>, st: &LaneState, dec: &mut Decoder<'_>, out: &[u8], z: u32) -> bool {
    let bytes = t.l.bytes();
    let (words, pos) = dec.stream();
    // Every read of 16 bytes at the position stays inside the stream.
    let words_ok = pos
        .checked_add(2 * MOST_WORDS + 16)
        .is_some_and(|end| end <= words.len());
    let cols_ok = st.col.checked_add(8).is_some_and(|end| end <= t.cols);
    let signs_ok = match t.sign_mode {
        crate::float::SIGNS_CODED => st.fast.len() == t.cols && st.slow.len() == t.cols,
        _ => true,
    };
    let low_ok = z == 2 || {
        let r1 = t.r1[z as usize & 1];
        let r0 = if z == 0 { t.r0 } else { RSrc::Unused };
        let used = |r: RSrc| r != RSrc::Unused;
        let raw = usize::from(r1 == RSrc::Raw) + usize::from(r0 == RSrc::Raw);
        t.l.two_bytes()
            && used(r1)
            && (z == 1 || used(r0))
            && st
                .rpos
                .checked_add(16)
                .is_some_and(|end| raw == 0 || end <= t.raw.len())
    };
    t.simd
        && out.len() == 8 * bytes
        && (bytes == 2 || bytes == 4)
        && words_ok
        && cols_ok
        && signs_ok
        && low_ok
        && st.colm.len() == t.cols
}

/// Whether the CPU has AVX2 and the frame suits [`group`]: eight exponent bits (256 entries
/// in the exponents' tables) and every table index inside the lookups (the gathers read
/// there). Checked once a frame, for `Lanes::simd`.
pub(crate) fn frame_fits(t: &Lanes<'_>) -> bool {
    let tables = t.tables();
    available()
        && t.l.ebits == 8
        && t.e_idx
            .iter()
            .chain(&t.m_idx)
            .all(|&i| (i as usize) < tables)
        && [t.r1[0], t.r1[1], t.r0]
            .iter()
            .all(|r| !matches!(r, RSrc::Coded(i) if *i as usize >= tables))
        && t.m_idx.len() == 256
        && t.m_bad.len() == 256
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;
    use crate::float::{col_term, group_mean, SIGNS_CODED, SIGNS_RAW};
    use std::arch::x86_64::*;

    /// Each lane's exponent and top seven mantissa bits (`Layout::exp`, `Layout::man`).
    #[target_feature(enable = "avx2")]
    fn fields(v: __m256i, l: Layout) -> (__m256i, __m256i) {
        let e = _mm256_srl_epi32(v, _mm_cvtsi32_si128(l.mbits as i32));
        let m = _mm256_srl_epi32(v, _mm_cvtsi32_si128(l.rb as i32));
        (
            _mm256_and_si256(e, _mm256_set1_epi32(0xff)),
            _mm256_and_si256(m, _mm256_set1_epi32(0x7f)),
        )
    }

    /// Each lane's sign, as all ones or zero.
    #[target_feature(enable = "avx2")]
    fn sign_lanes(v: __m256i, l: Layout) -> __m256i {
        _mm256_srai_epi32::<31>(_mm256_sll_epi32(v, _mm_cvtsi32_si128(32 - l.width as i32)))
    }

    /// Each lane's exponent context from its column's mean `cm` and the row's mean `a`
    /// (`float::e_ctx_v2` of `float::col_term`).
    #[target_feature(enable = "avx2")]
    fn exp_ctx(cm: __m256i, a: i32, e_base: i32) -> __m256i {
        let k = _mm256_add_epi32(
            _mm256_add_epi32(cm, _mm256_add_epi32(cm, cm)),
            _mm256_set1_epi32(col_term(0, e_base)),
        );
        let cx = _mm256_srai_epi32::<6>(_mm256_add_epi32(_mm256_set1_epi32(5 * a), k));
        _mm256_min_epi32(
            _mm256_max_epi32(cx, _mm256_setzero_si256()),
            _mm256_set1_epi32(31),
        )
    }

    /// The columns' means moved towards exponents `e` (`float::col_ema`).
    #[target_feature(enable = "avx2")]
    fn col_moved(cm: __m256i, e: __m256i) -> __m256i {
        _mm256_add_epi32(
            cm,
            _mm256_srai_epi32::<4>(_mm256_sub_epi32(_mm256_slli_epi32::<4>(e), cm)),
        )
    }

    /// The sign models' frequencies of sign 1 (`SignModel::f1`).
    #[target_feature(enable = "avx2")]
    fn sign_f1(fast: __m256i, slow: __m256i) -> __m256i {
        let f1 = _mm256_srai_epi32::<5>(_mm256_add_epi32(fast, slow));
        _mm256_min_epi32(
            _mm256_max_epi32(f1, _mm256_set1_epi32(1)),
            _mm256_set1_epi32(4095),
        )
    }

    /// The sign models moved towards signs `bit` (all ones or zero; `SignModel::update`).
    #[target_feature(enable = "avx2")]
    fn signs_moved(fast: __m256i, slow: __m256i, bit: __m256i) -> (__m256i, __m256i) {
        let tgt = _mm256_and_si256(bit, _mm256_set1_epi32(0xffff));
        (
            _mm256_add_epi32(fast, _mm256_srai_epi32::<5>(_mm256_sub_epi32(tgt, fast))),
            _mm256_add_epi32(slow, _mm256_srai_epi32::<8>(_mm256_sub_epi32(tgt, slow))),
        )
    }

    /// For each mask of the lanes that need a word, the index of each such lane's word among
    /// the next eight: the number of needing lanes before it.
    static PERM: [[u32; 8]; 256] = perm_table();

    const fn perm_table() -> [[u32; 8]; 256] {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut k, mut n) = (0, 0);
            while k < 8 {
                if (m >> k) & 1 == 1 {
                    t[m][k] = n;
                    n += 1;
                }
                k += 1;
            }
            m += 1;
        }
        t
    }

    /// 16 bytes of `b` from `at`, zeros past its end (callers check that there are 16).
    #[inline(always)]
    fn load16(b: &[u8], at: usize) -> __m128i {
        match b.get(at..).and_then(|s| s.first_chunk::<16>()) {
            // SAFETY: 16 readable bytes; the load is unaligned.
            Some(s) => unsafe { _mm_loadu_si128(s.as_ptr().cast()) },
            None => {
                let mut pad = [0u8; 16];
                if let Some(s) = b.get(at..) {
                    pad[..s.len().min(16)].copy_from_slice(&s[..s.len().min(16)]);
                }
                // SAFETY: as above, from the padded copy.
                unsafe { _mm_loadu_si128(pad.as_ptr().cast()) }
            }
        }
    }

    /// Eight i32 of `s` from `at` (callers check that there are eight).
    #[inline(always)]
    fn load8(s: &[i32], at: usize) -> __m256i {
        let mut a = [0i32; 8];
        if let Some(c) = s.get(at..).and_then(|c| c.first_chunk::<8>()) {
            a = *c;
        }
        // SAFETY: `a` is eight i32; the load is unaligned.
        unsafe { _mm256_loadu_si256(a.as_ptr().cast()) }
    }

    /// Stores eight i32 into `s` from `at` (nothing when there are not eight).
    #[inline(always)]
    fn store8(s: &mut [i32], at: usize, v: __m256i) {
        if let Some(c) = s.get_mut(at..).and_then(|c| c.first_chunk_mut::<8>()) {
            // SAFETY: `c` is eight writable i32; the store is unaligned.
            unsafe { _mm256_storeu_si256(c.as_mut_ptr().cast(), v) }
        }
    }

    /// Renormalises the states `x`: each lane below 2^16 takes the next word of the stream, in
    /// lane order.
    #[target_feature(enable = "avx2")]
    fn renorm(x: __m256i, words: &[u8], pos: &mut usize) -> __m256i {
        let need = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(x), _mm256_setzero_si256());
        let mask = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize & 0xff;
        let w = _mm256_cvtepu16_epi32(load16(words, *pos));
        // SAFETY: PERM[mask] is eight u32; the load is unaligned.
        let perm = unsafe { _mm256_loadu_si256(PERM[mask].as_ptr().cast()) };
        let w = _mm256_permutevar8x32_epi32(w, perm);
        *pos += 2 * mask.count_ones() as usize;
        _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32::<16>(x), w), need)
    }

    /// One symbol on every lane: lane `k` from the table starting at entry `base[k]` of `luts`.
    /// Returns the table entries (symbol in the low byte).
    ///
    /// # Safety
    /// Every `base[k] + 4095` is inside `luts`.
    #[target_feature(enable = "avx2")]
    unsafe fn step(
        x: &mut __m256i,
        base: __m256i,
        luts: &[u32],
        words: &[u8],
        pos: &mut usize,
    ) -> __m256i {
        let slot = _mm256_and_si256(*x, _mm256_set1_epi32(0xfff));
        // SAFETY: the caller's bound on `base`, and slot <= 4095.
        let v = unsafe {
            _mm256_i32gather_epi32::<4>(luts.as_ptr().cast(), _mm256_add_epi32(base, slot))
        };
        let freq = _mm256_add_epi32(
            _mm256_and_si256(_mm256_srli_epi32::<8>(v), _mm256_set1_epi32(0xfff)),
            _mm256_set1_epi32(1),
        );
        let start = _mm256_srli_epi32::<20>(v);
        let xn = _mm256_add_epi32(
            _mm256_mullo_epi32(freq, _mm256_srli_epi32::<12>(*x)),
            _mm256_sub_epi32(slot, start),
        );
        *x = renorm(xn, words, pos);
        v
    }

    /// The low bytes at `o`, `o + stride`, ... (eight of them) of `raw` from `at`, one a lane.
    #[target_feature(enable = "avx2")]
    fn raw_lanes(raw: &[u8], at: usize, stride: usize, o: usize) -> __m256i {
        let b = load16(raw, at);
        let pick = if stride == 2 {
            let o = o as i8;
            _mm_setr_epi8(
                o,
                o + 2,
                o + 4,
                o + 6,
                o + 8,
                o + 10,
                o + 12,
                o + 14,
                -1,
                -1,
                -1,
                -1,
                -1,
                -1,
                -1,
                -1,
            )
        } else {
            _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1, -1, -1, -1, -1)
        };
        _mm256_cvtepu8_epi32(_mm_shuffle_epi8(b, pick))
    }

    /// One low-bits field of the group: coded with slot `r`'s table, or the raw bytes at `o` in
    /// each value's `stride` of them from `rpos`.
    ///
    /// # Safety
    /// A coded `r`'s table is inside `t.luts`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    unsafe fn low_lanes(
        t: &Lanes<'_>,
        r: RSrc,
        o: usize,
        stride: usize,
        rpos: usize,
        x: &mut __m256i,
        words: &[u8],
        pos: &mut usize,
    ) -> __m256i {
        match r {
            // SAFETY: the caller's bound.
            RSrc::Coded(i) => unsafe {
                step(x, _mm256_set1_epi32((i << 12) as i32), t.luts, words, pos)
            },
            _ => raw_lanes(t.raw, rpos, stride, o),
        }
    }

    /// The sum of the eight lanes.
    #[target_feature(enable = "avx2")]
    fn sum8(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// For each mask of the lanes that emit a word, those lanes from the last to the first
    /// (the order the scalar encoder emits them in).
    static EMIT: [[u32; 8]; 256] = emit_table();

    const fn emit_table() -> [[u32; 8]; 256] {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut k, mut n) = (8, 0);
            while k > 0 {
                k -= 1;
                if (m >> k) & 1 == 1 {
                    t[m][n] = k as u32;
                    n += 1;
                }
            }
            m += 1;
        }
        t
    }

    /// Puts one symbol on every lane, lane `k`'s start and frequency packed in `fs[k]`
    /// (`start | freq << 16`), emitting words from the last lane to the first as
    /// `Encoder::put_sym` does one lane after the other.
    #[target_feature(enable = "avx2")]
    fn put_step(x: &mut __m256i, fs: __m256i, words: &mut [u16], len: &mut usize) {
        let freq = _mm256_srli_epi32::<16>(fs);
        let start = _mm256_and_si256(fs, _mm256_set1_epi32(0xffff));
        // Emit when x >= freq << 20, i.e. (x >> 20) >= freq.
        let keep = _mm256_cmpgt_epi32(freq, _mm256_srli_epi32::<20>(*x));
        let mask = !(_mm256_movemask_ps(_mm256_castsi256_ps(keep)) as usize) & 0xff;
        // SAFETY: EMIT[mask] is eight u32; the load is unaligned.
        let perm = unsafe { _mm256_loadu_si256(EMIT[mask].as_ptr().cast()) };
        let w = _mm256_permutevar8x32_epi32(_mm256_and_si256(*x, _mm256_set1_epi32(0xffff)), perm);
        let w = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi32(w, w));
        if let Some(d) = words.get_mut(*len..).and_then(|d| d.first_chunk_mut::<8>()) {
            // SAFETY: eight writable u16; the store is unaligned.
            unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), _mm256_castsi256_si128(w)) };
        }
        *len += mask.count_ones() as usize;
        let xv = _mm256_blendv_epi8(_mm256_srli_epi32::<16>(*x), *x, keep);
        // q = xv / freq, exactly: through f32 (within one of it), then corrected.
        let xf = _mm256_add_ps(
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_srli_epi32::<16>(xv)),
                _mm256_set1_ps(65536.0),
            ),
            _mm256_cvtepi32_ps(_mm256_and_si256(xv, _mm256_set1_epi32(0xffff))),
        );
        let rf = _mm256_div_ps(_mm256_set1_ps(1.0), _mm256_cvtepi32_ps(freq));
        let mut q = _mm256_cvttps_epi32(_mm256_mul_ps(xf, rf));
        let mut r = _mm256_sub_epi32(xv, _mm256_mullo_epi32(q, freq));
        let neg = _mm256_cmpgt_epi32(_mm256_setzero_si256(), r);
        q = _mm256_add_epi32(q, neg);
        r = _mm256_add_epi32(r, _mm256_and_si256(freq, neg));
        let over = _mm256_cmpgt_epi32(r, _mm256_sub_epi32(freq, _mm256_set1_epi32(1)));
        q = _mm256_sub_epi32(q, over);
        r = _mm256_sub_epi32(r, _mm256_and_si256(freq, over));
        *x = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32::<12>(q), r), start);
    }

    /// The first pass over a group (see [`super::contexts`]).
    ///
    /// # Safety
    /// The CPU has AVX2; `costs` has at least 4097 entries.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn contexts(
        vals: &[u32; 8],
        colm: &mut [i32; 8],
        signs: Option<(&mut [i32; 8], &mut [i32; 8], &mut [u16; 8])>,
        a: i32,
        (l, e_base): (Layout, i32),
        costs: &[u32],
        ctx: &mut [u8; 8],
    ) -> GroupFields {
        // SAFETY: eight u32 / i32 each; the loads are unaligned.
        let (v, cm) = unsafe {
            (
                _mm256_loadu_si256(vals.as_ptr().cast()),
                _mm256_loadu_si256(colm.as_ptr().cast()),
            )
        };
        let (e, m) = fields(v, l);
        let cx = exp_ctx(cm, a, e_base);
        let cm = col_moved(cm, e);
        let mut f = GroupFields::default();
        // SAFETY: eight i32 / u32 each; the stores are unaligned.
        unsafe {
            _mm256_storeu_si256(colm.as_mut_ptr().cast(), cm);
            _mm256_storeu_si256(f.e.as_mut_ptr().cast(), e);
            _mm256_storeu_si256(f.m.as_mut_ptr().cast(), m);
            _mm256_storeu_si256(f.cx.as_mut_ptr().cast(), cx);
        }
        for (c, &x) in ctx.iter_mut().zip(&f.cx) {
            *c = x as u8;
        }
        f.sum = sum8(e);
        if let Some((fast8, slow8, sf)) = signs {
            // SAFETY: eight i32 each; the loads are unaligned.
            let (fast, slow) = unsafe {
                (
                    _mm256_loadu_si256(fast8.as_ptr().cast()),
                    _mm256_loadu_si256(slow8.as_ptr().cast()),
                )
            };
            let f1 = sign_f1(fast, slow);
            let bit = sign_lanes(v, l);
            let fs = _mm256_blendv_epi8(_mm256_sub_epi32(_mm256_set1_epi32(4096), f1), f1, bit);
            // SAFETY: fs is within 1..=4095 and `costs` has 4097 entries.
            let cost = unsafe { _mm256_i32gather_epi32::<4>(costs.as_ptr().cast(), fs) };
            // Each cost is below 2^20: eight of them sum below 2^23.
            f.sign_cost = u64::from(sum8(cost) as u32);
            let (fast, slow) = signs_moved(fast, slow, bit);
            let mut f1s = [0u32; 8];
            // SAFETY: eight i32 / u32 each; the stores are unaligned.
            unsafe {
                _mm256_storeu_si256(fast8.as_mut_ptr().cast(), fast);
                _mm256_storeu_si256(slow8.as_mut_ptr().cast(), slow);
                _mm256_storeu_si256(f1s.as_mut_ptr().cast(), f1);
            }
            for (d, &x) in sf.iter_mut().zip(&f1s) {
                *d = x as u16;
            }
        }
        f
    }

    /// The encoder's group: S, M, E in reverse (see [`EncGroups::put`]).
    ///
    /// # Safety
    /// `g.ok`; the encoder's word buffer has room for 32 more words.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn put(
        g: &EncGroups<'_>,
        enc: &mut Encoder,
        vals: &[u32; 8],
        ctx: &[u8; 8],
        sf: Option<&[u16; 8]>,
    ) {
        let (xs, words, len) = enc.lanes();
        // SAFETY: eight u32 each; the loads are unaligned.
        let (mut x, v) = unsafe {
            (
                _mm256_loadu_si256(xs.as_ptr().cast()),
                _mm256_loadu_si256(vals.as_ptr().cast()),
            )
        };
        if let Some(sf) = sf {
            // SAFETY: eight u16; the load is unaligned.
            let f1 = _mm256_cvtepu16_epi32(unsafe { _mm_loadu_si128(sf.as_ptr().cast()) });
            let f0 = _mm256_sub_epi32(_mm256_set1_epi32(4096), f1);
            let bit = sign_lanes(v, g.l);
            // Sign 1: start f0, frequency f1; sign 0: start 0, frequency f0.
            let start = _mm256_and_si256(f0, bit);
            let freq = _mm256_blendv_epi8(f0, f1, bit);
            put_step(
                &mut x,
                _mm256_or_si256(start, _mm256_slli_epi32::<16>(freq)),
                words,
                len,
            );
        }
        let (e, m) = fields(v, g.l);
        // SAFETY: e <= 255 and m_at has 256 entries; every table start leaves 256 entries
        // inside `packed` (`g.ok`), and m <= 127.
        let fs = unsafe {
            let at = _mm256_i32gather_epi32::<4>(g.m_at.as_ptr().cast(), e);
            _mm256_i32gather_epi32::<4>(g.packed.as_ptr().cast(), _mm256_add_epi32(at, m))
        };
        put_step(&mut x, fs, words, len);
        let cx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(*ctx)));
        let cx = _mm256_and_si256(cx, _mm256_set1_epi32(31));
        // SAFETY: cx <= 31 and e_at has 32 entries; e <= 255 and each table start leaves 256
        // entries inside `packed`.
        let fs = unsafe {
            let at = _mm256_i32gather_epi32::<4>(g.e_at.as_ptr().cast(), cx);
            _mm256_i32gather_epi32::<4>(g.packed.as_ptr().cast(), _mm256_add_epi32(at, e))
        };
        put_step(&mut x, fs, words, len);
        let mut out = [0u32; 8];
        // SAFETY: eight u32; the store is unaligned.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), x) };
        *xs = out;
    }

    /// The group's steps (`super::ready` holds).
    ///
    /// # Safety
    /// The CPU has AVX2, and `super::ready` returned true for these arguments.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn group(
        t: &Lanes<'_>,
        st: &mut LaneState,
        dec: &mut Decoder<'_>,
        out: &mut [u8],
        lo: usize,
        z: u32,
    ) {
        let c = st.col;
        let xs = dec.x;
        // SAFETY: `xs` is eight u32; the load is unaligned.
        let mut x = unsafe { _mm256_loadu_si256(xs.as_ptr().cast()) };
        let (words, pos) = dec.stream();
        let luts = t.luts;
        let one = _mm256_set1_epi32(1);
        let mut bad = _mm256_setzero_si256();

        // E.
        let cm = load8(&st.colm, c);
        let cx = exp_ctx(cm, st.a, t.e_base);
        bad = _mm256_or_si256(
            bad,
            _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(t.e_bad as i32), cx),
                one,
            ),
        );
        // SAFETY: cx is within 0..=31 and e_idx has 32 entries.
        let ti = unsafe { _mm256_i32gather_epi32::<4>(t.e_idx.as_ptr().cast(), cx) };
        // SAFETY: every e_idx is below `t.tables` (`ready`), so its table is inside `luts`.
        let v = unsafe { step(&mut x, _mm256_slli_epi32::<12>(ti), luts, words, pos) };
        let e = _mm256_and_si256(v, _mm256_set1_epi32(0xff));
        store8(&mut st.colm, c, col_moved(cm, e));
        st.a = group_mean(st.a, sum8(e), 8);

        // M.
        // SAFETY: e is within 0..=255, and m_idx and m_bad have 256 entries (`ready`).
        let (mi, mb) = unsafe {
            (
                _mm256_i32gather_epi32::<4>(t.m_idx.as_ptr().cast(), e),
                _mm256_i32gather_epi32::<4>(t.m_bad.as_ptr().cast(), e),
            )
        };
        bad = _mm256_or_si256(bad, mb);
        // SAFETY: every m_idx is below `t.tables` (`ready`).
        let v = unsafe { step(&mut x, _mm256_slli_epi32::<12>(mi), luts, words, pos) };
        let m = _mm256_and_si256(v, _mm256_set1_epi32(0x7f));
        let mut val = _mm256_or_si256(
            _mm256_sll_epi32(e, _mm_cvtsi32_si128(t.l.mbits as i32)),
            _mm256_sll_epi32(m, _mm_cvtsi32_si128(t.l.rb as i32)),
        );

        // R1, R0 (f32 with low bits).
        if z < 2 {
            let r1 = t.r1[z as usize & 1];
            let r0 = if z == 0 { t.r0 } else { RSrc::Unused };
            let r1_raw = r1 == RSrc::Raw;
            let stride = usize::from(r1_raw) + usize::from(r0 == RSrc::Raw);
            // SAFETY: the coded slots' tables are below `t.tables` (`ready`).
            let r1v = unsafe { low_lanes(t, r1, 0, stride, st.rpos, &mut x, words, pos) };
            val = _mm256_or_si256(
                val,
                _mm256_slli_epi32::<8>(_mm256_and_si256(r1v, _mm256_set1_epi32(0xff))),
            );
            if z == 0 {
                let o = usize::from(r1_raw);
                // SAFETY: as above.
                let r0v = unsafe { low_lanes(t, r0, o, stride, st.rpos, &mut x, words, pos) };
                val = _mm256_or_si256(val, _mm256_and_si256(r0v, _mm256_set1_epi32(0xff)));
            }
            st.rpos += 8 * stride;
        }

        // S.
        let top = _mm_cvtsi32_si128(t.l.width as i32 - 1);
        match t.sign_mode {
            SIGNS_CODED => {
                let fast = load8(&st.fast, c);
                let slow = load8(&st.slow, c);
                let f1 = sign_f1(fast, slow);
                let f0 = _mm256_sub_epi32(_mm256_set1_epi32(4096), f1);
                let slot = _mm256_and_si256(x, _mm256_set1_epi32(0xfff));
                let bit = _mm256_cmpgt_epi32(slot, _mm256_sub_epi32(f0, one));
                let start = _mm256_and_si256(f0, bit);
                let freq = _mm256_blendv_epi8(f0, f1, bit);
                let xn = _mm256_add_epi32(
                    _mm256_mullo_epi32(freq, _mm256_srli_epi32::<12>(x)),
                    _mm256_sub_epi32(slot, start),
                );
                x = renorm(xn, words, pos);
                let (fast, slow) = signs_moved(fast, slow, bit);
                store8(&mut st.fast, c, fast);
                store8(&mut st.slow, c, slow);
                val = _mm256_or_si256(val, _mm256_sll_epi32(_mm256_srli_epi32::<31>(bit), top));
            }
            SIGNS_RAW => {
                let byte = i32::from(t.signs.get(lo >> 3).copied().unwrap_or(0));
                let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                let s = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), lanes), lanes);
                val = _mm256_or_si256(val, _mm256_sll_epi32(_mm256_srli_epi32::<31>(s), top));
            }
            _ => {}
        }

        let mut xs = [0u32; 8];
        // SAFETY: `xs` is eight u32; the store is unaligned.
        unsafe { _mm256_storeu_si256(xs.as_mut_ptr().cast(), x) };
        dec.x = xs;
        st.bad |= _mm256_testz_si256(bad, bad) == 0;
        st.col = if c + 8 == t.cols { 0 } else { c + 8 };
        if let Some(o) = out.first_chunk_mut::<32>() {
            // SAFETY: 32 writable bytes; the store is unaligned.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), val) };
        } else if let Some(o) = out.first_chunk_mut::<16>() {
            let packed = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi32(val, val));
            // SAFETY: 16 writable bytes; the store is unaligned.
            unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), _mm256_castsi256_si128(packed)) };
        }
    }
}
