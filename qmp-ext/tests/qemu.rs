//! Our client against real QEMU (`qemu-system-x86_64 -M none`).

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::{Qemu, QEMU_TIMEOUT as TIMEOUT};

use qmp_ext::ErrorClass;
use serde_json::json;

#[test]
fn negotiates_with_qemu_and_queries_status() {
    let qemu = Qemu::start();
    let mut c = qemu.connect();
    assert_eq!(
        c.greeting().qmp.version.qemu.major,
        10,
        "Debian's QEMU 10: {:?}",
        c.greeting()
    );
    let status = c.execute("query-status", None).expect("query-status");
    assert!(status["status"].is_string(), "{status}");
    assert!(status["running"].is_boolean(), "{status}");
}

#[test]
fn unknown_command_is_command_not_found_on_qemu() {
    let qemu = Qemu::start();
    let mut c = qemu.connect();
    let err = c
        .execute("svff-no-such-command", None)
        .expect_err("must fail");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::CommandNotFound,
        "{err:?}"
    );
    // Still usable afterwards, with a typed-args error class too.
    let err = c
        .execute("closefd", Some(json!({"fdname": "never-given"})))
        .expect_err("must fail");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
}

#[test]
fn getfd_passes_a_descriptor_to_qemu_and_closefd_releases_it() {
    let qemu = Qemu::start();
    let mut c = qemu.connect();
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    // Without a descriptor, getfd fails.
    let err = c
        .execute("getfd", Some(json!({"fdname": "svff-fd"})))
        .expect_err("no fd sent");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    c.send_fd("svff-fd", r.as_fd())
        .expect("getfd with SCM_RIGHTS");
    // closefd succeeds only for a name QEMU holds, and only once.
    c.execute("closefd", Some(json!({"fdname": "svff-fd"})))
        .expect("closefd of the passed fd");
    let err = c
        .execute("closefd", Some(json!({"fdname": "svff-fd"})))
        .expect_err("already closed");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
}

#[test]
fn stop_produces_a_stop_event_that_wait_event_returns() {
    let qemu = Qemu::start();
    let mut c = qemu.connect();
    c.execute("stop", None).expect("stop");
    let ev = c.wait_event("STOP", TIMEOUT).expect("STOP event");
    assert!(ev.timestamp.seconds > 0);
    let status = c.execute("query-status", None).expect("query-status");
    assert_eq!(status["running"], json!(false));
}

#[test]
fn waiting_for_an_event_that_never_comes_times_out() {
    let qemu = Qemu::start();
    let mut c = qemu.connect();
    let err = c
        .wait_event("SVFF_NEVER", Duration::from_millis(200))
        .expect_err("no such event");
    assert!(matches!(err, qmp_ext::Error::Timeout { .. }), "{err:?}");
}

#[test]
fn add_fd_passes_a_descriptor_that_query_fdsets_lists() {
    let qemu = Qemu::start();
    let mut c = qemu.connect();
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let info = c
        .execute_with_fds(
            "add-fd",
            Some(json!({"fdset-id": 7, "opaque": "svff"})),
            &[r.as_fd()],
        )
        .expect("add-fd with SCM_RIGHTS");
    assert_eq!(info["fdset-id"], json!(7));
    let qemu_fd = info["fd"].as_i64().expect("fd number in QEMU");
    let sets = c.execute("query-fdsets", None).expect("query-fdsets");
    let set = sets
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["fdset-id"] == json!(7))
        .expect("fdset 7 listed");
    assert_eq!(set["fds"][0]["fd"].as_i64(), Some(qemu_fd));
    assert_eq!(set["fds"][0]["opaque"], json!("svff"));
}
