// The unclip page: generate (with a negative prompt and an output format), mix two prompts,
// vary or image-to-image, edit (mask brush) and interpolate through the server's Images API.
// Every job is submitted with `Prefer: respond-async` and followed through its server-sent
// events (read with fetch, so the API key can go in a header).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem("unclip-api-key") || "",
  status: null,
  job: null,          // id of the running job
  picks: [],          // gallery items chosen for interpolation
  oldest: null,       // id of the last gallery item shown (paging)
  editing: null,      // gallery item in the editor
  varying: null,      // gallery item in the variations panel
};

// -- HTTP ------------------------------------------------------------------------------------

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    askKey("This server needs an API key.");
    throw new Error("API key needed");
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    let text = body?.error?.message || `${response.status} ${response.statusText}`;
    const retry = response.headers.get("retry-after");
    if (response.status === 429 && retry) text += ` (try again in ${retry} s)`;
    throw new Error(text);
  }
  return body;
}

function askKey(why) {
  const key = prompt(`${why ? why + "\n" : ""}API key (kept in this browser):`, state.key);
  if (key !== null) {
    state.key = key.trim();
    localStorage.setItem("unclip-api-key", state.key);
    start();
  }
}

// -- messages and progress ---------------------------------------------------------------------

function say(text, ok = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("ok", ok);
  el.hidden = !text;
}

function busy(on) {
  for (const id of ["generate-button", "interpolate-button", "edit-run", "mix-button", "vary-run"]) {
    $(id).disabled = on;
  }
  $("progress").hidden = !on;
  if (on) { $("progress-bar").value = 0; $("progress-text").textContent = "queued"; }
}

function showProgress(p) {
  $("progress-bar").value = p.fraction;
  $("progress-text").textContent =
    `${p.batch > 1 ? `images ${p.image - p.batch + 1}–${p.image}` : `image ${p.image}`}/${p.images}` +
    ` · ${p.stage} step ${p.step}/${p.steps}`;
}

// Read a text/event-stream response: yields {event, data, id}.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const ev = { event: "message", data: "", id: null };
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) ev.event = line.slice(6).trim();
        else if (line.startsWith("data:")) ev.data += line.slice(5).trim();
        else if (line.startsWith("id:")) ev.id = line.slice(3).trim();
      }
      if (ev.data) yield ev;
    }
  }
}

// Submit a job (JSON object or FormData) and follow it to the end; returns the job object.
async function runJob(path, body) {
  const isForm = body instanceof FormData;
  busy(true);
  say("");
  try {
    const job = await api(path, {
      method: "POST",
      body: isForm ? body : JSON.stringify(body),
      headers: isForm ? { Prefer: "respond-async" }
                      : { Prefer: "respond-async", "Content-Type": "application/json" },
    });
    state.job = job.id;
    const response = await fetch(job.events_url, { headers: headers() });
    if (!response.ok) throw new Error(`progress stream: ${response.status}`);
    let last = job;
    for await (const ev of readEvents(response)) {
      const data = JSON.parse(ev.data);
      if (ev.event === "progress") showProgress(data);
      else if (ev.event === "started") $("progress-text").textContent = "started";
      else if (ev.event === "done") last = data;
    }
    if (last.status !== "succeeded") {
      throw new Error(last.error ? last.error.message : `job ${last.status}`);
    }
    say(`done: ${last.result.data.length} image(s)`, true);
    await refreshGallery(last.result.data);
    return last;
  } catch (err) {
    say(err.message);
    return null;
  } finally {
    state.job = null;
    busy(false);
  }
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

// The fields every job but interpolation takes from the form: output format, negative prompt.
function commonFields() {
  const fields = { output_format: $("output-format").value };
  const negative = $("negative-prompt").value.trim();
  if (negative) fields.negative_prompt = negative;
  return fields;
}

function formWith(fields) {
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) form.append(key, String(value));
  return form;
}

// -- gallery -----------------------------------------------------------------------------------

function card(item) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = item.id;
  node.querySelector("img").src = item.url;
  node.querySelector("img").alt = item.prompt || item.method || "image";
  node.querySelector("a.open").href = item.url;
  const download = node.querySelector("a.download");
  download.href = item.url;
  download.download = `unclip-${item.seed ?? item.id}.${item.format || "png"}`;
  node.querySelector(".caption").textContent = item.prompt || `(${item.method})`;
  node.querySelector(".seed").textContent = item.seed != null ? ` seed ${item.seed}` : "";
  if (!state.status?.gallery) node.querySelector('[data-action="delete"]').remove();
  node.addEventListener("click", (e) => {
    const action = e.target.dataset?.action;
    if (action) onCardAction(action, item, node);
  });
  return node;
}

async function loadGallery(more = false) {
  if (!state.status?.gallery) return;
  const query = more && state.oldest ? `?before=${state.oldest}` : "";
  const page = await api(`/v1/gallery${query}`);
  if (!more) $("gallery").replaceChildren();
  for (const item of page.data) $("gallery").append(card(item));
  if (page.data.length) state.oldest = page.data[page.data.length - 1].id;
  $("more-button").hidden = !page.has_more;
  $("empty").hidden = $("gallery").children.length > 0;
}

async function refreshGallery(results) {
  if (state.status?.gallery) return loadGallery();
  // no gallery on this server: show this session's results only
  for (const r of [...results].reverse()) {
    const format = r.url.split(".").pop();
    $("gallery").prepend(card({ id: r.id, url: r.url, seed: r.seed, prompt: "", method: "result", format }));
  }
  $("empty").hidden = $("gallery").children.length > 0;
}

async function imageBlob(item) {
  const response = await fetch(item.url);
  if (!response.ok) throw new Error(`could not fetch the image (${response.status})`);
  return response.blob();
}

async function onCardAction(action, item, node) {
  try {
    if (action === "vary") {
      openVary(item);
    } else if (action === "edit") {
      openEditor(item);
    } else if (action === "pick") {
      pick(item, node);
    } else if (action === "delete") {
      await api(`/v1/gallery/${item.id}`, { method: "DELETE" });
      node.remove();
      $("empty").hidden = $("gallery").children.length > 0;
    }
  } catch (err) {
    say(err.message);
  }
}

// -- variations and image-to-image ------------------------------------------------------------

function openVary(item) {
  state.varying = item;
  $("vary-image").src = item.url;
  $("vary").hidden = false;
  $("vary").scrollIntoView({ block: "nearest" });
}

// Variations of the image, or with a prompt image-to-image at the chosen strength.
async function runVary() {
  const item = state.varying;
  if (!item) return;
  const fields = { n: numberField("n") ?? 4, response_format: "url", ...commonFields() };
  const prompt = $("vary-prompt").value.trim();
  if (prompt) {
    fields.prompt = prompt;
    fields.strength = $("strength").value;
  } else {
    delete fields.negative_prompt;  // plain variations: no caption to push away from
  }
  const form = formWith(fields);
  form.append("image", await imageBlob(item), `image.${item.format || "png"}`);
  await runJob("/v1/images/variations", form);
}

// -- mix ----------------------------------------------------------------------------------------

async function runMix() {
  const a = $("mix-a").value.trim();
  const b = $("mix-b").value.trim();
  if (!a || !b) { say("Give two prompts to mix."); return; }
  const w = Number($("mix-weight").value);
  const fields = {
    input_1: a, input_2: b, weight_1: (1 - w).toFixed(2), weight_2: w.toFixed(2),
    n: numberField("n") ?? 1, response_format: "url", ...commonFields(),
  };
  const seed = numberField("seed");
  if (seed !== undefined) fields.seed = seed;
  await runJob("/v1/images/mix", formWith(fields));
}

// -- interpolation -----------------------------------------------------------------------------

function pick(item, node) {
  if (state.picks.length === 2) clearPicks();
  state.picks.push(item);
  node.classList.add("picked");
  $("interpolate").hidden = false;
  $("pick-a").src = state.picks[0]?.url || "";
  $("pick-b").src = state.picks[1]?.url || "";
  $("interpolate-button").disabled = state.picks.length < 2;
}

function clearPicks() {
  state.picks = [];
  for (const n of document.querySelectorAll(".card.picked")) n.classList.remove("picked");
  $("pick-a").removeAttribute("src");
  $("pick-b").removeAttribute("src");
  $("interpolate").hidden = true;
}

async function interpolate() {
  if (state.picks.length < 2) return;
  const form = new FormData();
  form.append("image_a", await imageBlob(state.picks[0]), "a.png");
  form.append("image_b", await imageBlob(state.picks[1]), "b.png");
  form.append("frames", String(numberField("frames") ?? 5));
  const job = await runJob("/v1/images/interpolations", form);
  if (job) clearPicks();
}

// -- editor: paint a mask (painted = repaint) ----------------------------------------------------

const brush = { down: false };

function openEditor(item) {
  state.editing = item;
  const img = $("edit-image");
  img.onload = () => {
    const canvas = $("edit-mask");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    $("brush").max = String(Math.max(2, Math.round(img.naturalWidth / 4)));
    $("brush").value = String(Math.max(1, Math.round(img.naturalWidth / 10)));
  };
  img.src = item.url;
  $("edit-prompt").value = item.prompt || $("prompt").value;
  $("editor").showModal();
}

function paint(e) {
  const canvas = $("edit-mask");
  const rect = canvas.getBoundingClientRect();
  const x = ((e.clientX - rect.left) / rect.width) * canvas.width;
  const y = ((e.clientY - rect.top) / rect.height) * canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "rgb(230, 40, 40)";
  ctx.beginPath();
  ctx.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
}

// The mask as the API wants it: the image's size, white = repaint, black = keep.
function maskBlob() {
  const src = $("edit-mask");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const painted = src.getContext("2d").getImageData(0, 0, src.width, src.height).data;
  const ctx = out.getContext("2d");
  const image = ctx.createImageData(src.width, src.height);
  let any = false;
  for (let i = 0; i < painted.length; i += 4) {
    const v = painted[i + 3] > 0 ? 255 : 0;
    any ||= v > 0;
    image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
    image.data[i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return new Promise((resolve) => out.toBlob((b) => resolve(any ? b : null), "image/png"));
}

async function runEdit() {
  const prompt = $("edit-prompt").value.trim();
  if (!prompt) { $("edit-prompt").focus(); return; }
  const mask = await maskBlob();
  if (!mask) { say("Paint the area to repaint first."); return; }
  const form = formWith({ prompt, n: numberField("n") ?? 4, ...commonFields() });
  form.append("image", await imageBlob(state.editing), `image.${state.editing.format || "png"}`);
  form.append("mask", mask, "mask.png");
  $("editor").close();
  await runJob("/v1/images/edits", form);
}

// -- start ---------------------------------------------------------------------------------------

async function start() {
  try {
    state.status = await api("/v1/status");
  } catch (err) {
    $("model").textContent = err.message;
    return;
  }
  const s = state.status;
  $("model").textContent = `${s.pipeline} · ${s.image_size}×${s.image_size} px · ` +
    `${s.queue.workers} worker(s)`;
  for (const id of ["prompt", "negative-prompt", "mix-a", "mix-b", "vary-prompt", "edit-prompt"]) {
    $(id).maxLength = s.limits.max_prompt_chars;
  }
  $("n").max = String(s.limits.max_n);
  $("steps").max = String(s.limits.max_steps);
  $("frames").max = String(s.limits.max_frames);
  if (s.defaults) {
    $("steps").placeholder = `default ${s.defaults.decoder.steps}`;
    $("guidance").placeholder = `default ${s.defaults.decoder.guidance}`;
  }
  try {
    await loadGallery();
  } catch (err) {
    say(err.message);
  }
  if (!s.gallery) $("empty").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("submit", (e) => {
    e.preventDefault();
    const body = {
      prompt: $("prompt").value, n: numberField("n") ?? 1, response_format: "url", ...commonFields(),
    };
    for (const key of ["seed", "steps", "guidance"]) {
      const v = numberField(key);
      if (v !== undefined) body[key] = v;
    }
    runJob("/v1/images/generations", body);
  });
  $("cancel-button").addEventListener("click", () => {
    if (state.job) api(`/v1/jobs/${state.job}`, { method: "DELETE" }).catch((e) => say(e.message));
  });
  $("key-button").addEventListener("click", () => askKey(""));
  $("mix").addEventListener("submit", (e) => {
    e.preventDefault();
    runMix().catch((err) => say(err.message));
  });
  $("vary-run").addEventListener("click", () => runVary().catch((e) => say(e.message)));
  $("vary-close").addEventListener("click", () => { $("vary").hidden = true; state.varying = null; });
  for (const [input, shown] of [["mix-weight", "mix-weight-value"], ["strength", "strength-value"]]) {
    $(input).addEventListener("input", () => { $(shown).value = Number($(input).value).toFixed(2); });
  }
  $("more-button").addEventListener("click", () => loadGallery(true).catch((e) => say(e.message)));
  $("interpolate-button").addEventListener("click", () => interpolate().catch((e) => say(e.message)));
  $("interpolate-clear").addEventListener("click", clearPicks);
  $("edit-run").addEventListener("click", () => runEdit().catch((e) => say(e.message)));
  $("mask-clear").addEventListener("click", () => {
    const c = $("edit-mask");
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  });
  const canvas = $("edit-mask");
  canvas.addEventListener("pointerdown", (e) => {
    brush.down = true;
    canvas.setPointerCapture(e.pointerId);
    paint(e);
  });
  canvas.addEventListener("pointermove", (e) => { if (brush.down) paint(e); });
  canvas.addEventListener("pointerup", () => { brush.down = false; });
  start();
});
