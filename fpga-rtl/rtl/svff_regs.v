// svff_regs: per-PCIe-function register block behind QDMA's AXI4-Lite master
// (m_axil_*), plus the per-function state of the loopback engine, the queue
// map (qid -> owning function) and the FLR handshake.
//
// Isolation: every per-function array is indexed by the function number that
// QDMA puts on m_axil_awuser/aruser[30:19] (never by address bits), by the
// owner of the queue (from the queue map, programmable only from PF0) or by
// the function named on the FLR interface. See REGISTERS.md.
//
// Storage: the per-function arrays have no reset; after axi_aresetn an init
// sweep clears all 256 functions and all 2048 queue-map entries (one per cycle,
// through the single write port of each array) while AXI and streams are held
// off (init_done = 0). This keeps every array a plain RAM for synthesis.
//
// One write per array per cycle, priority: init sweep > AXI write > stream
// statistics event (ev_ready) > FLR of the function under the FLR scan pointer.

`default_nettype none
`include "svff_regs.vh"

module svff_regs (
    input  wire         clk,
    input  wire         rst_n,

    // AXI4-Lite slave (QDMA m_axil_* master, PG302)
    input  wire [31:0]  s_awaddr,
    input  wire [54:0]  s_awuser,
    input  wire         s_awvalid,
    output wire         s_awready,
    input  wire [31:0]  s_wdata,
    input  wire [3:0]   s_wstrb,
    input  wire         s_wvalid,
    output wire         s_wready,
    output reg  [1:0]   s_bresp,
    output reg          s_bvalid,
    input  wire         s_bready,
    input  wire [31:0]  s_araddr,
    input  wire [54:0]  s_aruser,
    input  wire         s_arvalid,
    output wire         s_arready,
    output reg  [31:0]  s_rdata,
    output reg  [1:0]   s_rresp,
    output reg          s_rvalid,
    input  wire         s_rready,

    // queue/function look-up for the stream engine: lk_* answer for the lk_qid
    // of the previous cycle
    input  wire [10:0]  lk_qid,
    output wire         lk_mapped,
    output wire [7:0]   lk_fn,
    output wire         lk_enable,
    output wire [31:0]  lk_key,

    // the function whose packet the stream engine currently holds
    input  wire         eng_busy,
    input  wire [7:0]   eng_fn,

    // per-packet statistics events from the stream engine
    input  wire         ev_valid,
    output wire         ev_ready,
    input  wire [7:0]   ev_fn,
    input  wire         ev_unmapped,
    input  wire         ev_h2c,
    input  wire [31:0]  ev_h2c_bytes,
    input  wire         ev_drop,
    input  wire         ev_err,
    input  wire         ev_oversize,
    input  wire         ev_c2h,
    input  wire [15:0]  ev_c2h_bytes,
    input  wire [31:0]  ev_csum,

    // QDMA FLR interface (PG302 usr_flr_*)
    input  wire [7:0]   usr_flr_fnc,
    input  wire         usr_flr_set,
    input  wire         usr_flr_clr,
    output reg  [7:0]   usr_flr_done_fnc,
    output reg          usr_flr_done_vld,

    output wire         init_done
);

    localparam [1:0] RESP_OKAY   = 2'b00;
    localparam [1:0] RESP_SLVERR = 2'b10;
    localparam [1:0] RESP_DECERR = 2'b11;

    // ------------------------------------------------------------------
    // per-function state (RAM-like arrays, no reset: cleared by the sweep)
    // ------------------------------------------------------------------
    reg [31:0] scratch_m   [0:255];
    reg [31:0] key_m       [0:255];
    reg        enable_m    [0:255];
    reg [2:0]  sticky_m    [0:255];   // {oversize, h2c_err, dropped}
    reg [31:0] csum_m      [0:255];
    reg [31:0] h2c_pkts_m  [0:255];
    reg [63:0] h2c_bytes_m [0:255];
    reg [31:0] drop_pkts_m [0:255];
    reg [31:0] c2h_pkts_m  [0:255];
    reg [63:0] c2h_bytes_m [0:255];
    reg [8:0]  qmap_m      [0:2047];  // {valid, fn}

    // device-wide management state (PF0 window)
    reg [10:0] qmap_index;
    reg [31:0] unmapped_drops;
    reg [31:0] flr_count;

    // init sweep
    reg        init_busy;
    reg [10:0] sweep;
    assign init_done = ~init_busy;

    // ------------------------------------------------------------------
    // AXI4-Lite handshake: one access at a time; write wins over read
    // ------------------------------------------------------------------
    wire idle     = init_done & ~s_bvalid & ~s_rvalid;
    wire aw_fire  = idle & s_awvalid & s_wvalid;
    wire ar_fire  = idle & s_arvalid & ~(s_awvalid & s_wvalid);
    assign s_awready = aw_fire;
    assign s_wready  = aw_fire;
    assign s_arready = ar_fire;

    // decode: function from the user bits, offset from the low address bits
    wire [7:0]  w_fn    = s_awuser[26:19];
    wire        w_fn_ok = (s_awuser[30:27] == 4'd0);
    wire [11:0] w_off   = {s_awaddr[11:2], 2'b00};
    wire        w_in    = (s_awaddr[31:12] == 20'd0);
    wire [7:0]  r_fn    = s_aruser[26:19];
    wire        r_fn_ok = (s_aruser[30:27] == 4'd0);
    wire [11:0] r_off   = {s_araddr[11:2], 2'b00};
    wire        r_in    = (s_araddr[31:12] == 20'd0);

    // 2'b00: not a register, 2'b01: per-function, 2'b10: PF0 management
    function [1:0] reg_kind;
        input [11:0] off;
        begin
            case (off)
                `SVFF_REG_ID, `SVFF_REG_VERSION, `SVFF_REG_FUNC_INFO, `SVFF_REG_SCRATCH,
                `SVFF_REG_CONTROL, `SVFF_REG_XOR_KEY, `SVFF_REG_STATUS, `SVFF_REG_LAST_CSUM,
                `SVFF_REG_H2C_PKTS, `SVFF_REG_H2C_BYTES_LO, `SVFF_REG_H2C_BYTES_HI,
                `SVFF_REG_DROP_PKTS, `SVFF_REG_C2H_PKTS, `SVFF_REG_C2H_BYTES_LO,
                `SVFF_REG_C2H_BYTES_HI:
                    reg_kind = 2'b01;
                `SVFF_REG_MGMT_QMAP_INDEX, `SVFF_REG_MGMT_QMAP_ENTRY,
                `SVFF_REG_MGMT_UNMAPPED_DROPS, `SVFF_REG_MGMT_FLR_COUNT:
                    reg_kind = 2'b10;
                default:
                    reg_kind = 2'b00;
            endcase
        end
    endfunction

    function [1:0] access_resp;
        input        fn_ok;
        input        in_window;
        input [1:0]  kind;
        input [7:0]  fn;
        begin
            if (!fn_ok)
                access_resp = RESP_SLVERR;
            else if (!in_window || kind == 2'b00)
                access_resp = RESP_DECERR;
            else if (kind == 2'b10 && fn != 8'd0)
                access_resp = RESP_SLVERR;
            else
                access_resp = RESP_OKAY;
        end
    endfunction

    wire [1:0] w_resp = access_resp(w_fn_ok, w_in, reg_kind(w_off), w_fn);
    wire [1:0] r_resp = access_resp(r_fn_ok, r_in, reg_kind(r_off), r_fn);
    wire       w_ok   = aw_fire & (w_resp == RESP_OKAY);
    reg  [31:0] read_mux;

    function [31:0] strb_merge;
        input [31:0] old;
        input [31:0] data;
        input [3:0]  strb;
        begin
            strb_merge = {strb[3] ? data[31:24] : old[31:24],
                          strb[2] ? data[23:16] : old[23:16],
                          strb[1] ? data[15:8]  : old[15:8],
                          strb[0] ? data[7:0]   : old[7:0]};
        end
    endfunction

    // ------------------------------------------------------------------
    // write-port arbitration
    // ------------------------------------------------------------------
    reg  [255:0] flr_pend;
    reg  [7:0]   flr_scan;
    wire         flr_blocked_busy = eng_busy & (eng_fn == flr_scan);
    assign ev_ready = init_done & ~aw_fire;
    wire         ev_go  = ev_valid & ev_ready;
    wire         flr_go = init_done & ~aw_fire & ~ev_valid & flr_pend[flr_scan] & ~flr_blocked_busy;

    // the one function written this cycle, and what is written
    wire [7:0] wr_fn     = init_busy ? sweep[7:0] : aw_fire ? w_fn : ev_go ? ev_fn : flr_scan;
    wire       zero_all  = (init_busy & (sweep[10:8] == 3'd0)) | flr_go;
    wire       wr_scr    = w_ok & (w_off == `SVFF_REG_SCRATCH);
    wire       wr_key    = w_ok & (w_off == `SVFF_REG_XOR_KEY);
    wire       wr_ctl    = w_ok & (w_off == `SVFF_REG_CONTROL) & s_wstrb[0];
    wire       clr       = wr_ctl & s_wdata[`SVFF_CONTROL_CLEAR_BIT];
    wire       zero_cnt  = zero_all | clr;
    wire       ev_fn_ok  = ev_go & ~ev_unmapped;

    always @(posedge clk) begin
        if (zero_all | wr_scr)
            scratch_m[wr_fn] <= zero_all ? 32'd0 : strb_merge(scratch_m[wr_fn], s_wdata, s_wstrb);
        if (zero_all | wr_key)
            key_m[wr_fn] <= zero_all ? 32'd0 : strb_merge(key_m[wr_fn], s_wdata, s_wstrb);
        if (zero_all | wr_ctl)
            enable_m[wr_fn] <= zero_all ? 1'b0 : s_wdata[`SVFF_CONTROL_ENABLE_BIT];
        if (zero_cnt | ev_fn_ok)
            sticky_m[wr_fn] <= zero_cnt ? 3'd0 : (sticky_m[wr_fn] | {ev_oversize, ev_err, ev_drop});
        if (zero_cnt | (ev_fn_ok & ev_c2h))
            csum_m[wr_fn] <= zero_cnt ? 32'd0 : ev_csum;
        if (zero_cnt | (ev_fn_ok & ev_h2c))
            h2c_pkts_m[wr_fn] <= zero_cnt ? 32'd0 : h2c_pkts_m[wr_fn] + 32'd1;
        if (zero_cnt | (ev_fn_ok & ev_h2c))
            h2c_bytes_m[wr_fn] <= zero_cnt ? 64'd0 : h2c_bytes_m[wr_fn] + {32'd0, ev_h2c_bytes};
        if (zero_cnt | (ev_fn_ok & ev_drop))
            drop_pkts_m[wr_fn] <= zero_cnt ? 32'd0 : drop_pkts_m[wr_fn] + 32'd1;
        if (zero_cnt | (ev_fn_ok & ev_c2h))
            c2h_pkts_m[wr_fn] <= zero_cnt ? 32'd0 : c2h_pkts_m[wr_fn] + 32'd1;
        if (zero_cnt | (ev_fn_ok & ev_c2h))
            c2h_bytes_m[wr_fn] <= zero_cnt ? 64'd0 : c2h_bytes_m[wr_fn] + {48'd0, ev_c2h_bytes};
    end

    // queue map: written by the sweep or by PF0 (MGMT_QMAP_ENTRY)
    wire        wr_qmap = w_ok & (w_off == `SVFF_REG_MGMT_QMAP_ENTRY) & (s_wstrb[1:0] != 2'b00);
    wire [10:0] qmap_wa = init_busy ? sweep : qmap_index;
    wire [31:0] qmap_wd = strb_merge({23'd0, qmap_m[qmap_wa]}, s_wdata, s_wstrb);
    always @(posedge clk) begin
        if (init_busy | wr_qmap)
            qmap_m[qmap_wa] <= init_busy ? 9'd0 : qmap_wd[8:0];
    end

    wire [31:0] qidx_wd = strb_merge({21'd0, qmap_index}, s_wdata, s_wstrb);

    // ------------------------------------------------------------------
    // device-wide state, FLR bookkeeping, init sweep, AXI responses
    // ------------------------------------------------------------------
    always @(posedge clk) begin
        if (!rst_n) begin
            init_busy        <= 1'b1;
            sweep            <= 11'd0;
            qmap_index       <= 11'd0;
            unmapped_drops   <= 32'd0;
            flr_count        <= 32'd0;
            flr_pend         <= 256'd0;
            flr_scan         <= 8'd0;
            usr_flr_done_vld <= 1'b0;
            usr_flr_done_fnc <= 8'd0;
            s_bvalid         <= 1'b0;
            s_bresp          <= RESP_OKAY;
            s_rvalid         <= 1'b0;
            s_rresp          <= RESP_OKAY;
            s_rdata          <= 32'd0;
        end else begin
            if (init_busy) begin
                sweep <= sweep + 11'd1;
                if (sweep == 11'd2047)
                    init_busy <= 1'b0;
            end

            if (w_ok && w_off == `SVFF_REG_MGMT_QMAP_INDEX)
                qmap_index <= qidx_wd[10:0];
            if (ev_go && ev_unmapped)
                unmapped_drops <= unmapped_drops + 32'd1;

            // FLR: remember requests, serve them from a rotating scan pointer
            flr_scan         <= flr_scan + 8'd1;
            usr_flr_done_vld <= flr_go;
            usr_flr_done_fnc <= flr_scan;
            if (flr_go) begin
                flr_pend[flr_scan] <= 1'b0;
                flr_count          <= flr_count + 32'd1;
            end
            if (usr_flr_set)
                flr_pend[usr_flr_fnc] <= 1'b1;

            if (aw_fire) begin
                s_bvalid <= 1'b1;
                s_bresp  <= w_resp;
            end else if (s_bready) begin
                s_bvalid <= 1'b0;
            end

            if (ar_fire) begin
                s_rvalid <= 1'b1;
                s_rresp  <= r_resp;
                s_rdata  <= (r_resp == RESP_OKAY) ? read_mux : 32'd0;
            end else if (s_rready) begin
                s_rvalid <= 1'b0;
            end
        end
    end

    // read data for the function and offset on the read address channel
    always @(*) begin
        case (r_off)
            `SVFF_REG_ID:           read_mux = `SVFF_ID_MAGIC;
            `SVFF_REG_VERSION:      read_mux = `SVFF_VERSION;
            `SVFF_REG_FUNC_INFO:    read_mux = {22'd0, (r_fn == 8'd0), (r_fn < 8'd4), r_fn};
            `SVFF_REG_SCRATCH:      read_mux = scratch_m[r_fn];
            `SVFF_REG_CONTROL:      read_mux = {31'd0, enable_m[r_fn]};
            `SVFF_REG_XOR_KEY:      read_mux = key_m[r_fn];
            `SVFF_REG_STATUS:       read_mux = {27'd0, eng_busy & (eng_fn == r_fn),
                                                sticky_m[r_fn], enable_m[r_fn]};
            `SVFF_REG_LAST_CSUM:    read_mux = csum_m[r_fn];
            `SVFF_REG_H2C_PKTS:     read_mux = h2c_pkts_m[r_fn];
            `SVFF_REG_H2C_BYTES_LO: read_mux = h2c_bytes_m[r_fn][31:0];
            `SVFF_REG_H2C_BYTES_HI: read_mux = h2c_bytes_m[r_fn][63:32];
            `SVFF_REG_DROP_PKTS:    read_mux = drop_pkts_m[r_fn];
            `SVFF_REG_C2H_PKTS:     read_mux = c2h_pkts_m[r_fn];
            `SVFF_REG_C2H_BYTES_LO: read_mux = c2h_bytes_m[r_fn][31:0];
            `SVFF_REG_C2H_BYTES_HI: read_mux = c2h_bytes_m[r_fn][63:32];
            `SVFF_REG_MGMT_QMAP_INDEX:     read_mux = {21'd0, qmap_index};
            `SVFF_REG_MGMT_QMAP_ENTRY:     read_mux = {23'd0, qmap_m[qmap_index]};
            `SVFF_REG_MGMT_UNMAPPED_DROPS: read_mux = unmapped_drops;
            `SVFF_REG_MGMT_FLR_COUNT:      read_mux = flr_count;
            default:                read_mux = 32'd0;
        endcase
    end

    // stream engine look-up: registered queue-map read (one cycle of latency,
    // maps to block RAM), then the owner's enable and key from its registers
    reg [8:0] qent;
    always @(posedge clk)
        qent <= qmap_m[lk_qid];
    assign lk_mapped = qent[8];
    assign lk_fn     = qent[7:0];
    assign lk_enable = enable_m[qent[7:0]];
    assign lk_key    = key_m[qent[7:0]];

    // documented as unused: address protection bits are not checked, the BAR id,
    // bus number and VF group fields are not needed to identify the function,
    // and an FLR's completion (usr_flr_clr) needs no action from the user logic.
    wire _unused_ok = &{1'b0, s_awuser[54:31], s_awuser[18:0], s_aruser[54:31], s_aruser[18:0],
                        s_awaddr[1:0], s_araddr[1:0], usr_flr_clr,
                        qmap_wd[31:9], qidx_wd[31:11]};

endmodule

`default_nettype wire
