// dmoe web UI: one small script, no framework, no network beyond this server.
// Every text from the server goes into the page as text (textContent, text nodes), never as markup.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// ---------------------------------------------------------------- API calls
function headers(extra = {}) {
  const key = sessionStorage.getItem("dmoe-api-key");
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

async function api(method, url, body, contentType = "application/json") {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": contentType }) };
  if (body !== undefined) init.body = contentType === "application/json" ? JSON.stringify(body) : body;
  const r = await fetch(url, init);
  const text = await r.text();
  let data = text;
  try { data = JSON.parse(text); } catch (_) { /* plain text */ }
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `${r.status} ${text}`);
  return data;
}

function notice(message, isError = false) {
  const n = $("#notice");
  n.textContent = message;
  n.className = isError ? "error" : "";
}

// ---------------------------------------------------------------- a small line chart
function drawChart(svg, series) {
  // series: [{points: [[x, y], ...], color}], drawn in one frame
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), pad = 30;
  const all = series.flatMap(s => s.points);
  if (!all.length) return;
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = x => pad + (x - x0) / (x1 - x0) * (W - 2 * pad), sy = y => H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const text = (x, y, t) => { const e = document.createElementNS(ns, "text"); e.setAttribute("x", x); e.setAttribute("y", y);
    e.setAttribute("font-size", "10"); e.textContent = t; svg.append(e); };
  text(2, pad - 4, y1.toFixed(3)); text(2, H - pad, y0.toFixed(3)); text(W - pad - 20, H - 8, "step " + x1);
  for (const s of series) {
    if (!s.points.length) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("fill", "none"); line.setAttribute("stroke", s.color); line.setAttribute("stroke-width", "2");
    line.setAttribute("points", s.points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("class", "series");
    line.dataset.points = String(s.points.length);
    svg.append(line);
  }
}

// ---------------------------------------------------------------- datasets
function initDatasets() {
  $("#upload-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const file = $("#ds-file").files[0], out = $("#upload-result");
    out.textContent = ""; out.className = "";
    if (!file) return;
    const q = new URLSearchParams({ name: $("#ds-name").value, filename: file.name });
    if ($("#ds-format").value) q.set("formatting", $("#ds-format").value);
    if ($("#ds-replace").checked) q.set("replace", "true");
    try {
      const r = await api("POST", "/ui/api/datasets?" + q, await file.arrayBuffer(), "application/octet-stream");
      out.className = "ok";
      out.textContent = `${r.name}: ${r.rows} rows (${r.formatting}) validated and registered as ${r.file_name}`;
      setTimeout(() => location.reload(), 800);
    } catch (e) {
      out.className = "error";
      out.textContent = "refused: " + e.message;
    }
  });
  for (const b of $$("button.preview")) b.addEventListener("click", () => preview(b.dataset.name));
  $("#generate-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const out = $("#upload-result");
    const body = { domain: $("#gen-domain").value, rows: +$("#gen-rows").value };
    if ($("#gen-name").value) body.name = $("#gen-name").value;
    try {
      const r = await api("POST", "/ui/api/datasets/generate", body);
      out.className = "ok";
      out.textContent = `${r.name}: ${r.rows} rows generated and registered; ${r.heldout_added} held-out questions added`;
      setTimeout(() => location.reload(), 800);
    } catch (e) { out.className = "error"; out.textContent = "refused: " + e.message; }
  });
}

async function preview(name) {
  const box = $("#preview");
  box.textContent = "loading…";
  try {
    const r = await api("GET", `/ui/api/datasets/${encodeURIComponent(name)}?limit=20`);
    box.textContent = "";
    box.append(el("h2", {}, `${r.name}: ${r.total} rows (${r.formatting}), first ${r.rows.length}`));
    for (const row of r.rows) {
      const card = el("div", { class: "card row" });
      if (row.system) card.append(el("div", { class: "turn muted" }, "system: " + row.system));
      for (const [q, a] of row.turns) {
        card.append(el("div", { class: "turn" }, "user: " + q));
        card.append(el("div", { class: "turn" }, "assistant: " + a));
      }
      if (row.tokens !== undefined) card.append(el("small", { class: "muted tokens" }, `${row.tokens} tokens under the base's template`));
      box.append(card);
    }
  } catch (e) { box.textContent = ""; notice(e.message, true); }
}

// ---------------------------------------------------------------- training
function formValues() {
  const values = {};
  for (const input of $$("#train-form [name]")) {
    const kind = input.dataset.kind, key = input.name;
    if (kind === "checkbox") { values[key] = input.checked; continue; }
    const v = input.value.trim();
    if (v === "") continue;
    if (kind === "integer") values[key] = Number.isInteger(+v) ? +v : v;
    else if (kind === "number") values[key] = isNaN(+v) ? v : +v;
    else if (key === "expert_signature") values[key] = v.split(",").map(s => s.trim()).filter(Boolean);
    else values[key] = v;
  }
  return values;
}

let source = null;

function watch(runId) {
  $("#run").hidden = false;
  $("#run-id").textContent = runId;
  $("#run-yaml").href = `/ui/api/runs/${runId}/config`;
  history.replaceState(null, "", "#run=" + runId);
  if (source) source.close();
  source = new EventSource(`/ui/api/runs/${runId}/events`);
  source.onmessage = ev => showRun(JSON.parse(ev.data));
  source.addEventListener("end", () => { source.close(); source = null; });
}

function showRun(r) {
  $("#run-state").textContent = r.state + (r.error ? ": " + r.error : "");
  $("#run-step").textContent = r.total_steps ? `step ${r.step} / ${r.total_steps}` : "starting…";
  $("#run-tps").textContent = r.tokens_per_s ? `${Math.round(r.tokens_per_s)} tokens/s` : "- tokens/s";
  $("#run-eta").textContent = r.eta_s != null ? `${Math.round(r.eta_s)} s` : "-";
  $("#run-stop").disabled = !["queued", "running"].includes(r.state);
  $("#run-resume").disabled = !["stopped", "failed"].includes(r.state);
  $("#loss-points").textContent = String(r.loss.length);
  drawChart($("#loss-chart"), [{ points: r.loss, color: "#1f77b4" }, { points: r.eval_loss, color: "#d62728" }]);
  $("#run-log").textContent = r.log_tail.join("\n");
  const row = $(`#runs tr[data-run="${r.id}"] .state`);
  if (row) row.textContent = r.state;
}

function initTrain() {
  $("#show-yaml").addEventListener("click", async () => {
    try {
      const text = await api("POST", "/ui/api/train/yaml", formValues());
      $("#yaml").hidden = false; $("#yaml").textContent = text;
      const link = $("#yaml-download");
      link.hidden = false; link.href = URL.createObjectURL(new Blob([text], { type: "text/yaml" }));
      link.download = (formValues().expert_name || "train") + ".yaml";
      notice("");
    } catch (e) { notice(e.message, true); }
  });
  $("#train-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    try {
      const r = await api("POST", "/ui/api/runs", formValues());
      notice(`run ${r.id} ${r.state}`);
      $("#runs tbody").prepend(el("tr", { "data-run": r.id }, el("td", {}, r.id), el("td", {}, r.name),
        el("td", { class: "state" }, r.state), el("td")));
      watch(r.id);
    } catch (e) { notice(e.message, true); }
  });
  $("#run-stop").addEventListener("click", async () => {
    try { showRun(await api("POST", `/ui/api/runs/${$("#run-id").textContent}/stop`)); } catch (e) { notice(e.message, true); }
  });
  $("#run-resume").addEventListener("click", async () => {
    try { await api("POST", `/ui/api/runs/${$("#run-id").textContent}/resume`); watch($("#run-id").textContent); }
    catch (e) { notice(e.message, true); }
  });
  for (const b of $$("button.watch")) b.addEventListener("click", () => watch(b.dataset.run));
  // a reload or a second tab finds the run: the one in the address, else the newest still going
  const m = location.hash.match(/run=([0-9a-f]+)/);
  const going = $$("#runs tr").find(tr => ["queued", "running"].includes($(".state", tr)?.textContent));
  if (m) watch(m[1]); else if (going) watch(going.dataset.run);
}

// ---------------------------------------------------------------- experts
function initExperts() {
  const act = async (fn, ok) => { try { const r = await fn(); notice(ok(r)); setTimeout(() => location.reload(), 600); } catch (e) { notice(e.message, true); } };
  for (const b of $$("button.load")) b.addEventListener("click", () =>
    act(() => api("POST", "/v1/experts", { path: b.dataset.path }), r => `loaded ${r.name}`));
  for (const b of $$("button.unload")) b.addEventListener("click", () =>
    act(() => api("DELETE", `/v1/experts/${encodeURIComponent(b.dataset.name)}`), () => `unloaded ${b.dataset.name}`));
  for (const b of $$("button.set-scale")) b.addEventListener("click", async () => {
    const scales = (await api("GET", "/lora-adapters")).map(a => ({ id: a.id, scale: a.scale }));
    const id = (await adapterIds())[b.dataset.name];
    const input = $(`input.scale[data-name="${b.dataset.name}"]`);
    const mine = scales.find(s => s.id === id);
    if (!mine) return notice(`${b.dataset.name} is not in /lora-adapters`, true);
    mine.scale = +input.value;
    act(() => api("POST", "/lora-adapters", scales), () => `default scale of ${b.dataset.name}: ${input.value}`);
  });
  for (const b of $$("button.export")) b.addEventListener("click", async () => {
    notice(`exporting ${b.dataset.name} to GGUF…`);
    try {
      const r = await api("POST", `/ui/api/experts/${encodeURIComponent(b.dataset.name)}/gguf`);
      notice(`wrote ${r.file} (${(r.bytes / 1e6).toFixed(1)} MB, ${r.tensors} tensors)`);
      const dd = $(`article[data-name="${b.dataset.name}"] dd.gguf`);
      dd.textContent = "";
      dd.append(el("a", { href: r.download, download: r.file, class: "gguf-link" }, r.file));
    } catch (e) { notice(e.message, true); }
  });
  $("#bench-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const experts = $$(".bench-pick:checked").map(c => c.value);
    const state = $("#bench-state");
    try {
      let r = await api("POST", "/ui/api/bench", { experts, limit: +$("#bench-limit").value });
      for (let i = 0; i < 3600 && r.state === "running"; i++) {   // at most an hour of polling
        state.textContent = `running… ${r.log_tail.slice(-1)[0] || ""}`;
        await new Promise(res => setTimeout(res, 1000));
        r = await api("GET", `/ui/api/bench/${r.id}`);
      }
      state.textContent = r.state + " ";
      if (r.report) state.append(el("a", { href: r.report, target: "_blank", id: "bench-report" }, "open report.html"));
    } catch (e) { notice(e.message, true); }
  });
  for (const svg of $$("svg.loss-mini")) api("GET", `/ui/api/experts/${encodeURIComponent(svg.dataset.name)}/loss`)
    .then(r => drawChart(svg, [{ points: r.loss, color: "#1f77b4" }, { points: r.eval_loss, color: "#d62728" }])).catch(() => {});
}

// ---------------------------------------------------------------- playground
function routeText(route) {
  if (!route) return "";
  const p = route.confidence != null ? ` p=${route.confidence.toFixed(2)}` : "";
  return `→ ${route.label}${p}: ${route.reason}`;
}

async function ask(model, prompt, maxTokens, box, lora) {
  const body = { model: model === "blend" ? "base" : model, messages: [{ role: "user", content: prompt }],
                 max_tokens: maxTokens, stream: true };
  if (lora) body.lora = lora;
  const badge = el("span", { class: "route" }, model === "auto" ? "routing…" : model);
  const text = el("div", { class: "text" });
  box.append(el("h3", {}, model + " ", badge), text);
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
  if (!r.ok) { const e = await r.json().catch(() => ({})); text.textContent = "error: " + ((e.error && e.error.message) || r.status); text.className = "error"; return; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i); buf = buf.slice(i + 2);
      const data = event.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { text.append(el("span", { class: "error" }, " " + chunk.error.message)); continue; }
      if (chunk.dmoe && chunk.dmoe.route) { badge.textContent = routeText(chunk.dmoe.route); badge.title = JSON.stringify(chunk.dmoe.route.scores); }
      for (const c of chunk.choices || []) if (c.delta && c.delta.content) text.append(c.delta.content);
    }
  }
}

async function adapterIds() {
  // expert name -> llama-server adapter id (the ids /lora-adapters and a request's "lora" use)
  const r = await api("GET", "/v1/experts");
  return Object.fromEntries(r.experts.filter(e => e.id !== null).map(e => [e.name, e.id]));
}

async function blendLora() {
  const ids = await adapterIds();
  return $$(".blend-scale").filter(i => i.dataset.name in ids).map(i => ({ id: ids[i.dataset.name], scale: +i.value }));
}

function initPlayground() {
  $("#model").addEventListener("change", () => { $("#blend").hidden = $("#model").value !== "blend"; });
  $("#side-by-side").addEventListener("change", () => { $("#compare").hidden = !$("#side-by-side").checked; });
  $("#chat-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const prompt = $("#prompt").value, maxTokens = +$("#max-tokens").value;
    const answers = $("#answers");
    answers.textContent = "";
    const models = $("#side-by-side").checked ? $$(".compare:checked").map(c => c.value) : [$("#model").value];
    const grid = el("div", { class: "answers-grid" });
    answers.append(el("p", { class: "muted" }, "you: " + prompt), grid);
    const lora = models.includes("blend") ? await blendLora() : null;
    await Promise.all(models.map(m => {
      const box = el("div", { class: "card answer", "data-model": m });
      grid.append(box);
      return ask(m, prompt, maxTokens, box, m === "blend" ? lora : null).catch(e => box.append(el("div", { class: "error" }, e.message)));
    }));
  });
}

// ---------------------------------------------------------------- start
document.addEventListener("DOMContentLoaded", () => {
  const key = $("#api-key");
  if (key) {
    key.value = sessionStorage.getItem("dmoe-api-key") || "";
    key.addEventListener("change", () => sessionStorage.setItem("dmoe-api-key", key.value));
  }
  ({ datasets: initDatasets, train: initTrain, experts: initExperts, playground: initPlayground })[document.body.dataset.page]?.();
});
