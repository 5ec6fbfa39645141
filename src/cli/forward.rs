//! `tessera forward`: one Qwen2.5-VL forward (and optionally backward) on tensors from a
//! safetensors file; the contract is in DESIGN.md ("CLI contracts").

use crate::io::TensorFile;
use crate::qwen2_5_vl::{Batch, QwenVl};
use crate::{DType, Error, Result, Tensor};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// Model directory: config.json + model.safetensors (or a sharded index).
    #[arg(long)]
    model: PathBuf,
    /// input_ids I64 [B,T]; optional attention_mask I64 [B,T], pixel_values F32 [N,1176],
    /// image_grid_thw I64 [I,3], labels I64 [B,T].
    #[arg(long)]
    inputs: PathBuf,
    /// Writes logits F32 [B,T,V], loss (with labels), grad.<name> (with --grad).
    #[arg(long)]
    out: PathBuf,
    /// Also run backward from the loss and write every parameter's gradient.
    #[arg(long)]
    grad: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// Reads a `Batch` from a safetensors file with the tensor names of the CLI contract.
pub fn read_batch(path: &std::path::Path) -> Result<Batch> {
    let f = TensorFile::open(path)?;
    let get = |n: &str, dtype: Option<DType>| -> Result<Option<Tensor>> {
        if !f.contains(n) {
            return Ok(None);
        }
        let t = f.get(n)?;
        match dtype {
            Some(d) if t.dtype() != d => Err(Error::file(
                path,
                format!("tensor '{n}' must be {d}, found {}", t.dtype()),
            )),
            _ => Ok(Some(t)),
        }
    };
    let input_ids = get("input_ids", Some(DType::I64))?
        .ok_or_else(|| Error::file(path, "no tensor 'input_ids'"))?;
    let grids = match get("image_grid_thw", Some(DType::I64))? {
        None => Vec::new(),
        Some(g) if g.rank() == 2 && g.dim(1)? == 3 => g
            .to_vec::<i64>()?
            .chunks(3)
            .map(|c| {
                let ok = c.iter().all(|&x| x > 0);
                ok.then(|| [c[0] as usize, c[1] as usize, c[2] as usize])
                    .ok_or_else(|| {
                        Error::file(path, format!("image_grid_thw row {c:?} must be positive"))
                    })
            })
            .collect::<Result<_>>()?,
        Some(g) => {
            return Err(Error::file(
                path,
                format!("image_grid_thw must be [I, 3], found {:?}", g.shape()),
            ))
        }
    };
    let pixel_values = match get("pixel_values", None)? {
        Some(p) => Some(p.to_dtype(DType::F32)?),
        None => None,
    };
    if pixel_values.is_some() == grids.is_empty() {
        return Err(Error::file(
            path,
            "pixel_values and image_grid_thw must come together",
        ));
    }
    Ok(Batch {
        input_ids: Some(input_ids),
        attention_mask: get("attention_mask", Some(DType::I64))?,
        pixel_values,
        image_grid_thw: grids,
        labels: get("labels", Some(DType::I64))?,
    })
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let device: crate::Device = a.device.parse()?;
    let dtype: DType = a.dtype.parse()?;
    dtype
        .check_compute_on(device, "--device cuda")
        .map_err(|why| Error::msg(format!("--dtype {dtype}: {why}")))?;
    // f32 master weights on the device; bf16 computes with in-graph casts, so gradients are
    // reported for the f32 parameters either way.
    let model = QwenVl::load(&a.model, DType::F32)?.to_device(device)?;
    let compute = model.cast(dtype)?;
    let batch = read_batch(&a.inputs)?;
    if a.grad && batch.labels.is_none() {
        return Err(Error::file(
            &a.inputs,
            "--grad needs 'labels' to form a loss",
        ));
    }
    let out = if a.grad {
        compute.forward(&batch)?
    } else {
        crate::no_grad(|| compute.forward(&batch))?
    };
    let f32_cpu = |t: &Tensor| crate::no_grad(|| t.detach().to_cpu()?.to_dtype(DType::F32));
    let mut tensors: Vec<(String, Tensor)> = vec![("logits".into(), f32_cpu(&out.logits)?)];
    if let Some(loss) = &out.loss {
        tensors.push(("loss".into(), f32_cpu(loss)?));
        if a.grad {
            loss.backward()?;
            for (name, p) in model.params.iter() {
                let g = match p.grad() {
                    Some(g) => f32_cpu(&g)?,
                    None => Tensor::zeros(p.shape(), DType::F32)?,
                };
                tensors.push((format!("grad.{name}"), g));
            }
        }
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::save(&a.out, &refs, None)?;
    eprintln!(
        "wrote {} tensors to {}{}",
        tensors.len(),
        a.out.display(),
        out.loss
            .map(|l| format!(" (loss {:.6})", l.to_scalar().unwrap_or(f64::NAN)))
            .unwrap_or_default()
    );
    Ok(())
}
