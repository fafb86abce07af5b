// Lint-only black box of the UltraScale+ GT reference clock buffer primitive.
/* verilator lint_off UNUSEDSIGNAL */
/* verilator lint_off UNUSEDPARAM */
/* verilator lint_off UNDRIVEN */
`default_nettype none
(* black_box *)
module IBUFDS_GTE4 #(parameter [1:0] REFCLK_HROW_CK_SEL = 2'b00) (
    input  wire I, IB, CEB,
    output wire O, ODIV2
);
endmodule
`default_nettype wire
