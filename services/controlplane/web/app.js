// Settings → Data Sources: a thin page over /api/v1 (see /api/v1/openapi.json). No build step, no framework.
// Everything shown comes from the API; errors are shown in the API's own words. Text is always set with
// textContent (never innerHTML), so nothing a vendor or a user typed can run as markup.
"use strict";

const TOKEN_KEY = "flash-token";
const SOURCES = {
  "salesforce": {
    endpoint: "https://yourdomain.my.salesforce.com",
    hint: "Your My Domain URL (Setup → My Domain), e.g. https://acme.my.salesforce.com.",
    creds: [["client_id", "Consumer key (client ID)", "text"], ["client_secret", "Consumer secret", "password"]],
  },
  "dynamics-ce": {
    endpoint: "https://yourorg.crm.dynamics.com",
    hint: "The environment URL of your Dataverse org, e.g. https://contoso.crm.dynamics.com.",
    creds: [["tenant_id", "Directory (tenant) ID", "text"], ["client_id", "Application (client) ID", "text"],
            ["client_secret", "Client secret", "password"]],
  },
  "dynamics-fo": {
    endpoint: "https://yourenv.operations.dynamics.com",
    hint: "The Finance & Operations environment URL, e.g. https://contoso.operations.dynamics.com.",
    creds: [["tenant_id", "Directory (tenant) ID", "text"], ["client_id", "Application (client) ID", "text"],
            ["client_secret", "Client secret", "password"]],
  },
};
const STATE_LABEL = {draft: "Draft", verified: "Verified", live: "Live", paused: "Paused", failed: "Failed"};

const $ = (sel) => document.querySelector(sel);
let me = null;
let selected = null;      // {tenant_id, connection_id}
let previewed = new Set(); // connections previewed in this tab
let statusTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function ago(iso) {
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (isNaN(s)) return iso;
  if (s < 10) return "just now";
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return when(iso);
}

function short(text, n = 90) {
  return text.length <= n ? text : text.slice(0, n - 1) + "…";
}

function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false && c !== ""));
}

function fmt(v) {
  if (v === null || v === undefined || v === "") return "—";
  if (typeof v === "number") return v.toLocaleString();
  return String(v);
}

function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

// ------------------------------------------------------------------------------------------ messages

function notify(text) {
  $("#notice-text").textContent = text;
  $("#notice").hidden = false;
}

function clearNotice() { $("#notice").hidden = true; }

function progress(text) { result = text || ""; showProgress(); }

// ----------------------------------------------------------------------------------------------- api

class ApiError extends Error {}

async function api(method, path, body) {
  const headers = {"Authorization": "Bearer " + sessionStorage.getItem(TOKEN_KEY)};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch("/api/v1" + path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    throw new ApiError("The control plane did not answer (" + e.message + "). Is `flash serve` running?");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) { signOut(); }
  if (!resp.ok) throw new ApiError((data && data.error && data.error.message) || ("HTTP " + resp.status));
  return data;
}

// Runs one API call with a progress line ("Verifying…") while it is pending; the last result message
// ("Replayed …") comes back when nothing is pending, so it survives the reloads that follow it. Calls may
// overlap. A failure is shown in the API's words.
const pending = [];
let result = "";
let lastError = "";

function showProgress() {
  $("#progress").textContent = pending.length ? pending[pending.length - 1] + "…" : result;
}

async function run(label, fn) {
  clearNotice();
  pending.push(label);
  showProgress();
  document.body.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (e) {
    lastError = e instanceof ApiError ? e.message : ("Unexpected problem: " + e.message);
    notify(lastError);
    return undefined;
  } finally {
    pending.splice(pending.indexOf(label), 1);
    showProgress();
    if (!pending.length) document.body.removeAttribute("aria-busy");
  }
}

// ------------------------------------------------------------------------------------------- sign in

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  const who = await run("Signing in", () => api("GET", "/me"));
  if (!who) { sessionStorage.removeItem(TOKEN_KEY); return; }
  me = who;
  $("#who-name").textContent = who.role === "operator" ? "Operator (all tenants)" : "Tenant " + who.tenant_id;
  $("#who").hidden = false;
  $("#sign-in").hidden = true;
  $("#app").hidden = false;
  $("#tenant-field").hidden = who.role !== "operator";
  $("#f-tenant").required = who.role === "operator";
  await Promise.all([loadConnections(), loadDeadLetters()]);
  $("#conn-title").focus?.();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  selected = null;
  clearInterval(statusTimer);
  previewed = new Set();
  for (const id of ["#detail", "#letter", "#add", "#edit", "#verify-result", "#preview"]) $(id).hidden = true;
  progress("");
  $("#app").hidden = true;
  $("#who").hidden = true;
  $("#sign-in").hidden = false;
  $("#token").value = "";
  $("#token").focus();
}

// --------------------------------------------------------------------------------------- connections

function badge(state) {
  return el("span", {class: "badge " + state}, STATE_LABEL[state] || state);
}

async function loadConnections() {
  const rows = await run("Loading connections", () => api("GET", "/connections"));
  if (!rows) return;
  const body = $("#connections tbody");
  body.replaceChildren(...rows.map((c) => el("tr", {"data-id": c.connection_id},
    el("th", {scope: "row"}, c.connection_id),
    el("td", {}, c.tenant_id),
    el("td", {}, c.source),
    el("td", {}, badge(c.state), c.last_error ? el("div", {class: "err-inline"}, short(c.last_error)) : null),
    el("td", {class: "mono"}, c.endpoint),
    el("td", {}, el("button", {type: "button", class: "secondary small", "aria-label": "Open " + c.connection_id,
      onclick: () => openConnection(c.tenant_id, c.connection_id)}, "Open")),
  )));
  $("#connections-empty").hidden = rows.length > 0;
  $("#connections").hidden = rows.length === 0;
}

function renderCredFields() {
  const spec = SOURCES[$("#f-source").value];
  $("#f-endpoint").placeholder = spec.endpoint;
  $("#f-endpoint-hint").textContent = spec.hint;
  $("#cred-fields").replaceChildren(...spec.creds.map(([name, label, type]) => el("div", {class: "field"},
    el("label", {for: "c-" + name}, label),
    el("input", {id: "c-" + name, name, type, required: true, autocomplete: "off", spellcheck: "false"}))));
}

function toggleAdd(open) {
  $("#add").hidden = !open;
  $("#add-open").setAttribute("aria-expanded", String(open));
  if (open) { renderCredFields(); (me.role === "operator" ? $("#f-tenant") : $("#f-id")).focus(); }
}

async function submitAdd(ev) {
  ev.preventDefault();
  const form = ev.target;
  const missing = [...form.querySelectorAll("input[required]")].filter((i) => !i.value.trim() && !i.closest("[hidden]"));
  if (missing.length) {
    notify("Please fill in: " + missing.map((i) => form.querySelector(`label[for="${i.id}"]`).textContent).join(", "));
    missing[0].focus();
    return;
  }
  let settings;
  try { settings = JSON.parse($("#f-settings").value.trim() || "{}"); } catch (e) {
    notify("Settings must be JSON, e.g. {\"poll_interval_s\": 30}: " + e.message);
    $("#f-settings").focus();
    return;
  }
  const credentials = {};
  for (const input of $("#cred-fields").querySelectorAll("input")) credentials[input.name] = input.value;
  const body = {connection_id: $("#f-id").value.trim(), source: $("#f-source").value,
                endpoint: $("#f-endpoint").value.trim(), credentials, settings};
  if (me.role === "operator") body.tenant_id = $("#f-tenant").value.trim();
  form.querySelectorAll("[aria-invalid]").forEach((i) => i.removeAttribute("aria-invalid"));
  const conn = await run("Saving", () => api("POST", "/connections", body));
  if (!conn) { markField(lastError); return; }
  for (const input of $("#cred-fields").querySelectorAll("input")) input.value = ""; // gone from the page too
  form.reset();
  $("#f-settings").value = "{}";
  toggleAdd(false);
  await loadConnections();
  await openConnection(conn.tenant_id, conn.connection_id);
  progress("Saved " + conn.connection_id + " as a draft. Next: Verify.");
}

// Point at the field the API's message is about (it names it first), so keyboard and screen-reader users
// land where the fix goes.
function markField(message) {
  const m = message.toLowerCase();
  const field = m.startsWith("endpoint") || m.includes("--endpoint") ? $("#f-endpoint")
    : m.startsWith("connection_id") || m.includes("connection id") ? $("#f-id")
    : m.includes("credentials") ? $("#cred-fields input")
    : m.startsWith("tenant_id") ? $("#f-tenant")
    : m.includes("settings") || m.includes("connection ") ? $("#f-settings") : null;
  if (field && !field.closest("[hidden]")) {
    field.setAttribute("aria-invalid", "true");
    field.setAttribute("aria-errormessage", "notice-text");
    field.focus();
  }
}

function path() { return `/connections/${encodeURIComponent(selected.tenant_id)}/${encodeURIComponent(selected.connection_id)}`; }

async function openConnection(tenant, id) {
  selected = {tenant_id: tenant, connection_id: id};
  $("#edit").hidden = true;
  $("#verify-result").hidden = true;
  $("#preview").hidden = true;
  $("#detail").hidden = false;
  await refreshStatus();
  $("#detail-title").focus();
  clearInterval(statusTimer);
  statusTimer = setInterval(() => { if (selected && !document.hidden) refreshStatus(true); }, 3000);
}

async function refreshStatus(quiet) {
  if (!selected) return;
  const key = selected.connection_id;
  const s = quiet ? await api("GET", path() + "/status").catch(() => null) : await run("Loading status", () => api("GET", path() + "/status"));
  if (!s || !selected || selected.connection_id !== key) return;
  $("#detail-title").textContent = s.connection_id;
  $("#detail-sub").replaceChildren(s.source + " · tenant " + s.tenant_id + " · ", badge(s.state));
  // The last error in full, unless the verify result just shown says it already.
  const showError = s.last_error && $("#verify-result").hidden;
  $("#last-error").hidden = !showError;
  $("#last-error").textContent = showError ? "Last error: " + s.last_error : "";
  const stats = [
    ["Last sync", s.last_sync ? ago(s.last_sync) : "not yet"],
    ["Behind by", s.lag_s === null ? "—" : Math.round(s.lag_s) + " s"],
    ["Orders landed", fmt((s.records || {}).orders)],
    ["Orders on members", s.order_match_rate === null || s.order_match_rate === undefined ? "—" : Math.round(s.order_match_rate * 100) + "%"],
    ["Waiting for a member", fmt((s.records || {}).parked_orders)],
    ["Customers", fmt((s.records || {}).customers)],
    ["Points in ledger", fmt(s.points_in_ledger)],
    ["Dead letters", fmt(s.dead_letter_depth)],
  ];
  $("#status").replaceChildren(...stats.flatMap(([k, v]) => [el("div", {class: "stat"}, el("dt", {}, k), el("dd", {}, v))]));
  $("#status").setAttribute("data-state", s.state);
  const step = {draft: 0, failed: 0, verified: 1, paused: 3, live: 3}[s.state] ?? 0;
  const reached = previewed.has(key) && step >= 1 ? Math.max(step, 2) : step;
  document.querySelectorAll(".steps li").forEach((li, i) => {
    li.classList.toggle("done", i <= reached);
    li.toggleAttribute("aria-current", i === reached);
  });
  const can = {edit: true, verify: true, "dry-run": true, "go-live": ["verified", "paused"].includes(s.state),
               pause: s.state === "live", resume: s.state === "paused", delete: true};
  document.querySelectorAll("#detail [data-act]").forEach((b) => {
    b.disabled = !can[b.dataset.act];
    b.hidden = (b.dataset.act === "resume" && s.state !== "paused") || (b.dataset.act === "pause" && s.state !== "live")
      || (b.dataset.act === "go-live" && ["live", "paused"].includes(s.state));
  });
}

async function act(action) {
  if (!selected) return;
  progress("");
  if (action === "verify") {
    const r = await run("Verifying " + selected.connection_id + " with the vendor", () => api("POST", path() + "/verify"));
    if (r) showVerify(r);
  } else if (action === "dry-run") {
    const r = await run("Previewing what would land (nothing is written)", () => api("POST", path() + "/dry-run?limit=5"));
    if (r) { previewed.add(selected.connection_id); showPreview(r); }
  } else if (action === "edit") {
    await openEdit();
    return;
  } else if (action === "delete") {
    if (!confirm("Delete " + selected.connection_id + "? Syncing stops and its cursors are removed.")) return;
    const r = await run("Deleting", () => api("DELETE", path()));
    if (r) { selected = null; $("#detail").hidden = true; clearInterval(statusTimer); await loadConnections(); progress("Deleted."); }
    return;
  } else {
    const verb = {"go-live": "Going live", pause: "Pausing", resume: "Resuming"}[action];
    const r = await run(verb, () => api("POST", path() + "/" + action));
    if (r) progress(r.connection_id + " is now " + (STATE_LABEL[r.state] || r.state) + ".");
    if (r && action === "go-live") { $("#verify-result").hidden = true; $("#preview").hidden = true; } // done with them
  }
  await refreshStatus(true);
  await loadConnections();
}

async function openEdit() {
  const form = $("#edit");
  if (!form.hidden) { closeEdit(); return; }
  const c = await run("Loading " + selected.connection_id, () => api("GET", path()));
  if (!c) return;
  $("#e-endpoint").value = c.endpoint;
  $("#e-settings").value = JSON.stringify(c.settings || {}, null, 2);
  const spec = SOURCES[c.source] || {creds: Object.keys(c.credentials || {}).map((k) => [k, k, "password"])};
  fill($("#edit-creds"), spec.creds.map(([name, label, type]) => el("div", {class: "field"},
    el("label", {for: "e-" + name}, label),
    el("input", {id: "e-" + name, name, type, autocomplete: "off", spellcheck: "false",
                 placeholder: c.credentials && name in c.credentials ? "stored (leave empty to keep)" : "not set"}))));
  form.hidden = false;
  document.querySelector('[data-act="edit"]').setAttribute("aria-expanded", "true");
  $("#e-endpoint").focus();
}

function closeEdit() {
  $("#edit").hidden = true;
  document.querySelector('[data-act="edit"]').setAttribute("aria-expanded", "false");
}

async function submitEdit(ev) {
  ev.preventDefault();
  let settings;
  try { settings = JSON.parse($("#e-settings").value.trim() || "{}"); } catch (e) {
    notify("Settings must be JSON: " + e.message);
    $("#e-settings").focus();
    return;
  }
  const credentials = {};
  for (const input of $("#edit-creds").querySelectorAll("input")) if (input.value) credentials[input.name] = input.value;
  const body = {endpoint: $("#e-endpoint").value.trim(), settings};
  if (Object.keys(credentials).length) body.credentials = credentials;
  const r = await run("Saving changes", () => api("PATCH", path(), body));
  for (const input of $("#edit-creds").querySelectorAll("input")) input.value = "";
  if (!r) return;
  closeEdit();
  $("#verify-result").hidden = true;
  $("#preview").hidden = true;
  progress(`Saved ${r.connection_id}: it is a draft again. Next: Verify.`);
  await refreshStatus(true);
  await loadConnections();
}

function checkItem(line) {
  // The kit's lines: "ok    auth: detail" or "FAIL  read salesorder: detail -> fix: what to do".
  const m = /^(ok|FAIL)\s+([^:]+):\s*(.*)$/s.exec(line);
  if (!m) return el("li", {}, line);
  const [detail, fix] = m[3].split(" -> fix: ");
  return el("li", {class: m[1] === "ok" ? "ok" : "bad"}, el("strong", {}, m[2]), " ", detail,
    fix ? el("div", {class: "fix"}, "To fix: " + fix) : null);
}

function showVerify(r) {
  const box = $("#verify-result");
  const report = r.report || {};
  let items = (r.lines || []).map(checkItem);
  if (!items.length && report.objects) {  // a connector not on the kit yet: {object: "ok ..."}
    items = Object.entries(report.objects).map(([k, v]) =>
      el("li", {class: String(v).startsWith("ok") ? "ok" : "bad"}, el("strong", {}, k), " ", String(v)));
  }
  const facts = Object.entries(report).filter(([k, v]) => !["objects", "checks", "ok", "connection_id"].includes(k)
    && v !== null && typeof v !== "object");
  box.className = "result " + (r.ok ? "ok" : "bad");
  fill(box,
    el("h3", {}, r.ok ? "Verified: the connection works" : "Verification failed"),
    r.ok || items.length ? null : el("p", {class: "err"}, r.error),
    items.length ? el("ul", {class: "checks"}, items) : null,
    facts.length ? el("dl", {class: "kv"}, facts.flatMap(([k, v]) => [el("dt", {}, k.replaceAll("_", " ")), el("dd", {}, fmt(v))])) : null,
  );
  box.hidden = false;
  progress(r.ok ? "Verified. Next: Preview (dry-run)." : "Verification failed: see what to fix below.");
}

function sampleRows(report) {
  const rows = [];
  const preview = report.preview || report.samples || {};
  for (const [entity, items] of Object.entries(preview)) {
    if (!Array.isArray(items)) continue;
    for (const item of items.slice(0, 3)) { // a few per entity keeps the table readable
      const events = item.events || [];
      if (!events.length) {
        rows.push({entity, id: item.source_id, type: item.dead ? "would be dead-lettered" : "no event",
                   what: item.dead ? String(item.dead) : "read, but nothing downstream needs it"});
      }
      for (const e of events) {
        const d = e.order || e.customer || e.product || e.line || e["return"] || e.data || {};
        let what = "";
        if (d.total_amount !== undefined) what = [d.order_number, d.total_amount + " " + (d.currency || ""), d.status_label || d.status, d.lifecycle].filter(Boolean).join(" · ");
        else if (d.return_number !== undefined || d.original_order_number !== undefined) what = [d.return_number, d.amount + " " + (d.currency || ""), "of order " + (d.original_order_number || d.original_order_source_id || "?"), d.lifecycle].filter(Boolean).join(" · ");
        else if (d.line_id !== undefined) what = [d.sku || d.description, "× " + d.quantity, d.amount].filter(Boolean).join(" · ");
        else if (d.kind) what = [d.kind, d.display_name, d.external_id ? "ID " + d.external_id : "", d.email].filter(Boolean).join(" · ");
        else if (d.sku !== undefined || d.name !== undefined) what = [d.sku, d.name, d.category].filter(Boolean).join(" · ");
        rows.push({entity, id: item.source_id || e.source_id, type: e.event_type, what, raw: e});
      }
    }
  }
  return rows;
}

function showPreview(r) {
  const s = r.summary || {};
  const box = $("#preview");
  const records = s.records || {};
  const events = s.events || {};
  const pct = (v) => (typeof v === "number" ? Math.round(v * 100) + "%" : fmt(v));
  const headline = [
    ["Records read", Object.values(records).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0)],
    ["Member match rate", s.match_rate ?? null, pct],
    ["Points that would be earned", s.points_earned ?? null],
    ["Points clawed back or voided", s.points_clawed_back ?? null],
    ["Would be dead-lettered", s.would_dead_letter ?? 0],
  ];
  const rep = r.report || {};
  const pointSamples = (rep.points && rep.points.samples) || [];
  const unresolved = (rep.members && rep.members.unresolved_samples) || [];
  const deadList = Array.isArray(rep.would_dead_letter) ? rep.would_dead_letter : [];
  const small = (caption, cols, rows) => rows.length ? el("table", {class: "grid compact"}, el("caption", {}, caption),
    el("thead", {}, el("tr", {}, cols.map(([, h]) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, rows.slice(0, 10).map((x) => el("tr", {}, cols.map(([k]) => el("td", {}, fmt(x[k]))))))) : null;
  const samples = sampleRows(r.report || {});
  fill(box,
    el("h3", {}, "Preview: what would land"),
    el("p", {class: "muted"}, "Read from the vendor just now. Nothing was written: no topic, ledger or cursor changed."),
    el("dl", {class: "stats"}, headline.map(([k, v, f]) => el("div", {class: "stat"}, el("dt", {}, k), el("dd", {}, (f || fmt)(v))))),
    el("div", {class: "two"},
      el("table", {class: "grid compact"}, el("caption", {}, "Records per entity"),
        el("thead", {}, el("tr", {}, el("th", {scope: "col"}, "Entity"), el("th", {scope: "col", class: "num"}, "Records"))),
        el("tbody", {}, Object.entries(records).map(([k, v]) => el("tr", {}, el("th", {scope: "row"}, k), el("td", {class: "num"}, fmt(v)))))),
      el("table", {class: "grid compact"}, el("caption", {}, "Events it becomes"),
        el("thead", {}, el("tr", {}, el("th", {scope: "col"}, "Event"), el("th", {scope: "col", class: "num"}, "Count"))),
        el("tbody", {}, Object.entries(events).map(([k, v]) => el("tr", {}, el("th", {scope: "row"}, k), el("td", {class: "num"}, fmt(v))))))),
    small("Points per sample order", [["source_id", "Order"], ["member_id", "Member"], ["kind", "Kind"], ["points", "Points"], ["reason", "Why"]], pointSamples),
    small("Orders that would wait for a member", [["entity", "Entity"], ["source_id", "Source id"], ["why", "Why"]], unresolved),
    small("Records that would be dead-lettered", [["stream", "Entity"], ["source_id", "Source id"], ["reason", "Reason"]], deadList),
    samples.length ? el("details", {open: true}, el("summary", {}, `Sample records (${samples.length})`),
      el("table", {class: "grid compact samples"}, el("caption", {class: "sr"}, "Sample records"),
      el("thead", {}, el("tr", {}, ["Entity", "Source id", "Becomes", "Details"].map((h) => el("th", {scope: "col"}, h)))),
      el("tbody", {}, samples.slice(0, 25).map((x) => el("tr", {},
        el("td", {}, x.entity), el("td", {class: "mono"}, fmt(x.id)), el("td", {}, x.type),
        el("td", {}, x.what || "", x.raw ? el("details", {}, el("summary", {}, "JSON"), el("pre", {}, JSON.stringify(x.raw, null, 2))) : null)))))) : null,
  );
  box.hidden = false;
  progress("Preview ready. When it looks right: Go live.");
}

// -------------------------------------------------------------------------------------- dead letters

async function loadDeadLetters() {
  const cls = $("#dlq-class").value.trim();
  const rows = await run("Loading dead letters", () => api("GET", "/dead-letters?limit=200" + (cls ? "&error_class=" + encodeURIComponent(cls) : "")));
  if (!rows) return;
  $("#dead-letters tbody").replaceChildren(...rows.map((d) => el("tr", {"data-letter": d.id},
    el("th", {scope: "row"}, d.id),
    el("td", {}, d.tenant_id || "—"),
    el("td", {}, d.consumer + " / " + d.stage),
    el("td", {}, el("strong", {}, d.error_class), el("div", {class: "msg"}, d.error_message)),
    el("td", {}, when(d.first_failed_at)),
    el("td", {class: "row-actions"},
      el("button", {type: "button", class: "secondary small", "aria-label": "Inspect dead letter " + d.id, onclick: () => inspect(d.id)}, "Inspect"),
      el("button", {type: "button", class: "primary small", "aria-label": "Replay dead letter " + d.id, onclick: () => replay(d.id)}, "Replay")),
  )));
  $("#dlq-empty").hidden = rows.length > 0;
  $("#dead-letters").hidden = rows.length === 0;
}

async function inspect(id) {
  const d = await run("Loading dead letter " + id, () => api("GET", "/dead-letters/" + id));
  if (!d) return;
  let body = d.value;
  try { body = JSON.stringify(JSON.parse(d.value), null, 2); } catch (e) { /* shown as it is */ }
  const box = $("#letter");
  fill(box,
    el("h3", {id: "letter-title"}, "Dead letter #" + d.id),
    el("dl", {class: "kv"}, [["Consumer", d.consumer], ["Tenant", d.tenant_id], ["Entity", d.entity], ["Error", d.error_class],
      ["Reason", d.error_message], ["Stage", d.stage], ["Attempts", d.attempts], ["Came from", `${d.source_topic} [${d.source_partition}] @ ${d.source_offset}`],
      ["First failed", when(d.first_failed_at)], ["Replayed", d.replayed_at ? when(d.replayed_at) : "not yet"]]
      .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, fmt(v))])),
    el("h4", {}, "Message body"), el("pre", {class: "body"}, body),
    el("div", {class: "actions"},
      el("button", {type: "button", class: "primary", onclick: () => replay(d.id), disabled: Boolean(d.replayed_at)}, "Replay #" + d.id),
      el("button", {type: "button", class: "secondary", onclick: () => { box.hidden = true; }}, "Close")),
  );
  box.hidden = false;
  box.focus();
}

async function replay(id) {
  progress("");
  const r = await run("Replaying dead letter " + id, () => api("POST", "/dead-letters/" + id + "/replay"));
  if (!r) return;
  progress(r.replayed ? `Replayed dead letter ${id}: it is back on its topic (audit #${r.id}).` : `Dead letter ${id} was already replayed.`);
  $("#letter").hidden = true;
  await loadDeadLetters();
  if (selected) await refreshStatus(true);
}

// ------------------------------------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("#sign-in-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("#token").value.trim()); });
  $("#sign-out").addEventListener("click", signOut);
  $("#notice-close").addEventListener("click", clearNotice);
  $("#refresh").addEventListener("click", () => { loadConnections(); if (selected) refreshStatus(); });
  $("#add-open").addEventListener("click", () => toggleAdd($("#add").hidden));
  $("#add-cancel").addEventListener("click", () => toggleAdd(false));
  $("#f-source").addEventListener("change", renderCredFields);
  $("#add-form").addEventListener("submit", submitAdd);
  $("#edit").addEventListener("submit", submitEdit);
  $("#edit-cancel").addEventListener("click", closeEdit);
  $("#dlq-refresh").addEventListener("click", loadDeadLetters);
  $("#dlq-class").addEventListener("keydown", (ev) => { if (ev.key === "Enter") loadDeadLetters(); });
  document.querySelectorAll("#detail [data-act]").forEach((b) => b.addEventListener("click", () => act(b.dataset.act)));
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !$("#add").hidden) toggleAdd(false); });
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) signIn(token); else signOut();
});
