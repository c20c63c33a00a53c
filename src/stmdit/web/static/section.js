"use strict";
// The whole-section panel: a virtual section drawn beside the real one, two views that pan and
// zoom together (plain canvas code), a polygon drawn on them, and the gene sliders applied to
// it. Coordinates: "screen" is CSS pixels within a view, "image" is the section's canvas pixels
// (x right, y down; pixel j spans [j, j + 1)), which the server maps to microns.

// -- the view transform (pure: also loaded by the tests under node) ------------------------------
const SectionView = {
  MIN_ZOOM: 0.05,
  MAX_ZOOM: 64,
  // The whole image centred in a view of width x height.
  fit(imageWidth, imageHeight, width, height) {
    const scale = Math.min(width / imageWidth, height / imageHeight);
    return { scale, tx: (width - imageWidth * scale) / 2, ty: (height - imageHeight * scale) / 2 };
  },
  toImage(view, sx, sy) { return [(sx - view.tx) / view.scale, (sy - view.ty) / view.scale]; },
  toScreen(view, ix, iy) { return [ix * view.scale + view.tx, iy * view.scale + view.ty]; },
  // Zoom by factor, the image point under (sx, sy) staying there.
  zoomAt(view, factor, sx, sy) {
    const scale = Math.min(SectionView.MAX_ZOOM, Math.max(SectionView.MIN_ZOOM, view.scale * factor));
    const [ix, iy] = SectionView.toImage(view, sx, sy);
    return { scale, tx: sx - ix * scale, ty: sy - iy * scale };
  },
  pan(view, dx, dy) { return { scale: view.scale, tx: view.tx + dx, ty: view.ty + dy }; },
  // A point of the view as an image point, kept on the image.
  vertex(view, sx, sy, imageWidth, imageHeight) {
    const [ix, iy] = SectionView.toImage(view, sx, sy);
    const round = (v) => Math.round(v * 100) / 100;
    return [round(Math.min(imageWidth, Math.max(0, ix))), round(Math.min(imageHeight, Math.max(0, iy)))];
  },
};
if (typeof module === "object" && module.exports) module.exports = { SectionView };

// -- the panel ---------------------------------------------------------------------------------
if (typeof document !== "undefined") {
  const sec = {
    job: null, result: null, bitmaps: {}, showEdited: false, edit: null,
    view: { scale: 1, tx: 0, ty: 0 }, polygon: [], closed: false, drawing: false, busy: false,
  };
  const views = () => [$("view-real"), $("view-virtual")];
  const size = () => sec.result.geometry;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function bitmap(url) {
    let response;
    try { response = await fetch(url); } catch (err) {
      throw new Error("The server cannot be reached. Is stmdit serve still running?");
    }
    if (!response.ok) {
      let message = `The server answered ${response.status} for ${url}.`;
      try { message = (await response.json()).error || message; } catch (err) { /* keep it */ }
      throw new Error(message);
    }
    return createImageBitmap(await response.blob());
  }

  function setBusy(busy) {
    sec.busy = busy;
    $("section-draw").disabled = busy;
    $("edit-apply").disabled = busy || !sec.closed || !sec.result;
  }

  function progress(status, label) {
    const bar = $("section-progress");
    bar.hidden = false;
    bar.max = status.total;
    bar.value = status.steps_done;
    const waiting = status.state === "queued" ? " (waiting for the tile generation to finish)" : "";
    $("section-status").textContent =
      `${label}: step ${status.steps_done} of ${status.total}${waiting}, ${status.seconds.toFixed(0)} s`;
  }

  // Poll a job until it is done; its error, when it failed, as an Error.
  async function follow(job, label) {
    let status = job;
    while (status.state === "queued" || status.state === "running") {
      progress(status, label);
      await sleep(300);
      status = await api(`/api/section/jobs/${encodeURIComponent(job.job)}`);
    }
    progress(status, label);
    if (status.state === "failed") throw new Error(status.error);
    return status;
  }

  function resize() {
    const dpr = window.devicePixelRatio || 1;
    for (const canvas of views()) {
      const box = canvas.getBoundingClientRect();
      canvas.width = Math.max(1, Math.round(box.width * dpr));
      canvas.height = Math.max(1, Math.round(box.height * dpr));
    }
    render();
  }

  function fit() {
    if (!sec.result) return;
    const box = $("view-real").getBoundingClientRect();
    sec.view = SectionView.fit(size().width, size().height, box.width, box.height);
    render();
  }

  function zoom(factor) {
    const box = $("view-real").getBoundingClientRect();
    sec.view = SectionView.zoomAt(sec.view, factor, box.width / 2, box.height / 2);
    render();
  }

  function render() {
    const dpr = window.devicePixelRatio || 1;
    const virtual = sec.showEdited && sec.bitmaps.edited ? sec.bitmaps.edited : sec.bitmaps.virtual;
    const images = [sec.bitmaps.real, virtual];
    views().forEach((canvas, i) => {
      const ctx = canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#eceef3";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      if (!images[i]) return;
      const { scale, tx, ty } = sec.view;
      ctx.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * tx, dpr * ty);
      ctx.imageSmoothingEnabled = scale < 1;
      ctx.drawImage(images[i], 0, 0);
      drawPolygon(ctx, scale);
    });
    const edited = sec.showEdited && sec.bitmaps.edited;
    $("virtual-caption").textContent = sec.result
      ? `Virtual · ${edited ? "edited" : "unedited"} (seed ${sec.result.seed}, ${sec.result.steps} steps)`
      : "Virtual";
    $("zoom-level").textContent = sec.result ? `${(sec.view.scale * 100).toFixed(0)}%` : "";
  }

  function drawPolygon(ctx, scale) {
    const points = sec.polygon;
    if (!points.length) return;
    ctx.fillStyle = "rgba(0, 213, 255, 0.15)";
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (sec.closed) {
      ctx.closePath();
      ctx.fill();
    }
    // A dark edge under the cyan line keeps the outline visible on any tissue colour.
    ctx.lineWidth = 4 / scale;
    ctx.strokeStyle = "rgba(0, 0, 0, 0.75)";
    ctx.stroke();
    ctx.lineWidth = 2 / scale;
    ctx.strokeStyle = "#00d5ff";
    ctx.stroke();
    const r = 3 / scale;
    ctx.fillStyle = "rgba(0, 0, 0, 0.75)";
    for (const [x, y] of points) ctx.fillRect(x - r - 1 / scale, y - r - 1 / scale, 2 * r + 2 / scale, 2 * r + 2 / scale);
    ctx.fillStyle = "#00d5ff";
    for (const [x, y] of points) ctx.fillRect(x - r, y - r, 2 * r, 2 * r);
  }

  function setDrawing(on) {
    sec.drawing = on && !!sec.result;
    $("region-draw").setAttribute("aria-pressed", String(sec.drawing));
    $("region-draw").classList.toggle("pressed", sec.drawing);
    for (const canvas of views()) canvas.classList.toggle("drawing", sec.drawing);
    $("region-hint").textContent = sec.drawing
      ? "Click the corners of the region; double-click, press Enter or click the first corner to close it."
      : sec.closed ? `Region of ${sec.polygon.length} corners.` : "";
  }

  function clearRegion() {
    sec.polygon = [];
    sec.closed = false;
    setDrawing(false);
    setBusy(sec.busy);
    render();
  }

  function closeRegion() {
    if (sec.polygon.length < 3) return;
    sec.closed = true;
    setDrawing(false);
    setBusy(sec.busy);
    render();
  }

  function addVertex(sx, sy) {
    if (sec.closed) sec.polygon = [];
    sec.closed = false;
    const points = sec.polygon;
    if (points.length >= 3) {  // a click on the first corner closes the region
      const [fx, fy] = SectionView.toScreen(sec.view, ...points[0]);
      if (Math.hypot(fx - sx, fy - sy) <= 8) { closeRegion(); return; }
    }
    if (points.length) {  // the second click of a double-click adds nothing
      const [lx, ly] = SectionView.toScreen(sec.view, ...points[points.length - 1]);
      if (Math.hypot(lx - sx, ly - sy) <= 3) return;
    }
    if (points.length >= state.sectionLimits.max_vertices) return;
    points.push(SectionView.vertex(sec.view, sx, sy, size().width, size().height));
    render();
  }

  function bindView(canvas) {
    let drag = null;
    canvas.addEventListener("pointerdown", (e) => {
      if (!sec.result || e.button !== 0) return;
      drag = { x: e.clientX, y: e.clientY, moved: false };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (!drag.moved && Math.hypot(dx, dy) < 4) return;
      drag.moved = true;
      sec.view = SectionView.pan(sec.view, dx, dy);
      drag.x = e.clientX;
      drag.y = e.clientY;
      render();
    });
    canvas.addEventListener("pointerup", (e) => {
      if (!drag) return;
      const click = !drag.moved;
      drag = null;
      if (click && sec.drawing) {
        const box = canvas.getBoundingClientRect();
        addVertex(e.clientX - box.left, e.clientY - box.top);
      }
    });
    canvas.addEventListener("pointercancel", () => { drag = null; });
    canvas.addEventListener("dblclick", (e) => { if (sec.drawing) { e.preventDefault(); closeRegion(); } });
    canvas.addEventListener("wheel", (e) => {
      if (!sec.result) return;
      e.preventDefault();
      const box = canvas.getBoundingClientRect();
      const factor = Math.exp(-Math.max(-300, Math.min(300, e.deltaY)) * 0.002);
      sec.view = SectionView.zoomAt(sec.view, factor, e.clientX - box.left, e.clientY - box.top);
      render();
    }, { passive: false });
  }

  async function drawSection() {
    clearError();
    setBusy(true);
    try {
      const body = {
        dataset: $("dataset").value, sample: $("sample").value, seed: Number($("seed").value),
        steps: Number($("steps").value), guidance_ge: Number($("guidance-ge").value),
        guidance_morph: Number($("guidance-morph").value),
      };
      const started = await api("/api/section", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const status = await follow(started, `Drawing ${body.sample}`);
      const [real, virtual] = await Promise.all(
        [bitmap(status.result.images.real), bitmap(status.result.images.virtual)]);
      sec.job = status.job;
      sec.result = status.result;
      sec.bitmaps = { real, virtual };
      sec.edit = null;
      sec.showEdited = false;
      $("show-edited").checked = false;
      $("show-edited").disabled = true;
      $("edit-numbers").replaceChildren();
      $("section-views").hidden = false;
      $("section-tools").hidden = false;
      clearRegion();
      resize();
      fit();
      const g = status.result.geometry;
      $("section-status").textContent =
        `${body.sample} of ${body.dataset}: ${g.width} × ${g.height} px at ${g.um_per_px} µm per pixel, ` +
        `${status.result.n_spots} spots, drawn in ${status.seconds.toFixed(1)} s.`;
    } finally {
      $("section-progress").hidden = true;
      setBusy(false);
    }
  }

  async function applyEdit() {
    clearError();
    const changes = collectChanges();
    if (!changes.length) {
      showError("Move a slider (or knock a gene out) in 2 · Expression change first: the edit applies them.");
      return;
    }
    setBusy(true);
    try {
      const body = { section: sec.job, polygon_px: sec.polygon, changes, n_seeds: Number($("n-seeds").value) };
      const started = await api("/api/section/edit", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const status = await follow(started, "Editing the region");
      sec.bitmaps.edited = await bitmap(status.result.images.edited);
      sec.edit = status.result;
      sec.showEdited = true;
      $("show-edited").disabled = false;
      $("show-edited").checked = true;
      renderNumbers(status.result);
      render();
      $("section-status").textContent = `Region edited (${status.result.perturbation}) in ` +
        `${status.seconds.toFixed(1)} s.`;
    } finally {
      $("section-progress").hidden = true;
      setBusy(false);
    }
  }

  const num = (v) => (v === null || v === undefined ? "–"
    : Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));
  const sgn = (v) => (v === null || v === undefined ? "–" : (v > 0 ? "+" : v < 0 ? "−" : "") + num(Math.abs(v)));
  const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;

  function renderNumbers(r) {
    const grey = (v) => (v === null ? "–" : (v * 255).toFixed(2));
    const local = el("table", { id: "edit-local" },
      el("thead", {}, el("tr", {}, ...["Seed", "Outside", "Band", "Inside"].map((t) => el("th", { text: t })))));
    const body = el("tbody");
    for (const c of r.local_change) {
      body.append(el("tr", {}, el("td", { text: String(c.seed) }), el("td", { class: "num", text: grey(c.outside) }),
                      el("td", { class: "num", text: grey(c.band) }), el("td", { class: "num", text: grey(c.inside) })));
    }
    local.append(body);
    const measured = el("table", { id: "edit-measured" }, el("thead", {}, el("tr", {},
      ...["Measured inside the region", "Unedited", "Edited", "Change", "95% interval"].map((t) => el("th", { text: t })))));
    const rows = el("tbody");
    for (const [key, c] of Object.entries(r.changes)) {
      const stats = r.statistics[key];
      const interval = c.ci_low === null ? "one seed: no interval" : `${sgn(c.ci_low)} … ${sgn(c.ci_high)}`;
      rows.append(el("tr", {}, el("td", { text: r.measures[key] || key }),
        el("td", { class: "num", text: num(mean(stats.unedited)) }), el("td", { class: "num", text: num(mean(stats.edited)) }),
        el("td", { class: "num", text: sgn(c.mean_change) }), el("td", { class: "num", text: interval })));
    }
    measured.append(rows);
    const notes = [
      `Region: ${r.region.n_pixels} px (${(r.region.area_um2 / 1e6).toFixed(3)} mm²), ` +
        `${r.region.spots.length} spots edited, band ${r.band_um.toFixed(0)} µm; ` +
        `anchor: the unedited virtual section, seeds ${r.seeds.join(", ")}.`,
      "Mean |edited − unedited| per pixel in grey levels (of 255): outside the region and band it should be 0.",
    ];
    if (r.nuclei) notes.push(`Nuclei: not measured: ${r.nuclei}`);
    $("edit-numbers").replaceChildren(
      el("h3", { text: `Edit: ${r.perturbation}` }), local, measured,
      ...notes.map((t) => el("p", { class: "muted", text: t })));
  }

  const guardedSection = (fn) => async (...args) => {
    try { await fn(...args); } catch (err) {
      showError(err.message);
      $("section-status").textContent = `Failed: ${err.message}`;
    }
  };

  state.sectionLimits = { max_vertices: 256 };
  api("/api/section/config").then((limits) => { state.sectionLimits = limits; }).catch(() => {});
  views().forEach(bindView);
  $("section-draw").addEventListener("click", guardedSection(drawSection));
  $("edit-apply").addEventListener("click", guardedSection(applyEdit));
  $("zoom-in").addEventListener("click", () => zoom(1.5));
  $("zoom-out").addEventListener("click", () => zoom(1 / 1.5));
  $("zoom-fit").addEventListener("click", fit);
  $("region-draw").addEventListener("click", () => setDrawing(!sec.drawing));
  $("region-clear").addEventListener("click", clearRegion);
  $("show-edited").addEventListener("change", () => { sec.showEdited = $("show-edited").checked; render(); });
  document.addEventListener("keydown", (e) => {
    if (!sec.drawing) return;
    if (e.key === "Enter") closeRegion();
    if (e.key === "Escape") clearRegion();
  });
  window.addEventListener("resize", () => { if (sec.result) resize(); });
  setBusy(false);
  // For the browser tests: the current view, polygon and job.
  window.stmditSection = { state: () => ({ view: { ...sec.view }, polygon: sec.polygon.map((p) => [...p]),
                                            closed: sec.closed, job: sec.job, edited: !!sec.bitmaps.edited }) };
}
