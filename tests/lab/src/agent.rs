//! The agent: runs inside L1 (chrooted in the L0 root) and executes the host's requests.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;

use crate::proto::{Reply, Request, Stream, HEARTBEAT, PORT_NAME};
use crate::LabError;

/// PCI ids of the lab's PFs, exported to commands as `SVFF_LAB_<NAME>_PF=<BDF>`.
const PFS: &[(&str, &str, &str)] = &[("IGB", "0x8086", "0x10c9"), ("NVME", "0x1b36", "0x0010")];

fn find_port() -> Result<PathBuf, LabError> {
    let dir = Path::new("/sys/class/virtio-ports");
    let entries = fs::read_dir(dir).map_err(|e| LabError::io(dir, e))?;
    for e in entries.flatten() {
        let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(LabError::Vm(format!(
        "virtio-serial port {PORT_NAME} not found under {}",
        dir.display()
    )))
}

/// BDFs of the lab's PFs, found by vendor/device id (not by assumed bus numbers).
fn pf_env() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/bus/pci/devices") else {
        return out;
    };
    let mut devs: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    devs.sort();
    for (name, vendor, device) in PFS {
        let hit = devs.iter().find(|d| {
            fs::read_to_string(d.join("vendor")).is_ok_and(|v| v.trim() == *vendor)
                && fs::read_to_string(d.join("device")).is_ok_and(|v| v.trim() == *device)
        });
        if let Some(d) = hit {
            let bdf = d
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            out.push((format!("SVFF_LAB_{name}_PF"), bdf));
        }
    }
    out
}

fn send(tx: &mpsc::Sender<Reply>, r: Reply) {
    // The writer thread only goes away when the port is gone; nothing left to tell then.
    let _ = tx.send(r);
}

fn pump(mut from: impl Read, id: u64, stream: Stream, tx: mpsc::Sender<Reply>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                carry.extend_from_slice(&buf[..n]);
                // Keep an incomplete UTF-8 sequence at the end for the next chunk.
                let cut = match std::str::from_utf8(&carry) {
                    Ok(_) => carry.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => carry.len(),
                };
                let data = String::from_utf8_lossy(&carry[..cut]).into_owned();
                carry.drain(..cut);
                send(&tx, Reply::Output { id, stream, data });
            }
        }
    }
    if !carry.is_empty() {
        send(
            &tx,
            Reply::Output {
                id,
                stream,
                data: String::from_utf8_lossy(&carry).into_owned(),
            },
        );
    }
}

fn run_one(req: Request, base_env: &[(String, String)], tx: &mpsc::Sender<Reply>) {
    let id = req.id;
    let Some((prog, args)) = req.argv.split_first() else {
        send(
            tx,
            Reply::Error {
                id,
                message: "empty command".into(),
            },
        );
        return;
    };
    let cwd = req
        .cwd
        .filter(|c| Path::new(c).is_dir())
        .unwrap_or_else(|| "/".into());
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.envs(base_env.iter().cloned()).envs(req.env);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            send(
                tx,
                Reply::Error {
                    id,
                    message: format!("cannot start {prog}: {e}"),
                },
            );
            return;
        }
    };
    let pumps = [
        child.stdout.take().map(|o| {
            let tx = tx.clone();
            thread::spawn(move || pump(o, id, Stream::Stdout, tx))
        }),
        child.stderr.take().map(|o| {
            let tx = tx.clone();
            thread::spawn(move || pump(o, id, Stream::Stderr, tx))
        }),
    ];
    let status = child.wait();
    for p in pumps.into_iter().flatten() {
        let _ = p.join();
    }
    match status {
        Ok(s) => send(
            tx,
            Reply::Exit {
                id,
                code: s.code(),
                signal: s.signal(),
            },
        ),
        Err(e) => send(
            tx,
            Reply::Error {
                id,
                message: format!("waiting for {prog}: {e}"),
            },
        ),
    }
}

/// Pins the calling thread to `cpu` (best effort: unpinned beats still prove L1 is alive).
fn pin_to_cpu(cpu: u32) {
    // SAFETY: `set` is a plain bit set on our stack, zero-initialised (a valid empty cpu_set_t),
    // and sched_setaffinity reads exactly size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Serves requests on the control port until it closes. Runs in L1 as root.
pub fn serve() -> Result<(), LabError> {
    let port = find_port()?;
    let rx_file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(|e| LabError::io(&port, e))?;
    let mut tx_file = rx_file.try_clone().map_err(|e| LabError::io(&port, e))?;
    let (tx, rx) = mpsc::channel::<Reply>();
    let writer = thread::spawn(move || {
        for r in rx {
            let mut line = serde_json::to_vec(&r).expect("replies always serialize");
            line.push(b'\n');
            if tx_file
                .write_all(&line)
                .and_then(|()| tx_file.flush())
                .is_err()
            {
                break;
            }
        }
    });
    let me = std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe", e))?;
    let bin_dir = me.parent().unwrap_or(Path::new("/")).display().to_string();
    let mut base_env = vec![
        (
            "PATH".to_owned(),
            format!("{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ),
        ("SVFF_LAB".to_owned(), "1".to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
    ];
    base_env.extend(pf_env());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    send(&tx, Reply::Ready { kernel });
    // SAFETY: sysconf has no memory arguments.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u32;
    for cpu in 0..cpus {
        let beat = tx.clone();
        thread::spawn(move || {
            pin_to_cpu(cpu);
            while beat.send(Reply::Heartbeat { cpu }).is_ok() {
                thread::sleep(HEARTBEAT);
            }
        });
    }
    for line in BufReader::new(rx_file).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => run_one(req, &base_env, &tx),
            Err(e) => send(
                &tx,
                Reply::Error {
                    id: 0,
                    message: format!("bad request: {e}"),
                },
            ),
        }
    }
    drop(tx);
    let _ = writer.join();
    Ok(())
}
