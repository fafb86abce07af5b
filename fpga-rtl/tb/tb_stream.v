// tb_stream: the loopback accelerator on QDMA's H2C/C2H/completion streams.
//  A. one packet for every one of the 256 functions (4 PFs + 252 VFs), each
//     function with its own key: data, length, qid, port, completion and the
//     counters of all 256 functions against a model;
//  B. edge lengths (1..4096 bytes) and random packets with random back-pressure
//     on C2H and completion and random gaps on H2C; AXI4-Stream hold rules;
//  C. long C2H / completion stalls: H2C is back-pressured, nothing lost, STATUS.BUSY
//     visible only to the owning function;
//  D. drops: disabled function, tuser_err, oversize, unmapped queue, zero-byte packet;
//     queue remapping by PF0;
//  E. CONTROL.CLEAR of one function leaves the others' counters intact;
//  F. FLR while the engine holds the function's packet waits for it; FLR of another
//     function completes meanwhile;
//  G. FLR arriving with a packet, at offsets around the engine's look-up cycle.
// A model of the queue map and of every function's counters is checked against
// the registers of all 256 functions after every phase.

`default_nettype none
`include "svff_regs.vh"
`define TB_NAME "tb_stream"
`define TB_TIMEOUT_CYCLES 3000000

module tb_stream;
`include "tb_common.vh"

    localparam integer NF = `SVFF_NUM_FUNCTIONS;
    localparam integer MAXB = `SVFF_MAX_PKT_BYTES;

    // ---- model ------------------------------------------------------------
    reg        q_valid [0:2047];
    reg [7:0]  q_fn    [0:2047];
    reg        m_en    [0:NF-1];
    reg [31:0] m_key   [0:NF-1];
    reg [31:0] m_h2c_pkts [0:NF-1];
    reg [63:0] m_h2c_bytes [0:NF-1];
    reg [31:0] m_drop  [0:NF-1];
    reg [31:0] m_c2h_pkts [0:NF-1];
    reg [63:0] m_c2h_bytes [0:NF-1];
    reg [31:0] m_csum  [0:NF-1];
    reg [2:0]  m_sticky [0:NF-1];     // {oversize, h2c_err, dropped}
    reg [31:0] m_unmapped;

    // expected C2H packets (in order)
    localparam integer EXPN = 2048;
    integer    e_pkt  [0:EXPN-1];
    reg [10:0] e_qid  [0:EXPN-1];
    reg [2:0]  e_port [0:EXPN-1];
    integer    e_len  [0:EXPN-1];
    reg [31:0] e_key  [0:EXPN-1];
    reg [7:0]  e_fn   [0:EXPN-1];
    reg [31:0] e_csum [0:EXPN-1];
    integer    exp_wr = 0, exp_rd = 0;

    integer pkt_no = 0;
    integer seed = 32'h5eed;
    reg     bp = 1'b0;          // random back-pressure on C2H / completion
    reg     gaps = 1'b0;        // random idle cycles on H2C

    function [31:0] gen_word(input integer pkt, input integer beat, input integer w);
        gen_word = (pkt * 32'h9E37_79B1) ^ (beat * 32'h85EB_CA6B) ^ (w * 32'hC2B2_AE35) ^ 32'h0123_4567;
    endfunction

    function [511:0] gen_beat(input integer pkt, input integer beat);
        integer w;
        begin
            for (w = 0; w < 16; w = w + 1)
                gen_beat[32*w +: 32] = gen_word(pkt, beat, w);
        end
    endfunction

    // the beat the DUT must send: key applied, bytes past the end zero
    function [511:0] exp_beat(input integer pkt, input integer beat, input integer len,
                              input [31:0] key);
        integer i;
        reg [511:0] raw;
        begin
            raw = gen_beat(pkt, beat);
            for (i = 0; i < 64; i = i + 1)
                exp_beat[8*i +: 8] = (beat * 64 + i < len) ? (raw[8*i +: 8] ^ key[8*(i%4) +: 8]) : 8'd0;
        end
    endfunction

    function [31:0] beat_csum(input [511:0] b);
        integer w;
        begin
            beat_csum = 32'd0;
            for (w = 0; w < 16; w = w + 1)
                beat_csum = beat_csum ^ b[32*w +: 32];
        end
    endfunction

    // ---- H2C driver ---------------------------------------------------------
    // err_beat < 0: no error; otherwise tuser_err from that beat to the end
    task send_raw(input [10:0] qid, input integer len, input [2:0] port, input integer err_beat);
        integer b, nb;
        begin
            nb = (len == 0) ? 1 : (len + 63) / 64;
            for (b = 0; b < nb; b = b + 1) begin
                @(negedge clk);
                if (gaps) begin
                    h2c_tvalid = 1'b0;
                    while (($random(seed) & 3) == 0) @(negedge clk);
                end
                h2c_tdata  = gen_beat(pkt_no, b);
                h2c_qid    = qid;
                h2c_port   = port;
                h2c_mdata  = pkt_no;
                h2c_err    = (err_beat >= 0 && b >= err_beat);
                h2c_tlast  = (b == nb - 1);
                h2c_mty    = (b == nb - 1) ? ((64 - len % 64) % 64) : 6'd0;
                h2c_zero   = (len == 0);
                h2c_tvalid = 1'b1;
                @(posedge clk);
                while (!h2c_tready) @(posedge clk);
            end
            @(negedge clk);
            h2c_tvalid = 1'b0;
            h2c_tdata  = {16{32'hDEAD_BEEF}};
            h2c_tlast  = 1'b0;
        end
    endtask

    // update the model for one packet about to be sent
    task model_pkt(input [10:0] qid, input integer len, input [2:0] port, input integer err_beat);
        integer f, b, nb;
        reg [31:0] cs;
        begin
            f = q_fn[qid];
            if (!q_valid[qid]) begin
                m_unmapped = m_unmapped + 1;
            end else begin
                m_h2c_pkts[f]  = m_h2c_pkts[f] + 1;
                m_h2c_bytes[f] = m_h2c_bytes[f] + len;
                if (!m_en[f] || err_beat >= 0 || len > MAXB) begin
                    m_drop[f] = m_drop[f] + 1;
                    m_sticky[f] = m_sticky[f] | {len > MAXB, err_beat >= 0, 1'b1};
                end else if (len > 0) begin
                    nb = (len + 63) / 64;
                    cs = 32'd0;
                    for (b = 0; b < nb; b = b + 1)
                        cs = cs ^ beat_csum(exp_beat(pkt_no, b, len, m_key[f]));
                    e_pkt[exp_wr % EXPN]  = pkt_no;
                    e_qid[exp_wr % EXPN]  = qid;
                    e_port[exp_wr % EXPN] = port;
                    e_len[exp_wr % EXPN]  = len;
                    e_key[exp_wr % EXPN]  = m_key[f];
                    e_fn[exp_wr % EXPN]   = f;
                    e_csum[exp_wr % EXPN] = cs;
                    exp_wr = exp_wr + 1;
                    m_c2h_pkts[f]  = m_c2h_pkts[f] + 1;
                    m_c2h_bytes[f] = m_c2h_bytes[f] + len;
                    m_csum[f]      = cs;
                end
            end
        end
    endtask

    // send one packet and update the model
    task send(input [10:0] qid, input integer len, input [2:0] port, input integer err_beat);
        begin
            model_pkt(qid, len, port, err_beat);
            send_raw(qid, len, port, err_beat);
            pkt_no = pkt_no + 1;
        end
    endtask

    // one-beat packet of function f on queue 8f, with an FLR request for f on
    // the same edge, when the FLR scan pointer of the DUT is at s0 (white-box
    // peek used only to line the FLR up with the engine's look-up cycle)
    task send_with_flr(input integer f, input integer s0);
        integer n;
        begin
            model_pkt(f * 8, 40, 0, -1);
            n = 0;
            @(negedge clk);
            while (dut.u_regs.flr_scan != s0[7:0] || !h2c_tready) begin
                @(negedge clk);
                n = n + 1;
            end
            h2c_tdata = gen_beat(pkt_no, 0); h2c_qid = f * 8; h2c_port = 0; h2c_err = 0;
            h2c_tlast = 1'b1; h2c_mty = 6'd24; h2c_zero = 1'b0; h2c_tvalid = 1'b1;
            flr_fnc = f; flr_set = 1'b1;
            @(negedge clk);
            h2c_tvalid = 1'b0; h2c_tlast = 1'b0; flr_set = 1'b0;
            pkt_no = pkt_no + 1;
        end
    endtask

    // ---- C2H / completion monitor --------------------------------------------
    integer    mon_beat = 0;
    integer    mon_pkts = 0;       // payload packets seen: completion wait_pld_pkt_id
    reg        mon_wait_cmpt = 1'b0;
    reg        c2h_stall = 1'b0, cmpt_stall = 1'b0;
    reg [511:0] c2h_prev_data;
    reg [15:0]  c2h_prev_len;
    reg [10:0]  c2h_prev_qid;
    reg         c2h_prev_last;
    reg [5:0]   c2h_prev_mty;
    reg [511:0] cmpt_prev_data;
    reg [10:0]  cmpt_prev_qid;
    integer     ei, nbm;
    reg [31:0]  exp_cmpt_lo;

    always @(posedge clk) if (rst_n) begin
        // AXI4-Stream: once valid, hold valid and payload until ready
        if (c2h_stall) begin
            checks = checks + 1;
            if (!c2h_tvalid || c2h_tdata !== c2h_prev_data || c2h_len !== c2h_prev_len ||
                c2h_qid !== c2h_prev_qid || c2h_tlast !== c2h_prev_last || c2h_mty !== c2h_prev_mty) begin
                errors = errors + 1;
                $display("  ERROR C2H changed while stalled (cycle %0d)", cycle);
            end
        end
        if (cmpt_stall) begin
            checks = checks + 1;
            if (!cmpt_tvalid || cmpt_tdata !== cmpt_prev_data || cmpt_qid !== cmpt_prev_qid) begin
                errors = errors + 1;
                $display("  ERROR completion changed while stalled (cycle %0d)", cycle);
            end
        end
        c2h_stall      <= c2h_tvalid & ~c2h_tready;
        c2h_prev_data  <= c2h_tdata;
        c2h_prev_len   <= c2h_len;
        c2h_prev_qid   <= c2h_qid;
        c2h_prev_last  <= c2h_tlast;
        c2h_prev_mty   <= c2h_mty;
        cmpt_stall     <= cmpt_tvalid & ~cmpt_tready;
        cmpt_prev_data <= cmpt_tdata;
        cmpt_prev_qid  <= cmpt_qid;

        if (c2h_tvalid && c2h_tready) begin
            ei = exp_rd % EXPN;
            checks = checks + 1;
            if (exp_rd >= exp_wr || mon_wait_cmpt) begin
                errors = errors + 1;
                $display("  ERROR unexpected C2H beat qid %0d (cycle %0d)", c2h_qid, cycle);
            end else begin
                nbm = (e_len[ei] + 63) / 64;
                if (c2h_tdata !== exp_beat(e_pkt[ei], mon_beat, e_len[ei], e_key[ei])) begin
                    errors = errors + 1;
                    $display("  ERROR C2H data pkt %0d beat %0d fn %0d (cycle %0d)",
                             e_pkt[ei], mon_beat, e_fn[ei], cycle);
                end
                check32("C2H ctrl_len", e_fn[ei], c2h_len, e_len[ei]);
                check32("C2H ctrl_qid", e_fn[ei], c2h_qid, e_qid[ei]);
                check32("C2H port", e_fn[ei], c2h_port, e_port[ei]);
                check32("C2H has_cmpt/marker", e_fn[ei], {c2h_has_cmpt, c2h_marker}, 2'b10);
                check32("C2H tlast", e_fn[ei], c2h_tlast, mon_beat == nbm - 1);
                if (c2h_tlast)
                    check32("C2H mty", e_fn[ei], c2h_mty, (64 - e_len[ei] % 64) % 64);
                if (c2h_tlast) begin
                    mon_beat <= 0;
                    mon_wait_cmpt <= 1'b1;
                    mon_pkts <= mon_pkts + 1;
                end else begin
                    mon_beat <= mon_beat + 1;
                end
            end
        end

        if (cmpt_tvalid && cmpt_tready) begin
            ei = exp_rd % EXPN;
            checks = checks + 1;
            if (!mon_wait_cmpt) begin
                errors = errors + 1;
                $display("  ERROR completion before its payload (cycle %0d)", cycle);
            end else begin
                exp_cmpt_lo = {4'd0, e_fn[ei], e_len[ei][15:0], 4'd0};
                check32("CMPT word lo", e_fn[ei], cmpt_tdata[31:0], exp_cmpt_lo);
                check32("CMPT checksum", e_fn[ei], cmpt_tdata[63:32], e_csum[ei]);
                check32("CMPT upper bits", e_fn[ei], |cmpt_tdata[511:64], 0);
                check32("CMPT qid", e_fn[ei], cmpt_qid, e_qid[ei]);
                check32("CMPT port", e_fn[ei], cmpt_port, e_port[ei]);
                check32("CMPT size/type", e_fn[ei], {cmpt_size, cmpt_type}, 4'b0011);
                check32("CMPT wait_pld_pkt_id", e_fn[ei], cmpt_pkt_id, mon_pkts);
                check32("CMPT dpar", e_fn[ei], cmpt_dpar[1:0], {~^cmpt_tdata[63:32], ~^cmpt_tdata[31:0]});
                mon_wait_cmpt <= 1'b0;
                exp_rd = exp_rd + 1;
            end
        end
    end

    always @(negedge clk) begin
        if (bp) begin
            c2h_tready  = ($random(seed) & 3) != 0;
            cmpt_tready = ($random(seed) & 3) != 1;
        end
    end

    // ---- helpers ------------------------------------------------------------
    task wait_drained;
        integer n;
        begin
            n = 0;
            while ((exp_rd != exp_wr || mon_wait_cmpt || !h2c_tready) && n < 100000) begin
                @(posedge clk);
                n = n + 1;
            end
            repeat (4) @(posedge clk);
            check32("drained", 0, exp_rd, exp_wr);
        end
    endtask

    task check_fn(input integer f);
        begin
            rd_expect("H2C_PKTS", f[11:0], `SVFF_REG_H2C_PKTS, m_h2c_pkts[f]);
            rd_expect("H2C_BYTES_LO", f[11:0], `SVFF_REG_H2C_BYTES_LO, m_h2c_bytes[f][31:0]);
            rd_expect("H2C_BYTES_HI", f[11:0], `SVFF_REG_H2C_BYTES_HI, m_h2c_bytes[f][63:32]);
            rd_expect("DROP_PKTS", f[11:0], `SVFF_REG_DROP_PKTS, m_drop[f]);
            rd_expect("C2H_PKTS", f[11:0], `SVFF_REG_C2H_PKTS, m_c2h_pkts[f]);
            rd_expect("C2H_BYTES_LO", f[11:0], `SVFF_REG_C2H_BYTES_LO, m_c2h_bytes[f][31:0]);
            rd_expect("C2H_BYTES_HI", f[11:0], `SVFF_REG_C2H_BYTES_HI, m_c2h_bytes[f][63:32]);
            rd_expect("LAST_CSUM", f[11:0], `SVFF_REG_LAST_CSUM, m_csum[f]);
            rd_expect("STATUS", f[11:0], `SVFF_REG_STATUS, {27'd0, 1'b0, m_sticky[f], m_en[f]});
        end
    endtask

    task check_all_fns;
        integer f;
        begin
            for (f = 0; f < NF; f = f + 1)
                check_fn(f);
            rd_expect("MGMT_UNMAPPED_DROPS", 12'd0, `SVFF_REG_MGMT_UNMAPPED_DROPS, m_unmapped);
        end
    endtask

    task map_q(input [10:0] qid, input valid, input [7:0] f);
        begin
            wr(12'd0, `SVFF_REG_MGMT_QMAP_INDEX, qid);
            wr(12'd0, `SVFF_REG_MGMT_QMAP_ENTRY, {23'd0, valid, f});
            q_valid[qid] = valid;
            q_fn[qid] = f;
        end
    endtask

    task set_fn(input integer f, input en, input [31:0] key);
        begin
            wr(f[11:0], `SVFF_REG_XOR_KEY, key);
            wr(f[11:0], `SVFF_REG_CONTROL, en);
            m_en[f] = en;
            m_key[f] = key;
        end
    endtask

    task zero_fn_model(input integer f);
        begin
            m_h2c_pkts[f] = 0; m_h2c_bytes[f] = 0; m_drop[f] = 0; m_c2h_pkts[f] = 0;
            m_c2h_bytes[f] = 0; m_csum[f] = 0; m_sticky[f] = 0;
        end
    endtask

    integer f, i, n, len, q, off, done_seen_50, done_seen_51, done_all;
    reg [31:0] d;
    reg [1:0]  r;

    always @(posedge clk) if (flr_done_vld) begin
        done_all = done_all + 1;
        if (flr_done_fnc == 8'd50) done_seen_50 = done_seen_50 + 1;
        if (flr_done_fnc == 8'd51) done_seen_51 = done_seen_51 + 1;
    end

    initial begin
        for (i = 0; i < 2048; i = i + 1) begin q_valid[i] = 0; q_fn[i] = 0; end
        for (f = 0; f < NF; f = f + 1) begin
            zero_fn_model(f); m_en[f] = 0; m_key[f] = 0;
        end
        m_unmapped = 0;
        done_seen_50 = 0; done_seen_51 = 0; done_all = 0;
        do_reset;

        // PF0 maps queues 8f..8f+3 to function f; 8f+4..8f+7 stay unmapped
        for (f = 0; f < NF; f = f + 1) begin
            for (i = 0; i < 4; i = i + 1)
                map_q(f * 8 + i, 1'b1, f);
            set_fn(f, 1'b1, 32'hA000_0000 ^ (f * 32'h0103_0507));
        end

        // A. one packet per function, all 256
        for (f = 0; f < NF; f = f + 1)
            send(f * 8 + f % 4, 1 + (f * 37) % 300, f % 8, -1);
        wait_drained;
        check_all_fns;
        $display("  phase A done: 256 functions looped back (cycle %0d)", cycle);

        // B. edge lengths on VF 5 and random traffic, with back-pressure and gaps
        bp = 1'b1; gaps = 1'b1;
        send(41, 1, 1, -1);    send(41, 2, 1, -1);    send(41, 63, 1, -1);
        send(41, 64, 1, -1);   send(41, 65, 1, -1);   send(41, 127, 1, -1);
        send(41, 128, 1, -1);  send(41, 129, 1, -1);  send(41, 1000, 1, -1);
        send(41, 4095, 1, -1); send(41, 4096, 1, -1);
        for (i = 0; i < 40; i = i + 1) begin
            f = ($random(seed) & 255);
            len = 1 + (($random(seed) & 32'h7fffffff) % 700);
            send(f * 8 + (i % 4), len, i % 8, -1);
        end
        wait_drained;
        bp = 1'b0; gaps = 1'b0;
        @(negedge clk); c2h_tready = 1'b1; cmpt_tready = 1'b1;
        check_all_fns;
        $display("  phase B done: edge lengths and random back-pressure (cycle %0d)", cycle);

        // C. long stalls: C2H held off, then the completion held off
        @(negedge clk); c2h_tready = 1'b0;
        send(80, 300, 2, -1);                  // fn 10 (queue 80): fully buffered
        fork
            send(88, 100, 3, -1);              // fn 11 (queue 88): must wait
            begin
                n = 0;
                for (i = 0; i < 200; i = i + 1) begin
                    @(posedge clk);
                    if (h2c_tready) n = n + 1;
                end
                check32("h2c_tready during C2H stall", 11, n, 0);
                rd_expect("STATUS BUSY owner", 12'd10, `SVFF_REG_STATUS, 32'h11);
                rd_expect("STATUS BUSY other", 12'd11, `SVFF_REG_STATUS, 32'h01);
                @(negedge clk); cmpt_tready = 1'b0; c2h_tready = 1'b1;
                repeat (200) @(posedge clk);
                check32("completion pending", 10, cmpt_tvalid, 1);
                check32("fn 10 packet not counted yet", 10, exp_rd, exp_wr - 2);
                @(negedge clk); cmpt_tready = 1'b1;
            end
        join
        wait_drained;
        check_all_fns;
        $display("  phase C done: stalls back-pressure H2C, nothing lost (cycle %0d)", cycle);

        // D. drops
        set_fn(20, 1'b0, m_key[20]);
        send(160, 100, 0, -1);                 // fn 20 disabled
        send(161, 0, 0, -1);                   // fn 20 disabled, zero bytes
        send(168, 200, 0, 1);                  // fn 21: tuser_err from beat 1
        send(176, 4097, 0, -1);                // fn 22: oversize
        send(177, 5000, 0, -1);                // fn 22: oversize
        send(178, 333, 0, -1);                 // fn 22: recovers
        send(184, 0, 0, -1);                   // fn 23: zero-byte packet, no C2H
        send(30 * 8 + 5, 64, 0, -1);           // unmapped queue
        send(2047, 64, 0, -1);                 // unmapped queue
        map_q(30 * 8 + 5, 1'b1, 8'd31);        // PF0 gives queue 245 to fn 31
        send(30 * 8 + 5, 77, 0, -1);
        map_q(40 * 8, 1'b1, 8'd41);            // and fn 40's queue 320 to fn 41
        send(40 * 8, 99, 0, -1);
        map_q(40 * 8, 1'b0, 8'd40);            // queue 320 unmapped again
        send(40 * 8, 10, 0, -1);
        wait_drained;
        check_all_fns;
        $display("  phase D done: drops and queue map (cycle %0d)", cycle);

        // E. CONTROL.CLEAR of VF 5 only
        wr(12'd5, `SVFF_REG_CONTROL, 32'h3);
        zero_fn_model(5);
        check_all_fns;
        $display("  phase E done: clear is per function (cycle %0d)", cycle);

        // F. FLR of VF 50 while its packet is held, FLR of VF 51 meanwhile
        @(negedge clk); c2h_tready = 1'b0;
        send(400, 500, 0, -1);                 // fn 50
        @(negedge clk); flr_fnc = 8'd50; flr_set = 1'b1;
        @(negedge clk); flr_fnc = 8'd51;
        @(negedge clk); flr_set = 1'b0;
        repeat (700) @(posedge clk);
        check32("FLR of idle VF 51 done", 51, done_seen_51, 1);
        check32("FLR of busy VF 50 waits", 50, done_seen_50, 0);
        rd_expect("VF 50 state kept until its packet is out", 12'd50, `SVFF_REG_XOR_KEY, m_key[50]);
        @(negedge clk); c2h_tready = 1'b1;
        wait_drained;
        repeat (700) @(posedge clk);
        check32("FLR of VF 50 done after the packet", 50, done_seen_50, 1);
        zero_fn_model(50); m_en[50] = 0; m_key[50] = 0;
        zero_fn_model(51); m_en[51] = 0; m_key[51] = 0;
        check_all_fns;
        rd_expect("FLR count", 12'd0, `SVFF_REG_MGMT_FLR_COUNT, 32'd2);
        $display("  phase F done: FLR waits for the function's packet only (cycle %0d)", cycle);

        // G. FLR requested on the packet's edge, at scan offsets around the
        //    engine's look-up cycle: the packet is looped back with the key it
        //    was looked up with and the FLR comes after it (counters all zero),
        //    never half of each
        for (off = -2; off <= 3; off = off + 1) begin
            f = 62 + off;
            n = done_all;
            send_with_flr(f, (f - 1 - off + 256) % 256);
            wait_drained;
            repeat (600) @(posedge clk);
            check32("FLR on the packet's edge done once", f, done_all - n, 1);
            zero_fn_model(f); m_en[f] = 0; m_key[f] = 0;
            check_fn(f);
        end
        check_all_fns;
        $display("  phase G done: FLR racing the look-up cycle (cycle %0d)", cycle);

        finish_tb;
    end
endmodule
