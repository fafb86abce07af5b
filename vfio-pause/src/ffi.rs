//! The C ABI: opaque handles, status codes plus a per-thread last-error
//! string, and `catch_unwind` at every entry so no panic crosses into C.
//!
//! Lifecycle for a C VMM: `vp_container_new` (one per VM), optionally
//! `vp_container_map_dma` for guest RAM, `vp_device_open`, then
//! `vp_device_pause` / `vp_device_unpause` any number of times, and
//! `vp_device_close`, `vp_container_free`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::backend::{MmapArea, VfSource};
use crate::container::Container;
use crate::device::{
    Access, DeviceOptions, DeviceState, PausableDevice, Phase, Stall, Timings, TrapAllBars,
    VmmHooks,
};
use crate::error::Error;
#[cfg(feature = "sim")]
use crate::fake::{FakeBackend, FakeVf};
#[cfg(feature = "sim")]
use crate::pci::Identity;
use crate::pci::PciAddress;
use vmm_sys_util::eventfd::EventFd;

/// Status of every `vp_*` call. Details: `vp_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// The C names (VP_OK, VP_ERR_*) come from these variant names.
#[allow(clippy::enum_variant_names)]
pub enum VpStatus {
    /// Success.
    VpOk = 0,
    /// A NULL pointer, bad string or bad PCI address was passed.
    VpErrInvalidArgument = 1,
    /// An ioctl, read, write or mmap failed (errno in the message).
    VpErrIo = 2,
    /// The VF does not exist.
    VpErrVfGone = 3,
    /// The offered function has other ids than the paused one; still paused.
    VpErrIdentityMismatch = 4,
    /// Not allowed in the device's state (e.g. anything after close).
    VpErrInvalidState = 5,
    /// A VMM hook failed.
    VpErrHook = 6,
    /// A pause failed and so did its rollback; see `vp_device_state`.
    VpErrRollbackFailed = 7,
    /// A bug: a panic was caught at the ABI boundary.
    VpErrPanic = 8,
    /// `vp_device_try_bar_*` under the stall policy while the device is not
    /// attached: release every lock the unpause needs (QEMU's BQL), call
    /// `vp_device_wait_unpaused` with the same `VpStall`, take the locks
    /// again and retry. Not an error.
    VpRetry = 9,
}

/// Opaque handle: the VFIO container of one VM.
#[derive(Debug)]
pub struct VpContainer {
    container: Arc<Container>,
    #[cfg(feature = "sim")]
    sim: Option<FakeBackend>,
}

/// Opaque handle: one pausable device. Any thread may call into it; a
/// `vp_device_close` marks it closed (later calls fail with
/// `VP_ERR_INVALID_STATE`), detaches the device (which ends stalled
/// accesses), waits until every call still inside the handle returned, and
/// only then frees it.
#[derive(Debug)]
pub struct VpDevice {
    dev: PausableDevice,
    calls: Mutex<Calls>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct Calls {
    inside: usize,
    closed: bool,
}

/// A call inside a device handle; leaving it lets a waiting close go on.
struct Inside<'a>(&'a VpDevice);

impl std::ops::Deref for Inside<'_> {
    type Target = PausableDevice;
    fn deref(&self) -> &PausableDevice {
        &self.0.dev
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let mut c = self.0.calls.lock().unwrap_or_else(|p| p.into_inner());
        c.inside -= 1;
        if c.inside == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A stalled BAR access's deadline across `vp_device_try_bar_*` retries:
/// zero-initialise it for every guest access.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VpStall {
    /// 0: no stall yet; else the deadline, in ns after a process-wide epoch.
    pub deadline_ns: u64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl VpStall {
    fn get(&self) -> Stall {
        Stall::with_deadline(
            (self.deadline_ns != 0).then(|| epoch() + Duration::from_nanos(self.deadline_ns - 1)),
        )
    }

    fn set(&mut self, s: &Stall) {
        self.deadline_ns = s.deadline().map_or(0, |d| {
            (d.saturating_duration_since(epoch()).as_nanos() as u64).saturating_add(1)
        });
    }
}

/// Ids of a PCI function.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VpIdentity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// 24-bit class code.
    pub class_code: u32,
    /// Revision id.
    pub revision: u8,
}

/// Number of timed phases (`VpTimings::phase_ns` entries).
pub const VP_PHASE_COUNT: usize = 12;
const _: () = assert!(VP_PHASE_COUNT == Phase::COUNT);

/// Per-phase timings of a pause or unpause, in nanoseconds; a phase that did
/// not run is 0. Indices are those of `vp_phase_name`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VpTimings {
    /// 1 when the call was a no-op.
    pub noop: u8,
    /// Wall time of the call.
    pub total_ns: u64,
    /// Time per phase.
    pub phase_ns: [u64; VP_PHASE_COUNT],
}

/// `VpRegionInfo::flags`: the region can be read.
pub const VP_REGION_READ: u32 = 1;
/// `VpRegionInfo::flags`: the region can be written.
pub const VP_REGION_WRITE: u32 = 2;
/// `VpRegionInfo::flags`: the kernel lets (parts of) the region be mmapped.
pub const VP_REGION_MMAP: u32 = 4;

/// Geometry of one VFIO region (BAR 0-5, ROM 6, config 7) of the VF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpRegionInfo {
    /// Size in bytes; 0: the VF has no such region.
    pub size: u64,
    /// `VP_REGION_*` bits.
    pub flags: u32,
}

/// Guest accesses a paused device handled, summed over all its pauses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VpAccessCounters {
    /// Config-space reads served from the shadow.
    pub config_reads: u64,
    /// Config-space writes kept in the shadow for the unpause.
    pub config_writes: u64,
    /// BAR reads answered with all-ones (policy `ignore`).
    pub bar_reads: u64,
    /// BAR writes dropped (policy `ignore`).
    pub bar_writes: u64,
    /// BAR accesses that waited for the unpause (policy `stall`).
    pub stalled: u64,
}

/// A BAR mmap handed to `map_bars`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VpMmapArea {
    /// VFIO region index (BAR number).
    pub index: u32,
    /// Host address of the mapping.
    pub host_addr: *mut c_void,
    /// Length in bytes.
    pub len: u64,
}

/// Guest-mapping callbacks of a C VMM; both return 0 on success.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VpHooks {
    /// Passed back to the callbacks.
    pub opaque: *mut c_void,
    /// Drop guest mappings of the device's BARs so accesses trap.
    pub unmap_bars: Option<unsafe extern "C" fn(opaque: *mut c_void, id: *const c_char) -> c_int>,
    /// Map these BAR mmaps into the guest.
    pub map_bars: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            id: *const c_char,
            areas: *const VpMmapArea,
            count: usize,
        ) -> c_int,
    >,
}

struct CHooks(VpHooks);

// SAFETY: the C caller of vp_device_open promises (see its docs) that the
// hooks and `opaque` may be called from any thread for the device's lifetime.
unsafe impl Send for CHooks {}
// SAFETY: as above; the hooks get no shared mutable Rust state.
unsafe impl Sync for CHooks {}

impl VmmHooks for CHooks {
    fn unmap_bars(&self, device: &str) -> Result<(), String> {
        let Some(f) = self.0.unmap_bars else {
            return Err("unmap_bars hook is NULL".into());
        };
        let id = CString::new(device).map_err(|e| e.to_string())?;
        // SAFETY: the caller of vp_device_open guaranteed the callback is valid;
        // `id` is a NUL-terminated string valid for the call.
        let rc = unsafe { f(self.0.opaque, id.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("unmap_bars returned {rc}"))
        }
    }

    fn map_bars(&self, device: &str, areas: &[MmapArea]) -> Result<(), String> {
        let Some(f) = self.0.map_bars else {
            return Err("map_bars hook is NULL".into());
        };
        let id = CString::new(device).map_err(|e| e.to_string())?;
        let c: Vec<VpMmapArea> = areas
            .iter()
            .map(|a| VpMmapArea {
                index: a.index,
                host_addr: a.host_addr as *mut c_void,
                len: a.len as u64,
            })
            .collect();
        // SAFETY: as above; `c` holds `c.len()` initialised areas for the call.
        let rc = unsafe { f(self.0.opaque, id.as_ptr(), c.as_ptr(), c.len()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("map_bars returned {rc}"))
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

fn status_of(e: &Error) -> VpStatus {
    match e {
        Error::InvalidAddress(_) => VpStatus::VpErrInvalidArgument,
        Error::VfGone { .. } => VpStatus::VpErrVfGone,
        Error::IdentityMismatch { .. } => VpStatus::VpErrIdentityMismatch,
        Error::InvalidState { .. } => VpStatus::VpErrInvalidState,
        Error::Hook { .. } => VpStatus::VpErrHook,
        Error::RollbackFailed { .. } => VpStatus::VpErrRollbackFailed,
        Error::Io { .. } | Error::Vfio { .. } | Error::Container { .. } => VpStatus::VpErrIo,
        Error::OutOfRange { .. } => VpStatus::VpErrInvalidArgument,
    }
}

/// Error with its whole source chain, for `vp_last_error`.
fn chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

enum Fail {
    Arg(String),
    Err(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Err(e)
    }
}

impl From<svff_types::InvalidPciAddress> for Fail {
    fn from(e: svff_types::InvalidPciAddress) -> Self {
        Fail::Err(e.into())
    }
}

/// Run an entry point: catch panics, translate errors, set the last error.
fn entry(f: impl FnOnce() -> Result<(), Fail>) -> VpStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error(String::new());
            VpStatus::VpOk
        }
        Ok(Err(Fail::Arg(m))) => {
            set_last_error(m);
            VpStatus::VpErrInvalidArgument
        }
        Ok(Err(Fail::Err(e))) => {
            set_last_error(chain(&e));
            status_of(&e)
        }
        Err(p) => {
            let m = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("panic in vfio-pause: {m}"));
            VpStatus::VpErrPanic
        }
    }
}

/// # Safety
/// `s` must be NULL or a NUL-terminated string.
unsafe fn cstr<'a>(s: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if s.is_null() {
        return Err(Fail::Arg(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| Fail::Arg(format!("{what} is not UTF-8")))
}

/// # Safety
/// `bdf` must be NULL or NUL-terminated; `group_fd` must be -1 or an open fd
/// that the callee may own.
unsafe fn source(bdf: *const c_char, group_fd: c_int) -> Result<VfSource, Fail> {
    let take_fd = || {
        // SAFETY: the caller hands ownership of an open fd (>= 0) to us.
        (group_fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(group_fd) })
    };
    // SAFETY: forwarded contract.
    let s = match unsafe { cstr(bdf, "bdf") } {
        Ok(s) => s,
        Err(e) => {
            drop(take_fd());
            return Err(e);
        }
    };
    let address: PciAddress = match s.parse() {
        Ok(a) => a,
        Err(e) => {
            drop(take_fd());
            return Err(e.into());
        }
    };
    Ok(match take_fd() {
        Some(group) => VfSource::GroupFd { group, address },
        None => VfSource::Sysfs(address),
    })
}

fn timings_to_c(t: &Timings) -> VpTimings {
    let mut out = VpTimings {
        noop: t.noop as u8,
        total_ns: t.total.as_nanos() as u64,
        phase_ns: [0; VP_PHASE_COUNT],
    };
    for (p, d) in &t.phases {
        out.phase_ns[*p as usize] = d.as_nanos() as u64;
    }
    out
}

/// The last error of this thread as a NUL-terminated string ("" after a
/// success). Valid until the next `vp_*` call on this thread.
#[no_mangle]
pub extern "C" fn vp_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// Name of phase `index` (`"irq-teardown"`, ...), or NULL when out of range.
#[no_mangle]
pub extern "C" fn vp_phase_name(index: u32) -> *const c_char {
    const NAMES: [&CStr; VP_PHASE_COUNT] = [
        c"unmap-bars",
        c"snapshot",
        c"irq-teardown",
        c"munmap",
        c"close",
        c"reopen",
        c"dma-remap",
        c"identity",
        c"restore",
        c"irq-setup",
        c"mmap",
        c"map-bars",
    ];
    NAMES
        .get(index as usize)
        .map_or(ptr::null(), |n| n.as_ptr())
}

/// Open a real VFIO container (`/dev/vfio/vfio`) into `*out`.
///
/// # Safety
/// `out` must be a valid pointer to write a handle to.
#[no_mangle]
pub unsafe extern "C" fn vp_container_new(out: *mut *mut VpContainer) -> VpStatus {
    entry(|| {
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        let c = Container::open_real()?;
        let h = Box::new(VpContainer {
            container: c,
            #[cfg(feature = "sim")]
            sim: None,
        });
        // SAFETY: `out` is non-NULL and valid for writes per the contract.
        unsafe { *out = Box::into_raw(h) };
        Ok(())
    })
}

/// A container over the simulated backend (for tests of C VMMs without VFIO).
/// Functions are added with `vp_sim_add_vf`. Only in a library built with
/// the `sim` feature (not the production one).
///
/// # Safety
/// `out` must be a valid pointer to write a handle to.
#[cfg(feature = "sim")]
#[no_mangle]
pub unsafe extern "C" fn vp_container_new_simulated(out: *mut *mut VpContainer) -> VpStatus {
    entry(|| {
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        let fake = FakeBackend::new();
        let h = Box::new(VpContainer {
            container: Container::new(Box::new(fake.clone())),
            sim: Some(fake),
        });
        // SAFETY: `out` is non-NULL and valid for writes per the contract.
        unsafe { *out = Box::into_raw(h) };
        Ok(())
    })
}

/// Simulated container only: create a function at `bdf` with these ids.
///
/// # Safety
/// `c` must be a live container handle, `bdf` NUL-terminated, `id` valid.
#[cfg(feature = "sim")]
#[no_mangle]
pub unsafe extern "C" fn vp_sim_add_vf(
    c: *mut VpContainer,
    bdf: *const c_char,
    id: *const VpIdentity,
) -> VpStatus {
    entry(|| {
        // SAFETY: per the contract `c` is NULL or a live handle.
        let c = unsafe { c.as_ref() }.ok_or_else(|| Fail::Arg("container is NULL".into()))?;
        // SAFETY: per the contract `id` is NULL or valid.
        let id = unsafe { id.as_ref() }.ok_or_else(|| Fail::Arg("identity is NULL".into()))?;
        // SAFETY: per the contract `bdf` is NUL-terminated.
        let a: PciAddress = unsafe { cstr(bdf, "bdf") }?.parse()?;
        let sim = c
            .sim
            .as_ref()
            .ok_or_else(|| Fail::Arg("not a simulated container".into()))?;
        sim.add_vf(
            &a,
            FakeVf::new(Identity {
                vendor: id.vendor,
                device: id.device,
                subsystem_vendor: id.subsystem_vendor,
                subsystem: id.subsystem,
                class: id.class_code,
                revision: id.revision,
            }),
        );
        Ok(())
    })
}

/// Simulated container only: destroy the function at `bdf` (fails while open).
///
/// # Safety
/// `c` must be a live container handle, `bdf` NUL-terminated.
#[cfg(feature = "sim")]
#[no_mangle]
pub unsafe extern "C" fn vp_sim_remove_vf(c: *mut VpContainer, bdf: *const c_char) -> VpStatus {
    entry(|| {
        // SAFETY: per the contract `c` is NULL or a live handle.
        let c = unsafe { c.as_ref() }.ok_or_else(|| Fail::Arg("container is NULL".into()))?;
        // SAFETY: per the contract `bdf` is NUL-terminated.
        let a: PciAddress = unsafe { cstr(bdf, "bdf") }?.parse()?;
        let sim = c
            .sim
            .as_ref()
            .ok_or_else(|| Fail::Arg("not a simulated container".into()))?;
        sim.remove_vf(&a).map_err(Fail::Arg)
    })
}

/// Register guest memory for device DMA at `iova` (mapped now or when the
/// first device opens, and again whenever the container lost it).
///
/// # Safety
/// `c` must be a live handle. `[host_addr, host_addr + size)` must stay mapped
/// until the container is freed and be accessed only in ways that tolerate
/// concurrent device DMA (no Rust references to it).
#[no_mangle]
pub unsafe extern "C" fn vp_container_map_dma(
    c: *mut VpContainer,
    iova: u64,
    size: u64,
    host_addr: *mut c_void,
) -> VpStatus {
    entry(|| {
        // SAFETY: per the contract `c` is NULL or a live handle.
        let c = unsafe { c.as_ref() }.ok_or_else(|| Fail::Arg("container is NULL".into()))?;
        if host_addr.is_null() || size == 0 {
            return Err(Fail::Arg("host_addr is NULL or size is 0".into()));
        }
        // SAFETY: the caller upholds register_dma's contract (see above).
        unsafe { c.container.register_dma(iova, size, host_addr.cast()) }?;
        Ok(())
    })
}

/// Unregister guest memory registered with `vp_container_map_dma` at exactly
/// `iova` and `size` (and unmap it from the IOMMU if it is mapped). For VMMs
/// whose guest memory layout changes at run time (QEMU's memory listener).
///
/// # Safety
/// `c` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn vp_container_unmap_dma(
    c: *mut VpContainer,
    iova: u64,
    size: u64,
) -> VpStatus {
    entry(|| {
        // SAFETY: per the contract `c` is NULL or a live handle.
        let c = unsafe { c.as_ref() }.ok_or_else(|| Fail::Arg("container is NULL".into()))?;
        c.container.unregister_dma(iova, size)?;
        Ok(())
    })
}

/// Free a container. Devices opened in it keep it alive until they are closed.
///
/// # Safety
/// `c` must be NULL or a handle from `vp_container_new*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn vp_container_free(c: *mut VpContainer) {
    let _ = entry(|| {
        if !c.is_null() {
            // SAFETY: `c` came from Box::into_raw and is freed exactly once.
            drop(unsafe { Box::from_raw(c) });
        }
        Ok(())
    });
}

/// Open the VF `bdf` as device `id` into `*out`. `group_fd` is -1 to open
/// `/dev/vfio/<group>` here, or an open VFIO group fd whose ownership passes
/// to the library (closed by it, also on error). `stall_ms` = 0 selects the
/// `ignore` paused-access policy, otherwise `stall` with that deadline.
/// `hooks` may be NULL (BARs are never mapped into the guest, nothing is
/// mmapped); with hooks, BARs are mmapped and handed to `map_bars`.
///
/// # Safety
/// `c` must be a live handle, `id` and `bdf` NUL-terminated, `out` writable,
/// `hooks` NULL or valid; the hooks must be callable from any thread until
/// the device is closed.
#[no_mangle]
pub unsafe extern "C" fn vp_device_open(
    c: *mut VpContainer,
    id: *const c_char,
    bdf: *const c_char,
    group_fd: c_int,
    stall_ms: u64,
    hooks: *const VpHooks,
    out: *mut *mut VpDevice,
) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract: group_fd is -1 or ours to own.
        let src = unsafe { source(bdf, group_fd) }?;
        // SAFETY: per the contract `c` is NULL or a live handle.
        let c = unsafe { c.as_ref() }.ok_or_else(|| Fail::Arg("container is NULL".into()))?;
        // SAFETY: per the contract `id` is NUL-terminated.
        let id = unsafe { cstr(id, "id") }?;
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        // SAFETY: per the contract `hooks` is NULL or valid.
        let hooks = unsafe { hooks.as_ref() }.copied();
        let options = if stall_ms == 0 {
            DeviceOptions::default()
        } else {
            DeviceOptions::stall(Duration::from_millis(stall_ms))
        }
        .with_mmap_bars(hooks.is_some());
        let h: Arc<dyn VmmHooks> = match hooks {
            Some(h) => Arc::new(CHooks(h)),
            None => Arc::new(TrapAllBars),
        };
        let dev = PausableDevice::open(id, c.container.clone(), src, options, h)?;
        // SAFETY: `out` is non-NULL and writable per the contract.
        unsafe {
            *out = Box::into_raw(Box::new(VpDevice {
                dev,
                calls: Mutex::new(Calls::default()),
                idle: Condvar::new(),
            }))
        };
        Ok(())
    })
}

/// Enter a device handle for one call (see [`VpDevice`]).
///
/// # Safety
/// `d` must be NULL or a live device handle (not freed: a close running
/// concurrently is fine, one that returned is not).
unsafe fn dev<'a>(d: *const VpDevice) -> Result<Inside<'a>, Fail> {
    // SAFETY: per the contract `d` is NULL or a live handle.
    let h = unsafe { d.as_ref() }.ok_or_else(|| Fail::Arg("device is NULL".into()))?;
    let mut c = h.calls.lock().unwrap_or_else(|p| p.into_inner());
    if c.closed {
        return Err(Fail::Err(Error::InvalidState {
            device: h.dev.id().to_string(),
            op: "call into a device handle",
            state: DeviceState::Detached,
        }));
    }
    c.inside += 1;
    Ok(Inside(h))
}

/// # Safety
/// `out` must be NULL or writable.
unsafe fn put_timings(out: *mut VpTimings, t: &Timings) {
    if !out.is_null() {
        // SAFETY: non-NULL and writable per the contract.
        unsafe { *out = timings_to_c(t) };
    }
}

/// Pause: when this returns `VP_OK`, no fd of the VF is open in the process.
/// No-op (timings `noop` = 1) when already paused.
///
/// # Safety
/// `d` must be a live device handle; `timings` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_pause(d: *mut VpDevice, timings: *mut VpTimings) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let t = unsafe { dev(d) }?.pause()?;
        // SAFETY: forwarded contract.
        unsafe { put_timings(timings, &t) };
        Ok(())
    })
}

/// Pause with a paused-access policy for this pause only: `stall_ms` = 0
/// selects `ignore`, otherwise `stall` with that deadline per access
/// (bounded by the library's maximum). As `vp_device_pause` otherwise.
///
/// # Safety
/// `d` must be a live device handle; `timings` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_pause_with(
    d: *mut VpDevice,
    stall_ms: u64,
    timings: *mut VpTimings,
) -> VpStatus {
    entry(|| {
        let (policy, deadline) = if stall_ms == 0 {
            (svff_types::PausePolicy::Ignore, Duration::ZERO)
        } else {
            (
                svff_types::PausePolicy::Stall,
                Duration::from_millis(stall_ms),
            )
        };
        // SAFETY: forwarded contract.
        let t = unsafe { dev(d) }?.pause_with(policy, deadline)?;
        // SAFETY: forwarded contract.
        unsafe { put_timings(timings, &t) };
        Ok(())
    })
}

/// Unpause onto `bdf` (own open with `group_fd` = -1, or a passed group fd,
/// owned by the library from now on). On error the device stays paused.
///
/// # Safety
/// `d` must be a live device handle, `bdf` NUL-terminated, `timings` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_unpause(
    d: *mut VpDevice,
    bdf: *const c_char,
    group_fd: c_int,
    timings: *mut VpTimings,
) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let src = unsafe { source(bdf, group_fd) }?;
        // SAFETY: forwarded contract.
        let t = unsafe { dev(d) }?.unpause(src)?;
        // SAFETY: forwarded contract.
        unsafe { put_timings(timings, &t) };
        Ok(())
    })
}

/// Identity of the function the device was opened on.
///
/// # Safety
/// `d` must be a live device handle, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_identity(d: *const VpDevice, out: *mut VpIdentity) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let i = unsafe { dev(d) }?.identity();
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        // SAFETY: non-NULL and writable per the contract.
        unsafe {
            *out = VpIdentity {
                vendor: i.vendor,
                device: i.device,
                subsystem_vendor: i.subsystem_vendor,
                subsystem: i.subsystem,
                class_code: i.class,
                revision: i.revision,
            }
        };
        Ok(())
    })
}

/// Current state (0 attached, 1 paused, 2 detached).
///
/// # Safety
/// `d` must be a live device handle, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_state(d: *const VpDevice, out: *mut u32) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let s: DeviceState = unsafe { dev(d) }?.state();
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        // SAFETY: non-NULL and writable per the contract.
        unsafe { *out = s as u32 };
        Ok(())
    })
}

/// Timings of the last pause and unpause (zeroed when there was none).
///
/// # Safety
/// `d` must be a live device handle; `pause`, `unpause` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_last_timings(
    d: *const VpDevice,
    pause: *mut VpTimings,
    unpause: *mut VpTimings,
) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let (p, u) = unsafe { dev(d) }?.last_timings();
        let zero = Timings::default();
        // SAFETY: forwarded contract.
        unsafe {
            put_timings(pause, p.as_ref().unwrap_or(&zero));
            put_timings(unpause, u.as_ref().unwrap_or(&zero));
        }
        Ok(())
    })
}

/// Counters of guest accesses handled while paused (for `query-svff-vfio`).
///
/// # Safety
/// `d` must be a live device handle, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_access_counters(
    d: *const VpDevice,
    out: *mut VpAccessCounters,
) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let n = unsafe { dev(d) }?.access_counters();
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        // SAFETY: non-NULL and writable per the contract.
        unsafe {
            *out = VpAccessCounters {
                config_reads: n.shadow_reads,
                config_writes: n.shadow_writes,
                bar_reads: n.ignored_reads,
                bar_writes: n.ignored_writes,
                stalled: n.stalled,
            }
        };
        Ok(())
    })
}

/// Size and access flags of VFIO region `index` (BAR n = n, ROM 6, config
/// 7) of the attached VF, as the kernel reports them. Only while attached
/// (`VP_ERR_INVALID_STATE` otherwise): a VMM learns the geometry when it
/// opens the device; it does not change across pauses (the unpause checks
/// the new VF's identity, and a VF of the same ids has the same BARs).
///
/// # Safety
/// `d` must be a live device handle, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_region_info(
    d: *const VpDevice,
    index: u32,
    out: *mut VpRegionInfo,
) -> VpStatus {
    entry(|| {
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        // SAFETY: forwarded contract.
        let r = unsafe { dev(d) }?.region_info(index)?;
        let flags = [
            (r.read, VP_REGION_READ),
            (r.write, VP_REGION_WRITE),
            (r.mmap, VP_REGION_MMAP),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, bit)| f | bit);
        // SAFETY: non-NULL and writable per the contract.
        unsafe {
            *out = VpRegionInfo {
                size: r.size,
                flags,
            }
        };
        Ok(())
    })
}

/// Guest config-space read (from the shadow while paused).
///
/// # Safety
/// `d` must be a live device handle, `buf` writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vp_device_config_read(
    d: *const VpDevice,
    offset: u64,
    buf: *mut u8,
    len: usize,
) -> VpStatus {
    entry(|| {
        if buf.is_null() {
            return Err(Fail::Arg("buf is NULL".into()));
        }
        // SAFETY: non-NULL and writable for `len` bytes per the contract.
        let b = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.config_read(offset, b)?;
        Ok(())
    })
}

/// Guest BAR read (paused-access policy applies while paused). Under the
/// stall policy this waits (bounded) for the unpause: call it only without
/// locks the unpause needs; a VMM whose MMIO path holds one (QEMU's BQL)
/// uses `vp_device_try_bar_read`.
///
/// # Safety
/// `d` must be a live device handle, `buf` writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vp_device_bar_read(
    d: *const VpDevice,
    bar: u32,
    offset: u64,
    buf: *mut u8,
    len: usize,
) -> VpStatus {
    entry(|| {
        if buf.is_null() {
            return Err(Fail::Arg("buf is NULL".into()));
        }
        // SAFETY: non-NULL and writable for `len` bytes per the contract.
        let b = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.bar_read(bar, offset, b)?;
        Ok(())
    })
}

/// Guest config-space write (to the shadow while paused, applied at unpause).
///
/// # Safety
/// `d` must be a live device handle, `data` readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vp_device_config_write(
    d: *const VpDevice,
    offset: u64,
    data: *const u8,
    len: usize,
) -> VpStatus {
    entry(|| {
        if data.is_null() {
            return Err(Fail::Arg("data is NULL".into()));
        }
        // SAFETY: non-NULL and readable for `len` bytes per the contract.
        let b = unsafe { std::slice::from_raw_parts(data, len) };
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.config_write(offset, b)?;
        Ok(())
    })
}

/// Guest BAR write (dropped and counted while paused, or stalled as
/// `vp_device_bar_read`; see `vp_device_try_bar_write`).
///
/// # Safety
/// `d` must be a live device handle, `data` readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vp_device_bar_write(
    d: *const VpDevice,
    bar: u32,
    offset: u64,
    data: *const u8,
    len: usize,
) -> VpStatus {
    entry(|| {
        if data.is_null() {
            return Err(Fail::Arg("data is NULL".into()));
        }
        // SAFETY: non-NULL and readable for `len` bytes per the contract.
        let b = unsafe { std::slice::from_raw_parts(data, len) };
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.bar_write(bar, offset, b)?;
        Ok(())
    })
}

/// Duplicate caller-owned eventfds into library-owned ones.
///
/// # Safety
/// `fds` must be NULL (with `count` 0) or point to `count` ints.
unsafe fn dup_eventfds(fds: *const c_int, count: usize) -> Result<Vec<EventFd>, Fail> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if fds.is_null() {
        return Err(Fail::Arg("fds is NULL".into()));
    }
    // SAFETY: non-NULL and readable for `count` ints per the contract.
    let fds = unsafe { std::slice::from_raw_parts(fds, count) };
    fds.iter()
        .map(|&fd| {
            // SAFETY: F_DUPFD_CLOEXEC on a caller-supplied fd only creates a new fd.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(Fail::Arg(format!(
                    "eventfd {fd}: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: `dup` is a new fd owned by nothing else.
            Ok(unsafe { EventFd::from_raw_fd(dup) })
        })
        .collect()
}

/// Wire interrupt `index` (0 INTx, 1 MSI, 2 MSI-X) to `count` eventfds
/// (vector n -> `fds[n]`); `count` 0 disables it. The library keeps
/// duplicates of the fds and re-wires them at every unpause.
///
/// # Safety
/// `d` must be a live device handle; `fds` NULL (with `count` 0) or `count` ints.
#[no_mangle]
pub unsafe extern "C" fn vp_device_set_irqs(
    d: *const VpDevice,
    index: u32,
    fds: *const c_int,
    count: usize,
) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let fds = unsafe { dup_eventfds(fds, count) }?;
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.set_irqs(index, fds)?;
        Ok(())
    })
}

/// Wire the kernel's device-request IRQ to eventfd `fd` (-1 unwires it).
/// When it fires, ask `vp_device_request_is_unplug` whether it is an unplug
/// request (only while attached).
///
/// # Safety
/// `d` must be a live device handle.
#[no_mangle]
pub unsafe extern "C" fn vp_device_set_request_irq(d: *const VpDevice, fd: c_int) -> VpStatus {
    entry(|| {
        let e = if fd < 0 {
            None
        } else {
            // SAFETY: `&fd` is one readable int.
            unsafe { dup_eventfds(&fd, 1) }?.pop()
        };
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.set_request_irq(e)?;
        Ok(())
    })
}

/// 1 when a request IRQ means "unplug" (device attached), else 0.
///
/// # Safety
/// `d` must be a live device handle, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn vp_device_request_is_unplug(d: *const VpDevice, out: *mut u8) -> VpStatus {
    entry(|| {
        // SAFETY: forwarded contract.
        let v = unsafe { dev(d) }?.request_is_unplug();
        if out.is_null() {
            return Err(Fail::Arg("out is NULL".into()));
        }
        // SAFETY: non-NULL and writable per the contract.
        unsafe { *out = v as u8 };
        Ok(())
    })
}

/// Detach (if not yet) and free the device handle. Every fd of the VF is
/// released even when an error is returned. Other threads may be inside the
/// handle (e.g. a vCPU stalled in `vp_device_bar_read`): the detach ends
/// their waits, and the handle is freed only once every such call returned;
/// calls that enter after the close began fail with `VP_ERR_INVALID_STATE`.
///
/// # Safety
/// `d` must be NULL or a live device handle; no call may start on it after
/// this returns.
#[no_mangle]
pub unsafe extern "C" fn vp_device_close(d: *mut VpDevice) -> VpStatus {
    entry(|| {
        if d.is_null() {
            return Ok(());
        }
        // SAFETY: `d` is a live handle per the contract; it is freed below,
        // only after every call inside it has left.
        let h = unsafe { &*d };
        {
            let mut c = h.calls.lock().unwrap_or_else(|p| p.into_inner());
            if c.closed {
                return Err(Fail::Arg("device handle is already being closed".into()));
            }
            c.closed = true;
        }
        // Detaching ends stalled accesses; it is refused while another thread
        // is inside a pause or unpause, so it is tried again once every call
        // has left.
        let mut res = if h.dev.state() == DeviceState::Detached {
            Ok(())
        } else {
            h.dev.detach()
        };
        let mut c = h.calls.lock().unwrap_or_else(|p| p.into_inner());
        while c.inside > 0 {
            c = h.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        drop(c);
        if res.is_err() && h.dev.state() != DeviceState::Detached {
            res = h.dev.detach();
        }
        // SAFETY: `d` came from Box::into_raw, nothing is inside it any more
        // and new calls are refused: freed exactly once.
        drop(unsafe { Box::from_raw(d) });
        res.map_err(Fail::Err)
    })
}

/// Guest BAR read for a VMM that holds locks the unpause needs (QEMU's BQL):
/// never blocks on a pause. Returns `VP_RETRY` under the stall policy while
/// the device is not attached (see `VpStatus`); `stall` carries the
/// access's bounded deadline across retries (zero it for each new access).
///
/// # Safety
/// `d` must be a live device handle, `buf` writable for `len` bytes, `stall` valid.
#[no_mangle]
pub unsafe extern "C" fn vp_device_try_bar_read(
    d: *const VpDevice,
    bar: u32,
    offset: u64,
    buf: *mut u8,
    len: usize,
    stall: *mut VpStall,
) -> VpStatus {
    let access = |s: &mut Stall| {
        if buf.is_null() {
            return Err(Fail::Arg("buf is NULL".into()));
        }
        // SAFETY: non-NULL and writable for `len` bytes per the contract.
        let b = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        // SAFETY: forwarded contract.
        Ok(unsafe { dev(d) }?.try_bar_read(bar, offset, b, s)?)
    };
    // SAFETY: `stall` is NULL or valid per the contract.
    unsafe { stalled_access(stall, access) }
}

/// Guest BAR write, as `vp_device_try_bar_read`.
///
/// # Safety
/// `d` must be a live device handle, `data` readable for `len` bytes, `stall` valid.
#[no_mangle]
pub unsafe extern "C" fn vp_device_try_bar_write(
    d: *const VpDevice,
    bar: u32,
    offset: u64,
    data: *const u8,
    len: usize,
    stall: *mut VpStall,
) -> VpStatus {
    let access = |s: &mut Stall| {
        if data.is_null() {
            return Err(Fail::Arg("data is NULL".into()));
        }
        // SAFETY: non-NULL and readable for `len` bytes per the contract.
        let b = unsafe { std::slice::from_raw_parts(data, len) };
        // SAFETY: forwarded contract.
        Ok(unsafe { dev(d) }?.try_bar_write(bar, offset, b, s)?)
    };
    // SAFETY: `stall` is NULL or valid per the contract.
    unsafe { stalled_access(stall, access) }
}

/// The common frame of `vp_device_try_bar_read`/`_write`: the stall record in and
/// out, and `Access::Retry` turned into `VP_RETRY`.
///
/// # Safety
/// `stall` must be NULL or valid for reads and writes.
unsafe fn stalled_access(
    stall: *mut VpStall,
    access: impl FnOnce(&mut Stall) -> Result<Access, Fail>,
) -> VpStatus {
    let mut retry = false;
    let st = entry(|| {
        // SAFETY: per the contract `stall` is NULL or valid.
        let stall = unsafe { stall.as_mut() }.ok_or_else(|| Fail::Arg("stall is NULL".into()))?;
        let mut s = stall.get();
        retry = access(&mut s)? == Access::Retry;
        stall.set(&s);
        Ok(())
    });
    if st == VpStatus::VpOk && retry {
        VpStatus::VpRetry
    } else {
        st
    }
}

/// After `VP_RETRY`, with the VMM's locks released: wait until the device is
/// attached again or the stall's deadline passes (bounded).
///
/// # Safety
/// `d` must be a live device handle, `stall` valid.
#[no_mangle]
pub unsafe extern "C" fn vp_device_wait_unpaused(
    d: *const VpDevice,
    stall: *const VpStall,
) -> VpStatus {
    entry(|| {
        // SAFETY: per the contract `stall` is NULL or valid.
        let stall = unsafe { stall.as_ref() }.ok_or_else(|| Fail::Arg("stall is NULL".into()))?;
        // SAFETY: forwarded contract.
        unsafe { dev(d) }?.wait_unpaused(&stall.get());
        Ok(())
    })
}

#[cfg(all(test, not(feature = "sim")))]
compile_error!(
    "vfio-pause's tests need the sim feature (the dev-dependency on itself turns it on)"
);

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn last_error() -> String {
        // SAFETY: vp_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(vp_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    const NVME: VpIdentity = VpIdentity {
        vendor: 0x1b36,
        device: 0x0010,
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
        class_code: 0x010802,
        revision: 0,
    };

    fn sim_device() -> (*mut VpContainer, *mut VpDevice) {
        let mut c = ptr::null_mut();
        let mut d = ptr::null_mut();
        // SAFETY: valid out pointers and NUL-terminated literals throughout.
        unsafe {
            assert_eq!(vp_container_new_simulated(&mut c), VpStatus::VpOk);
            assert_eq!(
                vp_sim_add_vf(c, c"0000:02:00.1".as_ptr(), &NVME),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_open(
                    c,
                    c"nvme0".as_ptr(),
                    c"0000:02:00.1".as_ptr(),
                    -1,
                    0,
                    ptr::null(),
                    &mut d
                ),
                VpStatus::VpOk,
                "{}",
                last_error()
            );
        }
        (c, d)
    }

    #[test]
    fn region_info_reports_the_vfs_regions_while_attached_and_refuses_while_paused() {
        let (c, d) = sim_device();
        let mut r = VpRegionInfo::default();
        // SAFETY: live handles and valid out pointers (NULL where tested).
        unsafe {
            assert_eq!(vp_device_region_info(d, 0, &mut r), VpStatus::VpOk);
            assert!(r.size > 0, "BAR0 of the simulated nvme VF: {r:?}");
            assert_eq!(r.flags, VP_REGION_READ | VP_REGION_WRITE | VP_REGION_MMAP);
            assert_eq!(vp_device_region_info(d, 7, &mut r), VpStatus::VpOk);
            assert_eq!(
                r,
                VpRegionInfo {
                    size: 0x100,
                    flags: VP_REGION_READ | VP_REGION_WRITE
                }
            );
            assert_eq!(vp_device_region_info(d, 2, &mut r), VpStatus::VpOk);
            assert_eq!(r, VpRegionInfo::default(), "no BAR2");
            assert_eq!(
                vp_device_region_info(d, 0, ptr::null_mut()),
                VpStatus::VpErrInvalidArgument
            );
            assert!(last_error().contains("out is NULL"));
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
            assert_eq!(
                vp_device_region_info(d, 0, &mut r),
                VpStatus::VpErrInvalidState
            );
            assert!(last_error().contains("nvme0"), "{}", last_error());
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }

    #[test]
    fn null_arguments_are_rejected_with_a_message() {
        // SAFETY: NULL is allowed by every contract tested here.
        unsafe {
            assert_eq!(
                vp_container_new(ptr::null_mut()),
                VpStatus::VpErrInvalidArgument
            );
            assert!(last_error().contains("out is NULL"));
            assert_eq!(
                vp_device_pause(ptr::null_mut(), ptr::null_mut()),
                VpStatus::VpErrInvalidArgument
            );
            assert!(last_error().contains("device is NULL"));
            assert_eq!(vp_device_close(ptr::null_mut()), VpStatus::VpOk);
            vp_container_free(ptr::null_mut());
        }
    }

    #[test]
    fn pause_with_sets_the_policy_of_that_pause_only() {
        let (c, d) = sim_device();
        let mut buf = [0u8; 4];
        let mut stall = VpStall::default();
        // SAFETY: live handles, `buf` has room for 4 bytes, `stall` valid.
        unsafe {
            assert_eq!(
                vp_device_pause_with(d, 1000, ptr::null_mut()),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_try_bar_read(d, 0, 0, buf.as_mut_ptr(), 4, &mut stall),
                VpStatus::VpRetry,
                "stall policy: the access must wait for the unpause"
            );
            assert_eq!(
                vp_device_unpause(d, c"0000:02:00.1".as_ptr(), -1, ptr::null_mut()),
                VpStatus::VpOk,
                "{}",
                last_error()
            );
            assert_eq!(vp_device_pause_with(d, 0, ptr::null_mut()), VpStatus::VpOk);
            stall = VpStall::default();
            assert_eq!(
                vp_device_try_bar_read(d, 0, 0, buf.as_mut_ptr(), 4, &mut stall),
                VpStatus::VpOk,
                "ignore policy: answered at once"
            );
            assert_eq!(buf, [0xff; 4]);
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }

    #[test]
    fn access_counters_count_paused_config_and_bar_accesses() {
        let (c, d) = sim_device();
        let mut n = VpAccessCounters::default();
        let mut buf = [0u8; 4];
        // SAFETY: live handles, `buf` has room for the 4 bytes read.
        unsafe {
            assert_eq!(
                vp_device_config_read(d, 0, buf.as_mut_ptr(), 4),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_access_counters(d, &mut n), VpStatus::VpOk);
            assert_eq!(n.config_reads, 0, "attached reads are not counted");
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
            assert_eq!(
                vp_device_config_read(d, 0, buf.as_mut_ptr(), 4),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_config_write(d, 4, buf.as_ptr(), 2),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_bar_read(d, 0, 0, buf.as_mut_ptr(), 4),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_bar_write(d, 0, 0, buf.as_ptr(), 4),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_bar_write(d, 0, 4, buf.as_ptr(), 4),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_access_counters(d, &mut n), VpStatus::VpOk);
            assert_eq!(
                (
                    n.config_reads,
                    n.config_writes,
                    n.bar_reads,
                    n.bar_writes,
                    n.stalled
                ),
                (1, 1, 1, 2, 0)
            );
            assert_eq!(
                vp_device_access_counters(d, ptr::null_mut()),
                VpStatus::VpErrInvalidArgument
            );
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }

    #[test]
    fn unmap_dma_removes_exactly_the_registered_range() {
        let (c, d) = sim_device();
        let mut mem = vec![0u8; 0x2000];
        let host = mem.as_mut_ptr().cast::<c_void>();
        // SAFETY: live handles; `mem` outlives the registration (unregistered
        // below, before it is dropped) and is not touched while registered.
        unsafe {
            assert_eq!(
                vp_container_map_dma(c, 0x10000, 0x2000, host),
                VpStatus::VpOk
            );
            assert_ne!(
                vp_container_unmap_dma(c, 0x10000, 0x1000),
                VpStatus::VpOk,
                "a range that was not registered as such is refused"
            );
            assert!(last_error().contains("0x10000"), "{}", last_error());
            assert_eq!(vp_container_unmap_dma(c, 0x10000, 0x2000), VpStatus::VpOk);
            assert_ne!(vp_container_unmap_dma(c, 0x10000, 0x2000), VpStatus::VpOk);
            assert_eq!(
                vp_container_unmap_dma(ptr::null_mut(), 0, 1),
                VpStatus::VpErrInvalidArgument
            );
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
        drop(mem);
    }

    #[test]
    fn bad_bdf_is_an_invalid_argument_and_a_passed_fd_is_closed() {
        let (c, d) = sim_device();
        // Hand over the write end of a pipe: once the library closed it, the
        // read end sees EOF (checking the fd number would race with other
        // tests reusing it).
        let mut ends = [0 as c_int; 2];
        // SAFETY: `ends` has room for the two fds pipe2 writes.
        let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: pipe2 just created this fd and nothing else owns it.
        let read_end = unsafe { std::fs::File::from_raw_fd(ends[0]) };
        let raw = ends[1];
        // SAFETY: live handles; `raw` is an fd we own and hand over.
        unsafe {
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
            assert_eq!(
                vp_device_unpause(d, c"02:00.1".as_ptr(), raw, ptr::null_mut()),
                VpStatus::VpErrInvalidArgument
            );
            assert!(last_error().contains("invalid PCI address"));
            // The library closed the passed fd: EOF on the read end.
            let mut buf = [0u8; 1];
            assert_eq!(std::io::Read::read(&mut &read_end, &mut buf).unwrap(), 0);
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }

    #[test]
    fn pause_unpause_identity_state_and_timings_through_the_abi() {
        let (c, d) = sim_device();
        let mut t = VpTimings {
            noop: 9,
            total_ns: 0,
            phase_ns: [0; VP_PHASE_COUNT],
        };
        let mut state = 99;
        let mut id = VpIdentity::default();
        // SAFETY: live handles and valid out pointers.
        unsafe {
            assert_eq!(vp_device_identity(d, &mut id), VpStatus::VpOk);
            assert_eq!((id.vendor, id.class_code), (0x1b36, 0x010802));
            assert_eq!(vp_device_pause(d, &mut t), VpStatus::VpOk);
            assert_eq!(t.noop, 0);
            assert!(t.phase_ns[Phase::Close as usize] > 0);
            assert_eq!(vp_device_state(d, &mut state), VpStatus::VpOk);
            assert_eq!(state, DeviceState::Paused as u32);
            assert_eq!(vp_device_pause(d, &mut t), VpStatus::VpOk);
            assert_eq!(t.noop, 1);
            assert_eq!(
                vp_sim_remove_vf(c, c"0000:02:00.1".as_ptr()),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_unpause(d, c"0000:02:00.1".as_ptr(), -1, &mut t),
                VpStatus::VpErrVfGone
            );
            assert!(last_error().contains("0000:02:00.1"));
            assert_eq!(
                vp_sim_add_vf(c, c"0000:02:00.1".as_ptr(), &NVME),
                VpStatus::VpOk
            );
            assert_eq!(
                vp_device_unpause(d, c"0000:02:00.1".as_ptr(), -1, &mut t),
                VpStatus::VpOk
            );
            assert!(t.phase_ns[Phase::Reopen as usize] > 0);
            let (mut p, mut u) = (t, t);
            assert_eq!(vp_device_last_timings(d, &mut p, &mut u), VpStatus::VpOk);
            assert_eq!(u.total_ns, t.total_ns);
            assert_eq!(CStr::from_ptr(vp_phase_name(2)), c"irq-teardown");
            assert!(vp_phase_name(VP_PHASE_COUNT as u32).is_null());
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }

    #[test]
    fn irqs_and_config_writes_through_the_abi_survive_a_pause() {
        let (c, d) = sim_device();
        let efd = EventFd::new(0).unwrap();
        let fds = [efd.as_raw_fd(), efd.as_raw_fd()];
        let mut unplug = 9;
        // SAFETY: live handles and valid pointers.
        unsafe {
            assert_eq!(vp_device_set_irqs(d, 2, fds.as_ptr(), 2), VpStatus::VpOk);
            assert_eq!(
                vp_device_set_request_irq(d, efd.as_raw_fd()),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_request_is_unplug(d, &mut unplug), VpStatus::VpOk);
            assert_eq!(unplug, 1);
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
            assert_eq!(vp_device_request_is_unplug(d, &mut unplug), VpStatus::VpOk);
            assert_eq!(unplug, 0);
            let v = [0x0bu8];
            assert_eq!(
                vp_device_config_write(d, 0x3c, v.as_ptr(), 1),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_bar_write(d, 0, 0, v.as_ptr(), 1), VpStatus::VpOk);
            let sim = (*c).sim.clone().unwrap();
            assert_eq!(
                vp_device_unpause(d, c"0000:02:00.1".as_ptr(), -1, ptr::null_mut()),
                VpStatus::VpOk
            );
            let a: PciAddress = "0000:02:00.1".parse().unwrap();
            assert_eq!(sim.irqs_enabled(&a).get(&2), Some(&2));
            assert_eq!(sim.config_of(&a).unwrap()[0x3c], 0x0b);
            assert_eq!((*d).dev.access_counters().ignored_writes, 1);
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }

    #[test]
    fn c_hooks_are_called_with_bar_mmaps() {
        unsafe extern "C" fn unmap(opaque: *mut c_void, _id: *const c_char) -> c_int {
            // SAFETY: the test passes a pointer to a live [usize; 2].
            unsafe { (*opaque.cast::<[usize; 2]>())[0] += 1 };
            0
        }
        unsafe extern "C" fn map(
            opaque: *mut c_void,
            _id: *const c_char,
            _areas: *const VpMmapArea,
            count: usize,
        ) -> c_int {
            // SAFETY: as above.
            unsafe { (*opaque.cast::<[usize; 2]>())[1] += count };
            0
        }
        let mut counts = [0usize; 2];
        let hooks = VpHooks {
            opaque: (&mut counts as *mut [usize; 2]).cast(),
            unmap_bars: Some(unmap),
            map_bars: Some(map),
        };
        let mut c = ptr::null_mut();
        let mut d = ptr::null_mut();
        // SAFETY: live handles, valid pointers; `counts` outlives the device.
        unsafe {
            assert_eq!(vp_container_new_simulated(&mut c), VpStatus::VpOk);
            vp_sim_add_vf(c, c"0000:02:00.1".as_ptr(), &NVME);
            assert_eq!(
                vp_device_open(
                    c,
                    c"n".as_ptr(),
                    c"0000:02:00.1".as_ptr(),
                    -1,
                    5,
                    &hooks,
                    &mut d
                ),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
        assert_eq!(counts, [1, 1]);
    }

    /// A vCPU thread stalled inside `vp_device_bar_read` (60 s deadline)
    /// while another thread closes the device: the close ends the stall (the
    /// call returns "invalid state", not after 60 s) and frees the handle
    /// only after the call left it (before, this test died of SIGSEGV: the
    /// stalled call woke up in freed memory).
    #[test]
    fn close_ends_a_call_stalled_inside_the_handle_and_frees_it_after() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let mut c = ptr::null_mut();
        let mut d = ptr::null_mut();
        // SAFETY: valid out pointers and NUL-terminated literals.
        unsafe {
            assert_eq!(vp_container_new_simulated(&mut c), VpStatus::VpOk);
            vp_sim_add_vf(c, c"0000:02:00.1".as_ptr(), &NVME);
            assert_eq!(
                vp_device_open(
                    c,
                    c"n".as_ptr(),
                    c"0000:02:00.1".as_ptr(),
                    -1,
                    60_000,
                    ptr::null(),
                    &mut d
                ),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
        }
        let returned = AtomicU32::new(u32::MAX);
        struct Handle(*mut VpDevice);
        // SAFETY: the test hands the handle to one other thread, which the
        // ABI allows (handles are thread-safe).
        unsafe impl Send for Handle {}
        // SAFETY: as above.
        unsafe impl Sync for Handle {}
        let h = Handle(d);
        std::thread::scope(|s| {
            let (h, returned) = (&h, &returned);
            s.spawn(move || {
                let mut b = [0u8; 4];
                // SAFETY: live handle (until close, which waits for us), valid buffer.
                let st = unsafe { vp_device_bar_read(h.0, 0, 0, b.as_mut_ptr(), 4) };
                returned.store(st as u32, Ordering::SeqCst);
            });
            // Wait until the vCPU is stalled inside the handle.
            // SAFETY: live handle.
            while unsafe { &*h.0 }.dev.access_counters().stalled == 0 {
                std::thread::yield_now();
            }
            // SAFETY: live handle, closed once.
            assert_eq!(unsafe { vp_device_close(h.0) }, VpStatus::VpOk);
        });
        assert_eq!(
            returned.load(Ordering::SeqCst),
            VpStatus::VpErrInvalidState as u32,
            "the stalled read was ended by the close"
        );
        // SAFETY: live container handle.
        unsafe { vp_container_free(c) };
    }

    /// The non-blocking access of the C ABI: `VP_RETRY` while paused under
    /// the stall policy, a wait that ends at the unpause, then the access.
    #[test]
    fn try_bar_read_answers_retry_and_the_wait_ends_at_unpause() {
        let mut c = ptr::null_mut();
        let mut d = ptr::null_mut();
        // SAFETY: valid out pointers and NUL-terminated literals.
        unsafe {
            assert_eq!(vp_container_new_simulated(&mut c), VpStatus::VpOk);
            vp_sim_add_vf(c, c"0000:02:00.1".as_ptr(), &NVME);
            assert_eq!(
                vp_device_open(
                    c,
                    c"n".as_ptr(),
                    c"0000:02:00.1".as_ptr(),
                    -1,
                    60_000,
                    ptr::null(),
                    &mut d
                ),
                VpStatus::VpOk
            );
            assert_eq!(vp_device_pause(d, ptr::null_mut()), VpStatus::VpOk);
        }
        struct Handle(*mut VpDevice);
        // SAFETY: handles may be used from any thread.
        unsafe impl Send for Handle {}
        // SAFETY: as above.
        unsafe impl Sync for Handle {}
        let h = Handle(d);
        let (tx, rx) = std::sync::mpsc::channel();
        let value = std::thread::scope(|s| {
            let h = &h;
            let vcpu = s.spawn(move || {
                let mut stall = VpStall::default();
                let mut b = [0u8; 4];
                loop {
                    // SAFETY: live handle, valid buffer and stall.
                    match unsafe {
                        vp_device_try_bar_read(h.0, 0, 0, b.as_mut_ptr(), 4, &mut stall)
                    } {
                        VpStatus::VpOk => break,
                        VpStatus::VpRetry => {
                            assert_ne!(stall.deadline_ns, 0, "deadline kept across retries");
                            let _ = tx.send(());
                            // SAFETY: live handle and stall.
                            let st = unsafe { vp_device_wait_unpaused(h.0, &stall) };
                            assert_eq!(st, VpStatus::VpOk);
                        }
                        other => panic!("{other:?}: {}", last_error()),
                    }
                }
                u32::from_le_bytes(b)
            });
            rx.recv().unwrap();
            // SAFETY: live handle.
            let st =
                unsafe { vp_device_unpause(h.0, c"0000:02:00.1".as_ptr(), -1, ptr::null_mut()) };
            assert_eq!(st, VpStatus::VpOk);
            vcpu.join().unwrap()
        });
        assert_eq!(value, 0x0040_0fff);
        // SAFETY: live handles, closed once.
        unsafe {
            assert_eq!(vp_device_close(d), VpStatus::VpOk);
            vp_container_free(c);
        }
    }
}
