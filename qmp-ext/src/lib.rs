//! QMP (QEMU Machine Protocol) for svff: a server for VMMs, a client for the
//! helper, SCM_RIGHTS descriptor passing, and the svff command set.
//!
//! # Protocol
//!
//! Behaviour follows QEMU's `docs/interop/qmp-spec.rst`:
//!
//! - the [`Server`] greets every client with `{"QMP": {"version", "capabilities"}}`
//!   (no capabilities: out-of-band execution is not offered), stays in
//!   capabilities-negotiation mode (every command but `qmp_capabilities`
//!   answers `CommandNotFound`) until `qmp_capabilities` succeeds, and only
//!   then delivers events;
//! - input is parsed as QEMU parses it ([`JsonStream`]): no framing needed,
//!   single-quoted strings accepted, a lexical error (a control character,
//!   bytes 0xFE/0xFF) is answered with a `GenericError` and the parser
//!   resynchronises, so the connection stays usable (`tests/differential.rs`
//!   compares it with QEMU 10, response for response);
//! - `id` is echoed on success and on error, whatever JSON value it is;
//! - descriptors passed with SCM_RIGHTS are claimed by `getfd {fdname}` and
//!   released by `closefd`; a [`Handler`] takes them with [`Session::take_fd`];
//! - events carry `{"seconds", "microseconds"}` timestamps and go to every
//!   negotiated client ([`EventSink`]); several clients are served at once,
//!   one thread each.
//!
//! The [`Client`] connects, negotiates, matches responses to commands by
//! `id` (dropping responses it does not know), queues events and waits for
//! them with a deadline, and passes descriptors with SCM_RIGHTS. It works
//! against real QEMU as well as against [`Server`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use qmp_ext::{Client, Handler, QmpError, Server, ServerConfig, Session};
//! use serde_json::{json, Map, Value};
//!
//! struct Vmm;
//! impl Handler for Vmm {
//!     fn execute(&self, _: &mut Session, cmd: &str, _: Map<String, Value>) -> Result<Value, QmpError> {
//!         match cmd {
//!             "query-status" => Ok(json!({"status": "running", "running": true})),
//!             _ => Err(QmpError::command_not_found(cmd)),
//!         }
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("qmp.sock");
//! let _server = Server::bind(&path, ServerConfig::default(), Vmm)?;
//! let mut client = Client::connect(&path, Duration::from_secs(5))?;
//! assert_eq!(client.execute("query-status", None)?["running"], true);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Descriptors: the server queues descriptors that arrive with SCM_RIGHTS
//! (at most 16, oldest closed first) and each `getfd` claims the oldest, so
//! a client sends each descriptor together with its `getfd` command, as
//! [`Client::send_fd`] does. Named descriptors belong to the connection and
//! are closed when it ends.
//!
//! # Crates considered
//!
//! - `qapi` 0.15 / `qapi-qmp` 0.15 (arcnmx/qapi-rs, MIT, marked passively
//!   maintained): a client only, no server and no SCM_RIGHTS descriptor
//!   passing (which `getfd` and svff's unpause need). Its sync client pulls
//!   in `log`; its async client needs tokio. `qapi-qmp` generates types for
//!   QEMU 9.1's whole schema (≈720 KB of QAPI JSON) in a build script through
//!   `qapi-codegen`, a heavy build on our 2 cores for the handful of standard
//!   commands we use (`query-status`, `stop`, `getfd`, `device_del`, ...),
//!   which are easy to call untyped with [`Client::execute`]. Not used.
//! - `qapi`'s `async-tokio` client: an async runtime is out of place in a
//!   lean threaded VMM and in the helper. Not used.
//!
//! What is used: `serde`/`serde_json` for values, `nix` (`socket`, `uio`)
//! for `sendmsg`/`recvmsg`, `thiserror` for [`Error`].
//!
//! # svff commands
//!
//! The svff command set is defined once in `qmp-ext/qapi/svff.json` (a QAPI
//! schema that QEMU's generator accepts); the [`svff`] module holds the
//! matching Rust types, and a test checks the two against each other.

mod client;
mod error;
mod fdpass;
mod json;
mod server;
pub mod svff;
mod wire;

pub use client::Client;
pub use error::Error;
pub use json::JsonStream;
pub use server::{EventSink, Handler, Server, ServerConfig, Session};
pub use wire::{
    decode_arguments, ErrorClass, Event, Greeting, GreetingBody, QmpCommand, QmpError, QmpEvent,
    Timestamp, VersionInfo, VersionTriple,
};
