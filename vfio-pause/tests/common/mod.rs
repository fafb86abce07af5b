//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libvfio_pause.a built with this test binary. `cargo test` builds the
/// lib's staticlib into `deps/` next to this binary (`libvfio_pause-<hash>.a`)
/// but only `cargo build` copies it up to the profile directory, so take the
/// newest one in `deps/`: the one cargo built just before running the tests.
pub fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    std::fs::read_dir(deps)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("libvfio_pause-") && n.ends_with(".a")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("no libvfio_pause-*.a in {}", deps.display()))
}

/// Compile examples-c/cycle.c against libvfio_pause.a into `out`; with
/// `sim`, its simulated mode too (`-DVP_SIM`: the library cargo test built
/// has the `sim` feature).
pub fn build_c_cycle(out: &Path, sim: bool) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = static_lib();
    let st = Command::new("cc")
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-D_DEFAULT_SOURCE")
        .args(sim.then_some("-DVP_SIM"))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("examples-c/cycle.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s", "-lutil"])
        .arg("-o")
        .arg(out)
        .output()
        .expect("cannot run cc");
    assert!(
        st.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}
