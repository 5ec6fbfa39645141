//! NVRTC compilation of `kernels/*.cu` to cubin, cached on disk.
//!
//! Each file is compiled as `kernels/common.cuh` + `#line 1 "<file>"` + the file, so compile
//! errors name the kernel file and its own line numbers. The cache key hashes the full source,
//! the architecture, the NVRTC version and the options; the cache lives in
//! `$TESSERA_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/tessera/kernels`, else
//! `~/.cache/tessera/kernels` (a failed cache write only costs a recompile next time).

use super::kernels;
use crate::{Error, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::PathBuf;

/// Compile flags common to every kernel file.
const OPTIONS: &[&str] = &[
    "--std=c++17",
    "-default-device",
    "--extra-device-vectorization",
];

/// Whether the NVRTC library can be loaded (never panics).
pub fn nvrtc_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Msg(format!("nvrtc: version: {e:?}")))?;
    Ok((major, minor))
}

fn no_nvrtc() -> Error {
    Error::Msg(
        "nvrtc: libnvrtc.so could not be loaded (install the CUDA toolkit or the PyPI wheel \
         nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH)"
            .into(),
    )
}

/// The full source NVRTC sees for `file`.
pub fn full_source(file: &str) -> Result<String> {
    let src = kernels::source(file)
        .ok_or_else(|| Error::Msg(format!("nvrtc: no kernel file kernels/{file}")))?;
    let hopper = if src.contains(kernels::HOPPER_MARKER) {
        format!("\n#line 1 \"hopper.cuh\"\n{}", kernels::HOPPER)
    } else {
        String::new()
    };
    Ok(format!(
        "{}{hopper}\n#line 1 \"{file}\"\n{src}",
        kernels::COMMON
    ))
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    let base = if let Some(d) = std::env::var_os("TESSERA_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("tessera")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("tessera")
    };
    Some(base.join("kernels"))
}

/// The cubin of `file` for `arch` ("sm_90"), from the disk cache or freshly compiled.
pub fn cubin_cached(file: &str, arch: &str) -> Result<Vec<u8>> {
    let src = full_source(file)?;
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        src.as_bytes(),
        arch.as_bytes(),
        format!("{major}.{minor}").as_bytes(),
        OPTIONS.join(" ").as_bytes(),
    ]);
    let path = cache_dir().map(|d| {
        d.join(format!(
            "{}-{arch}-{key:016x}.cubin",
            file.trim_end_matches(".cu")
        ))
    });
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok(bytes);
            }
        }
    }
    let cubin = compile(file, &src, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(cubin)
}

/// Compiles `src` (the full source of `file`) to a cubin for `arch`; errors carry NVRTC's log,
/// whose lines are "file.cu(line): error: ...".
pub fn compile(file: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let csrc =
        CString::new(src).map_err(|_| Error::Msg(format!("nvrtc: {file} contains a NUL byte")))?;
    let name = CString::new(file).expect("file name");
    let prog = result::create_program(&csrc, Some(&name))
        .map_err(|e| Error::Msg(format!("nvrtc: create program for kernels/{file}: {e:?}")))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    // Files using Hopper-only instructions (wgmma) say so and get the arch-specific target.
    let arch = if src.contains(kernels::HOPPER_MARKER) && arch == "sm_90" {
        "sm_90a"
    } else {
        arch
    };
    opts.push(format!("--gpu-architecture={arch}"));
    // SAFETY: prog is a live program until destroy_program below.
    unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(Error::Msg(format!(
                "nvrtc: compiling kernels/{file} for {arch} failed ({e:?}):\n{}",
                log.trim_end()
            ))),
            Ok(()) => {
                // Sized then copied; any failure still reaches destroy_program below.
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
                            .result()
                            .map(|()| buf)
                    })
                    .map_err(|e| Error::Msg(format!("nvrtc: cubin of kernels/{file}: {e:?}")))
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}
