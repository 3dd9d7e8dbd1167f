// The search page. All text from the server goes in with textContent, never parsed as HTML: a product name
// holding HTML shows as text. The photo goes to /api/search as the request body, not as a form.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
let status = null;   // the last /api/status answer
let last = null;     // what to repeat with "Search again": {photo: Blob, name} or {image: catalogue name}
let latest = 0;      // the newest search's number: an older answer arriving late is dropped
let lastSettings = "";  // k and category of the last search: changing them searches again

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showServer(server) {
  const banner = $("server");
  if (!server || server.state === "ready") {
    banner.hidden = true;
    banner.textContent = "";
    return;
  }
  banner.className = "banner " + (server.state === "down" ? "down" : "");
  banner.textContent = server.state === "down"
    ? "Search server unavailable. The page will carry on when it is back."
    : "The search server is up but its model is not ready yet.";
  banner.title = server.message || "";
  banner.hidden = false;
}

function showAbout(s) {
  const parts = [];
  const m = s.server;
  if (m.state === "ready") parts.push(`model ${m.model} v${m.version} (${m.model_version})`);
  if (s.index.size !== null && s.index.size !== undefined) parts.push(`${s.index.size} catalogue items indexed`);
  if (s.index.error) parts.push(s.index.error);
  if (s.index.warning) parts.push(s.index.warning);
  $("about").textContent = parts.join(" · ") || "no server information yet";
  const select = $("category");
  const chosen = select.value;
  const have = Array.from(select.options).slice(1).map((o) => o.value);
  if (have.join("\n") !== s.index.categories.join("\n")) {
    select.length = 1;
    for (const c of s.index.categories) select.add(new Option(c, c));
    select.value = s.index.categories.includes(chosen) ? chosen : "";
  }
}

async function poll() {
  try {
    const r = await fetch("/api/status", {cache: "no-store"});
    const s = await r.json();
    const wasDown = status && status.server.state !== "ready";
    status = s;
    $("k").max = s.max_k;
    showServer(s.server);
    showAbout(s);
    if (wasDown && s.server.state === "ready" && $("error").dataset.kind === "server") showError("");
  } catch (e) {
    showServer({state: "down", message: "the search page itself does not answer"});
  }
  setTimeout(poll, POLL_MS);
}

function query() {
  const k = Math.max(1, Math.min(Number($("k").value) || 10, status ? status.max_k : 100));
  $("k").value = k;
  const q = new URLSearchParams({k: String(k)});
  if ($("category").value) q.set("category", $("category").value);
  return q;
}

async function search(what) {
  const mine = ++latest;
  last = what;
  $("again").disabled = false;
  showError("");
  const q = query();
  lastSettings = q.toString();
  let request;
  if (what.photo) {
    if (status && what.photo.size > status.max_upload_bytes) {
      return fail(`The file is larger than the ${Math.round(status.max_upload_bytes / 1048576)} MiB limit.`, "input");
    }
    q.set("name", what.name || "photo");
    const type = what.photo.type && what.photo.type.startsWith("image/") ? what.photo.type : "application/octet-stream";
    request = fetch("/api/search?" + q, {method: "POST", body: what.photo, headers: {"Content-Type": type}});
  } else {
    q.set("image", what.image);
    request = fetch("/api/similar?" + q);
  }
  $("summary").textContent = "searching…";
  try {
    const r = await request;
    const body = await r.json().catch(() => ({error: `the search page answered ${r.status}`}));
    if (mine !== latest) return;
    if (!r.ok) {
      const serverSide = body.kind === "server_down" || body.kind === "not_ready";
      if (serverSide) showServer({state: body.kind === "server_down" ? "down" : "not_ready", message: body.error});
      return fail(body.error || `error ${r.status}`, serverSide ? "server" : "input");
    }
    render(body);
  } catch (e) {
    if (mine === latest) fail("The search page does not answer (is `mildnet ui` still running?).", "server");
  }
}

function fail(message, kind) {
  showError(message);
  $("error").dataset.kind = kind;
  $("summary").textContent = "";
  $("results").replaceChildren();
}

function render(body) {
  const where = body.category ? ` in ${body.category}` : "";
  const n = body.hits.length;
  $("summary").textContent = `${n} result${n === 1 ? "" : "s"} for ${body.query.name}${where}` +
    (n ? ". Choose one to see more like it." : " (nothing matches the filter).");
  const items = body.hits.map((h) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = h.id;
    li.dataset.rank = h.rank;
    const button = document.createElement("button");
    button.type = "button";
    const pic = document.createElement("span");
    pic.className = "pic";
    if (h.image) {
      const img = document.createElement("img");
      img.src = "/thumbs/" + h.image.split("/").map(encodeURIComponent).join("/");
      img.alt = h.name;
      img.loading = "lazy";
      pic.append(img);
      button.addEventListener("click", () => search({image: h.image}));
      button.setAttribute("aria-label", `More like #${h.rank} ${h.name}`);
    } else {
      pic.textContent = "no image";
      button.disabled = true;
    }
    const text = document.createElement("span");
    text.className = "text";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `#${h.rank} ${h.name}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${h.score.toFixed(3)}`;
    const dl = document.createElement("dl");
    for (const [key, value] of Object.entries(h.metadata)) {
      if (key === "name") continue;  // it is the card's title
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = typeof value === "string" ? value : JSON.stringify(value);
      dl.append(dt, dd);
    }
    text.append(name, score, dl);
    button.append(pic, text);
    li.append(button);
    return li;
  });
  $("results").replaceChildren(...items);
}

function usePhoto(file) {
  if (!file) return;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = "query photo " + (file.name || "");
  preview.hidden = false;
  search({photo: file, name: file.name || "pasted photo"});
}

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", (e) => usePhoto(e.target.files[0]));
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); usePhoto(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const file = Array.from(e.clipboardData ? e.clipboardData.files : []).find((f) => f.type.startsWith("image/"));
    if (file) usePhoto(file);
  });
  $("again").addEventListener("click", () => last && search(last));
  for (const id of ["k", "category"]) {
    $(id).addEventListener("change", (e) => {
      const valid = e.target.checkValidity() && e.target.value !== "";
      if (last && valid && query().toString() !== lastSettings) search(last);
    });
  }
  poll();
});
