// The oemrelay operator console.  Plain JavaScript, no library, no build.
//
// Safe by construction: every text from the relay or a device is put into
// the page with textContent (the el() helper), never as markup.  The API
// token lives in sessionStorage and travels only in the Authorization
// header, never in a URL; the live stream is read with fetch() for that
// reason (EventSource cannot send headers).
"use strict";

const TOKEN_KEY = "oemrelay.token";
const page = () => document.getElementById("page");
let stopPage = () => {};

// -- helpers ---------------------------------------------------------------

// An element with attributes and children; strings become text nodes.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "on") {
      for (const [event, listener] of Object.entries(value)) node.addEventListener(event, listener);
    } else if (value !== false && value !== null && value !== undefined) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Each route is one generation.  A page that finishes loading after the
// user moved on must neither draw over the new page nor keep its timers:
// every page takes its own `show` from pageShow() when it starts, and that
// `show` does nothing once the route has changed.
let routeGeneration = 0;

function pageShow() {
  const generation = routeGeneration;
  return (...nodes) => {
    if (generation === routeGeneration) page().replaceChildren(...nodes);
  };
}

function isCurrent(generation) {
  return generation === routeGeneration;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, contentType = "application/json") {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = contentType;
    init.body = contentType === "application/json" ? JSON.stringify(body) : body;
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    signOut("The token was refused: wrong token.");
    throw new ApiError(401, "wrong token");
  }
  const type = response.headers.get("content-type") || "";
  const answer = type.startsWith("application/json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, answer.error || String(answer));
  return answer;
}

function when(value) {
  return value ? value.replace("T", " ").replace("Z", " UTC") : "never";
}

function errorLine(error) {
  return el("p", { class: "error", role: "alert" }, error.message);
}

function table(headings, rows, attributes = {}) {
  return el("table", attributes,
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

// -- sign in ----------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopPage();
  document.getElementById("nav").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message || "";
  page().replaceChildren();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value);
  try {
    await api("GET", "/api/fleet");
  } catch (error) {
    if (error.status !== 401) signOut("Cannot reach the relay: " + error.message);
    return;
  }
  input.value = "";
  document.getElementById("signin").hidden = true;
  document.getElementById("nav").hidden = false;
  route();
}

// -- fleet ------------------------------------------------------------------

function figure(label, value, id) {
  // A count is big; a sentence (no spool, an error) is shown as a note.
  const kind = typeof value === "number" || /^[0-9+]+$/.test(String(value)) ? "figure" : "figure note";
  return el("div", { class: "card" }, el("div", { class: "muted" }, label),
    el("div", { class: kind, id }, value));
}

function counts(object) {
  const entries = Object.entries(object || {});
  if (!entries.length) return el("span", { class: "muted" }, "none");
  return el("ul", {}, entries.map(([name, n]) => el("li", {}, `${name}: ${n}`)));
}

async function fleetPage() {
  const show = pageShow();
  const render = async () => {
    let fleet, dead;
    try {
      fleet = await api("GET", "/api/fleet?minutes=15");
    } catch (error) {
      show(errorLine(error));
      return;
    }
    try {
      const answer = await api("GET", "/api/deadletters?limit=1000");
      dead = String(answer.deadletters.length) + (answer.next ? "+" : "");
    } catch (error) {
      dead = error.status === 404 ? "no dead letters (spool not configured)" : error.message;
    }
    const activity = fleet.activity || {};
    show(
      el("h2", {}, "Fleet"),
      el("div", { class: "grid", id: "fleet" },
        figure("Devices connected now", fleet.registry.connected, "fleet-connected"),
        figure("Devices known", fleet.registry.devices, "fleet-devices"),
        figure("Devices failing", fleet.registry.failing, "fleet-failing"),
        figure("Uploads committed (15 min)", activity.uploads_committed ?? "-", "fleet-uploads"),
        figure("Records committed (15 min)", activity.records_committed ?? "-", "fleet-records"),
        figure("Dead letters", dead, "fleet-deadletters")),
      el("div", { class: "grid" },
        el("div", { class: "card" }, el("h3", {}, "Commits withheld, by reason"), counts(activity.withheld)),
        el("div", { class: "card" }, el("h3", {}, "End-server errors, by connector"), counts(activity.end_server_errors)),
        el("div", { class: "card" }, el("h3", {}, "Spool"),
          activity.spool ? counts(activity.spool) : el("span", { class: "muted" }, "spool not configured")),
        el("div", { class: "card" }, el("h3", {}, "Relay nodes (connected devices)"), counts(fleet.registry.nodes))),
      el("p", { class: "muted" }, "Refreshed every 5 seconds."));
  };
  await render();
  const timer = setInterval(render, 5000);
  return () => clearInterval(timer);
}

// -- devices ----------------------------------------------------------------

function deviceRow(device) {
  return el("tr", { "data-serial": device.serial },
    el("td", {}, el("a", { href: "#device/" + device.serial }, device.serial)),
    el("td", {}, device.imei ?? ""),
    el("td", {}, device.iccid ?? ""),
    el("td", {}, device.connected ? "yes" : "no"),
    el("td", {}, when(device.last_seen)),
    el("td", {}, device.custom1),
    el("td", { class: "error" }, device.last_error ?? ""));
}

async function devicesPage(params) {
  const show = pageShow();
  const search = el("input", { id: "search", type: "search", placeholder: "serial, IMEI, ICCID or custom field", size: 36, value: params.get("q") || "" });
  const connected = el("input", { id: "f-connected", type: "checkbox" });
  const failing = el("input", { id: "f-failing", type: "checkbox" });
  const silent = el("input", { id: "f-silent", type: "number", min: 1, placeholder: "hours", size: 6 });
  const sort = el("select", { id: "sort" }, el("option", { value: "serial" }, "serial"), el("option", { value: "last_seen" }, "last seen"));
  const status = el("p", { id: "devices-status", class: "muted" });
  const body = el("tbody", {});
  const more = el("button", { type: "button", id: "next", hidden: true }, "More");
  let next = null;

  const query = (page) => {
    const q = new URLSearchParams({ limit: "50" });
    if (search.value.trim()) q.set("q", search.value.trim());
    if (connected.checked) q.set("connected", "true");
    if (failing.checked) q.set("failing", "true");
    if (silent.value) q.set("silent_hours", silent.value);
    q.set("sort", sort.value);
    if (page !== null) q.set(sort.value === "serial" ? "after" : "offset", page);
    return q;
  };
  const load = async (append) => {
    const started = performance.now();
    try {
      const answer = await api("GET", "/api/devices?" + query(append ? next : null));
      next = answer.next;
      const rows = answer.devices.map(deviceRow);
      if (append) body.append(...rows); else body.replaceChildren(...rows);
      more.hidden = next === null;
      status.className = "muted";
      status.textContent = `${body.children.length} shown in ${Math.round(performance.now() - started)} ms`;
    } catch (error) {
      status.className = "error";
      status.textContent = error.message;
    }
  };
  const reload = () => load(false);
  for (const input of [connected, failing, sort]) input.addEventListener("change", reload);
  silent.addEventListener("change", reload);
  search.addEventListener("keydown", (event) => { if (event.key === "Enter") reload(); });
  more.addEventListener("click", () => load(true));
  show(el("h2", {}, "Devices"),
    el("div", { class: "filters" },
      search, el("button", { type: "button", id: "search-go", on: { click: reload } }, "Search"),
      el("label", {}, connected, " connected"),
      el("label", {}, failing, " failing"),
      el("label", {}, "silent for more than ", silent, " hours"),
      el("label", {}, "sort by ", sort)),
    status,
    table(["Serial", "IMEI", "ICCID", "Connected", "Last seen", "Custom 1", "Last error"], [], { id: "devices" }),
    more);
  document.querySelector("#devices tbody").replaceWith(body);
  await reload();
}

// -- one device ---------------------------------------------------------------

let commandSchemas = null;

async function commandTypes() {
  if (commandSchemas === null) {
    const document = await api("GET", "/api/openapi.json");
    const schemas = document.components.schemas;
    commandSchemas = Object.keys(schemas).filter((n) => n.startsWith("Command_"))
      .map((n) => [n.slice("Command_".length), schemas[n]]);
  }
  return commandSchemas;
}

function commandForm(serial, onQueued) {
  const holder = el("div", { id: "command-form" });
  const status = el("p", { id: "command-status" });
  commandTypes().then((types) => {
    const select = el("select", { id: "command-type" }, types.map(([name]) => el("option", { value: name }, name)));
    const fields = el("div", { class: "filters" });
    const draw = () => {
      const schema = Object.fromEntries(types)[select.value];
      const properties = Object.entries(schema.properties || {}).filter(([name]) => name !== "type");
      fields.replaceChildren(...properties.map(([name, property]) =>
        el("label", {}, name + " ", el("input", {
          name, "data-kind": property.type || "string",
          placeholder: property.description || "", title: property.description || "",
        }))));
    };
    select.addEventListener("change", draw);
    draw();
    const send = async (event) => {
      event.preventDefault();
      const body = { type: select.value };
      for (const input of fields.querySelectorAll("input")) {
        if (input.value === "") continue;
        const kind = input.dataset.kind;
        body[input.name] = kind === "integer" || kind === "number" ? Number(input.value)
          : kind === "boolean" ? input.value === "true"
          : kind === "object" || kind === "array" ? JSON.parse(input.value) : input.value;
      }
      try {
        const command = await api("POST", `/api/devices/${serial}/commands`, body);
        status.className = "ok";
        status.textContent = `queued as command ${command.id}`;
        onQueued();
      } catch (error) {
        status.className = "error";
        status.textContent = error.message;
      }
    };
    holder.replaceChildren(el("form", { on: { submit: send } }, select, fields,
      el("button", { type: "submit", id: "command-send" }, "Queue command")), status);
  }).catch((error) => holder.replaceChildren(errorLine(error)));
  return holder;
}

function liveView(serial) {
  const list = el("ul", { id: "live-events" });
  const state = el("span", { id: "live-state", class: "muted" }, "not watching");
  let reader = null;
  const add = (kind, text) => {
    list.prepend(el("li", { "data-kind": kind }, el("span", { class: "kind" }, kind), text));
    while (list.children.length > 500) list.lastChild.remove();
  };
  const describe = (event) => {
    switch (event.type) {
      case "upload": return `${event.records} records from seq ${event.first_seq}\n${JSON.stringify(event.json, null, 1)}`;
      case "trace": return `seq ${event.seq} code ${event.code}: ${event.text}`;
      case "commit": return `${event.records} records committed after ${event.seconds} s`;
      case "withheld": return `${event.kind}: ${event.reason}`;
      case "dropped": return `${event.count} events left out (too many)`;
      default: return JSON.stringify(event);
    }
  };
  const start = async () => {
    if (reader) return;
    const response = await fetch(`/api/devices/${serial}/live`, {
      headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) },
    });
    if (!response.ok) {
      state.textContent = "cannot watch: " + ((await response.json()).error || response.status);
      return;
    }
    state.textContent = "watching";
    reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = message.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (!data) continue;
          const event = JSON.parse(data);
          add(event.type, describe(event));
        }
      }
    } catch (error) { /* stopped */ }
    reader = null;
    state.textContent = "not watching";
  };
  const stop = () => { if (reader) reader.cancel(); };
  const minutes = el("input", { id: "record-minutes", type: "number", min: 1, max: 60, value: 5, size: 4 });
  const recordStatus = el("span", { id: "record-status" });
  const record = async () => {
    try {
      const recording = await api("POST", `/api/devices/${serial}/recordings`, { minutes: Number(minutes.value) });
      recordStatus.className = "ok";
      recordStatus.textContent = `recording ${recording.id} until ${when(recording.ends)}`;
    } catch (error) {
      recordStatus.className = "error";
      recordStatus.textContent = error.message;
    }
  };
  const node = el("div", { class: "card" }, el("h3", {}, "Live view"),
    el("div", { class: "filters" },
      el("button", { type: "button", id: "live-start", on: { click: start } }, "Watch"),
      el("button", { type: "button", id: "live-stop", on: { click: stop } }, "Stop"), state,
      el("label", {}, "record for ", minutes, " minutes"),
      el("button", { type: "button", id: "record", on: { click: record } }, "Record"), recordStatus),
    list);
  return { node, stop };
}

// onChange(outcome) reloads the table; the outcome ({ok, text}) of the last
// action is shown above the reloaded one, so it outlives the reload.
async function deadLetterTable(query, onChange, outcome) {
  let answer;
  try {
    answer = await api("GET", "/api/deadletters?" + query);
  } catch (error) {
    if (error.status === 404) return el("p", { class: "muted", id: "deadletters-none" }, "no dead letters (spool not configured)");
    return errorLine(error);
  }
  const status = el("p", { id: "deadletters-status" });
  if (outcome) {
    status.className = outcome.ok ? "ok" : "error";
    status.textContent = outcome.text;
  }
  if (!answer.deadletters.length) {
    return el("div", {}, status, el("p", { class: "muted", id: "deadletters-none" }, "no dead letters"));
  }
  const act = async (ids, method, suffix) => {
    const failures = [];
    for (const id of ids) {
      try { await api(method, `/api/deadletters/${encodeURIComponent(id)}${suffix}`); } catch (error) { failures.push(`${id}: ${error.message}`); }
    }
    onChange({ ok: !failures.length, text: failures.length ? failures.join("\n") : `${ids.length} done` });
  };
  const rows = answer.deadletters.map((letter) => el("tr", {},
    el("td", {}, el("input", { type: "checkbox", "data-id": letter.id })),
    el("td", {}, letter.id), el("td", {}, letter.serial), el("td", {}, letter.connector),
    el("td", {}, letter.records), el("td", { class: "error" }, letter.reason),
    el("td", {}, letter.attempts), el("td", {}, when(letter.received_at)), el("td", {}, when(letter.dead_at)),
    el("td", {},
      el("button", { type: "button", on: { click: () => act([letter.id], "POST", "/retry") } }, "Retry"),
      el("button", { type: "button", on: { click: () => act([letter.id], "DELETE", "") } }, "Discard"))));
  const checked = () => [...document.querySelectorAll("#deadletters input[data-id]:checked")].map((c) => c.dataset.id);
  return el("div", {},
    table(["", "Id", "Serial", "Connector", "Records", "Reason", "Attempts", "Received", "Dead since", ""], rows, { id: "deadletters" }),
    el("button", { type: "button", on: { click: () => act(checked(), "POST", "/retry") } }, "Retry selected"),
    el("button", { type: "button", on: { click: () => act(checked(), "DELETE", "") } }, "Discard selected"),
    status);
}

async function devicePage(serial) {
  const show = pageShow();
  let device;
  try {
    device = await api("GET", "/api/devices/" + serial);
  } catch (error) {
    show(errorLine(error));
    return;
  }
  const identity = [
    ["Serial", device.serial], ["IMEI", device.imei ?? ""], ["ICCID", device.iccid ?? ""],
    ["Product", device.product_id ?? ""], ["Firmware", device.firmware ?? ""],
    ["Connected now", device.connected ? `yes, on ${device.node}` : "no"],
    ["First seen", when(device.first_seen)], ["Last seen", when(device.last_seen)],
    ["Last upload", when(device.last_upload)], ["Records committed", device.records_committed],
    ["Last error", device.last_error ?? "none"],
  ];
  const inputs = ["custom1", "custom2", "custom3", "connector"].map((name) =>
    el("label", {}, name + " ", el("input", { name, id: "field-" + name, value: device[name] ?? "" })));
  const fieldStatus = el("p", { id: "fields-status" });
  const save = async (event) => {
    event.preventDefault();
    const changes = {};
    for (const label of inputs) {
      const input = label.querySelector("input");
      changes[input.name] = input.value;
    }
    try {
      await api("PUT", "/api/devices/" + serial, changes);
      fieldStatus.className = "ok";
      fieldStatus.textContent = "saved";
    } catch (error) {
      fieldStatus.className = "error";
      fieldStatus.textContent = error.message;
    }
  };
  const commandsHolder = el("div", { id: "commands-holder" });
  const loadCommands = async () => {
    try {
      const answer = await api("GET", `/api/devices/${serial}/commands`);
      commandsHolder.replaceChildren(table(["Id", "Type", "Parameters", "Status", "Created", "Sent", "Completed", "Device status"],
        answer.commands.map((c) => el("tr", { "data-command": c.id },
          el("td", {}, c.id), el("td", {}, c.type), el("td", {}, JSON.stringify(c.params)),
          el("td", { class: "command-status" }, c.status), el("td", {}, when(c.created)),
          el("td", {}, c.sent ? when(c.sent) : ""), el("td", {}, c.completed ? when(c.completed) : ""),
          el("td", {}, c.device_status ?? ""))), { id: "commands" }));
    } catch (error) {
      commandsHolder.replaceChildren(errorLine(error));
    }
  };
  const deadHolder = el("div", {});
  const loadDead = async (outcome) => deadHolder.replaceChildren(
    await deadLetterTable(new URLSearchParams({ serial: String(serial) }), loadDead, outcome));
  const live = liveView(serial);
  show(el("h2", {}, "Device ", String(device.serial)),
    el("div", { class: "grid wide" },
      el("div", { class: "card" }, el("h3", {}, "Identity and state"),
        table(["", ""], identity.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))), { id: "identity" })),
      el("div", { class: "card" }, el("h3", {}, "Custom fields and connector"),
        el("form", { id: "fields", on: { submit: save } }, inputs, el("button", { type: "submit", id: "fields-save" }, "Save")),
        fieldStatus)),
    el("div", { class: "card" }, el("h3", {}, "Commands"), commandsHolder, commandForm(serial, loadCommands)),
    live.node,
    el("div", { class: "card" }, el("h3", {}, "Dead letters"), deadHolder));
  await Promise.all([loadCommands(), loadDead()]);
  const timer = setInterval(loadCommands, 3000);
  return () => { clearInterval(timer); live.stop(); };
}

// -- recordings, import, dead letters --------------------------------------------

async function download(recording) {
  const response = await fetch(`/api/recordings/${recording.id}`, {
    headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) },
  });
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: `device-${recording.serial}-recording-${recording.id}.txt` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function recordingsPage() {
  const show = pageShow();
  let answer;
  try {
    answer = await api("GET", "/api/recordings");
  } catch (error) {
    show(el("h2", {}, "Recordings"), errorLine(error));
    return;
  }
  show(el("h2", {}, "Recordings"),
    answer.recordings.length ? table(["Id", "Device", "Started", "Ends", "Recording", "Frames", "Bytes", ""],
      answer.recordings.map((r) => el("tr", { "data-recording": r.id },
        el("td", {}, r.id), el("td", {}, el("a", { href: "#device/" + r.serial }, r.serial)),
        el("td", {}, when(r.started)), el("td", {}, when(r.ends)), el("td", {}, r.recording ? "yes" : "no"),
        el("td", {}, r.frames), el("td", {}, r.bytes + (r.truncated ? " (full)" : "")),
        el("td", {}, el("button", { type: "button", class: "download", on: { click: () => download(r) } }, "Download")))),
    { id: "recordings" }) : el("p", { class: "muted" }, "No recordings yet: open a device and press Record."));
}

function importPage() {
  const show = pageShow();
  const text = el("textarea", { id: "csv", placeholder: "serial,custom1,custom2,custom3,connector" });
  const file = el("input", { type: "file", id: "csv-file", accept: ".csv,text/csv" });
  const result = el("p", { id: "import-result" });
  file.addEventListener("change", async () => { if (file.files[0]) text.value = await file.files[0].text(); });
  const send = async (event) => {
    event.preventDefault();
    try {
      const answer = await api("POST", "/api/devices/import", text.value, "text/csv");
      result.className = "ok";
      result.textContent = `${answer.created} created, ${answer.updated} updated`;
    } catch (error) {
      result.className = "error";
      result.textContent = error.message;
    }
  };
  show(el("h2", {}, "Import devices"),
    el("p", { class: "muted" }, "Rows are serial,custom1,custom2,custom3[,connector]; all or nothing: a bad line imports nothing and is named below."),
    el("form", { on: { submit: send } }, text, file, el("button", { type: "submit", id: "import-send" }, "Import")),
    result);
}

async function deadLettersPage() {
  const show = pageShow();
  const holder = el("div", {});
  const load = async (outcome) => holder.replaceChildren(
    await deadLetterTable(new URLSearchParams({ limit: "200" }), load, outcome));
  show(el("h2", {}, "Dead letters"), holder);
  await load();
}

// -- routing ----------------------------------------------------------------------

async function route() {
  stopPage();
  stopPage = () => {};
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    signOut();
    return;
  }
  const [name, argument] = (location.hash.slice(1) || "fleet").split("/");
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.getAttribute("href") === "#" + name);
  }
  const pages = {
    fleet: fleetPage,
    devices: () => devicesPage(new URLSearchParams()),
    device: () => devicePage(Number(argument)),
    recordings: recordingsPage,
    import: importPage,
    deadletters: deadLettersPage,
  };
  const generation = ++routeGeneration;
  const stop = await (pages[name] || fleetPage)();
  if (typeof stop !== "function") return;
  if (isCurrent(generation)) stopPage = stop;
  else stop();  // superseded while it loaded: its timers and streams end now
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin-form").addEventListener("submit", signIn);
  document.getElementById("signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  if (sessionStorage.getItem(TOKEN_KEY)) {
    document.getElementById("signin").hidden = true;
    document.getElementById("nav").hidden = false;
  }
  route();
});
