//! The real model as a list of weights.

use coral_core::{DType, WeightTensor};

/// The tensors of a safetensors file, in file order; with `bf16`, float32 tensors are cut to
/// bfloat16 (their top 16 bits).
pub fn load_model(path: &std::path::Path, bf16: bool) -> Vec<(String, WeightTensor)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = DType::from_name(&format!("{:?}", view.dtype())).unwrap();
        let shape = view.shape().to_vec();
        let (dtype, data) = if bf16 && dtype == DType::F32 {
            let d: Vec<u8> = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| [c[2], c[3]])
                .collect();
            (DType::BF16, d)
        } else {
            (dtype, view.data().to_vec())
        };
        out.push((
            name.clone(),
            WeightTensor::from_bytes(name, shape, dtype, data).unwrap(),
        ));
    }
    out
}
