//! safetensors read/write: round trips of every dtype, conversion on load, metadata, a file
//! written by Python's `safetensors`, and errors (never panics) on missing, truncated and
//! malformed files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use tessera::io::safetensors::{self as st, TensorFile};
use tessera::{DType, Rng, Tensor};

/// A fresh, empty directory for one test under cargo's per-target temp dir.
fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("io_safetensors")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn randn(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, dtype, rng).unwrap()
}

/// Assorted tensors of every dtype, including a scalar, an empty tensor and transposed
/// (non-contiguous) views.
fn sample_tensors(rng: &mut Rng) -> Vec<(String, Tensor)> {
    let n = 3 * 5;
    let i64s: Vec<i64> = (0..n).map(|_| rng.next_u64() as i64).collect();
    let u32s: Vec<u32> = (0..n).map(|_| rng.next_u64() as u32).collect();
    let f32_t = randn(&[4, 3], DType::F32, rng).t().unwrap();
    let bf16_t = randn(&[2, 3, 4], DType::BF16, rng).transpose(0, 2).unwrap();
    assert!(!f32_t.is_contiguous() && !bf16_t.is_contiguous());
    vec![
        ("a.f32".into(), randn(&[3, 4], DType::F32, rng)),
        ("b.f64".into(), randn(&[7], DType::F64, rng)),
        ("c.bf16".into(), randn(&[2, 5], DType::BF16, rng)),
        ("d.f16".into(), randn(&[5, 1, 2], DType::F16, rng)),
        ("e.i64".into(), Tensor::from_vec(i64s, &[3, 5]).unwrap()),
        ("f.u32".into(), Tensor::from_vec(u32s, &[5, 3]).unwrap()),
        (
            "g.scalar".into(),
            Tensor::from_vec(vec![1.5f32], &[]).unwrap(),
        ),
        (
            "h.empty".into(),
            Tensor::from_vec(Vec::<f16>::new(), &[0, 4]).unwrap(),
        ),
        ("i.f32_transposed".into(), f32_t),
        ("j.bf16_transposed".into(), bf16_t),
    ]
}

fn as_refs(v: &[(String, Tensor)]) -> Vec<(&str, &Tensor)> {
    v.iter().map(|(n, t)| (n.as_str(), t)).collect()
}

fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    assert_eq!(
        got.to_bytes().unwrap(),
        want.to_bytes().unwrap(),
        "{name}: bytes"
    );
}

/// Runs `f`, requiring that it returns (not panics) an error whose message contains `path`.
fn expect_err<T>(path: &Path, what: &str, f: impl FnOnce() -> tessera::Result<T>) -> String {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| panic!("{what}: panicked instead of returning an error"));
    let Err(e) = r else {
        panic!("{what}: expected an error, got Ok")
    };
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "{what}: message does not name the file: {msg}"
    );
    msg
}

/// A raw safetensors file from a header string and data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn round_trip_every_dtype_including_non_contiguous() {
    let dir = test_dir("round_trip");
    let path = dir.join("model.safetensors");
    let mut rng = Rng::new(7);
    let tensors = sample_tensors(&mut rng);
    st::save(&path, &as_refs(&tensors), None).unwrap();

    let loaded = st::load(&path).unwrap();
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    let mut want_names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "load returns tensors sorted by name");
    for ((name, got), (_, want)) in loaded.iter().zip(&tensors) {
        assert_same(name, got, want);
    }

    // Element-level check on the transposed one (not only bytes).
    let f = TensorFile::open(&path).unwrap();
    let (_, t) = &tensors[8];
    let got = f.get("i.f32_transposed").unwrap();
    assert_eq!(got.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
    assert_eq!(f.len(), tensors.len());
    assert!(!f.is_empty());
    assert!(f.contains("c.bf16") && !f.contains("nope"));
    assert_eq!(f.shape("d.f16").unwrap(), &[5, 1, 2]);
    assert_eq!(f.dtype("e.i64").unwrap(), DType::I64);
    assert_eq!(f.info("a.f32").unwrap().file_dtype, "F32");
    assert!(f.metadata().is_empty());
}

#[test]
fn written_file_has_standard_layout() {
    let dir = test_dir("layout");
    let path = dir.join("m.safetensors");
    let mut rng = Rng::new(1);
    let tensors = sample_tensors(&mut rng);
    st::save(&path, &as_refs(&tensors), None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let obj = header.as_object().unwrap();
    assert_eq!(obj.len(), tensors.len());
    // The data section is exactly covered by the offsets, each aligned to its element size.
    let mut ranges: Vec<(u64, u64, u64)> = obj
        .values()
        .map(|e| {
            let o = e["data_offsets"].as_array().unwrap();
            let size = match e["dtype"].as_str().unwrap() {
                "F64" | "I64" => 8,
                "F32" | "U32" => 4,
                _ => 2,
            };
            (o[0].as_u64().unwrap(), o[1].as_u64().unwrap(), size)
        })
        .collect();
    ranges.sort();
    let mut pos = 0;
    for (b, e, size) in ranges {
        assert_eq!(b, pos);
        assert_eq!(b % size, 0, "offset {b} aligned to {size}");
        pos = e;
    }
    assert_eq!(pos as usize, bytes.len() - 8 - n);
}

#[test]
fn half_precision_converts_to_f32_on_load() {
    let dir = test_dir("convert");
    let path = dir.join("half.safetensors");
    let vals = [1.0, -2.5, 0.099_609_375, 65504.0, -0.0, 3.0e-5];
    let b = Tensor::from_vec(vals.iter().map(|&v| bf16::from_f64(v)).collect(), &[2, 3]).unwrap();
    let h = Tensor::from_vec(vals.iter().map(|&v| f16::from_f64(v)).collect(), &[3, 2]).unwrap();
    let d = Tensor::from_vec(vec![0.1f64, 1e-3, -7.0], &[3]).unwrap();
    let ids = Tensor::from_vec(vec![3i64, -1, 1 << 60], &[3]).unwrap();
    st::save(
        &path,
        &[("b", &b), ("h", &h), ("d", &d), ("ids", &ids)],
        None,
    )
    .unwrap();

    let f = TensorFile::open(&path).unwrap();
    for (name, src) in [("b", &b), ("h", &h), ("d", &d)] {
        let t = f.get_as(name, DType::F32).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.shape(), src.shape());
        let want: Vec<f32> = src.to_f64s().unwrap().iter().map(|&v| v as f32).collect();
        assert_eq!(t.to_vec::<f32>().unwrap(), want, "{name}");
    }
    // Narrowing on load: f64 -> bf16 rounds once, like to_dtype.
    let d16 = f.get_as("d", DType::BF16).unwrap();
    assert_eq!(
        d16.to_vec::<bf16>().unwrap(),
        d.to_dtype(DType::BF16).unwrap().to_vec::<bf16>().unwrap()
    );
    // Same dtype: unchanged.
    assert_same("b", &f.get_as("b", DType::BF16).unwrap(), &b);
    // Integers do not silently become floats.
    let msg = expect_err(&path, "get_as i64->f32", || f.get_as("ids", DType::F32));
    assert!(msg.contains("'ids'") && msg.contains("i64"), "{msg}");

    // load_as converts float tensors and keeps integer ones.
    let all = st::load_as(&path, DType::F32).unwrap();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "d", "h", "ids"]);
    for (name, t) in &all {
        if name == "ids" {
            assert_same(name, t, &ids);
        } else {
            assert_eq!(t.dtype(), DType::F32, "{name}");
        }
    }
}

#[test]
fn truncated_files_give_errors_naming_the_file() {
    let dir = test_dir("truncated");
    let good = dir.join("good.safetensors");
    let mut rng = Rng::new(3);
    let tensors = sample_tensors(&mut rng);
    st::save(&good, &as_refs(&tensors), None).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(bytes.len() > header_end + 16);

    let mut cuts = vec![
        0,
        1,
        7,
        8,
        9,
        header_end / 2,
        header_end - 1,
        header_end,
        header_end + 1,
        (header_end + bytes.len()) / 2,
        bytes.len() - 1,
    ];
    cuts.dedup();
    for cut in cuts {
        let path = dir.join(format!("cut_{cut}.safetensors"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let what = format!("file cut at {cut} of {} bytes", bytes.len());
        let msg = expect_err(&path, &what, || st::load(&path));
        if cut < header_end {
            assert!(
                msg.contains("truncated") || msg.contains("header"),
                "{what}: {msg}"
            );
        } else {
            assert!(msg.contains("truncated"), "{what}: {msg}");
            assert!(msg.contains("tensor '"), "{what}: names the tensor: {msg}");
        }
    }

    // A file truncated after it was opened: reading the data fails with an error, too.
    let path = dir.join("shrinks.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let f = TensorFile::open(&path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(header_end as u64)
        .unwrap();
    let msg = expect_err(&path, "truncated after open", || f.load_all());
    assert!(msg.contains("tensor '"), "{msg}");
}

#[test]
fn missing_file_is_an_error() {
    let dir = test_dir("missing_file");
    let path = dir.join("does_not_exist.safetensors");
    expect_err(&path, "open", || TensorFile::open(&path));
    expect_err(&path, "load", || st::load(&path));
    expect_err(&path, "load_as", || st::load_as(&path, DType::F32));
}

#[test]
fn missing_tensor_lists_available_names() {
    let dir = test_dir("missing_tensor");
    let path = dir.join("model.safetensors");
    let a = Tensor::zeros(&[2], DType::F32).unwrap();
    st::save(&path, &[("layer.0.weight", &a), ("layer.0.bias", &a)], None).unwrap();
    let f = TensorFile::open(&path).unwrap();
    for msg in [
        expect_err(&path, "get", || f.get("layer.1.weight")),
        expect_err(&path, "get_as", || f.get_as("layer.1.weight", DType::F32)),
        expect_err(&path, "get_checked", || {
            f.get_checked("layer.1.weight", &[2], None)
        }),
        expect_err(&path, "shape", || f.shape("layer.1.weight").map(|_| ())),
    ] {
        assert!(msg.contains("'layer.1.weight'"), "{msg}");
        assert!(msg.contains("not found"), "{msg}");
        assert!(
            msg.contains("layer.0.bias") && msg.contains("layer.0.weight"),
            "{msg}"
        );
    }
}

#[test]
fn get_checked_reports_wrong_shape_and_dtype() {
    let dir = test_dir("checked");
    let path = dir.join("model.safetensors");
    let x = Tensor::zeros(&[3, 2], DType::BF16).unwrap();
    st::save(&path, &[("x", &x)], None).unwrap();
    let f = TensorFile::open(&path).unwrap();

    let msg = expect_err(&path, "shape", || f.get_checked("x", &[2, 3], None));
    assert_eq!(
        msg,
        format!(
            "{}: tensor 'x': expected shape [2, 3], found [3, 2]",
            path.display()
        )
    );
    let msg = expect_err(&path, "dtype", || {
        f.get_checked("x", &[3, 2], Some(DType::F32))
    });
    assert!(
        msg.contains("tensor 'x'") && msg.contains("expected dtype f32") && msg.contains("bf16"),
        "{msg}"
    );
    assert_same(
        "x",
        &f.get_checked("x", &[3, 2], Some(DType::BF16)).unwrap(),
        &x,
    );
    assert_same("x", &f.get_checked("x", &[3, 2], None).unwrap(), &x);
}

#[test]
fn metadata_round_trips() {
    let dir = test_dir("metadata");
    let path = dir.join("m.safetensors");
    let meta: HashMap<String, String> = [
        ("format", "pt"),
        ("step", "1200"),
        ("note", "quotes \" and unicode é"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let t = Tensor::ones(&[2, 2], DType::F32).unwrap();
    st::save(&path, &[("w", &t)], Some(&meta)).unwrap();
    let f = TensorFile::open(&path).unwrap();
    assert_eq!(f.metadata(), &meta);
    assert_eq!(f.names(), ["w"]);

    // An empty file (no tensors, metadata only) is valid too.
    let empty = dir.join("empty.safetensors");
    st::save(&empty, &[], Some(&meta)).unwrap();
    let f = TensorFile::open(&empty).unwrap();
    assert!(f.is_empty());
    assert_eq!(f.metadata(), &meta);
    let msg = expect_err(&empty, "get", || f.get("w"));
    assert!(msg.contains("no tensors"), "{msg}");
}

#[test]
fn python_written_fixture_reads_correctly() {
    // Written by tools/fixtures/make_safetensors_fixture.py with Python's safetensors.
    let path = fixture("python_written.safetensors");
    let f = TensorFile::open(&path).unwrap();
    assert_eq!(
        f.names(),
        [
            "bf16_matrix",
            "f16_vector",
            "f32_cube",
            "f32_matrix",
            "f32_scalar",
            "f64_vector",
            "i64_vector",
            "u32_vector"
        ]
    );
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(
        f.metadata().get("source").map(String::as_str),
        Some("python")
    );

    let t = f
        .get_checked("f32_matrix", &[2, 3], Some(DType::F32))
        .unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

    let t = f.get_checked("f64_vector", &[3], Some(DType::F64)).unwrap();
    assert_eq!(t.to_vec::<f64>().unwrap(), [0.1, -2.5, 1e300]);

    let t = f
        .get_checked("bf16_matrix", &[2, 2], Some(DType::BF16))
        .unwrap();
    assert_eq!(t.to_f64s().unwrap(), [1.0, -2.0, 0.5, 3.140625]);
    let t = f.get_as("bf16_matrix", DType::F32).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), [1.0, -2.0, 0.5, 3.140625]);

    let t = f.get_checked("f16_vector", &[4], Some(DType::F16)).unwrap();
    assert_eq!(t.to_f64s().unwrap(), [0.5, -1.0, 65504.0, 0.0009765625]);

    let t = f.get_checked("i64_vector", &[4], Some(DType::I64)).unwrap();
    assert_eq!(t.to_vec::<i64>().unwrap(), [-1, 0, 1 << 40, -(1 << 62)]);

    let t = f.get_checked("u32_vector", &[3], Some(DType::U32)).unwrap();
    assert_eq!(t.to_vec::<u32>().unwrap(), [0, 7, 4_000_000_000]);

    let t = f.get_checked("f32_scalar", &[], Some(DType::F32)).unwrap();
    assert_eq!(t.to_scalar().unwrap(), 42.0);

    let t = f.get_checked("f32_cube", &[2, 2, 2], None).unwrap();
    let want: Vec<f32> = (0..8).map(|i| i as f32 * 0.25).collect();
    assert_eq!(t.to_vec::<f32>().unwrap(), want);

    // And it survives a round trip through our writer.
    let dir = test_dir("python_round_trip");
    let out = dir.join("rewritten.safetensors");
    let all = f.load_all().unwrap();
    let meta = f.metadata().clone();
    st::save(&out, &as_refs(&all), Some(&meta)).unwrap();
    let again = TensorFile::open(&out).unwrap();
    assert_eq!(again.metadata(), &meta);
    for ((name, a), (_, b)) in all.iter().zip(again.load_all().unwrap().iter()) {
        assert_same(name, b, a);
    }
}

#[test]
fn malformed_and_unsupported_headers() {
    let dir = test_dir("malformed");
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    let p = write(
        "bad_json.safetensors",
        raw_file("{\"x\": {\"dtype\": ", &[]),
    );
    let msg = expect_err(&p, "bad json", || TensorFile::open(&p));
    assert!(msg.contains("malformed JSON header"), "{msg}");

    let p = write("not_object.safetensors", raw_file("[1, 2]  ", &[]));
    let msg = expect_err(&p, "not object", || TensorFile::open(&p));
    assert!(msg.contains("not an object"), "{msg}");

    let p = write(
        "no_dtype.safetensors",
        raw_file(r#"{"x":{"shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]),
    );
    let msg = expect_err(&p, "no dtype", || TensorFile::open(&p));
    assert!(msg.contains("tensor 'x'") && msg.contains("dtype"), "{msg}");

    let p = write(
        "size_mismatch.safetensors",
        raw_file(
            r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    let msg = expect_err(&p, "size mismatch", || TensorFile::open(&p));
    assert!(
        msg.contains("tensor 'x'") && msg.contains("16 bytes"),
        "{msg}"
    );

    let p = write(
        "past_end.safetensors",
        raw_file(
            r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 12],
        ),
    );
    let msg = expect_err(&p, "past end", || TensorFile::open(&p));
    assert!(
        msg.contains("tensor 'x'") && msg.contains("truncated"),
        "{msg}"
    );

    let p = write(
        "huge_shape.safetensors",
        raw_file(
            r#"{"x":{"dtype":"X9","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
            &[],
        ),
    );
    let msg = expect_err(&p, "huge shape", || TensorFile::open(&p));
    assert!(msg.contains("too many elements"), "{msg}");

    let p = write(
        "huge_len.safetensors",
        [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat(),
    );
    let msg = expect_err(&p, "huge header length", || TensorFile::open(&p));
    assert!(msg.contains("header length"), "{msg}");

    let p = write(
        "bad_metadata.safetensors",
        raw_file(r#"{"__metadata__":{"step":3}}"#, &[]),
    );
    let msg = expect_err(&p, "bad metadata", || TensorFile::open(&p));
    assert!(msg.contains("'step'"), "{msg}");

    // Unsupported dtypes: the file opens (the rest stays readable), reading them names the
    // dtype.
    let p = write(
        "bool.safetensors",
        raw_file(
            concat!(
                r#"{"mask":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]},"#,
                r#""q":{"dtype":"I8","shape":[2],"data_offsets":[3,5]},"#,
                r#""w":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
            ),
            &[1, 0, 1, 255, 7, 0, 0, 0, 0, 0, 128, 63],
        ),
    );
    let f = TensorFile::open(&p).unwrap();
    assert_eq!(f.get("w").unwrap().to_vec::<f32>().unwrap(), [1.0]);
    let msg = expect_err(&p, "BOOL", || f.get("mask"));
    assert!(
        msg.contains("tensor 'mask'") && msg.contains("unsupported dtype BOOL"),
        "{msg}"
    );
    let msg = expect_err(&p, "I8", || f.get_as("q", DType::F32));
    assert!(msg.contains("unsupported dtype I8"), "{msg}");
    let msg = expect_err(&p, "I8 dtype", || f.dtype("q"));
    assert!(msg.contains("I8"), "{msg}");
    let msg = expect_err(&p, "get_checked BOOL", || {
        f.get_checked("mask", &[3], Some(DType::U32))
    });
    assert!(msg.contains("BOOL"), "{msg}");
    let msg = expect_err(&p, "load BOOL", || st::load(&p));
    assert!(msg.contains("unsupported dtype BOOL"), "{msg}");
}

#[test]
fn save_is_atomic_and_validates_names() {
    let dir = test_dir("atomic");
    let path = dir.join("ckpt.safetensors");
    let old = Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap();
    st::save(&path, &[("w", &old)], None).unwrap();

    // Overwrite in place.
    let new = Tensor::from_vec(vec![3i64, 4, 5], &[3]).unwrap();
    st::save(&path, &[("w", &new)], None).unwrap();
    assert_same(
        "w",
        &TensorFile::open(&path).unwrap().get("w").unwrap(),
        &new,
    );

    // A failing save leaves the previous file intact.
    let msg = expect_err(&path, "duplicate", || {
        st::save(&path, &[("a", &old), ("a", &old)], None)
    });
    assert!(msg.contains("'a'") && msg.contains("twice"), "{msg}");
    let msg = expect_err(&path, "reserved", || {
        st::save(&path, &[("__metadata__", &old)], None)
    });
    assert!(msg.contains("reserved"), "{msg}");
    assert_same(
        "w",
        &TensorFile::open(&path).unwrap().get("w").unwrap(),
        &new,
    );

    // No temporary files are left behind.
    let entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["ckpt.safetensors"]);

    // A directory that does not exist.
    let bad = dir.join("no_such_dir").join("x.safetensors");
    expect_err(&bad, "missing dir", || st::save(&bad, &[("w", &old)], None));
}
