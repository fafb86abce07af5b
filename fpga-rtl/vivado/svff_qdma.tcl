# svff_qdma.tcl: Vivado project for the svff FPGA design: the AMD/Xilinx QDMA
# Subsystem for PCI Express (PG302) configured for SR-IOV with 4 PFs and 252
# VFs, and the svff user logic (fpga-rtl/rtl) connected to its user-side ports
# through vivado/svff_qdma_top.v.
#
# NOT RUNNABLE HERE: this needs Vivado (with a QDMA licence-free IP version,
# e.g. 2022.2 .. 2024.2) and has never been run by the svff CI, which has no
# Vivado. IP property names differ between QDMA versions: every property is
# set through svff_set, which warns (instead of failing) when the IP in use
# does not have it, and the script ends with a list of what it could not set.
#
# Usage (from fpga-rtl/):
#   vivado -mode batch -source vivado/svff_qdma.tcl -tclargs [options]
# Options:
#   -part <part>      FPGA part (default: xcu250-figd2104-2L-e, Alveo U250)
#   -board <board>    board part (optional, e.g. xilinx.com:au250:part0:1.3)
#   -out <dir>        project directory (default: build/vivado)
#   -build            also run synthesis, implementation and write_bitstream
#
# Function numbering (must match REGISTERS.md / FUNC_INFO and the pf-helper):
#   function 0..3       PF0..PF3
#   function 4..67      the 64 VFs of PF0   (PF0 First VF Offset 4)
#   function 68..131    the 64 VFs of PF1   (PF1 First VF Offset 67 = 68 - 1)
#   function 132..195   the 64 VFs of PF2   (PF2 First VF Offset 130 = 132 - 2)
#   function 196..255   the 60 VFs of PF3   (PF3 First VF Offset 193 = 196 - 3)
#   (VF counts are multiples of 4, as the QDMA configurator requires; 64*3+60 = 252.)
#
# BAR layout, identical for every PF and (per VF) in the SR-IOV VF BARs:
#   BAR0 (64-bit)  QDMA DMA registers (queue CSRs, mailbox): PF 256 KiB, VF 32 KiB
#   BAR2 (64-bit)  PCIe to AXI4-Lite Master: the svff register window,
#                  4 KiB per function, AXI address translation 0, so the BAR offset
#                  arrives unchanged on m_axil_awaddr/araddr and the function number
#                  on m_axil_awuser/aruser[30:19] selects the function's registers.

set here    [file dirname [file normalize [info script]]]
set rtl_dir [file normalize [file join $here .. rtl]]

set part  xcu250-figd2104-2L-e
set board ""
set out   build/vivado
set build 0
for {set i 0} {$i < [llength $argv]} {incr i} {
    set a [lindex $argv $i]
    switch -- $a {
        -part  { incr i; set part  [lindex $argv $i] }
        -board { incr i; set board [lindex $argv $i] }
        -out   { incr i; set out   [lindex $argv $i] }
        -build { set build 1 }
        default { error "svff_qdma.tcl: unknown option $a" }
    }
}

# ---------------------------------------------------------------------------
# svff_set IP NAME VALUE: set CONFIG.NAME if the IP has it, else record it
# ---------------------------------------------------------------------------
set svff_missing {}
proc svff_set {ip name value} {
    global svff_missing
    set prop CONFIG.$name
    if {[lsearch -exact [list_property $ip] $prop] >= 0} {
        if {[catch {set_property $prop $value $ip} err]} {
            puts "WARNING: svff: $prop = $value rejected: $err"
            lappend svff_missing "$name=$value (rejected)"
        }
    } else {
        puts "WARNING: svff: [get_property NAME $ip] has no $prop; set it in the IP customization GUI"
        lappend svff_missing "$name=$value (no such property)"
    }
}

# ---------------------------------------------------------------------------
# project and sources
# ---------------------------------------------------------------------------
create_project svff_qdma $out -part $part -force
if {$board ne ""} { set_property board_part $board [current_project] }
add_files -norecurse [list \
    [file join $rtl_dir svff_user_top.v] \
    [file join $rtl_dir svff_regs.v] \
    [file join $rtl_dir svff_loopback.v] \
    [file join $rtl_dir svff_regs.vh] \
    [file join $here svff_qdma_top.v]]
set_property include_dirs [list $rtl_dir] [current_fileset]
set_property is_global_include true [get_files [file join $rtl_dir svff_regs.vh]]
set_property top svff_qdma_top [current_fileset]

# ---------------------------------------------------------------------------
# QDMA IP: SR-IOV, 4 PFs, 252 VFs, AXI-Stream with completion, AXI-Lite master
# ---------------------------------------------------------------------------
create_ip -name qdma -vendor xilinx.com -library ip -module_name qdma_svff
set qdma [get_ips qdma_svff]

# link and datapath
svff_set $qdma mode_selection              Advanced
svff_set $qdma pl_link_cap_max_link_width  X16
svff_set $qdma pl_link_cap_max_link_speed  8.0_GT/s
svff_set $qdma axi_data_width              512_bit
svff_set $qdma axisten_freq                250
svff_set $qdma dma_intf_sel_qdma           AXI_Stream_with_Completion
svff_set $qdma en_axi_mm_qdma              false
svff_set $qdma en_axi_st_qdma              true
svff_set $qdma num_queues                  2048
svff_set $qdma dsc_byp_mode                None
svff_set $qdma axilite_master_en           true
svff_set $qdma flr_enable                  true

# physical functions
svff_set $qdma tl_pf_enable_reg            4
svff_set $qdma pf0_device_id               903f
svff_set $qdma pf1_device_id               913f
svff_set $qdma pf2_device_id               923f
svff_set $qdma pf3_device_id               933f

# SR-IOV: 64 + 64 + 64 + 60 VFs, function numbers as in the header
svff_set $qdma SRIOV_CAP_ENABLE            true
svff_set $qdma MAILBOX_ENABLE              true
svff_set $qdma SRIOV_FIRST_VF_OFFSET       4
set vfs     {64 64 64 60}
set offsets {4 67 130 193}
for {set pf 0} {$pf < 4} {incr pf} {
    svff_set $qdma PF${pf}_SRIOV_CAP_INITIAL_VF  [lindex $vfs $pf]
    svff_set $qdma PF${pf}_SRIOV_CAP_TOTAL_VF    [lindex $vfs $pf]
    svff_set $qdma PF${pf}_SRIOV_FIRST_VF_OFFSET [lindex $offsets $pf]
    svff_set $qdma PF${pf}_SRIOV_VF_DEVICE_ID    [format "A%d3F" $pf]
    svff_set $qdma barlite_mb_pf${pf}            [expr {$pf == 0 ? 1 : 0}]
    svff_set $qdma pf${pf}_ari_enabled           true
}

# BAR layout: BAR0 = DMA registers, BAR2 = AXI-Lite master (svff registers)
for {set pf 0} {$pf < 4} {incr pf} {
    svff_set $qdma pf${pf}_bar0_type_qdma        DMA
    svff_set $qdma pf${pf}_bar0_64bit_qdma       true
    svff_set $qdma pf${pf}_bar0_scale_qdma       Kilobytes
    svff_set $qdma pf${pf}_bar0_size_qdma        256
    svff_set $qdma pf${pf}_bar2_type_qdma        AXI_Lite_Master
    svff_set $qdma pf${pf}_bar2_64bit_qdma       true
    svff_set $qdma pf${pf}_bar2_scale_qdma       Kilobytes
    svff_set $qdma pf${pf}_bar2_size_qdma        4
    svff_set $qdma pf${pf}_pciebar2axibar_2      0x0000000000000000
    svff_set $qdma pf${pf}_vf_bar0_type_qdma     DMA
    svff_set $qdma pf${pf}_vf_bar0_64bit_qdma    true
    svff_set $qdma pf${pf}_vf_bar0_scale_qdma    Kilobytes
    svff_set $qdma pf${pf}_vf_bar0_size_qdma     32
    svff_set $qdma pf${pf}_vf_bar2_type_qdma     AXI_Lite_Master
    svff_set $qdma pf${pf}_vf_bar2_64bit_qdma    true
    svff_set $qdma pf${pf}_vf_bar2_scale_qdma    Kilobytes
    svff_set $qdma pf${pf}_vf_bar2_size_qdma     4
    svff_set $qdma pf${pf}_vf_pciebar2axibar_2   0x0000000000000000
}

# ---------------------------------------------------------------------------
# ECC encoder for s_axis_c2h_ctrl_ecc (57 data bits, 7 check bits)
# ---------------------------------------------------------------------------
create_ip -name ecc -vendor xilinx.com -library ip -module_name svff_c2h_ecc
set ecc [get_ips svff_c2h_ecc]
svff_set $ecc C_ECC_MODE        Encoder
svff_set $ecc C_DATA_WIDTH      57
svff_set $ecc C_CHK_BIT_WIDTH   7
svff_set $ecc C_USE_CLK_ENABLE  true
svff_set $ecc C_REG_INPUT       false
svff_set $ecc C_REG_OUTPUT      false

generate_target all [get_ips]
synth_ip [get_ips]

if {[llength $svff_missing] > 0} {
    puts "WARNING: svff: [llength $svff_missing] IP setting(s) not applied, check them in the GUI:"
    foreach m $svff_missing { puts "  $m" }
}

# Pin constraints (PCIe lanes, refclk, PERST#) come from the board files or a
# board XDC added by the user; none are checked in here.
if {$build} {
    launch_runs synth_1 -jobs 4
    wait_on_run synth_1
    launch_runs impl_1 -to_step write_bitstream -jobs 4
    wait_on_run impl_1
    puts "svff: bitstream in [get_property DIRECTORY [get_runs impl_1]]"
} else {
    puts "svff: project ready in $out (re-run with -build for a bitstream)"
}
