//! Lab test of VMs of kind `libvirt` (feature `libvirt`): Debian's libvirtd
//! runs in L1 with svff's patched QEMU as the domain's emulator, and svff
//! drives the domain through the libvirt API: `svff init` puts the VF in the
//! domain's persistent config as a `managed='no'` hostdev, the domain starts
//! with it as `svff-vfio-pci,recover=aer` (a `<qemu:override>` of the
//! alias's properties), `svff reconf --mode pause` (with `--direct` and
//! through the `svff helper` daemon) pauses it through libvirt's monitor
//! passthrough with the re-created VF's group fd passed, `--mode detach`
//! detaches and attaches it through libvirt; `svff bench --vmm libvirt
//! --mode pause` measures on the same domain. The guest's own view (its
//! dmesg, sysfs and its nvme driver's I/O, over the L2 command channel)
//! tells an unplug from a pause and a recovered driver from a dead one.
//!
//! libvirtd needs writable `/etc/libvirt`, `/var/lib/libvirt`,
//! `/var/cache/libvirt`, `/var/log/libvirt` and a `libvirt-qemu` user: L1's
//! root is L0's, read-only, so libvirtd runs in a private mount namespace
//! (rooted as [`libvirtd_ns_command`] says, so that libvirt's own mount
//! namespace for QEMU works) with tmpfs over those and an
//! `/etc/passwd`/`/etc/group` copy with the user added
//! ([`Libvirtd::start`]); `/run` is L1's shared tmpfs, so its socket is
//! visible to the test. The nvme PF on svff's nvme profile gives the VFs
//! (online secondary controllers with 2 VQ / 1 VI each: under pci-pf-stub
//! a VF stays offline and the guest's nvme driver cannot bring it up).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use svff_lab::guest::{self, dev_path, set_numvfs, unbind, vfs_of};
use svff_lab::l2::{self, BootSpec, Control, Image, L2};

const SVFF: &str = env!("CARGO_BIN_EXE_svff");
const CALL_TIMEOUT_S: &str = "600";
const CMD: Duration = Duration::from_secs(90);
const DOMAIN: &str = "svff-lab-l2";
const URI: &str = "qemu:///system";
/// Fixed paths the domain XML names; the L2 boot links them to its session's files.
const LINKS: &str = "/run/svff-lab-libvirt";

/// The patched QEMU `make qemu` published (as qemu-fork/tests-lab finds it).
fn patched_qemu() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/svff-qemu/qemu-system-x86_64");
    assert!(
        p.is_file(),
        "{}: run `make qemu` on the host first",
        p.display()
    );
    p.canonicalize().unwrap()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn virsh(args: &[&str]) -> Output {
    run(Command::new("timeout")
        .args(["120", "virsh", "-c", URI])
        .args(args))
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(out.status.success(), "virsh {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn svff(args: &[&str]) -> Output {
    run(Command::new("timeout")
        .arg(CALL_TIMEOUT_S)
        .arg(SVFF)
        .args(args))
}

fn ok_json(args: &[&str]) -> Value {
    let out = svff(args);
    assert!(out.status.success(), "svff {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("svff printed JSON")
}

fn fails_with(args: &[&str], wanted: &[&str]) {
    let out = svff(args);
    assert_eq!(out.status.code(), Some(1), "svff {args:?} must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    for w in wanted {
        assert!(err.contains(w), "svff {args:?}: stderr lacks {w:?}: {err}");
    }
}

fn numvfs(pf: &str) -> u32 {
    guest::read_attr(dev_path(pf).join("sriov_numvfs"))
        .parse()
        .unwrap()
}

fn release(pf: &str) {
    for vf in vfs_of(pf) {
        unbind(&vf);
    }
    if guest::driver_of(pf).is_some() {
        set_numvfs(pf, 0);
    }
    unbind(pf);
}

/// The command that runs `script` (libvirtd's start) with bash in a private
/// mount namespace whose *root mount* is the root this test runs in.
///
/// L1 runs the test chrooted into the L0 root (a directory of the initramfs).
/// libvirt builds QEMU's private `/dev` by `setns()` into QEMU's mount
/// namespace from a forked helper, and `setns()` sets the caller's root to the
/// namespace's root mount: in a chroot that is the initramfs, not the chroot,
/// so the nodes (`/dev/kvm`, `/dev/vfio/*`) were made in the initramfs's
/// `/dev` and QEMU's `/dev` stayed empty ("-accel kvm: Could not access KVM
/// kernel module"; the earlier lab ran QEMU with `namespaces = []`). So the
/// chroot's directory is moved onto `/` in the new namespace and entered
/// there, as `switch_root` does (pivot_root refuses the initramfs): every
/// `setns()` into it, or into a namespace copied from it, lands in the same
/// root. Outside a chroot, a plain `unshare -m`.
fn libvirtd_ns_command(script: &Path) -> Command {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let root = id(Path::new("/"));
    let outer = Path::new("/proc/1/root");
    if id(outer) == root {
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "bash"])
            .arg(script);
        return c;
    }
    // The initramfs directory that is our root (/host in the lab; /l0 is
    // another view of the same file system without the tmpfs mounts, so the
    // script's directory must match too).
    let sdir = script.parent().unwrap();
    let rel = sdir.strip_prefix("/").unwrap();
    let dir = fs::read_dir(outer)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| id(&outer.join(n)) == root && id(&outer.join(n).join(rel)) == id(sdir))
        .expect("the chroot's directory among /proc/1/root's");
    let mut c = Command::new("chroot");
    c.arg(outer).args([
        "/bin/busybox",
        "unshare",
        "-m",
        "--propagation",
        "private",
        "/bin/busybox",
        "sh",
        "-c",
        &format!(
            "cd /{dir} && /bin/busybox mount -o move /{dir} / && exec /bin/busybox chroot . /bin/bash {}",
            script.display()
        ),
    ]);
    c
}

/// libvirtd in a private mount namespace (see the module doc); killed on drop.
struct Libvirtd {
    child: Option<Child>,
    log: PathBuf,
}

impl Libvirtd {
    fn start(dir: &Path) -> Libvirtd {
        let script = dir.join("libvirtd.sh");
        let log = dir.join("libvirtd.log");
        fs::write(
            &script,
            r#"set -e
for d in /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
    mount -t tmpfs -o mode=0755 tmpfs "$d"
done
mkdir -p /etc/libvirt/qemu /var/lib/libvirt/qemu /var/log/libvirt/qemu /run/libvirt
# libvirtd resolves its built-in default user before reading qemu.conf.
priv=$(mktemp -d /run/svff-libvirt.XXXXXX)
cp /etc/passwd /etc/group "$priv/"
grep -q '^libvirt-qemu:' /etc/passwd || echo 'libvirt-qemu:x:64055:64055:libvirt (svff lab):/var/lib/libvirt:/usr/sbin/nologin' >> "$priv/passwd"
grep -q '^libvirt-qemu:' /etc/group || echo 'libvirt-qemu:x:64055:' >> "$priv/group"
mount --bind "$priv/passwd" /etc/passwd
mount --bind "$priv/group" /etc/group
# Only the domain's <emulator> is probed (no default emulator at start-up).
for b in /usr/bin/qemu-system-*; do mount --bind /dev/null "$b"; done
cat > /etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
EOF
echo 'log_outputs = "3:stderr"' > /etc/libvirt/libvirtd.conf
exec libvirtd
"#,
        )
        .unwrap();
        let _ = fs::remove_file("/run/libvirt/libvirt-sock");
        let child = libvirtd_ns_command(&script)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start libvirtd");
        let mut d = Libvirtd {
            child: Some(child),
            log,
        };
        // Bounded wait for the daemon to answer (its QEMU driver probes nothing yet).
        let end = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("libvirtd exited ({st}): {}", d.log_text());
            }
            let ok = Command::new("timeout")
                .args(["60", "virsh", "-q", "-c", URI, "uri"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return d;
            }
            assert!(
                Instant::now() < end,
                "libvirtd did not answer: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The domain's QEMU log (in libvirtd's mount namespace).
    fn qemu_log(&self) -> String {
        let Some(c) = self.child.as_ref() else {
            return String::new();
        };
        let out = Command::new("nsenter")
            .args(["-t", &c.id().to_string(), "-m", "cat"])
            .arg(format!("/var/log/libvirt/qemu/{DOMAIN}.log"))
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("libvirtd runs").id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file("/run/libvirt/libvirt-sock");
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Destroys and undefines the test domain on drop (also when the test
/// fails half-way), so that no QEMU keeps a VF of the PF open.
struct DomainGuard;

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", DOMAIN]);
        let _ = virsh(&["undefine", DOMAIN]);
        if let Ok(pid) = fs::read_to_string(format!("/run/libvirt/qemu/{DOMAIN}.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                kill9(pid);
            }
        }
    }
}

/// SIGKILL to `pid` (the domain's QEMU, if libvirtd could not destroy it).
fn kill9(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// The domain's kernel command line: what [`L2::boot`] gives a VMM with a
/// virtio control port (checked in [`Start::command`]).
fn guest_cmdline() -> String {
    format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init svff.ctl=virtio:{}",
        l2::CTL_PORT
    )
}

/// The persistent domain: direct kernel boot of the lab's L2 with qboot,
/// console and control channel on [`LINKS`], two spare root ports, and the
/// override that makes the hostdev of `alias` an `svff-vfio-pci`.
fn domain_xml(qemu: &Path, initrd: &Path, alias: &str) -> String {
    format!(
        r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader type='rom'>/usr/share/qemu/qboot.rom</loader>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='host-passthrough'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='pci' model='pcie-root-port' index='1'/>
    <controller type='pci' model='pcie-root-port' index='2'/>
    <controller type='pci' model='pcie-root-port' index='3'/>
    <serial type='file'><source path='{LINKS}/console.log'/></serial>
    <channel type='unix'>
      <source mode='connect' path='{LINKS}/ctl.sock'/>
      <target type='virtio' name='{port}'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='{alias}'>
      <qemu:frontend>
        <qemu:property name='driver' type='string' value='svff-vfio-pci'/>
        <qemu:property name='recover' type='string' value='aer'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"#,
        kernel = l2::default_kernel().unwrap().display(),
        initrd = initrd.display(),
        cmdline = guest_cmdline(),
        qemu = qemu.display(),
        port = l2::CTL_PORT,
    )
}

/// Starts the defined domain for [`L2::boot`]: links [`LINKS`] to the boot's
/// console and control socket, `virsh start`, then waits on QEMU's pid so
/// the lab sees the VMM live as long as QEMU does.
struct Start;

impl l2::Vmm for Start {
    fn name(&self) -> String {
        format!("QEMU under libvirt (domain {DOMAIN})")
    }

    fn control(&self) -> Control {
        Control::Virtio(l2::CTL_PORT.into())
    }

    fn command(&self, spec: &BootSpec) -> Command {
        assert_eq!(
            spec.append,
            guest_cmdline(),
            "the lab's L2 command line changed"
        );
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!(
            "set -e; mkdir -p {LINKS}; ln -sfn {ctl} {LINKS}/ctl.sock; ln -sfn {log} {LINKS}/console.log; \
             virsh -q -c {URI} start {DOMAIN}; exec tail --pid=$(cat /run/libvirt/qemu/{DOMAIN}.pid) -f /dev/null",
            ctl = spec.control_socket.display(),
            log = spec.console_log.display(),
        ));
        cmd
    }
}

/// The devices the guest sees with vendor:device `1b36:0010` (nvme VFs).
fn guest_vfs(vm: &mut L2) -> Vec<String> {
    vm.sh_ok(
        "for d in /sys/bus/pci/devices/*; do \
           [ \"$(cat $d/vendor)$(cat $d/device)\" = 0x1b360x0010 ] && echo ${d##*/}; done; true",
        CMD,
    )
    .unwrap()
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// How often the guest kernel enumerated an nvme VF (`[1b36:0010]` lines in dmesg).
fn enumerations(vm: &mut L2) -> usize {
    vm.dmesg().unwrap().matches("[1b36:0010]").count()
}

/// The vendor id the guest reads from the device's config space now.
fn guest_vendor(vm: &mut L2, bdf: &str) -> String {
    vm.sh_ok(
        &format!("od -An -tx2 -N2 /sys/bus/pci/devices/{bdf}/config"),
        CMD,
    )
    .unwrap()
    .trim()
    .to_owned()
}

/// A `<hostdev>`'s source address as libvirt writes it, for `bdf`.
fn source_address(bdf: &str) -> String {
    let (dom, rest) = bdf.split_once(':').unwrap();
    let (bus, rest) = rest.split_once(':').unwrap();
    let (slot, func) = rest.split_once('.').unwrap();
    format!("<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{func}'/>")
}

/// The `<hostdev>` element with alias `alias` in a domain XML.
fn hostdev_block(xml: &str, alias: &str) -> String {
    let at = xml
        .find(&format!("<alias name='{alias}'/>"))
        .unwrap_or_else(|| panic!("no hostdev {alias}: {xml}"));
    let start = xml[..at].rfind("<hostdev ").unwrap();
    let end = at + xml[at..].find("</hostdev>").unwrap() + "</hostdev>".len();
    xml[start..end].to_owned()
}

/// A QMP command through `virsh qemu-monitor-command`; its `return` value.
fn monitor(cmd: Value) -> Value {
    let out = virsh_ok(&["qemu-monitor-command", DOMAIN, &cmd.to_string()]);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert!(v.get("error").is_none(), "{cmd}: {v}");
    v["return"].clone()
}

/// QOM property `prop` of the device with id `alias`.
fn qom_get(alias: &str, prop: &str) -> Value {
    monitor(serde_json::json!({ "execute": "qom-get", "arguments": {
        "path": format!("/machine/peripheral/{alias}"), "property": prop } }))
}

fn qom_set(alias: &str, prop: &str, value: &str) {
    monitor(serde_json::json!({ "execute": "qom-set", "arguments": {
        "path": format!("/machine/peripheral/{alias}"), "property": prop, "value": value } }));
}

/// Runs `cond` (a shell condition) in the guest every 0.1 s until it holds,
/// at most `limit_s` seconds; whether it held.
fn guest_until(vm: &mut L2, cond: &str, limit_s: u32) -> bool {
    vm.sh_until(cond, limit_s).unwrap_or_else(|e| panic!("{e}"))
}

fn nvme_live(vm: &mut L2, limit_s: u32) -> bool {
    guest_until(
        vm,
        "[ \"$(cat /sys/class/nvme/nvme0/state 2>/dev/null)\" = live ]",
        limit_s,
    )
}

/// Shell function of the guest: the sum of nvme0's queue interrupt counts.
const NVME_IRQS: &str = "irqs() { awk '/nvme0q/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }' /proc/interrupts; }";

/// What the guest's nvme driver can do now: an admin command (a rescan's
/// Identify) completed by interrupt with the controller live, then a direct
/// read of the shared namespace's first 4 KiB. Panics (with the guest's
/// dmesg) when either fails; returns a summary for the log.
fn nvme_works(vm: &mut L2, when: &str) -> String {
    let out = vm
        .sh(
            &format!(
                "{NVME_IRQS}; b=$(irqs); echo 1 > /sys/class/nvme/nvme0/rescan_controller || exit 2
                 i=0; while [ $(irqs) -le $b ] || [ \"$(cat /sys/class/nvme/nvme0/state)\" != live ]; do
                   i=$((i+1)); [ $i -gt 300 ] && exit 3; sleep 0.1; done
                 dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=1 iflag=direct 2>&1 || exit 4
                 echo \"interrupts $b -> $(irqs)\""
            ),
            Duration::from_secs(90),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    if !out.success() {
        let dmesg = vm.dmesg().unwrap();
        panic!(
            "nvme in L2 {when}: {}: {out:?}\nL2 dmesg:\n{dmesg}",
            match out.code {
                Some(2) => "rescan_controller failed",
                Some(3) => "the admin command did not complete by interrupt within 30 s",
                Some(4) => "reading /dev/nvme0n1 failed",
                _ => "failed",
            }
        );
    }
    out.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The guest's AER and nvme lines of dmesg.
fn aer_nvme_lines(dmesg: &str) -> Vec<&str> {
    dmesg
        .lines()
        .filter(|l| l.contains("AER") || l.contains("nvme") || l.contains("pcieport"))
        .collect()
}

/// After the `n`-th unpause with recover=aer (at `t0`): the guest's AER core
/// reports its `n`-th successful recovery, the nvme driver reset the
/// controller without failing, and it does I/O again.
fn guest_recovers(vm: &mut L2, n: usize, t0: Instant, what: &str) {
    let text = "AER: device recovery successful";
    assert!(
        guest_until(vm, &format!("[ $(dmesg | grep -cF '{text}') -ge {n} ]"), 60),
        "{what}: AER recovery {n} in L2:\n{}",
        vm.dmesg().unwrap()
    );
    let recovered = t0.elapsed();
    assert!(nvme_live(vm, 60), "{what}: nvme0 live again");
    let works = nvme_works(vm, &format!("after {what}"));
    let working = t0.elapsed();
    let dmesg = vm.dmesg().unwrap();
    assert_eq!(
        dmesg
            .matches("frozen state error detected, reset controller")
            .count(),
        n,
        "{what}: nvme's error_detected ran once per unpause:\n{dmesg}"
    );
    for bad in ["reset failure", "device recovery failed", "Removing"] {
        assert!(!dmesg.contains(bad), "{what}: {bad:?} in L2:\n{dmesg}");
    }
    println!(
        "{what}: AER recovery done {recovered:?} after the reconf returned, nvme admin + read {working:?}; {works}\nL2 dmesg (AER, nvme):\n{}",
        aer_nvme_lines(&dmesg).join("\n")
    );
}

/// The pause-mode step names of a reconf report (pause and unpause, no removal).
fn assert_pause_steps(r: &Value) {
    let names: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&"pause") && names.contains(&"unpause"),
        "{names:?}"
    );
    assert!(!names.contains(&"remove_vf"), "{names:?}");
}

/// `svff helper --config <cfg>` (the daemon, on the config's `socket`);
/// killed on drop.
struct Helper(Child);

impl Helper {
    fn start(cfg: &str, socket: &Path) -> Helper {
        let _ = fs::remove_file(socket);
        let mut child = Command::new(SVFF)
            .args(["helper", "--config", cfg])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start svff helper");
        let stdout = child.stdout.take().unwrap();
        let h = Helper(child);
        common::await_helper_listening(stdout);
        h
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `svff bench --vmm libvirt` on the config's running domain: `mode`, 1 VF,
/// one warm-up and one counted run (1 -> 2 -> 1 VFs). Prints its tables and
/// checks its JSON names the libvirt domains, the mode and the mode's steps;
/// the numbers are never asserted.
fn bench_libvirt(cfg: &str, pf: &str, mode: &str, dir: &Path) {
    let json = dir.join(format!("bench-{mode}.json"));
    let out = svff(&[
        "--direct",
        "--config",
        cfg,
        "bench",
        "--pf",
        pf,
        "--vmm",
        "libvirt",
        "--mode",
        mode,
        "--vfs",
        "1",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "svff bench --vmm libvirt --mode {mode} failed"
    );
    println!(
        "svff bench --vmm libvirt --mode {mode} --vfs 1 --runs 1:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let rep: Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    assert!(
        rep["vms"].as_str().unwrap().contains("libvirt domains"),
        "{rep}"
    );
    let series = rep["series"].as_array().unwrap();
    assert_eq!(series.len(), 1, "{rep}");
    assert_eq!(series[0]["mode"], mode);
    assert_eq!(series[0]["vmm"], "libvirt");
    let runs = series[0]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{rep}");
    let steps: &[&str] = if mode == "pause" {
        &["pause", "unpause"]
    } else {
        &["remove_vf", "add_vf"]
    };
    for w in steps {
        assert!(runs[0]["steps"].get(w).is_some(), "{w}: {rep}");
    }
}

#[test]
#[ignore = "lab: libvirtd, patched QEMU, L2 guest, nvme PF"]
fn libvirt_domain_gets_its_vf_from_init_and_keeps_it_through_pause_and_detach_reconfs() {
    guest::require_lab();
    let pf = guest::nvme_pf();
    release(&pf);
    guest::modprobe("vfio-pci");
    guest::modprobe("kvm-amd");
    let qemu = patched_qemu();
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let at = || format!("[{:6.1} s]", t0.elapsed().as_secs_f64());
    let mut lv = Libvirtd::start(dir.path());
    println!("libvirtd answers after {:.1} s", t0.elapsed().as_secs_f64());

    let id = format!("svff-{}-vf0", pf.replace(':', "-"));
    let alias = format!("ua-{}", id.replace('.', "_"));
    let initrd = Image::new()
        .module("nvme")
        .build()
        .expect("build the L2 image");
    let xml_path = dir.path().join("domain.xml");
    fs::write(&xml_path, domain_xml(&qemu, &initrd, &alias)).unwrap();
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN]);
    virsh_ok(&["define", xml_path.to_str().unwrap()]);
    let guard = DomainGuard;

    let state = dir.path().join("state");
    let socket = dir.path().join("helper.sock");
    let write_config = |path: &Path, domain: &str| {
        let mut f = fs::File::create(path).unwrap();
        write!(
            f,
            r#"allowed_uids = [0]
socket = "{socket}"
state_dir = "{state}"
[[pf]]
bdf = "{pf}"
profile = "nvme"
vfs = 1
nvme = {{ vq = 2, vi = 1 }}
[[vm]]
name = "vm1"
kind = "libvirt"
libvirt = {{ domain = "{domain}", uri = "{URI}" }}
qmp_timeout_s = 120
detach_timeout_s = 120
vfs = [{{ pf = "{pf}", count = 1 }}]
"#,
            state = state.display(),
            socket = socket.display(),
        )
        .unwrap();
    };
    let cfg = dir.path().join("helper.toml");
    write_config(&cfg, DOMAIN);
    let cfg = cfg.to_str().unwrap().to_owned();
    let bad_cfg = dir.path().join("bad.toml");
    write_config(&bad_cfg, "no-such-domain");
    let bad_cfg = bad_cfg.to_str().unwrap().to_owned();

    // Bad input: an unknown domain is an error naming it, before anything changes.
    fails_with(
        &["--direct", "--config", &bad_cfg, "init"],
        &["vm1", "no-such-domain"],
    );
    assert_eq!(numvfs(&pf), 0, "nothing changed");

    // init: the domain is defined, not running: the VF goes into its persistent config.
    let r = ok_json(&["--direct", "--config", &cfg, "init", "--json"]);
    assert_eq!(r["failures"], serde_json::json!([]), "{r}");
    assert_eq!(numvfs(&pf), 1);
    let vf0 = vfs_of(&pf)[0].clone();
    let inactive = virsh_ok(&["dumpxml", "--inactive", DOMAIN]);
    assert!(
        inactive.contains(&format!("<alias name='{alias}'/>")),
        "{inactive}"
    );
    assert!(inactive.contains("managed='no'"), "{inactive}");

    // The domain starts with it, as svff-vfio-pci with recover=aer (the
    // override), and the guest sees it.
    let mut vm =
        L2::boot(&Start, &initrd, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{} L2 under libvirt booted in {:.1} s",
        at(),
        vm.boot_time.as_secs_f64()
    );
    assert_eq!(qom_get(&alias, "type"), "svff-vfio-pci");
    assert_eq!(qom_get(&alias, "recover"), "aer");
    let seen = guest_vfs(&mut vm);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let gbdf = seen[0].clone();
    assert_eq!(enumerations(&mut vm), 1);
    assert_eq!(guest_vendor(&mut vm, &gbdf), "1b36");

    // svff bench --vmm libvirt, pause mode, on this domain (no new boot),
    // before the guest's nvme driver binds and with recover=none: the bench's
    // back-to-back reconfs measure svff, not the guest's AER recovery. The
    // guest keeps its device through it too.
    qom_set(&alias, "recover", "none");
    bench_libvirt(&cfg, &pf, "pause", dir.path());
    println!("{} bench --mode pause done", at());
    qom_set(&alias, "recover", "aer");
    assert_eq!(qom_get(&alias, "x-recover-count"), 0);
    assert_eq!(numvfs(&pf), 1, "even number of count changes");
    assert_eq!(guest_vfs(&mut vm), vec![gbdf.clone()]);
    assert_eq!(enumerations(&mut vm), 1, "the guest saw no unplug/replug");

    // The guest's nvme driver brings the VF's controller (an online secondary
    // controller of the nvme profile) up and reads the shared namespace.
    let out = vm.sh("modprobe nvme", CMD).unwrap();
    assert!(out.success(), "modprobe nvme: {out:?}");
    assert!(
        nvme_live(&mut vm, 60),
        "nvme0 live in L2:\n{}",
        vm.dmesg().unwrap()
    );
    let dmesg = vm.dmesg().unwrap();
    assert!(
        dmesg.contains("AER: enabled with IRQ"),
        "the guest's AER driver runs on libvirt's pcie-root-port:\n{dmesg}"
    );
    let probed = nvme_works(&mut vm, "after the probe");
    println!("{} L2 nvme0 live after modprobe: {probed}", at());

    // The persistent config made stale: its hostdev names another host
    // address (as after a VF address change). The unpause's persistent
    // update (virDomainDefineXML of the inactive XML with only the source
    // address rewritten) must point it at the VF QEMU now uses, and leave
    // the rest of the hostdev (its guest address) as it was.
    let inactive = virsh_ok(&["dumpxml", "--inactive", DOMAIN]);
    let original = hostdev_block(&inactive, &alias);
    assert!(original.contains(&source_address(&vf0)), "{original}");
    assert!(original.contains("<address type='pci'"), "{original}");
    // Function 7 of the PF's slot: no VF of this test (they are 1..3).
    let stale_vf = format!("{}.7", &pf[..pf.len() - 2]);
    let stale = original.replace(&source_address(&vf0), &source_address(&stale_vf));
    let stale_xml = dir.path().join("stale.xml");
    fs::write(&stale_xml, inactive.replace(&original, &stale)).unwrap();
    virsh_ok(&["define", stale_xml.to_str().unwrap()]);
    let inactive = virsh_ok(&["dumpxml", "--inactive", DOMAIN]);
    assert_eq!(hostdev_block(&inactive, &alias), stale);

    // Pause mode: 1 -> 2 VFs. The guest keeps its device: no new enumeration,
    // config space reads the new VF's vendor; recover=aer makes the guest's
    // AER core reset the controller and nvme works again.
    let r = ok_json(&[
        "--direct", "--config", &cfg, "reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause",
        "--json",
    ]);
    let t0 = Instant::now();
    println!("{} pause reconf (--direct): {}", at(), r["steps"]);
    assert_eq!(r["failures"], serde_json::json!([]), "{r}");
    assert_pause_steps(&r);
    assert_eq!(numvfs(&pf), 2);
    assert_eq!(qom_get(&alias, "x-recover-count"), 1);
    guest_recovers(&mut vm, 1, t0, "pause reconf 1 -> 2 (--direct)");
    let inactive = virsh_ok(&["dumpxml", "--inactive", DOMAIN]);
    assert_eq!(
        hostdev_block(&inactive, &alias),
        original,
        "the persistent hostdev names {vf0} again, all else unchanged"
    );
    assert_eq!(guest_vfs(&mut vm), vec![gbdf.clone()]);
    assert_eq!(enumerations(&mut vm), 1, "the guest saw no unplug/replug");
    assert_eq!(guest_vendor(&mut vm, &gbdf), "1b36");
    let states = virsh_ok(&[
        "qemu-monitor-command",
        DOMAIN,
        r#"{"execute":"query-svff-vfio"}"#,
    ]);
    assert!(
        states.contains("\"attached\"") && states.contains(&vf0),
        "{states}"
    );
    // The passthrough tainted the domain (libvirt's status XML in /run).
    let status = fs::read_to_string(format!("/run/libvirt/qemu/{DOMAIN}.xml")).unwrap();
    assert!(
        status.contains("<taint flag='custom-monitor'/>"),
        "{status}"
    );
    // QEMU holds the new VF's group through the passed fd.
    let group = guest::iommu_group(&vf0);
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{DOMAIN}.pid")).unwrap();
    let fds: Vec<String> = fs::read_dir(format!("/proc/{}/fd", pid.trim()))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(fds.contains(&format!("/dev/vfio/{group}")), "{fds:?}");
    // QEMU runs in a mount namespace of its own (libvirt's default
    // namespaces = ["mount"]), whose /dev holds only what libvirt put there.
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(pid.trim()),
        ns(&lv.pid().to_string()),
        "QEMU has its own mount namespace"
    );
    let nodes =
        run(Command::new("nsenter").args(["-t", pid.trim(), "-m", "ls", "/dev", "/dev/vfio"]));
    let nodes = String::from_utf8_lossy(&nodes.stdout).into_owned();
    assert!(
        nodes.contains("kvm") && !nodes.contains("nvme0"),
        "QEMU's private /dev: {nodes}"
    );
    println!(
        "{} QEMU's /dev (its mount namespace): {}",
        at(),
        nodes.split_whitespace().collect::<Vec<_>>().join(" ")
    );

    // The daemon path: the same kind of reconf (2 -> 3 VFs, pause mode)
    // through `svff helper` on its socket instead of --direct.
    let helper = Helper::start(&cfg, &socket);
    let sock = socket.to_str().unwrap();
    let r = ok_json(&[
        "--socket", sock, "reconf", "--pf", &pf, "--vfs", "3", "--mode", "pause", "--json",
    ]);
    let t0 = Instant::now();
    println!("{} pause reconf through the daemon: {}", at(), r["steps"]);
    assert_eq!(r["failures"], serde_json::json!([]), "{r}");
    assert_pause_steps(&r);
    let st = ok_json(&["--socket", sock, "status", "--json"]);
    assert!(st.to_string().contains("vm1"), "daemon status: {st}");
    drop(helper);
    assert_eq!(numvfs(&pf), 3);
    assert_eq!(qom_get(&alias, "x-recover-count"), 2);
    guest_recovers(&mut vm, 2, t0, "pause reconf 2 -> 3 (daemon)");
    assert_eq!(guest_vfs(&mut vm), vec![gbdf.clone()]);
    assert_eq!(enumerations(&mut vm), 1, "the guest saw no unplug/replug");

    // Detach mode: 3 -> 1 VFs through virDomainDetachDeviceFlags + attach:
    // the guest sees the removal and a new enumeration.
    let r = ok_json(&[
        "--direct", "--config", &cfg, "reconf", "--pf", &pf, "--vfs", "1", "--mode", "detach",
        "--json",
    ]);
    println!("{} detach reconf: {}", at(), r["steps"]);
    assert_eq!(r["failures"], serde_json::json!([]), "{r}");
    assert_eq!(numvfs(&pf), 1);
    let end = Instant::now() + Duration::from_secs(60);
    while enumerations(&mut vm) < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(enumerations(&mut vm), 2, "removed and added again");
    let seen = guest_vfs(&mut vm);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(guest_vendor(&mut vm, &seen[0]), "1b36");
    let inactive = virsh_ok(&["dumpxml", "--inactive", DOMAIN]);
    assert!(
        inactive.contains(&format!("<alias name='{alias}'/>")),
        "{inactive}"
    );

    // (svff bench --vmm libvirt --mode detach is not run here, to keep this
    // test short: its libvirt steps are this test's detach reconf.)

    // Bad input: domain not running, then libvirtd down: errors, nothing changed.
    virsh_ok(&["destroy", DOMAIN]);
    drop(vm);
    let qemu_log = lv.qemu_log();
    let taints: Vec<&str> = qemu_log.lines().filter(|l| l.contains("taint")).collect();
    println!("{} libvirt taint lines: {taints:?}", at());
    assert!(
        taints
            .iter()
            .any(|l| l.contains("is tainted: custom-monitor")),
        "the domain log names the custom-monitor taint: {taints:?}"
    );
    fails_with(
        &[
            "--direct", "--config", &cfg, "reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause",
        ],
        &["vm1", "not running"],
    );
    assert_eq!(numvfs(&pf), 1, "nothing changed");
    drop(guard);
    lv.stop();
    fails_with(
        &[
            "--direct", "--config", &cfg, "reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause",
        ],
        &["vm1", "is libvirtd running"],
    );
    assert_eq!(numvfs(&pf), 1, "nothing changed");
    release(&pf);
}
