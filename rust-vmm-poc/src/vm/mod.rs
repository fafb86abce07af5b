//! The VM: KVM, guest RAM, the in-kernel irqchip and PIT, vCPU threads, and their run control.

mod control;
mod irq;
pub(crate) mod memory;
mod vcpu;

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, LinuxBoot, GUEST_LOAD_ADDR, GUEST_STACK_TOP};
use crate::devices::{Devices, SerialPort, SerialSink, TestDevice, VfioEntry, COM1_IRQ};
use crate::error::{io, kvm, Error};
use crate::guest::TestGuest;
use crate::pci::{DevFn, PciBus};
pub(crate) use control::Control;
pub use control::RunState;
pub(crate) use irq::GsiRouter;

/// Where the KVM TSS lives (3 pages just below the BIOS area, never RAM a guest uses).
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// How long the end of a VM waits for its vCPU threads.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Most vCPUs per VM.
pub const MAX_CPUS: u8 = 32;

/// Where the guest's serial port output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Any writer (tests capture output so).
    Writer(SerialSink),
    /// Discarded.
    Null,
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialOutput::Stdout => write!(f, "Stdout"),
            SerialOutput::File(p) => write!(f, "File({})", p.display()),
            SerialOutput::Writer(_) => write!(f, "Writer(..)"),
            SerialOutput::Null => write!(f, "Null"),
        }
    }
}

/// What the boot CPU runs.
#[derive(Debug, Clone)]
pub enum GuestImage {
    /// 32-bit flat protected-mode code, loaded at [`GUEST_LOAD_ADDR`] and entered there with the
    /// stack at [`GUEST_STACK_TOP`], interrupts off, paging off.
    Raw(Vec<u8>),
    /// The built-in test guest (see [`TestGuest`]), loaded and entered the same way.
    Test(TestGuest),
    /// A Linux bzImage, booted directly in long mode with an MP table for its CPUs.
    Linux(LinuxBoot),
}

/// Everything needed to build a VM.
#[derive(Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs (1..=[`MAX_CPUS`]); vCPU 0 boots, the others wait for INIT/SIPI.
    pub cpus: u8,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Serial port output.
    pub serial: SerialOutput,
    /// The guest.
    pub guest: GuestImage,
    /// Number of emulated `svff-test` PCI functions, at 00:01.0, 00:02.0, ...
    pub test_devices: u8,
    /// VFs to pass through (after the test devices on bus 0).
    pub vfio: Vec<VfioSpec>,
}

/// A VF to pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioSpec {
    /// Host address (bound to vfio-pci).
    pub host: vfio_pause::PciAddress,
    /// The VMM's id for it (QMP commands name it so).
    pub id: String,
    /// What guest BAR accesses do while it is paused (unless a pause says otherwise).
    pub policy: vfio_pause::PausePolicy,
    /// Open the VF through this already-open VFIO group fd (passed over QMP with `getfd`
    /// under this name) instead of opening `/dev/vfio/<group>`.
    pub fd: Option<String>,
    /// Map its BARs into KVM slots while attached (else every access traps).
    pub mmap: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory: 256 << 20,
            cpus: 1,
            kvm_device: PathBuf::from("/dev/kvm"),
            serial: SerialOutput::Stdout,
            guest: GuestImage::Raw(vec![0xf4, 0xeb, 0xfd]), // hlt; jmp back
            test_devices: 0,
            vfio: Vec::new(),
        }
    }
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Asked to by the VMM (QMP `quit`, [`VmHandle::request_exit`]).
    Quit,
    /// The guest triple-faulted or asked to power off (`KVM_EXIT_SHUTDOWN`, system event).
    GuestShutdown,
    /// The guest reset the machine (i8042 command 0xFE, or a reset system event).
    GuestReset,
    /// The guest wrote this byte to the debug exit port 0x501.
    DebugExit(u8),
    /// A vCPU hit something the VMM cannot handle.
    VcpuFailed {
        /// The vCPU.
        cpu: u8,
        /// What happened.
        reason: String,
    },
}

impl ExitReason {
    /// The process exit code `svff-vmm` uses for this reason: 0 for quit, shutdown and reset,
    /// the guest's code for a debug exit, 1 for a vCPU failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Quit | ExitReason::GuestShutdown | ExitReason::GuestReset => 0,
            ExitReason::DebugExit(c) => *c,
            ExitReason::VcpuFailed { .. } => 1,
        }
    }
}

/// Steers a running VM from other threads (QMP): pause, resume, exit, state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VmHandle {
    ctl: Arc<Control>,
    tsc_khz: u32,
    // Weak: a handle kept by QMP must not keep device fds open after the VM ended.
    devices: Weak<Devices>,
}

impl VmHandle {
    /// Stops every vCPU outside the guest; returns when they all are (at most 5 s).
    pub fn pause(&self) -> Result<(), Error> {
        self.ctl.pause()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.ctl.resume()
    }

    /// Ends the VM with `reason` ([`Vm::run`] returns it).
    pub fn request_exit(&self, reason: ExitReason) {
        self.ctl.request_exit(reason)
    }

    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ` of vCPU 0; 0 if KVM cannot tell).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Running, paused or shutting down.
    pub fn state(&self) -> RunState {
        self.ctl.state()
    }

    /// Shows or hides the PCI function at `devfn`: hidden, it reads all-ones in config space
    /// and decodes no BAR, as a function that was removed (for testing how guests notice).
    pub fn set_device_present(&self, devfn: DevFn, present: bool) -> Result<(), Error> {
        self.devices()?.pci().set_present(devfn, present)
    }

    fn devices(&self) -> Result<Arc<Devices>, Error> {
        self.devices
            .upgrade()
            .ok_or_else(|| Error::Config("the VM has ended".into()))
    }

    /// Hot-unplugs the `--vfio`/`device_add` device `id`: detached (every fd closed, BAR
    /// slots and MSI-X routes gone) and removed from bus 0, so the guest reads all-ones
    /// from its config space from now on.
    pub fn vfio_del(&self, id: &str) -> Result<(), Error> {
        self.devices()?.vfio_del(id)
    }

    /// Hot-plugs a VF (`device_add`) at the first free device number of bus 0; returns it.
    pub fn vfio_add(&self, spec: &VfioSpec, source: vfio_pause::VfSource) -> Result<DevFn, Error> {
        self.devices()?.vfio_add(spec, source)
    }

    /// The passed-through VFs (empty once the VM ended).
    pub(crate) fn vfio(&self) -> Vec<Arc<VfioEntry>> {
        self.devices()
            .map(|d| d.vfio().to_vec())
            .unwrap_or_default()
    }

    /// `(devfn, name)` of every PCI function.
    pub fn pci_functions(&self) -> Vec<(DevFn, String)> {
        self.devices()
            .map(|d| d.pci().functions())
            .unwrap_or_default()
    }
}

/// A built VM, ready to [`run`](Vm::run). Dropping it (or returning from `run`) closes every
/// fd it holds: vCPUs, VM, KVM, eventfds, and unmaps guest RAM.
#[derive(Debug)]
pub struct Vm {
    // Drop order: vCPUs and devices before the VM fd, the VM fd before guest RAM.
    vcpus: Vec<VcpuFd>,
    tsc_khz: u32,
    devices: Arc<Devices>,
    ctl: Arc<Control>,
    // After the devices (which hold its VFs), before guest RAM (which it maps for DMA).
    _container: Option<Arc<vfio_pause::Container>>,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, Error> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Config(format!("KVM device path {} has a NUL", path.display())))?;
    Kvm::new_with_path(&c).map_err(|source| Error::KvmOpen {
        path: path.to_path_buf(),
        source,
    })
}

fn serial_sink(out: SerialOutput) -> Result<SerialSink, Error> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(p) => Box::new(
            File::create(&p).map_err(io(format!("creating serial output {}", p.display())))?,
        ),
        SerialOutput::Writer(w) => w,
        SerialOutput::Null => Box::new(std::io::sink()),
    })
}

impl Vm {
    /// Builds the VM: opens KVM, creates RAM, irqchip, PIT, devices and vCPUs, loads the guest.
    pub fn new(config: VmConfig) -> Result<Vm, Error> {
        Self::with_group_fds(config, std::collections::HashMap::new())
    }

    /// A VM whose `--vfio ...,fd=<name>` devices open through the group fds in `fds`
    /// (by name; every named one must be there).
    pub fn with_group_fds(
        config: VmConfig,
        mut fds: std::collections::HashMap<String, std::os::fd::OwnedFd>,
    ) -> Result<Vm, Error> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "{} vCPUs requested, 1..={MAX_CPUS} supported",
                config.cpus
            )));
        }
        memory::check_ram_size(config.memory)?;
        let kvm_sys = open_kvm(&config.kvm_device)?;
        let vm = Arc::new(kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        let mem = memory::create(config.memory)?;
        let ram_slots = memory::register(&vm, &mem)?;
        let slot_pool = Arc::new(Mutex::new(crate::devices::SlotPool::new(
            ram_slots,
            kvm_sys.get_nr_memslots() as u32,
        )));

        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm("KVM_CREATE_PIT2"))?;

        let serial_irq =
            EventFd::new(EFD_NONBLOCK).map_err(io("creating the serial irq eventfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm("KVM_IRQFD for the serial port (GSI 4)"))?;
        let serial = SerialPort::new(serial_irq, serial_sink(config.serial)?);
        let router = Arc::new(Mutex::new(GsiRouter::new(vm.clone())));
        let mut pci = PciBus::new(memory::MMIO_WINDOW_START, memory::MMIO_WINDOW_END)?;
        for _ in 0..config.test_devices {
            let df = pci
                .next_free_device()
                .ok_or_else(|| Error::Config("no free PCI slot for a test device".into()))?;
            let dev = TestDevice::with_msix(router.clone())?;
            pci.add(df, Box::new(dev))?;
        }
        let container = if config.vfio.is_empty() {
            None
        } else {
            let c = vfio_pause::Container::open_real().map_err(|e| Error::Vfio {
                device: "container".into(),
                source: Box::new(e),
            })?;
            // SAFETY: `mem` stays mapped until after the container is dropped (Vm's field
            // order), and guest RAM is only touched through vm-memory's volatile accessors.
            unsafe { c.register_guest_memory(&mem) }.map_err(|e| Error::Vfio {
                device: "container (guest RAM for DMA)".into(),
                source: Box::new(e),
            })?;
            Some(c)
        };
        let hotplug = container
            .clone()
            .map(|container| crate::devices::VfioFactory {
                container,
                router: router.clone(),
                slot_pool: slot_pool.clone(),
                vm: vm.clone(),
            });
        let mut vfio = Vec::new();
        for spec in &config.vfio {
            if vfio.iter().any(|e: &Arc<VfioEntry>| e.id == spec.id) {
                return Err(Error::Config(format!(
                    "two VFIO devices with id {}",
                    spec.id
                )));
            }
            let df = pci.next_free_device().ok_or_else(|| {
                Error::Config(format!("no free PCI slot for VFIO device {}", spec.id))
            })?;
            let source = match &spec.fd {
                None => vfio_pause::VfSource::Sysfs(spec.host),
                Some(name) => vfio_pause::VfSource::GroupFd {
                    group: fds.remove(name).ok_or_else(|| {
                        Error::Config(format!(
                            "VFIO device {}: no group fd named '{name}' was passed",
                            spec.id
                        ))
                    })?,
                    address: spec.host,
                },
            };
            let (entry, dev) = hotplug
                .as_ref()
                .expect("created above for VFIO devices")
                .open(spec, source, df)?;
            vfio.push(entry);
            pci.add(df, dev)?;
        }
        let devices = Arc::new(Devices::new(serial, pci, vfio, hotplug));

        let ctl = Arc::new(Control::new(config.cpus.into())?);
        let cpuid = vcpu::supported_cpuid(&kvm_sys)?;
        let mut vcpus = Vec::with_capacity(config.cpus.into());
        for id in 0..config.cpus {
            let v = vm
                .create_vcpu(id.into())
                .map_err(kvm(format!("KVM_CREATE_VCPU {id}")))?;
            vcpu::configure(&v, id, config.cpus, &cpuid)?;
            vcpus.push(v);
        }
        let tsc_khz = vcpus
            .first()
            .and_then(|v| v.get_tsc_khz().ok())
            .unwrap_or(0);
        let vm_obj = Vm {
            vcpus,
            tsc_khz,
            devices,
            ctl,
            _container: container,
            _vm: vm,
            _kvm: kvm_sys,
            mem,
        };
        vm_obj.load(&config.guest, config.memory)?;
        Ok(vm_obj)
    }

    fn load(&self, guest: &GuestImage, mem_size: u64) -> Result<(), Error> {
        let bsp = &self.vcpus[0];
        let mut sregs = bsp.get_sregs().map_err(kvm("KVM_GET_SREGS on vCPU 0"))?;
        let mut regs = bsp.get_regs().map_err(kvm("KVM_GET_REGS on vCPU 0"))?;
        if let GuestImage::Linux(l) = guest {
            let entry = boot::load_linux(&self.mem, mem_size, l)?;
            boot::write_mptable(&self.mem, self.vcpus.len() as u8)?;
            boot::enter_long_mode(entry, &mut sregs, &mut regs);
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            bsp.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU on vCPU 0"))?;
            bsp.set_sregs(&sregs)
                .map_err(kvm("KVM_SET_SREGS on vCPU 0"))?;
            bsp.set_regs(&regs).map_err(kvm("KVM_SET_REGS on vCPU 0"))?;
            return Ok(());
        }
        boot::write_gdt(&self.mem)?;
        let test_image;
        let code = match guest {
            GuestImage::Raw(code) => code,
            GuestImage::Test(t) => {
                test_image = t.image();
                &test_image
            }
            GuestImage::Linux(_) => unreachable!("handled above"),
        };
        self.mem
            .write_slice(code, GuestAddress(GUEST_LOAD_ADDR))
            .map_err(|e| {
                Error::Memory(format!("loading {} bytes of guest code: {e}", code.len()))
            })?;
        boot::enter_protected_mode(&mut sregs, &mut regs, GUEST_LOAD_ADDR, GUEST_STACK_TOP);
        bsp.set_sregs(&sregs)
            .map_err(kvm("KVM_SET_SREGS on vCPU 0"))?;
        bsp.set_regs(&regs).map_err(kvm("KVM_SET_REGS on vCPU 0"))?;
        Ok(())
    }

    /// A handle to pause, resume or end this VM from other threads.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            ctl: self.ctl.clone(),
            tsc_khz: self.tsc_khz,
            devices: Arc::downgrade(&self.devices),
        }
    }

    /// Runs every vCPU on its own thread (`svff-vcpu<N>`) until the VM exits, then joins them
    /// all and closes every fd of the VM. Returns why the VM ended.
    pub fn run(mut self) -> Result<ExitReason, Error> {
        let mut threads = Vec::new();
        let mut spawn_err = None;
        for (id, v) in self.vcpus.drain(..).enumerate() {
            let (d, c) = (self.devices.clone(), self.ctl.clone());
            let id = id as u8;
            match std::thread::Builder::new()
                .name(format!("svff-vcpu{id}"))
                .spawn(move || vcpu::run_loop(id, v, d, c))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_err = Some(Error::Io {
                        what: format!("spawning vCPU thread {id}"),
                        source: e,
                    });
                    break;
                }
            }
        }
        let reason = match spawn_err {
            Some(e) => {
                self.ctl.request_exit(ExitReason::Quit);
                Err(e)
            }
            None => Ok(self.ctl.wait_exit()),
        };
        let stopped = self.ctl.wait_all_stopped(STOP_DEADLINE);
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        self.devices.flush();
        stopped?;
        reason
    }
}
