# Dry run of vivado/svff_qdma.tcl with plain tclsh: the Vivado commands it uses
# are replaced by stubs that record what would be done. This checks the
# script's Tcl syntax and control flow only; it says nothing about whether
# Vivado accepts the IP settings (see README.md: not runnable here).
#
# Usage: tclsh scripts/vivado_mock.tcl [vivado/svff_qdma.tcl options]
# Every CONFIG property is accepted, except those listed in ::mock_unknown,
# which exercise the script's warning path.

set ::mock_log {}
set ::mock_unknown {CONFIG.pf3_vf_bar0_64bit_qdma}
set ::mock_props {}
set ::mock_ips {}
proc mock {args} { lappend ::mock_log $args; return "" }
foreach cmd {create_project add_files generate_target synth_ip launch_runs wait_on_run} {
    proc $cmd {args} "mock $cmd {*}\$args"
}
proc current_fileset {args} { return sources_1 }
proc current_project {args} { return svff_qdma }
proc get_files {args} { return [lindex $args end] }
proc get_runs {args} { return [lindex $args end] }
proc create_ip {args} {
    set i [lsearch -exact $args -module_name]
    lappend ::mock_ips [lindex $args [expr {$i + 1}]]
    mock create_ip {*}$args
}
proc get_ips {args} {
    if {[llength $args] == 0} { return $::mock_ips }
    set n [lindex $args 0]
    if {[lsearch -exact $::mock_ips $n] < 0} { error "mock: no IP $n" }
    return $n
}
proc get_property {prop obj} { return $obj }
proc set_property {args} {
    set prop [lindex $args 0]
    if {[string match CONFIG.* $prop]} {
        if {[lsearch -exact $::mock_unknown $prop] >= 0} { error "mock: unknown $prop" }
        dict set ::mock_props [lindex $args 2] $prop [lindex $args 1]
    }
    mock set_property {*}$args
}
# svff_set asks list_property first: the IP "has" every property the script
# sets, except those in mock_unknown
proc list_property {obj} {
    return [list NAME {*}[mock_known_props]]
}
proc mock_known_props {} {
    # read the script once to learn every property name it sets
    if {![info exists ::mock_known]} {
        set ::mock_known {}
        set f [open $::mock_script]
        set text [read $f]
        close $f
        foreach {- name} [regexp -all -inline {svff_set \$\w+\s+(\S+)} $text] {
            if {[string first "\$" $name] >= 0} {
                for {set pf 0} {$pf < 4} {incr pf} {
                    lappend ::mock_known CONFIG.[string map [list "\${pf}" $pf] $name]
                }
            } else {
                lappend ::mock_known CONFIG.$name
            }
        }
        set keep {}
        foreach p $::mock_known {
            if {[lsearch -exact $::mock_unknown $p] < 0} { lappend keep $p }
        }
        set ::mock_known $keep
    }
    return $::mock_known
}

set ::mock_script [file join [file dirname [info script]] .. vivado svff_qdma.tcl]
set argv0 $::mock_script
source $::mock_script

set n 0
dict for {ip props} $::mock_props { incr n [dict size $props] }
set want [list CONFIG.SRIOV_CAP_ENABLE true CONFIG.PF0_SRIOV_CAP_INITIAL_VF 64 \
               CONFIG.PF3_SRIOV_CAP_INITIAL_VF 60 CONFIG.PF1_SRIOV_FIRST_VF_OFFSET 67 \
               CONFIG.pf2_vf_bar2_type_qdma AXI_Lite_Master CONFIG.tl_pf_enable_reg 4]
set bad 0
foreach {p v} $want {
    if {![dict exists $::mock_props qdma_svff $p] || [dict get $::mock_props qdma_svff $p] ne $v} {
        puts "mock: FAIL: $p is not $v"
        incr bad
    }
}
set total 0
for {set pf 0} {$pf < 4} {incr pf} {
    incr total [dict get $::mock_props qdma_svff CONFIG.PF${pf}_SRIOV_CAP_INITIAL_VF]
}
if {$total != 252} { puts "mock: FAIL: VF total $total, expected 252"; incr bad }
if {[llength $::svff_missing] != [llength $::mock_unknown]} {
    puts "mock: FAIL: expected [llength $::mock_unknown] unapplied setting(s), got [llength $::svff_missing]"
    incr bad
}
if {$bad} { exit 1 }
puts "mock: PASS: svff_qdma.tcl ran ($n IP properties set, $total VFs, warning path exercised)"
