// shapserve's page: predict -> explain -> heatmap, and the served model's card.
// Plain JavaScript, no library, nothing from the network but this service's own API.
"use strict";

const KEY_STORE = "shapserve.apiKey";
const POLL_MS = 500;
const $ = (id) => document.getElementById(id);

const page = {
  file: null,          // the Blob being classified and explained
  job: null,           // the explanation job's POST answer
};

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// fetch with the key; a non-2xx answer becomes an Error carrying the API's own message
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("X-API-Key", apiKey());
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new Error(`the service did not answer (${err.message})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = `${response.status}: ${body.error.message}`;
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401) {
      message += " — type an API key above.";
      $("key-form").hidden = false;
    }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

// an image route fetched with the key (an <img src> cannot send headers) into an object URL
async function loadImage(img, path, alt) {
  const blob = await (await api(path)).blob();
  showBlob(img, blob, alt);
}

// show ``blob`` in ``img``, releasing the object URL it showed before
function showBlob(img, blob, alt) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.alt = alt;
  img.hidden = false;
}

// -- the API key -------------------------------------------------------------------------
function setUpKey() {
  const form = $("key-form");
  $("api-key").value = apiKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("key-state").textContent = apiKey() ? "key set for this tab" : "no key";
    showError("");
    loadModel();
    if (page.file) predict();
  });
}

// -- choosing an image -------------------------------------------------------------------
function setUpImage() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    if ($("file").files.length) useFile($("file").files[0]);
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (file) useFile(file);
    else showError("that is not an image file");
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file").click();
    }
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
}

function useFile(file) {
  page.file = file;
  showBlob($("preview"), file, `the image to classify: ${file.name || "pasted image"}`);
  $("result").hidden = true;
  $("job").hidden = true;
  showError("");
  predict();
}

// -- prediction ----------------------------------------------------------------------------
async function predict() {
  $("predict-state").textContent = "Classifying…";
  $("predictions").replaceChildren();
  $("explain").disabled = true;
  const form = new FormData();
  form.append("file", page.file, page.file.name || "image.png");
  try {
    const body = await (await api("/predict?top_k=5", { method: "POST", body: form })).json();
    $("predict-state").textContent = `${body.model.name} ${body.model.version}, ${body.latency_ms.toFixed(1)} ms`;
    for (const p of body.predictions) {
      const li = document.createElement("li");
      li.className = "prediction";
      const pct = (100 * p.probability).toFixed(1);
      li.innerHTML = `<span class="label"></span><span class="bar" role="img"><span></span></span><span class="pct"></span>`;
      li.querySelector(".label").textContent = p.label;
      li.querySelector(".bar").setAttribute("aria-label", `${p.label}: ${pct} percent`);
      li.querySelector(".bar span").style.width = `${pct}%`;
      li.querySelector(".pct").textContent = `${pct} %`;
      $("predictions").append(li);
    }
    $("explain").disabled = false;
  } catch (err) {
    $("predict-state").textContent = "No prediction.";
    showError(err.message);
  }
}

// -- explanation ---------------------------------------------------------------------------
function setUpExplain() {
  $("explain-form").addEventListener("submit", (event) => {
    event.preventDefault();
    explain();
  });
}

async function explain() {
  const form = new FormData();
  form.append("file", page.file, page.file.name || "image.png");
  for (const name of ["target", "method", "background"]) {
    const value = $(name).value;
    if (value) form.append(name, value);
  }
  if ($("method").value === "fast") form.append("faithfulness", "true"); // the page shows the curves
  $("explain").disabled = true;
  $("result").hidden = true;
  $("job").hidden = false;
  $("job-progress").value = 0;
  $("job-state").textContent = "Queueing the explanation…";
  showError("");
  try {
    page.job = await (await api("/explain", { method: "POST", body: form })).json();
    // method=fast answers in the request: its result is already in the answer, nothing to poll
    const doc = page.job.result ? page.job : await poll(page.job.status_url);
    await showResult(doc.result);
  } catch (err) {
    $("job-state").textContent = "No explanation.";
    showError(err.message);
  } finally {
    $("explain").disabled = false;
  }
}

async function poll(url) {
  for (;;) {
    const doc = await (await api(url)).json();
    if (doc.status === "finished") {
      $("job-progress").value = 1;
      $("job-state").textContent = "Finished.";
      return doc;
    }
    if (doc.status === "failed") throw new Error(`the explanation failed: ${doc.error}`);
    if (doc.status === "queued") {
      $("job-state").textContent = doc.queue_position ? `Queued (position ${doc.queue_position}).` : "Queued.";
    } else {
      $("job-progress").value = doc.progress || 0;
      $("job-state").textContent = `Running: ${Math.floor(100 * (doc.progress || 0))} %.`;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function showResult(result) {
  const tabs = $("tabs");
  tabs.replaceChildren();
  const order = [result.target.label, ...result.classes.map((c) => c.label).filter((l) => l !== result.target.label)];
  for (const label of [...order, "all"]) {
    const tab = document.createElement("button");
    tab.type = "button";
    tab.setAttribute("role", "tab");
    tab.textContent = label === "all" ? "all classes" : label;
    tab.dataset.classes = label;
    tab.addEventListener("click", () => selectTab(tab, result));
    tabs.append(tab);
  }
  tabs.addEventListener("keydown", (event) => {
    const all = [...tabs.children];
    const i = all.indexOf(document.activeElement);
    if (i < 0) return;
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      const next = all[(i + (event.key === "ArrowRight" ? 1 : all.length - 1)) % all.length];
      next.focus();
      selectTab(next, result);
    }
  });
  const facts = $("faithfulness");
  facts.replaceChildren();
  const f = result.faithfulness;
  const rows = [
    ["method", result.method],
    ["class explained", `${result.target.label} (p = ${result.target.probability.toFixed(3)})`],
    ["background", `${result.background} (${result.background_images} image${result.background_images === 1 ? "" : "s"})`],
    ["superpixels", `${result.segments.count}`],
  ];
  const q = result.explainer && result.explainer.quality;
  if (q) { // method=fast: how far the amortised explainer agrees with KernelSHAP, measured when it was fitted
    rows.push(["agreement with KernelSHAP", `median Spearman ρ ${q.median_rho.toFixed(2)} on ${q.images} held-out images (against KernelSHAP, ${q.reference.runs || 1} × ${q.reference.samples} samples; one such KernelSHAP run against another: ${q.kernel.median_rho.toFixed(2)})`]);
    rows.push(["its deletion / insertion AUC", `${q.deletion_auc.toFixed(3)} / ${q.insertion_auc.toFixed(3)} (KernelSHAP: ${q.kernel.deletion_auc.toFixed(3)} / ${q.kernel.insertion_auc.toFixed(3)})`]);
  }
  if (result.convergence) rows.push(["converged", result.convergence.converged ? "yes" : `no (${result.convergence.criterion} ${result.convergence.value.toFixed(2)} > ${result.convergence.threshold})`]);
  if (f) {
    rows.push(["deletion AUC (lower is better)", `${f.deletion_auc.toFixed(3)} against ${f.random_deletion_auc.toFixed(3)} for random orders`]);
    rows.push(["insertion AUC (higher is better)", `${f.insertion_auc.toFixed(3)} against ${f.random_insertion_auc.toFixed(3)} for random orders`]);
  }
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    facts.append(dt, dd);
  }
  $("result").hidden = false;
  await selectTab(tabs.firstElementChild, result);
  if (f) {
    try {
      await loadImage($("curves"), page.job.faithfulness_url, `Deletion and insertion curves of ${result.target.label}: deletion AUC ${f.deletion_auc.toFixed(3)}, insertion AUC ${f.insertion_auc.toFixed(3)}`);
    } catch (err) {
      showError(err.message);
    }
  }
}

async function selectTab(tab, result) {
  for (const t of $("tabs").children) {
    t.setAttribute("aria-selected", String(t === tab));
    t.tabIndex = t === tab ? 0 : -1;
  }
  const which = tab.dataset.classes;
  const alt = which === "all"
    ? "SHAP heatmaps of every class"
    : `SHAP heatmap of class ${which} (red: for it, blue: against it)`;
  const heatmap = $("heatmap");
  heatmap.dataset.classes = which;
  try {
    await loadImage(heatmap, `${page.job.heatmap_url}?classes=${encodeURIComponent(which)}`, alt);
  } catch (err) {
    showError(err.message);
  }
}

// -- the model card ------------------------------------------------------------------------
async function loadModel() {
  const card = $("model-card");
  let info;
  try {
    info = await (await api("/model")).json();
  } catch (err) {
    card.replaceChildren(Object.assign(document.createElement("dd"), { textContent: err.message }));
    if (err.status === 401) return;
    showError(err.message);
    return;
  }
  const target = $("target");
  target.replaceChildren(Object.assign(document.createElement("option"), { value: "", textContent: "the top prediction" }));
  for (const name of info.class_names) target.append(Object.assign(document.createElement("option"), { value: name, textContent: name }));

  const meta = info.metadata || {};
  const ev = info.evaluation;
  const rows = [
    ["version", `${info.name} ${info.version}${info.promoted ? " (promoted)" : ""}`],
    ["profile", `${info.profile}, ${info.input_size} px input, ${meta.epochs_run ?? "?"} epochs`],
    ["starting weights", meta.weights ? meta.weights.used : "not recorded"],
    ["runs on", `${info.device} (${info.runtime})`],
    ["validation accuracy (training)", meta.best_val_accuracy != null ? `${(100 * meta.best_val_accuracy).toFixed(2)} %` : "–"],
  ];
  if (ev) {
    rows.push([`accuracy on ${ev.num_images} evaluation images`, `${(100 * ev.accuracy).toFixed(2)} %`]);
    rows.push(["macro precision / recall / F1", `${ev.macro.precision.toFixed(3)} / ${ev.macro.recall.toFixed(3)} / ${ev.macro.f1.toFixed(3)}`]);
  } else {
    rows.push(["evaluation", "not evaluated yet (python -m training evaluate)"]);
  }
  card.replaceChildren();
  for (const [term, value] of rows) {
    card.append(Object.assign(document.createElement("dt"), { textContent: term }),
      Object.assign(document.createElement("dd"), { textContent: value }));
  }
  $("report-line").hidden = !info.report_url;
  $("open-report").onclick = () => openReport(info.report_url);
  const table = $("per-class");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  if (ev && ev.per_class) {
    for (const [name, m] of Object.entries(ev.per_class)) {
      const tr = document.createElement("tr");
      for (const cell of [name, m.precision.toFixed(3), m.recall.toFixed(3), m.f1.toFixed(3)]) {
        tr.append(Object.assign(document.createElement(tr.children.length ? "td" : "th"), { textContent: cell }));
      }
      body.append(tr);
    }
    table.hidden = false;
  }
  for (const [img, cap, path, alt] of [
    [$("confusion"), $("confusion-cap"), "/model/confusion-matrix.png", `Confusion matrix of ${info.version}`],
    [$("training-curves"), $("curves-cap"), "/model/training-curves.png", `Training and validation curves of ${info.version}`],
  ]) {
    try {
      await loadImage(img, path, alt);
      cap.hidden = false;
    } catch (_) {
      img.hidden = true;  // not evaluated yet: the card says so
    }
  }
}

// the report is fetched with the key (a link cannot send it), then opened from an object URL
async function openReport(path) {
  const tab = window.open("", "_blank");
  try {
    const blob = await (await api(path)).blob();
    const url = URL.createObjectURL(blob);
    if (tab) tab.location = url; else window.location = url;
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    if (tab) tab.close();
    showError(err.message);
  }
}

async function start() {
  setUpKey();
  setUpImage();
  setUpExplain();
  // the key field appears when the service answers 401 (see api()) or a key is already set
  if (apiKey()) $("key-form").hidden = false;
  await loadModel();
}

document.addEventListener("DOMContentLoaded", start);
