// quotagate console: every figure and every action through the admin API (/admin/v1) with
// the token signed in with, as the CLI does; no second path. Text from the API is always set
// as text (never as HTML). The token lives in this tab's sessionStorage only.
"use strict";

const API = "/admin/v1";
const KEY = "quotagate-token";
let me = null;  // GET /me: {id, name, role, env}

// ------------------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function say(message, ok) {
  const box = document.getElementById("alert");
  box.className = ok ? "ok" : "";
  box.textContent = message || "";
}

class Refused extends Error {
  constructor(status, detail) { super(`Refused (${status}): ${detail}`); this.status = status; }
}

async function api(method, path, body) {
  const headers = {Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`};
  const init = {method, headers};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(API + path, init);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!resp.ok) {
    if (resp.status === 401) { sessionStorage.removeItem(KEY); me = null; }
    throw new Refused(resp.status, (data && data.detail) || text.slice(0, 300));
  }
  return data;
}

// An action: run it, say what came of it (the problem's detail when refused), then redraw.
async function act(what, run) {
  const buttons = [...document.querySelectorAll("main button")];
  buttons.forEach(b => { b.disabled = true; });  // one click, one call: no double purchase
  try {
    await run();
    say(`${what}: done.`, true);
  } catch (e) {
    say(e.message);
    buttons.forEach(b => { b.disabled = false; });
    return false;
  }
  await route(false);
  return true;
}

function table(columns, rows, caption) {
  return el("table", {},
    caption ? el("caption", {class: "muted", text: caption}) : null,
    el("thead", {}, el("tr", {}, columns.map(c => el("th", {scope: "col",
      class: c.num ? "num" : null, text: c.title})))),
    el("tbody", {}, rows.length ? rows.map(r => el("tr", {}, columns.map(c => {
      const v = c.cell ? c.cell(r) : r[c.key];
      return el("td", {class: c.num ? "num" : null}, v instanceof Node ? v : String(v ?? ""));
    }))) : el("tr", {}, el("td", {colspan: columns.length, class: "muted", text: "(none)"}))));
}

// A listing's query: the page's filters as given, and its cursor.
function pageQuery(params, filters) {
  const q = new URLSearchParams();
  for (const k of [...filters, "cursor"]) if (params.get(k)) q.set(k, params.get(k));
  return q;
}

// The link to the listing's next page (the same filters, the API's cursor), if any.
function nextLink(page, q, cursor, text) {
  if (!cursor) return [];
  const next = new URLSearchParams(q);
  next.set("cursor", cursor);
  return [el("a", {href: `${page}?${next}`, text})];
}

function field(label, input) { return el("label", {}, label, input); }

function select(name, options, value) {
  return el("select", {name}, options.map(o => el("option",
    {value: o.value ?? o, selected: (o.value ?? o) === value}, o.label ?? o)));
}

// To a page: by its hash, or drawn again when the hash is that already (no hashchange).
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function heading(text) { return el("h1", {tabindex: "-1", text}); }

const CAN = {  // what each role may do (the API decides; this only hides what it refuses)
  money: r => r === "billing" || r === "admin",
  settings: r => r === "support" || r === "admin",
  all: r => r !== "env",
};

// ------------------------------------------------------------------------------- pages

function loginPage(main) {
  const input = el("input", {type: "password", name: "token", id: "token", required: true,
                             autocomplete: "off", size: 50});
  main.append(heading("Sign in"),
    el("p", {}, "A token of the admin API: QUOTAGATE_ADMIN_TOKEN, or one made with ",
       el("code", {text: "quotagate token create"}), " (viewer, support, billing, admin, or an environment's own)."),
    el("form", {onsubmit: async ev => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      try {
        me = await api("GET", "/me");
        say("");
        go(me.role === "env" ? `#/env/${me.env}` : "#/envs");
      } catch (e) { sessionStorage.removeItem(KEY); say(e.message); }
    }}, field("Token", input), el("button", {type: "submit", text: "Sign in"})));
}

async function envsPage(main, params) {
  main.append(heading("Environments"));
  const byId = el("input", {name: "goto", id: "goto", placeholder: "shop-1a2b", size: 24});
  main.append(el("form", {onsubmit: ev => { ev.preventDefault();
    if (byId.value.trim()) go(`#/env/${byId.value.trim()}`); }},
    field("Open an environment by id", byId), el("button", {type: "submit", text: "Open"})));
  const state = select("state", [{value: "", label: "any"}, "active", "isolated",
                                 "released-pending", "not-started"], params.get("state") || "");
  const owner = select("owner", [{value: "", label: "any"}, "file", "api"],
                       params.get("owner") || "");
  const prefix = el("input", {name: "prefix", value: params.get("prefix") || "", size: 20});
  main.append(el("form", {onsubmit: ev => { ev.preventDefault();
    const q = new URLSearchParams();
    if (prefix.value.trim()) q.set("prefix", prefix.value.trim());
    if (state.value) q.set("state", state.value);
    if (owner.value) q.set("owner", owner.value);
    go(`#/envs?${q}`); }},
    field("Ids starting with", prefix), field("State", state), field("Owner", owner),
    el("button", {type: "submit", class: "secondary", text: "Search"})));
  const q = pageQuery(params, ["prefix", "state", "owner"]);
  const page = await api("GET", `/envs?${q}&limit=50`);
  main.append(table([
    {title: "Environment", cell: r => el("a", {href: `#/env/${r.env}`, text: r.env})},
    {title: "Owner", key: "owner"}, {title: "Plan", key: "plan"},
    {title: "Expires", key: "expires"}, {title: "Overage", cell: r => r.overage ? "on" : "off"},
  ], page.environments, "50 a page, in id order"));
  main.append(...nextLink("#/envs", q, page.next_cursor, "Next page →"));
}

function position(m, overage) {  // where the next unit is drawn from (the waterfall)
  if (m.plan_remaining > 0) return "plan";
  if (m.remaining > 0) return "packs";  // (capacity: room with packs, a gauge)
  return overage ? "pay-as-you-go" : "stopped (hard stop)";
}

function meterBar(m) {
  const pct = m.quota > 0 ? Math.min(100, Math.round(100 * m.used / m.quota)) : 0;
  const bar = el("span", {class: "bar"});
  bar.style.width = `${pct}%`;  // (CSSOM: the page's CSP allows no style attributes)
  return el("span", {}, el("span", {class: "barbox", role: "img",
    "aria-label": `${pct}% of the plan's quota`}, bar), `${pct}%`);
}

// A meter's use per day of the cycle: bars scaled to the busiest day, the figures themselves
// in a table under it (exactly as the API gives them).
function dayChart(m) {
  const top = Math.max(1, ...m.days.map(d => d.used));
  const total = m.days.reduce((a, d) => a + d.used, 0);
  const bars = el("div", {class: "days", role: "img", id: `days-${m.name}`,
    "aria-label": `${m.name} per day this cycle: ${total} ${m.unit} in ${m.days.length} days,`
      + ` at most ${total === 0 ? 0 : top} a day`},
    m.days.map(d => {
      const bar = el("span", {class: "day", title: `${d.date}: ${d.used} ${m.unit}`});
      bar.style.height = `${Math.max(0, Math.round(100 * d.used / top))}%`;
      return bar;
    }));
  const span = m.days.length ? `${m.days[0].date} to ${m.days[m.days.length - 1].date}` : "";
  return el("figure", {class: "chart"},
    el("figcaption", {}, `${m.name} per day this cycle (${m.unit})`), bars,
    el("p", {class: "muted", "aria-hidden": "true"},
       `${span} · ${total} in all · the busiest day ${total === 0 ? 0 : top}`),
    el("details", {}, el("summary", {text: `${m.name} per day as a table`}),
      table([{title: "Day", key: "date"}, {title: "Used", key: "used", num: true}], m.days)));
}

function packStatus(p, today) {
  if (!p.valid) return p.purchased > today ? "not started" : "expired";
  return p.remaining > 0 ? "active" : "used up";
}

function refundable(p, today) {  // SPEC: unused, within 7 days of its purchase
  const days = (Date.parse(today) - Date.parse(p.purchased)) / 86400000;
  return p.valid && p.used === 0 && days < 7;
}

async function envPage(main, envId) {
  const [usage, catalog] = await Promise.all([api("GET", `/envs/${envId}/usage`),
                                               api("GET", "/catalog")]);
  const role = me.role, today = usage.today;
  main.append(heading(`Environment ${envId}`));
  main.append(el("p", {},
    `Plan ${usage.plan} · owned by ${usage.owner === "api" ? "the API" : "environments.yaml"} · `
    + `cycle ${usage.cycle.start} to ${usage.cycle.end} · expires ${usage.expires} · QPS `
    + `${usage.qps_limit} (${usage.qps_limit_by}) · today ${today}`));
  if (CAN.all(role)) {
    main.append(el("p", {}, el("a", {href: `#/audit?env=${envId}`,
      text: "Audit trail of this environment"})));
  }

  // Enforcement (enforce, shadow, off) and overage (hard stop or pay-as-you-go)
  const MODES = {enforce: "enforce: refused past its limits",
                 shadow: "shadow: decided and counted, never refused",
                 off: "off: not decided nor counted"};
  main.append(el("h2", {text: "Mode"}),
    el("p", {id: "mode-text"}, `Enforcement is ${MODES[usage.mode]} (${usage.mode_by
      === "environment" ? "this environment's own" : "the gateway's default"}).`));
  if (role === "admin" && usage.owner === "api") {
    const mode = select("mode", [...Object.keys(MODES).map(m => ({value: m, label: m})),
      {value: "default", label: "the gateway's default"}],
      usage.mode_by === "environment" ? usage.mode : "default");
    main.append(el("form", {onsubmit: ev => { ev.preventDefault();
      act(`Mode ${mode.value}`, () => api("PUT", `/envs/${envId}/mode`, {mode: mode.value})); }},
      field("Enforcement", mode), el("button", {type: "submit", text: "Set mode"})));
  }
  main.append(
    el("p", {}, `Overage is ${usage.overage ? "on: past the quota it keeps working, billed "
      + "the next day" : "off: hard stop when the quota is used"}.`));
  if (CAN.settings(role) && usage.owner === "api") {
    main.append(el("button", {type: "button", onclick: () => act(
      `Overage ${usage.overage ? "off" : "on"}`,
      () => api("PUT", `/envs/${envId}/overage`, {overage: !usage.overage})),
      text: usage.overage ? "Turn overage off" : "Turn overage on"}));
  }

  // Meters this cycle
  main.append(el("h2", {text: "Usage this cycle"}));
  const meters = Object.entries(usage.meters).map(([name, m]) => ({name, ...m}));
  main.append(table([
    {title: "Meter", key: "name"}, {title: "Unit", key: "unit"},
    {title: "Quota", key: "quota", num: true}, {title: "Used", key: "used", num: true},
    {title: "Of the quota", cell: meterBar},
    {title: "Packs left", num: true, cell: m => m.packs.filter(p => p.valid)
      .reduce((a, p) => a + p.remaining, 0)},
    {title: "Pay-as-you-go", key: "payg", num: true},
    {title: "Drawing from", cell: m => position(m, usage.overage)},
  ], meters));
  // Per day: calls always, other meters once they used something this cycle.
  for (const m of meters) {
    if (m.days && (m.name === "calls" || m.days.some(d => d.used !== 0))) {
      main.append(dayChart(m));
    }
  }

  // Packs, as the seed's table
  main.append(el("h2", {text: "Resource packs"}));
  const packs = meters.flatMap(m => m.packs.map(p => ({meter: m.name, ...p})));
  main.append(table([
    {title: "ID", key: "id"}, {title: "Type", key: "meter"},
    {title: "Status", cell: p => packStatus(p, today)},
    {title: "Size", key: "amount", num: true}, {title: "Used", key: "used", num: true},
    {title: "Start", key: "purchased"}, {title: "Expiry", key: "expires"},
    {title: "Refund", cell: p => refundable(p, today) && CAN.money(role)
      ? el("button", {type: "button", class: "secondary", "aria-label": `Refund pack ${p.id}`,
          onclick: () => act(`Pack ${p.id} refunded`,
                             () => api("DELETE", `/envs/${envId}/packs/${p.id}`)),
          text: "Refund"})
      : el("span", {class: "muted", text: p.used > 0 ? "not refundable: used"
          : refundable(p, today) ? "" : "not refundable"})},
  ], packs));
  if (CAN.money(role)) {
    const pick = select("pack", catalog.resource_packs.map(p => ({value: p.pack,
      label: `${p.pack}: ${p.amount} ${p.meter}, ${p.days} days, ${p.price} ${catalog.currency}`})));
    const packId = `c${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    main.append(el("form", {onsubmit: ev => { ev.preventDefault();  // (sent again: refused)
      act(`Pack ${pick.value} bought`, () => api("POST", `/envs/${envId}/packs`,
                                                 {pack: pick.value, id: packId})); }},
      field("Pack", pick), el("button", {type: "submit", text: "Buy pack"})));
  }

  // Promo packs
  main.append(el("h2", {text: "Promo packs"}));
  const promos = await api("GET", `/envs/${envId}/promos`);
  main.append(table([{title: "Pack", key: "pack"}, {title: "From", key: "start"},
                     {title: "Days", key: "days", num: true}], promos.promos));
  if (CAN.money(role)) {
    const pick = select("promo", catalog.promo_packs.map(p => ({value: p.pack,
      label: `${p.pack}: ${p.price_per_day} ${catalog.currency} a day`})));
    const days = el("input", {type: "number", name: "days", min: 1, max: 366, value: 1});
    main.append(el("form", {onsubmit: ev => { ev.preventDefault();
      act(`Promo ${pick.value} bought`, () => api("POST", `/envs/${envId}/promos`,
        {pack: pick.value, days: Number(days.value)})); }},
      field("Promo pack", pick), field("Days from today", days),
      el("button", {type: "submit", text: "Buy promo"})));
  }

  // Gateway version: bought, renewed, changed (its price shown before it is confirmed)
  main.append(el("h2", {text: "Gateway version"}));
  const [gw, versions] = await Promise.all([api("GET", `/envs/${envId}/gateway`),
                                            api("GET", "/gateway/versions")]);
  const g = gw.gateway;
  main.append(el("p", {}, g ? `${g.version} (${g.state}), bought ${g.purchased}, runs to `
    + `${g.expires}, ${g.auto_renew ? `renewed automatically by ${g.renew_months} month(s)`
      : "renewed by hand"}; ${g.monthly_price} CNY a month; in effect: ${g.qps} QPS, `
    + `${g.mbps} Mbps` : "None bought: the plan's limits apply."));
  const terms = versions.terms.map(t => ({value: String(t), label: `${t} month(s)`}));
  const names = versions.versions.map(v => ({value: v.version,
    label: `${v.version}: ${v.qps} QPS, ${v.mbps} Mbps, ${v.monthly_price} CNY a month`}));
  if (CAN.money(role) && usage.owner === "api" && !g) {
    const version = select("version", names), months = select("months", terms);
    main.append(el("form", {onsubmit: ev => { ev.preventDefault();
      act(`Gateway ${version.value} bought`, () => api("POST", `/envs/${envId}/gateway`,
        {version: version.value, months: Number(months.value)})); }},
      field("Version", version), field("Term", months),
      el("button", {type: "submit", text: "Buy version"})));
  }
  if (g && usage.owner === "api") {
    if (CAN.money(role)) {
      const months = select("renew-months", terms);
      main.append(el("form", {onsubmit: ev => { ev.preventDefault();
        act("Gateway version renewed", () => api("POST", `/envs/${envId}/gateway/renew`,
          {months: Number(months.value)})); }},
        field("Renew by", months), el("button", {type: "submit", text: "Renew version"})));
      const target = select("change-version", names.filter(v => v.value !== g.version));
      const box = el("div", {class: "quote", "aria-live": "polite"});
      main.append(el("form", {onsubmit: async ev => {
        ev.preventDefault();
        box.replaceChildren();
        try {
          const q = await api("POST", `/envs/${envId}/gateway/change/quote`,
                              {version: target.value});
          box.append(el("p", {}, `${q.change} to ${q.version}: `, el("strong", {
            text: `${q.amount} ${q.currency}`}), ` ${q.change === "upgrade" ? "to pay"
            : "refunded"} (${q.days_left} days left)`),
            el("button", {type: "button", onclick: () => act(`Gateway changed to ${q.version}`,
              () => api("POST", `/envs/${envId}/gateway/change`, {version: q.version})),
              text: `Confirm: change to ${q.version} for ${q.amount} ${q.currency}`}));
        } catch (e) { say(e.message); }
      }}, field("Change to", target), el("button", {type: "submit", class: "secondary",
                                                     text: "Quote change"})), box);
    }
    if (CAN.settings(role)) {
      main.append(el("button", {type: "button", class: "secondary", onclick: () => act(
        `Auto-renewal ${g.auto_renew ? "off" : "on"}`, () => api("PUT",
          `/envs/${envId}/gateway/auto-renew`, {on: !g.auto_renew})),
        text: g.auto_renew ? "Turn auto-renewal off" : "Turn auto-renewal on"}));
    }
  }

  // Events and alerts
  main.append(el("h2", {text: "Events and alerts"}));
  const events = await api("GET", `/envs/${envId}/events?limit=20`);
  main.append(table([
    {title: "When (UTC)", cell: e => new Date(Number(e.id.split("-")[0])).toISOString()},
    {title: "Event", key: "type"},
    {title: "Details", cell: e => Object.entries(e).filter(([k]) =>
      !["id", "type", "env"].includes(k)).map(([k, v]) => `${k} ${v}`).join(", ")},
  ], events.events, "the 20 newest"));

  // Plan change: its quote first, then the change
  main.append(el("h2", {text: "Change plan"}));
  if (CAN.money(role) && usage.owner === "api") {
    const target = select("plan", catalog.plans.filter(p => p.plan !== usage.plan)
      .map(p => ({value: p.plan, label: `${p.plan} (${p.monthly_price ?? "per contract"})`})));
    const quoteBox = el("div", {class: "quote", "aria-live": "polite"});
    main.append(el("form", {onsubmit: async ev => {
      ev.preventDefault();
      quoteBox.replaceChildren();
      try {
        const q = await api("POST", `/envs/${envId}/plan/quote`, {plan: target.value});
        say("");
        const verb = q.change === "upgrade" ? "to pay" : "refunded";
        quoteBox.append(el("p", {id: "quote-text"}, `${q.change} to ${q.plan}: `,
          el("strong", {text: `${q.amount} ${q.currency}`}), ` ${verb} (${q.days_left} days left)`),
          q.allowed === false ? el("p", {text: "Not allowed now: over the target plan on "
            + (q.over_target || []).join(", ")}) :
          el("button", {type: "button", onclick: () => act(`Plan changed to ${q.plan}`,
            () => api("POST", `/envs/${envId}/plan`, {plan: q.plan})),
            text: `Confirm: change to ${q.plan} for ${q.amount} ${q.currency}`}));
      } catch (e) { say(e.message); }
    }}, field("New plan", target), el("button", {type: "submit", class: "secondary",
                                                 text: "Get quote"})), quoteBox);
  } else {
    main.append(el("p", {class: "muted", text: usage.owner === "api"
      ? "Plan changes need a billing token." : "Owned by environments.yaml: change the file."}));
  }

  // Bills
  main.append(el("h2", {text: "Daily bills"}));
  const day = el("input", {type: "date", name: "date", value: today});
  const billBox = el("div", {});
  const showBill = async () => {
    billBox.replaceChildren();
    try {
      const b = await api("GET", `/bills?date=${day.value}&env=${envId}`);
      const cols = ["env", "day", "meter", "quantity", "unit", "unit_price", "per", "amount"];
      const cell = v => /[",\n]/.test(String(v ?? "")) ? `"${String(v).replace(/"/g, '""')}"`
        : String(v ?? "");
      const csv = [cols.join(","), ...b.lines.map(l => cols.map(c => cell(l[c])).join(","))]
        .join("\n");
      if (billBox.dataset.url) URL.revokeObjectURL(billBox.dataset.url);
      billBox.append(table(cols.map(c => ({title: c, key: c,
        num: ["quantity", "unit_price", "amount"].includes(c)})), b.lines),
        el("p", {}, `Total ${b.total} ${b.currency} · `, el("a", {
          href: (billBox.dataset.url = URL.createObjectURL(new Blob(["\ufeff" + csv + "\n"],
            {type: "text/csv;charset=utf-8"}))),
          download: `bill-${envId}-${day.value}.csv`, text: "Download CSV"})));
    } catch (e) { say(e.message); }
  };
  main.append(el("form", {onsubmit: ev => { ev.preventDefault(); showBill(); }},
    field("Day", day), el("button", {type: "submit", class: "secondary", text: "Show bill"})),
    billBox);
  await showBill();
}

async function auditPage(main, params) {
  main.append(heading("Audit trail"));
  const inputs = {};
  for (const [k, label] of [["env", "Environment"], ["token", "Token id"], ["action", "Action"]]) {
    inputs[k] = el("input", {name: k, value: params.get(k) || "", size: 16});
  }
  for (const k of ["since", "until"]) {  // UTC days, as the API takes them
    inputs[k] = el("input", {name: k, type: "date", value: params.get(k) || ""});
  }
  main.append(el("form", {onsubmit: ev => { ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, i] of Object.entries(inputs)) if (i.value.trim()) q.set(k, i.value.trim());
    location.hash = `#/audit?${q}`; }},
    field("Environment", inputs.env), field("Token id", inputs.token),
    field("Action", inputs.action), field("From (UTC day)", inputs.since),
    field("Until (UTC day, not included)", inputs.until),
    el("button", {type: "submit", class: "secondary", text: "Filter"})));
  const q = pageQuery(params, ["env", "token", "action", "since", "until"]);
  const page = await api("GET", `/audit?${q}&limit=50`);
  main.append(table([
    {title: "When (UTC)", key: "at"}, {title: "Who", cell: e => `${e.actor_name} (${e.actor})`},
    {title: "Role", key: "role"}, {title: "Action", key: "action"},
    {title: "Environment", cell: e => e.env || e.envs || ""},
    {title: "Result", key: "status", num: true}, {title: "Request id", key: "request_id"},
  ], page.entries, "newest first"));
  main.append(...nextLink("#/audit", q, page.next_cursor, "Older →"));
}

// ------------------------------------------------------------------------------ routing

function drawNav() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  nav.replaceChildren();
  who.replaceChildren();
  if (!me) return;
  if (me.role === "env") {
    nav.append(el("a", {href: `#/env/${me.env}`, text: `Environment ${me.env}`}));
  } else {
    nav.append(el("a", {href: "#/envs", text: "Environments"}),
               el("a", {href: "#/audit", text: "Audit trail"}));
  }
  who.append(`${me.name} (${me.role}) `, el("button", {type: "button", class: "secondary",
    onclick: () => { sessionStorage.removeItem(KEY); me = null; say(""); go("#/login"); },
    text: "Sign out"}));
}

async function route(focus = true) {
  const main = document.getElementById("main");
  const [path, query] = (location.hash.slice(1) || "/login").split("?");
  const params = new URLSearchParams(query || "");
  if (!me && sessionStorage.getItem(KEY)) {
    try { me = await api("GET", "/me"); } catch (e) { say(e.message); }
  }
  drawNav();
  main.replaceChildren();
  if (!me) {
    loginPage(main);
  } else {
    try {
      const env = path.match(/^\/env\/([a-z0-9][a-z0-9-]{0,62})$/);
      if (env) await envPage(main, env[1]);
      else if (path === "/audit") await auditPage(main, params);
      else if (path === "/envs") await envsPage(main, params);
      else { go(me.role === "env" ? `#/env/${me.env}` : "#/envs"); return; }
    } catch (e) {
      say(e.message);
    }
  }
  if (focus) {
    const h = main.querySelector("h1");
    (h || main).focus();
  }
  document.title = `${(main.querySelector("h1") || {}).textContent || "quotagate"} · quotagate console`;
}

window.addEventListener("hashchange", () => {
  if (location.hash === "#main") return;  // the skip link: to the content, not a page
  say("");
  route();
});
window.addEventListener("DOMContentLoaded", () => route());
