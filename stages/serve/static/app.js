// The search page: plain DOM calls against the JSON API, no framework, no network beyond it.
"use strict";

const $ = (id) => document.getElementById(id);
let queryFile = null; // the last image dropped or chosen: searched, and classified on demand

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`HTTP ${response.status}`);
  }
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showResults(answer, what) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of answer.results) {
    const card = element("div", "card");
    const img = element("img");
    img.src = hit.image_url;
    img.alt = hit.id;
    img.title = hit.caption || hit.id;
    card.append(img, element("div", "score", `#${hit.rank}  ${hit.score.toFixed(3)}`));
    card.append(element("div", "label", hit.label_name || ""));
    card.append(element("div", "id", hit.id));
    grid.append(card);
  }
  status(`${answer.results.length} results for ${what} in ${answer.ms.toFixed(0)} ms`);
}

async function searchText(event) {
  event.preventDefault();
  const q = $("q").value;
  const k = $("k").value || "12";
  status("searching...");
  try {
    const params = new URLSearchParams({ q, k });
    showResults(await call(`/api/search?${params}`), `"${q}"`);
  } catch (err) {
    status(err.message, true);
  }
}

async function searchImage(file) {
  queryFile = file;
  const preview = $("query-image");
  preview.src = URL.createObjectURL(file);
  preview.style.display = "block";
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value || "12");
  status("searching by image...");
  try {
    showResults(await call("/api/search", { method: "POST", body: form }), file.name);
  } catch (err) {
    status(err.message, true);
  }
}

async function classify() {
  if (!queryFile) {
    status("drop or choose an image first: it is the one classified", true);
    return;
  }
  const form = new FormData();
  form.append("image", queryFile);
  form.append("labels", $("labels").value);
  try {
    const answer = await call("/api/classify", { method: "POST", body: form });
    const list = $("classes");
    list.replaceChildren();
    for (const c of answer.results) {
      const item = element("li");
      const bar = element("div", "bar");
      bar.style.width = `${(100 * c.probability).toFixed(1)}%`;
      item.append(bar, element("span", "", `${c.label}  ${(100 * c.probability).toFixed(1)}%`));
      list.append(item);
    }
    status(`classified ${queryFile.name} in ${answer.ms.toFixed(0)} ms`);
  } catch (err) {
    status(err.message, true);
  }
}

async function describe() {
  try {
    const info = await call("/api/info");
    const index = info.index
      ? `${info.index.rows.toLocaleString()} images of ${info.index.dataset}/${info.index.split}`
      : "no index: search is off";
    $("info").textContent =
      `${info.run}: ${info.models.image} (${info.layers.image}) + ` +
      `${info.models.text} (${info.layers.text}), ${index}`;
    if (!info.index) {
      $("search-form").hidden = true;
    }
    $("about").textContent = `caps: k <= ${info.limits.max_k}, ` +
      `${info.limits.max_labels} labels, uploads <= ${info.limits.max_upload_bytes / 2 ** 20} MiB`;
  } catch (err) {
    status(`cannot read /api/info: ${err.message}`, true);
  }
}

$("search-form").addEventListener("submit", searchText);
$("file").addEventListener("change", (e) => e.target.files[0] && searchImage(e.target.files[0]));
$("classify-button").addEventListener("click", classify);
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) searchImage(e.dataTransfer.files[0]);
});
describe();
