// Status page: polls /api/status and /api/sessions (docs/status.md) and renders them. Read-only: GET requests only.
// Every text from a peer goes in as a text node (el() below), never as HTML.
"use strict";
(function () {
  const INTERVAL_MS = 2000;
  const SESSIONS_MS = 5000;
  const SESSIONS_SHOWN = 5;  // per charger; the rest is paged through /api/sessions
  const SOURCES = {
    backend: "backend (its charging profile)", site_fuse: "site fuse share", meter_headroom: "meter headroom",
    ems: "energy manager (EMS)", fallback: "fallback (meter stale)", charger_max: "charger maximum",
    config: "configuration (disabled)",
  };
  let updates = 0;
  let lastStatus = null;
  let sessionsByCharger = null;  // null: not loaded (or no log kept)

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function amps(value) { return value === null || value === undefined ? "–" : value.toFixed(1) + " A"; }
  function phases(list) { return list ? list.map((v, i) => `L${i + 1} ${amps(v)}`).join(", ") : "–"; }
  function age(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }
  function badge(text, kind) { return el("span", { class: `badge ${kind}`, "data-field": "state" }, text); }

  function row(list, term, value, field) {
    list.append(el("dt", {}, term), el("dd", field ? { "data-field": field } : {}, value));
  }

  function backendText(link) {
    if (link.state === "online") return link.queued_frames ? `online, replaying ${link.queued_frames} queued` : "online";
    if (link.state === "offline") {
      return `OFFLINE, ${link.queued_frames} frames queued` +
        (link.oldest_queued_age_seconds !== null ? `, oldest ${age(link.oldest_queued_age_seconds)}` : "");
    }
    if (link.state === "standalone") return "none (standalone: the proxy is its central system)";
    if (link.state === "draining") return `draining queue (${link.queued_frames} frames left)`;
    return link.queued_frames ? `not connected, ${link.queued_frames} frames queued` : "not connected";
  }

  function limitText(limit, connected) {
    if (limit && !connected) return `not connected; the fuse still counts ${amps(limit.reserved_a)} for it`;
    if (!limit || limit.amps === null) return "none in force";
    const by = SOURCES[limit.set_by] || limit.set_by || "unknown";
    return `${amps(limit.amps)}, set by ${by}`;
  }

  function charger(c) {
    const list = el("dl", {});
    const connectors = Object.entries(c.connectors || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    row(list, "OCPP", c.ocpp_version ? `${c.ocpp_version} (${c.subprotocol})` : (c.subprotocol || "–"), "ocpp");
    row(list, "Security", c.security_profile || "–", "security");
    row(list, "Backend", backendText(c.backend), "backend");
    row(list, "Status", connectors || c.state || "–", "status");
    row(list, "Transaction", c.transaction === null ? "–" : c.transaction ? "running" : "none", "transaction");
    row(list, "Limit", limitText(c.limit, c.connected), "limit");
    if (c.limit) {
      row(list, "Inputs", `local ${amps(c.limit.local_a)}, backend ${amps(c.limit.backend_a)}, ` +
        `EMS ${amps(c.limit.ems_a)}; reserved ${amps(c.limit.reserved_a)}`, "inputs");
    }
    row(list, "Currents", phases(c.currents_a), "currents");
    if (c.modbus) row(list, "Modbus", `${c.modbus.link.toUpperCase()} (${c.modbus.address}, ${c.modbus.map})`, "modbus");
    row(list, "Last error", c.last_error ? `${c.last_error.message} (${age(c.last_error.age_seconds)} ago)` : "none",
      "error");
    const up = c.connected;
    const state = up ? badge("connected", "ok") : badge(c.backend.state === "draining" ? "draining" : "disconnected", "bad");
    return el("article", { class: "card" + (up ? "" : " down"), "data-charger": c.id },
      el("h3", {}, el("span", {}, c.id), state, c.kind === "modbus" ? el("span", { class: "badge" }, "modbus") : null),
      list, sessionTable(c.id));
  }

  function when(stamp) {
    if (!stamp) return "–";
    const date = new Date(stamp);
    return isNaN(date.getTime()) ? String(stamp) : date.toLocaleString();
  }
  function kwh(wh) { return wh === null || wh === undefined ? "–" : `${(wh / 1000).toFixed(2)} kWh`; }

  function sessionTable(id) {
    const list = sessionsByCharger ? sessionsByCharger.get(id) || [] : null;
    if (list === null) return null;
    if (!list.length) return el("p", { class: "muted", "data-field": "sessions" }, "No sessions recorded.");
    const head = el("tr", {}, ...["Conn.", "ID tag", "Start", "Stop", "Energy", "Stop reason", "Signed"]
      .map((name) => el("th", { scope: "col" }, name)));
    const rows = list.map((s) => el("tr", { "data-session": String(s.number), "data-transaction": s.transaction || "" },
      el("td", {}, s.connector === null ? "–" : s.connector),
      el("td", {}, s.id_tag || "–"),
      el("td", {}, when(s.started)),
      el("td", {}, s.running ? el("span", { class: "badge ok" }, "running") : when(s.stopped)),
      el("td", {}, kwh(s.energy_wh)),
      el("td", {}, s.running ? "–" : (s.reason || "–")),
      el("td", {}, s.signed ? "yes" : "no")));
    return el("div", { class: "sessions", "data-field": "sessions" },
      el("table", {}, el("caption", {}, "Recent sessions"), el("thead", {}, head), el("tbody", {}, ...rows)));
  }

  function site(s) {
    const list = el("dl", {});
    row(list, "Limit", `${amps(s.limit_a)}` + (s.ems_limit_a !== null ? ` (EMS ${amps(s.ems_limit_a)}, ` +
      `config ${amps(s.config_limit_a)})` : ""), "site-limit");
    row(list, "Budget", phases(s.budget_a), "budget");
    row(list, "Reserved", phases(s.reserved_a), "reserved");
    row(list, "Meter", `${s.meter.state}` + (s.meter.currents_a ? `: ${phases(s.meter.currents_a)}` : "") +
      (s.meter.age_seconds !== null && s.meter.age_seconds !== undefined ? `, read ${age(s.meter.age_seconds)} ago` : ""),
      "meter");
    row(list, "House load", phases(s.house_load_a), "house");
    row(list, "Headroom", phases(s.headroom_a), "headroom");
    if (s.fallback) row(list, "Mode", "FALLBACK (meter stale)", "mode");
    if (s.over_budget) row(list, "Warning", "OVER BUDGET", "over");
    return list;
  }

  function renderChargers(data) {
    document.getElementById("chargers").replaceChildren(...data.chargers.map(charger));
  }

  function render(data) {
    lastStatus = data;
    document.getElementById("site-body").replaceChildren(data.site ? site(data.site)
      : el("p", {}, "No load management configured."));
    renderChargers(data);
    updates += 1;
    const stamp = document.getElementById("updated");
    stamp.dataset.updates = String(updates);
    stamp.textContent = `Updated ${new Date(data.generated_at).toLocaleTimeString()} (proxy ${data.proxy.version}); ` +
      `${data.chargers.filter((c) => c.connected).length} of ${data.chargers.length} chargers connected`;
    document.body.classList.remove("stale");
  }

  async function poll() {
    try {
      const response = await fetch("/api/status", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
    } catch (err) {
      document.body.classList.add("stale");
      document.getElementById("updated").textContent = `NOT UPDATED: ${err.message}; retrying`;
    }
    setTimeout(poll, INTERVAL_MS);
  }

  async function pollSessions() {
    try {
      const response = await fetch(`/api/sessions?per_charger=${SESSIONS_SHOWN}&limit=100`, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      if (data.log === "on") {
        const grouped = new Map();
        for (const s of data.sessions) {
          if (!grouped.has(s.charger)) grouped.set(s.charger, []);
          grouped.get(s.charger).push(s);
        }
        sessionsByCharger = grouped;
      } else {
        sessionsByCharger = null;
      }
      if (lastStatus) renderChargers(lastStatus);  // the cards again with their sessions (not a status update)
    } catch (err) {
      // the status poll reports trouble; sessions keep their last state
    }
    setTimeout(pollSessions, SESSIONS_MS);
  }

  poll();
  pollSessions();
})();
