//! The built-in test guest (`--guest test`): 32-bit flat protected-mode code in
//! `test_guest.S`, assembled into this crate with `global_asm!` (no other target needed),
//! copied to [`GUEST_LOAD_ADDR`](crate::GUEST_LOAD_ADDR) and entered there.
//!
//! What it does, and prints on COM1 (one line each, `\n`-terminated, numbers decimal unless
//! said otherwise):
//!
//! 1. `svff-guest: start`
//! 2. enumerates bus 0 over conf1 (every device, functions 1..7 of multi-function ones) and
//!    prints each function found:
//!    `svff-guest: found 00:DD.F vendor=VVVV device=DDDD class=CCCCCC` (hex);
//! 3. takes every function that is not a bridge (class 0x06) and has a memory BAR0 below
//!    4 GiB as a *target* (at most 32), enabling its memory decoding and bus mastering, then prints
//!    `svff-guest: enumerated N functions, M targets`;
//! 4. sets up interrupts: an IDT (exceptions print `svff-guest: exception` and end the VM
//!    with debug exit 0xee), the 8259 PICs at vectors 0x20/0x28 with only IRQ 4 open, the
//!    LAPIC software-enabled, `sti`; enables COM1's THR-empty interrupt once and prints
//!    `svff-guest: serial irqs=N` (1 when IRQ 4 arrived through the VMM's irqfd, 0 if not);
//!    then, for each target with an MSI-X capability, points table entry 0 at vector
//!    0x40 + target index, enables MSI-X and prints `svff-guest: dev=00:DD.F msix vector=V`;
//!    a target with MSI and no MSI-X gets its MSI message pointed at that vector (one vector,
//!    64-bit address if the capability has it), MSI enabled, and prints
//!    `svff-guest: dev=00:DD.F msi vector=V`;
//! 5. loops in *rounds*: per target, reads its vendor ID in config space (0xffff: the
//!    function is gone: prints `svff-guest: dev=00:DD.F event=gone` once; when it returns,
//!    re-enables decoding and prints `... event=back`), then reads BAR0+0 (identity) and
//!    BAR0+8 (status), each timed with `rdtsc`, counting valid and all-ones reads; on an
//!    `svff-test` function with MSI-X it then rings the doorbell (BAR0+0x14 <- 0) once, and
//!    on QEMU's `edu` (1234:11e8) with MSI set up it acknowledges and raises its interrupt
//!    (BAR0+0x64 <- 1, BAR0+0x60 <- 1: one MSI per round);
//! 6. every `report_every` rounds prints, per target,
//!    `svff-guest: dev=00:DD.F round=R reads=N ok=N ones=N gone=N back=N max_tsc=N irqs=N win_ktsc=N id=XXXXXXXX st=XXXXXXXX`
//!    (`max_tsc`: the longest single BAR read in TSC ticks, low 32 bits; `irqs`: MSI-X
//!    or MSI interrupts taken; `win_ktsc`: the longest guest-observed disruption in units of 1024 TSC
//!    ticks: a run of all-ones reads from its first read to the end of the next valid read
//!    (policy `ignore`), or one slow read (a stalled access, policy `stall`), whichever is
//!    longest; `id`: the last BAR0+0 value, `st`: the last BAR0+8 value, hex);
//!    (with [`GuestMode::ScribblePaused`], an all-ones identity read is followed by writes
//!    of pseudo-random values anywhere in the target's BAR0 and config space; with
//!    [`GuestMode::Halt`] / [`GuestMode::Spin`] the guest halts or spins with interrupts off
//!    after step 4 instead of looping);
//! 7. after `rounds` rounds (if not 0) prints `svff-guest: done rounds=R` and writes 0 to the
//!    debug exit port; otherwise it loops until the VMM ends.
//!
//! [`parse_counters`](svff_types::parse_counters) (in svff-types, re-exported by this crate)
//! reads the counter lines back.

use std::arch::global_asm;

global_asm!(include_str!("test_guest.S"), options(att_syntax, raw));

extern "C" {
    static svff_guest_start: u8;
    static svff_guest_params: u8;
    static svff_guest_end: u8;
}

/// What the test guest does after its set-up (enumeration, interrupts, MSI-X).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestMode {
    /// The read loop (the default).
    #[default]
    Read,
    /// The read loop, and each time a target's identity register reads all-ones (a paused
    /// VF under policy `ignore`), 4 pseudo-random dwords written to pseudo-random offsets of
    /// its BAR0 (first 16 KiB) and 4 to its config space (0x00..0xfc): a guest that writes
    /// anywhere while its device is paused.
    ScribblePaused,
    /// Prints `svff-guest: halting with interrupts off`, then `cli; hlt` for ever.
    Halt,
    /// The read loop, and each round every igb VF (8086:10ca) with MSI-X set up raises its
    /// own MSI-X vector 0 (BAR0: EIAC, EIMS, EICR, EICS <- 1), so interrupts come from the VF
    /// itself (the PF needs GPIE.MSIX_MODE, which `igb` sets and `pci-pf-stub` does not).
    RingVf,
    /// Prints `svff-guest: spinning with interrupts off`, then `cli` and a tight loop.
    Spin,
    /// The read loop; after round 100 every target's BAR0 is moved (decoding off, BAR0 <-
    /// `0xe000_0000 + index MiB`, decoding on) and reads go on at the new address; prints
    /// `svff-guest: dev=00:DD.F moved bar0=XXXXXXXX`. Its MSI-X table stays where it was
    /// found (fine for a VF whose table is in another BAR, as igb's in BAR3).
    MoveBar,
    /// As [`GuestMode::RingVf`], with MSI-X table entry 0 of every target masked after round
    /// 100 and unmasked after round 200 (the igb VFs keep raising vector 0 meanwhile).
    RingVfMasked,
}

impl GuestMode {
    fn code(self) -> u32 {
        match self {
            GuestMode::Read => 0,
            GuestMode::ScribblePaused => 1,
            GuestMode::Halt => 2,
            GuestMode::Spin => 3,
            GuestMode::RingVf => 4,
            GuestMode::MoveBar => 5,
            GuestMode::RingVfMasked => 6,
        }
    }
}

/// Parameters of the test guest, patched into its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestGuest {
    /// Rounds before the guest ends the VM (debug exit 0); 0: never.
    pub rounds: u32,
    /// Rounds between counter reports (at least 1).
    pub report_every: u32,
    /// What it does after its set-up.
    pub mode: GuestMode,
}

impl Default for TestGuest {
    fn default() -> Self {
        TestGuest {
            rounds: 0,
            report_every: 1000,
            mode: GuestMode::Read,
        }
    }
}

fn span() -> (*const u8, usize, usize) {
    // SAFETY: only the addresses of the three symbols defined by the global_asm! above are
    // taken; nothing is read through them here.
    let (s, p, e) = {
        (
            std::ptr::addr_of!(svff_guest_start),
            std::ptr::addr_of!(svff_guest_params),
            std::ptr::addr_of!(svff_guest_end),
        )
    };
    (s, p as usize - s as usize, e as usize - s as usize)
}

impl TestGuest {
    /// The guest image with these parameters.
    pub fn image(&self) -> Vec<u8> {
        let (start, params, len) = span();
        // SAFETY: `svff_guest_start..svff_guest_end` is one contiguous read-only section
        // emitted by the global_asm! above (start before end, same section), alive for the
        // whole program.
        let mut img = unsafe { std::slice::from_raw_parts(start, len) }.to_vec();
        img[params..params + 4].copy_from_slice(&self.rounds.to_le_bytes());
        img[params + 4..params + 8].copy_from_slice(&self.report_every.max(1).to_le_bytes());
        img[params + 8..params + 12].copy_from_slice(&self.mode.code().to_le_bytes());
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_starts_with_a_jump_and_carries_its_parameters() {
        let img = TestGuest {
            rounds: 7,
            report_every: 3,
            mode: GuestMode::Spin,
        }
        .image();
        assert_eq!(img[0], 0xe9, "jmp rel32");
        let (_, p, len) = span();
        assert_eq!(img.len(), len);
        assert_eq!(&img[p..p + 12], &[7, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0]);
        assert!(len < 64 << 10);
    }
}
