//! The pausable device and its state machine (documented on [`PausableDevice`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{irq, region, GroupId, MmapArea, VfId, VfSource};
use crate::container::Container;
use crate::error::{Error, Result};
use crate::pci::{cfg, Identity, PciAddress, Profile};
pub use svff_types::{DeviceState, PausePolicy, Phase};

/// Per-device options.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    /// Paused-access policy of [`PausableDevice::pause`] (a pause can choose
    /// another with [`PausableDevice::pause_with`]). Default: `ignore`.
    pub policy: PausePolicy,
    /// Deadline of each stalled access under the `stall` policy; bounded by
    /// [`svff_types::MAX_STALL`] whatever is set here.
    pub stall_deadline: Duration,
    /// mmap every mmap-able BAR at open/unpause and hand the areas to
    /// [`VmmHooks::map_bars`]; they are unmapped at pause.
    pub mmap_bars: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            policy: PausePolicy::Ignore,
            stall_deadline: svff_types::DEFAULT_STALL,
            mmap_bars: false,
        }
    }
}

impl DeviceOptions {
    /// The `stall` policy with this deadline per access.
    pub fn stall(deadline: Duration) -> Self {
        DeviceOptions {
            policy: PausePolicy::Stall,
            stall_deadline: deadline,
            ..Self::default()
        }
    }

    /// The same options with BAR mmaps on or off.
    pub fn with_mmap_bars(self, on: bool) -> Self {
        DeviceOptions {
            mmap_bars: on,
            ..self
        }
    }
}

/// Outcome of [`PausableDevice::try_bar_read`] / [`PausableDevice::try_bar_write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Access {
    /// The access was performed (attached), or answered per policy (ignored,
    /// or a stall whose deadline passed).
    Done,
    /// Stall policy and the device is not attached: release every lock the
    /// unpause may need (QEMU's BQL), call [`PausableDevice::wait_unpaused`]
    /// with the same [`Stall`], take the locks again and retry the access.
    Retry,
}

/// A stalled access's deadline, kept across its retries. Start every guest
/// access with `Stall::default()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stall {
    deadline: Option<Instant>,
}

impl Stall {
    /// When the access stops waiting (set by its first `Retry`).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// A stall with this deadline (for carrying it across an ABI).
    pub fn with_deadline(deadline: Option<Instant>) -> Self {
        Stall { deadline }
    }
}

/// What the VMM does for the device's guest BAR mappings.
///
/// Hooks run with the device's lock held (they are short: page-table
/// updates): they must not call back into the same [`PausableDevice`].
pub trait VmmHooks: Send + Sync {
    /// Remove every guest mapping of the device's BARs so guest accesses trap
    /// (and reach [`PausableDevice::bar_read`]/[`PausableDevice::bar_write`]).
    /// Called first in a pause; the mmaps are released after it returns.
    fn unmap_bars(&self, device: &str) -> std::result::Result<(), String>;

    /// Map these BAR areas (host mmaps of the VF) into the guest at the BAR
    /// addresses the guest programmed. Called last in open and unpause, with an
    /// empty slice when BARs are not mmapped.
    fn map_bars(&self, device: &str, areas: &[MmapArea]) -> std::result::Result<(), String>;
}

/// Hooks for a VMM that never maps BARs into the guest (every access traps).
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapAllBars;

impl VmmHooks for TrapAllBars {
    fn unmap_bars(&self, _device: &str) -> std::result::Result<(), String> {
        Ok(())
    }
    fn map_bars(&self, _device: &str, _areas: &[MmapArea]) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Per-phase timings of one pause or unpause.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    /// The call was a no-op (already in the target state).
    pub noop: bool,
    /// Phases in the order they ran.
    pub phases: Vec<(Phase, Duration)>,
    /// Wall time of the whole call.
    pub total: Duration,
}

impl Timings {
    /// Time of one phase, if it ran.
    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
    }
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.noop {
            return write!(f, "no-op");
        }
        write!(f, "total {:.3} ms", self.total.as_secs_f64() * 1e3)?;
        for (p, d) in &self.phases {
            write!(f, ", {} {:.3} ms", p.name(), d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// Counters of guest accesses while paused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCounters {
    /// BAR reads answered with all-ones.
    pub ignored_reads: u64,
    /// BAR writes dropped.
    pub ignored_writes: u64,
    /// BAR accesses that waited (stall policy).
    pub stalled: u64,
    /// Config reads served from the shadow.
    pub shadow_reads: u64,
    /// Config writes kept in the shadow for the unpause.
    pub shadow_writes: u64,
}

struct Inner {
    state: DeviceState,
    vf: Option<VfId>,
    group: Option<GroupId>,
    host: PciAddress,
    /// What a replacement function must match (identity, BARs, MSI-X, capabilities).
    profile: Profile,
    config_size: usize,
    /// Sizes of BAR0-5 (0: not implemented), for BAR sizing against the shadow.
    bar_sizes: [u64; 6],
    /// Low (type) bits of each BAR dword as the VF reported them at pause.
    shadow_bar_flags: [u32; 6],
    shadow: Vec<u8>,
    /// One flag per shadow byte: written by the guest while not attached,
    /// to be written to the function at unpause (a mask, not a log).
    dirty: Vec<bool>,
    irqs: BTreeMap<u32, Vec<EventFd>>,
    request: Option<EventFd>,
    mmaps: Vec<MmapArea>,
    counters: AccessCounters,
    /// Policy and stall deadline of the current (or last) pause.
    policy: PausePolicy,
    stall: Duration,
    last_pause: Option<Timings>,
    last_unpause: Option<Timings>,
}

/// A passed-through VF that can release every host resource while the guest
/// keeps the device.
///
/// # States and transitions
///
/// | from     | operation          | success  | failure (state after, fds of the VF) |
/// |----------|--------------------|----------|---------------------------------------|
/// | attached | `pause()`          | paused   | see "failed pause" below |
/// | paused   | `pause()`          | paused (no-op, `Timings::noop`) | - |
/// | paused   | `unpause(source)`  | attached | paused, no fd of the new VF open; the passed group fd is closed |
/// | attached | `unpause(source)`  | attached (no-op; a passed group fd is closed) | - |
/// | attached | `detach()`         | detached | detached, every fd released, first error returned |
/// | paused   | `detach()`         | detached | - |
/// | detached | anything           | -        | `Error::InvalidState`, stays detached |
///
/// Failed pause, by step:
/// 1. VMM hook `unmap_bars` fails: attached, nothing changed.
/// 2. config snapshot fails: guest BAR mappings are restored (`map_bars`),
///    attached. If that hook fails too: `Error::RollbackFailed`, still
///    attached (accesses then trap and are forwarded, so the device works).
/// 3. disabling an interrupt fails: the interrupts already disabled are
///    re-enabled and BAR mappings restored, attached. If that rollback fails,
///    the pause is completed instead: `Error::RollbackFailed`, paused.
/// 4. munmap or close fails: paused (the backend releases every fd even when
///    it reports an error), the error is returned.
///
/// In no case is a device left half-open: it is either attached with all its
/// resources, or paused/detached with none.
///
/// # What a pause keeps and an unpause restores
///
/// - Config space: snapshot at pause into a shadow that serves guest config
///   reads while paused; guest writes go to the shadow (BAR sizing is
///   emulated with the BAR sizes) and are replayed at unpause. The unpause
///   writes the BARs as the guest programmed them, then every other byte the
///   guest wrote while paused (a dirty mask over the shadow, not a log),
///   then the command register (decoding enabled last).
/// - Interrupts: the eventfds the VMM wired with [`PausableDevice::set_irqs`]
///   (INTx, MSI, MSI-X) and [`PausableDevice::set_request_irq`] are kept and
///   wired again on the new VF (the guest's MSI/MSI-X messages live in the
///   VMM's irqfd routes, which do not change). While paused the request IRQ
///   is not an unplug request ([`PausableDevice::request_is_unplug`]).
/// - Guest DMA: re-mapped by the [`Container`] if it lost it.
/// - BAR mappings: with [`DeviceOptions::mmap_bars`], BARs are mmapped again
///   and handed to [`VmmHooks::map_bars`].
///
/// Not restored: device-internal state (queues, registers written through
/// BARs) — the guest driver must recover it, as after an FLR.
pub struct PausableDevice {
    id: String,
    container: Arc<Container>,
    hooks: Arc<dyn VmmHooks>,
    options: DeviceOptions,
    inner: Mutex<Inner>,
    unpaused: Condvar,
}

impl fmt::Debug for PausableDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("PausableDevice")
            .field("id", &self.id)
            .field("state", &g.state)
            .field("host", &g.host.to_string())
            .finish()
    }
}

struct PhaseClock {
    start: Instant,
    phases: Vec<(Phase, Duration)>,
}

impl PhaseClock {
    fn new() -> Self {
        PhaseClock {
            start: Instant::now(),
            phases: Vec::with_capacity(8),
        }
    }
    fn run<T>(&mut self, p: Phase, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.phases.push((p, t.elapsed()));
        r
    }
    fn done_ref(&self) -> Timings {
        Timings {
            noop: false,
            phases: self.phases.clone(),
            total: self.start.elapsed(),
        }
    }
    #[allow(dead_code)]
    fn done(self) -> Timings {
        Timings {
            noop: false,
            phases: self.phases,
            total: self.start.elapsed(),
        }
    }
}

fn noop() -> Timings {
    Timings {
        noop: true,
        ..Timings::default()
    }
}

impl PausableDevice {
    /// Open a VF and attach it (the initial attach of a device to a VM).
    pub fn open(
        id: impl Into<String>,
        container: Arc<Container>,
        source: VfSource,
        options: DeviceOptions,
        hooks: Arc<dyn VmmHooks>,
    ) -> Result<Self> {
        let id = id.into();
        let host = *source.address();
        let opened = container.open_vf(source)?;
        let vf = opened.vf;
        let setup = || -> Result<(Profile, usize, Vec<MmapArea>)> {
            let (identity, config_size) = read_profile(&container, vf, &host)?;
            let mut mmaps = Vec::new();
            let r = (|| {
                if options.mmap_bars {
                    mmap_bars(&container, vf, &mut mmaps)?;
                }
                hooks.map_bars(&id, &mmaps).map_err(|reason| {
                    // Undo a map that failed half-way before the munmap below.
                    if let Err(r) = hooks.unmap_bars(&id) {
                        tracing::warn!("device {id}: unmap_bars after failed map_bars: {r}");
                    }
                    Error::Hook {
                        device: id.clone(),
                        hook: "map_bars",
                        reason,
                    }
                })
            })();
            match r {
                Ok(()) => Ok((identity, config_size, mmaps)),
                Err(e) => {
                    munmap_all(&container, vf, &mut mmaps);
                    Err(e)
                }
            }
        };
        let bar_sizes = bar_sizes(&container, vf);
        let (identity, config_size, mmaps) = match setup() {
            Ok(v) => v,
            Err(e) => {
                if let Err(c) = container.close_vf(vf, opened.group) {
                    tracing::warn!("device {id}: close after failed open: {c}");
                }
                return Err(e);
            }
        };
        Ok(PausableDevice {
            id,
            container,
            hooks,
            options,
            inner: Mutex::new(Inner {
                state: DeviceState::Attached,
                vf: Some(vf),
                group: Some(opened.group),
                host,
                profile: identity,
                config_size,
                bar_sizes,
                shadow_bar_flags: [0; 6],
                shadow: Vec::new(),
                dirty: Vec::new(),
                irqs: BTreeMap::new(),
                request: None,
                mmaps,
                counters: AccessCounters::default(),
                policy: options.policy,
                stall: PausePolicy::bounded_stall(options.stall_deadline),
                last_pause: None,
                last_unpause: None,
            }),
            unpaused: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invalid(&self, op: &'static str, state: DeviceState) -> Error {
        Error::InvalidState {
            device: self.id.clone(),
            op,
            state,
        }
    }

    /// The VMM's id of this device.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Current state.
    pub fn state(&self) -> DeviceState {
        self.lock().state
    }

    /// Identity of the function first attached (what unpause checks against).
    pub fn identity(&self) -> Identity {
        self.lock().profile.identity
    }

    /// Host address of the VF currently (or, when paused, last) attached.
    pub fn host(&self) -> PciAddress {
        self.lock().host
    }

    /// Timings of the last pause and the last unpause.
    pub fn last_timings(&self) -> (Option<Timings>, Option<Timings>) {
        let g = self.lock();
        (g.last_pause.clone(), g.last_unpause.clone())
    }

    /// Counters of guest accesses handled while paused.
    pub fn access_counters(&self) -> AccessCounters {
        self.lock().counters
    }

    /// Whether a request IRQ from the kernel should be treated as a hot-unplug
    /// request: only while attached. A paused device never holds the VF, so a
    /// request then is not about it.
    pub fn request_is_unplug(&self) -> bool {
        let g = self.lock();
        g.state == DeviceState::Attached && g.request.is_some()
    }

    /// Pause: drop guest BAR mappings, snapshot config, disable IRQs, close
    /// every fd of the VF. When this returns `Ok`, no fd of the VF is open.
    /// Guest accesses get the device's [`DeviceOptions::policy`].
    pub fn pause(&self) -> Result<Timings> {
        self.pause_with(self.options.policy, self.options.stall_deadline)
    }

    /// [`PausableDevice::pause`] with this paused-access policy (and, for
    /// `stall`, this deadline per access, bounded by [`svff_types::MAX_STALL`])
    /// instead of the device's default; it holds until the device is attached
    /// again. A no-op when paused.
    ///
    /// The device lock is held only for the quick steps (hooks, snapshot, IRQ
    /// teardown, munmap); the close with its function reset runs outside it
    /// in state `pausing`, in which guest accesses are answered as while paused.
    pub fn pause_with(&self, policy: PausePolicy, stall_deadline: Duration) -> Result<Timings> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Paused => return Ok(noop()),
            DeviceState::Attached => {}
            state => return Err(self.invalid("pause", state)),
        }
        let vf = g.vf.expect("attached devices have a VF");
        let mut clock = PhaseClock::new();
        let c = &self.container;

        clock
            .run(Phase::UnmapBars, || self.hooks.unmap_bars(&self.id))
            .map_err(|reason| Error::Hook {
                device: self.id.clone(),
                hook: "unmap_bars",
                reason,
            })?;

        let size = g.config_size;
        let snap = clock.run(Phase::Snapshot, || {
            let mut buf = vec![0u8; size];
            c.with_backend(|b| b.region_read(vf, region::CONFIG, 0, &mut buf))
                .map(|()| buf)
        });
        let shadow = match snap {
            Ok(s) => s,
            Err(e) => {
                return match self.hooks.map_bars(&self.id, &g.mmaps) {
                    Ok(()) => Err(e),
                    Err(reason) => Err(self.rollback_failed(e, reason, DeviceState::Attached)),
                };
            }
        };

        let teardown = clock.run(Phase::IrqTeardown, || -> (Vec<u32>, Result<()>) {
            let mut disabled = Vec::new();
            let mut indices: Vec<u32> = Vec::new();
            if g.request.is_some() {
                indices.push(irq::REQ);
            }
            indices.extend(g.irqs.keys().copied());
            for index in indices {
                if let Err(e) = c.with_backend(|b| b.set_irqs(vf, index, &[])) {
                    return (disabled, Err(e));
                }
                disabled.push(index);
            }
            (disabled, Ok(()))
        });
        if let (disabled, Err(e)) = teardown {
            match self.enable_irqs(&g, vf, &disabled).and_then(|()| {
                self.hooks
                    .map_bars(&self.id, &g.mmaps)
                    .map_err(|reason| Error::Hook {
                        device: self.id.clone(),
                        hook: "map_bars",
                        reason,
                    })
            }) {
                Ok(()) => return Err(e),
                Err(rb) => {
                    // Cannot get back to attached: finish the pause instead.
                    if let Err(re) = self.release(&mut g, vf, &mut clock) {
                        tracing::warn!("device {}: release after failed rollback: {re}", self.id);
                    }
                    install_shadow(&mut g, shadow, policy, stall_deadline);
                    g.state = DeviceState::Paused;
                    return Err(Error::RollbackFailed {
                        device: self.id.clone(),
                        original: Box::new(e),
                        rollback: Box::new(rb),
                        state: DeviceState::Paused,
                    });
                }
            }
        }

        let mut first = self.munmap(&mut g, vf, &mut clock).err();
        install_shadow(&mut g, shadow, policy, stall_deadline);
        let group = g.group.take().expect("open VFs have a group");
        g.vf = None;
        g.state = DeviceState::Pausing;
        drop(g);
        if let Err(e) = clock.run(Phase::Close, || c.close_vf(vf, group)) {
            first.get_or_insert(e);
        }
        let mut g = self.lock();
        g.state = DeviceState::Paused;
        let t = clock.done();
        g.last_pause = Some(t.clone());
        first.map_or(Ok(t), Err)
    }

    fn rollback_failed(&self, original: Error, reason: String, state: DeviceState) -> Error {
        Error::RollbackFailed {
            device: self.id.clone(),
            original: Box::new(original),
            rollback: Box::new(Error::Hook {
                device: self.id.clone(),
                hook: "map_bars",
                reason,
            }),
            state,
        }
    }

    /// Release every BAR mmap (the VMM's guest mappings are gone already).
    fn munmap(&self, g: &mut Inner, vf: VfId, clock: &mut PhaseClock) -> Result<()> {
        let c = &self.container;
        let mut first: Option<Error> = None;
        let mmaps = std::mem::take(&mut g.mmaps);
        clock.run(Phase::Munmap, || {
            for m in mmaps {
                if let Err(e) = c.with_backend(|b| b.munmap_region(vf, m)) {
                    first.get_or_insert(e);
                }
            }
        });
        first.map_or(Ok(()), Err)
    }

    /// munmap every BAR and close the VF, with the lock held (detach and a
    /// pause that could not roll back); always ends with no fd open.
    fn release(&self, g: &mut Inner, vf: VfId, clock: &mut PhaseClock) -> Result<()> {
        let c = &self.container;
        let mut first = self.munmap(g, vf, clock).err();
        let group = g.group.take().expect("open VFs have a group");
        let closed = clock.run(Phase::Close, || c.close_vf(vf, group));
        g.vf = None;
        if let Err(e) = closed {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    fn enable_irqs(&self, g: &Inner, vf: VfId, indices: &[u32]) -> Result<()> {
        for &index in indices {
            let fds: Vec<&EventFd> = if index == irq::REQ {
                g.request.iter().collect()
            } else {
                g.irqs
                    .get(&index)
                    .map(|v| v.iter().collect())
                    .unwrap_or_default()
            };
            self.container
                .with_backend(|b| b.set_irqs(vf, index, &fds))?;
        }
        Ok(())
    }

    /// Unpause onto `source` (same or another VF, own open or passed group fd):
    /// reopen, check identity, re-map DMA if the container lost it, restore
    /// config, IRQs and BAR mappings. On error the device stays paused with no
    /// fd of the new VF open.
    ///
    /// The open (group join, DMA re-map, device fd with its function reset)
    /// and the identity check run outside the device lock, in state
    /// `unpausing`, in which guest accesses are answered as while paused;
    /// the restore runs under it and ends attached.
    pub fn unpause(&self, source: VfSource) -> Result<Timings> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => return Ok(noop()),
            DeviceState::Paused => {}
            state => return Err(self.invalid("unpause", state)),
        }
        g.state = DeviceState::Unpausing;
        let (paused, paused_at) = (g.profile.clone(), g.host);
        drop(g);
        let mut clock = PhaseClock::new();
        let offered_at = *source.address();
        let c = &self.container;
        let opened = match c.open_vf(source) {
            Ok(o) => o,
            Err(e) => {
                self.lock().state = DeviceState::Paused;
                return Err(e);
            }
        };
        let vf = opened.vf;
        clock.phases.push((Phase::Reopen, opened.open));
        if let Some(r) = opened.remap {
            clock.phases.push((Phase::DmaRemap, r));
        }
        // Nothing is written to the new function before it passed this check.
        let checked = clock
            .run(Phase::Identity, || read_profile(c, vf, &offered_at))
            .and_then(|(offered, _)| match paused.difference(&offered) {
                None => Ok(()),
                Some(what) => Err(Error::IdentityMismatch {
                    device: self.id.clone(),
                    what,
                    paused: paused.identity,
                    paused_at,
                    offered: offered.identity,
                    offered_at,
                }),
            });
        let mut mmaps = Vec::new();
        let res = checked.and_then(|()| {
            let mut g = self.lock();
            let r = self
                .check_irqs_fit(&g, vf, &paused, &offered_at)
                .and_then(|()| self.bring_up(&mut g, vf, &mut clock, &mut mmaps));
            if r.is_ok() {
                g.bar_sizes = bar_sizes(c, vf);
                g.vf = Some(vf);
                g.group = Some(opened.group);
                g.mmaps = std::mem::take(&mut mmaps);
                g.host = offered_at;
                g.state = DeviceState::Attached;
                g.shadow = Vec::new();
                g.dirty = Vec::new();
                g.last_unpause = Some(clock.done_ref());
            }
            r
        });
        if let Err(e) = res {
            munmap_all(c, vf, &mut mmaps);
            if let Err(ce) = c.close_vf(vf, opened.group) {
                tracing::warn!("device {}: close after failed unpause: {ce}", self.id);
            }
            self.lock().state = DeviceState::Paused;
            return Err(e);
        }
        self.unpaused.notify_all();
        Ok(self.lock().last_unpause.clone().expect("just set"))
    }

    /// The interrupt vectors the VMM wired must exist on the new function.
    fn check_irqs_fit(
        &self,
        g: &Inner,
        vf: VfId,
        paused: &Profile,
        offered_at: &PciAddress,
    ) -> Result<()> {
        let mut wired: Vec<(u32, usize)> = g.irqs.iter().map(|(&i, f)| (i, f.len())).collect();
        if g.request.is_some() {
            wired.push((irq::REQ, 1));
        }
        for (index, n) in wired {
            let offered = self.container.with_backend(|b| b.irq_count(vf, index))?;
            if n > offered as usize {
                return Err(Error::IdentityMismatch {
                    device: self.id.clone(),
                    what: format!(
                        "{n} vectors of interrupt index {index} are wired, the new function offers {offered}"
                    ),
                    paused: paused.identity,
                    paused_at: g.host,
                    offered: paused.identity,
                    offered_at: *offered_at,
                });
            }
        }
        Ok(())
    }

    fn bring_up(
        &self,
        g: &mut Inner,
        vf: VfId,
        clock: &mut PhaseClock,
        mmaps: &mut Vec<MmapArea>,
    ) -> Result<()> {
        let c = &self.container;
        clock.run(Phase::Restore, || -> Result<()> {
            let bars = g
                .shadow
                .get(cfg::BAR0..cfg::BAR_END)
                .unwrap_or(&[])
                .to_vec();
            c.with_backend(|b| -> Result<()> {
                for (i, dw) in bars.chunks(4).enumerate() {
                    b.region_write(vf, region::CONFIG, (cfg::BAR0 + 4 * i) as u64, dw)?;
                }
                for (off, len) in dirty_runs(&g.dirty) {
                    b.region_write(vf, region::CONFIG, off as u64, &g.shadow[off..off + len])?;
                }
                if let Some(cmd) = g.shadow.get(cfg::COMMAND..cfg::COMMAND + 2) {
                    b.region_write(vf, region::CONFIG, cfg::COMMAND as u64, cmd)?;
                }
                Ok(())
            })
        })?;
        clock.run(Phase::IrqSetup, || {
            let mut indices: Vec<u32> = g.irqs.keys().copied().collect();
            if g.request.is_some() {
                indices.push(irq::REQ);
            }
            self.enable_irqs(g, vf, &indices)
        })?;
        if self.options.mmap_bars {
            clock.run(Phase::Mmap, || mmap_bars(c, vf, mmaps))?;
        }
        clock
            .run(Phase::MapBars, || self.hooks.map_bars(&self.id, mmaps))
            .map_err(|reason| {
                // The hook may have mapped some areas before it failed: the
                // guest must not keep mappings of what is munmapped next.
                self.undo_map_bars();
                Error::Hook {
                    device: self.id.clone(),
                    hook: "map_bars",
                    reason,
                }
            })
    }

    fn undo_map_bars(&self) {
        if let Err(r) = self.hooks.unmap_bars(&self.id) {
            tracing::warn!("device {}: unmap_bars after failed map_bars: {r}", self.id);
        }
    }

    /// Close for good (hot-unplug). Ends detached with every fd released, even
    /// when an error is returned.
    pub fn detach(&self) -> Result<()> {
        let mut g = self.lock();
        let res = match g.state {
            DeviceState::Detached | DeviceState::Pausing | DeviceState::Unpausing => {
                return Err(self.invalid("detach", g.state))
            }
            DeviceState::Paused => Ok(()),
            DeviceState::Attached => {
                let vf = g.vf.expect("attached devices have a VF");
                let mut first = self
                    .hooks
                    .unmap_bars(&self.id)
                    .map_err(|reason| Error::Hook {
                        device: self.id.clone(),
                        hook: "unmap_bars",
                        reason,
                    })
                    .err();
                let mut indices: Vec<u32> = g.irqs.keys().copied().collect();
                if g.request.is_some() {
                    indices.push(irq::REQ);
                }
                for index in indices {
                    if let Err(e) = self.container.with_backend(|b| b.set_irqs(vf, index, &[])) {
                        first.get_or_insert(e);
                    }
                }
                let mut clock = PhaseClock::new();
                if let Err(e) = self.release(&mut g, vf, &mut clock) {
                    first.get_or_insert(e);
                }
                first.map_or(Ok(()), Err)
            }
        };
        g.state = DeviceState::Detached;
        g.irqs.clear();
        g.request = None;
        drop(g);
        self.unpaused.notify_all();
        res
    }

    /// Guest config-space read. Not attached (pausing, paused, unpausing):
    /// served from the shadow, without waiting for a transition.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => {
                check_config(&g, offset, buf.len())?;
                let vf = g.vf.expect("attached devices have a VF");
                self.container
                    .with_backend(|b| b.region_read(vf, region::CONFIG, offset, buf))
            }
            s if s.is_paused_view() => {
                let o = check_config(&g, offset, buf.len())?;
                buf.copy_from_slice(&g.shadow[o..o + buf.len()]);
                g.counters.shadow_reads += 1;
                Ok(())
            }
            s => Err(self.invalid("read config", s)),
        }
    }

    /// Guest config-space write. Not attached: written to the shadow and
    /// applied at unpause.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => {
                check_config(&g, offset, data.len())?;
                let vf = g.vf.expect("attached devices have a VF");
                self.container
                    .with_backend(|b| b.region_write(vf, region::CONFIG, offset, data))
            }
            s if s.is_paused_view() => {
                let o = check_config(&g, offset, data.len())?;
                g.shadow[o..o + data.len()].copy_from_slice(data);
                emulate_bar_sizing(&mut g, o, data.len());
                g.dirty[o..o + data.len()].fill(true);
                g.counters.shadow_writes += 1;
                Ok(())
            }
            s => Err(self.invalid("write config", s)),
        }
    }

    /// Under the stall policy, whether the access must wait (again); starts
    /// its bounded deadline on the first call.
    fn must_stall(g: &mut Inner, stall: &mut Stall) -> bool {
        if g.policy != PausePolicy::Stall {
            return false;
        }
        let now = Instant::now();
        let deadline = *stall.deadline.get_or_insert_with(|| {
            g.counters.stalled += 1;
            // g.stall is bounded by MAX_STALL; checked anyway.
            now.checked_add(g.stall).unwrap_or(now)
        });
        now < deadline
    }

    /// Wait until the device is attached (or detached) or the stall's
    /// deadline passes. Holds no lock while waiting but the device's own
    /// (released by the condition variable): call it after releasing every
    /// lock the unpause may need. Returns at once for a `Stall` that never
    /// got a `Retry`.
    pub fn wait_unpaused(&self, stall: &Stall) {
        let Some(deadline) = stall.deadline else {
            return;
        };
        let mut g = self.lock();
        while g.state.is_paused_view() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .unpaused
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Guest read of BAR `bar` (a trapped access) for a VMM that holds locks
    /// the unpause needs (QEMU's BQL): never blocks on a pause. Not
    /// attached: `ignore` answers all-ones; `stall` answers [`Access::Retry`]
    /// until the device is attached or the deadline kept in `stall` passes,
    /// then all-ones.
    pub fn try_bar_read(
        &self,
        bar: u32,
        offset: u64,
        buf: &mut [u8],
        stall: &mut Stall,
    ) -> Result<Access> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => {
                let index = check_bar(&g, bar, offset, buf.len())?;
                let vf = g.vf.expect("attached devices have a VF");
                self.container
                    .with_backend(|b| b.region_read(vf, index, offset, buf))?;
                Ok(Access::Done)
            }
            s if s.is_paused_view() => {
                check_bar(&g, bar, offset, buf.len())?;
                if Self::must_stall(&mut g, stall) {
                    return Ok(Access::Retry);
                }
                buf.fill(0xff);
                g.counters.ignored_reads += 1;
                Ok(Access::Done)
            }
            s => Err(self.invalid("read BAR", s)),
        }
    }

    /// Guest write of BAR `bar`, as [`PausableDevice::try_bar_read`]: not
    /// attached, `ignore` drops it, `stall` retries until attached or the
    /// deadline, then drops it.
    pub fn try_bar_write(
        &self,
        bar: u32,
        offset: u64,
        data: &[u8],
        stall: &mut Stall,
    ) -> Result<Access> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => {
                let index = check_bar(&g, bar, offset, data.len())?;
                let vf = g.vf.expect("attached devices have a VF");
                self.container
                    .with_backend(|b| b.region_write(vf, index, offset, data))?;
                Ok(Access::Done)
            }
            s if s.is_paused_view() => {
                check_bar(&g, bar, offset, data.len())?;
                if Self::must_stall(&mut g, stall) {
                    return Ok(Access::Retry);
                }
                g.counters.ignored_writes += 1;
                Ok(Access::Done)
            }
            s => Err(self.invalid("write BAR", s)),
        }
    }

    /// Guest read of BAR `bar` for a VMM whose access path holds no lock the
    /// unpause needs: [`PausableDevice::try_bar_read`], waiting out `Retry`s
    /// with [`PausableDevice::wait_unpaused`] (at most the bounded deadline).
    pub fn bar_read(&self, bar: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut stall = Stall::default();
        while self.try_bar_read(bar, offset, buf, &mut stall)? == Access::Retry {
            self.wait_unpaused(&stall);
        }
        Ok(())
    }

    /// Guest write of BAR `bar`, as [`PausableDevice::bar_read`].
    pub fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut stall = Stall::default();
        while self.try_bar_write(bar, offset, data, &mut stall)? == Access::Retry {
            self.wait_unpaused(&stall);
        }
        Ok(())
    }

    /// Wire interrupt `index` (INTx/MSI/MSI-X) to the VMM's eventfds (vector n
    /// -> `fds[n]`); empty disables it. Kept across pauses and re-wired at unpause.
    pub fn set_irqs(&self, index: u32, fds: Vec<EventFd>) -> Result<()> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => {
                let vf = g.vf.expect("attached devices have a VF");
                let refs: Vec<&EventFd> = fds.iter().collect();
                self.container
                    .with_backend(|b| b.set_irqs(vf, index, &refs))?;
            }
            DeviceState::Paused | DeviceState::Pausing | DeviceState::Unpausing => {}
            DeviceState::Detached => return Err(self.invalid("set irqs", g.state)),
        }
        if fds.is_empty() {
            g.irqs.remove(&index);
        } else {
            g.irqs.insert(index, fds);
        }
        Ok(())
    }

    /// Number of vectors the VF offers for interrupt `index` (0: none).
    /// Needs the VF, so only while attached.
    pub fn irq_count(&self, index: u32) -> Result<u32> {
        let g = self.lock();
        match (g.state, g.vf) {
            (DeviceState::Attached, Some(vf)) => {
                self.container.with_backend(|b| b.irq_count(vf, index))
            }
            (state, _) => Err(self.invalid("query irqs", state)),
        }
    }

    /// Fire vector `vector` of interrupt `index` from the host side: the
    /// kernel signals the eventfd wired to it (a self-test of the wiring).
    /// Only while attached.
    pub fn trigger_irq(&self, index: u32, vector: u32) -> Result<()> {
        let g = self.lock();
        match (g.state, g.vf) {
            (DeviceState::Attached, Some(vf)) => self
                .container
                .with_backend(|b| b.trigger_irq(vf, index, vector)),
            (state, _) => Err(self.invalid("trigger an irq", state)),
        }
    }

    /// Wire (or, with `None`, unwire) the kernel's device-request IRQ.
    pub fn set_request_irq(&self, fd: Option<EventFd>) -> Result<()> {
        let mut g = self.lock();
        match g.state {
            DeviceState::Attached => {
                let vf = g.vf.expect("attached devices have a VF");
                let refs: Vec<&EventFd> = fd.iter().collect();
                self.container
                    .with_backend(|b| b.set_irqs(vf, irq::REQ, &refs))?;
            }
            DeviceState::Paused | DeviceState::Pausing | DeviceState::Unpausing => {}
            DeviceState::Detached => return Err(self.invalid("set request irq", g.state)),
        }
        g.request = fd;
        Ok(())
    }

    /// What the kernel says about region `index` of the attached VF
    /// (size, flags, whether the MSI-X table may be mmapped).
    pub fn region_info(&self, index: u32) -> Result<crate::backend::RegionInfo> {
        let g = self.lock();
        match (g.state, g.vf) {
            (DeviceState::Attached, Some(vf)) => {
                self.container.with_backend(|b| b.region_info(vf, index))
            }
            (state, _) => Err(self.invalid("query a region", state)),
        }
    }

    /// Host mmaps of the BARs currently held (empty while paused): the
    /// mmap-able areas of each BAR without the MSI-X table and PBA pages.
    pub fn bar_mmaps(&self) -> Vec<MmapArea> {
        self.lock().mmaps.clone()
    }
}

impl Drop for PausableDevice {
    fn drop(&mut self) {
        let state = self.lock().state;
        if state != DeviceState::Detached {
            if let Err(e) = self.detach() {
                tracing::warn!("device {}: detach at drop: {e}", self.id);
            }
        }
    }
}

/// Check a config access against the config size; returns the offset.
fn check_config(g: &Inner, offset: u64, len: usize) -> Result<usize> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= g.config_size as u64 => Ok(offset as usize),
        _ => Err(Error::OutOfRange {
            address: g.host,
            what: format!(
                "config access {offset:#x}+{len} outside config space (size {:#x})",
                g.config_size
            ),
        }),
    }
}

/// Check a BAR access (BAR 0-5 only: index 7 would be config space) against
/// the BAR's size; returns the VFIO region index.
fn check_bar(g: &Inner, bar: u32, offset: u64, len: usize) -> Result<u32> {
    let size = g.bar_sizes.get(bar as usize).copied().unwrap_or(0);
    match offset.checked_add(len as u64) {
        Some(end) if size > 0 && end <= size => Ok(region::BAR0 + bar),
        _ => Err(Error::OutOfRange {
            address: g.host,
            what: format!("BAR {bar} access {offset:#x}+{len} outside the BAR (size {size:#x})"),
        }),
    }
}

/// Runs of dirty bytes outside the BARs and the command register (written
/// separately), split at dword boundaries, as (offset, length).
fn dirty_runs(dirty: &[bool]) -> Vec<(usize, usize)> {
    let skip = |o: usize| {
        (cfg::BAR0..cfg::BAR_END).contains(&o) || (cfg::COMMAND..cfg::COMMAND + 2).contains(&o)
    };
    let mut runs = Vec::new();
    let mut o = 0;
    while o < dirty.len() {
        if !dirty[o] || skip(o) {
            o += 1;
            continue;
        }
        let start = o;
        while o < dirty.len() && dirty[o] && !skip(o) && (o == start || o % 4 != 0) {
            o += 1;
        }
        runs.push((start, o - start));
    }
    runs
}

fn install_shadow(g: &mut Inner, shadow: Vec<u8>, policy: PausePolicy, stall: Duration) {
    g.shadow_bar_flags = bar_flags(&shadow);
    g.dirty = vec![false; shadow.len()];
    g.shadow = shadow;
    g.policy = policy;
    g.stall = PausePolicy::bounded_stall(stall);
}

fn bar_flags(config: &[u8]) -> [u32; 6] {
    let mut f = [0u32; 6];
    for (i, v) in f.iter_mut().enumerate() {
        let o = cfg::BAR0 + 4 * i;
        if let Some(b) = config.get(o..o + 4) {
            let dw = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            *v = if dw & 1 == 1 { dw & 0x3 } else { dw & 0xf };
        }
    }
    f
}

fn bar_sizes(c: &Container, vf: VfId) -> [u64; 6] {
    let mut sizes = [0u64; 6];
    for (i, s) in sizes.iter_mut().enumerate() {
        *s = c
            .with_backend(|b| b.region_info(vf, region::BAR0 + i as u32))
            .map(|r| r.size)
            .unwrap_or(0);
    }
    sizes
}

/// Make BAR dwords of the shadow read back like hardware after a guest write
/// (address bits below the BAR size read as zero, type bits are read-only),
/// so a guest sizing BARs while paused sees the real sizes.
fn emulate_bar_sizing(g: &mut Inner, offset: usize, len: usize) {
    let mut i = 0;
    while i < 6 {
        let lo = cfg::BAR0 + 4 * i;
        let size = g.bar_sizes[i];
        let flags = g.shadow_bar_flags[i];
        let is_io = flags & 1 == 1;
        let is_64 = !is_io && (flags >> 1) & 3 == 2;
        let touched = |o: usize| offset < o + 4 && o < offset + len;
        let dw = |s: &[u8], o: usize| u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
        if touched(lo) {
            let v = dw(&g.shadow, lo);
            let mask = if size == 0 { 0 } else { !((size - 1) as u32) };
            let keep = if is_io { 0x3 } else { 0xf };
            let nv = if size == 0 {
                0
            } else {
                (v & mask & !keep) | (flags & keep)
            };
            g.shadow[lo..lo + 4].copy_from_slice(&nv.to_le_bytes());
        }
        if is_64 && i + 1 < 6 && touched(lo + 4) {
            let v = dw(&g.shadow, lo + 4);
            let mask = if size == 0 {
                0
            } else {
                !(((size - 1) >> 32) as u32)
            };
            g.shadow[lo + 4..lo + 8].copy_from_slice(&(v & mask).to_le_bytes());
        }
        i += if is_64 { 2 } else { 1 };
    }
}

fn read_profile(c: &Container, vf: VfId, at: &PciAddress) -> Result<(Profile, usize)> {
    let (config, size, bars) = c.with_backend(|b| -> Result<(Vec<u8>, usize, [u64; 6])> {
        let size = (b.region_info(vf, region::CONFIG)?.size as usize)
            .clamp(cfg::HEADER_SIZE, cfg::MAX_SIZE);
        // The standard part whole; of the extended part only the capability
        // headers (a 4 KiB read costs milliseconds under emulation).
        let mut config = vec![0u8; size];
        let std_len = size.min(0x100);
        b.region_read(vf, region::CONFIG, 0, &mut config[..std_len])?;
        let mut off = 0x100usize;
        for _ in 0..64 {
            if off < 0x100 || off + 4 > size {
                break;
            }
            b.region_read(vf, region::CONFIG, off as u64, &mut config[off..off + 4])?;
            let hdr = u32::from_le_bytes(config[off..off + 4].try_into().expect("4 bytes"));
            if hdr == 0 || hdr == u32::MAX {
                break;
            }
            off = (hdr >> 20) as usize & 0xffc;
        }
        let mut bars = [0u64; 6];
        for (i, s) in bars.iter_mut().enumerate() {
            *s = b.region_info(vf, region::BAR0 + i as u32)?.size;
        }
        Ok((config, size, bars))
    })?;
    let profile = Profile::from_config(&config, bars).ok_or_else(|| Error::OutOfRange {
        address: *at,
        what: "config header too short".into(),
    })?;
    Ok((profile, size))
}

/// Byte ranges (BAR, start, end) of the MSI-X table and PBA of an open VF,
/// from its MSI-X capability.
fn msix_ranges(c: &Container, vf: VfId) -> Result<Vec<(u32, u64, u64)>> {
    let mut config = [0u8; 0x100];
    c.with_backend(|b| b.region_read(vf, region::CONFIG, 0, &mut config))?;
    let r8 = |o: usize| config.get(o).copied().unwrap_or(0);
    let r16 = |o: usize| u16::from_le_bytes([r8(o), r8(o + 1)]);
    let r32 = |o: usize| u32::from_le_bytes([r8(o), r8(o + 1), r8(o + 2), r8(o + 3)]);
    if r16(cfg::STATUS) & cfg::STATUS_CAP_LIST == 0 {
        return Ok(Vec::new());
    }
    let mut off = usize::from(r8(cfg::CAP_PTR) & 0xfc);
    for _ in 0..48 {
        if off < cfg::HEADER_SIZE {
            break;
        }
        if r8(off) == cfg::CAP_ID_MSIX {
            let vectors = u64::from(r16(off + 2) & 0x7ff) + 1;
            let (table, pba) = (r32(off + 4), r32(off + 8));
            return Ok(vec![
                (
                    table & 7,
                    u64::from(table & !7),
                    u64::from(table & !7) + 16 * vectors,
                ),
                (
                    pba & 7,
                    u64::from(pba & !7),
                    u64::from(pba & !7) + 8 * vectors.div_ceil(64),
                ),
            ]);
        }
        off = usize::from(r8(off + 1) & 0xfc);
    }
    Ok(Vec::new())
}

/// `area` minus the page-aligned `holes`, as (offset, length) pieces.
fn subtract(area: (u64, u64), holes: &[(u64, u64)], page: u64) -> Vec<(u64, u64)> {
    let mut pieces = vec![(area.0, area.0.saturating_add(area.1))];
    for &(lo, hi) in holes {
        let (lo, hi) = (lo / page * page, hi.div_ceil(page).saturating_mul(page));
        pieces = pieces
            .into_iter()
            .flat_map(|(a, b)| {
                if hi <= a || b <= lo {
                    vec![(a, b)]
                } else {
                    [(a, lo.max(a)), (hi.min(b), b)]
                        .into_iter()
                        .filter(|(x, y)| x < y)
                        .collect()
                }
            })
            .collect();
    }
    pieces.into_iter().map(|(a, b)| (a, b - a)).collect()
}

/// mmap the areas of every BAR that the kernel lets us mmap, except the pages
/// of the MSI-X table and PBA: guest accesses there must trap to the VMM
/// (which emulates the table), so they are never handed out for guest mapping.
fn mmap_bars(c: &Container, vf: VfId, out: &mut Vec<MmapArea>) -> Result<()> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => 4096,
    };
    let msix = msix_ranges(c, vf)?;
    c.with_backend(|b| -> Result<()> {
        for bar in 0..6 {
            let index = region::BAR0 + bar;
            let holes: Vec<(u64, u64)> = msix
                .iter()
                .filter(|(bir, _, _)| *bir == bar)
                .map(|&(_, lo, hi)| (lo, hi))
                .collect();
            for area in b.mmap_areas(vf, index)? {
                for (offset, len) in subtract(area, &holes, page) {
                    out.push(b.mmap_region(vf, index, offset, len)?);
                }
            }
        }
        Ok(())
    })
}

fn munmap_all(c: &Container, vf: VfId, mmaps: &mut Vec<MmapArea>) {
    for m in mmaps.drain(..) {
        if let Err(e) = c.with_backend(|b| b.munmap_region(vf, m)) {
            tracing::warn!("munmap during cleanup: {e}");
        }
    }
}
