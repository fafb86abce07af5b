use super::*;
use crate::fake::FakeSysfs;

const PF: &str = "0000:01:00.0";

fn pf() -> PciAddress {
    PciAddress::parse(PF).unwrap()
}

fn drv(name: &str) -> DriverName {
    DriverName::parse(name).unwrap()
}

fn igb_on_igb() -> SriovManager<FakeSysfs> {
    let fake = FakeSysfs::with_igb();
    fake.preset_driver(PF, "igb");
    fake.manager()
}

fn opts(bind: Option<&str>) -> VfsSetOptions {
    VfsSetOptions {
        bind: bind.map(drv),
        ..Default::default()
    }
}

#[test]
fn discovery_lists_only_sriov_capable_devices() {
    let fake = FakeSysfs::with_igb();
    fake.add_device("0000:00:02.0");
    fake.add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
    let mgr = fake.manager();
    let pfs: Vec<String> = mgr
        .list_pfs()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(pfs, ["0000:01:00.0", "0000:02:00.0"]);
}

#[test]
fn status_reports_counts_vfs_drivers_and_groups() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    let st = mgr.pf_status(pf()).unwrap();
    assert_eq!(st.driver.as_deref(), Some("igb"));
    assert_eq!((st.totalvfs, st.numvfs), (7, 2));
    assert_eq!(st.vendor, "0x8086");
    assert!(!st.drivers_autoprobe);
    assert_eq!(st.vfs.len(), 2);
    assert_eq!(st.vfs[0].bdf.to_string(), "0000:01:10.0");
    assert_eq!(st.vfs[1].bdf.to_string(), "0000:01:10.1");
    assert_eq!(st.vfs[0].device, "0x10ca");
    assert_eq!(st.vfs[0].driver, None);
    assert!(st.vfs[0].iommu_group.is_some());
    assert_ne!(st.vfs[0].iommu_group, st.vfs[1].iommu_group);
}

#[test]
fn totalvfs_depends_on_the_pf_driver() {
    let fake = FakeSysfs::with_igb();
    let mgr = fake.manager();
    assert_eq!(mgr.vf_counts(pf()).unwrap(), (8, 0));
    mgr.ensure_pf_driver(pf(), &drv("igb")).unwrap();
    assert_eq!(mgr.vf_counts(pf()).unwrap(), (7, 0));
    mgr.ensure_pf_driver(pf(), &drv("pci-pf-stub")).unwrap();
    assert_eq!(mgr.driver_of(pf()).unwrap().as_deref(), Some("pci-pf-stub"));
    assert_eq!(mgr.vf_counts(pf()).unwrap(), (8, 0));
}

#[test]
fn count_change_goes_through_zero_with_autoprobe_off_first() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    mgr.sysfs().clear_writes();
    let report = mgr.set_vf_count(pf(), 4, &opts(None)).unwrap();
    assert_eq!((report.from, report.to, report.changed), (2, 4, true));
    let numvfs: Vec<String> = mgr
        .sysfs()
        .writes()
        .into_iter()
        .filter(|(p, _)| p.ends_with("sriov_numvfs"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(numvfs, ["0", "4"]);
    assert_eq!(report.status.vfs.len(), 4);
    let names: Vec<&str> = report.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["check_in_use", "disable_vfs", "enable_vfs"]);
}

#[test]
fn first_change_turns_autoprobe_off_before_numvfs() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 1, &opts(None)).unwrap();
    let w = mgr.sysfs().writes();
    assert_eq!(
        w[0].0,
        "bus/pci/devices/0000:01:00.0/sriov_drivers_autoprobe"
    );
    assert_eq!(w[0].1, "0");
    assert_eq!(w[1].0, "bus/pci/devices/0000:01:00.0/sriov_numvfs");
}

#[test]
fn same_count_is_a_no_op_without_writes() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 3, &opts(None)).unwrap();
    mgr.sysfs().clear_writes();
    let report = mgr.set_vf_count(pf(), 3, &opts(None)).unwrap();
    assert!(!report.changed);
    assert!(mgr.sysfs().writes().is_empty());
}

#[test]
fn too_many_vfs_is_refused_with_clear_message_and_count_unchanged() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    mgr.sysfs().clear_writes();
    let err = mgr.set_vf_count(pf(), 8, &opts(None)).unwrap_err();
    assert!(matches!(
        err,
        Error::TooManyVfs {
            max: 7,
            requested: 8,
            ..
        }
    ));
    assert!(
        err.to_string()
            .contains("PF 0000:01:00.0 supports at most 7 VFs"),
        "{err}"
    );
    assert!(mgr.sysfs().writes().is_empty());
    assert_eq!(mgr.vf_counts(pf()).unwrap(), (7, 2));
}

#[test]
fn kernel_erange_maps_to_too_many_vfs() {
    let mgr = igb_on_igb();
    mgr.sysfs().fail_next_write("sriov_numvfs", libc::ERANGE);
    let err = mgr.set_vf_count(pf(), 3, &opts(None)).unwrap_err();
    assert!(
        err.to_string()
            .contains("PF 0000:01:00.0 supports at most 7 VFs"),
        "{err}"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn kernel_ebusy_maps_to_busy() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    mgr.sysfs().fail_next_write("sriov_numvfs", libc::EBUSY);
    let err = mgr.set_vf_count(pf(), 3, &opts(None)).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(err.to_string().contains("0000:01:00.0"));
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 2);
}

#[test]
fn direct_nonzero_to_nonzero_write_is_ebusy_in_the_fake() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    let dir = pf().sysfs_rel();
    let err = mgr.write_numvfs(pf(), &dir, 3).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
}

#[test]
fn unbound_pf_cannot_configure_sriov() {
    let mgr = FakeSysfs::with_igb().manager();
    let err = mgr.set_vf_count(pf(), 1, &opts(None)).unwrap_err();
    assert!(
        matches!(err, Error::NoSriovConfigure { driver: None, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("PF driver cannot configure SR-IOV"),
        "{err}"
    );
}

#[test]
fn pf_driver_without_sriov_configure_is_enoent() {
    let fake = FakeSysfs::new();
    fake.add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
    fake.preset_driver("0000:02:00.0", "nvme");
    let mgr = fake.manager();
    let nvme = PciAddress::parse("0000:02:00.0").unwrap();
    let err = mgr.set_vf_count(nvme, 4, &opts(None)).unwrap_err();
    assert!(matches!(err, Error::NoSriovConfigure { .. }));
    assert!(err.to_string().contains("bound driver: nvme"), "{err}");
}

#[test]
fn pf_stub_handles_64_vfs_and_bind_uses_override_and_probe_never_new_id() {
    let fake = FakeSysfs::new();
    fake.add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
    let mgr = fake.manager();
    let nvme = PciAddress::parse("0000:02:00.0").unwrap();
    let o = VfsSetOptions {
        pf_driver: Some(drv("pci-pf-stub")),
        bind: Some(drv("vfio-pci")),
        qdma: None,
    };
    let report = mgr.set_vf_count(nvme, 64, &o).unwrap();
    assert_eq!(report.status.vfs.len(), 64);
    assert!(report
        .status
        .vfs
        .iter()
        .all(|v| v.driver.as_deref() == Some("vfio-pci")));
    let w = mgr.sysfs().writes();
    assert!(w.iter().all(|(p, _)| !p.ends_with("new_id")));
    assert_eq!(
        w.iter()
            .filter(|(p, _)| p == "bus/pci/drivers_probe")
            .count(),
        65
    );
    assert_eq!(
        report
            .steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["pf_driver", "autoprobe_off", "enable_vfs", "bind_vfs"]
    );
}

#[test]
fn rebinding_moves_a_vf_from_its_driver_to_vfio_pci() {
    let mgr = igb_on_igb();
    mgr.sysfs().add_driver(
        "igbvf",
        crate::fake::DriverModel {
            sriov_configure: false,
            max_vfs: None,
            ids: vec![("0x8086".into(), "0x10ca".into())],
            qdma: false,
            probe_fails: false,
        },
    );
    mgr.set_vf_count(pf(), 1, &opts(None)).unwrap();
    let vf = mgr.vfs(pf()).unwrap()[0].1;
    // autoprobe is off: the VF stayed unbound; put it on igbvf by hand.
    mgr.bind(vf, &drv("igbvf")).unwrap();
    assert_eq!(mgr.driver_of(vf).unwrap().as_deref(), Some("igbvf"));
    mgr.set_vf_count(pf(), 1, &opts(Some("vfio-pci"))).unwrap();
    assert_eq!(mgr.driver_of(vf).unwrap().as_deref(), Some("vfio-pci"));
    mgr.unbind(vf).unwrap();
    assert_eq!(mgr.driver_of(vf).unwrap(), None);
}

#[test]
fn counts_change_in_both_directions_and_to_zero() {
    let mgr = igb_on_igb();
    for n in [1u16, 4, 7, 4, 1, 0, 7, 0] {
        let r = mgr.set_vf_count(pf(), n, &opts(Some("vfio-pci"))).unwrap();
        assert_eq!(r.status.numvfs, n);
        assert_eq!(r.status.vfs.len(), usize::from(n));
        assert!(r
            .status
            .vfs
            .iter()
            .all(|v| v.driver.as_deref() == Some("vfio-pci")));
    }
}

#[test]
fn missing_vf_driver_fails_before_touching_the_count() {
    let mgr = igb_on_igb();
    mgr.sysfs().remove_module("vfio-pci");
    let err = mgr
        .set_vf_count(pf(), 2, &opts(Some("vfio-pci")))
        .unwrap_err();
    assert!(matches!(err, Error::ModuleLoad { .. }), "{err}");
    assert_eq!(err.kind(), "driver_not_loaded");
    assert!(
        err.chain().contains("Module vfio-pci not found"),
        "{}",
        err.chain()
    );
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 0);
}

#[test]
fn unloaded_pf_and_vf_drivers_are_loaded_by_the_helper() {
    let fake = FakeSysfs::with_igb();
    fake.unload_driver("igb");
    fake.unload_driver("vfio-pci");
    let mgr = fake.manager();
    let o = VfsSetOptions {
        pf_driver: Some(drv("igb")),
        bind: Some(drv("vfio-pci")),
        qdma: None,
    };
    let r = mgr.set_vf_count(pf(), 4, &o).unwrap();
    assert_eq!(mgr.sysfs().module_loads(), ["igb", "vfio-pci"]);
    assert_eq!(r.status.driver.as_deref(), Some("igb"));
    assert!(r
        .status
        .vfs
        .iter()
        .all(|v| v.driver.as_deref() == Some("vfio-pci")));
}

#[test]
fn injected_bind_failure_is_reported_with_the_device() {
    let mgr = igb_on_igb();
    mgr.sysfs().fail_next_write("driver_override", libc::EIO);
    let err = mgr
        .set_vf_count(pf(), 1, &opts(Some("vfio-pci")))
        .unwrap_err();
    let text = err.chain();
    assert!(text.contains("0000:01:10.0/driver_override"), "{text}");
    assert!(matches!(err, Error::Sysfs { op: "write", .. }));
}

#[test]
fn probe_that_binds_nothing_is_a_bind_failure() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 1, &opts(None)).unwrap();
    let vf = mgr.vfs(pf()).unwrap()[0].1;
    mgr.sysfs().add_driver(
        "broken",
        crate::fake::DriverModel {
            sriov_configure: false,
            max_vfs: None,
            ids: vec![],
            qdma: false,
            probe_fails: true,
        },
    );
    let err = mgr.bind(vf, &drv("broken")).unwrap_err();
    assert!(
        matches!(err, Error::BindFailed { actual: None, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "binding 0000:01:10.0 to broken failed: the device is bound to no driver"
    );
    mgr.sysfs().fail_next_write("drivers_probe", libc::ENODEV);
    let err = mgr.bind(vf, &drv("vfio-pci")).unwrap_err();
    assert!(err.chain().contains("drivers_probe"), "{}", err.chain());
}

#[test]
fn not_sriov_and_missing_devices_are_named() {
    let fake = FakeSysfs::with_igb();
    fake.add_device("0000:00:02.0");
    let mgr = fake.manager();
    let plain = PciAddress::parse("0000:00:02.0").unwrap();
    let err = mgr.pf_status(plain).unwrap_err();
    assert!(matches!(err, Error::NotSriov { .. }));
    let gone = PciAddress::parse("0000:09:00.0").unwrap();
    let err = mgr.pf_status(gone).unwrap_err();
    assert!(matches!(err, Error::NoSuchDevice { .. }));
    assert!(err.to_string().contains("0000:09:00.0"));
}

#[test]
fn device_links_escaping_the_devices_tree_are_refused() {
    let fake = FakeSysfs::with_igb();
    fake.add_escaping_link("0000:0f:00.0");
    let mgr = fake.manager();
    let evil = PciAddress::parse("0000:0f:00.0").unwrap();
    let err = mgr.driver_of(evil).unwrap_err();
    assert!(matches!(err, Error::OutsideDevices { .. }), "{err}");
    assert!(mgr.sysfs().writes().is_empty());
}

#[test]
fn qdma_profile_applies_after_vf_creation_on_qdma_pf_only() {
    let fake = FakeSysfs::new();
    fake.add_pf("0000:03:00.0", "0x10ee", "0x903f", 252, "0xa03f");
    let mgr = fake.manager();
    let q = PciAddress::parse("0000:03:00.0").unwrap();
    let mut profile = QdmaProfile::default();
    profile.pf.insert("qmax".into(), 512);
    profile.vf.insert("qmax".into(), 64);
    let o = VfsSetOptions {
        pf_driver: Some(drv("qdma-pf")),
        bind: Some(drv("qdma-vf")),
        qdma: Some(profile.clone()),
    };
    let r = mgr.set_vf_count(q, 2, &o).unwrap();
    assert!(r.steps.iter().any(|s| s.name == "qdma_profile"));
    assert_eq!(
        mgr.sysfs().qdma_setting("0000:03:00.0", "qmax").as_deref(),
        Some("512")
    );
    for (_, vf) in mgr.vfs(q).unwrap() {
        assert_eq!(
            mgr.sysfs().qdma_setting(&vf.to_string(), "qmax").as_deref(),
            Some("64")
        );
    }
    let w = mgr.sysfs().writes();
    let enable = w
        .iter()
        .position(|(p, v)| p.ends_with("sriov_numvfs") && v == "2")
        .unwrap();
    let qmax = w
        .iter()
        .position(|(p, _)| p.ends_with("qdma/qmax"))
        .unwrap();
    assert!(enable < qmax);

    // Generic path: an igb PF with the same profile writes no qdma/ attribute.
    let mgr = igb_on_igb();
    let o = VfsSetOptions {
        qdma: Some(profile),
        ..Default::default()
    };
    let r = mgr.set_vf_count(pf(), 2, &o).unwrap();
    assert!(r.steps.iter().all(|s| s.name != "qdma_profile"));
    assert!(mgr
        .sysfs()
        .writes()
        .iter()
        .all(|(p, _)| !p.contains("qdma")));
}

#[test]
fn qdma_write_failure_names_setting_and_function() {
    let fake = FakeSysfs::new();
    fake.add_pf("0000:03:00.0", "0x10ee", "0x903f", 252, "0xa03f");
    let mgr = fake.manager();
    let q = PciAddress::parse("0000:03:00.0").unwrap();
    let mut profile = QdmaProfile::default();
    profile.pf.insert("qmax".into(), 4096);
    mgr.sysfs().fail_next_write("qdma/qmax", libc::EINVAL);
    let o = VfsSetOptions {
        pf_driver: Some(drv("qdma-pf")),
        bind: None,
        qdma: Some(profile),
    };
    let err = mgr.set_vf_count(q, 1, &o).unwrap_err();
    assert!(matches!(err, Error::Qdma { .. }));
    assert!(
        err.to_string().contains("qmax=4096 on 0000:03:00.0"),
        "{err}"
    );
}

#[test]
fn parallel_bind_reports_the_failing_vf_and_binds_the_others() {
    let fake = FakeSysfs::new();
    fake.add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
    fake.preset_driver("0000:02:00.0", "pci-pf-stub");
    let mgr = fake.manager();
    let nvme = PciAddress::parse("0000:02:00.0").unwrap();
    mgr.set_vf_count(nvme, 16, &opts(None)).unwrap();
    mgr.sysfs()
        .fail_next_write("0000:02:11.2/driver_override", libc::EIO);
    let err = mgr
        .set_vf_count(nvme, 16, &opts(Some("vfio-pci")))
        .unwrap_err();
    assert!(
        err.chain().contains("0000:02:11.2/driver_override"),
        "{}",
        err.chain()
    );
    let st = mgr.pf_status(nvme).unwrap();
    for vf in &st.vfs {
        let expected = if vf.bdf.to_string() == "0000:02:11.2" {
            None
        } else {
            Some("vfio-pci")
        };
        assert_eq!(vf.driver.as_deref(), expected, "{}", vf.bdf);
    }
    // Retrying binds the one that failed.
    mgr.set_vf_count(nvme, 16, &opts(Some("vfio-pci"))).unwrap();
    assert!(mgr
        .pf_status(nvme)
        .unwrap()
        .vfs
        .iter()
        .all(|v| v.driver.as_deref() == Some("vfio-pci")));
}

#[test]
fn fake_kernel_answers_erange_above_totalvfs_and_links_vfs_both_ways() {
    let mgr = igb_on_igb();
    let dir = pf().sysfs_rel();
    let err = mgr.write_numvfs(pf(), &dir, 8).unwrap_err();
    match &err {
        Error::TooManyVfs {
            max: 7,
            requested: 8,
            source: Some(e),
            ..
        } => assert_eq!(e.raw_os_error(), Some(libc::ERANGE)),
        other => panic!("{other}"),
    }
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    for (i, vf) in mgr.vfs(pf()).unwrap() {
        let physfn = mgr
            .sysfs()
            .read_link(&vf.sysfs_rel().join("physfn"))
            .unwrap();
        assert_eq!(physfn.file_name().unwrap().to_str(), Some(PF));
        let back = mgr
            .sysfs()
            .canonicalize(&dir.join(format!("virtfn{i}")))
            .unwrap();
        assert_eq!(back, mgr.sysfs().canonicalize(&vf.sysfs_rel()).unwrap());
    }
}

#[test]
fn vf_held_open_through_vfio_blocks_the_count_change_before_any_write() {
    let mgr = igb_on_igb();
    let r = mgr.set_vf_count(pf(), 2, &opts(Some("vfio-pci"))).unwrap();
    let group = r.status.vfs[1].iommu_group.unwrap();
    mgr.sysfs().hold_open(4242, &format!("/dev/vfio/{group}"));
    let st = mgr.pf_status(pf()).unwrap();
    assert_eq!(st.vfs[0].held_by, None);
    let held = st.vfs[1].held_by.as_ref().unwrap();
    assert_eq!(
        (held.pid, held.comm.as_str(), held.file.clone()),
        (4242, "fakevmm", format!("/dev/vfio/{group}"))
    );
    mgr.sysfs().clear_writes();
    let err = mgr
        .set_vf_count(pf(), 4, &opts(Some("vfio-pci")))
        .unwrap_err();
    assert!(matches!(err, Error::VfInUse { pid: 4242, .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("PF 0000:01:00.0: VF 0000:01:10.1 is in use: pid 4242 holds /dev/vfio/{group} open; pause or close it before changing VFs")
    );
    assert!(mgr.sysfs().writes().is_empty());
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 2);
    // Nor may the PF driver change or the VF be moved off vfio-pci meanwhile.
    let err = mgr.ensure_pf_driver(pf(), &drv("pci-pf-stub")).unwrap_err();
    assert!(matches!(err, Error::VfInUse { .. }), "{err}");
    let vf = r.status.vfs[1].bdf;
    assert!(matches!(mgr.unbind(vf), Err(Error::VfInUse { .. })));
    mgr.sysfs().exit_process(4242);
    mgr.set_vf_count(pf(), 4, &opts(Some("vfio-pci"))).unwrap();
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 4);
}

#[test]
fn unrelated_open_files_and_unbound_vfs_do_not_count_as_in_use() {
    let mgr = igb_on_igb();
    mgr.set_vf_count(pf(), 2, &opts(None)).unwrap();
    // VFs not on vfio-pci have no VFIO files, whatever is open.
    mgr.sysfs().hold_open(7, "/dev/vfio/vfio");
    mgr.sysfs().hold_open(7, "/dev/vfio/999");
    mgr.set_vf_count(pf(), 3, &opts(Some("vfio-pci"))).unwrap();
    mgr.set_vf_count(pf(), 1, &opts(Some("vfio-pci"))).unwrap();
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 1);
}

#[test]
fn vfio_device_fds_and_bar_mappings_count_as_holders() {
    let mgr = igb_on_igb();
    let r = mgr.set_vf_count(pf(), 2, &opts(Some("vfio-pci"))).unwrap();
    let vf = r.status.vfs[1].bdf;
    // A device fd whose fdinfo names the VF (its group fd closed).
    mgr.sysfs().hold_device_fd(51, &vf.to_string(), true);
    let st = mgr.pf_status(pf()).unwrap();
    assert_eq!(st.vfs[0].held_by, None);
    let held = st.vfs[1].held_by.as_ref().unwrap();
    assert_eq!(held.pid, 51);
    assert!(
        held.file
            .starts_with("anon_inode:[vfio-device] (VFIO device fd"),
        "{}",
        held.file
    );
    let err = mgr
        .set_vf_count(pf(), 3, &opts(Some("vfio-pci")))
        .unwrap_err();
    assert!(matches!(err, Error::VfInUse { pid: 51, .. }), "{err}");
    mgr.sysfs().exit_process(51);
    // One whose fdinfo does not name it (Linux 6.12) is not attributed by the scan.
    mgr.sysfs().hold_device_fd(52, &vf.to_string(), false);
    assert_eq!(mgr.pf_status(pf()).unwrap().vfs[1].held_by, None);
    mgr.sysfs().exit_process(52);
    // A mapping of the VF's BAR through sysfs.
    let resource = format!("/sys/devices/pci0000:00/{vf}/resource0");
    mgr.sysfs().map_file(53, &resource);
    let err = mgr
        .set_vf_count(pf(), 3, &opts(Some("vfio-pci")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("PF {}: VF {vf} is in use: pid 53 holds {resource} (mapped) open; pause or close it before changing VFs", pf())
    );
    mgr.sysfs().exit_process(53);
    // A VFIO region mapped by a process that closed its device fd: its device
    // is not shown, so every VF on vfio-pci may be it.
    mgr.sysfs().map_file(54, "anon_inode:[vfio-device]");
    let err = mgr
        .set_vf_count(pf(), 3, &opts(Some("vfio-pci")))
        .unwrap_err();
    assert!(matches!(err, Error::VfInUse { pid: 54, .. }), "{err}");
    assert!(err.to_string().contains("a mapped VFIO region"), "{err}");
    mgr.sysfs().exit_process(54);
    // Mappings of other files, of another device's BAR, are not holders.
    mgr.sysfs()
        .map_file(55, "/usr/lib/x86_64-linux-gnu/libc.so.6");
    mgr.sysfs()
        .map_file(55, "/sys/devices/pci0000:00/0000:01:00.0/resource0");
    mgr.set_vf_count(pf(), 3, &opts(Some("vfio-pci"))).unwrap();
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 3);
}
