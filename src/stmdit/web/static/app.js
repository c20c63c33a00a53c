"use strict";
const $ = (id) => document.getElementById(id);
const state = { config: null, datasets: [], spots: [], genes: new Map() };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("The server cannot be reached. Is stmdit serve still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const fallback = `The server answered ${response.status} ${response.statusText}.`;
    throw new Error(body && typeof body.error === "string" ? body.error : fallback);
  }
  if (body === null) throw new Error("The server's answer could not be read.");
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message.charAt(0).toUpperCase() + message.slice(1);
  box.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}
const guarded = (fn) => async (...args) => {
  try { await fn(...args); } catch (err) { showError(err.message); setStatus(""); }
};
const query = (params) => new URLSearchParams(params).toString();
const startMode = () => document.querySelector("input[name=start]:checked").value;
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function fold(lfc) {
  const times = Math.pow(2, lfc);
  const sign = lfc > 0 ? "+" : lfc < 0 ? "−" : "±";
  const factor = times >= 10 ? times.toFixed(0) : times.toPrecision(2);
  return `log2 ${sign}${Math.abs(lfc).toFixed(2)} (×${factor})`;
}

function changeRow({ label, detail, kind, key, removable }) {
  const max = state.config.limits.log2_fold_change_max;
  const range = el("input", { type: "range", min: -max, max: max, step: 0.25, value: 0,
                              "aria-label": `log2 fold change of ${label}` });
  const out = el("output", { text: fold(0) });
  const ko = el("input", { type: "checkbox", "aria-label": `knock out ${label}` });
  const row = el("div", { class: "change off", "data-kind": kind, "data-key": key });
  const update = () => {
    const lfc = Number(range.value);
    range.disabled = ko.checked;
    out.textContent = ko.checked ? "knocked out" : fold(lfc);
    row.classList.toggle("ko", ko.checked);
    row.classList.toggle("active", !ko.checked && lfc !== 0);
    row.classList.toggle("off", !ko.checked && lfc === 0);
  };
  range.addEventListener("input", update);
  ko.addEventListener("change", update);
  const remove = removable
    ? el("button", { type: "button", class: "remove", title: `remove ${label}`,
                     "aria-label": `remove ${label}`, onclick: () => row.remove() }, "×")
    : "";
  const name = el("span", { class: "name" }, label, detail ? el("small", { text: ` ${detail}` }) : "");
  row.append(el("div", { class: "head" }, name, el("label", { class: "check" }, ko, "knock out"), remove),
             el("div", { class: "controls" }, range, out));
  return row;
}

function collectChanges() {
  const changes = [];
  for (const row of document.querySelectorAll(".change")) {
    const lfc = Number(row.querySelector("input[type=range]").value);
    const knockout = row.querySelector("input[type=checkbox]").checked;
    if (!knockout && lfc === 0) continue;
    const target = row.dataset.kind === "set" ? { gene_set: row.dataset.key } : { gene: row.dataset.key };
    changes.push({ ...target, log2_fold_change: lfc, knockout });
  }
  return changes;
}

async function loadConfig() {
  state.config = await api("/api/config");
  const { limits, defaults, upload, model } = state.config;
  const guidance = [["guidance-ge", defaults.guidance_ge], ["guidance-morph", defaults.guidance_morph]];
  for (const [id, value] of guidance) {
    const range = $(id);
    range.max = limits.guidance_max;
    range.value = value;
    const show = () => { $(id + "-out").textContent = Number(range.value).toFixed(1); };
    range.addEventListener("input", show);
    show();
  }
  $("seed").value = defaults.seed;
  $("seed").max = limits.seed_max;
  $("steps").value = defaults.steps;
  $("steps").max = limits.max_steps;
  $("n-seeds").replaceChildren(...Array.from({ length: limits.max_seeds }, (_, i) =>
    el("option", { value: i + 1, text: String(i + 1), selected: i + 1 === defaults.n_seeds })));
  $("upload-hint").textContent =
    "Raw counts in layers['counts'] or X, samples from obs['sample_id']; at most " +
    `${upload.max_mb} MB and ${upload.max_spots} spots, sharing at least ` +
    `${Math.round(upload.min_panel_fraction * 100)}% of the model's ${model.panel_genes} panel genes.`;
}

async function loadDatasets(select) {
  state.datasets = (await api("/api/datasets")).datasets;
  $("dataset").replaceChildren(...state.datasets.map((d) =>
    el("option", { value: d.name, text: d.name + (d.tiles ? " · with tiles" : "") })));
  if (!state.datasets.length) {
    showError("No datasets yet: put .h5ad files or prepared datasets in the data folder, or upload one.");
    return;
  }
  $("dataset").value = select || state.datasets[0].name;
  await onDataset();
}

async function onDataset() {
  clearError();
  const dataset = { dataset: $("dataset").value };
  const [samples, genes, sets] = await Promise.all([
    api("/api/samples?" + query(dataset)), api("/api/genes?" + query(dataset)),
    api("/api/gene-sets?" + query(dataset))]);
  $("coverage").textContent =
    `${genes.panel_found} of the model's ${genes.panel_size} panel genes are in this dataset.`;
  $("sample").replaceChildren(...samples.samples.map((s) =>
    el("option", { value: s.name, text: `${s.name} (${plural(s.n_spots, "spot")})` })));
  $("gene-list").replaceChildren(...genes.genes.map((g) => el("option", { value: g })));
  state.genes = new Map(genes.genes.map((g) => [g.toUpperCase(), g]));
  const setRows = sets.gene_sets.map((s) => changeRow({
    label: s.name, kind: "set", key: s.name,
    detail: `${s.genes.length < s.n_defined ? s.genes.length + "/" : ""}${plural(s.n_defined, "gene")}` }));
  const none = el("div", { class: "empty", text: "none in this panel" });
  $("gene-sets").replaceChildren(...(setRows.length ? setRows : [none]));
  for (const row of $("genes").querySelectorAll(".change")) {
    if (!state.genes.has(row.dataset.key.toUpperCase())) row.remove();
  }
  const morphology = samples.tiles && state.config.model.morphology_encoder;
  $("morph-row").hidden = !morphology;
  if (!morphology) $("use-morphology").checked = false;
  await onSample();
}

async function onSample() {
  const params = { dataset: $("dataset").value, sample: $("sample").value };
  state.spots = (await api("/api/spots?" + query(params))).spots;
  showSpots();
}

function showSpots() {
  const needle = $("spot-filter").value.trim().toLowerCase();
  const shown = needle ? state.spots.filter((s) => s.toLowerCase().includes(needle)) : state.spots;
  const previous = $("spot").value;
  $("spot").replaceChildren(...shown.map((s) => el("option", { value: s, text: s })));
  if (shown.includes(previous)) $("spot").value = previous;
}

function addGene() {
  const typed = $("gene-input").value.trim();
  if (!typed) return;
  const gene = state.genes.get(typed.toUpperCase());
  if (!gene) {
    showError(`Unknown gene ${typed}: it is not in the model's gene panel for this dataset. ` +
              "Pick one from the list.");
    return;
  }
  clearError();
  if (!$("genes").querySelector(`.change[data-key="${CSS.escape(gene)}"]`)) {
    $("genes").append(changeRow({ label: gene, kind: "gene", key: gene, removable: true }));
  }
  $("gene-input").value = "";
}

function resetChanges() {
  $("genes").replaceChildren();
  for (const row of document.querySelectorAll(".change")) {
    row.querySelector("input[type=range]").value = 0;
    const ko = row.querySelector("input[type=checkbox]");
    ko.checked = false;
    ko.dispatchEvent(new Event("change"));
  }
}

async function generate() {
  clearError();
  const body = {
    dataset: $("dataset").value, sample: $("sample").value, spot: $("spot").value || null,
    start: startMode(), changes: collectChanges(), use_morphology: $("use-morphology").checked,
    guidance_ge: Number($("guidance-ge").value), guidance_morph: Number($("guidance-morph").value),
    seed: Number($("seed").value), n_seeds: Number($("n-seeds").value), steps: Number($("steps").value),
  };
  $("generate").disabled = true;
  setStatus("Generating…", true);
  try {
    const result = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    renderResult(result);
    setStatus(`Done in ${result.seconds.toFixed(result.seconds < 1 ? 2 : 1)} s.`);
  } finally {
    $("generate").disabled = false;
  }
}

const number = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));
const signed = (v) => (v > 0 ? "+" : v < 0 ? "−" : "") + number(Math.abs(v));

function tile(src, caption) {
  return el("figure", {}, el("img", { class: "tile", src: src, alt: caption }),
            el("figcaption", { text: caption }));
}

function renderResult(r) {
  const n = r.seeds.length;
  const summary = el("dl", { class: "summary" });
  const add = (term, value) => summary.append(el("dt", { text: term }), el("dd", { text: value }));
  const averaged = r.n_spots_averaged > 1 ? ` (mean of ${r.n_spots_averaged} spots)` : "";
  add("Start state", r.start_state + averaged);
  add("Change", r.perturbation);
  add("Real tile's morphology", r.morphology.note);
  add("Sampling", `${plural(n, "seed")} (${r.seeds.join(", ")}), ${r.steps} steps, ` +
                  `guidance: expression ${r.guidance_ge}, morphology ${r.guidance_morph}`);
  add("Gene panel", `${r.panel.found} of ${r.panel.size} panel genes measured in this dataset`);

  const parts = [summary];
  if (r.real_tile) {
    parts.push(el("div", { class: "real" }, tile(r.real_tile, "Real tile of the spot"),
      el("p", { class: "muted", text: "The measured tissue, for reference. The generated tiles are new " +
                                      "draws from the expression, not edits of this tile." })));
  }
  const pairs = el("div", { class: "tiles", id: "pairs" });
  for (const p of r.pairs) {
    pairs.append(el("div", { class: "pair" }, el("h3", { text: `Seed ${p.seed}` }),
      el("div", { class: "two" }, tile(p.control, "Control"), tile(p.perturbed, "Perturbed"))));
  }
  parts.push(pairs);

  const headings = ["Measured on the tiles", "Control", "Perturbed", "Change", "95% interval"];
  const table = el("table", { id: "measurements" },
                   el("thead", {}, el("tr", {}, ...headings.map((t) => el("th", { text: t })))));
  const tbody = el("tbody");
  const spread = (mean, sd) => (sd === null ? number(mean) : `${number(mean)} ± ${number(sd)}`);
  for (const m of r.measurements) {
    if (m.note) {  // not measurable on these tiles: say why instead of showing noise
      tbody.append(el("tr", { class: "note" }, el("td", { text: m.label }),
                      el("td", { class: "muted", colspan: 4, text: m.note })));
      continue;
    }
    // Coloured only when the change survives Holm's correction over the measures shown.
    const direction = m.survives_holm ? (m.mean_change > 0 ? " up" : " down") : "";
    const interval = m.ci_low === null ? r.replicates.no_interval
      : `${signed(m.ci_low)} … ${signed(m.ci_high)}`;
    tbody.append(el("tr", {},
      el("td", { text: m.label }),
      el("td", { class: "num", text: spread(m.control_mean, m.control_sd) }),
      el("td", { class: "num", text: spread(m.perturbed_mean, m.perturbed_sd) }),
      el("td", { class: "num" + direction, text: signed(m.mean_change) }),
      el("td", { class: "num", text: interval })));
  }
  table.append(tbody);
  const { method, n_tests, alpha } = r.multiplicity;
  const tested = n_tests
    ? `, with a ${r.replicates.interval}, coloured when the change survives ${method}'s correction ` +
      `over the ${n_tests} measures (at ${alpha}).`
    : ". With one seed there is no interval: choose at least 2 seeds for one.";
  const note = `Control and perturbed: mean ± standard deviation over the ${plural(n, "seed")} (the ` +
    "seed-to-seed spread). Change: mean of the paired differences (perturbed − control, same seed) " +
    `${r.replicates.description}${tested} More seeds give a surer answer.`;
  parts.push(table, el("p", { class: "muted", text: note }));
  $("results").replaceChildren(...parts);
}

async function upload() {
  clearError();
  const file = $("upload-file").files[0];
  if (!file) { showError("Choose an .h5ad file to upload first."); return; }
  const form = new FormData();
  form.append("file", file);
  setStatus(`Uploading ${file.name}…`, true);
  const result = await api("/api/upload", { method: "POST", body: form });
  await loadDatasets(result.dataset);
  setStatus(`Uploaded ${result.dataset}: ${plural(result.n_spots, "spot")}, ` +
            `${result.panel_found} of ${result.panel_size} panel genes.`);
}

$("dataset").addEventListener("change", guarded(onDataset));
$("sample").addEventListener("change", guarded(onSample));
$("spot-filter").addEventListener("input", showSpots);
$("add-gene").addEventListener("click", addGene);
$("gene-input").addEventListener("keydown", (e) => { if (e.key === "Enter") addGene(); });
$("reset").addEventListener("click", resetChanges);
$("generate").addEventListener("click", guarded(generate));
$("upload-button").addEventListener("click", guarded(upload));
for (const radio of document.querySelectorAll("input[name=start]")) {
  radio.addEventListener("change", () => {
    const fromSpot = startMode() === "spot";
    $("use-morphology").disabled = !fromSpot;
    if (!fromSpot) $("use-morphology").checked = false;
  });
}
guarded(async () => { await loadConfig(); await loadDatasets(); setStatus("Ready."); })();
