//! Property tests: every kind round-trips bit for bit (special values, NaN payloads, empty and
//! odd-length input, low-precision blocks), and damaged or truncated frames are an error,
//! never a panic or other bytes.

use coral_float_codec::{decode, decode_into, encode, encode_rows, Kind, HEADER_BYTES, VERSION};
use proptest::prelude::*;

const KINDS: [Kind; 4] = [Kind::Bytes, Kind::Bf16, Kind::F16, Kind::F32];

fn round_trip(kind: Kind, data: &[u8]) -> Vec<u8> {
    round_trip_rows(kind, data, 1)
}

/// Codes `data` in rows of `rows` values and checks that it comes back, both ways of decoding.
fn round_trip_rows(kind: Kind, data: &[u8], rows: usize) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_rows(kind, data, rows, &mut frame).unwrap();
    if rows == 1 {
        let mut plain = Vec::new();
        encode(kind, data, &mut plain).unwrap();
        assert_eq!(plain, frame, "encode is encode_rows with rows of one");
    }
    assert!(
        frame.len() <= data.len() + HEADER_BYTES,
        "{kind:?}: frame grew past the stored size"
    );
    let mut back = Vec::new();
    decode(&frame, &mut back).unwrap();
    assert_eq!(back, data, "{kind:?}");
    let mut exact = vec![0u8; data.len()];
    decode_into(&frame, &mut exact).unwrap();
    assert_eq!(exact, data);
    frame
}

/// Weight-like values: a scale per row of 64, Gaussian-ish, some rows at lower precision, and
/// a sprinkling of special values.
fn weights(kind: Kind, n: usize, seed: u64, specials: bool) -> Vec<u8> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = Vec::with_capacity(n * kind.size());
    let mut scale = 0.02f32;
    let mut low_precision = false;
    for i in 0..n {
        if i % 64 == 0 {
            scale = 0.005 + (next() % 1000) as f32 * 1e-4;
            low_precision = next() % 5 == 0;
        }
        let u: f32 = (0..4)
            .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0;
        let mut v = (u * scale).to_bits();
        if low_precision {
            v &= !0x1fff;
        }
        if specials && next() % 97 == 0 {
            v = [
                0x7fc0_0001,
                0xffff_ffff,
                0x7f80_0000,
                0xff80_0000,
                0x8000_0000,
                0,
                1,
                0x0000_0fff,
                0x7f7f_ffff,
            ][(next() % 9) as usize];
        }
        match kind {
            Kind::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Kind::Bf16 => out.extend_from_slice(&((v >> 16) as u16).to_le_bytes()),
            Kind::F16 => out.extend_from_slice(&half_bits(f32::from_bits(v)).to_le_bytes()),
            Kind::Bytes => out.push(v as u8),
        }
    }
    out
}

/// f32 to IEEE half bits (truncating; NaN stays NaN): enough for test data.
fn half_bits(f: f32) -> u16 {
    let b = f.to_bits();
    let s = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xff) as i32;
    let m = b & 0x7f_ffff;
    if e == 0xff {
        return s | 0x7c00 | ((m >> 13) as u16) | u16::from(m != 0);
    }
    let e = e - 127 + 15;
    if e >= 31 {
        s | 0x7c00
    } else if e <= 0 {
        s
    } else {
        s | (e as u16) << 10 | (m >> 13) as u16
    }
}

#[test]
fn weight_like_values_compress_and_round_trip() {
    for kind in [Kind::Bf16, Kind::F16, Kind::F32] {
        for n in [64, 1000, 100_000] {
            let data = weights(kind, n, 7, true);
            let frame = round_trip(kind, &data);
            assert!(
                n < 1000 || frame.len() < data.len(),
                "{kind:?} {n}: {} >= {}",
                frame.len(),
                data.len()
            );
        }
    }
}

#[test]
fn low_precision_blocks_cost_no_low_bits() {
    // f32 whose low 16 bits are zero everywhere: bf16 kept in f32.
    let data: Vec<u8> = weights(Kind::F32, 50_000, 3, false)
        .chunks_exact(4)
        .flat_map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0xffff_0000).to_le_bytes())
        .collect();
    let frame = round_trip(Kind::F32, &data);
    let bf16 = round_trip(Kind::Bf16, &weights(Kind::Bf16, 50_000, 3, false));
    assert!(
        frame.len() < bf16.len() + 2_000,
        "{} against {}",
        frame.len(),
        bf16.len()
    );
}

/// f32 whose low 16 bits take few values (weights quantised, then widened with an offset): the
/// encoder's sample of the low bytes sees that coding them pays, counts them all and codes
/// them, where random low bits stay raw.
#[test]
fn low_bytes_that_repeat_are_coded() {
    let few = [0x1234u32, 0x8001, 0x00ff, 0x4000];
    let base = weights(Kind::F32, 50_000, 5, false);
    let with = |low: &dyn Fn(usize) -> u32| -> Vec<u8> {
        base.chunks_exact(4)
            .enumerate()
            .flat_map(|(i, c)| {
                let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                (v & 0xffff_0000 | low(i)).to_le_bytes()
            })
            .collect()
    };
    let repeating = round_trip(Kind::F32, &with(&|i| few[(i * 7 + i / 3) % 4]));
    let random = round_trip(
        Kind::F32,
        &with(&|i| (i as u32).wrapping_mul(0x9E37_79B9) >> 16),
    );
    // Four bits a value for the repeating low bits (two for each byte, coded apart), against
    // sixteen kept raw.
    assert!(
        repeating.len() + 50_000 * 11 / 8 < random.len(),
        "{} against {}",
        repeating.len(),
        random.len()
    );
}

/// A matrix whose columns keep their sign more often than not, as weight matrices' columns do.
fn column_signed(kind: Kind, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let data = weights(kind, rows * cols, seed, false);
    let w = kind.size();
    let mut out = data.clone();
    for (i, v) in out.chunks_exact_mut(w).enumerate() {
        let c = i % cols;
        // Column c leans to sign c % 2, three times in four.
        let lean = (c % 2) as u8;
        let flip = (i / cols + c) % 4 == 0;
        let s = if flip { 1 - lean } else { lean };
        let top = v.len() - 1;
        v[top] = (v[top] & 0x7f) | (s << 7);
    }
    out
}

#[test]
fn columns_are_modelled_when_rows_are_known() {
    for kind in [Kind::Bf16, Kind::F16, Kind::F32] {
        let data = column_signed(kind, 2_000, 96, 5);
        let with_rows = round_trip_rows(kind, &data, 96);
        let without = round_trip(kind, &data);
        // The signs cost about 0.81 bit each by column once the models have learnt their
        // columns, 1 bit as a bitmap: at least 0.05 bit less each.
        let saved = without.len() as i64 - with_rows.len() as i64;
        assert!(
            saved > (2_000 * 96 / 8 / 20) as i64,
            "{kind:?}: {} with rows against {} without",
            with_rows.len(),
            without.len()
        );
    }
}

#[test]
fn any_row_length_round_trips() {
    let data = weights(Kind::Bf16, 5_000, 9, true);
    for rows in [
        0,
        1,
        2,
        3,
        7,
        64,
        127,
        4_999,
        5_000,
        5_001,
        1 << 20,
        (1 << 20) + 1,
        usize::MAX,
    ] {
        round_trip_rows(Kind::Bf16, &data, rows);
    }
}

/// Frames of earlier versions, as those encoders wrote them for `weights(kind, 3000, 7, true)`:
/// version 1 (before columns were modelled) with rows of one value, version 2 (before binned
/// mantissa tables) and version 3 (before lanes) with rows of 100. They still decode.
#[test]
fn frames_of_earlier_versions_still_decode() {
    for version in [1u8, 2, 3] {
        for kind in [Kind::Bf16, Kind::F16, Kind::F32] {
            let path = format!(
                "{}/tests/data/v{version}-{}.cf",
                env!("CARGO_MANIFEST_DIR"),
                format!("{kind:?}").to_lowercase()
            );
            let frame = std::fs::read(&path).unwrap();
            assert_eq!(frame[2], version, "{path} is a version {version} frame");
            let mut out = Vec::new();
            decode(&frame, &mut out).unwrap();
            assert_eq!(out, weights(kind, 3000, 7, true), "{path}");
            // And this encoder writes the current version; with the same rows as versions 2
            // and 3, no larger but for version 4's four more coder states (16 bytes): a binned
            // table is used only where it costs less, and the row's mean moving once per group
            // of eight values costs nothing here.
            let mut now = Vec::new();
            encode(kind, &out, &mut now).unwrap();
            assert_eq!(now[2], VERSION);
            if version >= 2 {
                encode_rows(kind, &out, 100, &mut now).unwrap();
                assert!(now.len() <= frame.len() + 16, "{path}: {} now", now.len());
            }
        }
    }
}

/// Weights whose density falls across each binade (as a normal distribution's does) code their
/// mantissas with binned tables; mantissas that keep only a few values (weights rounded to
/// fewer bits, then widened) keep full tables. Both round-trip, and each costs less than the
/// other's table would.
#[test]
fn mantissa_tables_follow_the_data() {
    for kind in [Kind::Bf16, Kind::F32] {
        let smooth = weights(kind, 50_000, 3, true);
        let frame = round_trip_rows(kind, &smooth, 100);
        assert!(frame.len() < smooth.len(), "{kind:?}");
        // Every mantissa a multiple of 32 (two top bits kept): a full table codes it in about
        // 2 bits, a binned one would spend 4 bits within the bin alone.
        let w = kind.size();
        let coarse: Vec<u8> = smooth
            .chunks_exact(w)
            .flat_map(|c| {
                let mut v = [0u8; 4];
                v[..w].copy_from_slice(c);
                let x = u32::from_le_bytes(v);
                let keep = if w == 2 { !0x1f } else { !0x1f_ffff };
                (x & keep).to_le_bytes()[..w].to_vec()
            })
            .collect();
        let coarse_frame = round_trip_rows(kind, &coarse, 100);
        assert!(
            (coarse_frame.len() as f64) < frame.len() as f64 * 0.85,
            "{kind:?}: {} coarse against {} smooth",
            coarse_frame.len(),
            frame.len()
        );
    }
}

#[test]
fn every_bit_pattern_of_16_bits() {
    let data: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_le_bytes()).collect();
    for kind in KINDS {
        round_trip(kind, &data);
    }
}

#[test]
fn empty_tiny_and_constant() {
    for kind in KINDS {
        round_trip(kind, &[]);
        round_trip(kind, &[1]);
        round_trip(kind, &[1, 2, 3]);
        round_trip(kind, &[0u8; 4096]);
        round_trip(kind, &[0xffu8; 4095]);
    }
}

#[test]
fn damaged_frames_are_errors() {
    // A frame with its signs as a bitmap, one with them coded by column, and frames of versions
    // 1 and 3.
    let plain = weights(Kind::F32, 20_000, 11, true);
    let columns = column_signed(Kind::F32, 200, 100, 11);
    let mut cases = Vec::new();
    for v in [1, 3] {
        let frame = std::fs::read(format!(
            "{}/tests/data/v{v}-f32.cf",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        cases.push((weights(Kind::F32, 3000, 7, true), frame));
    }
    for (data, rows) in [(plain, 1), (columns, 100)] {
        let mut frame = Vec::new();
        encode_rows(Kind::F32, &data, rows, &mut frame).unwrap();
        cases.push((data, frame));
    }
    for (data, frame) in &cases {
        let mut out = Vec::new();
        // Every truncation point of the first bytes and a spread of later ones.
        for cut in (0..frame.len()).filter(|&c| c < 400 || c % 97 == 0) {
            assert!(decode(&frame[..cut], &mut out).is_err(), "cut at {cut}");
        }
        // A flipped bit anywhere: an error, or (never) other bytes.
        for i in (0..frame.len()).step_by(37) {
            let mut bad = frame.clone();
            bad[i] ^= 1 << (i % 8);
            if let Ok(()) = decode(&bad, &mut out) {
                assert_eq!(&out, data, "flip at byte {i} gave other bytes");
            }
        }
        // A frame for another size.
        let mut small = vec![0u8; data.len() - 4];
        assert!(decode_into(frame, &mut small).is_err());
    }
}

/// Cases per property: 200, or `CORAL_CODEC_CASES` for a long run (`docs/reliability.md`).
fn cases() -> u32 {
    std::env::var("CORAL_CODEC_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_bytes_round_trip(kind in 0usize..4, data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        round_trip(KINDS[kind], &data);
    }

    #[test]
    fn weights_of_any_length_round_trip(kind in 1usize..4, n in 0usize..5000, seed in any::<u64>(), tail in 0usize..4, rows in 0usize..600) {
        let mut data = weights(KINDS[kind], n, seed, true);
        data.extend(std::iter::repeat_n(0xA5, tail));
        round_trip_rows(KINDS[kind], &data, rows);
    }

    #[test]
    fn column_signed_matrices_round_trip(kind in 1usize..4, rows in 1usize..60, cols in 1usize..200, seed in any::<u64>()) {
        let data = column_signed(KINDS[kind], rows, cols, seed);
        round_trip_rows(KINDS[kind], &data, cols);
    }

    #[test]
    fn garbage_after_a_header_is_an_error_or_the_data(kind in 1usize..4, version in 1u8..=VERSION, body in proptest::collection::vec(any::<u8>(), 0..2000), n in 0u64..5000) {
        let mut frame = vec![b'C', b'F', version, 1, KINDS[kind].code(), 0, 0, 0];
        frame.extend_from_slice(&n.to_le_bytes());
        frame.extend_from_slice(&0u64.to_le_bytes());
        frame.extend_from_slice(&body);
        let mut out = Vec::new();
        let _ = decode(&frame, &mut out); // must not panic
    }

    #[test]
    fn flipped_bits_never_give_other_bytes(seed in any::<u64>(), flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..4)) {
        let data = column_signed(Kind::Bf16, 30, 100, seed);
        let mut frame = Vec::new();
        encode_rows(Kind::Bf16, &data, 100, &mut frame).unwrap();
        for (at, bit) in flips {
            let i = at % frame.len();
            frame[i] ^= 1 << bit;
        }
        let mut out = Vec::new();
        if decode(&frame, &mut out).is_ok() {
            prop_assert_eq!(out, data);
        }
    }
}
