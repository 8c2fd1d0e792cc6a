// The search page: builds structured requests for /api/search and /api/search/image, renders the grid.
"use strict";

const $ = (id) => document.getElementById(id);

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

async function call(url, init, label) {
  $("error").hidden = true;
  $("status").textContent = `Searching ${label}…`;
  try {
    const response = await fetch(url, init);
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
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

function searchImage(file) {
  const { k, dedup } = options();
  const params = new URLSearchParams({ k, dedup, filters: JSON.stringify(filters()) });
  return call(`/api/search/image?${params}`, { method: "POST", body: file }, `like ${file.name}`);
}

function render(body, label) {
  const list = $("results");
  list.replaceChildren();
  for (const row of body.results) {
    const card = document.createElement("li");
    card.className = "card";
    card.dataset.id = row.id;
    const img = document.createElement("img");
    img.src = row.thumbnail;
    img.alt = row.caption || row.id;
    img.loading = "lazy";
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
    more.addEventListener("click", () => searchJSON({ id: row.id }, `like “${row.caption || row.id}”`));
    card.append(img, caption, meta, more);
    list.append(card);
  }
  $("status").textContent = body.results.length
    ? `${body.results.length} results ${label} (${body.took_ms} ms)`
    : `No results ${label}`;
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (text) searchJSON({ text }, `for “${text}”`);
  else if ($("image").files.length) searchImage($("image").files[0]);
  else $("text").focus();
});

$("image").addEventListener("change", () => {
  if ($("image").files.length) searchImage($("image").files[0]);
});

document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement.tagName !== "INPUT") {
    event.preventDefault();
    $("text").focus();
  }
});
