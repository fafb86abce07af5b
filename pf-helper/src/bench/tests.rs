//! Host unit tests of svff bench's option checks, statistics, tables, JSON and plot.

use super::*;
use crate::pci::PciAddress;

fn run(total: f64, steps: &[(&str, f64)]) -> Run {
    Run {
        from: 1,
        to: 2,
        total_ms: total,
        steps: steps.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        guest: Vec::new(),
        l2: None,
    }
}

fn series(mode: &str, vmm: &str, vfs: u16, totals: &[f64]) -> Series {
    let runs: Vec<Run> = totals
        .iter()
        .map(|t| run(*t, &[("change_numvfs", t / 2.0)]))
        .collect();
    Series {
        mode: mode.into(),
        vmm: vmm.into(),
        vfs,
        summary: summarize(&runs),
        runs,
    }
}

fn report(series: Vec<Series>) -> BenchReport {
    let mut r = BenchReport {
        format_version: BENCH_FORMAT_VERSION,
        started_unix_s: 0,
        kernel: "6.12".into(),
        pf: "0000:02:00.0".into(),
        profile: "pci-pf-stub".into(),
        vf_counts: vec![1, 10],
        runs: 2,
        warmup: 1,
        guest_memory_mib: 32,
        vms: "test".into(),
        reference: None,
        series,
        table_i: Vec::new(),
        paper_table_i: paper_points(),
    };
    finish(&mut r);
    r
}

#[test]
fn mean_and_sample_sigma_of_known_values() {
    let (m, s) = mean_sigma(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
    assert_eq!(m, 5.0);
    assert!(
        (s - 2.138_089_935).abs() < 1e-6,
        "sample sigma (n - 1): {s}"
    );
    assert_eq!(mean_sigma(&[3.0]), (3.0, 0.0));
    assert_eq!(mean_sigma(&[]), (0.0, 0.0));
}

#[test]
fn summary_averages_steps_counting_a_missing_step_as_zero() {
    let runs = vec![
        run(100.0, &[("pause", 10.0), ("change_numvfs", 80.0)]),
        run(200.0, &[("change_numvfs", 120.0)]),
    ];
    let s = summarize(&runs);
    assert_eq!((s.avg_ms, s.min_ms, s.max_ms), (150.0, 100.0, 200.0));
    assert_eq!(s.steps["pause"], 5.0);
    assert_eq!(s.steps["change_numvfs"], 100.0);
    assert_eq!(
        s.guest_disappeared, None,
        "no guest view without test guests"
    );
}

#[test]
fn table_i_compares_with_detach_and_floor_of_the_same_vf_count() {
    let r = report(vec![
        series("floor", "none", 1, &[1000.0, 1000.0]),
        series("pause", "svff-vmm", 1, &[1100.0, 1100.0]),
        series("detach", "svff-vmm", 1, &[2200.0, 2200.0]),
        series("floor", "none", 10, &[2000.0, 2000.0]),
        series("pause", "svff-vmm", 10, &[2100.0, 2300.0]),
        series("detach", "svff-vmm", 10, &[7200.0, 7200.0]),
    ]);
    let row = |mode: &str, vfs: u16| {
        r.table_i
            .iter()
            .find(|t| t.mode == mode && t.vfs == vfs)
            .unwrap()
            .clone()
    };
    let p10 = row("pause", 10);
    assert_eq!(p10.avg_ms, 2200.0);
    assert_eq!(p10.floor_ratio, Some(1.1));
    assert_eq!(p10.overhead_ms_per_vf, Some(-500.0));
    assert!((p10.overhead_pct.unwrap() + 69.444).abs() < 0.01);
    assert_eq!(row("detach", 1).overhead_pct, Some(0.0));
    assert_eq!(row("floor", 1).floor_ratio, Some(1.0));
    assert_eq!(r.reference.as_deref(), Some("svff-vmm"));
    let text = render_table_i(&r);
    assert!(text.contains("pause/svff-vmm"), "{text}");
    assert!(text.contains("growth per extra VF:"), "{text}");
    assert!(
        text.contains("pause/svff-vmm 122.2 ms"),
        "(2200 - 1100) / 9: {text}"
    );
    assert_eq!(
        text.matches("pause/svff-vmm 122.2 ms").count(),
        1,
        "one slope per mode, though its series are not adjacent: {text}"
    );
    assert!(
        text.contains("detach 10 VF 31129 ms"),
        "paper numbers: {text}"
    );
}

#[test]
fn stock_qemu_detach_is_the_reference_when_measured() {
    let r = report(vec![
        series("detach", "svff-vmm", 1, &[1000.0]),
        series("detach", "qemu-stock", 1, &[2000.0]),
        series("pause", "svff-vmm", 1, &[1000.0]),
    ]);
    assert_eq!(r.reference.as_deref(), Some("qemu-stock"));
    let p = r.table_i.iter().find(|t| t.mode == "pause").unwrap();
    assert_eq!(p.overhead_pct, Some(-50.0));
    assert_eq!(p.floor_ratio, None, "no floor measured");
}

#[test]
fn tables_are_aligned_columns() {
    let r = report(vec![
        series("floor", "none", 1, &[1000.0, 1010.0]),
        series("pause", "svff-vmm", 10, &[12345.6, 12000.0]),
    ]);
    let t = render_table_ii(&r);
    let lines: Vec<&str> = t.lines().skip(1).collect();
    assert_eq!(lines.len(), 3, "{t}");
    // Right-aligned numbers: every row ends at the same column.
    let widths: Vec<usize> = lines.iter().map(|l| l.len()).collect();
    assert!(widths.iter().all(|w| *w == widths[0]), "{t}");
    assert!(t.contains("change_numvfs ms"), "{t}");
}

#[test]
fn vmm_side_sub_steps_get_their_own_table_and_only_series_that_have_them() {
    let runs: Vec<Run> = [100.0, 200.0]
        .iter()
        .map(|t| {
            run(
                *t,
                &[("pause", 30.0), ("pause.close", 20.0), ("pause.qmp", 25.0)],
            )
        })
        .collect();
    let pause = Series {
        mode: "pause".into(),
        vmm: "svff-vmm".into(),
        vfs: 1,
        summary: summarize(&runs),
        runs,
    };
    let r = report(vec![series("floor", "none", 1, &[1000.0]), pause]);
    let t = render_table_ii(&r);
    let (main, vmm) = t
        .split_once("Table II, VMM side")
        .expect("a VMM-side table");
    assert!(
        main.contains("pause ms") && !main.contains("pause.close"),
        "{t}"
    );
    assert!(
        vmm.contains("pause.close ms") && vmm.contains("pause.qmp ms"),
        "{t}"
    );
    assert_eq!(
        vmm.lines().count(),
        3,
        "title, header, the pause series only: {t}"
    );
}

#[test]
fn json_document_round_trips_with_its_version_and_shape() {
    let r = report(vec![series("pause", "svff-vmm", 1, &[1.0, 2.0])]);
    let text = serde_json::to_string(&r).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["series"][0]["runs"].as_array().unwrap().len(), 2);
    assert_eq!(v["series"][0]["summary"]["avg_ms"], 1.5);
    assert_eq!(v["table_i"][0]["mode"], "pause");
    assert_eq!(v["paper_table_i"].as_array().unwrap().len(), 4);
    let back: BenchReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
}

#[test]
fn guest_view_summary_counts_disappearances() {
    let mut runs = vec![run(1.0, &[]), run(1.0, &[])];
    for (i, r) in runs.iter_mut().enumerate() {
        r.guest.push(GuestRunView {
            vm: "vm0".into(),
            dev: "00:01.0".into(),
            window_ms: Some(100.0 * (i + 1) as f64),
            sample_ms: Some(5.0),
            failed_reads: 10,
            max_tsc: 1,
            disappeared: i == 1,
            samples: 3,
            tsc_window_ms: (i == 0).then_some(80.0),
            tsc_window_max_ms: Some(80.0),
        });
    }
    let s = summarize(&runs);
    assert_eq!(s.guest_window_avg_ms, Some(150.0));
    assert_eq!(s.guest_window_max_ms, Some(200.0));
    assert_eq!(s.guest_disappeared, Some(1));
    assert_eq!(s.guest_tsc_window_max_ms, Some(80.0));
    assert_eq!(
        s.guest_tsc_windows,
        Some(1),
        "only the run that raised the maximum"
    );
    let r = report(vec![Series {
        mode: "detach".into(),
        vmm: "svff-vmm".into(),
        vfs: 1,
        summary: s,
        runs,
    }]);
    let all = render_all(&r);
    assert!(all.contains("Guest view"), "{all}");
    assert!(all.contains("1 of 2"), "{all}");
}

#[test]
fn plot_is_an_svg_with_every_series_and_the_paper_labelled() {
    let r = report(vec![
        series("pause", "svff-vmm", 1, &[1000.0, 1100.0]),
        series("floor", "none", 1, &[900.0]),
        series("pause", "svff-vmm", 10, &[2000.0, 2100.0]),
        series("floor", "none", 10, &[1900.0]),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.svg");
    draw_plot(&r, &path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    assert!(svg.contains("pause/svff-vmm (this run)"));
    assert!(svg.contains("floor (this run)"));
    assert!(svg.contains("detach (paper, CITS 2023 Table I"));
    assert!(svg.contains("pause (paper, CITS 2023 Table I"));
    assert_eq!(
        svg.matches("pause/svff-vmm (this run)").count(),
        1,
        "one legend entry per mode, though its series are not adjacent"
    );
}

fn opts() -> BenchOptions {
    BenchOptions::default()
}

#[test]
fn parsers_reject_unknown_modes_vmms_and_bad_counts() {
    assert_eq!(
        parse_modes("pause,floor,pause").unwrap(),
        vec![BenchMode::Pause, BenchMode::Floor]
    );
    let e = parse_modes("pause,turbo").unwrap_err().to_string();
    assert!(
        e.contains("\"turbo\": unknown mode (known: pause, detach, floor, pool)"),
        "{e}"
    );
    let e = parse_vmms("qemu,kvmtool").unwrap_err().to_string();
    assert!(e.contains("\"kvmtool\": unknown VMM"), "{e}");
    assert_eq!(parse_vf_counts("1,4,10").unwrap(), vec![1, 4, 10]);
    for bad in ["0", "x", "", "70000"] {
        assert!(parse_vf_counts(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn plan_refuses_stock_qemu_pause_and_unmanageable_vmms() {
    let mut o = opts();
    o.vmms = vec![VmmKind::QemuStock];
    o.config = Some("/etc/svff/helper.toml".into());
    o.modes = vec![BenchMode::Pause];
    let e = plan(&o).unwrap_err().to_string();
    assert!(e.contains("unpatched QEMU has no pause"), "{e}");

    o.modes = vec![BenchMode::Pause, BenchMode::Detach];
    assert!(
        plan(&o).is_err(),
        "pause is never skipped silently: stock QEMU with pause asked is refused"
    );
    o.modes = vec![BenchMode::Detach, BenchMode::Floor];
    assert_eq!(
        plan(&o).unwrap(),
        vec![
            Planned {
                mode: BenchMode::Floor,
                vmm: None
            },
            Planned {
                mode: BenchMode::Detach,
                vmm: Some(VmmKind::QemuStock)
            }
        ]
    );

    o.vmms = vec![VmmKind::Qemu, VmmKind::QemuStock];
    assert!(plan(&o)
        .unwrap_err()
        .to_string()
        .contains("exactly one --vmm"));

    let mut o = opts();
    o.runs = 0;
    assert!(plan(&o).is_err());
    let mut o = opts();
    o.modes = vec![BenchMode::Floor];
    o.vmms = vec![VmmKind::Qemu];
    assert_eq!(
        plan(&o).unwrap(),
        vec![Planned {
            mode: BenchMode::Floor,
            vmm: None
        }],
        "the floor needs no VMM"
    );
}

#[test]
fn default_plan_is_floor_pause_detach_on_svff_vmm() {
    let p = plan(&opts()).unwrap();
    let names: Vec<(&str, Option<&str>)> = p
        .iter()
        .map(|p| (p.mode.name(), p.vmm.map(VmmKind::name)))
        .collect();
    assert_eq!(
        names,
        vec![
            ("floor", None),
            ("pause", Some("svff-vmm")),
            ("detach", Some("svff-vmm"))
        ]
    );
}

#[test]
fn pool_mode_needs_the_nvme_profile_and_the_bench_s_own_set_up() {
    let mut o = opts();
    o.modes = vec![BenchMode::Pause, BenchMode::Pool];
    let e = plan(&o).unwrap_err().to_string();
    assert!(e.contains("add --profile nvme"), "{e}");

    o.profile = PfProfile::Nvme;
    o.config = Some("/etc/svff/helper.toml".into());
    let e = plan(&o).unwrap_err().to_string();
    assert!(e.contains("--mode pool with --config"), "{e}");

    o.config = None;
    o.modes = vec![BenchMode::Pool, BenchMode::Detach, BenchMode::Pause];
    let names: Vec<&str> = plan(&o).unwrap().iter().map(|p| p.mode.name()).collect();
    assert_eq!(
        names,
        ["pause", "pool", "detach"],
        "pool before detach: a patched QEMU pauses only its own svff-vfio-pci devices"
    );
}

#[test]
fn the_bench_s_own_set_up_runs_every_vmm_kind_side_by_side() {
    let mut o = opts();
    o.vmms = vec![VmmKind::SvffVmm, VmmKind::QemuStock, VmmKind::Qemu];
    let names: Vec<(&str, Option<&str>)> = plan(&o)
        .unwrap()
        .iter()
        .map(|p| (p.mode.name(), p.vmm.map(VmmKind::name)))
        .collect();
    assert_eq!(
        names,
        vec![
            ("floor", None),
            ("pause", Some("svff-vmm")),
            ("pause", Some("qemu")),
            ("detach", Some("svff-vmm")),
            ("detach", Some("qemu-stock")),
            ("detach", Some("qemu")),
        ],
        "stock QEMU only detaches; the others pause and detach"
    );
}

fn qemu_paths() -> QemuPaths {
    QemuPaths {
        stock: "/usr/bin/qemu-system-x86_64".into(),
        patched: "/w/target/svff-qemu/qemu-system-x86_64".into(),
        kernel: "/boot/vmlinuz-6.12".into(),
        busybox: "/bin/busybox".into(),
        firmware: "/usr/share/qemu/qboot.rom".into(),
    }
}

#[test]
fn a_vmm_kind_that_is_not_on_this_machine_is_refused_naming_what_is_missing() {
    let paths = qemu_paths();
    let all = |_: &std::path::Path| true;
    for kind in [VmmKind::Qemu, VmmKind::QemuStock, VmmKind::SvffVmm] {
        assert!(qemu::check(kind, &paths, &[1, 4, 10], all).is_ok());
    }
    let no_patched = |p: &std::path::Path| !p.starts_with("/w/target");
    let e = qemu::check(VmmKind::Qemu, &paths, &[1], no_patched)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("patched QEMU is not built") && e.contains("make qemu"),
        "{e}"
    );
    assert!(
        qemu::check(VmmKind::QemuStock, &paths, &[1], no_patched).is_ok(),
        "stock QEMU does not need the patched build"
    );
    let no_stock = |p: &std::path::Path| p != std::path::Path::new("/usr/bin/qemu-system-x86_64");
    let e = qemu::check(VmmKind::QemuStock, &paths, &[1], no_stock)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--vmm qemu-stock: /usr/bin/qemu-system-x86_64 does not exist"),
        "{e}"
    );
    let no_kvm = |p: &std::path::Path| p != std::path::Path::new("/dev/kvm");
    let e = qemu::check(VmmKind::Qemu, &paths, &[1], no_kvm)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/dev/kvm does not exist"), "{e}");
    let no_kernel = |p: &std::path::Path| !p.starts_with("/boot");
    let e = qemu::check(VmmKind::QemuStock, &paths, &[1], no_kernel)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("guest kernel") && e.contains("/boot/vmlinuz-6.12"),
        "{e}"
    );
    let e = qemu::check(VmmKind::QemuStock, &paths, &[1, 25], all)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 24 VFs"), "{e}");
}

#[test]
fn qemu_guests_get_a_root_port_per_vf_and_the_patched_qemu_its_pausable_device() {
    let pf = PciAddress::parse("0000:01:00.0").unwrap();
    let vfs = [
        (0, PciAddress::parse("0000:01:00.1").unwrap()),
        (1, PciAddress::parse("0000:01:00.2").unwrap()),
    ];
    let p = std::path::Path::new;
    let args_with = |kind, driver| {
        qemu::command_args(
            kind,
            &qemu_paths(),
            p("/t/i.cpio"),
            &qemu::GuestFiles {
                qmp: "/t/q.qmp".into(),
                serial: "/t/s".into(),
                log: "/t/l".into(),
            },
            pf,
            &vfs,
            driver,
        )
        .join(" ")
    };
    let args = |kind| args_with(kind, false);
    let stock = args(VmmKind::QemuStock);
    assert!(stock.contains("-accel kvm -machine q35"), "{stock}");
    assert!(stock.contains("-bios /usr/share/qemu/qboot.rom"), "{stock}");
    assert!(
        stock.contains("-qmp unix:/t/q.qmp,server=on,wait=off"),
        "{stock}"
    );
    let want = format!(
        "-device pcie-root-port,id=svffrp1,bus=pcie.0,chassis=21,slot=21 \
         -device vfio-pci,host=0000:01:00.2,id={},bus=svffrp1",
        crate::orch::device_id(pf, 1)
    );
    assert!(stock.contains(&want), "{stock}");
    let patched = args(VmmKind::Qemu);
    assert!(
        patched.contains("-device svff-vfio-pci,host=0000:01:00.1,")
            && !patched.contains("-device vfio-pci")
            && !patched.contains("recover="),
        "{patched}"
    );
    // With the guest's driver bound, the patched QEMU's devices recover it by AER.
    let patched = args_with(VmmKind::Qemu, true);
    assert!(
        patched.contains("-device svff-vfio-pci,recover=aer,host=0000:01:00.1,"),
        "{patched}"
    );
    let stock = args_with(VmmKind::QemuStock, true);
    assert!(!stock.contains("recover="), "{stock}");
}

#[test]
fn l2_console_lines_parse_with_and_without_a_driver_and_amid_kernel_messages() {
    assert_eq!(
        qemu::parse_line("svff-bench-l2 vfs=3\n"),
        Some(qemu::L2Line {
            vfs: 3,
            bound: None,
            live: None,
            aer: None
        })
    );
    let l = qemu::parse_line("[ 12.5] nvme nvme0: resetsvff-bench-l2 vfs=10 bound=9 live=8 aer=4")
        .unwrap();
    assert_eq!(
        (l.vfs, l.bound, l.live, l.aer),
        (10, Some(9), Some(8), Some(4))
    );
    assert!(!l.ready(10), "not every VF bound and live");
    assert!(qemu::parse_line("svff-bench-l2 vfs=1 bound=1 live=1 aer=0")
        .unwrap()
        .ready(1));
    assert!(qemu::parse_line("svff-bench-l2 vfs=1").unwrap().ready(1));
    assert!(!qemu::parse_line("svff-bench-l2 vfs=0").unwrap().ready(1));
    for bad in [
        "svff-bench-l2: insmod modules/nvme.ko failed",
        "svff-bench-l2 vfs=x",
        "svff-bench-l2 vfs=1 odd=2",
        "svff-bench-l2 bound=1",
        "nvme nvme0: 1/0/0 default/read/poll queues",
    ] {
        assert_eq!(qemu::parse_line(bad), None, "{bad}");
    }
}

#[test]
fn guest_driver_modules_load_dependencies_first_from_modules_dep() {
    let dep = "kernel/drivers/nvme/host/nvme-core.ko.xz: kernel/drivers/nvme/common/nvme-auth.ko.xz\n\
               kernel/drivers/nvme/host/nvme.ko.xz: kernel/drivers/nvme/host/nvme-core.ko.xz kernel/drivers/nvme/common/nvme-auth.ko.xz\n\
               kernel/drivers/nvme/common/nvme-auth.ko.xz:\n\
               kernel/drivers/net/ethernet/intel/igbvf/igbvf.ko.xz:\n";
    assert_eq!(
        qemu::module_load_order(dep, "nvme").unwrap(),
        [
            "kernel/drivers/nvme/common/nvme-auth.ko.xz",
            "kernel/drivers/nvme/host/nvme-core.ko.xz",
            "kernel/drivers/nvme/host/nvme.ko.xz"
        ]
    );
    assert_eq!(
        qemu::module_load_order(dep, "nvme_core").unwrap().len(),
        2,
        "- and _ are the same in module names"
    );
    assert_eq!(
        qemu::module_load_order(dep, "igbvf").unwrap(),
        ["kernel/drivers/net/ethernet/intel/igbvf/igbvf.ko.xz"]
    );
    let e = qemu::module_load_order(dep, "nvm").unwrap_err().to_string();
    assert!(e.contains("nvm is not in modules.dep"), "{e}");
    assert_eq!(qemu::guest_driver(true), Some("nvme"));
    assert_eq!(qemu::guest_driver(false), None);
}

#[test]
fn l2_init_loads_the_driver_modules_in_order_and_reports_bound_live_and_aer() {
    let mods = [
        "modules/nvme-auth.ko".to_owned(),
        "modules/nvme.ko".to_owned(),
    ];
    let s = qemu::init_script("0x1b360x0010", Some("nvme"), &mods);
    let a = s.find("insmod /modules/nvme-auth.ko").unwrap();
    let b = s.find("insmod /modules/nvme.ko").unwrap();
    let lp = s.find("while :").unwrap();
    assert!(
        a < b && b < lp,
        "modules load in order before the loop: {s}"
    );
    assert!(s.contains("*/nvme) b=$((b+1))"), "{s}");
    assert!(s.contains("/sys/class/nvme/"), "{s}");
    assert!(s.contains("AER: device recovery successful"), "{s}");
    assert!(
        s.contains("svff-bench-l2 vfs=$n bound=$b live=$l aer=$a"),
        "{s}"
    );
    let s = qemu::init_script("0x80860x10ca", None, &[]);
    assert!(!s.contains("insmod") && !s.contains("bound="), "{s}");
    assert!(s.contains("echo \"svff-bench-l2 vfs=$n\""), "{s}");
}

fn l2(
    at: std::time::Instant,
    vfs: u16,
    bound: u16,
    live: u16,
    aer: u32,
) -> (std::time::Instant, qemu::L2Line) {
    (
        at,
        qemu::L2Line {
            vfs,
            bound: Some(bound),
            live: Some(live),
            aer: Some(aer),
        },
    )
}

#[test]
fn l2_view_of_a_detach_sees_the_vf_vanish_and_times_its_driver_back_from_the_run_s_end() {
    let t = std::time::Instant::now();
    let at = |ms: u64| t + std::time::Duration::from_millis(ms);
    let lines = [
        l2(at(0), 2, 2, 2, 0),
        l2(at(300), 1, 1, 1, 0),
        l2(at(600), 0, 0, 0, 0),
        l2(at(900), 2, 1, 1, 0),
        l2(at(1200), 2, 2, 2, 0),
        l2(at(1500), 2, 2, 2, 0),
    ];
    let v = guest::l2_view_of_run("qemu0", Some("nvme"), 2, 0, &lines, at(100), at(800));
    assert_eq!(v.vfs, 2);
    assert_eq!((v.vfs_min, v.vanished), (0, true));
    assert_eq!((v.bound_min, v.live_min), (Some(0), Some(0)));
    assert_eq!(
        v.back_ms,
        Some(400.0),
        "1200 ms, the first line with both back, after 800"
    );
    assert_eq!(v.samples, 4, "the lines from 300 to 1200 ms");
    assert_eq!(v.aer_recoveries, Some(0));
    // Still not back at the last line: no back time.
    let v = guest::l2_view_of_run("qemu0", Some("nvme"), 2, 0, &lines[..4], at(100), at(800));
    assert_eq!(v.back_ms, None);
}

#[test]
fn l2_view_of_a_pause_waits_for_the_aer_recoveries_it_expects() {
    let t = std::time::Instant::now();
    let at = |ms: u64| t + std::time::Duration::from_millis(ms);
    // The driver never left live in a sample, but recovered once per VF.
    let lines = [
        l2(at(0), 2, 2, 2, 5),
        l2(at(900), 2, 2, 2, 5),
        l2(at(1200), 2, 2, 2, 6),
        l2(at(1500), 2, 2, 2, 7),
        l2(at(1800), 2, 2, 2, 7),
    ];
    let v = guest::l2_view_of_run("qemu0", Some("nvme"), 2, 2, &lines, at(100), at(800));
    assert_eq!(
        v.back_ms,
        Some(700.0),
        "the line with both recoveries at 1500 ms"
    );
    assert_eq!(v.aer_recoveries, Some(2));
    assert!(!v.vanished);
    assert_eq!((v.bound_min, v.live_min), (Some(2), Some(2)));
    // Without expected recoveries (stock QEMU), the first good line after the run counts.
    let v = guest::l2_view_of_run("qemu0", Some("nvme"), 2, 0, &lines, at(100), at(800));
    assert_eq!(v.back_ms, Some(100.0));
    // One recovery missing: not back.
    let v = guest::l2_view_of_run("qemu0", Some("nvme"), 2, 3, &lines, at(100), at(800));
    assert_eq!(v.back_ms, None);
}

#[test]
fn l2_summary_counts_vanished_disturbed_and_not_back_runs_and_renders_its_table() {
    let view = |vanished: bool, bound: u16, back: Option<f64>, aer: u32| guest::L2RunView {
        vm: "qemu0".into(),
        driver: Some("nvme".into()),
        vfs: 2,
        vfs_min: if vanished { 1 } else { 2 },
        vanished,
        bound_min: Some(bound),
        live_min: Some(bound),
        aer_recoveries: Some(aer),
        back_ms: back,
        samples: 5,
    };
    let mut runs = vec![run(100.0, &[]), run(200.0, &[]), run(300.0, &[])];
    runs[0].l2 = Some(view(true, 1, Some(1000.0), 0));
    runs[1].l2 = Some(view(false, 2, Some(3000.0), 2));
    runs[2].l2 = Some(view(false, 2, None, 1));
    let s = summarize(&runs);
    assert_eq!(s.l2_driver.as_deref(), Some("nvme"));
    assert_eq!(s.l2_vanished, Some(1));
    assert_eq!(s.l2_driver_disturbed, Some(1));
    assert_eq!(s.l2_back_avg_ms, Some(2000.0));
    assert_eq!(s.l2_back_max_ms, Some(3000.0));
    assert_eq!(s.l2_not_back, Some(1));
    assert_eq!(s.l2_aer_recoveries, Some(3));
    assert_eq!(summarize(&[run(1.0, &[])]).l2_driver, None);
    let rep = report(vec![Series {
        mode: "pause".into(),
        vmm: "qemu".into(),
        vfs: 2,
        summary: s,
        runs,
    }]);
    let text = render_all(&rep);
    assert!(text.contains("L2 guest view"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("pause/qemu") && l.contains("nvme"))
        .unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        [
            "pause/qemu",
            "2",
            "nvme",
            "3",
            "1",
            "1",
            "3",
            "2000.0",
            "3000.0",
            "1"
        ],
        "{text}"
    );
    let json = serde_json::to_string(&rep).unwrap();
    let back: BenchReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, rep);
    // A document without the L2 fields (written before they existed) still reads.
    let old = json.replace("\"l2_driver\":\"nvme\",", "");
    assert!(old.len() < json.len());
    serde_json::from_str::<BenchReport>(&old).unwrap();
}

#[test]
fn initramfs_is_a_newc_cpio_with_its_files_and_a_trailer() {
    let a = qemu::cpio(&[("bin", 0o040_755, &[]), ("init", 0o100_755, b"#!/bin/sh\n")]);
    assert!(a.starts_with(b"070701"));
    assert_eq!(a.len() % 4, 0);
    let text = String::from_utf8_lossy(&a);
    assert!(text.contains("bin\0") && text.contains("init\0") && text.contains("#!/bin/sh"));
    assert!(text.contains("TRAILER!!!\0"));
    // The header of `init`: mode 0o100755 and filesize 10, in hex.
    let at = text.find("init\0").unwrap();
    let header = &text[at - 110..at];
    assert_eq!(&header[14..22], "000081ed", "{header}");
    assert_eq!(&header[54..62], "0000000a", "{header}");
}

#[test]
fn pool_mode_on_stock_qemu_alone_is_refused_as_it_cannot_pause() {
    let mut o = opts();
    o.profile = PfProfile::Nvme;
    o.modes = vec![BenchMode::Pool];
    o.vmms = vec![VmmKind::QemuStock];
    let e = plan(&o).unwrap_err().to_string();
    assert!(e.contains("--mode pool --vmm qemu-stock"), "{e}");
}

#[test]
fn more_vfs_than_the_pf_offers_are_refused_counting_the_extra_vf() {
    let pf = PciAddress::parse("0000:01:00.0").unwrap();
    assert!(check_vf_capacity(pf, 64, &[1, 4, 63]).is_ok());
    let e = check_vf_capacity(pf, 64, &[1, 64]).unwrap_err().to_string();
    assert!(
        e.contains("PF 0000:01:00.0 supports at most 64 VFs, and svff bench needs 65"),
        "{e}"
    );
    let e = check_vf_capacity(pf, 7, &[10, 4]).unwrap_err().to_string();
    assert!(e.contains("--vfs 10") && e.contains("at most 7"), "{e}");
    assert!(
        check_vf_capacity(pf, 0, &[1]).is_err(),
        "a PF without SR-IOV"
    );
}

#[test]
fn vmm_libvirt_needs_a_config_whose_vms_are_libvirt_domains() {
    assert_eq!(parse_vmms("libvirt").unwrap(), vec![VmmKind::Libvirt]);
    let mut o = opts();
    o.vmms = vec![VmmKind::Libvirt];
    o.modes = vec![BenchMode::Pause, BenchMode::Detach];
    let e = plan(&o).unwrap_err().to_string();
    assert!(e.contains("--vmm libvirt needs --config FILE"), "{e}");
    // The floor alone needs no VMM, so no config either.
    o.modes = vec![BenchMode::Floor];
    assert!(plan(&o).is_ok());

    o.modes = vec![BenchMode::Pause, BenchMode::Detach];
    o.config = Some("/etc/svff/helper.toml".into());
    assert_eq!(
        plan(&o).unwrap(),
        vec![
            Planned {
                mode: BenchMode::Pause,
                vmm: Some(VmmKind::Libvirt)
            },
            Planned {
                mode: BenchMode::Detach,
                vmm: Some(VmmKind::Libvirt)
            }
        ]
    );

    let path = std::path::Path::new("/etc/svff/helper.toml");
    let head = "socket = \"/run/x.sock\"\nallowed_uids = [0]\nstate_dir = \"/var/lib/x\"\n";
    let libvirt = crate::config::Config::parse(
        &format!(
            "{head}[[vm]]\nname = \"vm1\"\nkind = \"libvirt\"\nlibvirt = {{ domain = \"g\" }}\n"
        ),
        path,
    )
    .unwrap();
    let qmp = crate::config::Config::parse(
        &format!("{head}[[vm]]\nname = \"vm2\"\nkind = \"qmp\"\nqmp = \"/run/vm2.qmp\"\n"),
        path,
    )
    .unwrap();
    assert!(check_config_vmm(VmmKind::Libvirt, &libvirt, path).is_ok());
    assert!(check_config_vmm(VmmKind::Qemu, &qmp, path).is_ok());
    let e = check_config_vmm(VmmKind::Libvirt, &qmp, path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "--vmm libvirt with --config /etc/svff/helper.toml: VM \"vm2\" is reached over QMP"
        ),
        "{e}"
    );
    let e = check_config_vmm(VmmKind::Qemu, &libvirt, path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("VM \"vm1\" is of kind \"libvirt\"; give --vmm libvirt"),
        "{e}"
    );
}
