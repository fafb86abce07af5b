# svff test guest: 32-bit flat protected mode, paging and interrupts off, loaded at 0x100000
# (GUEST_LOAD_ADDR) and entered at its first byte with a stack set up by the VMM.
#
# Absolute addresses are 0x100000 + (label - svff_guest_start): G(label) below, spelled out.
# Register use: ebx/ebp survive calls; helpers clobber eax, ecx, edx, esi, edi as noted.

.pushsection .rodata.svff_test_guest,"a",@progbits
.code32
.p2align 4
.globl svff_guest_start
svff_guest_start:
    .byte 0xe9                          # jmp rel32 (fixed size, so the layout below is fixed)
    .long .Lg_entry - . - 4
    .p2align 3
.globl svff_guest_params
svff_guest_params:                      # filled in by the VMM (TestGuest::params)
.Lg_p_rounds:       .long 0             # stop after this many rounds (0: never)
.Lg_p_report_every: .long 1000          # print counters every this many rounds (>= 1)
.Lg_p_mode:         .long 0             # 0 read loop, 1 scribble while all-ones, 2 halt, 3 spin,
                                        # 4 read loop + igb VFs raise their own MSI-X,
                                        # 5 read loop, BAR0s moved after round 100,
                                        # 6 as 4, MSI-X entry 0 masked in rounds 101..200

.p2align 2
.Lg_nfuncs:     .long 0
.Lg_ntargets:   .long 0
.Lg_cur_id:     .long 0
.Lg_cur_class:  .long 0
.Lg_cur_hdr:    .long 0
.Lg_rounds:     .long 0
.Lg_countdown:  .long 0
.Lg_serial_irqs: .long 0
.Lg_rand:       .long 0x2545f491
.Lg_idtr:       .word 256 * 8 - 1
                .long 0x100000 + .Lg_idt - svff_guest_start
.p2align 3
.Lg_idt:        .fill 256 * 8, 1, 0
# One 128-byte entry per target function (at most 32):
#   +0 conf1 address of its dword 0, +4 BAR0 address, +8 ok, +12 ones, +16 gone, +20 back,
#   +24 max_tsc, +28 flags (bit 0: gone now), +32 last ID register value, +36 reads,
#   +40 MSI-X interrupts taken, +44 vendor/device ID, +48 MSI-X table address (0: none),
#   +52/+56 TSC (lo/hi) of the first read of the current run of all-ones reads (flags bit 1:
#   in such a run), +60 longest window in units of 1024 TSC ticks, +64 last BAR0+8 value,
#   +68 MSI capability offset when MSI (not MSI-X) is set up (0: none)
.p2align 6
.Lg_targets:    .fill 32 * 128, 1, 0

.Lg_s_start:    .asciz "svff-guest: start\n"
.Lg_s_found:    .asciz "svff-guest: found "
.Lg_s_vendor:   .asciz " vendor="
.Lg_s_device:   .asciz " device="
.Lg_s_class:    .asciz " class="
.Lg_s_enum:     .asciz "svff-guest: enumerated "
.Lg_s_funcs:    .asciz " functions, "
.Lg_s_targets:  .asciz " targets\n"
.Lg_s_dev:      .asciz "svff-guest: dev="
.Lg_s_gone:     .asciz " event=gone\n"
.Lg_s_back:     .asciz " event=back\n"
.Lg_s_round:    .asciz " round="
.Lg_s_reads:    .asciz " reads="
.Lg_s_ok:       .asciz " ok="
.Lg_s_ones:     .asciz " ones="
.Lg_s_gonec:    .asciz " gone="
.Lg_s_backc:    .asciz " back="
.Lg_s_max:      .asciz " max_tsc="
.Lg_s_id:       .asciz " id="
.Lg_s_st:       .asciz " st="
.Lg_s_done:     .asciz "svff-guest: done rounds="
.Lg_s_irqs:     .asciz " irqs="
.Lg_s_win:      .asciz " win_ktsc="
.Lg_s_serial:   .asciz "svff-guest: serial irqs="
.Lg_s_msix:     .asciz " msix vector="
.Lg_s_msi:      .asciz " msi vector="
.Lg_s_exc:      .asciz "svff-guest: exception\n"
.Lg_s_halt:     .asciz "svff-guest: halting with interrupts off\n"
.Lg_s_spin:     .asciz "svff-guest: spinning with interrupts off\n"
.Lg_s_moved:    .asciz " moved bar0="

# ---- output helpers --------------------------------------------------------------------
# putc: al -> COM1. Clobbers nothing.
.Lg_putc:
    pushl %edx
    movw $0x3f8, %dx
    outb %al, %dx
    popl %edx
    ret

# puts: esi = NUL-terminated string. Clobbers eax, esi.
.Lg_puts:
2:  lodsb
    testb %al, %al
    jz 3f
    call .Lg_putc
    jmp 2b
3:  ret

# put_hex: eax = value, ecx = digits (1..8), most significant first. Clobbers eax, ecx, edx.
.Lg_put_hex:
    pushl %ebx
    movl %eax, %ebx
    movl $8, %edx
    subl %ecx, %edx
    shll $2, %edx
    pushl %ecx
    movl %edx, %ecx
    shll %cl, %ebx
    popl %ecx
2:  roll $4, %ebx
    movl %ebx, %eax
    andl $0xf, %eax
    cmpl $10, %eax
    jb 3f
    addl $0x27, %eax                   # 'a' - '0' - 10
3:  addl $0x30, %eax
    call .Lg_putc
    loop 2b
    popl %ebx
    ret

# put_dec: eax = value, unsigned decimal. Clobbers eax, ecx, edx.
.Lg_put_dec:
    pushl %ebx
    movl $10, %ebx
    xorl %ecx, %ecx
2:  xorl %edx, %edx
    divl %ebx
    pushl %edx
    incl %ecx
    testl %eax, %eax
    jnz 2b
3:  popl %eax
    addl $0x30, %eax
    call .Lg_putc
    loop 3b
    popl %ebx
    ret

# put_bdf: eax = conf1 address -> "00:DD.F". Clobbers eax, ecx, edx.
.Lg_put_bdf:
    pushl %ebx
    movl %eax, %ebx
    movb $0x30, %al
    call .Lg_putc
    call .Lg_putc
    movb $0x3a, %al
    call .Lg_putc
    movl %ebx, %eax
    shrl $11, %eax
    andl $0x1f, %eax
    movl $2, %ecx
    call .Lg_put_hex
    movb $0x2e, %al
    call .Lg_putc
    movl %ebx, %eax
    shrl $8, %eax
    andl $7, %eax
    movl $1, %ecx
    call .Lg_put_hex
    popl %ebx
    ret

# ---- PCI configuration mechanism #1 ------------------------------------------------------
# cfg_read: eax = conf1 address -> eax = dword. Clobbers edx.
.Lg_cfg_read:
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfc, %dx
    inl %dx, %eax
    ret

# cfg_write: eax = conf1 address (dword aligned), ecx = value. Clobbers edx.
.Lg_cfg_write:
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfc, %dx
    pushl %eax
    movl %ecx, %eax
    outl %eax, %dx
    popl %eax
    ret

# enable_mem: edi = conf1 address of dword 0: sets Memory Space and Bus Master in the
# command register.
# Clobbers eax, edx.
.Lg_enable_mem:
    movl %edi, %eax
    orl $4, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfc, %dx
    inw %dx, %ax
    orw $6, %ax                         # Memory Space and Bus Master (a VF's own MSI-X)
    outw %ax, %dx
    ret

# add_target: edi = conf1 address of a non-bridge function: records it if its BAR0 is a
# memory BAR below 4 GiB, and enables its memory decoding. Clobbers eax, ecx, edx.
.Lg_add_target:
    movl (0x100000 + .Lg_ntargets - svff_guest_start), %eax
    cmpl $32, %eax
    jae 9f
    movl %edi, %eax
    orl $0x10, %eax
    call .Lg_cfg_read
    testl $1, %eax
    jnz 9f                              # I/O BAR
    movl %eax, %ecx
    andl $0xfffffff0, %ecx
    andl $6, %eax
    cmpl $4, %eax
    jne 3f
    movl %edi, %eax                     # 64-bit BAR: the upper half must be 0
    orl $0x14, %eax
    call .Lg_cfg_read
    testl %eax, %eax
    jnz 9f
3:  testl %ecx, %ecx
    jz 9f                               # unassigned
    movl (0x100000 + .Lg_ntargets - svff_guest_start), %eax
    shll $7, %eax
    addl $(0x100000 + .Lg_targets - svff_guest_start), %eax
    movl %edi, 0(%eax)
    movl %ecx, 4(%eax)
    movl (0x100000 + .Lg_cur_id - svff_guest_start), %edx
    movl %edx, 44(%eax)
    incl (0x100000 + .Lg_ntargets - svff_guest_start)
    call .Lg_enable_mem
9:  ret

# ---- one register read ------------------------------------------------------------------
# read_reg: edi = address, ebp = target entry: reads the dword, timing it with rdtsc, and
# counts it; keeps the longest window (a run of all-ones reads up to the next valid read,
# or one slow read) in 1024-tick units. Returns the value in eax. Clobbers eax, ecx, edx, esi.
.Lg_read_reg:
    pushl %ebx
    lfence
    rdtsc
    movl %eax, %esi                     # ebx:esi = start
    movl %edx, %ebx
    movl (%edi), %ecx
    lfence
    rdtsc                               # edx:eax = end
    pushl %eax
    pushl %edx                          # (%esp) = end hi, 4(%esp) = end lo
    subl %esi, %eax
    cmpl 24(%ebp), %eax
    jbe 2f
    movl %eax, 24(%ebp)
2:  incl 36(%ebp)
    cmpl $0xffffffff, %ecx
    jne 3f
    incl 12(%ebp)
    testl $2, 28(%ebp)                  # first all-ones read of a run: note its start
    jnz 4f
    orl $2, 28(%ebp)
    movl %esi, 52(%ebp)
    movl %ebx, 56(%ebp)
    jmp 4f
3:  incl 8(%ebp)
    testl $2, 28(%ebp)                  # a valid read ends a run of all-ones reads:
    jz 5f                               # the window then starts at the run's first read
    andl $0xfffffffd, 28(%ebp)
    movl 52(%ebp), %esi
    movl 56(%ebp), %ebx
5:  movl 4(%esp), %eax                  # window = (end - start) >> 10, its maximum kept
    movl (%esp), %edx
    subl %esi, %eax
    sbbl %ebx, %edx
    shrdl $10, %edx, %eax
    shrl $10, %edx
    jz 6f
    movl $0xffffffff, %eax              # saturated
6:  cmpl 60(%ebp), %eax
    jbe 4f
    movl %eax, 60(%ebp)
4:  addl $8, %esp
    movl %ecx, %eax
    popl %ebx
    ret

# next_rand: eax = the next value of a 32-bit LCG. Clobbers nothing else.
.Lg_next_rand:
    movl (0x100000 + .Lg_rand - svff_guest_start), %eax
    imull $1103515245, %eax, %eax
    addl $12345, %eax
    movl %eax, (0x100000 + .Lg_rand - svff_guest_start)
    ret

# scribble: ebp = target entry: 4 pseudo-random dwords to pseudo-random offsets of its BAR0
# (first 16 KiB, whatever the BAR's size) and 4 to its config space (0x00..0xfc, BARs,
# command and capabilities included). Clobbers eax, ecx, edx, esi, edi.
.Lg_scribble:
    movl $4, %ecx
1:  call .Lg_next_rand
    movl %eax, %edi
    andl $0x3ffc, %edi
    addl 4(%ebp), %edi
    call .Lg_next_rand
    movl %eax, (%edi)
    call .Lg_next_rand
    movl %eax, %esi
    andl $0xfc, %esi
    orl 0(%ebp), %esi
    movl %esi, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    call .Lg_next_rand
    movw $0xcfc, %dx
    outl %eax, %dx
    loop 1b
    ret

# move_bars: every target's BAR0 to 0xe0000000 + index MiB (decoding off while it is
# written, on again after), its entry following. Clobbers eax, ecx, edx, esi, edi.
.Lg_move_bars:
    pushl %ebx
    pushl %ebp
    xorl %ebx, %ebx
1:  cmpl (0x100000 + .Lg_ntargets - svff_guest_start), %ebx
    jae 9f
    movl %ebx, %ebp
    shll $7, %ebp
    addl $(0x100000 + .Lg_targets - svff_guest_start), %ebp
    movl 0(%ebp), %eax                  # command: Memory Space off
    orl $4, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfc, %dx
    inw %dx, %ax
    andw $0xfffd, %ax
    outw %ax, %dx
    movl 0(%ebp), %eax                  # BAR0 (low dword; the VMM's BARs are below 4 GiB)
    orl $0x10, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movl %ebx, %ecx
    shll $20, %ecx
    addl $0xe0000000, %ecx
    movl %ecx, %eax
    movw $0xcfc, %dx
    outl %eax, %dx
    movl %ecx, 4(%ebp)
    movl 0(%ebp), %edi
    call .Lg_enable_mem
    movl $(0x100000 + .Lg_s_dev - svff_guest_start), %esi
    call .Lg_puts
    movl 0(%ebp), %eax
    call .Lg_put_bdf
    movl $(0x100000 + .Lg_s_moved - svff_guest_start), %esi
    call .Lg_puts
    movl 4(%ebp), %eax
    movl $8, %ecx
    call .Lg_put_hex
    movb $0x0a, %al
    call .Lg_putc
    incl %ebx
    jmp 1b
9:  popl %ebp
    popl %ebx
    ret

# mask_all: eax = MSI-X vector control of table entry 0 of every target with MSI-X (1: masked).
# Clobbers ecx, edx.
.Lg_mask_all:
    xorl %ecx, %ecx
1:  cmpl (0x100000 + .Lg_ntargets - svff_guest_start), %ecx
    jae 9f
    movl %ecx, %edx
    shll $7, %edx
    addl $(0x100000 + .Lg_targets - svff_guest_start), %edx
    movl 48(%edx), %edx
    testl %edx, %edx
    jz 2f
    movl %eax, 12(%edx)
2:  incl %ecx
    jmp 1b
9:  ret

# print_event: ebp = target entry, esi = event text. Clobbers eax, ecx, edx, esi.
.Lg_print_event:
    pushl %esi
    movl $(0x100000 + .Lg_s_dev - svff_guest_start), %esi
    call .Lg_puts
    movl 0(%ebp), %eax
    call .Lg_put_bdf
    popl %esi
    call .Lg_puts
    ret

# field: esi = label text, eax = value -> prints both. Clobbers eax, ecx, edx, esi.
.Lg_field:
    pushl %eax
    call .Lg_puts
    popl %eax
    call .Lg_put_dec
    ret

# report_all: one counter line per target. Clobbers eax, ecx, edx, esi.
.Lg_report_all:
    pushl %ebx
    pushl %ebp
    xorl %ebx, %ebx
2:  cmpl (0x100000 + .Lg_ntargets - svff_guest_start), %ebx
    jae 9f
    movl %ebx, %ebp
    shll $7, %ebp
    addl $(0x100000 + .Lg_targets - svff_guest_start), %ebp
    movl $(0x100000 + .Lg_s_dev - svff_guest_start), %esi
    call .Lg_puts
    movl 0(%ebp), %eax
    call .Lg_put_bdf
    movl $(0x100000 + .Lg_s_round - svff_guest_start), %esi
    movl (0x100000 + .Lg_rounds - svff_guest_start), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_reads - svff_guest_start), %esi
    movl 36(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_ok - svff_guest_start), %esi
    movl 8(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_ones - svff_guest_start), %esi
    movl 12(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_gonec - svff_guest_start), %esi
    movl 16(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_backc - svff_guest_start), %esi
    movl 20(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_max - svff_guest_start), %esi
    movl 24(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_irqs - svff_guest_start), %esi
    movl 40(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_win - svff_guest_start), %esi
    movl 60(%ebp), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_id - svff_guest_start), %esi
    call .Lg_puts
    movl 32(%ebp), %eax
    movl $8, %ecx
    call .Lg_put_hex
    movl $(0x100000 + .Lg_s_st - svff_guest_start), %esi
    call .Lg_puts
    movl 64(%ebp), %eax
    movl $8, %ecx
    call .Lg_put_hex
    movb $0x0a, %al
    call .Lg_putc
    incl %ebx
    jmp 2b
9:  popl %ebp
    popl %ebx
    ret

# ---- interrupts ---------------------------------------------------------------------------
# set_gate: eax = vector, edx = handler address: 32-bit interrupt gate. Clobbers ecx, edx.
.Lg_set_gate:
    leal (0x100000 + .Lg_idt - svff_guest_start)(,%eax,8), %ecx
    movw %dx, (%ecx)
    movw $0x08, 2(%ecx)
    movw $0x8e00, 4(%ecx)
    shrl $16, %edx
    movw %dx, 6(%ecx)
    ret

.Lg_isr_default:                        # spurious or unexpected: ignore
    iret

.Lg_isr_exc:                            # any CPU exception: say so, end the VM with 0xee
    movl $(0x100000 + .Lg_s_exc - svff_guest_start), %esi
    call .Lg_puts
    movw $0x501, %dx
    movb $0xee, %al
    outb %al, %dx
2:  hlt
    jmp 2b

.Lg_isr_serial:                         # COM1 THR-empty on IRQ 4 (PIC vector 0x24)
    pushl %eax
    pushl %edx
    incl (0x100000 + .Lg_serial_irqs - svff_guest_start)
    movw $0x3fa, %dx                    # IIR: acknowledges THR empty
    inb %dx, %al
    movw $0x3f9, %dx                    # IER = 0: no more
    xorl %eax, %eax
    outb %al, %dx
    movb $0x20, %al                     # PIC EOI
    outb %al, $0x20
    popl %edx
    popl %eax
    iret

# MSI-X: target i takes vector 0x40 + i; stub i is at .Lg_isr_stubs + 16 * i.
.p2align 4
.Lg_isr_stubs:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .p2align 4
    pushl %eax
    movl $\n, %eax
    jmp .Lg_isr_msix
.endr
.Lg_isr_msix:
    shll $7, %eax
    incl (0x100000 + .Lg_targets - svff_guest_start + 40)(%eax)
    movl $0, 0xfee000b0                 # LAPIC EOI
    popl %eax
    iret

# setup_interrupts: IDT, 8259 PICs remapped to 0x20/0x28 with only IRQ 4 open, LAPIC
# software-enabled, sti. Clobbers eax, ecx, edx.
.Lg_setup_interrupts:
    xorl %eax, %eax
2:  movl $(0x100000 + .Lg_isr_default - svff_guest_start), %edx
    call .Lg_set_gate
    incl %eax
    cmpl $256, %eax
    jb 2b
    xorl %eax, %eax
3:  movl $(0x100000 + .Lg_isr_exc - svff_guest_start), %edx
    call .Lg_set_gate
    incl %eax
    cmpl $32, %eax
    jb 3b
    movl $0x24, %eax
    movl $(0x100000 + .Lg_isr_serial - svff_guest_start), %edx
    call .Lg_set_gate
    xorl %eax, %eax
4:  movl %eax, %edx
    shll $4, %edx
    addl $(0x100000 + .Lg_isr_stubs - svff_guest_start), %edx
    pushl %eax
    addl $0x40, %eax
    call .Lg_set_gate
    popl %eax
    incl %eax
    cmpl $32, %eax
    jb 4b
    lidt (0x100000 + .Lg_idtr - svff_guest_start)
    movb $0x11, %al                     # ICW1: edge, cascade, ICW4
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x20, %al                     # ICW2: vector bases
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xa1
    movb $0x04, %al                     # ICW3: slave on IRQ 2
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xa1
    movb $0x01, %al                     # ICW4: 8086 mode
    outb %al, $0x21
    outb %al, $0xa1
    movb $0xef, %al                     # masks: only IRQ 4
    outb %al, $0x21
    movb $0xff, %al
    outb %al, $0xa1
    movl $0x1ff, 0xfee000f0             # LAPIC SVR: enabled, spurious vector 0xff
    sti
    ret

# setup_msix: ebp = target entry, ebx = its index: finds the MSI-X capability, points table
# entry 0 at vector 0x40 + index on the boot CPU, unmasks it and enables MSI-X.
# Clobbers eax, ecx, edx, esi, edi.
.Lg_setup_msix:
    movl 0(%ebp), %eax
    orl $4, %eax
    call .Lg_cfg_read
    testl $0x100000, %eax               # Status: capabilities list
    jz 9f
    movl 0(%ebp), %eax
    orl $0x34, %eax
    call .Lg_cfg_read
    andl $0xfc, %eax
    movl %eax, %esi
    movl $48, %edi                      # bound the walk
2:  testl %esi, %esi
    jz 9f
    decl %edi
    jz 9f
    movl 0(%ebp), %eax
    orl %esi, %eax
    call .Lg_cfg_read
    cmpb $0x11, %al
    je 3f
    shrl $8, %eax
    andl $0xfc, %eax
    movl %eax, %esi
    jmp 2b
3:  movl 0(%ebp), %eax                  # esi = capability offset
    orl %esi, %eax
    addl $4, %eax
    call .Lg_cfg_read                   # table offset | BIR
    movl %eax, %edi
    andl $7, %eax
    leal 0x10(,%eax,4), %ecx
    movl 0(%ebp), %eax
    orl %ecx, %eax
    call .Lg_cfg_read                   # that BAR
    testl $1, %eax
    jnz 9f
    andl $0xfffffff0, %eax
    jz 9f
    andl $0xfffffff8, %edi
    addl %edi, %eax
    movl %eax, 48(%ebp)
    movl $0xfee00000, 0(%eax)           # entry 0: APIC ID 0, physical
    movl $0, 4(%eax)
    leal 0x40(%ebx), %ecx
    movl %ecx, 8(%eax)                  # fixed, edge, vector 0x40 + index
    movl $0, 12(%eax)                   # unmasked
    movl 0(%ebp), %eax                  # Message Control: Enable, no Function Mask
    orl %esi, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfe, %dx
    inw %dx, %ax
    orw $0x8000, %ax
    andw $0xbfff, %ax
    outw %ax, %dx
    movl $(0x100000 + .Lg_s_msix - svff_guest_start), %esi
    call .Lg_print_event
    leal 0x40(%ebx), %eax
    call .Lg_put_dec
    movb $0x0a, %al
    call .Lg_putc
9:  ret

# setup_msi: ebp = target entry, ebx = its index, for a target without MSI-X: finds the MSI
# capability, points its message at vector 0x40 + index on the boot CPU (one vector: Multiple
# Message Enable 0), enables MSI and records the capability at +68.
# Clobbers eax, ecx, edx, esi, edi.
.Lg_setup_msi:
    movl 0(%ebp), %eax
    orl $4, %eax
    call .Lg_cfg_read
    testl $0x100000, %eax               # Status: capabilities list
    jz 9f
    movl 0(%ebp), %eax
    orl $0x34, %eax
    call .Lg_cfg_read
    andl $0xfc, %eax
    movl %eax, %esi
    movl $48, %edi                      # bound the walk
2:  testl %esi, %esi
    jz 9f
    decl %edi
    jz 9f
    movl 0(%ebp), %eax
    orl %esi, %eax
    call .Lg_cfg_read
    cmpb $0x05, %al
    je 3f
    shrl $8, %eax
    andl $0xfc, %eax
    movl %eax, %esi
    jmp 2b
3:  movl %eax, %edi                     # edi = ID/next/control, esi = capability offset
    movl 0(%ebp), %eax
    orl %esi, %eax
    addl $4, %eax
    movl $0xfee00000, %ecx              # address: APIC ID 0, physical
    call .Lg_cfg_write
    addl $4, %eax
    leal 0x40(%ebx), %ecx               # data: fixed, edge, vector 0x40 + index
    testl $0x800000, %edi               # 64-bit address: upper half 0, data at +12
    jz 4f
    pushl %ecx
    xorl %ecx, %ecx
    call .Lg_cfg_write
    popl %ecx
    addl $4, %eax
4:  call .Lg_cfg_write
    movl 0(%ebp), %eax                  # Message Control: Enable, one vector
    orl %esi, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfe, %dx
    inw %dx, %ax
    andw $0xff8f, %ax
    orw $1, %ax
    outw %ax, %dx
    movl %esi, 68(%ebp)
    movl $(0x100000 + .Lg_s_msi - svff_guest_start), %esi
    call .Lg_print_event
    leal 0x40(%ebx), %eax
    call .Lg_put_dec
    movb $0x0a, %al
    call .Lg_putc
9:  ret

# ---- main ---------------------------------------------------------------------------------
.Lg_entry:
    cli
    cld
    movl $(0x100000 + .Lg_s_start - svff_guest_start), %esi
    call .Lg_puts

    xorl %ebx, %ebx                     # ebx = devfn 0..255 on bus 0
.Lg_enum:
    cmpl $256, %ebx
    jae .Lg_enum_done
    movl %ebx, %edi
    shll $8, %edi
    orl $0x80000000, %edi               # edi = conf1 address of dword 0
    movl %edi, %eax
    call .Lg_cfg_read
    cmpw $0xffff, %ax
    je .Lg_enum_absent
    movl %eax, (0x100000 + .Lg_cur_id - svff_guest_start)
    movl %edi, %eax
    orl $8, %eax
    call .Lg_cfg_read
    shrl $8, %eax
    movl %eax, (0x100000 + .Lg_cur_class - svff_guest_start)
    movl %edi, %eax
    orl $0xc, %eax
    call .Lg_cfg_read
    shrl $16, %eax
    movl %eax, (0x100000 + .Lg_cur_hdr - svff_guest_start)
    incl (0x100000 + .Lg_nfuncs - svff_guest_start)

    movl $(0x100000 + .Lg_s_found - svff_guest_start), %esi
    call .Lg_puts
    movl %edi, %eax
    call .Lg_put_bdf
    movl $(0x100000 + .Lg_s_vendor - svff_guest_start), %esi
    call .Lg_puts
    movl (0x100000 + .Lg_cur_id - svff_guest_start), %eax
    andl $0xffff, %eax
    movl $4, %ecx
    call .Lg_put_hex
    movl $(0x100000 + .Lg_s_device - svff_guest_start), %esi
    call .Lg_puts
    movl (0x100000 + .Lg_cur_id - svff_guest_start), %eax
    shrl $16, %eax
    movl $4, %ecx
    call .Lg_put_hex
    movl $(0x100000 + .Lg_s_class - svff_guest_start), %esi
    call .Lg_puts
    movl (0x100000 + .Lg_cur_class - svff_guest_start), %eax
    movl $6, %ecx
    call .Lg_put_hex
    movb $0x0a, %al
    call .Lg_putc

    movl (0x100000 + .Lg_cur_class - svff_guest_start), %eax
    shrl $16, %eax
    cmpl $6, %eax                       # bridges are not read
    je 2f
    call .Lg_add_target
2:  testl $7, %ebx
    jnz .Lg_enum_inc
    testl $0x80, (0x100000 + .Lg_cur_hdr - svff_guest_start)
    jnz .Lg_enum_inc                    # multi-function: look at functions 1..7
    jmp .Lg_enum_skip_dev
.Lg_enum_absent:
    testl $7, %ebx
    jnz .Lg_enum_inc
.Lg_enum_skip_dev:
    orl $7, %ebx
.Lg_enum_inc:
    incl %ebx
    jmp .Lg_enum

.Lg_enum_done:
    movl $(0x100000 + .Lg_s_enum - svff_guest_start), %esi
    movl (0x100000 + .Lg_nfuncs - svff_guest_start), %eax
    call .Lg_field
    movl $(0x100000 + .Lg_s_funcs - svff_guest_start), %esi
    call .Lg_puts
    movl (0x100000 + .Lg_ntargets - svff_guest_start), %eax
    call .Lg_put_dec
    movl $(0x100000 + .Lg_s_targets - svff_guest_start), %esi
    call .Lg_puts

    call .Lg_setup_interrupts
    movw $0x3f9, %dx                    # IER: THR empty -> IRQ 4 at once
    movb $0x02, %al
    outb %al, %dx
    movl $100000000, %ecx               # bounded wait for it
2:  cmpl $0, (0x100000 + .Lg_serial_irqs - svff_guest_start)
    jne 3f
    pause
    loop 2b
3:  movl $(0x100000 + .Lg_s_serial - svff_guest_start), %esi
    movl (0x100000 + .Lg_serial_irqs - svff_guest_start), %eax
    call .Lg_field
    movb $0x0a, %al
    call .Lg_putc

    xorl %ebx, %ebx
4:  cmpl (0x100000 + .Lg_ntargets - svff_guest_start), %ebx
    jae 5f
    movl %ebx, %ebp
    shll $7, %ebp
    addl $(0x100000 + .Lg_targets - svff_guest_start), %ebp
    call .Lg_setup_msix
    cmpl $0, 48(%ebp)                   # no MSI-X: MSI, if it has that
    jne 6f
    call .Lg_setup_msi
6:  incl %ebx
    jmp 4b
5:  movl (0x100000 + .Lg_p_report_every - svff_guest_start), %eax
    movl %eax, (0x100000 + .Lg_countdown - svff_guest_start)
    cmpl $2, (0x100000 + .Lg_p_mode - svff_guest_start)
    jne 6f
    movl $(0x100000 + .Lg_s_halt - svff_guest_start), %esi
    call .Lg_puts
    cli
7:  hlt                                 # only NMI/INIT/SMI could wake it
    jmp 7b
6:  cmpl $3, (0x100000 + .Lg_p_mode - svff_guest_start)
    jne .Lg_round
    movl $(0x100000 + .Lg_s_spin - svff_guest_start), %esi
    call .Lg_puts
    cli
8:  jmp 8b

.Lg_round:
    xorl %ebx, %ebx                     # ebx = target index
.Lg_target:
    cmpl (0x100000 + .Lg_ntargets - svff_guest_start), %ebx
    jae .Lg_round_end
    movl %ebx, %ebp
    shll $7, %ebp
    addl $(0x100000 + .Lg_targets - svff_guest_start), %ebp
    movl 0(%ebp), %eax
    call .Lg_cfg_read
    cmpw $0xffff, %ax
    jne 4f
    testl $1, 28(%ebp)                  # vendor 0xffff: gone from config space
    jnz .Lg_target_next
    orl $1, 28(%ebp)
    incl 16(%ebp)
    movl $(0x100000 + .Lg_s_gone - svff_guest_start), %esi
    call .Lg_print_event
    jmp .Lg_target_next
4:  testl $1, 28(%ebp)
    jz 5f
    andl $0xfffffffe, 28(%ebp)          # back: decoding may have been reset meanwhile
    incl 20(%ebp)
    movl 0(%ebp), %edi
    call .Lg_enable_mem
    movl $(0x100000 + .Lg_s_back - svff_guest_start), %esi
    call .Lg_print_event
5:  movl 4(%ebp), %edi                  # BAR0 + 0: identity
    call .Lg_read_reg
    movl %eax, 32(%ebp)
    cmpl $0xffffffff, %eax              # mode 1: all-ones (a paused VF, policy ignore):
    jne 6f                              # scribble over its BAR0 and config space
    cmpl $1, (0x100000 + .Lg_p_mode - svff_guest_start)
    jne 6f
    call .Lg_scribble
6:    movl 4(%ebp), %edi                  # BAR0 + 8: status
    addl $8, %edi
    call .Lg_read_reg
    movl %eax, 64(%ebp)
    cmpl $0, 68(%ebp)                   # MSI set up: edu raises it on a write of 0x60
    je 1f
    cmpl $0x11e81234, 44(%ebp)          # QEMU edu: acknowledge (0x64), then raise (0x60)
    jne .Lg_target_next
    movl 4(%ebp), %edi
    movl $1, 0x64(%edi)
    movl $1, 0x60(%edi)
    jmp .Lg_target_next
1:  cmpl $0, 48(%ebp)                   # no MSI-X: nothing to ring
    je .Lg_target_next
    cmpl $0x5ff01234, 44(%ebp)          # svff-test with MSI-X: ring vector 0 each round
    jne 7f
    movl 4(%ebp), %edi
    movl $0, 0x14(%edi)
    jmp .Lg_target_next
7:  cmpl $4, (0x100000 + .Lg_p_mode - svff_guest_start)
    je 8f
    cmpl $6, (0x100000 + .Lg_p_mode - svff_guest_start)
    jne .Lg_target_next
8:  cmpl $0x10ca8086, 44(%ebp)          # modes 4 and 6, igb VF: it raises its own vector 0
    jne .Lg_target_next
    movl 4(%ebp), %edi
    movl $1, 0x152c(%edi)               # EIAC: vector 0 auto-clears
    movl $1, 0x1524(%edi)               # EIMS: vector 0 enabled
    movl $1, 0x1580(%edi)               # EICR: its cause cleared (if EIAC did not)
    movl $1, 0x1520(%edi)               # EICS: raise it
.Lg_target_next:
    incl %ebx
    jmp .Lg_target

.Lg_round_end:
    incl (0x100000 + .Lg_rounds - svff_guest_start)
    cmpl $5, (0x100000 + .Lg_p_mode - svff_guest_start)
    jne 1f
    cmpl $100, (0x100000 + .Lg_rounds - svff_guest_start)
    jne 1f
    call .Lg_move_bars                  # mode 5: once, after round 100
1:  cmpl $6, (0x100000 + .Lg_p_mode - svff_guest_start)
    jne 2f
    cmpl $100, (0x100000 + .Lg_rounds - svff_guest_start)
    jne 1f
    movl $1, %eax                       # mode 6: entry 0 masked after round 100 ...
    call .Lg_mask_all
1:  cmpl $200, (0x100000 + .Lg_rounds - svff_guest_start)
    jne 2f
    xorl %eax, %eax                     # ... and unmasked after round 200
    call .Lg_mask_all
2:
    decl (0x100000 + .Lg_countdown - svff_guest_start)
    jnz 6f
    movl (0x100000 + .Lg_p_report_every - svff_guest_start), %eax
    movl %eax, (0x100000 + .Lg_countdown - svff_guest_start)
    call .Lg_report_all
6:  movl (0x100000 + .Lg_p_rounds - svff_guest_start), %eax
    testl %eax, %eax
    jz .Lg_round
    cmpl (0x100000 + .Lg_rounds - svff_guest_start), %eax
    ja .Lg_round
    movl $(0x100000 + .Lg_s_done - svff_guest_start), %esi
    movl (0x100000 + .Lg_rounds - svff_guest_start), %eax
    call .Lg_field
    movb $0x0a, %al
    call .Lg_putc
    movw $0x501, %dx                    # debug exit, code 0
    xorl %eax, %eax
    outb %al, %dx
7:  hlt
    jmp 7b

.globl svff_guest_end
svff_guest_end:
.code64
.popsection
