# svff: two commands for a new user.
#   make demo   boots the emulated SR-IOV lab and shows svff at work
#   make test   every test: unit, RTL benches, fuzz (bounded), and the lab tests on a real kernel
# Both install what they need first (scripts/deps.sh, idempotent).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
LAB = target/debug/svff-lab

.PHONY: all deps build demo qemu test test-host test-rtl test-fuzz test-lab lint doc clean

all: build

deps:
	@bash scripts/deps.sh
	@bash scripts/rust-check.sh

build: deps
	$(CARGO) build --workspace --all-targets

demo: build
	$(LAB) run --timeout 900 -- bash $(CURDIR)/scripts/demo.sh

# svff's QEMU (qemu-fork/): upstream QEMU + patches + libvfio_pause.a, cached by input hash in
# ~/.cache/svff-qemu/; prints the binary's path.
qemu: deps
	@bash qemu-fork/build.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: deps
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

test-host: deps
	$(CARGO) test --workspace

test-rtl: deps
	$(MAKE) -C fpga-rtl test

test-fuzz: deps
	@if [ -f qmp-ext/fuzz/ci.sh ]; then bash qmp-ext/fuzz/ci.sh; fi

test-lab: build qemu
	$(LAB) test

test: lint doc test-host test-rtl test-fuzz test-lab
	@echo "make test: all suites passed"

clean:
	$(CARGO) clean
