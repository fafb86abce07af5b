//! The C example is compiled with `cc` against libvfio_pause.a and run on the
//! simulated backend.

mod common;

#[test]
fn c_program_drives_open_pause_unpause_close_through_the_c_abi() {
    let out = std::env::temp_dir().join(format!("vfio-pause-cycle-{}", std::process::id()));
    common::build_c_cycle(&out, true);
    let run = std::process::Command::new(&out)
        .arg("sim")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let _ = std::fs::remove_file(&out);
    assert!(
        run.status.success(),
        "cycle sim failed: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("cycle: ok"), "{stdout}");
    assert!(stdout.contains("identity mismatch"), "{stdout}");
    assert!(stdout.contains("pause: total"), "{stdout}");
}
