//! `qapi/svff.json` against the crate's schema table and Rust types.
//!
//! QAPI schema files are not JSON: strings are single-quoted, `#` starts a
//! comment, and `##` blocks are doc comments. A small parser below reads
//! them; then every definition, member, optionality and type is compared
//! with `qmp_ext::svff::SCHEMA` both ways, and `SCHEMA` with the serde types
//! by round-tripping samples generated from it.

use std::collections::{BTreeMap, BTreeSet};

use qmp_ext::svff::{Definition, DefinitionKind, Member, TypeRef, SCHEMA, SCHEMA_JSON};
use serde_json::{json, Map, Value};

// ---- a small QAPI schema parser ------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Q {
    Str(String),
    Bool(bool),
    List(Vec<Q>),
    Dict(Vec<(String, Q)>),
}

impl Q {
    fn get(&self, key: &str) -> Option<&Q> {
        match self {
            Q::Dict(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn str(&self) -> &str {
        match self {
            Q::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
}

/// One top-level expression with the doc comment block just before it.
struct Expr {
    value: Q,
    doc: Option<Vec<String>>,
}

struct QapiParser<'a> {
    src: &'a [u8],
    pos: usize,
}

impl QapiParser<'_> {
    fn parse_file(text: &str) -> (Vec<Expr>, Vec<Vec<String>>) {
        let mut p = QapiParser {
            src: text.as_bytes(),
            pos: 0,
        };
        let mut exprs = Vec::new();
        let mut free_docs = Vec::new();
        let mut pending_doc: Option<Vec<String>> = None;
        loop {
            p.skip_ws();
            if p.pos >= p.src.len() {
                break;
            }
            if p.at_line_start() && p.src[p.pos..].starts_with(b"##\n") {
                if let Some(d) = pending_doc.take() {
                    free_docs.push(d);
                }
                pending_doc = Some(p.doc_block());
                continue;
            }
            if p.src[p.pos] == b'#' {
                p.skip_line();
                continue;
            }
            let value = p.value();
            exprs.push(Expr {
                value,
                doc: pending_doc.take(),
            });
        }
        if let Some(d) = pending_doc {
            free_docs.push(d);
        }
        (exprs, free_docs)
    }

    fn at_line_start(&self) -> bool {
        self.pos == 0 || self.src[self.pos - 1] == b'\n'
    }

    fn skip_ws(&mut self) {
        while self.pos < self.src.len() && self.src[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn skip_line(&mut self) {
        while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
            self.pos += 1;
        }
    }

    /// Reads `##` ... `##`, returning the lines between, without `# `.
    fn doc_block(&mut self) -> Vec<String> {
        self.skip_line();
        let mut lines = Vec::new();
        loop {
            self.pos += 1;
            let start = self.pos;
            self.skip_line();
            let line = std::str::from_utf8(&self.src[start..self.pos]).expect("utf-8");
            if line == "##" {
                return lines;
            }
            assert!(
                line == "#" || line.starts_with("# "),
                "doc comment line must start with '# ': {line:?}"
            );
            lines.push(
                line.trim_start_matches('#')
                    .strip_prefix(' ')
                    .unwrap_or("")
                    .to_string(),
            );
            assert!(self.pos < self.src.len(), "unterminated doc comment");
        }
    }

    /// Skips whitespace and (non-doc) comments inside an expression.
    fn skip_ws_comments(&mut self) {
        loop {
            self.skip_ws();
            if self.pos < self.src.len() && self.src[self.pos] == b'#' {
                self.skip_line();
            } else {
                return;
            }
        }
    }

    fn expect(&mut self, c: u8) {
        self.skip_ws_comments();
        assert_eq!(
            self.src.get(self.pos),
            Some(&c),
            "expected '{}' at byte {}",
            c as char,
            self.pos
        );
        self.pos += 1;
    }

    fn value(&mut self) -> Q {
        self.skip_ws_comments();
        match self.src[self.pos] {
            b'{' => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_ws_comments();
                if self.src[self.pos] == b'}' {
                    self.pos += 1;
                    return Q::Dict(items);
                }
                loop {
                    let key = match self.value() {
                        Q::Str(s) => s,
                        other => panic!("dict key must be a string: {other:?}"),
                    };
                    self.expect(b':');
                    let v = self.value();
                    assert!(
                        items.iter().all(|(k, _)| *k != key),
                        "duplicate key '{key}'"
                    );
                    items.push((key, v));
                    self.skip_ws_comments();
                    match self.src[self.pos] {
                        b',' => self.pos += 1,
                        b'}' => {
                            self.pos += 1;
                            return Q::Dict(items);
                        }
                        c => panic!("expected ',' or '}}', got '{}'", c as char),
                    }
                }
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_ws_comments();
                if self.src[self.pos] == b']' {
                    self.pos += 1;
                    return Q::List(items);
                }
                loop {
                    items.push(self.value());
                    self.skip_ws_comments();
                    match self.src[self.pos] {
                        b',' => self.pos += 1,
                        b']' => {
                            self.pos += 1;
                            return Q::List(items);
                        }
                        c => panic!("expected ',' or ']', got '{}'", c as char),
                    }
                }
            }
            b'\'' => {
                self.pos += 1;
                let start = self.pos;
                while self.src[self.pos] != b'\'' {
                    assert_ne!(
                        self.src[self.pos], b'\\',
                        "QAPI strings here need no escapes"
                    );
                    assert_ne!(self.src[self.pos], b'\n', "unterminated string");
                    self.pos += 1;
                }
                let s = std::str::from_utf8(&self.src[start..self.pos])
                    .expect("utf-8")
                    .to_string();
                self.pos += 1;
                Q::Str(s)
            }
            _ if self.src[self.pos..].starts_with(b"true") => {
                self.pos += 4;
                Q::Bool(true)
            }
            _ if self.src[self.pos..].starts_with(b"false") => {
                self.pos += 5;
                Q::Bool(false)
            }
            c => panic!("unexpected '{}' at byte {}", c as char, self.pos),
        }
    }
}

// ---- the schema file as a model -------------------------------------------

#[derive(Debug, PartialEq, Eq, Clone)]
enum Ty {
    Named(String),
    List(String),
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct Mem {
    name: String,
    ty: Ty,
    optional: bool,
}

#[derive(Debug, PartialEq, Eq, Clone)]
enum Kind {
    Enum(Vec<String>),
    Struct(Vec<Mem>),
    Command { data: Vec<Mem>, returns: Option<Ty> },
    Event(Vec<Mem>),
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct Def {
    kind: Kind,
    features: Vec<String>,
}

fn ty_of(q: &Q) -> Ty {
    match q {
        Q::Str(s) => Ty::Named(s.clone()),
        Q::List(l) if l.len() == 1 => Ty::List(l[0].str().to_string()),
        other => panic!("not a type: {other:?}"),
    }
}

fn members_of(q: Option<&Q>) -> Vec<Mem> {
    match q {
        None => Vec::new(),
        Some(Q::Dict(items)) => items
            .iter()
            .map(|(k, v)| {
                let (name, optional) = match k.strip_prefix('*') {
                    Some(n) => (n.to_string(), true),
                    None => (k.clone(), false),
                };
                Mem {
                    name,
                    ty: ty_of(v),
                    optional,
                }
            })
            .collect(),
        Some(other) => panic!("members must be a dict: {other:?}"),
    }
}

/// Definitions by name, each with its doc comment lines.
type Defs = BTreeMap<String, (Def, Vec<String>)>;

fn parse_schema() -> (Defs, Vec<Vec<String>>) {
    let (exprs, free_docs) = QapiParser::parse_file(SCHEMA_JSON);
    let mut defs = BTreeMap::new();
    for e in exprs {
        let Q::Dict(items) = &e.value else {
            panic!("top-level expression must be a dict")
        };
        let (meta, name) = (&items[0].0, items[0].1.str().to_string());
        let allowed: &[&str] = match meta.as_str() {
            "enum" => &["enum", "data", "features"],
            "struct" => &["struct", "data", "features"],
            "command" => &["command", "data", "returns", "features"],
            "event" => &["event", "data", "features"],
            other => panic!("unsupported meta-type '{other}'"),
        };
        for (k, _) in items {
            assert!(
                allowed.contains(&k.as_str()),
                "{name}: unexpected key '{k}'"
            );
        }
        let kind = match meta.as_str() {
            "enum" => match e.value.get("data") {
                Some(Q::List(vals)) => {
                    Kind::Enum(vals.iter().map(|v| v.str().to_string()).collect())
                }
                other => panic!("{name}: enum data must be a list: {other:?}"),
            },
            "struct" => Kind::Struct(members_of(e.value.get("data"))),
            "command" => Kind::Command {
                data: members_of(e.value.get("data")),
                returns: e.value.get("returns").map(ty_of),
            },
            _ => Kind::Event(members_of(e.value.get("data"))),
        };
        let features = match e.value.get("features") {
            None => Vec::new(),
            Some(Q::List(f)) => f.iter().map(|v| v.str().to_string()).collect(),
            Some(other) => panic!("{name}: features must be a list: {other:?}"),
        };
        let doc = e.doc.unwrap_or_else(|| panic!("{name}: no doc comment"));
        assert!(
            defs.insert(name.clone(), (Def { kind, features }, doc))
                .is_none(),
            "{name} defined twice"
        );
    }
    (defs, free_docs)
}

fn from_table(d: &Definition) -> Def {
    let ty = |t: &TypeRef| match *t {
        TypeRef::Named(n) => Ty::Named(n.into()),
        TypeRef::List(n) => Ty::List(n.into()),
    };
    let mems = |ms: &[Member]| -> Vec<Mem> {
        ms.iter()
            .map(|m| Mem {
                name: m.name.into(),
                ty: ty(&m.ty),
                optional: m.optional,
            })
            .collect()
    };
    let kind = match d.kind {
        DefinitionKind::Enum(v) => Kind::Enum(v.iter().map(|s| s.to_string()).collect()),
        DefinitionKind::Struct(ms) => Kind::Struct(mems(ms)),
        DefinitionKind::Command { data, returns } => Kind::Command {
            data: mems(data),
            returns: returns.as_ref().map(ty),
        },
        DefinitionKind::Event(ms) => Kind::Event(mems(ms)),
    };
    Def {
        kind,
        features: d.features.iter().map(|s| s.to_string()).collect(),
    }
}

// ---- tests ----------------------------------------------------------------

#[test]
fn schema_file_and_rust_table_define_the_same_things() {
    let (file, _) = parse_schema();
    let table: BTreeMap<String, Def> = SCHEMA
        .iter()
        .map(|d| (d.name.to_string(), from_table(d)))
        .collect();
    assert_eq!(table.len(), SCHEMA.len(), "a name appears twice in SCHEMA");
    let file_names: BTreeSet<&String> = file.keys().collect();
    let table_names: BTreeSet<&String> = table.keys().collect();
    assert_eq!(
        file_names, table_names,
        "definitions in svff.json vs svff::SCHEMA"
    );
    for (name, (def, _)) in &file {
        assert_eq!(
            def, &table[name],
            "{name}: svff.json (left) vs svff::SCHEMA (right)"
        );
    }
}

#[test]
fn schema_file_has_the_issue_s_command_set() {
    let (file, _) = parse_schema();
    for name in [
        "svff-vfio-pause",
        "svff-vfio-unpause",
        "query-svff-vfio",
        "SVFF_VFIO_STATE_CHANGED",
    ] {
        let (def, _) = file.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(def.features, ["unstable"], "{name} is unstable");
    }
}

#[test]
fn every_type_the_schema_references_is_defined_or_built_in() {
    let (file, _) = parse_schema();
    let builtin = ["str", "uint64", "int", "bool"];
    let check = |t: &Ty, ctx: &str| {
        let (Ty::Named(n) | Ty::List(n)) = t;
        let ok = builtin.contains(&n.as_str())
            || matches!(
                file.get(n),
                Some((
                    Def {
                        kind: Kind::Enum(_) | Kind::Struct(_),
                        ..
                    },
                    _
                ))
            );
        assert!(ok, "{ctx}: type '{n}' is not defined");
    };
    for (name, (def, _)) in &file {
        match &def.kind {
            Kind::Enum(_) => {}
            Kind::Struct(ms) | Kind::Event(ms) => ms.iter().for_each(|m| check(&m.ty, name)),
            Kind::Command { data, returns } => {
                data.iter().for_each(|m| check(&m.ty, name));
                if let Some(r) = returns {
                    check(r, name);
                    // QEMU's 'command-returns-exceptions' pragma: a command
                    // returns an object or a list of objects.
                    let (Ty::Named(n) | Ty::List(n)) = r;
                    assert!(
                        matches!(file[n].0.kind, Kind::Struct(_)),
                        "{name} must return a struct (list)"
                    );
                }
            }
        }
    }
}

#[test]
fn schema_follows_qapi_code_gen_naming_and_doc_rules() {
    let (file, free_docs) = parse_schema();
    assert!(
        free_docs
            .iter()
            .any(|d| d.first().is_some_and(|l| l.starts_with("= "))),
        "a section heading doc block"
    );
    let lower = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    for (name, (def, doc)) in &file {
        assert_eq!(
            doc.first().map(String::as_str),
            Some(format!("@{name}:").as_str()),
            "{name}: doc must start with @{name}:"
        );
        let text = doc.join("\n");
        let documented = |what: &str| doc.iter().any(|l| l.starts_with(&format!("@{what}: ")));
        match &def.kind {
            Kind::Enum(vals) => {
                assert!(
                    name.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                    "{name}: type names are CamelCase"
                );
                for v in vals {
                    assert!(lower(v), "{name}: enum value '{v}' must be lower-case");
                    assert!(documented(v), "{name}: value '{v}' undocumented");
                }
            }
            Kind::Struct(ms) | Kind::Event(ms) | Kind::Command { data: ms, .. } => {
                match &def.kind {
                    Kind::Struct(_) => assert!(
                        name.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                        "{name}: CamelCase"
                    ),
                    Kind::Event(_) => assert!(
                        name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                        "{name}: ALL_CAPS"
                    ),
                    _ => assert!(lower(name), "{name}: commands are lower-case"),
                }
                for m in ms {
                    assert!(
                        lower(&m.name),
                        "{name}: member '{}' must be lower-case",
                        m.name
                    );
                    assert!(
                        documented(&m.name),
                        "{name}: member '{}' undocumented",
                        m.name
                    );
                }
            }
        }
        // Every @name: line documents something that exists.
        for l in doc.iter().skip(1) {
            if let Some(rest) = l.strip_prefix('@') {
                let what = rest.split(':').next().unwrap_or_default();
                let exists = match &def.kind {
                    Kind::Enum(v) => v.iter().any(|x| x == what),
                    Kind::Struct(ms) | Kind::Event(ms) | Kind::Command { data: ms, .. } => {
                        ms.iter().any(|m| m.name == what)
                    }
                } || def.features.iter().any(|f| f == what);
                assert!(exists, "{name}: documents '@{what}', which does not exist");
            }
        }
        if !def.features.is_empty() {
            let feat_at = doc
                .iter()
                .position(|l| l == "Features:")
                .unwrap_or_else(|| panic!("{name}: no Features: section"));
            for f in &def.features {
                assert!(
                    doc[feat_at..]
                        .iter()
                        .any(|l| l.starts_with(&format!("@{f}: "))),
                    "{name}: feature '{f}' undocumented"
                );
            }
        }
        if let Kind::Command {
            returns: Some(_), ..
        } = def.kind
        {
            assert!(
                doc.iter().any(|l| l.starts_with("Returns: ")),
                "{name}: no Returns: section"
            );
        }
        assert!(
            doc.iter().any(|l| l.starts_with("Since: ")),
            "{name}: no Since: section\n{text}"
        );
    }
}

// ---- SCHEMA against the serde types ---------------------------------------

fn lookup(name: &str) -> &'static Definition {
    SCHEMA
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("{name} not in SCHEMA"))
}

/// A valid value of `ty`; with `full`, optional members are present.
fn sample(ty: &TypeRef, full: bool) -> Value {
    match *ty {
        TypeRef::List(n) => json!([sample(&TypeRef::Named(n), full)]),
        TypeRef::Named("str") => json!("text"),
        TypeRef::Named("uint64") => json!(u64::MAX),
        TypeRef::Named("int") => json!(-5),
        TypeRef::Named("bool") => json!(true),
        TypeRef::Named(n) => match lookup(n).kind {
            DefinitionKind::Enum(vals) => json!(vals[vals.len() - 1]),
            DefinitionKind::Struct(ms) => object(ms, full),
            _ => panic!("{n} is not a type"),
        },
    }
}

/// A value of the wrong JSON type for `ty`.
fn wrong(ty: &TypeRef) -> Value {
    match *ty {
        TypeRef::List(_) => json!({}),
        TypeRef::Named("str") => json!(17),
        TypeRef::Named("uint64") => json!(-1),
        TypeRef::Named(n) => match lookup(n).kind {
            DefinitionKind::Enum(_) => json!("no-such-value"),
            _ => json!("not-an-object"),
        },
    }
}

fn object(ms: &[Member], full: bool) -> Value {
    let mut o = Map::new();
    for m in ms.iter().filter(|m| full || !m.optional) {
        o.insert(m.name.into(), sample(&m.ty, full));
    }
    Value::Object(o)
}

fn check_members(name: &str, rt: fn(Value) -> Result<Value, String>, ms: &[Member]) {
    for full in [true, false] {
        let v = object(ms, full);
        assert_eq!(rt(v.clone()), Ok(v.clone()), "{name}: round trip of {v}");
    }
    let full = object(ms, true);
    for m in ms {
        let mut v = full.clone();
        if !m.optional {
            v.as_object_mut().expect("object").remove(m.name);
            assert!(
                rt(v.clone()).is_err(),
                "{name}: '{}' is required in the schema but not in Rust",
                m.name
            );
        }
        let mut v = full.clone();
        v[m.name] = wrong(&m.ty);
        assert!(
            rt(v.clone()).is_err(),
            "{name}: '{}' accepts a wrongly typed {}",
            m.name,
            v[m.name]
        );
    }
    let mut v = full.clone();
    v["no-such-member"] = json!(1);
    assert!(rt(v).is_err(), "{name}: unknown members must be rejected");
}

#[test]
fn rust_types_match_the_schema_table() {
    for d in SCHEMA {
        match d.kind {
            DefinitionKind::Enum(vals) => {
                for v in vals {
                    assert_eq!(
                        (d.roundtrip)(json!(v)),
                        Ok(json!(v)),
                        "{}: value {v}",
                        d.name
                    );
                }
                assert!((d.roundtrip)(json!("no-such-value")).is_err());
            }
            DefinitionKind::Struct(ms) | DefinitionKind::Event(ms) => {
                check_members(d.name, d.roundtrip, ms)
            }
            DefinitionKind::Command { data, returns } => {
                check_members(d.name, d.roundtrip, data);
                let rt = d
                    .roundtrip_returns
                    .unwrap_or_else(|| panic!("{}: no return round trip", d.name));
                let r = returns
                    .unwrap_or_else(|| panic!("{}: commands here all return something", d.name));
                for full in [true, false] {
                    let v = sample(&r, full);
                    assert_eq!(rt(v.clone()), Ok(v.clone()), "{}: return value {v}", d.name);
                }
                assert!(
                    rt(wrong(&r)).is_err(),
                    "{}: return type accepts a wrong type",
                    d.name
                );
            }
        }
    }
}

#[test]
fn rust_enums_have_no_variants_beyond_the_schema() {
    use qmp_ext::svff::{SvffVfioPausePolicy as P, SvffVfioState as S};
    // Exhaustive matches: adding a Rust variant breaks the build here.
    let state_name = |s: S| match s {
        S::Attached | S::Pausing | S::Paused | S::Unpausing | S::Detached => {
            serde_json::to_value(s).expect("enum")
        }
    };
    let policy_name = |p: P| match p {
        P::Ignore | P::Stall => serde_json::to_value(p).expect("enum"),
    };
    let states: Vec<Value> = [
        S::Attached,
        S::Pausing,
        S::Paused,
        S::Unpausing,
        S::Detached,
    ]
    .into_iter()
    .map(state_name)
    .collect();
    let policies: Vec<Value> = [P::Ignore, P::Stall].into_iter().map(policy_name).collect();
    for (name, got) in [("SvffVfioState", states), ("SvffVfioPausePolicy", policies)] {
        let DefinitionKind::Enum(vals) = lookup(name).kind else {
            panic!("{name} is an enum")
        };
        assert_eq!(
            got,
            vals.iter().map(|v| json!(v)).collect::<Vec<_>>(),
            "{name}"
        );
    }
}

/// The QMP enums are svff-types' states, policies and phase names: one set
/// for vfio-pause, qmp-ext and the helper.
#[test]
fn qmp_states_policies_and_phase_names_are_the_svff_types_ones() {
    let values = |name: &str| -> Vec<&'static str> {
        match lookup(name).kind {
            DefinitionKind::Enum(vals) => vals.to_vec(),
            _ => panic!("{name} is an enum"),
        }
    };
    let states: Vec<&str> = svff_types::DeviceState::ALL
        .into_iter()
        .map(|s| s.name())
        .collect();
    assert_eq!(values("SvffVfioState"), states);
    let policies: Vec<&str> = [
        svff_types::PausePolicy::Ignore,
        svff_types::PausePolicy::Stall,
    ]
    .into_iter()
    .map(|p| p.name())
    .collect();
    assert_eq!(values("SvffVfioPausePolicy"), policies);
    let phases: Vec<&str> = svff_types::Phase::ALL
        .into_iter()
        .map(|p| p.name())
        .collect();
    assert_eq!(values("SvffVfioPhaseName"), phases);
}

/// `ignore` is the default pause policy everywhere: in svff-types, in the
/// Rust arguments type and in the schema's documentation; a stall must never
/// be what a VMM gets without asking.
#[test]
fn ignore_is_the_documented_and_effective_default_policy() {
    let doc = qmp_ext::svff::SCHEMA_JSON
        .split("# @svff-vfio-pause:")
        .nth(1)
        .and_then(|d| d.split("##").next())
        .expect("svff-vfio-pause doc block");
    let policy = doc
        .split("# @policy:")
        .nth(1)
        .and_then(|d| d.split("\n#\n").next())
        .expect("@policy doc");
    assert!(policy.contains("default: ignore"), "{policy}");
    assert!(!policy.contains("default: stall"), "{policy}");
    assert_eq!(
        svff_types::PausePolicy::default(),
        svff_types::PausePolicy::Ignore
    );
}

/// QEMU's own QAPI generator (with QEMU's pragmas, so every doc rule is
/// enforced) accepts the schema file unchanged. Needs a QEMU source tree.
#[test]
#[ignore = "needs a QEMU source tree: SVFF_QEMU_SRC=/path/to/qemu-10.0.2 cargo test -p qmp-ext --test schema -- --ignored"]
fn qemu_qapi_gen_accepts_the_schema() {
    let src = std::path::PathBuf::from(
        std::env::var("SVFF_QEMU_SRC").expect("SVFF_QEMU_SRC names a QEMU source tree"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("qapi/svff.json");
    let top = dir.path().join("schema.json");
    let include = |p: &std::path::Path| format!("{{ 'include': '{}' }}\n", p.display());
    std::fs::write(
        &top,
        include(&src.join("qapi/pragma.json")) + &include(&schema),
    )
    .expect("write");
    let out = std::process::Command::new("python3")
        .arg(src.join("scripts/qapi-gen.py"))
        .arg("-o")
        .arg(dir.path().join("out"))
        .args(["-p", "svff-"])
        .arg(&top)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "qapi-gen rejected svff.json:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let commands = std::fs::read_to_string(dir.path().join("out/svff-qapi-init-commands.c"))
        .expect("generated C");
    for c in ["svff-vfio-pause", "svff-vfio-unpause", "query-svff-vfio"] {
        assert!(commands.contains(&format!("\"{c}\"")), "{c} registered");
    }
}
