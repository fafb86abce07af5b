// tb_regmap: every register of REGISTERS.md (through the generated table
// svff_regmap_tb.vh), from every one of the 256 functions: reset value,
// writable bits, read-only bits, scope (PF0-only window), FUNC_INFO, and the
// error responses for bad offsets, out-of-window addresses and function
// numbers above 255.

`default_nettype none
`include "svff_regs.vh"
`define TB_NAME "tb_regmap"

module tb_regmap;
`include "tb_common.vh"
`include "svff_regmap_tb.vh"

    integer fn, i, p;
    reg [31:0] d, pat, exp;
    reg [1:0]  r;
    reg [31:0] patterns [0:3];

    initial begin
        patterns[0] = 32'hFFFF_FFFF;
        patterns[1] = 32'hA5A5_A5A5;
        patterns[2] = 32'h5A5A_5A5A;
        patterns[3] = 32'h0000_0000;
        do_reset;

        for (fn = 0; fn < `SVFF_NUM_FUNCTIONS; fn = fn + 1) begin
            for (i = 0; i < REGMAP_N; i = i + 1) begin
                if (regmap_pf0[i] && fn != 0) begin
                    // management window from any other function: SLVERR, 0, no effect
                    axil_read(fn[11:0], {20'd0, regmap_off[i]}, d, r);
                    check_resp(regmap_name[i], fn, r, SLVERR);
                    check32(regmap_name[i], fn, d, 32'd0);
                    axil_write(fn[11:0], {20'd0, regmap_off[i]}, 32'hFFFF_FFFF, 4'hF, r);
                    check_resp(regmap_name[i], fn, r, SLVERR);
                    rd_expect(regmap_name[i], 12'd0, regmap_off[i], regmap_reset[i]);
                end else begin
                    // reset value
                    exp = regmap_has_reset[i] ? regmap_reset[i] :
                          {22'd0, fn == 0, fn < `SVFF_NUM_PFS, fn[7:0]};   // FUNC_INFO
                    rd_expect(regmap_name[i], fn[11:0], regmap_off[i], exp);
                    if (regmap_rw[i]) begin
                        // writable bits read back, others read 0
                        for (p = 0; p < 4; p = p + 1) begin
                            pat = patterns[p] ^ (fn * 32'h0101_0101);
                            wr(fn[11:0], regmap_off[i], pat);
                            rd_expect(regmap_name[i], fn[11:0], regmap_off[i], pat & regmap_mask[i]);
                        end
                        // byte strobes: only byte 0 changes
                        wr(fn[11:0], regmap_off[i], 32'h0000_0000);
                        axil_write(fn[11:0], {20'd0, regmap_off[i]}, 32'hFFFF_FFFF, 4'b0001, r);
                        check_resp(regmap_name[i], fn, r, OKAY);
                        rd_expect(regmap_name[i], fn[11:0], regmap_off[i], 32'h0000_00FF & regmap_mask[i]);
                        wr(fn[11:0], regmap_off[i], regmap_reset[i]);
                    end else begin
                        // read-only: a write is accepted and ignored
                        axil_write(fn[11:0], {20'd0, regmap_off[i]}, ~exp, 4'hF, r);
                        check_resp(regmap_name[i], fn, r, OKAY);
                        rd_expect(regmap_name[i], fn[11:0], regmap_off[i], exp);
                    end
                end
            end
        end

        // decode errors: holes in the map, addresses outside the 4 KiB window
        axil_read(12'd7, 32'h0000_003C, d, r);  check_resp("hole 0x03C", 7, r, DECERR);
        check32("hole 0x03C data", 7, d, 32'd0);
        axil_read(12'd7, 32'h0000_0FFC, d, r);  check_resp("hole 0xFFC", 7, r, DECERR);
        axil_read(12'd0, 32'h0000_0110, d, r);  check_resp("hole 0x110", 0, r, DECERR);
        axil_read(12'd7, 32'h0000_100C, d, r);  check_resp("alias 0x100C", 7, r, DECERR);
        axil_write(12'd7, 32'h0000_100C, 32'h1234_5678, 4'hF, r);
        check_resp("alias write 0x100C", 7, r, DECERR);
        rd_expect("SCRATCH after alias write", 12'd7, `SVFF_REG_SCRATCH, 32'd0);
        axil_write(12'd7, 32'h0000_0040, 32'h1234_5678, 4'hF, r);
        check_resp("hole write 0x040", 7, r, DECERR);

        // function numbers beyond 255: SLVERR, no effect on the aliased function
        axil_read(12'h100, {20'd0, `SVFF_REG_ID}, d, r);
        check_resp("ID fn 0x100", 256, r, SLVERR);
        check32("ID fn 0x100 data", 256, d, 32'd0);
        axil_write(12'h105, {20'd0, `SVFF_REG_SCRATCH}, 32'h1234_5678, 4'hF, r);
        check_resp("SCRATCH fn 0x105", 261, r, SLVERR);
        rd_expect("SCRATCH of fn 5 after fn 0x105 write", 12'd5, `SVFF_REG_SCRATCH, 32'd0);

        // ID and VERSION are the documented constants (not only the table's)
        rd_expect("ID", 12'd200, `SVFF_REG_ID, 32'h5356_4646);

        finish_tb;
    end
endmodule
