//! Measures the codec on a safetensors file (F32 tensors, and their bf16 rounding):
//! `cargo run --release -p coral-float-codec --example measure -- MODEL.safetensors`
//! prints the coded bytes, as Coral's HDF5 store chunks them (4 MiB of whole rows), and the
//! single-thread coding and decoding rates.

use coral_float_codec::{decode_into, encode_rows, Kind, HEADER_BYTES};
use std::time::Instant;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: measure MODEL.safetensors");
    let raw = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_like::Header = serde_like::parse(&raw[8..8 + n]);
    let data = &raw[8 + n..];
    for kind in [Kind::F32, Kind::Bf16] {
        let (mut input, mut coded, mut tables) = (0usize, 0usize, 0usize);
        let (mut te, mut td) = (0f64, 0f64);
        let mut frame = Vec::new();
        for t in &header.tensors {
            if t.dtype != "F32" {
                continue;
            }
            let bytes = &data[t.start..t.end];
            let vals: Vec<u8> = match kind {
                Kind::F32 => bytes.to_vec(),
                _ => bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let b = u32::from_le_bytes(c.try_into().unwrap()) as u64;
                        (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
                    })
                    .collect(),
            };
            let row = t.shape.iter().skip(1).product::<usize>().max(1) * kind.size();
            // As coral-hdf5 plans them: as few chunks of 4 MiB at most as hold the rows, the
            // rows spread evenly over them.
            let d0 = t.shape.first().copied().unwrap_or(1).max(1);
            let most = ((4 << 20) / row).clamp(1, d0);
            let cb = d0.div_ceil(d0.div_ceil(most)) * row;
            for chunk in vals.chunks(cb) {
                let mut c = chunk.to_vec();
                c.resize(cb, 0);
                let t0 = Instant::now();
                encode_rows(kind, &c, row / kind.size(), &mut frame).unwrap();
                te += t0.elapsed().as_secs_f64();
                let mut back = vec![0u8; c.len()];
                let t1 = Instant::now();
                if let Err(e) = decode_into(&frame, &mut back) {
                    panic!("{} {kind:?} {} bytes: {e}", t.name, c.len())
                }
                td += t1.elapsed().as_secs_f64();
                assert!(back == c, "{} round trip", t.name);
                input += chunk.len();
                coded += frame.len();
                // A float frame (mode 1) starts its body with the table header's length.
                if frame[3] == 1 {
                    let at = HEADER_BYTES;
                    tables +=
                        4 + u32::from_le_bytes(frame[at..at + 4].try_into().unwrap()) as usize;
                }
            }
        }
        println!(
            "{kind:?}: {input} -> {coded} bytes ({:.3}% saved; {tables} of them tables), encode {:.0} MB/s, decode {:.0} MB/s (one thread)",
            100.0 * (1.0 - coded as f64 / input as f64),
            input as f64 / te / 1e6,
            input as f64 / td / 1e6
        );
    }
}

mod serde_like {
    pub struct T {
        pub name: String,
        pub dtype: String,
        pub shape: Vec<usize>,
        pub start: usize,
        pub end: usize,
    }
    pub struct Header {
        pub tensors: Vec<T>,
    }
    /// A tiny reader of the safetensors JSON header (no serde in this crate's dependencies).
    pub fn parse(b: &[u8]) -> Header {
        let s = std::str::from_utf8(b).unwrap();
        let mut tensors = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find("\"dtype\"") {
            let before = &rest[..i];
            let q2 = before.rfind("\":{").unwrap();
            let q1 = before[..q2].rfind('"').unwrap();
            let name = before[q1 + 1..q2].to_string();
            let after = &rest[i..];
            let dt = after.split('"').nth(3).unwrap().to_string();
            let sh = &after[after.find("\"shape\":[").unwrap() + 9..];
            let shape: Vec<usize> = sh[..sh.find(']').unwrap()]
                .split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.trim().parse().unwrap())
                .collect();
            let off = &after[after.find("\"data_offsets\":[").unwrap() + 16..];
            let o: Vec<usize> = off[..off.find(']').unwrap()]
                .split(',')
                .map(|x| x.trim().parse().unwrap())
                .collect();
            tensors.push(T {
                name,
                dtype: dt,
                shape,
                start: o[0],
                end: o[1],
            });
            rest = &after[7..];
        }
        Header { tensors }
    }
}
