// The search page: its state lives in the URL (?q=…&mode=…&like=…, filters, k, dedup), so a search can be
// reloaded, shared and walked with back/forward; builds structured requests for /api/search and
// /api/search/image, renders the grid. A server with a token gets it from the user, kept for the tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const MODES = ["vector", "text", "hybrid"];
const FIELDS = ["route", "complexity_min", "complexity_max", "caption_contains", "k"]; // inputs kept in the URL
const FILTERS = FIELDS.filter((name) => name !== "k");
const TOKEN_KEY = "icar-token";

function filters() {
  const f = {};
  const route = $("route").value.trim();
  if (route) f.route = route.split(",").map((r) => r.trim()).filter(Boolean);
  for (const name of ["complexity_min", "complexity_max"]) {
    if ($(name).value !== "") f[name] = Number($(name).value);
  }
  const caption = $("caption_contains").value.trim();
  if (caption) f.caption_contains = caption;
  return f;
}

function options() {
  return { k: Math.max(1, Math.min(100, Number($("k").value) || 12)), dedup: $("dedup").checked };
}

// The form as URL parameters: only what differs from the defaults, so addresses stay short.
function stateFromForm() {
  const params = new URLSearchParams();
  const q = $("text").value.trim();
  if (q) params.set("q", q);
  if ($("mode").value !== "vector") params.set("mode", $("mode").value);
  for (const name of FIELDS) {
    const value = $(name).value.trim();
    if (value !== "" && value !== $(name).defaultValue) params.set(name, value);
  }
  if ($("dedup").checked) params.set("dedup", "1");
  return params;
}

function formFromState(params) {
  $("text").value = params.get("q") || "";
  $("mode").value = MODES.includes(params.get("mode")) ? params.get("mode") : "vector";
  for (const name of FIELDS) $(name).value = params.get(name) ?? $(name).defaultValue;
  $("dedup").checked = params.get("dedup") === "1";
  if (FILTERS.some((name) => params.has(name))) $("filters").open = true;
}

// Run the search an address describes: "more like" a row, a text query, or nothing (an empty grid).
function run(params) {
  const like = params.get("like");
  const q = params.get("q");
  if (like) return searchJSON({ id: like }, `like ${like}`);
  if (q) return searchJSON({ text: q, mode: $("mode").value }, `for “${q}” (${$("mode").value})`);
  $("results").replaceChildren();
  $("status").textContent = "";
}

// A new search is a new history entry (unless the address is the same), then runs.
function go(params) {
  const search = params.toString();
  if (search !== location.search.slice(1)) {
    history.pushState(null, "", search ? `?${search}` : location.pathname);
  }
  return run(params);
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function call(url, init, label) {
  $("error").hidden = true;
  $("status").textContent = `Searching ${label}…`;
  try {
    const response = await fetch(url, { ...init, headers: { ...init.headers, ...authHeaders() } });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (response.status === 401) $("token-form").hidden = false;
    if (!response.ok) {
      const details = (body.details || []).map((d) => `${d.field}: ${d.message}`).join("; ");
      throw new Error(details ? `${body.error} (${details})` : body.error || `HTTP ${response.status}`);
    }
    render(body, label);
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = `Search failed: ${err.message}`;
    $("error").hidden = false;
  }
}

function searchJSON(query, label) {
  const request = { ...query, ...options(), filters: filters() };
  return call("/api/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
  }, label);
}

// An image's bytes have no address: the URL keeps the filters and drops the text query.
function searchImage(file) {
  const state = stateFromForm();
  state.delete("q");
  const search = state.toString();
  history.pushState(null, "", search ? `?${search}` : location.pathname);
  const { k, dedup } = options();
  const params = new URLSearchParams({ k, dedup, filters: JSON.stringify(filters()) });
  return call(`/api/search/image?${params}`, { method: "POST", body: file }, `like ${file.name}`);
}

// With a token, an <img src> cannot send it: fetch the thumbnail with the header instead.
function showThumbnail(img, url) {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    img.src = url;
    return;
  }
  fetch(url, { headers: authHeaders() })
    .then((response) => (response.ok ? response.blob() : null))
    .then((blob) => { if (blob) img.src = URL.createObjectURL(blob); });
}

function render(body, label) {
  const list = $("results");
  list.replaceChildren();
  for (const row of body.results) {
    const card = document.createElement("li");
    card.className = "card";
    card.dataset.id = row.id;
    const img = document.createElement("img");
    img.alt = row.caption || row.id;
    img.loading = "lazy";
    showThumbnail(img, row.thumbnail);
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = row.caption || "(no caption)";
    const meta = document.createElement("p");
    meta.className = "meta";
    meta.textContent = `score ${row.score.toFixed(3)} · ${row.route} · ${row.gflops.toFixed(2)} GFLOPs`;
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.textContent = "More like this";
    more.addEventListener("click", () => {
      const state = stateFromForm();
      state.delete("q");
      state.set("like", row.id);
      go(state);
    });
    card.append(img, caption, meta, more);
    list.append(card);
  }
  $("status").textContent = body.results.length
    ? `${body.results.length} results ${label} (${body.took_ms} ms)`
    : `No results ${label}`;
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  if ($("text").value.trim()) go(stateFromForm());
  else if ($("image").files.length) searchImage($("image").files[0]);
  else $("text").focus();
});

$("image").addEventListener("change", () => {
  if ($("image").files.length) searchImage($("image").files[0]);
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  run(new URLSearchParams(location.search));
});

document.addEventListener("keydown", (event) => {
  if (event.key === "/" && !["INPUT", "SELECT"].includes(document.activeElement.tagName)) {
    event.preventDefault();
    $("text").focus();
  }
});

function restore() {
  const params = new URLSearchParams(location.search);
  formFromState(params);
  run(params);
}

window.addEventListener("popstate", restore);
restore();
