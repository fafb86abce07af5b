# svff: two commands for a new user.
#   make demo   boots the emulated SR-IOV lab and shows svff at work
#   make test   every test: unit, RTL benches, fuzz (bounded), and the lab tests on a real kernel
# Both install what they need first (scripts/deps.sh, idempotent).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
LAB = target/debug/svff-lab
# Optional features on in every build and test: VMs of kind libvirt (needs libvirt-dev, deps.sh).
FEATURES ?= svff-pf-helper/libvirt
CARGO_FEATURES = $(if $(FEATURES),--features $(FEATURES))

.PHONY: all deps build demo bench qemu test test-host test-rtl test-fuzz test-lab lint doc clean

all: build

deps:
	@bash scripts/deps.sh
	@bash scripts/rust-check.sh

build: deps
	$(CARGO) build --workspace --all-targets $(CARGO_FEATURES)

demo: build
	$(LAB) run --timeout 900 -- bash $(CURDIR)/scripts/demo.sh

# The paper's Table I/II in the lab: `svff bench` on the nvme PF (on the kernel's nvme driver,
# which pool mode needs), 1/4/10 VFs, every mode, svff-vmm test guests, stock QEMU and svff's
# patched QEMU (L2 Linux) side by side; JSON, tables and SVG plot under target/bench/. L1's
# root is read-only, so the JSON comes out on stdout and the host renders tables and plot.
#   make bench BENCH_RUNS=100 (the paper's count; default 5)  BENCH_VFS=1,4,10  BENCH_MODES=...
#   BENCH_VMMS=svff-vmm,qemu-stock,qemu  BENCH_PROFILE=nvme|pci-pf-stub
# Then the large part: BENCH_VFS_LARGE VFs (default 32, the most the lab opens through VFIO;
# empty: skipped) with BENCH_MODES_LARGE on BENCH_VMMS_LARGE (a QEMU guest holds at most 24
# VFs), one L1 boot per svff-vmm guest load of BENCH_GUESTS_LARGE (idle: spinning on their VFs,
# with the guest view; stopped: the VMMs' own cost, as 32 spinning nested guests on L1's one
# vCPU slow the kernel's count change), each written to target/bench/bench-large-<load>.json
# and appended to tables.txt.
BENCH_VFS_LARGE ?= 32
BENCH_GUESTS_LARGE ?= idle stopped
BENCH_MODES_LARGE ?= floor,pause
BENCH_VMMS_LARGE ?= svff-vmm
BENCH_RUNS ?= 5
BENCH_VFS ?= 1,4,10
BENCH_MODES ?= floor,pause,detach,pool
BENCH_VMMS ?= svff-vmm,qemu-stock,qemu
BENCH_PROFILE ?= nvme
BENCH_TIMEOUT ?= 3600
comma := ,
bench: build qemu
	@mkdir -p target/bench
	$(LAB) run --timeout $(BENCH_TIMEOUT) -- sh -c 'modprobe vfio-pci && modprobe kvm-amd && \
	  $(CURDIR)/target/debug/svff bench --pf $$SVFF_LAB_NVME_PF --vfs $(BENCH_VFS) \
	    --runs $(BENCH_RUNS) --mode $(BENCH_MODES) --vmm $(BENCH_VMMS) --profile $(BENCH_PROFILE) \
	    --json /tmp/svff-bench.json >&2 && \
	  cat /tmp/svff-bench.json' > target/bench/bench.json
	target/debug/svff bench --report target/bench/bench.json --plot target/bench/bench.svg \
	  | tee target/bench/tables.txt
	$(if $(BENCH_VFS_LARGE),for g in $(BENCH_GUESTS_LARGE); do \
	  $(LAB) run --timeout $(BENCH_TIMEOUT) -- sh -c "modprobe vfio-pci && modprobe kvm-amd && \
	    $(CURDIR)/target/debug/svff bench --pf \$$SVFF_LAB_NVME_PF --vfs $(BENCH_VFS_LARGE) \
	      --runs $(BENCH_RUNS) --mode $(BENCH_MODES_LARGE) --vmm $(BENCH_VMMS_LARGE) \
	      --profile $(BENCH_PROFILE) --guests $$g --json /tmp/svff-bench.json >&2 && \
	    cat /tmp/svff-bench.json" > target/bench/bench-large-$$g.json || exit 1; \
	  (echo; echo "Large part: $(BENCH_VFS_LARGE) VFs, svff-vmm test guests $$g"; \
	    target/debug/svff bench --report target/bench/bench-large-$$g.json) | tee -a target/bench/tables.txt; \
	done)
	@echo "make bench: target/bench/bench.json, target/bench/tables.txt, target/bench/bench.svg$(if $(BENCH_VFS_LARGE),$(comma) target/bench/bench-large-{$(BENCH_GUESTS_LARGE)}.json)"

# svff's QEMU (qemu-fork/): upstream QEMU + patches + libvfio_pause.a, cached by input hash in
# ~/.cache/svff-qemu/; prints the binary's path.
qemu: deps
	@bash qemu-fork/build.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets $(CARGO_FEATURES) -- -D warnings

doc: deps
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps $(CARGO_FEATURES)

test-host: deps
	$(CARGO) test --workspace $(CARGO_FEATURES)
	# svff without the libvirt feature: a libvirt VM is refused, naming the feature.
	$(if $(FEATURES),$(CARGO) test -p svff-pf-helper --lib)

test-rtl: deps
	$(MAKE) -C fpga-rtl test

test-fuzz: deps
	@if [ -f qmp-ext/fuzz/ci.sh ]; then bash qmp-ext/fuzz/ci.sh; fi

test-lab: build qemu
	SVFF_LAB_FEATURES="$(FEATURES)" $(LAB) test

test: lint doc test-host test-rtl test-fuzz test-lab
	@echo "make test: all suites passed"

clean:
	$(CARGO) clean
