//! What the benches of the `coral` command share (`mod common;` in each): running a child
//! process to completion while measuring its wall time, CPU time and peak memory.

// Each bench uses a part of this module.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Instant;

fn vm_hwm_one(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The peak RSS of `pid` and of its descendants, summed: `coral` runs a command on a local
/// store in a child process (its crash guard), which holds the data; the parent only waits.
pub fn vm_hwm(pid: libc::pid_t) -> Option<u64> {
    let mut total = vm_hwm_one(pid)?;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                total += vm_hwm_one(c).unwrap_or(0);
                stack.push(c);
            }
        }
    }
    Some(total)
}

/// What [`run`] measured of one child process.
pub struct Measured {
    /// Wall time, spawn to exit, in seconds.
    pub secs: f64,
    /// User + system CPU time of the child and of the descendants it waited for, in seconds.
    pub cpu: f64,
    /// The highest sum of `VmHWM` over the child and its descendants, in bytes.
    pub peak: u64,
    /// The exit code (128 + N when signal N ended it).
    pub code: i32,
    /// Its standard output.
    pub stdout: String,
}

/// Runs a child to completion, whatever its exit status. The peak is the highest sum of
/// `VmHWM` over the child and its descendants (read from /proc every millisecond until it
/// exits): `ru_maxrss` would count the benchmark's own memory, inherited at spawn. The CPU time
/// is the child's rusage as `wait4` reports it, which includes every descendant the child
/// waited for (coral's crash-guard child, `sh`'s commands).
pub fn run(cmd: &mut Command) -> Measured {
    let out_path = std::env::temp_dir().join(format!("coral-bench-{}.out", std::process::id()));
    let out_file = std::fs::File::create(&out_path).expect("temp file");
    let start = Instant::now();
    let child = cmd
        .stdout(out_file)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut peak = 0u64;
    // SAFETY: a plain C struct, all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        if let Some(h) = vm_hwm(pid) {
            peak = peak.max(h);
        }
        // SAFETY: waits (without blocking) for our own child, into locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4 failed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let secs = start.elapsed().as_secs_f64();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    // Already reaped: dropping `Child` neither waits nor kills.
    std::mem::forget(child);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Measured {
        secs,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        peak,
        code,
        stdout,
    }
}

/// Runs a child to completion; returns (wall seconds, peak RSS bytes, stdout), and panics
/// unless it exits with 0. See [`run`].
pub fn measure(cmd: &mut Command) -> (f64, u64, String) {
    let m = run(cmd);
    assert!(m.code == 0, "{cmd:?} failed ({}): {}", m.code, m.stdout);
    (m.secs, m.peak, m.stdout)
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// coral-ml 1.0.0 driven from Python: `add MODEL STORE` stores every tensor of a safetensors
/// file in an `HDF5Store` (its defaults), `export MODEL STORE OUT` loads them back into a
/// safetensors file; prints `{"seconds": ...}`, timed inside Python.
const CORAL_ML_PY: &str = r#"
import json, struct, sys, time
import numpy as np
from coral.core.weight_tensor import WeightMetadata, WeightTensor
from coral.storage.hdf5_store import HDF5Store

# NumPy has no bfloat16: BF16 tensors go in and come out as uint16, the same bytes.
DT = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

def tensors(path):
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = struct.unpack("<Q", raw[:8].tobytes())[0]
    header = json.loads(raw[8:8 + n].tobytes())
    base = 8 + n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        s, t = e["data_offsets"]
        a = np.frombuffer(raw[base + s:base + t], dtype=DT[e["dtype"]]).reshape(e["shape"])
        yield name, a

mode, model, store = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if mode == "add":
    st = HDF5Store(store)
    keys = {}
    for name, a in tensors(model):
        w = WeightTensor(data=a, metadata=WeightMetadata(name=name, shape=a.shape, dtype=a.dtype))
        keys[name] = st.store(w)
    st.close()
    open(store + ".keys.json", "w").write(json.dumps(keys))
else:
    out = sys.argv[4]
    raw = open(model, "rb").read(8)
    n = struct.unpack("<Q", raw)[0]
    header_bytes = open(model, "rb").read(8 + n)
    header = json.loads(header_bytes[8:])
    keys = json.loads(open(store + ".keys.json").read())
    st = HDF5Store(store, mode="r")
    order = sorted((e["data_offsets"][0], k) for k, e in header.items() if k != "__metadata__")
    with open(out, "wb") as f:
        f.write(header_bytes)
        for _, name in order:
            f.write(np.ascontiguousarray(st.load(keys[name]).data).tobytes())
    st.close()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"#;

/// A `python -c` command running [`CORAL_ML_PY`]; add its arguments.
pub fn coral_ml(py: &std::path::Path) -> Command {
    let mut c = Command::new(py);
    c.arg("-c").arg(CORAL_ML_PY);
    c
}
