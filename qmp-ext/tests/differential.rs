//! Differential conformance: the same raw input to real QEMU and to our
//! server must produce the same sequence of responses (kind, error class,
//! echoed id). Descriptions are free text and are not compared.

mod common;

use common::{test_server, Qemu, Raw};
use serde_json::{json, Value};

/// What is compared of one response. A numeric id is compared by value:
/// QEMU prints the double -5.0 as `-5`, serde_json as `-5.0`.
fn shape(rsp: &Value) -> Value {
    let id = match rsp.get("id") {
        Some(Value::Number(n)) => json!(n.as_f64()),
        other => json!(other),
    };
    match (rsp.get("return"), rsp.get("error")) {
        (Some(_), None) => json!({"kind": "return", "id": id}),
        (None, Some(e)) => json!({"kind": "error", "class": e["class"], "id": id}),
        _ => panic!("neither return nor error: {rsp}"),
    }
}

/// Sends `input`, then a marker command, and returns the shapes of every
/// response up to the marker's.
fn responses(raw: &mut Raw, input: &[u8]) -> Vec<Value> {
    raw.send(input);
    raw.send(b"\n{'execute': 'no-such-cmd', 'id': 'marker'}\n");
    let mut out = Vec::new();
    loop {
        let rsp = raw.recv();
        if rsp.get("event").is_some() {
            continue;
        }
        if rsp.get("id") == Some(&json!("marker")) {
            return out;
        }
        out.push(shape(&rsp));
    }
}

const INPUTS: &[&[u8]] = &[
    // qmp-test.c's malformed inputs
    b"{]",
    b"{\xFF",
    b"{\x01",
    b"{'bad \xFF",
    b"{'execute': 'nonexistent', 'id':'\n",
    b"%p",
    b"null",
    b"{}",
    b"{ 'execute': true }",
    b"{ 'execute': 'no-such-cmd', 'arguments': [] }",
    b"{ 'execute': 'no-such-cmd', 'extra': true }",
    // ids on validation errors
    b"{ 'execute': 'no-such-cmd', 'extra': true, 'id': 3 }",
    b"{ 'execute': true, 'id': 'x' }",
    b"{ 'id': 'only-id' }",
    b"{ 'execute': 'no-such-cmd', 'arguments': 1, 'id': [1] }",
    // more lexical and syntax cases
    b"{'bad \x01}",
    b"[1, 2]",
    b"'just a string'",
    b"42 true",
    b"}",
    b"{'execute': 'x\xC3\x28'}",
    b"{'execute': 'no-such-cmd', 'id': '\\u0000'}",
    b"{'execute': 'no-such-cmd', 'id': '\\ud800'}",
    b"{'execute': 'no-such-cmd', 'id': 1, 'id': 2}",
    b"{'execute': 'no-such-cmd', 'id': -0.5e1}",
    b"{'execute': 'no-such-cmd', 'id': 18446744073709551615}",
    b"{'execute': 'no-such-cmd', 'id': 01}",
    b"{\"execute\": \"no-such-cmd\", \"id\": \"caf\xC3\xA9 \\u00e9 \\'\"}",
    b"{'exec-oob': 'no-such-cmd', 'id': 9}",
    b"{'execute': 'no-such-cmd'}{'execute': 'no-such-cmd', 'id': 2}",
    b"{'execute': 'qmp_capabilities', 'id': 'again'}",
    b"{'execute': 'getfd', 'arguments': {'fdname': 'nofd'}, 'id': 'g'}",
    b"{'execute': 'closefd', 'arguments': {'fdname': 'nofd'}, 'id': 'c'}",
    b"{'execute': 'query-name', 'id': {'nested': ['id']}}",
    b"{'execute': 'no-such-cmd', 'id': 18446744073709551616}",
    b"{'execute': 'no-such-cmd', 'id': '\\x'}",
    b"{'execute': 'no-such-cmd', 'id': '\\u12'}",
    b"{'execute': 'no-such-cmd', 'id': nul}",
    b"{'execute': 'no-such-cmd', 'id': 1.}",
    b"{'execute': 'no-such-cmd', 'id': -}",
    b"{'execute': 'no-such-cmd', 'id': 1e}",
    b"{\t'execute'\r: 'no-such-cmd', 'id':\t7}",
    b"]",
    b"{'a': 1}",
    b"{'execute': 'no-such-cmd', 'control': {}}",
    b"{'execute': 'no-such-cmd', 'arguments': null}",
    b"{'execute': 'query-name', 'arguments': {}, 'id': 'args'}",
    b"{'execute': 'no-such-cmd' 'id': 1}",
    b"{'execute': 'no-such-cmd',}",
    b"['execute', ]",
    b"{'execute': 'no-such-cmd', 'id': [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}",
    b"{'execute': 'no-such-cmd', 'id': 'tab\tin string'}",
    b"{'execute': 'no-such-cmd', 'id': '\x7f'}",
    b"{'execute': 'no-such-cmd', 'id': '\xed\xa0\x80'}",
    b"{'execute': 'no-such-cmd', 'id': '\xc0\x80'}",
    b"{'execute': 'no-such-cmd', 'id': '\xf4\x90\x80\x80'}",
    b"{'execute': 'no-such-cmd', 'id': '\xfe'}",
    b"{'execute': 'no-such-cmd', 'id': '\\udc00'}",
    b"{'execute': 'no-such-cmd', 'id': '\\ud800\\u0041'}",
    b"{'execute': 'no-such-cmd', 'id': '\\ud83d\\ude00 \\u00E9 \\/ \\b\\f\\n\\r\\t'}",
    b"{'execute': 'no-such-cmd', 'id': 'a\\''}",
];

#[test]
fn our_server_answers_raw_input_like_qemu() {
    let qemu = Qemu::start();
    let ours = test_server();
    let mut q = Raw::negotiated(&qemu.socket());
    let mut o = Raw::negotiated(&ours.path);
    let mut diffs = Vec::new();
    for input in INPUTS {
        let (want, got) = (responses(&mut q, input), responses(&mut o, input));
        if want != got {
            diffs.push(format!(
                "{:?}\n  qemu: {want:?}\n  ours: {got:?}",
                String::from_utf8_lossy(input)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "differences from QEMU:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn negotiation_mode_answers_like_qemu() {
    let qemu = Qemu::start();
    let ours = test_server();
    let mut q = Raw::connect(&qemu.socket());
    let mut o = Raw::connect(&ours.path);
    q.recv();
    o.recv();
    for input in [
        &b"{'execute': 'query-version', 'id': 1}"[..],
        b"{]",
        b"{'execute': 'qmp_capabilities', 'arguments': {'enable': ['no-such-cap']}, 'id': 2}",
        b"{'execute': 'qmp_capabilities', 'arguments': {'bogus': 1}, 'id': 3}",
    ] {
        assert_eq!(
            responses(&mut q, input),
            responses(&mut o, input),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn nesting_limit_behaves_like_qemu() {
    let qemu = Qemu::start();
    let ours = test_server();
    let mut q = Raw::negotiated(&qemu.socket());
    let mut o = Raw::negotiated(&ours.path);
    for depth in [1024, 1025] {
        let mut input = vec![b'['; depth];
        input.extend(std::iter::repeat_n(b']', depth));
        let (want, got) = (responses(&mut q, &input), responses(&mut o, &input));
        assert_eq!(want.len(), got.len(), "depth {depth}");
        assert_eq!(want, got, "depth {depth}");
    }
}

/// Whether `input` has an exponent of three or more digits (`1e999`).
fn huge_exponent(input: &[u8]) -> bool {
    input.iter().enumerate().any(|(i, &b)| {
        let mut rest = &input[i + 1..];
        if let [b'+' | b'-', tail @ ..] = rest {
            rest = tail;
        }
        matches!(b, b'e' | b'E') && rest.iter().take_while(|c| c.is_ascii_digit()).count() >= 3
    })
}

/// Deterministic mutations of [`INPUTS`] (byte flips, insertions,
/// deletions, splices), each followed by a control character that forces
/// both parsers back into a known state.
#[test]
fn mutated_inputs_are_answered_like_qemu() {
    let cases: usize = std::env::var("QMP_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let qemu = Qemu::start();
    let ours = test_server();
    let mut q = Raw::negotiated(&qemu.socket());
    let mut o = Raw::negotiated(&ours.path);
    let mut seed: u64 = 0x5eed_5eed_5eed_5eed;
    let mut next = move || {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    const BYTES: &[u8] =
        b"{}[]:,'\"\\ -0123456789.eEtrufalsn\x01\t\r\n\x7f\xc3\xa9\xc0\x80\xed\xff";
    let mut diffs = Vec::new();
    for _ in 0..cases {
        let mut input = INPUTS[next() as usize % INPUTS.len()].to_vec();
        for _ in 0..1 + next() % 4 {
            let pos = next() as usize % (input.len() + 1);
            let byte = BYTES[next() as usize % BYTES.len()];
            match next() % 4 {
                0 if pos < input.len() => input[pos] = byte,
                1 if pos < input.len() => {
                    input.remove(pos);
                }
                2 => {
                    let other = INPUTS[next() as usize % INPUTS.len()];
                    let cut = next() as usize % (other.len() + 1);
                    input.splice(pos..pos, other[..cut].iter().copied());
                }
                _ => input.insert(pos, byte),
            }
        }
        if huge_exponent(&input) {
            // QEMU echoes an overflowing double as `inf`, which is not JSON
            // (we answer a parse error instead): nothing to compare.
            continue;
        }
        input.extend_from_slice(b"\x01");
        let (want, got) = (responses(&mut q, &input), responses(&mut o, &input));
        if want != got {
            diffs.push(format!(
                "{:?}\n  qemu: {want:?}\n  ours: {got:?}",
                String::from_utf8_lossy(&input)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences from QEMU:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
