//! Reading and writing the [safetensors] checkpoint format (the format of Hugging Face
//! checkpoints).
//!
//! A safetensors file is an 8-byte little-endian header length `n`, then `n` bytes of JSON
//! header, then the raw little-endian tensor bytes. The header maps each tensor name to
//! `{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}` (offsets relative to the
//! first byte after the header) and may carry a string-to-string `"__metadata__"` map.
//!
//! Reading ([`TensorFile`], [`load`], [`load_as`]) parses only the header when the file is
//! opened and then reads each tensor's bytes straight into the tensor's own buffer when it is
//! asked for, so a large checkpoint is never held twice in memory (nor even once as a whole,
//! unless every tensor is kept). Conversions on load ([`TensorFile::get_as`]) go through a small
//! bounded buffer, not a full copy in the file's dtype.
//!
//! Writing ([`save`]) streams one tensor at a time to a temporary file in the target's
//! directory, fsyncs it, renames it over the target and fsyncs the directory: a crash at any
//! moment leaves either the old file or the complete new one.
//!
//! Every error names the file and, where there is one, the tensor. Nothing here panics on bad
//! input.
//!
//! Byte order: tensors are stored little-endian, which is the in-memory order of every target
//! tessera runs on (x86-64, aarch64).
//!
//! [safetensors]: https://github.com/huggingface/safetensors

use crate::tensor::{DType, Tensor, WithDType};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(unix))]
use std::sync::Mutex;

/// The key of the optional string-to-string metadata map in a safetensors header.
pub const METADATA_KEY: &str = "__metadata__";

/// Largest header accepted (the same limit as the reference implementation): protects against
/// allocating gigabytes because of a corrupt length prefix.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes converted per step by [`TensorFile::get_as`] when the dtype changes.
const CONVERT_CHUNK_BYTES: usize = 1 << 20;

/// How many tensor names a "not found" error lists.
const NAMES_IN_ERRORS: usize = 8;

/// The safetensors name of a tessera dtype (`"F32"`, `"BF16"`, ...).
pub fn dtype_to_safetensors(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I64 => "I64",
        DType::U32 => "U32",
    }
}

/// The tessera dtype of a safetensors dtype name, or `None` when tessera has no such dtype
/// (`BOOL`, `U8`, `I8`, `I16`, `U16`, `I32`, `U64`, `F8_E4M3`, ...).
pub fn dtype_from_safetensors(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F64" => Some(DType::F64),
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "I64" => Some(DType::I64),
        "U32" => Some(DType::U32),
        _ => None,
    }
}

/// Element size in bytes of any dtype the safetensors format defines (including those tessera
/// cannot load), so that headers can be validated whatever they hold. `None` for names the
/// format does not define, and for sub-byte types.
fn safetensors_elem_size(name: &str) -> Option<usize> {
    match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => Some(1),
        "I16" | "U16" | "F16" | "BF16" => Some(2),
        "I32" | "U32" | "F32" => Some(4),
        "I64" | "U64" | "F64" => Some(8),
        _ => None,
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (key in the header).
    pub name: String,
    /// The dtype as the file spells it (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    pub file_dtype: String,
    /// The tessera dtype, or `None` when the file's dtype is not one tessera supports (reading
    /// such a tensor is an error that names the dtype; the rest of the file stays readable).
    pub dtype: Option<DType>,
    /// The tensor's shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// Byte range of the data, relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// An open safetensors file: the parsed header plus a handle to read tensors from on demand.
///
/// ```no_run
/// use tessera::io::safetensors::TensorFile;
/// use tessera::DType;
/// # fn main() -> tessera::Result<()> {
/// let f = TensorFile::open("model.safetensors")?;
/// for name in f.names() {
///     println!("{name}: {:?} {}", f.shape(name)?, f.info(name)?.file_dtype);
/// }
/// let w = f.get_checked("lm_head.weight", &[151936, 2048], Some(DType::BF16))?;
/// let w32 = f.get_as("lm_head.weight", DType::F32)?;
/// # let _ = (w, w32);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    /// Read at explicit offsets (`pread` on Unix), so threads load tensors concurrently.
    file: File,
    /// Elsewhere reads seek first, one at a time.
    #[cfg(not(unix))]
    seek_lock: Mutex<()>,
    /// Absolute file offset of the data section (8 + header length).
    data_start: u64,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Opens `path` and parses and validates its header (dtypes, shapes, offsets against the
    /// file size). Tensor data is not read until asked for.
    pub fn open(path: impl AsRef<Path>) -> Result<TensorFile> {
        let path = path.as_ref();
        let ferr = |msg: String| Error::file(path, msg);
        let mut file =
            File::open(path).map_err(|e| ferr(format!("cannot open safetensors file: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| ferr(format!("cannot stat file: {e}")))?
            .len();
        if file_len < 8 {
            return Err(ferr(format!(
                "not a safetensors file or truncated: {file_len} bytes, shorter than the \
                 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| ferr(format!("cannot read header length: {e}")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len - 8 {
            return Err(ferr(format!(
                "truncated or not a safetensors file: header length {header_len} bytes exceeds \
                 the {} bytes after the length prefix (file is {file_len} bytes)",
                file_len - 8
            )));
        }
        if header_len > MAX_HEADER_BYTES {
            return Err(ferr(format!(
                "header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit \
                 (corrupt file?)"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| ferr(format!("cannot read {header_len}-byte header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let (tensors, metadata) = parse_header(&header, data_len).map_err(ferr)?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            file,
            #[cfg(not(unix))]
            seek_lock: Mutex::new(()),
            data_start,
            tensors,
            metadata,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Header entries of all tensors, sorted by name.
    pub fn infos(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// Number of tensors in the file.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The `__metadata__` map of the header (empty when the file has none).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The header entry of `name`; a missing name is an error listing some available names.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| self.not_found(name))
    }

    /// Shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.info(name)?.shape)
    }

    /// Tessera dtype of tensor `name`; an error when the file's dtype is unsupported.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let info = self.info(name)?;
        info.dtype.ok_or_else(|| self.unsupported(info))
    }

    /// Reads tensor `name` in the file's dtype.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let dtype = info.dtype.ok_or_else(|| self.unsupported(info))?;
        crate::any_dispatch!(dtype, T => self.read_native::<T>(info))
    }

    /// Reads tensor `name` converted to `dtype`. Any float dtype converts to any other float
    /// dtype (e.g. bf16 or f16 weights to f32), element by element without a full intermediate
    /// copy. Integer tensors load only as their own dtype: asking for another is an error.
    pub fn get_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let info = self.info(name)?;
        let from = info.dtype.ok_or_else(|| self.unsupported(info))?;
        if from == dtype {
            return self.get(name);
        }
        if !(from.is_float() && dtype.is_float()) {
            return Err(self.tensor_err(
                name,
                format!("cannot load {from} data as {dtype} (only float-to-float conversion)"),
            ));
        }
        crate::any_dispatch!(from, S => {
            crate::any_dispatch!(dtype, D => self.read_converted::<S, D>(info))
        })
    }

    /// Reads tensor `name` after checking its shape and, when `dtype` is given, its dtype in the
    /// file (both checked before any data is read). Mismatches are errors such as
    /// `model.safetensors: tensor 'x': expected shape [2, 3], found [3, 2]`.
    pub fn get_checked(
        &self,
        name: &str,
        expected_shape: &[usize],
        dtype: Option<DType>,
    ) -> Result<Tensor> {
        let info = self.info(name)?;
        if info.shape != expected_shape {
            return Err(self.tensor_err(
                name,
                format!("expected shape {expected_shape:?}, found {:?}", info.shape),
            ));
        }
        if let Some(want) = dtype {
            if info.dtype != Some(want) {
                return Err(self.tensor_err(
                    name,
                    format!(
                        "expected dtype {want} ({}), found {}",
                        dtype_to_safetensors(want),
                        match info.dtype {
                            Some(d) => format!("{d} ({})", info.file_dtype),
                            None => info.file_dtype.clone(),
                        }
                    ),
                ));
            }
        }
        self.get(name)
    }

    /// Reads every tensor in the file's dtypes, sorted by name.
    pub fn load_all(&self) -> Result<Vec<(String, Tensor)>> {
        self.tensors
            .keys()
            .map(|n| Ok((n.clone(), self.get(n)?)))
            .collect()
    }

    /// Reads every tensor, sorted by name, converting float tensors to `dtype` when `dtype` is a
    /// float dtype; integer tensors (ids, masks, ...) keep their own dtype.
    pub fn load_all_as(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        self.tensors
            .values()
            .map(|info| {
                let t = match info.dtype {
                    Some(d) if d.is_float() && dtype.is_float() => {
                        self.get_as(&info.name, dtype)?
                    }
                    _ => self.get(&info.name)?,
                };
                Ok((info.name.clone(), t))
            })
            .collect()
    }

    // ------------------------------------------------------------------------------ helpers

    fn tensor_err(&self, name: &str, msg: impl std::fmt::Display) -> Error {
        Error::file(&self.path, format!("tensor '{name}': {msg}"))
    }

    fn unsupported(&self, info: &TensorInfo) -> Error {
        self.tensor_err(
            &info.name,
            format!(
                "unsupported dtype {} (tessera reads F32, F64, BF16, F16, I64, U32)",
                info.file_dtype
            ),
        )
    }

    fn not_found(&self, name: &str) -> Error {
        let n = self.tensors.len();
        let msg = if n == 0 {
            "the file holds no tensors".to_string()
        } else {
            let shown: Vec<&str> = self
                .tensors
                .keys()
                .take(NAMES_IN_ERRORS)
                .map(String::as_str)
                .collect();
            let more = if n > shown.len() {
                format!(", ... ({} more)", n - shown.len())
            } else {
                String::new()
            };
            format!(
                "{n} tensor{} available: {}{more}",
                if n == 1 { "" } else { "s" },
                shown.join(", ")
            )
        };
        self.tensor_err(name, format!("not found; {msg}"))
    }

    /// Reads `dst.len()` bytes of tensor `info`'s data starting `skip` bytes into it.
    fn read_bytes(&self, info: &TensorInfo, skip: u64, dst: &mut [u8]) -> Result<()> {
        let pos = self.data_start + info.data_offsets.0 + skip;
        #[cfg(unix)]
        let read = std::os::unix::fs::FileExt::read_exact_at(&self.file, dst, pos);
        #[cfg(not(unix))]
        let read = {
            let _one_at_a_time = self
                .seek_lock
                .lock()
                .map_err(|_| self.tensor_err(&info.name, "file handle poisoned by a panic"))?;
            let mut file = &self.file;
            file.seek(SeekFrom::Start(pos))
                .and_then(|_| file.read_exact(dst))
        };
        read.map_err(|e| {
            self.tensor_err(
                &info.name,
                format!(
                    "cannot read {} bytes at offset {pos}: {e} (was the file truncated or \
                         replaced?)",
                    dst.len()
                ),
            )
        })
    }

    /// Reads the data straight into the tensor's buffer (one copy, no intermediate).
    fn read_native<T: WithDType>(&self, info: &TensorInfo) -> Result<Tensor> {
        let n = info.numel();
        let mut v: Vec<T> = vec![T::zeroed(); n];
        self.read_bytes(info, 0, bytemuck::cast_slice_mut(&mut v))?;
        Tensor::from_vec(v, &info.shape).map_err(|e| self.tensor_err(&info.name, e))
    }

    /// Reads `S` data and converts it to `D` through a bounded buffer.
    fn read_converted<S: WithDType, D: WithDType>(&self, info: &TensorInfo) -> Result<Tensor> {
        let n = info.numel();
        let chunk = (CONVERT_CHUNK_BYTES / std::mem::size_of::<S>()).max(1);
        let mut buf: Vec<S> = vec![S::zeroed(); chunk.min(n)];
        let mut out: Vec<D> = Vec::with_capacity(n);
        let mut done = 0usize;
        while done < n {
            let k = chunk.min(n - done);
            let part = &mut buf[..k];
            let skip = (done * std::mem::size_of::<S>()) as u64;
            self.read_bytes(info, skip, bytemuck::cast_slice_mut(part))?;
            extend_converted(&mut out, part);
            done += k;
        }
        Tensor::from_vec(out, &info.shape).map_err(|e| self.tensor_err(&info.name, e))
    }
}

/// Appends `src` converted to `D`. bf16 to f32, the usual way to load a checkpoint, is a
/// 16-bit shift (a bf16 is the top half of an f32): the same values as the route through f64,
/// at memory speed; only a NaN's payload may differ (kept here, quieted through f64).
fn extend_converted<S: WithDType, D: WithDType>(out: &mut Vec<D>, src: &[S]) {
    use std::any::TypeId;
    if TypeId::of::<S>() == TypeId::of::<half::bf16>() && TypeId::of::<D>() == TypeId::of::<f32>() {
        let bits: &[u16] = bytemuck::cast_slice(src);
        // SAFETY: D is f32 (checked above), so this is the same Vec.
        let out = unsafe { &mut *(out as *mut Vec<D>).cast::<Vec<f32>>() };
        out.extend(bits.iter().map(|&b| f32::from_bits((b as u32) << 16)));
        return;
    }
    out.extend(src.iter().map(|&s| convert::<S, D>(s)));
}

/// Float-to-float element conversion through f64: exact when widening (bf16/f16/f32 to f32 or
/// f64), a single correct rounding when narrowing, since every source value is exact in f64.
#[inline]
fn convert<S: WithDType, D: WithDType>(s: S) -> D {
    D::from_f64(s.to_f64())
}

/// Tensor entries by name, and the metadata map, of a parsed header.
type ParsedHeader = (BTreeMap<String, TensorInfo>, HashMap<String, String>);

/// Parses and validates a header. Errors are messages; the caller prefixes the path.
fn parse_header(header: &[u8], data_len: u64) -> std::result::Result<ParsedHeader, String> {
    let text = std::str::from_utf8(header)
        .map_err(|e| format!("malformed header: not valid UTF-8 ({e})"))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON header: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("malformed header: the JSON header is not an object".into());
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = HashMap::new();
    for (name, entry) in map {
        if name == METADATA_KEY {
            let serde_json::Value::Object(m) = entry else {
                return Err(format!("malformed header: {METADATA_KEY} is not an object"));
            };
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) => {
                        metadata.insert(k, s);
                    }
                    other => {
                        return Err(format!(
                            "malformed header: {METADATA_KEY} value for '{k}' is not a string: \
                             {other}"
                        ))
                    }
                }
            }
            continue;
        }
        let info = parse_entry(&name, &entry, data_len)
            .map_err(|msg| format!("tensor '{name}': {msg}"))?;
        tensors.insert(name, info);
    }
    Ok((tensors, metadata))
}

fn parse_entry(
    name: &str,
    entry: &serde_json::Value,
    data_len: u64,
) -> std::result::Result<TensorInfo, String> {
    let obj = entry
        .as_object()
        .ok_or_else(|| format!("malformed header: entry is not an object: {entry}"))?;
    let file_dtype = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or("malformed header: missing or non-string \"dtype\"")?
        .to_string();
    let shape_v = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or("malformed header: missing or non-array \"shape\"")?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| format!("malformed header: bad dimension {d} in \"shape\""))?;
        shape.push(d);
    }
    if shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_none()
    {
        return Err(format!(
            "malformed header: shape {shape:?} has too many elements"
        ));
    }
    let offs = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .ok_or("malformed header: \"data_offsets\" must be an array [begin, end]")?;
    let (begin, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
        (Some(b), Some(e)) => (b, e),
        _ => {
            return Err(format!(
                "malformed header: \"data_offsets\" must be non-negative integers, found \
                 [{}, {}]",
                offs[0], offs[1]
            ))
        }
    };
    if end < begin {
        return Err(format!(
            "malformed header: data_offsets [{begin}, {end}] end before they begin"
        ));
    }
    if end > data_len {
        return Err(format!(
            "truncated file: data_offsets [{begin}, {end}] run past the end of the data \
             section ({data_len} bytes)"
        ));
    }
    let dtype = dtype_from_safetensors(&file_dtype);
    if let Some(size) = safetensors_elem_size(&file_dtype) {
        let expected = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(size as u64));
        if expected != Some(end - begin) {
            return Err(format!(
                "malformed header: shape {shape:?} of {file_dtype} needs {} bytes but \
                 data_offsets [{begin}, {end}] span {}",
                expected.map_or("more than 2^64".to_string(), |b| b.to_string()),
                end - begin
            ));
        }
    }
    Ok(TensorInfo {
        name: name.to_string(),
        file_dtype,
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

/// Reads every tensor of the safetensors file at `path` in the file's dtypes, sorted by name.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    TensorFile::open(path)?.load_all()
}

/// Reads every tensor of the file at `path`, sorted by name, with float tensors converted to
/// `dtype` (e.g. a bf16 checkpoint to f32); integer tensors keep their own dtype.
pub fn load_as(path: impl AsRef<Path>, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    TensorFile::open(path)?.load_all_as(dtype)
}

/// Writes `tensors` (any dtypes, any layouts) and optional `metadata` to `path` in the
/// standard safetensors format, atomically: the data goes to a temporary file in the same
/// directory, which is fsynced and renamed over `path`, and the directory is then fsynced.
/// A crash at any point leaves either the previous file or the complete new one.
///
/// Names must be unique and not `__metadata__`. Tensor data is laid out by decreasing element
/// size, then by name, so every tensor starts at an offset aligned to its element size.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let ferr = |msg: String| Error::file(path, msg);

    // Order the data and build the header.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, ta) = tensors[a];
        let (nb, tb) = tensors[b];
        tb.dtype()
            .size_in_bytes()
            .cmp(&ta.dtype().size_in_bytes())
            .then_with(|| na.cmp(nb))
    });
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        let m: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert(METADATA_KEY.to_string(), serde_json::Value::Object(m));
    }
    let mut offset = 0u64;
    for &i in &order {
        let (name, t) = tensors[i];
        if name == METADATA_KEY {
            return Err(ferr(format!(
                "tensor name '{METADATA_KEY}' is reserved for the metadata map"
            )));
        }
        let bytes = (t.numel() * t.dtype().size_in_bytes()) as u64;
        let entry = serde_json::json!({
            "dtype": dtype_to_safetensors(t.dtype()),
            "shape": t.shape(),
            "data_offsets": [offset, offset + bytes],
        });
        if header.insert(name.to_string(), entry).is_some() {
            return Err(ferr(format!("tensor '{name}': name given twice")));
        }
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| ferr(format!("cannot encode header: {e}")))?;
    // Pad with spaces so the data section starts 8-byte aligned.
    let padded = header_bytes.len().div_ceil(8) * 8;
    header_bytes.resize(padded, b' ');

    // Write the temporary file.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ferr("cannot save: the path has no file name".into()))?
        .to_string_lossy()
        .into_owned();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            ferr(format!(
                "cannot create temporary file {}: {e}",
                tmp.display()
            ))
        })?;
    let written = write_body(file, &header_bytes, tensors, &order)
        .map_err(|msg| ferr(format!("writing temporary file {}: {msg}", tmp.display())));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ferr(format!(
            "cannot rename temporary file {} over the target: {e}",
            tmp.display()
        )));
    }
    sync_dir(&dir).map_err(|e| {
        ferr(format!(
            "file written, but fsync of directory {} failed: {e}",
            dir.display()
        ))
    })
}

/// Writes length prefix, header and tensor data, then flushes and fsyncs.
fn write_body(
    file: File,
    header: &[u8],
    tensors: &[(&str, &Tensor)],
    order: &[usize],
) -> std::result::Result<(), String> {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(header))
        .map_err(|e| e.to_string())?;
    for &i in order {
        let (name, t) = tensors[i];
        // One tensor's contiguous copy at a time.
        let bytes = t.to_bytes().map_err(|e| format!("tensor '{name}': {e}"))?;
        w.write_all(&bytes)
            .map_err(|e| format!("tensor '{name}': {e}"))?;
    }
    let file = w.into_inner().map_err(|e| e.error().to_string())?;
    file.sync_all().map_err(|e| format!("fsync failed: {e}"))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    // Directories cannot be opened as files here; the rename itself is atomic.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{convert, extend_converted};
    use half::bf16;

    /// The shift that widens bf16 to f32 gives the f64 route's bits for every bf16 that is not
    /// a NaN (and a NaN for every NaN).
    #[test]
    fn bf16_to_f32_shift_matches_the_f64_route() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut fast: Vec<f32> = Vec::new();
        extend_converted(&mut fast, &all);
        for (&b, &f) in all.iter().zip(&fast) {
            let slow: f32 = convert::<bf16, f32>(b);
            if b.is_nan() {
                assert!(f.is_nan(), "{:#06x}", b.to_bits());
            } else {
                assert_eq!(f.to_bits(), slow.to_bits(), "{:#06x}", b.to_bits());
            }
        }
    }
}
