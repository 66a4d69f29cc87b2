//! Loads the real model (safetensors) as Coral tensors, fp32 as it is or converted to bf16.

#![allow(dead_code)]

use std::path::Path;

use coral_core::{DType, WeightTensor};

/// The tensors of a safetensors file, in file order, as (name, tensor). `bf16` converts float32
/// tensors to bfloat16 (round to nearest even).
pub fn load_model(path: &Path, bf16: bool) -> Vec<(String, WeightTensor)> {
    let bytes = std::fs::read(path).expect("read model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let mut names: Vec<(usize, String)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (v.data().as_ptr() as usize, n))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|(_, name)| {
            let v = st.tensor(&name).expect("tensor");
            let dtype = DType::from_name(&format!("{:?}", v.dtype())).expect("dtype");
            let shape = v.shape().to_vec();
            let w = if bf16 && dtype == DType::F32 {
                let data: Vec<u8> = v
                    .data()
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        half::bf16::from_f32(f).to_le_bytes()
                    })
                    .collect();
                WeightTensor::from_bytes(name.clone(), shape, DType::BF16, data).expect("bf16")
            } else {
                WeightTensor::from_bytes(name.clone(), shape, dtype, v.data().to_vec())
                    .expect("tensor")
            };
            (name, w)
        })
        .collect()
}
