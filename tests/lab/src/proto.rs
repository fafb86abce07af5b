//! The line protocol between the host side of the lab and the agent in L1: one JSON object per
//! line, over a virtio-serial port (`svff.ctl`). The host sends [`Request`]s one at a time; the
//! agent answers with any number of [`Reply::Output`] chunks and one [`Reply::Exit`] or
//! [`Reply::Error`].

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent talks on.
pub const PORT_NAME: &str = "svff.ctl";

/// How often the agent sends [`Reply::Heartbeat`].
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// Run `argv` as root in L1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// Echoed in every reply.
    pub id: u64,
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Working directory; `/` when absent or missing in L1.
    pub cwd: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A message from the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    /// Sent every [`HEARTBEAT`] from a thread pinned to each CPU of L1, so the host can tell a
    /// stalled L1 (TCG can, rarely, stop one CPU's timer) from a command that is merely slow
    /// and silent.
    Heartbeat {
        /// The CPU the beat came from.
        cpu: u32,
    },
    /// Sent once when the agent is up.
    Ready {
        /// `uname -r` of L1.
        kernel: String,
    },
    /// A chunk of output (lossily decoded as UTF-8).
    Output {
        /// The request.
        id: u64,
        /// Which stream.
        stream: Stream,
        /// The text.
        data: String,
    },
    /// The command ended.
    Exit {
        /// The request.
        id: u64,
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// Signal number, when a signal killed it.
        signal: Option<i32>,
    },
    /// The command could not be started.
    Error {
        /// The request.
        id: u64,
        /// Why.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip_as_single_json_lines() {
        let r = Reply::Output {
            id: 7,
            stream: Stream::Stderr,
            data: "a\nb\"c".into(),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""type":"output""#), "{line}");
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), r);
    }
}
