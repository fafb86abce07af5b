//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Directory holding libvfio_pause.a: the profile dir above `deps/` of this test binary.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    deps.parent().unwrap().to_path_buf()
}

/// Compile examples-c/cycle.c against libvfio_pause.a into `out`.
pub fn build_c_cycle(out: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir().join("libvfio_pause.a");
    assert!(lib.exists(), "{} was not built", lib.display());
    let st = Command::new("cc")
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-D_DEFAULT_SOURCE")
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
