//! coral-core's benchmarks: hashing, the byte-plane shuffle, and the codecs on the real model.
//!
//! Run with `cargo xtask bench`, or directly:
//!
//! ```text
//! CORAL_TEST_MODEL=$PWD/target/model-cache/all-MiniLM-L6-v2/model.safetensors \
//!     cargo bench -p coral-core --bench core
//! ```
//!
//! Prints markdown tables (medians of several runs; single runs for the slow codec levels) for
//! `docs/benchmarks.md`. Without `CORAL_TEST_MODEL` the codec table is skipped with a note
//! (a failure when `CORAL_TEST_REQUIRE=1`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use coral_core::codec::{self, Codec, CodecSpec};
use coral_core::{ContentHash, DType, HashAlgorithm};

const MIB: usize = 1 << 20;

/// CPU time of this thread: on a shared machine, wall time measures the neighbours too.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Median thread CPU time of `runs` calls of `f` (after one warm-up call when `warm`).
fn median<T>(runs: usize, warm: bool, mut f: impl FnMut() -> T) -> Duration {
    if warm {
        black_box(f());
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = thread_cpu();
            black_box(f());
            thread_cpu() - t
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn gbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn mbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Weight-like f32 data: a smooth random walk scaled to ±0.1 (deterministic).
fn synthetic_f32(bytes: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..bytes / 4)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            ((u - 0.5) * 0.2).to_le_bytes()
        })
        .collect()
}

fn reference_shuffle(data: &[u8], es: usize) -> Vec<u8> {
    let n = data.len() / es;
    let mut out = data.to_vec();
    for j in 0..es {
        for i in 0..n {
            out[j * n + i] = data[i * es + j];
        }
    }
    out
}

fn hashing() {
    let data = synthetic_f32(64 * MIB);
    let shape = [data.len() / 4];
    println!("### Hashing one 64 MiB float32 tensor (one core)\n");
    println!(
        "CPU SHA extensions: {}\n",
        if cpu_has_sha() {
            "yes (sha2 uses them)"
        } else {
            "no (portable SHA-256)"
        }
    );
    println!("| hash | median CPU time | throughput |");
    println!("|---|---:|---:|");
    for (name, alg) in [
        ("SHA-256 (Coral's key)", HashAlgorithm::Sha256),
        ("xxh3-64 (legacy key)", HashAlgorithm::Xxh3Legacy),
    ] {
        let d = median(5, true, || {
            ContentHash::compute(alg, DType::F32, &shape, &data)
        });
        println!(
            "| {name} | {:.1} ms | {:.2} GB/s |",
            d.as_secs_f64() * 1e3,
            gbs(data.len(), d)
        );
    }
    // The same SHA-256 without `coral_core::prefetch`'s hints, and over 1 MiB that stays in
    // the cache (its rate is the ceiling): what the hints win from memory.
    {
        use sha2::Digest;
        let d = median(5, true, || sha2::Sha256::digest(&data));
        println!(
            "| SHA-256, `sha2` alone (no prefetch hints) | {:.1} ms | {:.2} GB/s |",
            d.as_secs_f64() * 1e3,
            gbs(data.len(), d)
        );
        let small = &data[..MIB];
        let d = median(64, true, || sha2::Sha256::digest(small));
        println!(
            "| SHA-256 of 1 MiB in cache (the ceiling) | {:.2} ms | {:.2} GB/s |",
            d.as_secs_f64() * 1e3,
            gbs(small.len(), d)
        );
    }
    println!();
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_sha() -> bool {
    std::arch::is_x86_feature_detected!("sha")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_sha() -> bool {
    false
}

fn shuffling() {
    let data = synthetic_f32(64 * MIB);
    println!("### Byte-plane shuffle of 64 MiB (one core)\n");
    println!("| element size | shuffle | unshuffle | plain loop (reference) | speed-up |");
    println!("|---:|---:|---:|---:|---:|");
    for es in [2usize, 4, 8] {
        let shuffled = codec::shuffle(&data, es);
        let mut out = vec![0u8; data.len()];
        let s = median(5, true, || codec::shuffle_into(&data, es, &mut out));
        let u = median(5, true, || codec::unshuffle_into(&shuffled, es, &mut out));
        let r = median(3, true, || reference_shuffle(&data, es));
        println!(
            "| {es} | {:.2} GB/s | {:.2} GB/s | {:.2} GB/s | {:.1}x |",
            gbs(data.len(), s),
            gbs(data.len(), u),
            gbs(data.len(), r),
            r.as_secs_f64() / s.as_secs_f64()
        );
    }
    println!();
}

fn model_path() -> Option<String> {
    match std::env::var("CORAL_TEST_MODEL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("CORAL_TEST_REQUIRE").as_deref() == Ok("1") {
                panic!("CORAL_TEST_MODEL is not set but CORAL_TEST_REQUIRE=1");
            }
            println!(
                "(codec table skipped: CORAL_TEST_MODEL is not set; run `cargo xtask bench`)\n"
            );
            None
        }
    }
}

/// Every float32 tensor of the model, concatenated in file order.
fn load_model(path: &str) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let mut tensors: Vec<_> = st.tensors();
    tensors.sort_by_key(|(_, t)| t.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(bytes.len());
    let mut skipped = Vec::new();
    for (name, t) in tensors {
        if t.dtype() == safetensors::Dtype::F32 {
            out.extend_from_slice(t.data());
        } else {
            skipped.push(format!(
                "`{name}` ({:?}, {} bytes)",
                t.dtype(),
                t.data().len()
            ));
        }
    }
    assert!(!out.is_empty(), "{path}: no float32 tensor");
    if !skipped.is_empty() {
        println!("Left out (not float32): {}.\n", skipped.join(", "));
    }
    out
}

/// float32 -> bfloat16, round to nearest even.
fn to_bf16(f32s: &[u8]) -> Vec<u8> {
    f32s.chunks_exact(4)
        .flat_map(|c| {
            let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            half::bf16::from_f32(x).to_le_bytes()
        })
        .collect()
}

/// Order-0 entropy bound of the byte planes: the fraction a plane-wise entropy coder could save.
fn plane_entropy_saving(data: &[u8], es: usize) -> f64 {
    let shuffled = codec::shuffle(data, es);
    let n = data.len() / es;
    let mut bits = 0.0;
    for plane in shuffled[..n * es].chunks_exact(n) {
        let mut counts = [0u64; 256];
        for &b in plane {
            counts[b as usize] += 1;
        }
        for &c in counts.iter().filter(|&&c| c > 0) {
            let p = c as f64 / n as f64;
            bits -= c as f64 * p.log2();
        }
    }
    1.0 - bits / (8.0 * (n * es) as f64)
}

/// Rotates every element left by one bit, so that the exponent's 8 bits fill the top byte
/// (bf16, f32) and the sign moves to the bottom bit. An experiment, not a Coral format.
fn rotate_exponent(data: &[u8], es: usize) -> Vec<u8> {
    match es {
        4 => data
            .chunks_exact(4)
            .flat_map(|c| {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
                    .rotate_left(1)
                    .to_le_bytes()
            })
            .collect(),
        2 => data
            .chunks_exact(2)
            .flat_map(|c| {
                u16::from_le_bytes([c[0], c[1]])
                    .rotate_left(1)
                    .to_le_bytes()
            })
            .collect(),
        _ => data.to_vec(),
    }
}

fn codec_specs() -> Vec<CodecSpec> {
    let mut codecs = vec![Codec::None];
    codecs.extend([1, 4, 6, 9].map(|level| Codec::Gzip { level }));
    codecs.push(Codec::Lz4);
    codecs.extend([1, 3, 9, 19].map(|level| Codec::Zstd { level }));
    codecs
        .into_iter()
        .flat_map(|c| {
            if c == Codec::None {
                vec![CodecSpec::new(c, false)]
            } else {
                vec![CodecSpec::new(c, false), CodecSpec::new(c, true)]
            }
        })
        .collect()
}

fn codec_table(label: &str, data: &[u8], es: usize) {
    println!(
        "### {label}: {:.1} MB (plane entropy bound: {:.1}% saved)\n",
        data.len() as f64 / 1e6,
        100.0 * plane_entropy_saving(data, es)
    );
    println!("| codec | shuffle | saved | compress | decompress |");
    println!("|---|:---:|---:|---:|---:|");
    let mut sampled = false;
    for spec in codec_specs() {
        // The slowest settings (gzip-9, zstd-19, or any projected over 20 s of CPU from its first
        // MiB) run on a sample: every 4th MiB of the data. That keeps the run short; the ratio can
        // differ from the whole model's by about a point (zstd-19 with shuffle, fp32: 18.1% on the
        // sample, 17.2% on the whole).
        let probe = &data[..data.len().min(MIB)];
        let t = thread_cpu();
        black_box(spec.compress(probe, es).expect("compress"));
        let projected = (thread_cpu() - t).as_secs_f64() * data.len() as f64 / probe.len() as f64;
        let sample: Vec<u8>;
        let slow = matches!(spec.codec, Codec::Gzip { level: 9 }) || spec.codec.level() >= Some(19);
        let (input, mark) = if slow || projected > 20.0 {
            sampled = true;
            sample = data.chunks(MIB).step_by(4).flatten().copied().collect();
            (&sample[..], " (sample)")
        } else {
            (data, "")
        };
        let t = thread_cpu();
        let packed = spec.compress(input, es).expect("compress");
        let first = thread_cpu() - t;
        // Fast settings: median of 3 more runs; slow ones (over 2 s): the single run.
        let c = if first > Duration::from_secs(2) {
            first
        } else {
            median(3, false, || spec.compress(input, es).expect("compress"))
        };
        let d = median(3, true, || {
            spec.decompress(&packed, es, input.len())
                .expect("decompress")
        });
        let back = spec
            .decompress(&packed, es, input.len())
            .expect("decompress");
        assert!(back == input, "{spec:?} round trip");
        let level = spec
            .codec
            .level()
            .map(|l| format!("-{l}"))
            .unwrap_or_default();
        println!(
            "| {}{level}{mark} | {} | {:.1}% | {:.0} MB/s | {:.0} MB/s |",
            spec.codec.name(),
            if spec.shuffle { "yes" } else { "no" },
            100.0 * (1.0 - packed.len() as f64 / input.len() as f64),
            mbs(input.len(), c),
            mbs(input.len(), d)
        );
    }
    // The exponent kept whole: not a Coral format, a measure of what a codec could gain.
    let rotated = rotate_exponent(data, es);
    let spec = CodecSpec::new(Codec::Zstd { level: 3 }, true);
    let packed = spec.compress(&rotated, es).expect("compress");
    println!(
        "| (experiment) zstd-3 on exponent-whole planes | yes | {:.1}% | | |",
        100.0 * (1.0 - packed.len() as f64 / data.len() as f64)
    );
    println!();
    if sampled {
        println!("(sample): too slow for the whole model in a short run; measured on every 4th MiB ({:.1} MB).\n",
            data.chunks(MIB).step_by(4).map(<[u8]>::len).sum::<usize>() as f64 / 1e6);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let start = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Times are this thread's CPU time (medians), since the machine is shared; load average \
         at the start: {}.\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    hashing();
    shuffling();
    if let Some(path) = model_path() {
        let f32s = load_model(&path);
        let bf16s = to_bf16(&f32s);
        println!("### Codecs on all-MiniLM-L6-v2 (every tensor concatenated, one core)\n");
        println!("`saved` is 1 - compressed/original; speeds are original bytes per second of CPU time.\n");
        codec_table("float32", &f32s, 4);
        codec_table("bfloat16 (round to nearest even)", &bf16s, 2);
    }
    println!(
        "_{:.0} s in all. Command: `CORAL_TEST_MODEL=$PWD/target/model-cache/all-MiniLM-L6-v2/model.safetensors cargo bench -p coral-core --bench core` (or `cargo xtask bench`)._",
        start.elapsed().as_secs_f64()
    );
}
