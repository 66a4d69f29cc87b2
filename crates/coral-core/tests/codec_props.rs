//! Property tests of the codecs: round trips over every codec, level, shuffle and element size,
//! and "fuzz" tests: random, truncated, bit-flipped and extended input to `decompress` gives an
//! error (or, where corruption cannot be seen, data of the right length), never a panic.

use coral_core::codec::{self, Codec, CodecSpec};
use coral_core::DType;
use proptest::prelude::*;

/// Every codec and level worth testing: none, gzip 1-9, lz4, zstd fast (negative) to high.
fn codecs() -> Vec<Codec> {
    let mut v = vec![Codec::None, Codec::Lz4, Codec::Coral];
    v.extend((1..=9).map(|level| Codec::Gzip { level }));
    v.extend([-7, -1, 1, 3, 9, 19].map(|level| Codec::Zstd { level }));
    v
}

fn specs() -> Vec<CodecSpec> {
    codecs()
        .into_iter()
        .flat_map(|c| [CodecSpec::new(c, false), CodecSpec::new(c, true)])
        .collect()
}

/// Element sizes of every dtype, plus odd ones the generic shuffle handles.
fn element_sizes() -> Vec<usize> {
    let mut v: Vec<usize> = DType::ALL.iter().map(|d| d.size()).collect();
    v.extend([3, 5, 16]);
    v.sort();
    v.dedup();
    v
}

/// HDF5's shuffle, written the obvious way: the reference for the fast paths.
fn reference_shuffle(data: &[u8], es: usize) -> Vec<u8> {
    let n = data.len() / es.max(1);
    let mut out = data.to_vec();
    if es > 1 {
        for j in 0..es {
            for i in 0..n {
                out[j * n + i] = data[i * es + j];
            }
        }
    }
    out
}

/// Bytes that look like weights (small floats) or are arbitrary.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..1500),
        proptest::collection::vec(-1.0f32..1.0, 0..400)
            .prop_map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        (any::<u8>(), 0usize..3000).prop_map(|(b, n)| vec![b; n]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_codec_round_trips(data in payload(), extra in 0usize..17) {
        for es in element_sizes() {
            // Odd lengths: drop up to `extra` bytes so the length is no multiple of `es`.
            let data = &data[..data.len().saturating_sub(extra % es.max(1))];
            for spec in specs() {
                let packed = spec.compress(data, es).unwrap();
                let back = spec.decompress(&packed, es, data.len()).unwrap();
                prop_assert_eq!(&back[..], data, "{:?} es={}", spec, es);
            }
        }
    }

    #[test]
    fn wrong_length_is_an_error(data in proptest::collection::vec(any::<u8>(), 1..600)) {
        for spec in specs() {
            let packed = spec.compress(&data, 4).unwrap();
            prop_assert!(spec.decompress(&packed, 4, data.len() - 1).is_err(), "{:?} shorter", spec);
            prop_assert!(spec.decompress(&packed, 4, data.len() + 1).is_err(), "{:?} longer", spec);
        }
    }

    #[test]
    fn shuffle_matches_the_reference(len in 0usize..2200, es in 1usize..18, seed in any::<u64>()) {
        let data: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
        let s = codec::shuffle(&data, es);
        prop_assert_eq!(&s, &reference_shuffle(&data, es));
        prop_assert_eq!(codec::unshuffle(&s, es), data.clone());
        let mut out = vec![0u8; len];
        codec::shuffle_into(&data, es, &mut out).unwrap();
        prop_assert_eq!(&out, &s);
        codec::unshuffle_into(&s, es, &mut out).unwrap();
        prop_assert_eq!(&out, &data);
        let mut short = vec![0u8; len + 1];
        prop_assert!(codec::shuffle_into(&data, es, &mut short).is_err());
    }

    /// Arbitrary bytes as compressed input: an error or exactly `expected_len` bytes.
    #[test]
    fn fuzz_arbitrary_input(input in proptest::collection::vec(any::<u8>(), 0..700), expected_len in 0usize..5000, es in 1usize..9) {
        for spec in specs() {
            if let Ok(out) = spec.decompress(&input, es, expected_len) {
                prop_assert_eq!(out.len(), expected_len);
            }
        }
    }

    /// Valid output with one bit flipped, truncated, extended or with a byte overwritten: an
    /// error, or (where a change cannot be seen, e.g. an unused padding bit) the original data.
    /// Only `none` cannot see a change of content; it still never returns the wrong length.
    #[test]
    fn fuzz_mutated_output(data in payload(), pos in any::<prop::sample::Index>(), bit in 0u8..8, junk in any::<u8>(), es in prop::sample::select(vec![1usize, 2, 4, 8])) {
        for spec in specs() {
            let packed = spec.compress(&data, es).unwrap();
            let mut variants: Vec<(&str, Vec<u8>)> = Vec::new();
            if !packed.is_empty() {
                let i = pos.index(packed.len());
                let mut flipped = packed.clone();
                flipped[i] ^= 1 << bit;
                variants.push(("flip", flipped));
                let mut overwritten = packed.clone();
                overwritten[i] = junk;
                variants.push(("overwrite", overwritten));
                variants.push(("truncate", packed[..i].to_vec()));
            }
            let mut longer = packed.clone();
            longer.push(junk);
            variants.push(("extend", longer));
            for (what, input) in variants {
                match spec.decompress(&input, es, data.len()) {
                    Err(_) => {}
                    Ok(out) if spec.codec == Codec::None => {
                        prop_assert_eq!(out.len(), data.len(), "{:?} {}", spec, what);
                    }
                    Ok(out) => prop_assert!(out == data, "{:?} {}: corruption went unseen", spec, what),
                }
            }
        }
    }
}

#[test]
fn empty_data_round_trips_everywhere() {
    for es in element_sizes() {
        for spec in specs() {
            let packed = spec.compress(&[], es).unwrap();
            assert!(
                spec.decompress(&packed, es, 0).unwrap().is_empty(),
                "{spec:?}"
            );
        }
    }
}

#[test]
fn large_data_round_trips_through_the_fast_paths() {
    // 1 MiB + 7: whole 16-element blocks, a partial block, and trailing bytes.
    let data: Vec<u8> = (0..(1 << 20) + 7u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    for es in [2, 4, 8] {
        assert_eq!(
            codec::shuffle(&data, es),
            reference_shuffle(&data, es),
            "es={es}"
        );
        let spec = CodecSpec::new(Codec::Zstd { level: 1 }, true);
        let packed = spec.compress(&data, es).unwrap();
        assert_eq!(spec.decompress(&packed, es, data.len()).unwrap(), data);
    }
}

#[test]
fn invalid_levels_are_refused_not_used() {
    for c in [
        Codec::Gzip { level: 0 },
        Codec::Gzip { level: 10 },
        Codec::Zstd { level: 0 },
        Codec::Zstd { level: 23 },
        Codec::Zstd { level: -8 },
    ] {
        assert!(
            CodecSpec::new(c, true).compress(b"abc", 1).is_err(),
            "{c:?}"
        );
    }
}

#[test]
fn frames_are_standard_and_checksummed() {
    let data: Vec<u8> = (0..10_000u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let zstd = codec::compress_raw(Codec::Zstd { level: 3 }, &data).unwrap();
    assert_eq!(&zstd[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    assert_ne!(zstd[4] & 0x04, 0, "zstd content checksum flag");
    let lz4 = codec::compress_raw(Codec::Lz4, &data).unwrap();
    assert_eq!(&lz4[..4], &[0x04, 0x22, 0x4d, 0x18], "lz4 frame magic");
    assert_ne!(lz4[4] & 0x04, 0, "lz4 content checksum flag");
    let gz = codec::compress_raw(Codec::Gzip { level: 6 }, &data).unwrap();
    assert_eq!(gz[0] & 0x0f, 8, "zlib: deflate");
    assert_eq!(
        (u16::from(gz[0]) << 8 | u16::from(gz[1])) % 31,
        0,
        "zlib header check"
    );
    // Other implementations read them: flate2's plain zlib decoder, zstd's streaming decoder.
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&gz[..]), &mut out).unwrap();
    assert_eq!(out, data);
    assert_eq!(zstd::stream::decode_all(&zstd[..]).unwrap(), data);
}

#[test]
fn every_single_bit_flip_is_seen() {
    // Exhaustive: every bit of every byte of a small frame, for each checksummed codec.
    let data: Vec<u8> = (0..128u32)
        .flat_map(|i| ((i as f32).sin() * 0.1).to_le_bytes())
        .collect();
    for codec in [
        Codec::Gzip { level: 6 },
        Codec::Lz4,
        Codec::Zstd { level: 3 },
        Codec::Zstd { level: -3 },
    ] {
        for shuffle in [false, true] {
            let spec = CodecSpec::new(codec, shuffle);
            let packed = spec.compress(&data, 4).unwrap();
            for i in 0..packed.len() * 8 {
                let mut bad = packed.clone();
                bad[i / 8] ^= 1 << (i % 8);
                if let Ok(out) = spec.decompress(&bad, 4, data.len()) {
                    assert!(
                        out == data,
                        "{spec:?}: flipping bit {i} changed the data unseen"
                    );
                }
            }
        }
    }
}
