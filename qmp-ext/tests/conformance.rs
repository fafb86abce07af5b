//! Conformance of our server with the cases of QEMU's tests/qtest/qmp-test.c.

mod common;

use common::{error_class, test_server, Raw};
use serde_json::json;

/// The connection still works: an unknown command gets CommandNotFound.
fn assert_recovered(raw: &mut Raw) {
    let rsp = raw.cmd("{ 'execute': 'no-such-cmd' }");
    assert_eq!(error_class(&rsp), "CommandNotFound", "{rsp}");
}

fn expect_generic_error(raw: &mut Raw, input: &[u8]) {
    raw.send(input);
    let rsp = raw.recv();
    assert_eq!(error_class(&rsp), "GenericError", "input {input:?}: {rsp}");
    assert!(rsp.get("return").is_none());
}

/// The malformed-input cases of qmp-test.c, each followed by a recovery check.
fn malformed_inputs_are_answered_and_survived(raw: &mut Raw) {
    let lexical: [&[u8]; 6] = [
        b"{]\n",                                // syntax error
        b"{\xFF",                               // impossible byte outside a string
        b"{\x01",                               // control character outside a string
        b"{'bad \xFF",                          // impossible byte in a string
        b"{'execute': 'nonexistent', 'id':'\n", // control character in a string
        b"%p",                                  // interpolation is not for clients
    ];
    for input in lexical {
        expect_generic_error(raw, input);
        assert_recovered(raw);
    }
    // Invalid UTF-8 inside a string (not a lexical error: found when parsing).
    expect_generic_error(raw, b"{'execute': 'x\xC3\x28'}\n");
    assert_recovered(raw);
    let structural = [
        "null",                                          // not even an object
        "{}",                                            // no execute
        "{ 'execute': true }",                           // execute not a string
        "{ 'execute': 'no-such-cmd', 'arguments': [] }", // arguments not an object
        "{ 'execute': 'no-such-cmd', 'extra': true }",   // unknown key
        "[ 'execute', 'query-name' ]",                   // array, not object
    ];
    for input in structural {
        let rsp = raw.cmd(input);
        assert_eq!(error_class(&rsp), "GenericError", "{input}: {rsp}");
        assert_recovered(raw);
    }
}

#[test]
fn greeting_has_version_and_capabilities() {
    let srv = test_server();
    let mut raw = Raw::connect(&srv.path);
    let greeting = raw.recv();
    let q = greeting["QMP"].as_object().expect("QMP member");
    let v = &q["version"];
    for k in ["major", "minor", "micro"] {
        assert!(v["qemu"][k].is_u64(), "version.qemu.{k} in {greeting}");
    }
    assert!(v["package"].is_string());
    assert!(q["capabilities"].is_array());
}

#[test]
fn protocol_conformance_like_qmp_test() {
    let srv = test_server();
    let mut raw = Raw::connect(&srv.path);
    raw.recv();

    // A valid command before the handshake.
    let rsp = raw.cmd("{ 'execute': 'query-version' }");
    assert_eq!(error_class(&rsp), "CommandNotFound");

    malformed_inputs_are_answered_and_survived(&mut raw);

    // Handshake, then a repeated one.
    assert_eq!(
        raw.cmd("{ 'execute': 'qmp_capabilities' }"),
        json!({"return": {}})
    );
    let rsp = raw.cmd("{ 'execute': 'qmp_capabilities' }");
    assert_eq!(error_class(&rsp), "CommandNotFound");

    let rsp = raw.cmd("{ 'execute': 'query-version' }");
    assert!(rsp["return"]["qemu"]["major"].is_u64(), "{rsp}");

    malformed_inputs_are_answered_and_survived(&mut raw);

    // id echoed: string id on success, number id on failure.
    let rsp = raw.cmd("{ 'execute': 'query-name', 'id': 'cookie#1' }");
    assert_eq!(rsp, json!({"return": {}, "id": "cookie#1"}));
    let rsp = raw.cmd("{ 'execute': 'fail', 'id': 2 }");
    assert_eq!(rsp["id"], json!(2));
    assert_eq!(error_class(&rsp), "GenericError");
}

#[test]
fn id_of_any_json_type_is_echoed_on_success_and_error() {
    let srv = test_server();
    let mut raw = Raw::negotiated(&srv.path);
    for id in [
        json!("s"),
        json!(7),
        json!(-1.5),
        json!({"a": [1, null]}),
        json!(null),
    ] {
        let ok = raw.cmd(&json!({"execute": "query-name", "id": id}).to_string());
        assert_eq!(ok, json!({"return": {}, "id": id}));
        let err = raw.cmd(&json!({"execute": "no-such-cmd", "id": id}).to_string());
        assert_eq!(err["id"], id);
        assert_eq!(error_class(&err), "CommandNotFound");
        let bad = raw.cmd(&json!({"execute": "query-name", "id": id, "bogus": 1}).to_string());
        assert_eq!(bad["id"], id, "id echoed on a validation error too");
        assert_eq!(error_class(&bad), "GenericError");
    }
}

#[test]
fn enabling_an_unknown_capability_fails_and_stays_in_negotiation() {
    let srv = test_server();
    let mut raw = Raw::connect(&srv.path);
    raw.recv();
    let rsp = raw.cmd(
        "{ 'execute': 'qmp_capabilities', 'arguments': { 'enable': [ 'cap-does-not-exist' ] } }",
    );
    assert_eq!(error_class(&rsp), "GenericError");
    let rsp = raw.cmd("{ 'execute': 'query-name' }");
    assert_eq!(error_class(&rsp), "CommandNotFound", "still negotiating");
    assert_eq!(
        raw.cmd("{ 'execute': 'qmp_capabilities', 'arguments': {} }"),
        json!({"return": {}})
    );
}

#[test]
fn several_messages_in_one_write_and_one_message_over_many_writes() {
    let srv = test_server();
    let mut raw = Raw::negotiated(&srv.path);
    raw.send(b"{'execute':'echo','arguments':{'n':1},'id':1}{'execute':'echo','arguments':{'n':2},'id':2}");
    assert_eq!(raw.recv(), json!({"return": {"n": 1}, "id": 1}));
    assert_eq!(raw.recv(), json!({"return": {"n": 2}, "id": 2}));
    for b in b"{ \"execute\": \"echo\", \"arguments\": {\"s\": \"caf\xC3\xA9\"} }" {
        raw.send(&[*b]);
    }
    assert_eq!(raw.recv(), json!({"return": {"s": "café"}}));
}

#[test]
fn events_reach_every_negotiated_client_with_timestamps_but_not_negotiating_ones() {
    let srv = test_server();
    let mut a = Raw::negotiated(&srv.path);
    let mut b = Raw::negotiated(&srv.path);
    let mut late = Raw::connect(&srv.path);
    late.recv();

    // The command emits before it returns, so its own client sees the
    // event first, then the response.
    a.send(b"{'execute': 'emit', 'arguments': {'k': 'v'}, 'id': 'e'}");
    assert_eq!(a.recv()["event"], "TEST_EVENT");
    assert_eq!(a.recv(), json!({"return": {}, "id": "e"}));
    let ev = b.recv();
    assert_eq!(ev["event"], "TEST_EVENT");
    assert_eq!(ev["data"], json!({"k": "v"}));
    assert!(ev["timestamp"]["seconds"].as_i64().expect("seconds") > 0);
    assert!((0..1_000_000).contains(
        &ev["timestamp"]["microseconds"]
            .as_i64()
            .expect("microseconds")
    ));

    // The still-negotiating client got nothing: its next message is the
    // answer to its own command.
    let rsp = late.cmd("{'execute': 'qmp_capabilities', 'id': 'late'}");
    assert_eq!(rsp, json!({"return": {}, "id": "late"}));
    srv.server.events().emit("AFTER", None);
    let ev = late.recv();
    assert_eq!(ev["event"], "AFTER");
    assert!(
        ev.get("data").is_none(),
        "no data member when there is no data: {ev}"
    );
}

#[test]
fn clients_are_served_concurrently() {
    let srv = test_server();
    // A client that connected and says nothing does not block another one.
    let _idle = Raw::connect(&srv.path);
    let mut busy = Raw::negotiated(&srv.path);
    assert_eq!(
        busy.cmd("{'execute': 'query-name', 'id': 1}"),
        json!({"return": {}, "id": 1})
    );
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let path = srv.path.clone();
            std::thread::spawn(move || {
                let mut raw = Raw::negotiated(&path);
                for j in 0..20 {
                    let rsp = raw.cmd(
                        &json!({"execute": "echo", "arguments": {"i": i, "j": j}, "id": j})
                            .to_string(),
                    );
                    assert_eq!(rsp, json!({"return": {"i": i, "j": j}, "id": j}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn dropping_the_server_disconnects_clients_and_removes_the_socket() {
    let srv = test_server();
    let mut idle = Raw::negotiated(&srv.path);
    let path = srv.path.clone();
    let common::TestServer { server, dir, .. } = srv;
    drop(server);
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut idle.stream, &mut buf).expect("read within the timeout");
    assert_eq!(n, 0, "server side closed");
    assert!(!path.exists(), "socket file removed");
    drop(dir);
}

#[test]
fn getfd_without_a_descriptor_and_closefd_of_an_unknown_name_fail() {
    let srv = test_server();
    let mut raw = Raw::negotiated(&srv.path);
    let rsp = raw.cmd("{'execute': 'getfd', 'arguments': {'fdname': 'x'}, 'id': 1}");
    assert_eq!((error_class(&rsp), &rsp["id"]), ("GenericError", &json!(1)));
    let rsp = raw.cmd("{'execute': 'closefd', 'arguments': {'fdname': 'x'}}");
    assert_eq!(error_class(&rsp), "GenericError");
    let rsp = raw.cmd("{'execute': 'getfd', 'arguments': {}}");
    assert_eq!(error_class(&rsp), "GenericError", "missing fdname");
}

#[test]
fn output_is_ascii_with_unicode_escapes() {
    let srv = test_server();
    let mut raw = Raw::negotiated(&srv.path);
    raw.send("{'execute': 'echo', 'arguments': {'s': 'café 😀'}}\n".as_bytes());
    let line = raw.recv_line();
    assert!(line.is_ascii(), "{}", String::from_utf8_lossy(&line));
    let v: serde_json::Value = serde_json::from_slice(&line).expect("JSON");
    assert_eq!(v, json!({"return": {"s": "café 😀"}}));
}

/// Sends `data` with `fd` attached (SCM_RIGHTS) on the raw connection.
fn send_with_fd(raw: &Raw, data: &[u8], fd: std::os::fd::BorrowedFd<'_>) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    let n = sendmsg::<()>(
        raw.stream.as_raw_fd(),
        &[std::io::IoSlice::new(data)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(n, data.len());
}

fn pipe_with(text: &str) -> std::os::fd::OwnedFd {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    std::io::Write::write_all(&mut std::fs::File::from(w), text.as_bytes()).expect("write");
    r
}

#[test]
fn descriptors_reach_their_getfd_even_when_commands_arrive_in_pieces() {
    use std::os::fd::AsFd;
    let srv = test_server();
    let mut raw = Raw::negotiated(&srv.path);
    let (a, b) = (pipe_with("first"), pipe_with("second"));
    // Each fd travels with the first bytes of its getfd; the rest of the
    // command follows in a later write.
    send_with_fd(&raw, b"{'execute': 'getfd', 'argu", a.as_fd());
    raw.send(b"ments': {'fdname': 'a'}}");
    send_with_fd(&raw, b"{'execute': 'getfd', ", b.as_fd());
    raw.send(b"'arguments': {'fdname': 'b'}}");
    assert_eq!(raw.recv(), json!({"return": {}}));
    assert_eq!(raw.recv(), json!({"return": {}}));
    drop((a, b));
    let rsp = raw.cmd("{'execute': 'read-fd', 'arguments': {'fdname': 'b'}}");
    assert_eq!(rsp, json!({"return": {"text": "second"}}));
    let rsp = raw.cmd("{'execute': 'read-fd', 'arguments': {'fdname': 'a'}}");
    assert_eq!(rsp, json!({"return": {"text": "first"}}));
}
