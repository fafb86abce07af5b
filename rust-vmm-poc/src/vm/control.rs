//! Run control shared by the vCPU threads and whoever steers the VM (QMP, the main thread):
//! pause, resume, exit, with vCPUs kicked out of `KVM_RUN` by a signal.
//!
//! Kicking is race-free: the signal handler sets `immediate_exit` in the kicked thread's own
//! `kvm_run` (found through a thread-local pointer), so a signal that lands between the
//! thread's check of the run state and its next `KVM_RUN` makes that `KVM_RUN` return `EINTR`
//! at once instead of being lost.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

use super::ExitReason;
use crate::devices::lock;
use crate::error::Error;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|c| {
        let p = c.get();
        if !p.is_null() {
            // SAFETY: `p` is set by this thread (the handler runs on the thread the signal was
            // sent to) to its own vCPU's `kvm_run` mapping, which stays mapped until the thread
            // clears the pointer before dropping its `VcpuFd`; a single byte store is
            // async-signal-safe.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| Error::Io {
                what: "installing the vCPU kick signal handler".into(),
                source: std::io::Error::from_raw_os_error(e.errno()),
            });
    });
    result
}

/// The run state seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run (or are about to).
    Running,
    /// Every vCPU is parked outside `KVM_RUN`.
    Paused,
    /// The VM is ending or has ended.
    Shutdown,
}

#[derive(Debug, Default)]
struct State {
    paused: bool,
    exit: Option<ExitReason>,
    parked: usize,
    alive: usize,
    cpus: usize,
    threads: Vec<(u8, libc::pthread_t)>,
}

/// Shared run control of one VM.
#[derive(Debug, Default)]
pub(crate) struct Control {
    state: Mutex<State>,
    cv: Condvar,
}

/// How long `pause` waits for every vCPU to leave the guest.
const PAUSE_DEADLINE: Duration = Duration::from_secs(5);

impl Control {
    pub(crate) fn new(cpus: usize) -> Result<Self, Error> {
        install_kick_handler()?;
        let c = Control::default();
        lock(&c.state).cpus = cpus;
        Ok(c)
    }

    fn kick_all(st: &State) {
        for &(_, t) in &st.threads {
            // SAFETY: `t` is a live thread: vCPU threads remove themselves from `threads`
            // under this same lock before they end, and we hold the lock.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Called by a vCPU thread once its `kvm_run` pointer is published.
    pub(crate) fn vcpu_started(&self, id: u8, run: *mut kvm_run) {
        KVM_RUN.with(|c| c.set(run));
        let mut st = lock(&self.state);
        st.alive += 1;
        // SAFETY: pthread_self has no preconditions.
        st.threads.push((id, unsafe { libc::pthread_self() }));
        self.cv.notify_all();
    }

    /// Called by a vCPU thread as it ends, before its `VcpuFd` is dropped.
    pub(crate) fn vcpu_stopped(&self, id: u8) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        let mut st = lock(&self.state);
        st.alive -= 1;
        st.threads.retain(|&(i, _)| i != id);
        self.cv.notify_all();
    }

    /// Blocks a vCPU thread while the VM is paused. Returns false when the VM is exiting.
    pub(crate) fn wait_runnable(&self) -> bool {
        let mut st = lock(&self.state);
        loop {
            if st.exit.is_some() {
                return false;
            }
            if !st.paused {
                return true;
            }
            st.parked += 1;
            self.cv.notify_all();
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.parked -= 1;
        }
    }

    /// Asks the VM to end with `reason` (the first reason wins) and kicks every vCPU.
    pub(crate) fn request_exit(&self, reason: ExitReason) {
        let mut st = lock(&self.state);
        if st.exit.is_none() {
            st.exit = Some(reason);
        }
        Self::kick_all(&st);
        self.cv.notify_all();
    }

    /// Pauses: returns once every vCPU is parked (or the VM is exiting). Before the vCPU
    /// threads are started, this waits for them to start and park.
    pub(crate) fn pause(&self) -> Result<(), Error> {
        let deadline = Instant::now() + PAUSE_DEADLINE;
        let mut st = lock(&self.state);
        st.paused = true;
        Self::kick_all(&st);
        while st.exit.is_none() && st.parked < st.cpus {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "{} of {} vCPUs did not stop within {PAUSE_DEADLINE:?}",
                    st.cpus - st.parked,
                    st.cpus
                )));
            }
            // Re-kick: a vCPU busy in a device exit handler when first kicked is caught by
            // `immediate_exit`, but kicking again costs nothing.
            Self::kick_all(&st);
            st = self
                .cv
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Resumes paused vCPUs.
    pub(crate) fn resume(&self) {
        let mut st = lock(&self.state);
        st.paused = false;
        self.cv.notify_all();
    }

    /// The current run state.
    pub(crate) fn state(&self) -> RunState {
        let st = lock(&self.state);
        if st.exit.is_some() {
            RunState::Shutdown
        } else if st.paused {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Blocks until an exit is requested; returns its reason.
    pub(crate) fn wait_exit(&self) -> ExitReason {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = &st.exit {
                return r.clone();
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Kicks the vCPUs until every one has ended, within `deadline`.
    pub(crate) fn wait_all_stopped(&self, deadline: Duration) -> Result<(), Error> {
        let end = Instant::now() + deadline;
        let mut st = lock(&self.state);
        while st.alive > 0 {
            let now = Instant::now();
            if now >= end {
                return Err(Error::Timeout(format!(
                    "{} vCPU thread(s) did not end within {deadline:?}",
                    st.alive
                )));
            }
            Self::kick_all(&st);
            st = self
                .cv
                .wait_timeout(st, (end - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}
