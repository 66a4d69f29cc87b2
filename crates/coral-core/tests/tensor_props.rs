//! `WeightTensor` and `ndarray`: every native element type, and round trips
//! bytes -> tensor -> array -> tensor.

use coral_core::{CoreError, DType, Element, WeightTensor};
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// from_vec -> to_array gives the values back in row-major order, from_array gives the same
/// tensor, the dtype is `T::DTYPE` and asking for another type is `DTypeMismatch`.
fn check_type<T: Element + PartialEq + std::fmt::Debug>(values: Vec<T>, shape: Vec<usize>) {
    let w = WeightTensor::from_vec("t", shape.clone(), values.clone()).unwrap();
    assert_eq!(w.dtype(), T::DTYPE);
    assert_eq!(w.nbytes(), values.len() * T::DTYPE.size());
    assert_eq!(w.size(), values.len());
    let a = w.to_array::<T>().unwrap();
    assert_eq!(a.shape(), &shape[..]);
    assert_eq!(a.iter().copied().collect::<Vec<T>>(), values);
    let back = WeightTensor::from_array("t", a.view()).unwrap();
    assert_eq!(back, w);
    let other_is_mismatch = |r: Result<(), CoreError>| {
        assert!(
            matches!(r, Err(CoreError::DTypeMismatch { .. })),
            "{:?}",
            T::DTYPE
        )
    };
    if T::DTYPE != DType::U8 {
        other_is_mismatch(w.to_array::<u8>().map(drop));
    } else {
        other_is_mismatch(w.to_array::<i8>().map(drop));
    }
}

#[test]
fn every_native_type_converts() {
    let s = vec![2, 3];
    check_type(vec![true, false, true, true, false, false], s.clone());
    check_type(vec![0u8, 1, 2, 127, 128, 255], s.clone());
    check_type(vec![0u16, 1, 2, 300, 40_000, u16::MAX], s.clone());
    check_type(vec![0u32, 1, 2, 70_000, 1 << 31, u32::MAX], s.clone());
    check_type(vec![0u64, 1, 2, 1 << 40, 1 << 63, u64::MAX], s.clone());
    check_type(vec![0i8, -1, 2, i8::MIN, i8::MAX, 5], s.clone());
    check_type(vec![0i16, -1, 2, i16::MIN, i16::MAX, 5], s.clone());
    check_type(vec![0i32, -1, 2, i32::MIN, i32::MAX, 5], s.clone());
    check_type(vec![0i64, -1, 2, i64::MIN, i64::MAX, 5], s.clone());
    check_type(
        vec![0.0f32, -0.5, 1e-40, f32::MAX, f32::INFINITY, -3.25],
        s.clone(),
    );
    check_type(
        vec![0.0f64, -0.5, 1e-310, f64::MAX, f64::NEG_INFINITY, 3.25],
        s.clone(),
    );
    check_type(
        [0.0f32, -0.5, 1.0, 65504.0, 6e-8, -2.0]
            .map(f16::from_f32)
            .to_vec(),
        s.clone(),
    );
    check_type(
        [0.0f32, -0.5, 1.0, 3.0e38, 1e-40, -2.0]
            .map(bf16::from_f32)
            .to_vec(),
        s,
    );
    // Scalars and empty arrays too.
    check_type(vec![bf16::from_f32(1.5)], vec![]);
    check_type(Vec::<f16>::new(), vec![3, 0]);
    check_type(Vec::<bool>::new(), vec![0]);
}

#[test]
fn little_endian_layout() {
    let w = WeightTensor::from_vec("t", vec![2], vec![0x0102_0304u32, 0x0a0b_0c0d]).unwrap();
    assert_eq!(&w.data()[..], &[4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a]);
    let h = WeightTensor::from_vec("h", vec![1], vec![bf16::from_bits(0x3f80)]).unwrap();
    assert_eq!(&h.data()[..], &[0x80, 0x3f]);
    let b = WeightTensor::from_vec("b", vec![2], vec![true, false]).unwrap();
    assert_eq!(&b.data()[..], &[1, 0]);
}

#[test]
fn non_contiguous_arrays_are_stored_row_major() {
    let a = ArrayD::from_shape_vec(
        IxDyn(&[2, 3]),
        (0..6).map(|i| f16::from_f32(i as f32)).collect(),
    )
    .unwrap();
    let t = a.t();
    let w = WeightTensor::from_array("t", t.view()).unwrap();
    assert_eq!(w.shape(), &[3, 2]);
    let want: Vec<f16> = [0.0, 3.0, 1.0, 4.0, 2.0, 5.0].map(f16::from_f32).to_vec();
    assert_eq!(
        w.to_array::<f16>()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        want
    );
    // A strided slice.
    let v: ArrayD<i32> = ArrayD::from_shape_vec(IxDyn(&[6]), (0..6).collect()).unwrap();
    let every_other = v.slice(ndarray::s![..;2]).into_dyn();
    let w = WeightTensor::from_array("s", every_other).unwrap();
    assert_eq!(
        w.to_array::<i32>()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
}

#[test]
fn types_without_a_rust_element_still_hold_bytes() {
    for d in [DType::F8E4M3, DType::F8E5M2] {
        let w = WeightTensor::from_bytes("f8", vec![4], d, vec![0x00, 0x38, 0x7f, 0xff]).unwrap();
        assert_eq!(w.nbytes(), 4);
        assert!(matches!(
            w.to_array::<u8>(),
            Err(CoreError::DTypeMismatch { .. })
        ));
    }
}

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0usize..5, 0..4)
}

/// bytes -> tensor -> array -> tensor gives the same bytes (every bit pattern, NaNs included).
fn round_trip<T: Element>(shape: &[usize], seed: &[u8]) -> Result<(), TestCaseError> {
    let n: usize = shape.iter().product::<usize>() * T::DTYPE.size();
    let mut bytes: Vec<u8> = seed.iter().copied().cycle().take(n).collect();
    if bytes.len() < n {
        bytes.resize(n, 0x7f);
    }
    if T::DTYPE == DType::Bool {
        bytes.iter_mut().for_each(|b| *b &= 1);
    }
    let w = WeightTensor::from_bytes("p", shape.to_vec(), T::DTYPE, bytes.clone()).unwrap();
    let a = w.to_array::<T>().unwrap();
    prop_assert_eq!(a.shape(), shape);
    let back = WeightTensor::from_array("p", a.view()).unwrap();
    prop_assert_eq!(&back.data()[..], &bytes[..], "{}", T::DTYPE);
    prop_assert_eq!(back.compute_hash(), w.compute_hash());
    Ok(())
}

proptest! {
    #[test]
    fn bytes_tensor_array_tensor(shape in shape_strategy(), seed in proptest::collection::vec(any::<u8>(), 1..64)) {
        round_trip::<bool>(&shape, &seed)?;
        round_trip::<u8>(&shape, &seed)?;
        round_trip::<u16>(&shape, &seed)?;
        round_trip::<u32>(&shape, &seed)?;
        round_trip::<u64>(&shape, &seed)?;
        round_trip::<i8>(&shape, &seed)?;
        round_trip::<i16>(&shape, &seed)?;
        round_trip::<i32>(&shape, &seed)?;
        round_trip::<i64>(&shape, &seed)?;
        round_trip::<f16>(&shape, &seed)?;
        round_trip::<bf16>(&shape, &seed)?;
        round_trip::<f32>(&shape, &seed)?;
        round_trip::<f64>(&shape, &seed)?;
    }

    #[test]
    fn wrong_lengths_are_refused(shape in shape_strategy(), delta in 1usize..9, d in prop::sample::select(DType::ALL.to_vec())) {
        let n: usize = shape.iter().product::<usize>() * d.size();
        let r = WeightTensor::from_bytes("x", shape.clone(), d, vec![0u8; n + delta]);
        let is_mismatch = matches!(r, Err(CoreError::ShapeMismatch { .. }));
        prop_assert!(is_mismatch);
        if n >= delta {
            prop_assert!(WeightTensor::from_bytes("x", shape, d, vec![0u8; n - delta]).is_err());
        }
    }
}
