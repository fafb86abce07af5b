use super::fake::FakeNvme;
use super::*;

fn pf() -> PciAddress {
    PciAddress::parse("0000:02:00.0").unwrap()
}

fn plan_for(fake: &FakeNvme, n: u16, req: &NvmeResources) -> Result<Vec<PlannedVf>, Error> {
    let caps = primary_caps(fake)?;
    let secs = secondary_controllers(fake)?;
    check_plan(pf(), &caps, &secs, n, req)
}

#[test]
fn admin_ioctl_number_is_iowr_n_0x41_of_the_72_byte_passthru_struct() {
    assert_eq!(std::mem::size_of::<PassthruCmd>(), 72);
    assert_eq!(admin::NVME_IOCTL_ADMIN_CMD, 0xC048_4E41);
    // Field offsets of struct nvme_passthru_cmd.
    let c = PassthruCmd::default();
    let base = &c as *const _ as usize;
    assert_eq!(&c.addr as *const _ as usize - base, 24);
    assert_eq!(&c.data_len as *const _ as usize - base, 36);
    assert_eq!(&c.cdw10 as *const _ as usize - base, 40);
    assert_eq!(&c.cdw11 as *const _ as usize - base, 44);
    assert_eq!(&c.timeout_ms as *const _ as usize - base, 64);
    assert_eq!(&c.result as *const _ as usize - base, 68);
}

#[test]
fn commands_encode_opcode_cns_action_type_controller_and_count() {
    let id = AdminCommand::identify(CNS_SECONDARY_CTRL_LIST, 0x0102);
    assert_eq!(
        (id.opcode, id.cdw10, id.cdw11, id.data_len),
        (0x06, 0x0102_0015, 0, 4096)
    );
    let id = AdminCommand::identify(CNS_PRIMARY_CTRL_CAPS, 0);
    assert_eq!(id.cdw10, 0x14);
    let a = AdminCommand::virt_mgmt(VirtAction::Assign, ResourceType::Vi, 3, 2);
    assert_eq!(
        (a.opcode, a.cdw10, a.cdw11, a.data_len),
        (0x1c, 0x0003_0108, 2, 0)
    );
    let a = AdminCommand::virt_mgmt(VirtAction::Assign, ResourceType::Vq, 64, 4);
    assert_eq!((a.cdw10, a.cdw11), (0x0040_0008, 4));
    assert_eq!(
        AdminCommand::virt_mgmt(VirtAction::Offline, ResourceType::Vq, 1, 0).cdw10,
        0x0001_0007
    );
    assert_eq!(
        AdminCommand::virt_mgmt(VirtAction::Online, ResourceType::Vq, 1, 0).cdw10,
        0x0001_0009
    );
    let pt = a.to_passthru(0x1000);
    assert_eq!(
        (pt.opcode, pt.addr, pt.timeout_ms, pt.nsid),
        (0x1c, 0x1000, 10_000, 0)
    );
}

#[test]
fn identify_structures_decode_at_the_spec_offsets() {
    let fake = FakeNvme::new(3, 100, 50, 8, 4);
    fake.model().secs[1] = fake::Sec {
        scid: 2,
        online: true,
        vfn: 2,
        nvq: 4,
        nvi: 2,
    };
    let caps = primary_caps(&fake).unwrap();
    assert_eq!(
        (caps.vqfrt, caps.vqrfa, caps.vqfrsm, caps.vqprt),
        (100, 4, 8, 3)
    );
    assert_eq!(
        (caps.vifrt, caps.virfa, caps.vifrsm, caps.viprt),
        (50, 2, 4, 16)
    );
    assert!(caps.supports(ResourceType::Vq) && caps.supports(ResourceType::Vi));
    let list = secondary_controllers(&fake).unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(
        list[1],
        SecondaryController {
            scid: 2,
            pcid: 0,
            online: true,
            vfn: 2,
            nvq: 4,
            nvi: 2
        }
    );
    assert!(!list[0].online);
}

#[test]
fn secondary_list_is_read_in_pages_of_127() {
    let fake = FakeNvme::new(300, 600, 300, 2, 1);
    let list = secondary_controllers(&fake).unwrap();
    assert_eq!(list.len(), 300);
    assert!(list.windows(2).all(|w| w[0].scid + 1 == w[1].scid));
    let starts: Vec<u32> = fake.log().iter().map(|(_, cdw10, _)| cdw10 >> 16).collect();
    assert_eq!(starts, [0, 128, 255]);
}

#[test]
fn resource_specs_parse_and_bad_ones_are_refused() {
    let r = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:4,vi:2").unwrap();
    assert_eq!(r.for_vf(0), Some(super::VfResources { vq: 2, vi: 1 }));
    assert_eq!(r.for_vf(1), Some(super::VfResources { vq: 4, vi: 2 }));
    assert_eq!(r.for_vf(2), None);
    for bad in [
        "",
        "vq:2,vi:1",
        "0=vq:2",
        "0=vq:2,vi:1,0=vq:2,vi:1",
        "0=vq:2,vq:3,vi:1",
        "0=qmax:2,vi:1",
        "x=vq:2,vi:1",
        "0=vq:-1,vi:1",
    ] {
        assert!(NvmeResources::parse_spec(bad).is_err(), "{bad}");
    }
}

#[test]
fn resources_beyond_the_per_vf_maximum_are_refused_naming_the_vf_and_resource() {
    let fake = FakeNvme::lab();
    let req = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:3,vi:1").unwrap();
    let err = plan_for(&fake, 4, &req).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), "nvme_resources");
    assert!(
        text.contains("VF 1: 3 VQ requested, at most 2 per secondary controller"),
        "{text}"
    );
    let req = NvmeResources::uniform(2, 2);
    let text = plan_for(&fake, 1, &req).unwrap_err().to_string();
    assert!(text.contains("VF 0: 2 VI requested, at most 1"), "{text}");
}

#[test]
fn resources_beyond_the_flexible_total_are_refused() {
    // 8 VQ in all, primary keeps 2, a secondary outside the request holds 2.
    let fake = FakeNvme::new(4, 8, 8, 4, 2);
    fake.model().vqrfap = 2;
    fake.model().secs[3].nvq = 2;
    fake.model().secs[3].nvi = 1;
    let ok = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:2,vi:1").unwrap();
    assert_eq!(plan_for(&fake, 4, &ok).unwrap().len(), 2);
    let req = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:2,vi:1,2=vq:2,vi:1").unwrap();
    let text = plan_for(&fake, 4, &req).unwrap_err().to_string();
    assert!(text.contains("6 VQ requested for VFs 0,1,2, but only 4 of the 8 flexible VQ resources are free (2 kept by the primary, 2 held by other secondaries)"), "{text}");
    // Re-planning the VF that holds resources frees them.
    let req = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:2,vi:1,3=vq:2,vi:1").unwrap();
    assert!(plan_for(&fake, 4, &req).is_ok());
}

#[test]
fn vfs_that_could_not_go_online_or_do_not_exist_are_refused() {
    let fake = FakeNvme::lab();
    for (spec, n, want) in [
        ("0=vq:1,vi:1", 1, "VF 0: vq:1,vi:1 cannot go online"),
        ("0=vq:2,vi:0", 1, "VF 0: vq:2,vi:0 cannot go online"),
        (
            "4=vq:2,vi:1",
            4,
            "VF 4 given resources, but the PF has 4 VFs",
        ),
    ] {
        let text = plan_for(&fake, n, &NvmeResources::parse_spec(spec).unwrap())
            .unwrap_err()
            .to_string();
        assert!(text.contains(want), "{spec}: {text}");
    }
    let fake = FakeNvme::new(2, 8, 8, 2, 1);
    let text = plan_for(&fake, 3, &NvmeResources::uniform(2, 1))
        .unwrap_err()
        .to_string();
    assert!(text.contains("VF 2 has no secondary controller"), "{text}");
    // vq:0,vi:0 is a VF left offline.
    assert!(plan_for(&fake, 2, &NvmeResources::uniform(0, 0)).is_ok());
}

#[test]
fn apply_sets_offline_then_assigns_vq_then_vi_then_online() {
    let fake = FakeNvme::new(4, 16, 8, 4, 2);
    fake.model().secs[1] = fake::Sec {
        scid: 2,
        online: true,
        vfn: 2,
        nvq: 2,
        nvi: 1,
    };
    let req = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:4,vi:2").unwrap();
    let plan = plan_for(&fake, 2, &req).unwrap();
    let secs = secondary_controllers(&fake).unwrap();
    assert_eq!(changed_vfs(&plan, &secs), [0, 1]);
    fake.model().log.clear();
    let changed = apply_plan(pf(), &fake, &plan, false, &|_| None).unwrap();
    assert_eq!(changed, 2);
    let vm: Vec<(u32, u32)> = fake
        .log()
        .into_iter()
        .filter(|(op, _, _)| *op == 0x1c)
        .map(|(_, cdw10, cdw11)| (cdw10, cdw11))
        .collect();
    assert_eq!(
        vm,
        [
            (0x0001_0007, 0),
            (0x0002_0007, 0),
            (0x0001_0008, 2),
            (0x0001_0108, 1),
            (0x0001_0009, 0),
            (0x0002_0008, 4),
            (0x0002_0108, 2),
            (0x0002_0009, 0),
        ]
    );
    assert_eq!(
        fake.sec(1),
        fake::Sec {
            scid: 1,
            online: true,
            vfn: 1,
            nvq: 2,
            nvi: 1
        }
    );
    assert_eq!(
        fake.sec(2),
        fake::Sec {
            scid: 2,
            online: true,
            vfn: 2,
            nvq: 4,
            nvi: 2
        }
    );
    // Applying the same plan again touches nothing, unless forced (new VFs).
    assert!(changed_vfs(&plan, &secondary_controllers(&fake).unwrap()).is_empty());
    let one = NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:2,vi:1").unwrap();
    let plan2 = plan_for(&fake, 2, &one).unwrap();
    assert_eq!(
        changed_vfs(&plan2, &secondary_controllers(&fake).unwrap()),
        [1]
    );
    fake.model().log.clear();
    assert_eq!(apply_plan(pf(), &fake, &plan, false, &|_| None).unwrap(), 0);
    assert!(fake.log().iter().all(|(op, _, _)| *op == 0x06));
    assert_eq!(apply_plan(pf(), &fake, &plan, true, &|_| None).unwrap(), 2);
    assert_eq!(
        fake.sec(2),
        fake::Sec {
            scid: 2,
            online: true,
            vfn: 2,
            nvq: 4,
            nvi: 2
        }
    );
}

#[test]
fn a_refused_command_names_the_controller_the_vf_and_the_nvme_status() {
    let fake = FakeNvme::lab();
    let plan = plan_for(&fake, 1, &NvmeResources::uniform(2, 1)).unwrap();
    // Commands: list (1 page), offline, assign VQ (index 2) ...
    fake.model().log.clear();
    fake.model().fail_at = Some((2, 0x4121));
    let vf = PciAddress::parse("0000:02:00.1").unwrap();
    let err = apply_plan(pf(), &fake, &plan, false, &|i| (i == 0).then_some(vf)).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), "nvme");
    assert!(
        text.contains("/dev/nvme-fake: Virtualization Management: assign 2 VQ to secondary controller 1 (VF 0 0000:02:00.1) failed: NVMe status 0x4121 (Invalid Number of Controller Resources)"),
        "{text}"
    );
}

#[test]
fn status_reports_each_secondary_by_vf_index_and_errors_without_failing() {
    let fake = FakeNvme::lab();
    fake.model().secs[0] = fake::Sec {
        scid: 1,
        online: true,
        vfn: 1,
        nvq: 2,
        nvi: 1,
    };
    let (st, vfs) = read_status(&fake, pf());
    assert_eq!(st.error, None);
    assert_eq!(
        (st.vq_total, st.vq_assigned, st.vq_max_per_vf),
        (Some(128), Some(2), Some(2))
    );
    assert_eq!(
        vfs[&0],
        SecondaryStatus {
            scid: 1,
            online: true,
            vq: 2,
            vi: 1
        }
    );
    assert!(!vfs[&1].online);
    let (st, vfs) = read_status(
        &DevNvmeOpener {
            sysfs_root: "/nonexistent".into(),
        },
        pf(),
    );
    assert!(st.error.unwrap().contains("no NVMe controller"));
    assert!(vfs.is_empty());
}

fn nvme_pf_manager() -> (crate::fake::FakeSysfs, FakeNvme) {
    let sys = crate::fake::FakeSysfs::new();
    sys.add_driver(
        "nvme",
        crate::fake::DriverModel {
            sriov_configure: true,
            max_vfs: None,
            ids: vec![("0x1b36".into(), "0x0010".into())],
            qdma: false,
            probe_fails: false,
        },
    );
    sys.add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
    sys.preset_driver("0000:02:00.0", "nvme");
    (sys, FakeNvme::lab())
}

#[test]
fn vfs_set_checks_before_writing_and_applies_after_creation_before_binding() {
    let (sys, nvme) = nvme_pf_manager();
    let mgr = sys
        .manager()
        .with_nvme_opener(std::sync::Arc::new(nvme.clone()));
    let opts = crate::VfsSetOptions {
        bind: Some(crate::DriverName::vfio_pci()),
        ..Default::default()
    };
    let report = mgr
        .set_vf_count_with(pf(), 4, &opts, Some(&NvmeResources::uniform(2, 1)))
        .unwrap();
    let names: Vec<&str> = report.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "nvme_check",
            "autoprobe_off",
            "enable_vfs",
            "nvme_resources",
            "bind_vfs"
        ]
    );
    for i in 1..=4 {
        assert_eq!(
            nvme.sec(i),
            fake::Sec {
                scid: i,
                online: true,
                vfn: i,
                nvq: 2,
                nvi: 1
            }
        );
    }
    assert!(!nvme.sec(5).online);
    let st = &report.status;
    assert_eq!(st.nvme.as_ref().unwrap().vq_assigned, Some(8));
    assert!(st.vfs.iter().all(|v| v.nvme
        == Some(SecondaryStatus {
            scid: v.index + 1,
            online: true,
            vq: 2,
            vi: 1
        })
        && v.driver.as_deref() == Some("vfio-pci")));

    // Too much for VF 1: refused before any sysfs write or Virtualization Management.
    sys_clear(&mgr);
    nvme.model().log.clear();
    let err = mgr
        .set_vf_count_with(
            pf(),
            2,
            &opts,
            Some(&NvmeResources::parse_spec("0=vq:2,vi:1,1=vq:3,vi:1").unwrap()),
        )
        .unwrap_err();
    assert_eq!(err.kind(), "nvme_resources");
    assert!(
        err.to_string()
            .contains("PF 0000:02:00.0: NVMe VF resources: VF 1: 3 VQ requested, at most 2"),
        "{err}"
    );
    assert!(
        mgr.sysfs().writes().is_empty(),
        "{:?}",
        mgr.sysfs().writes()
    );
    assert!(nvme.log().iter().all(|(op, _, _)| *op == 0x06));
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 4);
}

fn sys_clear(mgr: &crate::SriovManager<crate::fake::FakeSysfs>) {
    mgr.sysfs().clear_writes();
}

#[test]
fn vf_resources_need_the_pf_on_the_nvme_driver() {
    let (sys, nvme) = nvme_pf_manager();
    sys.preset_driver("0000:02:00.0", "pci-pf-stub");
    let mgr = sys
        .manager()
        .with_nvme_opener(std::sync::Arc::new(nvme.clone()));
    let err = mgr
        .set_vf_count_with(
            pf(),
            2,
            &Default::default(),
            Some(&NvmeResources::uniform(2, 1)),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("need the PF on the nvme driver (bound: pci-pf-stub)"),
        "{err}"
    );
    assert!(nvme.log().is_empty());
    assert_eq!(mgr.vf_counts(pf()).unwrap().1, 0);
}
