// tb_isolation: per-function isolation of the register block and of FLR,
// across all 256 functions (PF0..PF3 + 252 VFs).
//  1. every function writes its own SCRATCH / XOR_KEY / CONTROL values; each
//     function then reads back exactly its own values (no function sees or
//     changes another's copy);
//  2. one VF rewrites its registers again and again: all other 255 unchanged;
//  3. VFs and PF1..PF3 cannot reach the PF0 management window (queue map);
//  4. FLR of one function resets only that function, is acknowledged on
//     usr_flr_done_* with the right function, and is counted;
//  5. back-to-back FLRs of several functions (PF and VFs) are all served.

`default_nettype none
`include "svff_regs.vh"
`define TB_NAME "tb_isolation"

module tb_isolation;
`include "tb_common.vh"

    integer fn, k, victim;
    reg [31:0] d;
    reg [1:0]  r;

    function [31:0] scr_val(input integer f, input integer round);
        scr_val = 32'h5C00_0000 ^ (f * 32'h0001_0203) ^ (round * 32'h1111_0000);
    endfunction
    function [31:0] key_val(input integer f);
        key_val = 32'hC0DE_0000 | (f * 32'h0000_0101);
    endfunction

    // usr_flr_done_* monitor
    integer done_count = 0;
    reg [7:0] done_last = 0;
    always @(posedge clk) if (flr_done_vld) begin
        done_count <= done_count + 1;
        done_last  <= flr_done_fnc;
    end

    task flr_pulse(input [7:0] f);
        begin
            @(negedge clk); flr_fnc = f; flr_set = 1'b1;
            @(negedge clk); flr_set = 1'b0;
        end
    endtask

    task check_all(input [8*48-1:0] what, input integer round, input integer skip);
        integer f;
        begin
            for (f = 0; f < `SVFF_NUM_FUNCTIONS; f = f + 1) if (f != skip) begin
                rd_expect({what, " SCRATCH"}, f[11:0], `SVFF_REG_SCRATCH, scr_val(f, round));
                rd_expect({what, " XOR_KEY"}, f[11:0], `SVFF_REG_XOR_KEY, key_val(f));
                rd_expect({what, " CONTROL"}, f[11:0], `SVFF_REG_CONTROL, f % 2);
            end
        end
    endtask

    initial begin
        do_reset;

        // 1. each function programs its own copy
        for (fn = 0; fn < `SVFF_NUM_FUNCTIONS; fn = fn + 1) begin
            wr(fn[11:0], `SVFF_REG_SCRATCH, scr_val(fn, 0));
            wr(fn[11:0], `SVFF_REG_XOR_KEY, key_val(fn));
            wr(fn[11:0], `SVFF_REG_CONTROL, fn % 2);
        end
        check_all("own value", 0, -1);

        // 2. one VF hammers its own registers; every other function unchanged
        victim = 77;
        for (k = 1; k <= 8; k = k + 1) begin
            wr(victim[11:0], `SVFF_REG_SCRATCH, 32'hBAD0_0000 + k);
            wr(victim[11:0], `SVFF_REG_XOR_KEY, 32'hBAD1_0000 + k);
            wr(victim[11:0], `SVFF_REG_CONTROL, 32'hFFFF_FFFF);
        end
        check_all("after VF 77 writes", 0, victim);
        rd_expect("VF 77 own SCRATCH", victim[11:0], `SVFF_REG_SCRATCH, 32'hBAD0_0008);
        wr(victim[11:0], `SVFF_REG_SCRATCH, scr_val(victim, 0));
        wr(victim[11:0], `SVFF_REG_XOR_KEY, key_val(victim));
        wr(victim[11:0], `SVFF_REG_CONTROL, victim % 2);

        // 3. management window: PF0 maps queue 12 to VF 9; nobody else can touch it
        wr(12'd0, `SVFF_REG_MGMT_QMAP_INDEX, 32'd12);
        wr(12'd0, `SVFF_REG_MGMT_QMAP_ENTRY, 32'h0000_0109);
        for (fn = 1; fn < `SVFF_NUM_FUNCTIONS; fn = fn + 1) begin
            axil_write(fn[11:0], {20'd0, `SVFF_REG_MGMT_QMAP_INDEX}, 32'd13, 4'hF, r);
            check_resp("VF QMAP_INDEX write", fn, r, SLVERR);
            axil_write(fn[11:0], {20'd0, `SVFF_REG_MGMT_QMAP_ENTRY}, 32'h100 | fn, 4'hF, r);
            check_resp("VF QMAP_ENTRY write", fn, r, SLVERR);
            axil_read(fn[11:0], {20'd0, `SVFF_REG_MGMT_QMAP_ENTRY}, d, r);
            check_resp("VF QMAP_ENTRY read", fn, r, SLVERR);
            check32("VF QMAP_ENTRY read data", fn, d, 32'd0);
        end
        rd_expect("QMAP_INDEX after VF writes", 12'd0, `SVFF_REG_MGMT_QMAP_INDEX, 32'd12);
        rd_expect("QMAP_ENTRY after VF writes", 12'd0, `SVFF_REG_MGMT_QMAP_ENTRY, 32'h0000_0109);

        // 4. FLR of VF 200 resets VF 200 only
        flr_pulse(8'd200);
        repeat (600) @(posedge clk);
        check32("FLR done count", 200, done_count, 1);
        check32("FLR done function", 200, {24'd0, done_last}, 200);
        rd_expect("FLR SCRATCH", 12'd200, `SVFF_REG_SCRATCH, 32'd0);
        rd_expect("FLR XOR_KEY", 12'd200, `SVFF_REG_XOR_KEY, 32'd0);
        rd_expect("FLR CONTROL", 12'd200, `SVFF_REG_CONTROL, 32'd0);
        rd_expect("FLR ID", 12'd200, `SVFF_REG_ID, `SVFF_ID_MAGIC);
        rd_expect("FLR count", 12'd0, `SVFF_REG_MGMT_FLR_COUNT, 32'd1);
        wr(12'd200, `SVFF_REG_SCRATCH, scr_val(200, 0));
        wr(12'd200, `SVFF_REG_XOR_KEY, key_val(200));
        wr(12'd200, `SVFF_REG_CONTROL, 200 % 2);
        check_all("after FLR of VF 200", 0, -1);
        rd_expect("QMAP_ENTRY after FLR", 12'd0, `SVFF_REG_MGMT_QMAP_ENTRY, 32'h0000_0109);

        // 5. back-to-back FLRs of a PF and three VFs
        flr_pulse(8'd3);
        flr_pulse(8'd4);
        flr_pulse(8'd255);
        flr_pulse(8'd128);
        repeat (600) @(posedge clk);
        check32("FLR done count after burst", 0, done_count, 5);
        rd_expect("FLR count after burst", 12'd0, `SVFF_REG_MGMT_FLR_COUNT, 32'd5);
        for (fn = 0; fn < `SVFF_NUM_FUNCTIONS; fn = fn + 1) begin
            if (fn == 3 || fn == 4 || fn == 255 || fn == 128) begin
                rd_expect("burst FLR SCRATCH", fn[11:0], `SVFF_REG_SCRATCH, 32'd0);
                rd_expect("burst FLR XOR_KEY", fn[11:0], `SVFF_REG_XOR_KEY, 32'd0);
            end else begin
                rd_expect("burst FLR others SCRATCH", fn[11:0], `SVFF_REG_SCRATCH, scr_val(fn, 0));
                rd_expect("burst FLR others XOR_KEY", fn[11:0], `SVFF_REG_XOR_KEY, key_val(fn));
            end
        end

        finish_tb;
    end
endmodule
