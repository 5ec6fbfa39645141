//! Every kernel file compiles with NVRTC for sm_80 and sm_90 (no GPU needed, only
//! libnvrtc). Skips when NVRTC cannot be loaded, unless TESSERA_REQUIRE_NVRTC=1 (set by
//! .ci/run, which installs NVRTC from PyPI), where a missing NVRTC is a failure.

use tessera::backend::cuda::{compile, kernels};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !compile::nvrtc_available() {
        let msg = "NVRTC not found (libnvrtc.so); kernels not compiled";
        if std::env::var("TESSERA_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("{msg}, and TESSERA_REQUIRE_NVRTC=1");
        }
        tessera::backend::cuda::skip_note(&format!(
            "skipped every_kernel_compiles_for_sm80_and_sm90: {msg}"
        ));
        return;
    }
    let (major, minor) = compile::nvrtc_version().unwrap();
    println!("NVRTC {major}.{minor}");
    // One thread per (file, arch), as many at once as there are cores.
    let jobs: Vec<(&str, &str)> = kernels::SOURCES
        .iter()
        .flat_map(|(f, _)| ["sm_80", "sm_90"].map(|a| (*f, a)))
        .collect();
    let width = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut failures = Vec::new();
    for chunk in jobs.chunks(width) {
        let results: Vec<Result<String, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(file, arch)| {
                    s.spawn(move || {
                        let src = compile::full_source(file).map_err(|e| e.to_string())?;
                        let t = std::time::Instant::now();
                        compile::compile(file, &src, arch)
                            .map(|c| {
                                format!("{file} {arch}: {} bytes in {:.2?}", c.len(), t.elapsed())
                            })
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("compile thread"))
                .collect()
        });
        for r in results {
            match r {
                Ok(line) => println!("{line}"),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernel compile errors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn compile_errors_name_the_file_and_line() {
    if !compile::nvrtc_available() {
        tessera::backend::cuda::skip_note(
            "skipped compile_errors_name_the_file_and_line: NVRTC not found",
        );
        return;
    }
    let src = format!(
        "{}\n#line 1 \"broken.cu\"\n\nextern \"C\" __global__ void k() {{ undefined_thing(); }}\n",
        kernels::COMMON
    );
    let err = compile::compile("broken.cu", &src, "sm_80")
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.cu(2)"), "{err}");
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    // On a machine without a GPU this is the "no CUDA driver found" path; with one, a device.
    match tessera::backend::cuda::device() {
        Ok(d) => println!("cuda device: {} ({})", d.name, d.arch()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("no CUDA"), "{msg}");
            let t = tessera::Tensor::zeros(&[2], tessera::DType::F32).unwrap();
            assert!(t.to_cuda().is_err());
        }
    }
}

/// Fills the kernel cache (`TESSERA_CACHE_DIR`) with every kernel's cubin for sm_90, as the
/// runtime would on an H100/H200: tools/gpu/prepare.sh runs it here, so the GPU check does not
/// spend device time compiling (the cache key holds NVRTC's major.minor, so a GPU machine
/// with another NVRTC compiles as before). Ignored in plain `cargo test`.
#[test]
#[ignore]
fn fill_kernel_cache_for_sm90() {
    assert!(
        std::env::var_os("TESSERA_CACHE_DIR").is_some(),
        "set TESSERA_CACHE_DIR to the cache to fill"
    );
    let (major, minor) = compile::nvrtc_version().expect("NVRTC");
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for (file, _) in kernels::SOURCES {
            s.spawn(move || compile::cubin_cached(file, "sm_90").expect("compile"));
        }
    });
    println!(
        "NVRTC {major}.{minor}: {} kernel files cached for sm_90 in {:.1?}",
        kernels::SOURCES.len(),
        t.elapsed()
    );
}
