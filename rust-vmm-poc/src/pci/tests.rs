//! Unit tests of bus 0: conf1 decoding, BAR placement and sizing, MMIO routing and BAR moves.

use super::*;
use crate::devices::{TestDevice, TEST_DEVICE_BAR0_SIZE, TEST_DEVICE_ID};
use crate::vm::memory::{ram_ranges, MMIO_WINDOW_END, MMIO_WINDOW_START};

fn bus_with_test_device() -> (PciBus, DevFn) {
    let mut bus = PciBus::new(MMIO_WINDOW_START, MMIO_WINDOW_END).unwrap();
    let df = bus.next_free_device().unwrap();
    bus.add(df, Box::new(TestDevice::default())).unwrap();
    (bus, df)
}

fn cf8(bus: &mut PciBus, devfn: DevFn, offset: u32) {
    let a = 0x8000_0000
        | (u32::from(devfn.device()) << 11)
        | (u32::from(devfn.function()) << 8)
        | offset;
    bus.pio_write(CONF1_ADDRESS, &a.to_le_bytes());
}

fn inl(bus: &mut PciBus, port: u16) -> u32 {
    let mut d = [0u8; 4];
    bus.pio_read(port, &mut d);
    u32::from_le_bytes(d)
}

fn conf_read(bus: &mut PciBus, devfn: DevFn, offset: u32) -> u32 {
    cf8(bus, devfn, offset);
    inl(bus, CONF1_DATA)
}

fn conf_write(bus: &mut PciBus, devfn: DevFn, offset: u32, v: u32) {
    cf8(bus, devfn, offset);
    bus.pio_write(CONF1_DATA, &v.to_le_bytes());
}

fn mmio_u32(bus: &mut PciBus, addr: u64) -> Option<u32> {
    let mut d = [0u8; 4];
    bus.mmio_read(addr, &mut d).then(|| u32::from_le_bytes(d))
}

#[test]
fn host_bridge_answers_at_00_00_0_with_class_0600() {
    let mut bus = PciBus::new(MMIO_WINDOW_START, MMIO_WINDOW_END).unwrap();
    let hb = DevFn::new(0, 0).unwrap();
    assert_eq!(
        conf_read(&mut bus, hb, 0),
        u32::from(HOST_BRIDGE_VENDOR) | (u32::from(HOST_BRIDGE_DEVICE) << 16)
    );
    assert_eq!(conf_read(&mut bus, hb, 8) >> 16, 0x0600);
}

#[test]
fn address_register_reads_back_and_byte_writes_to_it_are_ignored() {
    let mut bus = PciBus::new(MMIO_WINDOW_START, MMIO_WINDOW_END).unwrap();
    bus.pio_write(CONF1_ADDRESS, &0x8000_0000u32.to_le_bytes());
    bus.pio_write(0xcfb, &[0x01]);
    assert_eq!(inl(&mut bus, CONF1_ADDRESS), 0x8000_0000);
}

#[test]
fn absent_functions_other_buses_and_disabled_cycles_read_all_ones() {
    let (mut bus, df) = bus_with_test_device();
    let empty = DevFn::new(df.device() + 1, 0).unwrap();
    assert_eq!(conf_read(&mut bus, empty, 0), u32::MAX);
    assert_eq!(
        conf_read(&mut bus, DevFn::new(df.device(), 1).unwrap(), 0),
        u32::MAX
    );
    bus.pio_write(
        CONF1_ADDRESS,
        &(0x8001_0000u32 | (u32::from(df.device()) << 11)).to_le_bytes(),
    );
    assert_eq!(inl(&mut bus, CONF1_DATA), u32::MAX, "bus 1");
    bus.pio_write(CONF1_ADDRESS, &(u32::from(df.device()) << 11).to_le_bytes());
    assert_eq!(inl(&mut bus, CONF1_DATA), u32::MAX, "enable bit clear");
}

#[test]
fn sub_dword_reads_pick_the_bytes_of_their_data_port() {
    let (mut bus, df) = bus_with_test_device();
    cf8(&mut bus, df, 0);
    let mut w = [0u8; 2];
    bus.pio_read(CONF1_DATA + 2, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x5ff0);
    let mut b = [0u8; 1];
    bus.pio_read(CONF1_DATA + 1, &mut b);
    assert_eq!(b[0], 0x12);
}

#[test]
fn bars_are_placed_size_aligned_in_the_window_outside_ram_without_overlap() {
    let mut bus = PciBus::new(MMIO_WINDOW_START, MMIO_WINDOW_END).unwrap();
    let mut bars = Vec::new();
    for _ in 0..4 {
        let df = bus.next_free_device().unwrap();
        bus.add(df, Box::new(TestDevice::default())).unwrap();
        let a = u64::from(conf_read(&mut bus, df, 0x10) & !0xf);
        assert_eq!(a % TEST_DEVICE_BAR0_SIZE, 0);
        assert!((MMIO_WINDOW_START..MMIO_WINDOW_END).contains(&a));
        for (s, l) in ram_ranges(4 << 30) {
            assert!(
                a + TEST_DEVICE_BAR0_SIZE <= s || a >= s + l,
                "{a:#x} in RAM"
            );
        }
        bars.push(a);
    }
    bars.sort_unstable();
    bars.dedup();
    assert_eq!(bars.len(), 4);
}

#[test]
fn bar0_sizing_through_conf1_reads_the_size_mask_then_the_restored_address() {
    let (mut bus, df) = bus_with_test_device();
    let orig = conf_read(&mut bus, df, 0x10);
    conf_write(&mut bus, df, 0x10, u32::MAX);
    assert_eq!(
        conf_read(&mut bus, df, 0x10),
        !(TEST_DEVICE_BAR0_SIZE as u32 - 1)
    );
    conf_write(&mut bus, df, 0x10, orig);
    assert_eq!(conf_read(&mut bus, df, 0x10), orig);
}

#[test]
fn mmio_reaches_bar0_only_once_memory_decoding_is_enabled() {
    let (mut bus, df) = bus_with_test_device();
    let bar = u64::from(conf_read(&mut bus, df, 0x10) & !0xf);
    assert_eq!(mmio_u32(&mut bus, bar), None);
    conf_write(&mut bus, df, 4, u32::from(COMMAND_MEMORY));
    assert_eq!(mmio_u32(&mut bus, bar), Some(TEST_DEVICE_ID));
    assert_eq!(
        mmio_u32(&mut bus, bar + 0xc),
        Some(2),
        "READS counts both reads"
    );
    assert_eq!(mmio_u32(&mut bus, bar + TEST_DEVICE_BAR0_SIZE), None);
}

#[test]
fn a_bar_moved_by_the_guest_decodes_at_its_new_address_only() {
    let (mut bus, df) = bus_with_test_device();
    conf_write(&mut bus, df, 4, u32::from(COMMAND_MEMORY));
    let old = u64::from(conf_read(&mut bus, df, 0x10) & !0xf);
    let new = 0xd000_0000u64;
    conf_write(&mut bus, df, 0x10, new as u32);
    assert_eq!(mmio_u32(&mut bus, old), None);
    assert_eq!(mmio_u32(&mut bus, new), Some(TEST_DEVICE_ID));
    // Writes reach the device at the new address too.
    assert!(bus.mmio_write(new + 0x10, &0xabcdu32.to_le_bytes()));
    assert_eq!(mmio_u32(&mut bus, new + 0x10), Some(0xabcd));
}

#[test]
fn a_hidden_function_reads_all_ones_and_decodes_nothing_until_shown_again() {
    let (mut bus, df) = bus_with_test_device();
    conf_write(&mut bus, df, 4, u32::from(COMMAND_MEMORY));
    let bar = u64::from(conf_read(&mut bus, df, 0x10) & !0xf);
    bus.set_present(df, false).unwrap();
    assert_eq!(conf_read(&mut bus, df, 0), u32::MAX);
    assert_eq!(mmio_u32(&mut bus, bar), None);
    bus.set_present(df, true).unwrap();
    assert_eq!(mmio_u32(&mut bus, bar), Some(TEST_DEVICE_ID));
}

#[test]
fn a_taken_devfn_is_refused() {
    let (mut bus, df) = bus_with_test_device();
    assert!(bus.add(df, Box::new(TestDevice::default())).is_err());
}
