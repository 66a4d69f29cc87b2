//! `speed`: codes one 4 MiB chunk of generated Gaussian-like f32 and bf16 values ten times and
//! prints the single-thread rates (a quick check while tuning; the benches measure for real).
use coral_float_codec::{decode_into, encode, Kind};
use std::time::Instant;
fn main() {
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let vals: Vec<f32> = (0..1 << 20)
        .map(|_| {
            let u: f64 = (0..4)
                .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64)
                .sum::<f64>()
                - 2.0;
            (u * 0.03) as f32
        })
        .collect();
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    for (kind, data) in [(Kind::F32, &f32b), (Kind::Bf16, &bf)] {
        let mut frame = Vec::new();
        let mut back = vec![0u8; data.len()];
        let t = Instant::now();
        for _ in 0..10 {
            encode(kind, data, &mut frame).unwrap();
        }
        let te = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 {
            decode_into(&frame, &mut back).unwrap();
        }
        let td = t.elapsed().as_secs_f64() / 10.0;
        assert!(&back == data);
        println!(
            "{kind:?}: {:.1}% saved, encode {:.0} MB/s, decode {:.0} MB/s",
            100.0 * (1.0 - frame.len() as f64 / data.len() as f64),
            data.len() as f64 / te / 1e6,
            data.len() as f64 / td / 1e6
        );
    }
}
