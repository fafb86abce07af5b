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

.p2align 2
.Lg_nfuncs:     .long 0
.Lg_ntargets:   .long 0
.Lg_cur_id:     .long 0
.Lg_cur_class:  .long 0
.Lg_cur_hdr:    .long 0
.Lg_rounds:     .long 0
.Lg_countdown:  .long 0
# One 64-byte entry per target function (at most 32):
#   +0 conf1 address of its dword 0, +4 BAR0 address, +8 ok, +12 ones, +16 gone, +20 back,
#   +24 max_tsc, +28 flags (bit 0: gone now), +32 last ID register value, +36 reads
.p2align 6
.Lg_targets:    .fill 32 * 64, 1, 0

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
.Lg_s_done:     .asciz "svff-guest: done rounds="

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

# enable_mem: edi = conf1 address of dword 0: sets Memory Space in the command register.
# Clobbers eax, edx.
.Lg_enable_mem:
    movl %edi, %eax
    orl $4, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfc, %dx
    inw %dx, %ax
    orw $2, %ax
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
    shll $6, %eax
    addl $(0x100000 + .Lg_targets - svff_guest_start), %eax
    movl %edi, 0(%eax)
    movl %ecx, 4(%eax)
    incl (0x100000 + .Lg_ntargets - svff_guest_start)
    call .Lg_enable_mem
9:  ret

# ---- one register read ------------------------------------------------------------------
# read_reg: edi = address, ebp = target entry: reads the dword, timing it with rdtsc, and
# counts it. Returns the value in eax. Clobbers eax, ecx, edx, esi.
.Lg_read_reg:
    lfence
    rdtsc
    movl %eax, %esi
    movl (%edi), %ecx
    lfence
    rdtsc
    subl %esi, %eax
    cmpl 24(%ebp), %eax
    jbe 2f
    movl %eax, 24(%ebp)
2:  incl 36(%ebp)
    cmpl $0xffffffff, %ecx
    jne 3f
    incl 12(%ebp)
    jmp 4f
3:  incl 8(%ebp)
4:  movl %ecx, %eax
    ret

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
    shll $6, %ebp
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
    movl $(0x100000 + .Lg_s_id - svff_guest_start), %esi
    call .Lg_puts
    movl 32(%ebp), %eax
    movl $8, %ecx
    call .Lg_put_hex
    movb $0x0a, %al
    call .Lg_putc
    incl %ebx
    jmp 2b
9:  popl %ebp
    popl %ebx
    ret

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
    movl (0x100000 + .Lg_p_report_every - svff_guest_start), %eax
    movl %eax, (0x100000 + .Lg_countdown - svff_guest_start)

.Lg_round:
    xorl %ebx, %ebx                     # ebx = target index
.Lg_target:
    cmpl (0x100000 + .Lg_ntargets - svff_guest_start), %ebx
    jae .Lg_round_end
    movl %ebx, %ebp
    shll $6, %ebp
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
    movl 4(%ebp), %edi                  # BAR0 + 8: status
    addl $8, %edi
    call .Lg_read_reg
.Lg_target_next:
    incl %ebx
    jmp .Lg_target

.Lg_round_end:
    incl (0x100000 + .Lg_rounds - svff_guest_start)
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
