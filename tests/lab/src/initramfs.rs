//! The L1 initramfs: busybox, the few kernel modules needed to mount the L0 root over 9p (with
//! their dependencies resolved from `modules.dep`), and `/init`. Cached by a hash of its inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::Hasher;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::LabError;

/// The modules `/init` must load before the L0 root can be mounted. Their dependencies come
/// from the kernel's `modules.dep`. Everything else is loaded later with the L0's own `modprobe`.
pub const ROOT_MODULES: &[&str] = &["9pnet_virtio", "9p"];

const INIT: &str = include_str!("init.sh");
pub(crate) const BUSYBOX: &str = "/bin/busybox";

/// Module name as the kernel knows it: file stem without `.ko*`, dashes as underscores.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves `roots` against the text of `modules.dep` and returns the module paths (relative
/// to `/lib/modules/<ver>`) in a valid load order: every module after all its dependencies.
pub fn resolve_modules(modules_dep: &str, roots: &[&str]) -> Result<Vec<String>, LabError> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let dep_paths: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(
            module_name(path),
            (
                path.to_owned(),
                dep_paths.iter().map(|d| module_name(d)).collect(),
            ),
        );
    }
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), LabError> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(LabError::Invalid(format!(
                "modules.dep has a dependency cycle through {name}"
            )));
        }
        let (path, ds) = deps.get(name).ok_or_else(|| {
            LabError::Invalid(format!("kernel module {name} is not in modules.dep"))
        })?;
        stack.push(name.to_owned());
        for d in ds {
            visit(d, deps, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push(path.clone());
        Ok(())
    }
    for root in roots {
        visit(
            &root.replace('-', "_"),
            &deps,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

/// Reads a module file, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` with the host's tools so that
/// busybox `insmod` gets a plain ELF object.
pub(crate) fn read_module(path: &Path) -> Result<Vec<u8>, LabError> {
    let name = path.to_string_lossy();
    let tools: &[&[&str]] = if name.ends_with(".xz") {
        &[&["xz", "-dc"], &[BUSYBOX, "xzcat"]]
    } else if name.ends_with(".zst") {
        &[&["zstd", "-dc"]]
    } else if name.ends_with(".gz") {
        &[&["gzip", "-dc"], &[BUSYBOX, "zcat"]]
    } else {
        return fs::read(path).map_err(|e| LabError::io(path, e));
    };
    for argv in tools {
        let Ok(out) = Command::new(argv[0]).args(&argv[1..]).arg(path).output() else {
            continue; // tool not installed: try the next one
        };
        if !out.status.success() {
            return Err(LabError::Vm(format!(
                "cannot decompress {name} with {}: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        return Ok(out.stdout);
    }
    Err(LabError::Missing {
        what: format!("a decompressor for {name}"),
        detail: format!("tried {tools:?}"),
        install: "apt-get install xz-utils zstd gzip".into(),
    })
}

/// A small stable hash (FNV-1a 64) for the cache key.
pub(crate) struct Fnv(pub(crate) u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

pub(crate) fn stamp(h: &mut Fnv, path: &Path) -> Result<(), LabError> {
    let md = fs::metadata(path).map_err(|e| LabError::io(path, e))?;
    h.write(path.as_os_str().as_encoded_bytes());
    h.write(&md.size().to_le_bytes());
    h.write(&md.mtime().to_le_bytes());
    h.write(&md.mtime_nsec().to_le_bytes());
    Ok(())
}

/// Returns the path of an initramfs for kernel `version`, building it into `cache_dir` unless an
/// up-to-date one is there already.
pub fn ensure_initramfs(version: &str, cache_dir: &Path) -> Result<PathBuf, LabError> {
    let moddir = PathBuf::from("/lib/modules").join(version);
    let dep_path = moddir.join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path).map_err(|e| LabError::io(&dep_path, e))?;
    let order = resolve_modules(&dep_text, ROOT_MODULES)?;
    if !Path::new(BUSYBOX).exists() {
        return Err(LabError::Missing {
            what: "busybox".into(),
            detail: BUSYBOX.into(),
            install: "apt-get install busybox-static".into(),
        });
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(INIT.as_bytes());
    h.write(version.as_bytes());
    stamp(&mut h, Path::new(BUSYBOX))?;
    for m in &order {
        stamp(&mut h, &moddir.join(m))?;
    }
    let name = format!("initramfs-{version}-{:016x}.cpio", h.finish());
    cached_cpio(cache_dir, &name, |w, io| {
        for d in ["bin", "dev", "proc", "sys", "host", "l0", "modules"] {
            w.dir(d).map_err(io)?;
        }
        w.char_dev("dev/console", 5, 1).map_err(io)?;
        w.char_dev("dev/null", 1, 3).map_err(io)?;
        let bb = fs::read(BUSYBOX).map_err(|e| LabError::io(BUSYBOX, e))?;
        w.file("bin/busybox", 0o755, &bb).map_err(io)?;
        w.file("init", 0o755, INIT.as_bytes()).map_err(io)?;
        let mut list = String::new();
        for m in &order {
            let data = read_module(&moddir.join(m))?;
            let name = format!("{}.ko", module_name(m));
            w.file(&format!("modules/{name}"), 0o644, &data)
                .map_err(io)?;
            list.push_str(&name);
            list.push('\n');
        }
        w.file("modules.order", 0o644, list.as_bytes()).map_err(io)
    })
}

/// The cpio writer [`cached_cpio`] hands to its builder.
pub(crate) type CacheWriter = CpioWriter<std::io::BufWriter<fs::File>>;

/// Returns `cache_dir/name`, first writing it with `build` unless it exists. The archive is
/// written to a temporary name and renamed into place, so concurrent builders (processes or
/// threads) never see a partial file. `build` gets the writer and an error mapper for its
/// writes.
pub(crate) fn cached_cpio(
    cache_dir: &Path,
    name: &str,
    build: impl FnOnce(&mut CacheWriter, &dyn Fn(std::io::Error) -> LabError) -> Result<(), LabError>,
) -> Result<PathBuf, LabError> {
    let out = cache_dir.join(name);
    if out.exists() {
        return Ok(out);
    }
    fs::create_dir_all(cache_dir).map_err(|e| LabError::io(cache_dir, e))?;
    // Unique per build, also between threads of one process: concurrent boots may race here.
    static BUILDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = cache_dir.join(format!(".{name}-{}-{n}.tmp", std::process::id()));
    let run = || -> Result<(), LabError> {
        let f = fs::File::create(&tmp).map_err(|e| LabError::io(&tmp, e))?;
        let mut w = CpioWriter::new(std::io::BufWriter::new(f));
        let io = |e| LabError::io(&tmp, e);
        build(&mut w, &io)?;
        w.finish().map_err(io)?.flush().map_err(io)?;
        fs::rename(&tmp, &out).map_err(|e| LabError::io(&out, e))
    };
    let r = run();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/drivers/pci/pci-pf-stub.ko.xz:
";

    #[test]
    fn dependencies_load_before_their_users_and_only_once() {
        let order = resolve_modules(DEP, &["9pnet_virtio", "9p"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/9p/9p.ko.xz"
            ]
        );
    }

    #[test]
    fn dashed_names_match_underscored_modules() {
        assert_eq!(
            resolve_modules(DEP, &["pci_pf_stub"]).unwrap(),
            ["kernel/drivers/pci/pci-pf-stub.ko.xz"]
        );
        assert_eq!(module_name("a/b/pci-pf-stub.ko.zst"), "pci_pf_stub");
    }

    #[test]
    fn unknown_module_is_an_error_naming_it() {
        let e = resolve_modules(DEP, &["nosuchmod"]).unwrap_err();
        assert!(e.to_string().contains("nosuchmod"), "{e}");
    }

    #[test]
    fn dependency_cycle_is_reported() {
        let e = resolve_modules("a.ko: b.ko\nb.ko: a.ko\n", &["a"]).unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
    }
}
