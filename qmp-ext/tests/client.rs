//! Client behaviour against misbehaving peers: it never hangs.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use qmp_ext::{Client, Error};

fn listener() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peer.sock");
    let l = UnixListener::bind(&path).expect("bind");
    (dir, path, l)
}

#[test]
fn silent_server_gives_a_timeout_not_a_hang() {
    let (_dir, path, l) = listener();
    // The connection is queued in the listener's backlog; nobody ever writes.
    let err = Client::connect(&path, Duration::from_millis(100)).expect_err("no greeting");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    drop(l);
}

#[test]
fn server_closing_mid_negotiation_is_reported_as_closed() {
    let (_dir, path, l) = listener();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 1, \"minor\": 2, \"micro\": 3}, \"package\": \"\"}, \"capabilities\": []}}\r\n")
            .expect("greeting");
        // Hang up instead of answering qmp_capabilities.
    });
    let err = Client::connect(&path, Duration::from_secs(10)).expect_err("no answer");
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    peer.join().expect("peer");
}

#[test]
fn responses_with_other_ids_are_dropped_and_events_kept() {
    let (_dir, path, l) = listener();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 1, \"minor\": 2, \"micro\": 3}, \"package\": \"x\"}, \"capabilities\": [\"oob\"]}}\r\n")
            .expect("greeting");
        for _ in 0..2 {
            line.clear();
            std::io::BufRead::read_line(&mut r, &mut line).expect("command");
            let req: serde_json::Value = serde_json::from_str(&line).expect("client sends JSON");
            let id = &req["id"];
            let out = format!(
                "{{\"return\": {{\"stale\": true}}, \"id\": \"someone-else\"}}\r\n\
                 {{\"event\": \"E1\", \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\r\n\
                 {{\"return\": {{\"cmd\": {}}}, \"id\": {id}}}\r\n",
                req["execute"]
            );
            s.write_all(out.as_bytes()).expect("responses");
        }
    });
    let mut c = Client::connect(&path, Duration::from_secs(10)).expect("connect");
    assert_eq!(c.greeting().qmp.capabilities, ["oob"]);
    let ret = c.execute("query-x", None).expect("execute");
    assert_eq!(ret, serde_json::json!({"cmd": "query-x"}));
    let events = c.take_events();
    assert_eq!(events.len(), 2, "one event per command, kept: {events:?}");
    assert!(events
        .iter()
        .all(|e| e.name == "E1" && e.timestamp.microseconds == 2));
    peer.join().expect("peer");
}
