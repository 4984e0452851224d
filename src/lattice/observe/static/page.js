// The node's web page: polls /api/state and draws it. Text from the network goes in through
// textContent only (never innerHTML), so a peer's agent string cannot inject markup.
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = ["#7dd3fc", "#f472b6", "#a3e635", "#facc15", "#c084fc", "#fb923c"];
let prev = null;

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}
function short(id) { return id.slice(0, 6) + ".." + id.slice(-6); }
function setText(id, text) { document.getElementById(id).textContent = text; }
function row(cells, cls) {
  const tr = el("tr");
  cells.forEach((c, i) => tr.appendChild(el("td", cls && cls[i] ? {class: cls[i]} : {}, String(c))));
  return tr;
}

function drawGraph(s) {
  const svg = document.getElementById("graph");
  svg.replaceChildren();
  const cx = 200, cy = 200, r = 160, peers = s.peers;
  const maxTraffic = Math.max(1, ...peers.map(p => p.bytes_in + p.bytes_out));
  peers.forEach((p, i) => {
    const a = 2 * Math.PI * i / Math.max(1, peers.length) - Math.PI / 2;
    const x = cx + r * Math.cos(a), y = cy + r * Math.sin(a);
    const color = p.path === "relayed" ? "#fb923c" : p.connected ? "#4ade80" : "#64748b";
    svg.appendChild(el("svg:line", {x1: cx, y1: cy, x2: x, y2: y, stroke: color, "stroke-width": 1.5,
      "stroke-dasharray": p.connected ? "" : "4 3"}));
    const size = 5 + 9 * Math.sqrt((p.bytes_in + p.bytes_out) / maxTraffic);
    const dot = el("svg:circle", {cx: x, cy: y, r: size, fill: color, class: "peer-node"});
    dot.appendChild(el("svg:title", {}, p.peer_id + " " + (p.path || "dht only")));
    svg.appendChild(dot);
    svg.appendChild(el("svg:text", {x: x + size + 2, y: y + 3}, p.peer_id.slice(-6)));
  });
  svg.appendChild(el("svg:circle", {cx, cy, r: 14, fill: "#7dd3fc", id: "self-node"}));
  svg.appendChild(el("svg:text", {x: cx - 12, y: cy + 28}, "this node"));
}

function drawPeers(s) {
  const dt = prev ? s.time - prev.time : 0;
  const old = new Map((prev ? prev.peers : []).map(p => [p.peer_id, p]));
  const body = document.getElementById("peers");
  body.replaceChildren();
  const rows = [...s.peers].sort((a, b) => (b.bytes_in + b.bytes_out) - (a.bytes_in + a.bytes_out));
  for (const p of rows) {
    const o = old.get(p.peer_id);
    const rate = o && dt > 0 ? bytes((p.bytes_in - o.bytes_in) / dt) + "/s" : "-";
    const tr = row([short(p.peer_id), p.path || "dht only", p.reachability,
                    p.rtt_ms === null ? "" : p.rtt_ms.toFixed(2), bytes(p.bytes_in), bytes(p.bytes_out),
                    rate, p.in_dht ? "yes" : ""],
                   ["mono", p.path || "none"]);
    tr.title = p.peer_id + (p.agent ? " (" + p.agent + ")" : "");
    body.appendChild(tr);
  }
}

function drawTraffic(s) {
  const body = document.getElementById("protocols");
  body.replaceChildren();
  const names = [...new Set([...Object.keys(s.traffic_in), ...Object.keys(s.traffic_out)])].sort();
  for (const n of names) body.appendChild(row([n, bytes(s.traffic_in[n] || 0), bytes(s.traffic_out[n] || 0)],
                                              ["mono"]));
  const svc = document.getElementById("services");
  svc.replaceChildren();
  if (s.dht) {
    const lat = Object.entries(s.dht.latency).map(([op, v]) =>
      op + " " + v.count + "x " + (1000 * v.sum_s / Math.max(1, v.count)).toFixed(1) + " ms").join(", ");
    svc.appendChild(row(["dht", "table " + s.dht.routing_table + ", records " + s.dht.records +
                         ", in " + (s.dht.requests_in || 0) + ", out " + (s.dht.requests_out || 0)]));
    if (lat) svc.appendChild(row(["dht latency", lat]));
  }
  if (s.rpc) svc.appendChild(row(["rpc", "calls in " + s.rpc.calls_in + ", out " + s.rpc.calls_out +
                                  ", errors " + (s.rpc.errors_in + s.rpc.errors_out)]));
  if (s.crdt) svc.appendChild(row(["crdt", "applied " + s.crdt.applied + ", pushed " + s.crdt.pushed]));
  if (s.limits) svc.appendChild(row(["limits", "banned " + s.limits.banned + " (total " +
      s.limits.bans_total + "), refused connections " + s.limits.refused_connections +
      ", throttled " + Object.values(s.limits.throttled).reduce((a, b) => a + b, 0)]));
  drawBudgets(s.resources, svc);
}

// The resource manager's budgets (docs/operators.md, "Limits and budgets"): use against limits,
// the heaviest peers and prefixes, refusals by scope. Peer ids and prefixes are remote text: textContent.
function drawBudgets(r, svc) {
  if (!r) return;
  const n = r.node;
  const pct = (a, b) => b ? " (" + Math.round(100 * a / b) + " %)" : "";
  svc.appendChild(row(["budget: memory", bytes(n.memory) + " of " + bytes(n.memory_limit) +
                       pct(n.memory, n.memory_limit) + ", peak " + bytes(n.peak_memory)]));
  svc.appendChild(row(["budget: slots", "connections " + n.connections + "/" + n.connections_limit +
                       ", streams " + n.streams + "/" + n.streams_limit + ", pending handshakes " +
                       n.pending_handshakes + "/" + n.pending_handshakes_limit]));
  for (const p of r.peers.slice(0, 4)) {
    if (p.memory) svc.appendChild(row(["  peer " + short(p.name), bytes(p.memory) + ", " + p.streams +
                                       " streams" + (p.refused ? ", refused " + p.refused : "")], ["", "mono"]));
  }
  for (const p of r.prefixes.slice(0, 4)) {
    if (p.memory || p.pending_handshakes) svc.appendChild(row(["  prefix " + p.name, bytes(p.memory) +
        ", " + p.connections + " connections, " + p.pending_handshakes + " pending"], ["", "mono"]));
  }
  const refused = Object.entries(r.refusals).map(([k, v]) => k + " " + v).join(", ");
  svc.appendChild(row(["budget: refused", (refused || "none") + "; evicted handshakes " +
                       r.evicted_handshakes + ", dropped replies " + r.dropped_replies]));
}

function drawPanels(s) {
  const box = document.getElementById("panels");
  if (!s.panels.length) return;
  box.replaceChildren();
  for (const panel of s.panels) {
    const div = el("div", {class: "panel", "data-panel": panel.name});
    div.appendChild(el("h2", {}, panel.title + (panel.unit ? " (" + panel.unit + ")" : "")));
    const all = Object.values(panel.series).flat();
    if (all.length) {
      const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
      const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
      const svg = el("svg:svg", {viewBox: "0 0 400 140", width: "100%"});
      Object.entries(panel.series).forEach(([name, pts], i) => {
        const d = pts.map(([x, y]) => (10 + 380 * (x - x0) / Math.max(1e-9, x1 - x0)).toFixed(1) + "," +
                                    (130 - 120 * (y - y0) / Math.max(1e-9, y1 - y0)).toFixed(1)).join(" ");
        svg.appendChild(el("svg:polyline", {points: d, fill: "none", stroke: COLORS[i % COLORS.length],
                                            "stroke-width": 1.5}));
        const last = pts[pts.length - 1];
        svg.appendChild(el("svg:text", {x: 12, y: 12 + 12 * i, fill: COLORS[i % COLORS.length]},
                           name + ": " + (last ? last[1].toPrecision(4) : "")));
      });
      div.appendChild(svg);
    }
    for (const [k, v] of Object.entries(panel.texts)) div.appendChild(el("div", {}, k + ": " + v));
    box.appendChild(div);
  }
}

async function refresh() {
  try {
    const reply = await fetch("/api/state", {cache: "no-store"});
    const s = await reply.json();
    setText("peer-count", s.swarm_size);
    setText("connected-count", s.connected_peers);
    setText("swarm", s.swarm || "-");
    setText("roles", s.roles.length ? "(" + s.roles.join(", ") + ")" : "");
    setText("reachability", s.reachability);
    setText("uptime", Math.round(s.uptime_s) + " s");
    setText("peer-id", s.peer_id);
    setText("err", "");
    document.title = "lattice-node: " + s.swarm_size + " peers";
    drawGraph(s); drawPeers(s); drawTraffic(s); drawPanels(s);
    document.body.dataset.loaded = "1";
    prev = s;
  } catch (e) {
    setText("err", "cannot reach the node: " + e);
  }
}
const interval = Number(new URLSearchParams(location.search).get("interval")) || 2000;
refresh();
setInterval(refresh, Math.max(250, interval));
