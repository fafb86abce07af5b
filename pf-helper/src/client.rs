//! The client side of the daemon protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::Error;
use crate::protocol::{Request, Response, MAX_LINE, PROTOCOL_VERSION};

/// How long the client waits for an answer (a 64-VF change with binds can take
/// tens of seconds on slow machines).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends one request to the daemon at `socket` and returns its `result`, or the
/// daemon's error as [`Error::Remote`].
pub fn request(socket: &Path, req: &Request) -> Result<serde_json::Value, Error> {
    let sock_err = |op: &'static str, source: std::io::Error| Error::Socket {
        path: socket.to_owned(),
        op,
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| sock_err("connect", e))?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and(stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(|e| sock_err("setting timeouts", e))?;
    let mut line = serde_json::to_vec(req).map_err(|e| Error::Protocol(e.to_string()))?;
    line.push(b'\n');
    // A daemon that refuses the peer answers and closes without reading: a
    // failed write is then not the interesting error, the answer is.
    let write_result = stream.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(&stream)
        .take(MAX_LINE * 64)
        .read_line(&mut answer);
    if answer.is_empty() {
        write_result.map_err(|e| sock_err("write", e))?;
        read.map_err(|e| sock_err("read", e))?;
        return Err(Error::Protocol(
            "the helper closed the connection without answering".into(),
        ));
    }
    let response: Response = serde_json::from_str(answer.trim_end())
        .map_err(|e| Error::Protocol(format!("invalid response: {e}")))?;
    if response.protocol != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "helper speaks protocol {}, this client {PROTOCOL_VERSION}",
            response.protocol
        )));
    }
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (false, _, Some(e)) => Err(Error::Remote {
            kind: e.kind,
            message: e.message,
        }),
        _ => Err(Error::Protocol(
            "response has neither result nor error".into(),
        )),
    }
}
