//! Test-only helpers: where the fixtures live, how to read their reference dumps, and the
//! tolerances every parity test compares with (one place, per key prefix, as the fixtures
//! README defines them).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The checkpoints the fixtures ship, in the order the README lists them.
pub const CHECKPOINTS: [&str; 5] = [
    "llava-v0",
    "llava-v1.5",
    "llava-hf",
    "llava-mistral",
    "llava-mpt",
];

/// `tests/fixtures` at the workspace root (a byte-identical copy of `shared/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn checkpoint_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A checkpoint's `reference.json` and `reference.safetensors`.
pub struct Reference {
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(checkpoint: &str) -> Reference {
        let dir = checkpoint_dir(checkpoint);
        let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        let json = serde_json::from_str(&text).expect("reference.json parses");
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference.safetensors");
        Reference { json, tensors }
    }

    pub fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference has no tensor {key}"))
    }

    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensor(key)
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        self.tensor(key)
            .flatten_all()
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn u8s(&self, key: &str) -> Vec<u8> {
        self.tensor(key).flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A JSON value by dotted path, e.g. `prompts.llava_v1.single_turn`.
    pub fn get(&self, path: &str) -> &Value {
        path.split('.').fold(&self.json, |v, k| &v[k])
    }
}

/// Largest absolute difference; panics on a length mismatch (a shape bug, not a tolerance).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        // A NaN anywhere is a difference no tolerance accepts (`f32::max` would skip it).
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// [`max_abs_diff`] of two tensors of the same shape (any float dtype).
pub fn max_abs_diff_tensors(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("a float tensor")
    };
    max_abs_diff(&flat(a), &flat(b))
}

/// Two computations of one result checked for their gradients: the gradients of
/// `Σ y · probe` with respect to each of `vars`, for `ours` and for `theirs`, under one
/// random probe of their shape (so every output position counts), paired per variable.
pub fn probed_grads(
    ours: &Tensor,
    theirs: &Tensor,
    vars: &[&candle_core::Var],
) -> Vec<(Tensor, Tensor)> {
    let probe = Tensor::randn(0f32, 1.0, ours.shape(), ours.device()).expect("a probe");
    let grads = |y: &Tensor| {
        (y * &probe)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("a backward pass")
    };
    let (a, b) = (grads(ours), grads(theirs));
    vars.iter()
        .map(|v| {
            let get = |g: &candle_core::backprop::GradStore| {
                g.get(v.as_tensor())
                    .cloned()
                    .expect("a gradient for every variable")
            };
            (get(&a), get(&b))
        })
        .collect()
}

/// A differentiable op against its reference computation: the values within `value_tol`
/// of the reference's largest magnitude (at least 1), and under one random probe
/// ([`probed_grads`]) each named variable's gradient within `grad_tol` likewise. `what`
/// names the case in a failure.
#[track_caller]
pub fn assert_values_and_grads(
    what: &str,
    ours: &Tensor,
    theirs: &Tensor,
    vars: &[(&str, &candle_core::Var)],
    (value_tol, grad_tol): (f32, f32),
) {
    let err = max_abs_diff_tensors(ours, theirs);
    assert!(
        err <= value_tol * max_abs(theirs).max(1.0),
        "{what}: values off by {err}"
    );
    let only: Vec<&candle_core::Var> = vars.iter().map(|(_, v)| *v).collect();
    for ((name, _), (g, want)) in vars.iter().zip(probed_grads(ours, theirs, &only)) {
        let err = max_abs_diff_tensors(&g, &want);
        assert!(
            err <= grad_tol * max_abs(&want).max(1.0),
            "{what}: d{name} off by {err}"
        );
    }
}

/// The largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    max_abs_diff_tensors(t, &t.zeros_like().expect("zeros"))
}

/// Asserts `max |a - b| <= tol`, naming the key.
#[track_caller]
pub fn assert_close(key: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{key}: max abs diff {d:e} > {tol:e}");
}

/// The fixtures README's tolerances: ids exact; `pixel_u8.*`/`image.*` 0; `pixel.*` 1e-5;
/// `vision.*`, `logits.*`, `train.loss` 1e-4; `train.projector_grad_norm` 1e-5.
pub const TOL_PIXEL: f32 = 1e-5;
pub const TOL_FEATURES: f32 = 1e-4;
/// JPEG decoders other than libjpeg-turbo may differ by this many levels.
pub const TOL_JPEG_LEVELS: u8 = 2;
