//! Multi-GB models (issue 13): `coral add`, `export`, `verify` and a one-tensor export of
//! Llama-like bf16 safetensors models of 1, 2 and 4 GiB, against `cp FILE X && sync` of the same
//! file and against what hashing and decoding that many bytes costs on every core; coral-ml's
//! `HDF5Store` storing and loading the same model, side by side in the same run.
//!
//! The models are generated (fixed seed, normal weights rounded to bf16), streamed to a
//! temporary directory, and deleted once measured; the stores and the copies live in the same
//! directory and are deleted as the bench goes.
//!
//! Run with `cargo xtask bench --bench scale` (or `cargo bench -p coral-cli --bench scale` with
//! `CORAL_TEST_PYTHON` set for coral-ml). Environment:
//! - `CORAL_SCALE_GIB`: the model sizes in GiB, default `1,2,4`;
//! - `CORAL_BENCH_RUNS`: runs of each step (medians), default 3;
//! - `CORAL_SCALE_CORAL_ML_MAX_GIB`: coral-ml only for sizes up to this, default 2 (its peak
//!   memory grows with the model).
//!
//! Prints markdown tables.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use coral_core::codec::{Codec, CodecSpec};
use coral_core::{ContentHash, DType};
use coral_store_api::testenv;
use rayon::prelude::*;

use common::{median, run, Measured};

const CORAL: &str = env!("CARGO_BIN_EXE_coral");
const GIB: f64 = (1u64 << 30) as f64;
const SEED: u64 = 0x5CA1_E000_0000_0013;

// The model: Llama-like with grouped-query attention (the shapes of a 1B Llama: hidden 2048,
// 32 query heads and 8 key/value heads of 64, MLP 8192), word embeddings of exactly 512 MiB
// and tied to the LM head (no `lm_head.weight`); the number of layers sets the size.
const VOCAB: usize = 131_072;
const HIDDEN: usize = 2048;
const KV: usize = 512;
const INTER: usize = 8192;

/// Bytes generated per seed: each 4 MiB block of a tensor has its own generator, so the file is
/// the same whatever the number of threads.
const BLOCK: usize = 4 << 20;

/// xoshiro256++, seeded through SplitMix64.
struct Rng([u64; 4]);

impl Rng {
    fn new(mut seed: u64) -> Rng {
        let mut s = [0u64; 4];
        for x in &mut s {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *x = z ^ (z >> 31);
        }
        Rng(s)
    }

    fn next(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
}

/// `out` as little-endian bf16 values drawn from N(mean, std²) (Box–Muller in f32, two 24-bit
/// uniforms per draw), each rounded to nearest even from f32.
fn fill_bf16(seed: u64, mean: f32, std: f32, out: &mut [u8]) {
    const U24: f32 = 1.0 / (1u32 << 24) as f32;
    let mut rng = Rng::new(seed);
    for pair in out.chunks_mut(4) {
        let r = rng.next();
        let u1 = ((r >> 40) as f32 + 1.0) * U24; // (0, 1]
        let u2 = ((r >> 16) & 0xFF_FFFF) as f32 * U24; // [0, 1)
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        let a = half::bf16::from_f32(mean + radius * c)
            .to_bits()
            .to_le_bytes();
        let b = half::bf16::from_f32(mean + radius * s)
            .to_bits()
            .to_le_bytes();
        pair[..2].copy_from_slice(&a);
        if pair.len() == 4 {
            pair[2..].copy_from_slice(&b);
        }
    }
}

fn block_seed(tensor: usize, block: usize) -> u64 {
    SEED ^ ((tensor as u64) << 40) ^ block as u64
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    /// N(mean, 0.02²): 0 for the weights, 1 for the norms.
    mean: f32,
    /// `[begin, end)` in the data section.
    begin: u64,
    end: u64,
}

struct Model {
    /// The size asked for, in GiB.
    gib: f64,
    layers: usize,
    tensors: Vec<Tensor>,
    /// The 8-byte length and the JSON header, padded with spaces to a multiple of 8.
    header: Vec<u8>,
}

impl Model {
    fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }

    fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len()
    }

    /// The smallest tensor, the one `export --tensor` writes.
    fn small(&self) -> &Tensor {
        self.tensors
            .iter()
            .find(|t| t.name == "model.norm.weight")
            .expect("final norm")
    }
}

fn tensors_of(layers: usize) -> Vec<(String, Vec<usize>, f32)> {
    let mut v = vec![(
        "model.embed_tokens.weight".to_owned(),
        vec![VOCAB, HIDDEN],
        0.0,
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, shape, mean) in [
            ("input_layernorm", vec![HIDDEN], 1.0),
            ("self_attn.q_proj", vec![HIDDEN, HIDDEN], 0.0),
            ("self_attn.k_proj", vec![KV, HIDDEN], 0.0),
            ("self_attn.v_proj", vec![KV, HIDDEN], 0.0),
            ("self_attn.o_proj", vec![HIDDEN, HIDDEN], 0.0),
            ("post_attention_layernorm", vec![HIDDEN], 1.0),
            ("mlp.gate_proj", vec![INTER, HIDDEN], 0.0),
            ("mlp.up_proj", vec![INTER, HIDDEN], 0.0),
            ("mlp.down_proj", vec![HIDDEN, INTER], 0.0),
        ] {
            v.push((format!("{p}.{n}.weight"), shape, mean));
        }
    }
    v.push(("model.norm.weight".to_owned(), vec![HIDDEN], 1.0));
    v
}

/// The model of about `gib` GiB: as many layers as bring it nearest.
fn layout(gib: f64) -> Model {
    let bytes = |layers| -> u64 {
        tensors_of(layers)
            .iter()
            .map(|(_, s, _)| 2 * s.iter().product::<usize>() as u64)
            .sum()
    };
    let per_layer = (bytes(1) - bytes(0)) as f64;
    let layers = ((gib * GIB - bytes(0) as f64) / per_layer).round().max(0.0) as usize;
    let mut at = 0u64;
    let tensors: Vec<Tensor> = tensors_of(layers)
        .into_iter()
        .map(|(name, shape, mean)| {
            let n = 2 * shape.iter().product::<usize>() as u64;
            at += n;
            Tensor {
                name,
                shape,
                mean,
                begin: at - n,
                end: at,
            }
        })
        .collect();
    let mut json = serde_json::Map::new();
    json.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    for t in &tensors {
        json.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": "BF16", "shape": t.shape, "data_offsets": [t.begin, t.end] }),
        );
    }
    let mut text = serde_json::to_string(&json).expect("header");
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut header = (text.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(text.as_bytes());
    Model {
        gib,
        layers,
        tensors,
        header,
    }
}

/// Writes the model, 64 MiB at a time generated on every core; returns the seconds it took.
fn write_model(model: &Model, path: &Path) -> f64 {
    let start = Instant::now();
    let mut f = File::create(path).expect("model file");
    f.write_all(&model.header).expect("write");
    let mut buf = vec![0u8; 16 * BLOCK];
    for (i, t) in model.tensors.iter().enumerate() {
        let len = (t.end - t.begin) as usize;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            let first = done / BLOCK;
            buf[..n]
                .par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(j, c)| fill_bf16(block_seed(i, first + j), t.mean, 0.02, c));
            f.write_all(&buf[..n]).expect("write");
            done += n;
        }
    }
    f.sync_all().expect("sync");
    start.elapsed().as_secs_f64()
}

/// True when the two files hold the same bytes (read 8 MiB at a time).
fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let len = |f: &File| f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    if len(&fa) != len(&fb) {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = fa.read(&mut ba).expect("read");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// True when `out` is a safetensors file of exactly the one tensor `t` of `model`.
fn one_tensor_ok(model: &Model, model_path: &Path, t: &Tensor, out: &Path) -> bool {
    let Ok(bytes) = std::fs::read(out) else {
        return false;
    };
    let Ok(h) = coral_formats::safetensors::parse(&bytes) else {
        return false;
    };
    let [e] = &h.tensors[..] else {
        return false;
    };
    let mut want = vec![0u8; (t.end - t.begin) as usize];
    let mut f = File::open(model_path).expect("model");
    f.seek(SeekFrom::Start(model.header.len() as u64 + t.begin))
        .expect("seek");
    f.read_exact(&mut want).expect("read");
    let got = &bytes[(h.data_start + e.begin) as usize..(h.data_start + e.end) as usize];
    e.name == t.name && e.dtype == DType::BF16 && e.shape == t.shape && got == want
}

fn coral(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(CORAL);
    c.env_remove("CORAL_STORE")
        .arg("--store")
        .arg(store)
        .arg("-q")
        .args(args);
    c
}

fn sh(script: &str, args: &[&Path]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c
}

/// `sync`, untimed: every step starts with nothing dirty (the steps before it, the generator).
fn sync() {
    let st = Command::new("sync").status().expect("sync");
    assert!(st.success());
}

fn ok(m: Measured, what: &str) -> Measured {
    assert!(m.code == 0, "{what} failed ({}): {}", m.code, m.stdout);
    m
}

fn python(py: &Path, args: &[&Path]) -> Command {
    let mut c = common::coral_ml(py);
    c.args(args);
    c
}

fn python_secs(m: &Measured) -> f64 {
    let v: serde_json::Value = serde_json::from_str(m.stdout.trim()).expect("python json");
    v["seconds"].as_f64().unwrap_or(f64::NAN)
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The fastest of three runs of `f`, in this thread's CPU seconds.
fn best_cpu(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = thread_cpu();
            f();
            (thread_cpu() - t).as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// What verifying costs per byte on one core, measured on 256 MiB of the models' own data (the
/// start of the word embeddings): SHA-256 as the store keys it, and decoding the chunks as the
/// HDF5 store writes them by default.
struct Rates {
    /// Bytes per CPU second: hashing, decoding the store's chunks, decoding plain zstd-1.
    hash: f64,
    decode: f64,
    decode_zstd1: f64,
    /// Compressed / original of the sample, as the store encodes it and with plain zstd-1.
    ratio: f64,
    ratio_zstd1: f64,
    sample: usize,
}

/// Order-0 entropy of `data` in bits per byte.
fn entropy(data: &[u8]) -> f64 {
    let mut h = [0u64; 256];
    for &b in data {
        h[b as usize] += 1;
    }
    let n = data.len() as f64;
    h.iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64 / n) * (c as f64 / n).log2())
        .sum()
}

/// One chunk as coral-hdf5's byte-plane encoder writes it (zstd level 1 after the shuffle, the
/// store's default; see `crates/coral-hdf5/src/chunk.rs`): the leading byte planes that are
/// close to random (order-0 entropy above 7.95 bits) as raw blocks, the rest as a zstd frame
/// of zstd's fastest match search (level -1000) with every literal block Huffman-coded.
struct StoreChunk {
    raw: Vec<u8>,
    frame: Vec<u8>,
    len: usize,
}

fn store_encode(c: &mut zstd::bulk::Compressor<'_>, chunk: &[u8]) -> StoreChunk {
    let planes = coral_core::codec::shuffle(chunk, 2);
    let n = chunk.len() / 2;
    let raw_planes = (0..2)
        .take_while(|&j| entropy(&planes[j * n..(j + 1) * n]) > 7.95)
        .count();
    let (raw, rest) = planes.split_at(raw_planes * n);
    StoreChunk {
        raw: raw.to_vec(),
        frame: c.compress(rest).expect("zstd"),
        len: chunk.len(),
    }
}

/// Decodes a [`StoreChunk`] as a reader does: the raw blocks copied, the frame decompressed
/// after them, the planes put back together.
fn store_decode(d: &mut zstd::bulk::Decompressor<'_>, c: &StoreChunk, planes: &mut Vec<u8>) {
    planes.clear();
    planes.extend_from_slice(&c.raw);
    let rest = d.decompress(&c.frame, c.len - c.raw.len()).expect("unzstd");
    planes.extend_from_slice(&rest);
    std::hint::black_box(coral_core::codec::unshuffle(planes, 2));
}

fn rates() -> Rates {
    use zstd::zstd_safe::{CParameter, ParamSwitch};
    let sample_len = 64 * BLOCK;
    let mut sample = vec![0u8; sample_len];
    sample
        .par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(j, c)| fill_bf16(block_seed(0, j), 0.0, 0.02, c));
    let shape = [sample_len / 2];
    let hash = best_cpu(|| {
        std::hint::black_box(ContentHash::sha256(DType::BF16, &shape, &sample));
    });

    let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
    c.set_parameter(CParameter::CompressionLevel(-1000))
        .expect("zstd level");
    c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))
        .expect("zstd literals");
    let chunks: Vec<StoreChunk> = sample
        .chunks(BLOCK)
        .map(|ch| store_encode(&mut c, ch))
        .collect();
    let mut d = zstd::bulk::Decompressor::new().expect("zstd");
    let mut planes = Vec::with_capacity(BLOCK);
    let decode = best_cpu(|| {
        for ch in &chunks {
            store_decode(&mut d, ch, &mut planes);
        }
    });

    let spec = CodecSpec::new(Codec::Zstd { level: 1 }, true);
    let packed: Vec<Vec<u8>> = sample
        .chunks(BLOCK)
        .map(|ch| spec.compress(ch, 2).expect("compress"))
        .collect();
    let decode_zstd1 = best_cpu(|| {
        for p in &packed {
            std::hint::black_box(spec.decompress(p, 2, BLOCK).expect("decompress"));
        }
    });
    let stored: usize = chunks.iter().map(|c| c.raw.len() + c.frame.len()).sum();
    Rates {
        hash: sample_len as f64 / hash,
        decode: sample_len as f64 / decode,
        decode_zstd1: sample_len as f64 / decode_zstd1,
        ratio: stored as f64 / sample_len as f64,
        ratio_zstd1: packed.iter().map(Vec::len).sum::<usize>() as f64 / sample_len as f64,
        sample: sample_len,
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a plain C struct, all zeroes is a valid value; statvfs writes into it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a local struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return u64::MAX;
    }
    s.f_bavail as u64 * s.f_frsize as u64
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Medians of one model's steps; `None` where a step did not run.
struct Row {
    label: String,
    file: u64,
    gen_secs: f64,
    cp: f64,
    add: [f64; 3],
    export: [f64; 3],
    verify: [f64; 3],
    one: Option<f64>,
    one_code: Option<i32>,
    limit: f64,
    store: u64,
    ml: Option<Ml>,
    ml_skip: &'static str,
}

/// coral-ml's medians: store and load seconds (timed inside Python), peak RSS of each.
struct Ml {
    store: f64,
    load: f64,
    store_rss: f64,
    load_rss: f64,
    file: u64,
}

/// [wall, CPU, peak RSS] medians.
fn medians(v: &[Measured]) -> [f64; 3] {
    [
        median(v.iter().map(|m| m.secs).collect()),
        median(v.iter().map(|m| m.cpu).collect()),
        median(v.iter().map(|m| m.peak as f64).collect()),
    ]
}

fn bench_model(
    model: &Model,
    dir: &Path,
    runs: usize,
    rates: &Rates,
    cores: usize,
    py: Option<&Path>,
    ml_max: f64,
) -> Row {
    let file = dir.join("model.safetensors");
    let gen_secs = write_model(model, &file);
    let size = model.file_len();
    assert_eq!(std::fs::metadata(&file).expect("model").len(), size);
    let label = format!(
        "{} GiB: {:.2} GiB, {} layers",
        model.gib,
        size as f64 / GIB,
        model.layers
    );
    eprintln!("scale: {label} written in {gen_secs:.1} s");
    let store = dir.join("coral.h5");
    let copy = dir.join("copy.safetensors");
    let out = dir.join("out.safetensors");
    let one = dir.join("one.safetensors");
    let small = model.small();
    let (mut cp, mut add, mut export, mut verify, mut one_t) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut one_code = None;
    for i in 0..runs {
        eprintln!("scale: {label}, run {}/{runs}", i + 1);
        sync();
        let m = ok(
            run(&mut sh(r#"cp "$1" "$2" && sync"#, &[&file, &copy])),
            "cp",
        );
        cp.push(m.secs);
        let _ = std::fs::remove_file(&copy);

        let _ = std::fs::remove_file(&store);
        sync();
        let f = file.to_str().expect("utf-8 path");
        add.push(ok(
            run(&mut coral(&store, &["add", f, "--name", "m"])),
            "add",
        ));

        sync();
        let o = out.to_str().expect("utf-8 path");
        export.push(ok(run(&mut coral(&store, &["export", "m", o])), "export"));
        assert!(same_file(&file, &out), "export differs from the model");
        let _ = std::fs::remove_file(&out);

        sync();
        verify.push(ok(run(&mut coral(&store, &["verify"])), "verify"));

        let last = |v: &[Measured]| v.last().map_or(f64::NAN, |m| m.secs);
        eprintln!(
            "scale:   cp + sync {:.2} s, add {:.2} s, export {:.2} s, verify {:.2} s",
            cp.last().copied().unwrap_or(f64::NAN),
            last(&add),
            last(&export),
            last(&verify)
        );
        if one_code.is_none() {
            sync();
            let o = one.to_str().expect("utf-8 path");
            let m = run(&mut coral(
                &store,
                &["export", "m", o, "--tensor", &small.name],
            ));
            match m.code {
                0 => {
                    assert!(
                        one_tensor_ok(model, &file, small, &one),
                        "export --tensor wrote something else"
                    );
                    one_t.push(m.secs);
                }
                2 => one_code = Some(2), // the flag is not there: n/a, not retried
                c => panic!("export --tensor failed ({c})"),
            }
            let _ = std::fs::remove_file(&one);
        }
    }
    let store_len = std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(&store);

    let mut row = Row {
        label,
        file: size,
        gen_secs,
        cp: median(cp),
        add: medians(&add),
        export: medians(&export),
        verify: medians(&verify),
        one: (!one_t.is_empty()).then(|| median(one_t)),
        one_code,
        limit: model.data_len() as f64 * (1.0 / rates.hash + 1.0 / rates.decode) / cores as f64,
        store: store_len,
        ml: None,
        ml_skip: "",
    };

    match py {
        None => row.ml_skip = "n/a (no CORAL_TEST_PYTHON)",
        Some(_) if model.gib > ml_max => row.ml_skip = "skipped",
        Some(py) => {
            let ml_store = dir.join("coralml.h5");
            let keys = dir.join("coralml.h5.keys.json");
            let (mut st, mut ld) = (vec![], vec![]);
            let mut ml_file = 0;
            for i in 0..runs {
                eprintln!("scale: {}, coral-ml run {}/{runs}", row.label, i + 1);
                let _ = std::fs::remove_file(&ml_store);
                sync();
                st.push(ok(
                    run(&mut python(py, &[Path::new("add"), &file, &ml_store])),
                    "coral-ml store",
                ));
                ml_file = std::fs::metadata(&ml_store).map(|m| m.len()).unwrap_or(0);
                sync();
                ld.push(ok(
                    run(&mut python(
                        py,
                        &[Path::new("export"), &file, &ml_store, &out],
                    )),
                    "coral-ml load",
                ));
                assert!(same_file(&file, &out), "coral-ml's export differs");
                eprintln!(
                    "scale:   coral-ml store {:.1} s, load {:.1} s",
                    python_secs(&st[i]),
                    python_secs(&ld[i])
                );
                let _ = std::fs::remove_file(&out);
            }
            let _ = std::fs::remove_file(&ml_store);
            let _ = std::fs::remove_file(&keys);
            row.ml = Some(Ml {
                store: median(st.iter().map(python_secs).collect()),
                load: median(ld.iter().map(python_secs).collect()),
                store_rss: median(st.iter().map(|m| m.peak as f64).collect()),
                load_rss: median(ld.iter().map(|m| m.peak as f64).collect()),
                file: ml_file,
            });
        }
    }
    let _ = std::fs::remove_file(&file);
    row
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run when benched.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<f64> = std::env::var("CORAL_SCALE_GIB")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .expect("CORAL_SCALE_GIB: sizes in GiB, e.g. 1,2,4")
        })
        .collect();
    let runs: usize = env_or("CORAL_BENCH_RUNS", 3usize).max(1);
    let ml_max: f64 = env_or("CORAL_SCALE_CORAL_ML_MAX_GIB", 2.0);
    let py = testenv::python();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_start = loadavg();
    let started = Instant::now();

    let rates = rates();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = vec![];
    for &gib in &sizes {
        let model = layout(gib);
        // The model, the store and an export at once, or coral-ml's store and an export.
        let need = model.file_len() * 3 + (1 << 30);
        let free = free_bytes(dir.path());
        if free < need {
            println!(
                "{gib} GiB: skipped, {:.1} GB free under {} and about {:.1} GB needed",
                free as f64 / 1e9,
                dir.path().display(),
                need as f64 / 1e9
            );
            continue;
        }
        rows.push(bench_model(
            &model,
            dir.path(),
            runs,
            &rates,
            cores,
            py.as_deref(),
            ml_max,
        ));
    }
    drop(dir);

    let mb = |b: f64| format!("{:.0}", b / 1e6);
    println!("| bf16 model | `cp` + `sync` | `coral add` (×cp) | `coral export` (×cp) | `coral verify` (×limit) | `export --tensor` (one norm) | peak RSS add / export / verify | coral-ml store / load | coral-ml peak RSS store / load |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let one = match (r.one, r.one_code) {
            (Some(s), _) => format!("{:.0} ms", s * 1e3),
            _ => "n/a".into(),
        };
        let (ml_t, ml_m) = match &r.ml {
            Some(m) => (
                format!("{:.1} s / {:.1} s", m.store, m.load),
                format!("{} / {} MB", mb(m.store_rss), mb(m.load_rss)),
            ),
            None => (r.ml_skip.to_string(), r.ml_skip.to_string()),
        };
        println!(
            "| {} | {:.2} s | {:.2} s ({:.2}×) | {:.2} s ({:.2}×) | {:.2} s ({:.2}×) | {one} | {} / {} / {} MB | {ml_t} | {ml_m} |",
            r.label,
            r.cp,
            r.add[0],
            r.add[0] / r.cp,
            r.export[0],
            r.export[0] / r.cp,
            r.verify[0],
            r.verify[0] / r.limit,
            mb(r.add[2]),
            mb(r.export[2]),
            mb(r.verify[2]),
        );
    }
    println!();
    println!("| bf16 model | file | coral store on disk (of file) | coral-ml store (of file) | CPU add / export / verify | verify limit (hash + decode on {cores} cores) | generated in |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let ml = match &r.ml {
            Some(m) => format!(
                "{} MB ({:.1}%)",
                mb(m.file as f64),
                100.0 * m.file as f64 / r.file as f64
            ),
            None => r.ml_skip.to_string(),
        };
        println!(
            "| {} | {} MB | {} MB ({:.1}%) | {ml} | {:.2} / {:.2} / {:.2} s | {:.2} s | {:.1} s |",
            r.label,
            mb(r.file as f64),
            mb(r.store as f64),
            100.0 * r.store as f64 / r.file as f64,
            r.add[1],
            r.export[1],
            r.verify[1],
            r.limit,
            r.gen_secs,
        );
    }
    println!();
    println!(
        "Models: Llama-like bf16 safetensors (hidden {HIDDEN}, grouped-query attention with k/v {KV}, MLP {INTER}, word embeddings {VOCAB}×{HIDDEN} = 512 MiB tied to the LM head), weights N(0, 0.02²) and norms N(1, 0.02²) from a fixed seed (xoshiro256++, Box–Muller), rounded to nearest even from f32; generated into the bench's temporary directory, which also holds the copies and stores, and deleted once measured."
    );
    println!(
        "{runs} runs of each step per model, medians; steps interleaved run by run (cp, add, export, verify, one-tensor export; then coral-ml's store and load); `sync` (untimed) before each step, every file in the page cache (the machine has the memory). Wall time is the whole process, spawn to exit; `cp` runs as `sh -c 'cp FILE COPY && sync'` in the stores' directory; CPU is user + system of the process and the children it waited for (wait4's rusage); peak RSS is the highest sum of `VmHWM` over coral and its child process (the crash guard), sampled every millisecond (MB = 10^6 bytes). Each export is checked byte-identical to the model; the one-tensor export (`coral export m ONE --tensor model.norm.weight`, {} bytes) is checked to hold exactly that tensor, and is \"n/a\" when the command does not take the flag (exit status 2).",
        2 * HIDDEN
    );
    println!(
        "The verify limit is the model's data hashed (SHA-256, as the store keys it: {:.2} GB/s on one core) plus decoded (4 MiB chunks encoded as the store does, shuffle + zstd level 1 with its byte-plane encoder, the near-random low bytes as raw blocks: {:.2} GB/s on one core, {:.1}% of the size; plain shuffle + zstd-1 frames would decode at {:.2} GB/s, {:.1}% of the size), divided over the {cores} cores (`available_parallelism`): rates measured in this run as this thread's CPU time, best of 3, on {} MiB of the models' data. coral-ml 1.0.0's `HDF5Store` (gzip-4 + shuffle, its default) stores the same tensors as uint16 (NumPy has no bfloat16; same bytes) read from the memory-mapped file, and loads them back into a safetensors file, timed inside Python (interpreter start excluded); its peak RSS counts the model's pages it mapped. Load average at the start {load_start}, at the end {}; {:.0} s in all.",
        rates.hash / 1e9,
        rates.decode / 1e9,
        100.0 * rates.ratio,
        rates.decode_zstd1 / 1e9,
        100.0 * rates.ratio_zstd1,
        rates.sample >> 20,
        loadavg(),
        started.elapsed().as_secs_f64(),
    );
}
