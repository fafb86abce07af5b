// svff_loopback: store-and-forward loopback accelerator between QDMA's
// AXI4-Stream H2C output (m_axis_h2c_*) and its C2H input (s_axis_c2h_*),
// with one C2H completion (s_axis_c2h_cmpt_*) per looped-back packet.
//
// Per packet: the payload is buffered (up to MAX_BEATS beats of 64 bytes,
// bytes past the end zeroed); after the last beat the queue id selects the
// owning function through the queue map (svff_regs, registered read) and the
// function's enable and key are sampled (S_LOOKUP); the packet is then sent
// back on the same queue with ctrl_len known on the first beat, as QDMA
// requires, each 32-bit word XORed with the key, and the checksum of what was
// sent goes into the completion. The function's counters are updated through
// a statistics event after the H2C packet and after the completion. One packet
// is in flight at a time, so the state of one function never mixes with
// another's.
//
// Back-pressure: m_axis_h2c_tready is low while a packet is being sent or its
// events are pending; C2H and completion outputs hold while their tready is low.

`default_nettype none

module svff_loopback #(
    parameter integer MAX_BEATS = 64          // 64 x 64 B = SVFF_MAX_PKT_BYTES
) (
    input  wire          clk,
    input  wire          rst_n,
    input  wire          start_ok,            // svff_regs init sweep done

    // QDMA H2C AXI4-Stream (PG302 m_axis_h2c_*)
    input  wire [511:0]  m_axis_h2c_tdata,
    input  wire [10:0]   m_axis_h2c_tuser_qid,
    input  wire [2:0]    m_axis_h2c_tuser_port_id,
    input  wire          m_axis_h2c_tuser_err,
    input  wire [31:0]   m_axis_h2c_tuser_mdata,
    input  wire [5:0]    m_axis_h2c_tuser_mty,
    input  wire          m_axis_h2c_tuser_zero_byte,
    input  wire          m_axis_h2c_tvalid,
    input  wire          m_axis_h2c_tlast,
    output wire          m_axis_h2c_tready,

    // QDMA C2H AXI4-Stream (PG302 s_axis_c2h_*)
    output wire [511:0]  s_axis_c2h_tdata,
    output wire [15:0]   s_axis_c2h_ctrl_len,
    output wire [10:0]   s_axis_c2h_ctrl_qid,
    output wire          s_axis_c2h_ctrl_has_cmpt,
    output wire          s_axis_c2h_ctrl_marker,
    output wire [2:0]    s_axis_c2h_ctrl_port_id,
    output wire [5:0]    s_axis_c2h_mty,
    output wire          s_axis_c2h_tvalid,
    output wire          s_axis_c2h_tlast,
    input  wire          s_axis_c2h_tready,

    // QDMA C2H completion AXI4-Stream (PG302 s_axis_c2h_cmpt_*)
    output wire [511:0]  s_axis_c2h_cmpt_tdata,
    output wire [1:0]    s_axis_c2h_cmpt_size,
    output wire [15:0]   s_axis_c2h_cmpt_dpar,
    output wire [10:0]   s_axis_c2h_cmpt_ctrl_qid,
    output wire [1:0]    s_axis_c2h_cmpt_ctrl_cmpt_type,
    output wire [15:0]   s_axis_c2h_cmpt_ctrl_wait_pld_pkt_id,
    output wire [2:0]    s_axis_c2h_cmpt_ctrl_port_id,
    output wire          s_axis_c2h_cmpt_ctrl_marker,
    output wire          s_axis_c2h_cmpt_ctrl_user_trig,
    output wire [2:0]    s_axis_c2h_cmpt_ctrl_col_idx,
    output wire [2:0]    s_axis_c2h_cmpt_ctrl_err_idx,
    output wire          s_axis_c2h_cmpt_tvalid,
    input  wire          s_axis_c2h_cmpt_tready,

    // queue -> function look-up (svff_regs; answers one cycle later)
    output wire [10:0]   lk_qid,
    input  wire          lk_mapped,
    input  wire [7:0]    lk_fn,
    input  wire          lk_enable,
    input  wire [31:0]   lk_key,

    output wire          busy,
    output wire [7:0]    busy_fn,

    // statistics events (svff_regs)
    output wire          ev_valid,
    input  wire          ev_ready,
    output wire [7:0]    ev_fn,
    output wire          ev_unmapped,
    output wire          ev_h2c,
    output wire [31:0]   ev_h2c_bytes,
    output wire          ev_drop,
    output wire          ev_err,
    output wire          ev_oversize,
    output wire          ev_c2h,
    output wire [15:0]   ev_c2h_bytes,
    output wire [31:0]   ev_csum
);

    localparam integer BW = (MAX_BEATS > 1) ? $clog2(MAX_BEATS) : 1;

    localparam [2:0] S_RX      = 3'd0;   // accepting H2C beats
    localparam [2:0] S_LOOKUP  = 3'd1;   // owner, enable and key of the queue
    localparam [2:0] S_EV_H2C  = 3'd2;   // posting the H2C statistics
    localparam [2:0] S_TX      = 3'd3;   // sending C2H beats
    localparam [2:0] S_CMPT    = 3'd4;   // sending the completion
    localparam [2:0] S_EV_C2H  = 3'd5;   // posting the C2H statistics

    reg [2:0]   state;
    reg         in_pkt;                  // a packet's first beat was taken
    reg [10:0]  cur_qid;
    reg [2:0]   cur_port;
    reg         cur_mapped;
    reg [7:0]   cur_fn;
    reg         cur_en;
    reg [31:0]  cur_key;
    reg         cur_err;
    reg         cur_oversize;
    reg [31:0]  cur_bytes;
    reg [31:0]  cur_csum;
    reg [BW:0]  wcnt;                    // beats stored
    reg [BW-1:0] rcnt;                   // beats sent
    reg [15:0]  pkt_id;                  // C2H payload packets sent (wait_pld_pkt_id)
    reg [511:0] buf_m [0:MAX_BEATS-1];

    // ------------------------------------------------------------------
    // H2C ingress
    // ------------------------------------------------------------------
    assign m_axis_h2c_tready = start_ok & (state == S_RX);
    wire   h2c_fire = m_axis_h2c_tvalid & m_axis_h2c_tready;
    wire   first    = ~in_pkt;
    // the first beat's qid while waiting for a packet, the packet's qid after
    assign lk_qid   = (state == S_RX && first) ? m_axis_h2c_tuser_qid : cur_qid;

    wire [6:0]  beat_bytes = m_axis_h2c_tuser_zero_byte ? 7'd0 :
                             (m_axis_h2c_tlast && m_axis_h2c_tuser_mty != 6'd0) ?
                                 (7'd64 - {1'b0, m_axis_h2c_tuser_mty}) : 7'd64;

    // payload as stored: bytes beyond the packet end forced to 0
    reg [511:0] beat_in;
    integer     i;
    always @(*) begin
        for (i = 0; i < 64; i = i + 1)
            beat_in[8*i +: 8] = ({25'd0, beat_bytes} > i) ? m_axis_h2c_tdata[8*i +: 8] : 8'd0;
    end

    wire [31:0] bytes_next = (first ? 32'd0 : cur_bytes) + {25'd0, beat_bytes};
    localparam [31:0] MAXB32 = MAX_BEATS;
    localparam [BW:0] MAXB = MAXB32[BW:0];
    wire        full       = ~first & (wcnt == MAXB);
    wire [BW-1:0] wr_idx   = first ? {BW{1'b0}} : wcnt[BW-1:0];

    always @(posedge clk) begin
        if (h2c_fire && !full)
            buf_m[wr_idx] <= beat_in;
    end

    // ------------------------------------------------------------------
    // C2H egress and completion
    // ------------------------------------------------------------------
    wire        fwd        = cur_mapped & cur_en & ~cur_err & ~cur_oversize & (cur_bytes != 32'd0);
    wire [31:0] last_idx32 = (cur_bytes - 32'd1) >> 6;
    wire [BW-1:0] last_idx = last_idx32[BW-1:0];
    wire        tx_last    = (rcnt == last_idx);
    wire        c2h_fire   = s_axis_c2h_tvalid & s_axis_c2h_tready;
    wire        cmpt_fire  = s_axis_c2h_cmpt_tvalid & s_axis_c2h_cmpt_tready;

    // payload as sent: the function's key on the packet's bytes only
    wire [6:0]  tx_bytes = (tx_last && cur_bytes[5:0] != 6'd0) ? {1'b0, cur_bytes[5:0]} : 7'd64;
    reg [511:0] beat_out;
    reg [31:0]  out_csum;
    always @(*) begin
        out_csum = 32'd0;
        for (i = 0; i < 64; i = i + 1)
            beat_out[8*i +: 8] = buf_m[rcnt][8*i +: 8] ^
                                 (({25'd0, tx_bytes} > i) ? cur_key[8*(i%4) +: 8] : 8'd0);
        for (i = 0; i < 16; i = i + 1)
            out_csum = out_csum ^ beat_out[32*i +: 32];
    end

    assign s_axis_c2h_tvalid        = (state == S_TX);
    assign s_axis_c2h_tdata         = beat_out;
    assign s_axis_c2h_tlast         = tx_last;
    assign s_axis_c2h_mty           = tx_last ? (6'd0 - cur_bytes[5:0]) : 6'd0;
    assign s_axis_c2h_ctrl_len      = cur_bytes[15:0];
    assign s_axis_c2h_ctrl_qid      = cur_qid;
    assign s_axis_c2h_ctrl_has_cmpt = 1'b1;
    assign s_axis_c2h_ctrl_marker   = 1'b0;
    assign s_axis_c2h_ctrl_port_id  = cur_port;

    wire [63:0] cmpt_word = {cur_csum, 4'd0, cur_fn, cur_bytes[15:0], 4'd0};
    genvar g;
    generate
        for (g = 0; g < 16; g = g + 1) begin : g_dpar
            assign s_axis_c2h_cmpt_dpar[g] = ~^s_axis_c2h_cmpt_tdata[32*g +: 32];
        end
    endgenerate
    assign s_axis_c2h_cmpt_tvalid               = (state == S_CMPT);
    assign s_axis_c2h_cmpt_tdata                = {448'd0, cmpt_word};
    assign s_axis_c2h_cmpt_size                 = 2'b00;       // 8-byte completion
    assign s_axis_c2h_cmpt_ctrl_qid             = cur_qid;
    assign s_axis_c2h_cmpt_ctrl_cmpt_type       = 2'b11;       // HAS_PLD
    assign s_axis_c2h_cmpt_ctrl_wait_pld_pkt_id = pkt_id;
    assign s_axis_c2h_cmpt_ctrl_port_id         = cur_port;
    assign s_axis_c2h_cmpt_ctrl_marker          = 1'b0;
    assign s_axis_c2h_cmpt_ctrl_user_trig       = 1'b0;
    assign s_axis_c2h_cmpt_ctrl_col_idx         = 3'd0;
    assign s_axis_c2h_cmpt_ctrl_err_idx         = 3'd1;

    // ------------------------------------------------------------------
    // statistics events
    // ------------------------------------------------------------------
    assign ev_valid     = (state == S_EV_H2C) | (state == S_EV_C2H);
    assign ev_fn        = cur_fn;
    assign ev_unmapped  = (state == S_EV_H2C) & ~cur_mapped;
    assign ev_h2c       = (state == S_EV_H2C) & cur_mapped;
    assign ev_h2c_bytes = cur_bytes;
    assign ev_drop      = (state == S_EV_H2C) & cur_mapped & (~cur_en | cur_err | cur_oversize);
    assign ev_err       = (state == S_EV_H2C) & cur_mapped & cur_err;
    assign ev_oversize  = (state == S_EV_H2C) & cur_mapped & cur_oversize;
    assign ev_c2h       = (state == S_EV_C2H);
    assign ev_c2h_bytes = cur_bytes[15:0];
    assign ev_csum      = cur_csum;

    // the function whose packet is held, from the look-up cycle on
    assign busy    = (state == S_LOOKUP) ? lk_mapped : (cur_mapped & (state != S_RX));
    assign busy_fn = (state == S_LOOKUP) ? lk_fn : cur_fn;

    // ------------------------------------------------------------------
    // control
    // ------------------------------------------------------------------
    always @(posedge clk) begin
        if (!rst_n) begin
            state        <= S_RX;
            in_pkt       <= 1'b0;
            cur_qid      <= 11'd0;
            cur_port     <= 3'd0;
            cur_mapped   <= 1'b0;
            cur_fn       <= 8'd0;
            cur_en       <= 1'b0;
            cur_key      <= 32'd0;
            cur_err      <= 1'b0;
            cur_oversize <= 1'b0;
            cur_bytes    <= 32'd0;
            cur_csum     <= 32'd0;
            wcnt         <= {(BW+1){1'b0}};
            rcnt         <= {BW{1'b0}};
            pkt_id       <= 16'd0;
        end else begin
            case (state)
                S_RX: if (h2c_fire) begin
                    if (first) begin
                        cur_qid    <= m_axis_h2c_tuser_qid;
                        cur_port   <= m_axis_h2c_tuser_port_id;
                        cur_mapped <= 1'b0;
                    end
                    cur_err      <= (first ? 1'b0 : cur_err) | m_axis_h2c_tuser_err;
                    cur_oversize <= (first ? 1'b0 : cur_oversize) | full;
                    cur_bytes    <= bytes_next;
                    if (first)
                        wcnt <= {{BW{1'b0}}, 1'b1};
                    else if (!full)
                        wcnt <= wcnt + 1'b1;
                    in_pkt <= ~m_axis_h2c_tlast;
                    if (m_axis_h2c_tlast)
                        state <= S_LOOKUP;
                end
                S_LOOKUP: begin
                    cur_mapped <= lk_mapped;
                    cur_fn     <= lk_fn;
                    cur_en     <= lk_enable;
                    cur_key    <= lk_key;
                    state      <= S_EV_H2C;
                end
                S_EV_H2C: if (ev_ready) begin
                    rcnt <= {BW{1'b0}};
                    if (fwd) begin
                        state  <= S_TX;
                        pkt_id <= pkt_id + 16'd1;
                    end else begin
                        state <= S_RX;
                    end
                end
                S_TX: if (c2h_fire) begin
                    rcnt     <= rcnt + 1'b1;
                    cur_csum <= ((rcnt == {BW{1'b0}}) ? 32'd0 : cur_csum) ^ out_csum;
                    if (tx_last)
                        state <= S_CMPT;
                end
                S_CMPT: if (cmpt_fire)
                    state <= S_EV_C2H;
                S_EV_C2H: if (ev_ready)
                    state <= S_RX;
                default:
                    state <= S_RX;
            endcase
        end
    end

    // the descriptor metadata is not used by this accelerator
    wire _unused_ok = &{1'b0, m_axis_h2c_tuser_mdata, last_idx32[31:BW]};

endmodule

`default_nettype wire
