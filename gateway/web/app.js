// The gateway's page: jobs (submit, live progress and ETA, cancel, download), voices, and a speech try-out.
// Plain browser JavaScript, no build step. Every call carries the API key from localStorage as a bearer token.
// Progress is read from each active job's Server-Sent Events stream through fetch() (EventSource cannot send an
// Authorization header); the list itself is refreshed every few seconds to pick up jobs submitted elsewhere.
"use strict";

const KEY_STORE = "triton-tts.apiKey";
const ACTIVE = new Set(["queued", "running", "encoding"]);
const jobs = new Map();      // id -> the job as the API returns it
const watchers = new Map();  // id -> AbortController of its event stream
let modelId = "tts-1";

const $ = (sel) => document.querySelector(sel);

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function say(message, kind = "info") {
  const box = $("#status");
  box.textContent = message;
  box.className = kind;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function clock(seconds) {
  if (seconds == null) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(r).padStart(2, "0")}`;
}

// --- voices ---------------------------------------------------------------------------------------------------

async function loadVoices() {
  const data = (await (await api("/v1/audio/voices")).json()).data;
  const list = $("#voices");
  list.replaceChildren(...data.map((v) => el("li", { dataset: { voice: v.name } },
    el("span", {}, v.name, el("small", { textContent: `${v.seconds.toFixed(1)} s, ${v.sample_rate} Hz` })),
    el("button", { class: "secondary delete-voice", textContent: "Delete", onclick: () => deleteVoice(v) }))));
  if (!data.length) list.append(el("li", { class: "muted", textContent: "No voices yet: upload a recording." }));
  for (const select of document.querySelectorAll(".voice-select")) {
    const keep = select.value;
    select.replaceChildren(...data.map((v) => el("option", { value: v.name, textContent: v.name })));
    if (data.some((v) => v.name === keep)) select.value = keep;
  }
}

async function deleteVoice(voice) {
  if (!confirm(`Delete the voice ${voice.name}?`)) return;
  try {
    await api(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
    say(`Deleted the voice ${voice.name}.`);
    await loadVoices();
  } catch (e) { say(e.message, "error"); }
}

$("#voice-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("#voice-file").files[0];
  const name = $("#voice-name").value.trim();
  if (!file || !name) return;
  const form = new FormData();
  form.append("name", name);
  form.append("audio", file, file.name);
  try {
    await api("/v1/audio/voices", { method: "POST", body: form });
    say(`Uploaded the voice ${name}.`);
    event.target.reset();
    await loadVoices();
  } catch (e) { say(e.message, "error"); }
});

// --- speech ---------------------------------------------------------------------------------------------------

$("#speech-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("#speech-go");
  button.disabled = true;
  try {
    const body = { model: modelId, input: $("#speech-text").value, voice: $("#speech-voice").value,
                   response_format: "mp3" };
    const response = await api("/v1/audio/speech", { method: "POST", body: JSON.stringify(body),
                                                     headers: { "Content-Type": "application/json" } });
    const audio = $("#speech-audio");
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(await response.blob());
    audio.play().catch(() => { /* autoplay may be refused; the controls remain */ });
    say("Spoken.");
  } catch (e) { say(e.message, "error"); }
  finally { button.disabled = false; }
});

// --- jobs -----------------------------------------------------------------------------------------------------

$("#job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("#job-file").files[0];
  const text = $("#job-text").value.trim();
  if (!file && !text) { say("Choose a file or paste a text.", "error"); return; }
  const form = new FormData();
  if (file) form.append("file", file, file.name); else form.append("input", text);
  form.append("voice", $("#job-voice").value);
  form.append("format", $("#job-format").value);
  for (const field of ["title", "author"]) {
    const value = $(`#job-${field}`).value.trim();
    if (value) form.append(field, value);
  }
  const button = $("#job-submit");
  button.disabled = true;
  try {
    const job = await (await api("/v1/audio/jobs", { method: "POST", body: form })).json();
    say(`Job ${job.id} queued: ${job.chapters.length} chapter(s), ${job.characters.total} characters.`);
    event.target.reset();
    update(job);
  } catch (e) { say(e.message, "error"); }
  finally { button.disabled = false; }
});

function update(job) {
  jobs.set(job.id, job);
  render();
  if (ACTIVE.has(job.state)) watch(job.id);
}

async function refreshJobs() {
  try {
    const data = (await (await api("/v1/audio/jobs?limit=50")).json()).data;
    const seen = new Set(data.map((j) => j.id));
    for (const id of [...jobs.keys()]) if (!seen.has(id)) jobs.delete(id);
    for (const job of data) update(job);
    render();
    $("#server-state").textContent = "";
  } catch (e) {
    $("#server-state").textContent = e.status === 401 ? "Enter a valid API key." : e.message;
  }
}

async function watch(id) {
  if (watchers.has(id)) return;
  const controller = new AbortController();
  watchers.set(id, controller);
  try {
    const response = await api(`/v1/audio/jobs/${id}/events`, { signal: controller.signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if ((name === "progress" || name === "done") && data) {
          jobs.set(id, JSON.parse(data));
          render();
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError" && e.status !== 404) say(`Lost the progress of ${id}: ${e.message}`, "error");
  } finally {
    watchers.delete(id);
  }
}

async function cancelJob(job) {
  try {
    const after = await (await api(`/v1/audio/jobs/${job.id}`, { method: "DELETE" })).json();
    if (after.deleted) { jobs.delete(job.id); watchers.get(job.id)?.abort(); render(); }
    else update(after);
  } catch (e) { say(e.message, "error"); }
}

async function download(job) {
  try {
    const response = await api(job.result.url);
    const blob = await response.blob();
    const ext = job.format === "opus" ? "opus" : job.format;
    const name = `${(job.title || job.id).replace(/[\\/:*?"<>|]+/g, "_")}.${ext}`;
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    say(`Downloaded ${name}.`);
  } catch (e) { say(e.message, "error"); }
}

function render() {
  const rows = [...jobs.values()].sort((a, b) => b.created_at - a.created_at).map((job) => {
    const fraction = job.state === "succeeded" ? 1 : (job.progress || 0);
    const detail = job.error ? job.error.message
      : `${job.chapters.length} chapter(s), ${job.characters.done}/${job.characters.total ?? "?"} characters`
        + (job.segments.total ? `, ${job.segments.done}/${job.segments.estimated ? "~" : ""}${job.segments.total} segments` : "");
    const actions = [];
    if (ACTIVE.has(job.state)) actions.push(el("button", { class: "secondary cancel", textContent: "Cancel", onclick: () => cancelJob(job) }));
    if (job.state === "succeeded" && job.result) actions.push(el("button", { class: "download", textContent: "Download", onclick: () => download(job) }));
    if (!ACTIVE.has(job.state)) actions.push(el("button", { class: "secondary remove", textContent: "Remove", onclick: () => cancelJob(job) }));
    return el("tr", { dataset: { jobId: job.id, state: job.state } },
      el("td", { class: "title", title: job.id }, job.title || job.filename || job.id,
         el("small", { textContent: `${job.format.toUpperCase()} · ${job.voice} · ${detail}` })),
      el("td", { class: `state state-${job.state}`, textContent: job.phase === job.state ? job.state : `${job.state} (${job.phase})` }),
      el("td", {}, el("progress", { max: 1, value: fraction }), el("span", { class: "pct", textContent: `${Math.floor(fraction * 100)}%` })),
      el("td", { class: "eta", textContent: ACTIVE.has(job.state) ? clock(job.eta_seconds) : "" }),
      el("td", { class: "actions" }, ...actions));
  });
  $("#jobs tbody").replaceChildren(...rows);
  $("#jobs-empty").hidden = rows.length > 0;
}

// --- start ----------------------------------------------------------------------------------------------------

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORE, $("#api-key").value.trim());
  say("API key saved in this browser.");
  start();
});

async function start() {
  for (const c of watchers.values()) c.abort();
  try {
    const models = (await (await api("/v1/models")).json()).data;
    if (models.length) modelId = models[0].id;
  } catch (e) { /* the server may be starting; speech falls back to an OpenAI model name */ }
  try { await loadVoices(); } catch (e) { say(e.status === 401 ? "Enter a valid API key." : e.message, "error"); }
  await refreshJobs();
}

$("#api-key").value = apiKey();
start();
setInterval(refreshJobs, 5000);
