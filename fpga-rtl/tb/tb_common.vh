// Common test-bench body: clock, reset, the DUT (svff_user_top) with every
// QDMA-side port, AXI4-Lite master tasks (the QDMA side of m_axil_*), check
// helpers, a watchdog and the PASS/FAIL verdict.
//
// Convention: the bench drives DUT inputs just after the falling edge and
// samples DUT outputs at the rising edge, so no race with the DUT's registers.
//
// Include inside a module after defining TB_NAME (a string) and, optionally,
// TB_TIMEOUT_CYCLES.

`ifndef TB_TIMEOUT_CYCLES
`define TB_TIMEOUT_CYCLES 2000000
`endif

localparam [1:0] OKAY = 2'b00, SLVERR = 2'b10, DECERR = 2'b11;

reg clk = 1'b0;
reg rst_n = 1'b0;
always #2 clk = ~clk;

integer errors = 0;
integer checks = 0;
integer cycle = 0;
always @(posedge clk) cycle = cycle + 1;

// ---- DUT ports ----------------------------------------------------------
reg  [31:0]  m_axil_awaddr = 0;
reg  [54:0]  m_axil_awuser = 0;
reg          m_axil_awvalid = 0;
wire         m_axil_awready;
reg  [31:0]  m_axil_wdata = 0;
reg  [3:0]   m_axil_wstrb = 0;
reg          m_axil_wvalid = 0;
wire         m_axil_wready;
wire [1:0]   m_axil_bresp;
wire         m_axil_bvalid;
reg          m_axil_bready = 0;
reg  [31:0]  m_axil_araddr = 0;
reg  [54:0]  m_axil_aruser = 0;
reg          m_axil_arvalid = 0;
wire         m_axil_arready;
wire [31:0]  m_axil_rdata;
wire [1:0]   m_axil_rresp;
wire         m_axil_rvalid;
reg          m_axil_rready = 0;

reg  [511:0] h2c_tdata = 0;
reg  [10:0]  h2c_qid = 0;
reg  [2:0]   h2c_port = 0;
reg          h2c_err = 0;
reg  [31:0]  h2c_mdata = 0;
reg  [5:0]   h2c_mty = 0;
reg          h2c_zero = 0;
reg          h2c_tvalid = 0;
reg          h2c_tlast = 0;
wire         h2c_tready;

wire [511:0] c2h_tdata;
wire [15:0]  c2h_len;
wire [10:0]  c2h_qid;
wire         c2h_has_cmpt;
wire         c2h_marker;
wire [2:0]   c2h_port;
wire [5:0]   c2h_mty;
wire         c2h_tvalid;
wire         c2h_tlast;
reg          c2h_tready = 1;

wire [511:0] cmpt_tdata;
wire [1:0]   cmpt_size;
wire [15:0]  cmpt_dpar;
wire [10:0]  cmpt_qid;
wire [1:0]   cmpt_type;
wire [15:0]  cmpt_pkt_id;
wire [2:0]   cmpt_port;
wire         cmpt_marker;
wire         cmpt_user_trig;
wire [2:0]   cmpt_col_idx;
wire [2:0]   cmpt_err_idx;
wire         cmpt_tvalid;
reg          cmpt_tready = 1;

reg  [7:0]   flr_fnc = 0;
reg          flr_set = 0;
reg          flr_clr = 0;
wire [7:0]   flr_done_fnc;
wire         flr_done_vld;

svff_user_top dut (
    .axi_aclk(clk), .axi_aresetn(rst_n),
    .m_axil_awaddr(m_axil_awaddr), .m_axil_awuser(m_axil_awuser), .m_axil_awprot(3'd0),
    .m_axil_awvalid(m_axil_awvalid), .m_axil_awready(m_axil_awready),
    .m_axil_wdata(m_axil_wdata), .m_axil_wstrb(m_axil_wstrb), .m_axil_wvalid(m_axil_wvalid),
    .m_axil_wready(m_axil_wready),
    .m_axil_bresp(m_axil_bresp), .m_axil_bvalid(m_axil_bvalid), .m_axil_bready(m_axil_bready),
    .m_axil_araddr(m_axil_araddr), .m_axil_aruser(m_axil_aruser), .m_axil_arprot(3'd0),
    .m_axil_arvalid(m_axil_arvalid), .m_axil_arready(m_axil_arready),
    .m_axil_rdata(m_axil_rdata), .m_axil_rresp(m_axil_rresp), .m_axil_rvalid(m_axil_rvalid),
    .m_axil_rready(m_axil_rready),
    .m_axis_h2c_tdata(h2c_tdata), .m_axis_h2c_tuser_qid(h2c_qid),
    .m_axis_h2c_tuser_port_id(h2c_port), .m_axis_h2c_tuser_err(h2c_err),
    .m_axis_h2c_tuser_mdata(h2c_mdata), .m_axis_h2c_tuser_mty(h2c_mty),
    .m_axis_h2c_tuser_zero_byte(h2c_zero), .m_axis_h2c_tvalid(h2c_tvalid),
    .m_axis_h2c_tlast(h2c_tlast), .m_axis_h2c_tready(h2c_tready),
    .s_axis_c2h_tdata(c2h_tdata), .s_axis_c2h_ctrl_len(c2h_len), .s_axis_c2h_ctrl_qid(c2h_qid),
    .s_axis_c2h_ctrl_has_cmpt(c2h_has_cmpt), .s_axis_c2h_ctrl_marker(c2h_marker),
    .s_axis_c2h_ctrl_port_id(c2h_port), .s_axis_c2h_mty(c2h_mty),
    .s_axis_c2h_tvalid(c2h_tvalid), .s_axis_c2h_tlast(c2h_tlast), .s_axis_c2h_tready(c2h_tready),
    .s_axis_c2h_cmpt_tdata(cmpt_tdata), .s_axis_c2h_cmpt_size(cmpt_size),
    .s_axis_c2h_cmpt_dpar(cmpt_dpar), .s_axis_c2h_cmpt_ctrl_qid(cmpt_qid),
    .s_axis_c2h_cmpt_ctrl_cmpt_type(cmpt_type),
    .s_axis_c2h_cmpt_ctrl_wait_pld_pkt_id(cmpt_pkt_id),
    .s_axis_c2h_cmpt_ctrl_port_id(cmpt_port), .s_axis_c2h_cmpt_ctrl_marker(cmpt_marker),
    .s_axis_c2h_cmpt_ctrl_user_trig(cmpt_user_trig),
    .s_axis_c2h_cmpt_ctrl_col_idx(cmpt_col_idx), .s_axis_c2h_cmpt_ctrl_err_idx(cmpt_err_idx),
    .s_axis_c2h_cmpt_tvalid(cmpt_tvalid), .s_axis_c2h_cmpt_tready(cmpt_tready),
    .usr_flr_fnc(flr_fnc), .usr_flr_set(flr_set), .usr_flr_clr(flr_clr),
    .usr_flr_done_fnc(flr_done_fnc), .usr_flr_done_vld(flr_done_vld)
);

// ---- checks ---------------------------------------------------------------
task check32(input [8*48-1:0] what, input integer fn, input [31:0] got, input [31:0] exp);
    begin
        checks = checks + 1;
        if (got !== exp) begin
            errors = errors + 1;
            if (errors <= 20)
                $display("  ERROR %0s fn %0d: got 0x%08h, expected 0x%08h (cycle %0d)",
                         what, fn, got, exp, cycle);
        end
    end
endtask

task check_resp(input [8*48-1:0] what, input integer fn, input [1:0] got, input [1:0] exp);
    begin
        checks = checks + 1;
        if (got !== exp) begin
            errors = errors + 1;
            if (errors <= 20)
                $display("  ERROR %0s fn %0d: response %b, expected %b (cycle %0d)",
                         what, fn, got, exp, cycle);
        end
    end
endtask

// ---- AXI4-Lite master (QDMA side); fn is the 12-bit function number field ----
task axil_write(input [11:0] fn, input [31:0] addr, input [31:0] data, input [3:0] strb,
                output [1:0] resp);
    integer n;
    begin
        @(negedge clk);
        m_axil_awaddr  = addr;
        m_axil_awuser  = {24'd0, fn, 19'd0};
        m_axil_wdata   = data;
        m_axil_wstrb   = strb;
        m_axil_awvalid = 1'b1;
        m_axil_wvalid  = 1'b1;
        m_axil_bready  = 1'b1;
        n = 0;
        @(posedge clk);
        while (!(m_axil_awready && m_axil_wready)) begin
            n = n + 1;
            if (n > 5000) begin $display("  ERROR axil_write: no awready"); errors = errors + 1; end
            @(posedge clk);
        end
        @(negedge clk);
        m_axil_awvalid = 1'b0;
        m_axil_wvalid  = 1'b0;
        m_axil_awaddr  = 32'hDEAD_BEEF;
        m_axil_wdata   = 32'hDEAD_BEEF;
        @(posedge clk);
        while (!m_axil_bvalid) @(posedge clk);
        resp = m_axil_bresp;
        @(negedge clk);
        m_axil_bready = 1'b0;
    end
endtask

task axil_read(input [11:0] fn, input [31:0] addr, output [31:0] data, output [1:0] resp);
    integer n;
    begin
        @(negedge clk);
        m_axil_araddr  = addr;
        m_axil_aruser  = {24'd0, fn, 19'd0};
        m_axil_arvalid = 1'b1;
        m_axil_rready  = 1'b1;
        n = 0;
        @(posedge clk);
        while (!m_axil_arready) begin
            n = n + 1;
            if (n > 5000) begin $display("  ERROR axil_read: no arready"); errors = errors + 1; end
            @(posedge clk);
        end
        @(negedge clk);
        m_axil_arvalid = 1'b0;
        m_axil_araddr  = 32'hDEAD_BEEF;
        @(posedge clk);
        while (!m_axil_rvalid) @(posedge clk);
        data = m_axil_rdata;
        resp = m_axil_rresp;
        @(negedge clk);
        m_axil_rready = 1'b0;
    end
endtask

// write that must succeed
task wr(input [11:0] fn, input [11:0] off, input [31:0] data);
    reg [1:0] r;
    begin
        axil_write(fn, {20'd0, off}, data, 4'hF, r);
        check_resp("write response", fn, r, OKAY);
    end
endtask

// read that must succeed and return exp
task rd_expect(input [8*48-1:0] what, input [11:0] fn, input [11:0] off, input [31:0] exp);
    reg [31:0] d;
    reg [1:0]  r;
    begin
        axil_read(fn, {20'd0, off}, d, r);
        check_resp(what, fn, r, OKAY);
        check32(what, fn, d, exp);
    end
endtask

task do_reset;
    begin
        rst_n = 1'b0;
        repeat (5) @(posedge clk);
        @(negedge clk);
        rst_n = 1'b1;
    end
endtask

task finish_tb;
    begin
        repeat (5) @(posedge clk);
        if (errors == 0)
            $display("PASS %0s (%0d checks, %0d cycles)", `TB_NAME, checks, cycle);
        else
            $display("FAIL %0s (%0d of %0d checks failed)", `TB_NAME, errors, checks);
        $finish;
    end
endtask

initial begin
    repeat (`TB_TIMEOUT_CYCLES) @(posedge clk);
    $display("FAIL %0s (timeout after %0d cycles, %0d errors so far)", `TB_NAME,
             `TB_TIMEOUT_CYCLES, errors);
    $finish;
end
