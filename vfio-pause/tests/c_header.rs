//! The checked-in C header must be what cbindgen generates from src/ffi.rs.

use std::path::Path;

#[test]
fn c_header_matches_checked_in_copy() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen failed on src/ffi.rs")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("include/vfio_pause.h");
    if std::env::var_os("VFIO_PAUSE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "include/vfio_pause.h is stale: regenerate with \
         `VFIO_PAUSE_BLESS=1 cargo test -p vfio-pause --test c_header`"
    );
}
