//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libvfio_pause.a built with this test binary. `cargo test` builds the
/// lib's staticlib into `deps/` next to this binary (`libvfio_pause-<hash>.a`)
/// but only `cargo build` copies it up to the profile directory. Other cargo
/// runs (clippy, doc, a build without `sim`) leave their own copies there too,
/// so take the newest one that has what the caller needs: with `sim`, the
/// simulated backend's symbols (`vp_container_new_simulated`).
pub fn static_lib(sim: bool) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let mut libs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(deps)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("libvfio_pause-") && n.ends_with(".a")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    libs.sort_by_key(|l| std::cmp::Reverse(l.0));
    let needle: &[u8] = b"vp_container_new_simulated";
    libs.into_iter()
        .map(|(_, p)| p)
        .find(|p| {
            !sim || std::fs::read(p)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| {
            panic!(
                "no libvfio_pause-*.a{} in {}",
                if sim { " with the sim feature" } else { "" },
                deps.display()
            )
        })
}

/// Compile examples-c/cycle.c against libvfio_pause.a into `out`; with
/// `sim`, its simulated mode too (`-DVP_SIM`: the library cargo test built
/// has the `sim` feature).
pub fn build_c_cycle(out: &Path, sim: bool) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = static_lib(sim);
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
